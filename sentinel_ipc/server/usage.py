"""What one peer uid holds of the server's shared bounds.

Why: the daemon-wide bounds (connections, requests in flight) protect the
daemon, not its users from each other. One user's runaway program, or another
user on a socket shared with a group, could take every slot and leave the
rest with ``busy``. On a shared socket the server therefore also caps each
uid's share (``[server] max_connections_per_uid`` and ``max_in_flight_per_uid``,
a quarter of each bound unless set), summed over that uid's connections in one
:class:`UidUsage`. A private socket has one user: no share applies unless set.
"""

from __future__ import annotations


class UidUsage:
    """What one peer uid holds of the server's shared bounds, summed over its
    connections. Kept while it has a connection; a connection counts its
    requests here as well as on itself and on the server."""

    __slots__ = ("connections", "in_flight", "policy_reads", "scans", "uid")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.connections = 0
        self.in_flight = 0
        #: Client reads of the policy database in progress (``handlers.policy``).
        self.policy_reads = 0
        #: Scans running or queued (``handlers.scan.ScanAdmission``).
        self.scans = 0


__all__ = ["UidUsage"]
