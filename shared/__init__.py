"""Parley's shared package: the domain (pure) and the adapters both services use."""
