"""wsgate: a frame-aware reverse proxy and load balancer for WebSockets."""

__version__ = "0.1.0"
