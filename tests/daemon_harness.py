"""Start a real ``sentineld`` subprocess for integration tests.

Usage (sync or async tests alike)::

    def test_x(daemon_factory):
        d = daemon_factory(config={"server": {"max_connections": 3}})
        ... d.socket_path, d.data_dir, d.proc.pid ...
        d.stop()            # SIGTERM and wait; asserts a clean exit by default

The daemon runs with ``SENTINEL_WORKERS``-style knobs only through its
config file, like production. Its stderr is captured to ``d.log_path``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest


@contextlib.contextmanager
def traversable_dir(prefix: str, mode: int = 0o711) -> Iterator[Path]:
    """A fresh directory other users (``nobody``) can reach, removed afterwards:
    pytest's ``tmp_path`` lies under root's 0700 tree, where a client or a
    daemon run as another user cannot even find its socket."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, mode)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: dict[str, Any]) -> str:
    """A tiny TOML writer for test configs (tables one level deep, or nested dotted)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"\n[{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def ping_once(path: Path, timeout: float = 1.0) -> bool:
    """True when a daemon answers a ping on ``path`` (blocking, stdlib only)."""
    from sentinel_ipc.codec import decode_reply, encode_framed
    from sentinel_ipc.messages import Ping, Pong

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(encode_framed(Ping(id=7)))
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    return False
                buf += chunk
            return isinstance(decode_reply(buf[4:]), Pong)
    except (OSError, msgspec.DecodeError, Exception):
        return False


class DaemonProcess:
    def __init__(
        self,
        base: Path,
        config: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "d",
    ) -> None:
        self.base = base
        self.socket_path = base / f"{name}-run" / "sentinel.sock"
        self.data_dir = base / f"{name}-data"
        self.config_path = base / f"{name}-config.toml"
        self.log_path = base / f"{name}-stderr.log"
        self.config = config or {}
        self.extra_args = extra_args or []
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sentinel_ipc.cli.sentineld",
            "--socket",
            str(self.socket_path),
            "--data-dir",
            str(self.data_dir),
            "--config",
            str(self.config_path),
            *self.extra_args,
        ]

    def start(self, wait: bool = True, timeout: float = 30.0) -> DaemonProcess:
        self.config_path.write_text(to_toml(self.config))
        env = dict(os.environ)
        env.pop("SENTINEL_SOCKET", None)
        env.pop("SENTINEL_DATA_DIR", None)
        if self.env:
            env.update(self.env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=self._log_file, env=env
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sentineld exited with {self.proc.returncode}:\n{self.log()}"
                )
            if self.socket_path.exists() and ping_once(self.socket_path):
                return
            time.sleep(0.05)
        raise RuntimeError(f"sentineld not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would; leaves the socket file behind (stale)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0, check: bool = True) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"sentineld did not stop on SIGTERM:\n{self.log()}") from None
        code = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if check:
            assert code == 0, f"sentineld exited {code}:\n{self.log()}"
        return code

    def restart(self, wait: bool = True) -> DaemonProcess:
        self.stop(check=False)
        return self.start(wait=wait)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []
    counter = iter(range(1000))

    def make(
        config: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> DaemonProcess:
        d = DaemonProcess(
            tmp_path, config, extra_args, env, name=f"d{next(counter)}"
        )
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        if d._log_file is not None:
            d._log_file.close()
