"""SyncClient: the blocking wrapper keeps the async client's guarantees."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess

from sentinel_ipc.client import IPC_BREAKER, ClientConfig, OutboxError, SyncClient
from sentinel_ipc.errors import (
    CircuitOpenError,
    RetryExhaustedError,
    TransportError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from sentinel_ipc.messages import Hello, Ping, Pong
from sentinel_ipc.resilience import RETRY_PRESETS


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One real daemon for the module's tests that leave it as they found it
    (a SIGSTOP is always followed by SIGCONT); starting one costs about a second."""
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"))
    d.start()
    yield d
    d.stop(check=False)



def _config(**changes: object) -> ClientConfig:
    breaker = dataclasses.replace(IPC_BREAKER, open_timeout=0.3)
    retry = dataclasses.replace(RETRY_PRESETS["ipc"], initial=0.001, max_delay=0.005)
    return ClientConfig(breaker=breaker, retry=retry, **changes)  # type: ignore[arg-type]


def test_calls_from_many_threads_share_one_connection(shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    with SyncClient(d.socket_path) as client:
        assert client.ping() >= 0
        with ThreadPoolExecutor(8) as pool:
            rtts = list(pool.map(lambda _: client.ping(), range(200)))
        assert len(rtts) == 200
        assert client.connects == 1
        with pytest.raises(UnsupportedVersionError) as info:
            client.request(Hello(id=0, client="t", protocol_version=42))
        assert info.value.code == "unsupported_version"
        assert client.welcome is not None


def test_daemon_down_then_back_with_queued_writes(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(start=False)
    with SyncClient(d.socket_path, config=_config(outbox_path=tmp_path / "o.log")) as client:
        with pytest.raises(RetryExhaustedError):
            client.ping()
        with pytest.raises(RetryExhaustedError):
            client.ping()
        start = time.monotonic()
        with pytest.raises(CircuitOpenError) as info:
            client.ping()
        assert time.monotonic() - start < 0.1  # fails fast
        assert info.value.retry_after is not None
        ticket = client.submit(Ping(id=0))  # queued while the daemon is away
        assert [t.key for t in client.outbox_pending()] == [ticket.key]
        d.start()
        time.sleep(0.35)
        assert client.ping() >= 0
        client.flush_outbox(timeout=10)
        assert isinstance(client.wait_delivered(ticket), Pong)
        assert client.breaker_statistics().state == "closed"


def test_unserved_requests_raise_typed_errors(shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    with SyncClient(d.socket_path) as client:
        try:
            client.policy_list()
        except UnknownMessageTypeError as exc:
            assert exc.code == "unknown_type" and "policy_list" in exc.message
        else:  # served by now: then the reply is typed
            assert isinstance(client.policy_list().policies, list)


def test_close_is_idempotent_and_stops_the_thread(shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    before = threading.active_count()
    client = SyncClient(d.socket_path)
    client.ping()
    client.close()
    client.close()
    assert threading.active_count() == before
    with pytest.raises(TransportError, match="closed"):
        client.ping()


def test_an_unusable_outbox_fails_construction(tmp_path: Path) -> None:
    path = tmp_path / "o.log"
    config = ClientConfig(outbox_path=path)
    with SyncClient(tmp_path / "absent.sock", config=config), pytest.raises(OutboxError):
        SyncClient(tmp_path / "absent.sock", config=config)


def test_blocking_subscription_sees_the_gap_and_the_renewal(daemon_factory: Any) -> None:
    d = daemon_factory()
    with SyncClient(d.socket_path, config=_config()) as client:
        with client.subscribe(["services", "degraded"]) as sub:
            d.kill()
            d.start()
            kinds: list[str] = []
            while kinds[-1:] != ["resubscribed"]:
                event = sub.get(timeout=15)
                if event.topic == "client":
                    kinds.append(event.kind)
            assert kinds == ["connection_lost", "resubscribed"]
        assert client.ping() >= 0
