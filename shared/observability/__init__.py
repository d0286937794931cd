"""What operators see: logs (`logs`), Prometheus metrics (`metrics`) and optional OpenTelemetry traces (`tracing`)."""
