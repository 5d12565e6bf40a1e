"""Observability: health checks, metrics, events, persisted resilience state."""
