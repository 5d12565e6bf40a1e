"""Request handlers, one module per subsystem; each exposes ``register(dispatcher, ...)``."""
