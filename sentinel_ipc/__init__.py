"""Sentinel: a resilient local download-scanning daemon and its client library."""

__version__ = "0.1.0"

__all__ = ["__version__"]
