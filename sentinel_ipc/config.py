"""Configuration: a TOML file decoded into typed msgspec Structs.

Every setting has a default, so the daemon runs with no file at all. Unknown
keys are errors (a typo must not silently fall back to a default), and every
error names the key: ``server.max_connections: Expected `int`, got `str```.

Precedence, highest first: command-line flags, environment
(``SENTINEL_SOCKET``, ``SENTINEL_DATA_DIR``), the config file, built-in defaults.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import msgspec

from .config_checks import at_least, positive
from .errors import ConfigError
from .external.config import ForwardConfig, ReputationConfig
from .framing import MAX_FRAME_LIMIT
from .messages import DEFAULT_MAX_FRAME_BYTES
from .observability.config import ResilienceConfig
from .policy.settings import AuditSettings, PolicySettings
from .scanning.engine import ScannerSettings


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Listener and per-connection bounds."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_connections: int = 1000
    max_in_flight_per_connection: int = 64
    max_in_flight_total: int = 4096
    #: What one user (peer uid) may hold of the two daemon-wide bounds above.
    #: Unset: a quarter of each when the socket is shared (see
    #: :attr:`socket_shared`), so that one user's flood cannot lock the others
    #: out; no per-user bound on a private socket, which has one user.
    max_connections_per_uid: int | None = None
    max_in_flight_per_uid: int | None = None
    #: Bytes all connections together may hold in partially received large frames
    #: (see server/receive_budget.py); at least ``max_frame_bytes``.
    max_receive_buffer_bytes: int = 4 * DEFAULT_MAX_FRAME_BYTES
    #: A frame that has started must finish within this many seconds (slowloris).
    frame_read_timeout: float = 10.0
    #: A reply the peer has not taken within this many seconds ends the connection:
    #: a peer that never reads would otherwise hold its requests' in-flight slots
    #: (and the server-wide ones) for as long as it stays connected.
    write_timeout: float = 10.0
    #: Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    shutdown_grace: float = 5.0
    #: Socket file mode; 0o660 together with ``socket_group`` shares it with a group.
    socket_mode: int = 0o600
    socket_group: str | None = None
    #: Uids besides the daemon's own that may use admin operations.
    admin_uids: list[int] = []
    #: When false, peers of another uid (and not in admin_uids/allowed_uids) are refused.
    allow_other_users: bool = True
    allowed_uids: list[int] = []

    def __post_init__(self) -> None:
        if not MIN_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(
                f"max_frame_bytes ({self.max_frame_bytes}) must be in "
                f"{MIN_FRAME_BYTES}..{MAX_FRAME_LIMIT} (the length header is 4 bytes)"
            )
        at_least(self, 1, "max_connections", "max_in_flight_per_connection",
                 "max_in_flight_total")
        for name in ("max_connections_per_uid", "max_in_flight_per_uid"):
            if getattr(self, name) is not None:
                at_least(self, 1, name)
        positive(self, "frame_read_timeout", "write_timeout")
        at_least(self, 0, "shutdown_grace")
        if not 0 <= self.socket_mode <= 0o777 or self.socket_mode & 0o600 != 0o600:
            raise ValueError(
                f"socket_mode ({self.socket_mode:#o}) must be a permission mode that lets "
                f"its owner read and write (0o600 and up)"
            )
        if self.max_receive_buffer_bytes < self.max_frame_bytes:
            raise ValueError(
                f"max_receive_buffer_bytes ({self.max_receive_buffer_bytes}) must be at least "
                f"max_frame_bytes ({self.max_frame_bytes}): a largest frame could never fit"
            )

    @property
    def socket_shared(self) -> bool:
        """The socket is open to other users (a group, or everyone): then each
        daemon-wide bound is shared out per user (:meth:`uid_share`)."""
        return self.socket_group is not None or bool(self.socket_mode & 0o077)

    def uid_share(self, total: int, explicit: int | None = None) -> int | None:
        """One user's share of the daemon-wide bound ``total``: ``explicit`` if
        set; else a quarter of ``total`` on a shared socket, and no bound (None)
        on a private one."""
        if explicit is not None:
            return explicit
        return max(1, total // 4) if self.socket_shared else None


class RateLimitConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    burst: int = 20
    scans_per_second: float = 10.0
    max_concurrent_scans_per_connection: int = 5
    #: Scans one user (peer uid) may have running or queued at once over all its
    #: connections. Unset: a quarter of the scanner's ``max_queue`` on a shared
    #: socket (``ServerConfig.socket_shared``), so one user cannot fill the queue
    #: and make everyone else's scans ``busy``; no such bound on a private one.
    max_concurrent_scans_per_uid: int | None = None

    def __post_init__(self) -> None:
        at_least(self, 1, "burst", "max_concurrent_scans_per_connection")
        if self.max_concurrent_scans_per_uid is not None:
            at_least(self, 1, "max_concurrent_scans_per_uid")
        positive(self, "scans_per_second")


#: The smallest ``max_frame_bytes`` accepted: below it, ordinary requests and replies would not fit.
MIN_FRAME_BYTES = 4096


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole config file. Sections are added by each subsystem."""

    socket: str | None = None
    data_dir: str | None = None
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = msgspec.field(default_factory=ResilienceConfig)
    scanner: ScannerSettings = msgspec.field(default_factory=ScannerSettings)
    policy: PolicySettings = msgspec.field(default_factory=PolicySettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)
    reputation: ReputationConfig = msgspec.field(default_factory=ReputationConfig)
    forward: ForwardConfig = msgspec.field(default_factory=ForwardConfig)
    #: Optional HTTP endpoint for scrapers ("127.0.0.1:9464"): /health*, /metrics. Off when unset.
    http_listen: str | None = None


def default_socket_path() -> Path:
    """``$SENTINEL_SOCKET``, else ``$XDG_RUNTIME_DIR/sentinel/sentinel.sock``,
    else a private per-user directory under the system temp dir."""
    env = os.environ.get("SENTINEL_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "sentinel" / "sentinel.sock"
    return Path(tempfile.gettempdir()) / f"sentinel-{os.getuid()}" / "sentinel.sock"


def default_data_dir() -> Path:
    """``$SENTINEL_DATA_DIR``, else ``$XDG_STATE_HOME/sentinel`` (``~/.local/state/sentinel``)."""
    env = os.environ.get("SENTINEL_DATA_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "sentinel"


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    """Decode TOML text into :class:`Config`; :class:`ConfigError` names the key."""
    try:
        return msgspec.toml.decode(text, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration: {_keyed(str(exc))}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and decode a config file; ``None`` gives the built-in defaults."""
    if path is None:
        return Config()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    return parse_config(data, str(path))


def _keyed(message: str) -> str:
    """Turn msgspec's ``... - at `$.a.b``` into ``a.b: ...`` so the key comes first."""
    marker = " - at `$"
    if marker in message and message.endswith("`"):
        text, _, where = message.partition(marker)
        key = where[:-1].lstrip(".")
        return f"{key}: {text}" if key else text
    return message
