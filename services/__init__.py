"""Parley's processes: the HTTP API and the background worker."""
