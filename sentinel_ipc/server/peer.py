"""Who is on the other end of a Unix socket: SO_PEERCRED, read once at accept.

The kernel fills these in at ``connect()`` time, so they cannot be forged by
the peer. They decide authorization (admin operations, other users) and key
the per-peer rate limit.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Protocol

import msgspec

_UCRED = struct.Struct("3i")


class PeerCredentials(msgspec.Struct, frozen=True):
    pid: int
    uid: int
    gid: int


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: _HasGetsockopt) -> PeerCredentials:
    """The connected peer's pid, uid and gid (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def is_admin(peer: PeerCredentials, admin_uids: list[int] | frozenset[int]) -> bool:
    """Admin = the daemon's own uid, or one the config lists."""
    return peer.uid == os.getuid() or peer.uid in admin_uids
