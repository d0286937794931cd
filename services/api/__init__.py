"""The HTTP API: litestar controllers over the service layer."""
