"""The trio server: listener, connections, dispatch, peer credentials."""

from .dispatch import Dispatcher, RequestContext
from .peer import PeerCredentials
from .server import Server

__all__ = ["Dispatcher", "PeerCredentials", "RequestContext", "Server"]
