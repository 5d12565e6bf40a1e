"""sentinelctl against a real daemon: every command, its exit codes, one-line
errors; the golden output of ``sentinelctl breakers``.

Commands whose request the daemon does not serve yet must fail with one clear
line and exit 2; their behaviour tests skip at runtime until the handler lands.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_harness import DaemonProcess
from rich.console import Console
from samples import EICAR

from sentinel_ipc.cli import sentinelctl
from sentinel_ipc.cli.sentinelctl import Watch, main, render_breakers
from sentinel_ipc.messages import BreakerInfo, BreakersReport, Event

Capture = pytest.CaptureFixture[str]
GOLDEN = Path(__file__).parent / "golden" / "sentinelctl_breakers.txt"


def run(capsys: Capture, sock: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--socket", str(sock), "--timeout", "5", *args])
    out, err = capsys.readouterr()
    return code, out, err


def skip_if_unserved(code: int, err: str, what: str) -> None:
    if code == 2 and "does not serve" in err:
        assert err.count("\n") == 1 and err.startswith("sentinelctl: "), err
        assert "Traceback" not in err
        pytest.skip(f"{what} not served yet")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module's read-mostly tests (each starts in ~1 s);
    the tests that stop or break a daemon take their own."""
    d = DaemonProcess(tmp_path_factory.mktemp("ctl"))
    d.start()
    yield d
    d.stop(check=False)


# --- golden output ------------------------------------------------------------------


NOW = 1_767_140_000.0


def _breakers_text() -> str:
    """Every "In state" case: seconds, days, minutes, and "-" from an older
    daemon that does not send ``state_since``."""
    report = BreakersReport(
        id=1,
        breakers=[
            BreakerInfo(name="database", state="open", consecutive_failures=5,
                        failures_total=17, successes_total=480, rejected_total=12,
                        opened_at=100.0, retry_after_s=23.4, availability=0.9311,
                        state_since=NOW - 6.6),
            BreakerInfo(name="ipc", state="closed", failures_total=0, successes_total=9000,
                        state_since=NOW - 3 * 86400 - 5 * 3600),
            BreakerInfo(name="reputation", state="half_open", consecutive_failures=0,
                        failures_total=3, successes_total=40, availability=0.930233),
            BreakerInfo(name="yara", state="forced_open", failures_total=2, rejected_total=7,
                        successes_total=98, availability=0.915888, state_since=NOW - 192),
        ],
    )
    console = Console(file=io.StringIO(), width=100, record=True, color_system=None)
    console.print(render_breakers(report, now=NOW))
    return console.export_text()


def test_breakers_table_matches_the_golden_file() -> None:
    text = _breakers_text()
    if os.environ.get("SENTINEL_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_watch_shows_the_degraded_notice_with_its_two_actions() -> None:
    ctl = types.SimpleNamespace(args=argparse.Namespace(json=False))
    watch = Watch(ctl)  # type: ignore[arg-type]
    notice = Event(
        id=3, topic="degraded", kind="degraded_notice", service="database", state="failed",
        message="Sentinel operating in degraded mode — database connection lost, "
        "using cached security policies",
        actions=["Retry Connection", "Continue with Cache"], at=1.8e9,
    )
    watch.on_event(notice)
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(watch.render())
    text = console.export_text()
    assert "database connection lost, using cached security policies" in text
    assert "Retry Connection / Continue with Cache" in text
    assert "service retry|ack database" in text
    watch.on_event(Event(id=3, topic="degraded", kind="degraded_cleared", service="database"))
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(watch.render())
    assert "Retry Connection / Continue with Cache" not in console.export_text()  # banner gone


# --- connection-level commands and probes --------------------------------------------


def test_ping(daemon: Any, capsys: Capture) -> None:
    code, out, _ = run(capsys, daemon.socket_path, "ping")
    assert code == 0 and "pong from" in out
    code, out, _ = run(capsys, daemon.socket_path, "--json", "ping")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("probe, field", [("live", "alive"), ("ready", "ready")])
def test_probes_exit_0_yes_1_no(
    daemon: Any, capsys: Capture, probe: str, field: str
) -> None:
    code, out, err = run(capsys, daemon.socket_path, "--json", probe)
    skip_if_unserved(code, err, "health")
    report = json.loads(out)
    assert code == (0 if report[field] else 1)
    code, out, _ = run(capsys, daemon.socket_path, probe)
    assert code == (0 if report[field] else 1)
    assert out.strip().startswith(field if report[field] else f"not {field}")


def test_health_exit_code_follows_the_status(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "--json", "health")
    skip_if_unserved(code, err, "health")
    report = json.loads(out)
    assert code == (0 if report["status"] == "healthy" else 1)
    code, out, _ = run(capsys, daemon.socket_path, "health")
    assert "Components" in out and report["status"] in out


def test_unreachable_daemon_exits_2_with_one_line_as_a_probe(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sentinel_ipc.cli.sentinelctl",
         "--socket", str(tmp_path / "none.sock"), "ready"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot connect" in result.stderr and "none.sock" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["ping", "health"])
def test_unreachable_daemon_exits_2_for_every_command(
    tmp_path: Path, capsys: Capture, command: str
) -> None:
    code, out, err = run(capsys, tmp_path / "none.sock", command)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "cannot connect" in err


def test_a_hung_daemon_is_a_one_line_timeout(daemon_factory: Any, capsys: Capture) -> None:
    daemon = daemon_factory()
    daemon.signal(signal.SIGSTOP)
    try:
        code = main(["--socket", str(daemon.socket_path), "--timeout", "0.3", "ready"])
    finally:
        daemon.signal(signal.SIGCONT)
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "within 0.3 s" in err


def test_bad_arguments_exit_2(capsys: Capture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--socket", str(tmp_path / "x"), "--timeout", "0", "ping"])
    assert info.value.code == 2
    assert "--timeout must be > 0" in capsys.readouterr().err


# --- metrics, breakers, services --------------------------------------------------------


def test_metrics(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "metrics")
    skip_if_unserved(code, err, "metrics")
    assert code == 0 and "# TYPE sentinel_" in out
    code, out, _ = run(capsys, daemon.socket_path, "--json", "metrics", "--format", "openmetrics")
    assert code == 0 and "openmetrics" in json.loads(out)["content_type"]


def test_breakers_and_manual_control(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "--json", "breakers")
    skip_if_unserved(code, err, "breakers")
    assert code == 0
    names = [b["name"] for b in json.loads(out)["breakers"]]
    code, out, _ = run(capsys, daemon.socket_path, "breakers")
    assert code == 0 and "Circuit breakers" in out
    code, _, err = run(capsys, daemon.socket_path, "breaker", "trip", "no-such-breaker")
    assert code == 2 and err.count("\n") == 1 and "no-such-breaker" in err
    if not names:
        pytest.skip("no breaker registered in the daemon yet")
    name = names[0]
    code, _, err = run(capsys, daemon.socket_path, "breaker", "trip", name)
    assert code == 0, err
    code, out, _ = run(capsys, daemon.socket_path, "--json", "breakers")
    assert {b["name"]: b["state"] for b in json.loads(out)["breakers"]}[name] == "forced_open"
    code, _, err = run(capsys, daemon.socket_path, "breaker", "reset", name)
    assert code == 0, err
    code, out, _ = run(capsys, daemon.socket_path, "--json", "breakers")
    assert {b["name"]: b["state"] for b in json.loads(out)["breakers"]}[name] == "closed"


def _seconds(duration: str) -> int:
    """Back from sentinelctl's "3m12s" / "2h05m" / "1d03h" to seconds (the lower bound)."""
    match = re.fullmatch(r"(\d+)([dhm])(\d{2})([hms])", duration)
    assert match, duration
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return int(match[1]) * unit[match[2]] + int(match[3]) * unit[match[4]]


def test_breakers_table_shows_how_long_each_breaker_is_in_its_state(
    daemon_factory: Any, capsys: Capture
) -> None:
    """SPEC section 4: the breaker table shows service, state, failures and
    uptime. "In state" is the time since the breaker entered its state: the
    daemon's age for one that never changed, a few seconds for one just tripped."""
    d = daemon_factory()
    started = psutil.Process(d.pid).create_time()
    code, out, _ = run(capsys, d.socket_path, "--json", "breakers")
    assert code == 0
    since = {b["name"]: b["state_since"] for b in json.loads(out)["breakers"]}
    assert {"database", "yara"} <= set(since)
    for name, at in since.items():
        assert started - 1.0 <= at <= time.time(), (name, at, started)

    tripped = time.time()
    code, _, err = run(capsys, d.socket_path, "breaker", "trip", "yara")
    assert code == 0, err
    code, out, _ = run(capsys, d.socket_path, "breakers")
    shown = time.time()
    assert code == 0 and "In state" in out
    rows = {
        cells[0]: cells
        for line in out.splitlines() if line.startswith("\u2502")
        for cells in [[c.strip() for c in line.strip("\u2502").split("\u2502")]]
    }
    assert rows["yara"][1] == "forced_open"
    assert _seconds(rows["yara"][2]) <= shown - tripped + 1  # entered forced_open just now
    untouched = _seconds(rows["database"][2])
    assert abs(untouched - (shown - since["database"])) <= 2  # closed since the start
    code, out, _ = run(capsys, d.socket_path, "--json", "breakers")
    after = {b["name"]: b["state_since"] for b in json.loads(out)["breakers"]}
    assert after["yara"] >= tripped - 1.0
    assert after["database"] == pytest.approx(since["database"], abs=1.0)
    d.stop()


def test_service_buttons(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "service", "ack", "database")
    skip_if_unserved(code, err, "degraded_ack")
    assert code == 0 and out.strip()
    code, out, err = run(capsys, daemon.socket_path, "service", "retry", "database")
    assert code in (0, 2)  # 2: a typed refusal (e.g. nothing to probe), one line
    if code == 2:
        assert err.count("\n") == 1


def test_watch_runs_and_stops(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "watch", "--count", "1", "--interval", "0.05")
    skip_if_unserved(code, err, "subscribe")
    assert code == 0 and "Circuit breakers" in out
    code, out, _ = run(
        capsys, daemon.socket_path, "--json", "watch", "--count", "2", "--interval", "0.05"
    )
    lines = [json.loads(line) for line in out.splitlines()]
    snapshots = [line for line in lines if "health" in line]
    assert code == 0 and len(snapshots) == 2
    assert all(s["error"] is None for s in snapshots)


# --- scan, policy, threats, quarantine, reload ---------------------------------------------


def test_scan_exit_codes(daemon: Any, capsys: Capture, tmp_path: Path) -> None:
    clean = tmp_path / "notes.txt"
    clean.write_text("just some notes\n")
    code, out, err = run(capsys, daemon.socket_path, "scan", str(clean))
    skip_if_unserved(code, err, "scan")
    assert code == 0 and "ALLOW" in out
    eicar = tmp_path / "eicar.com"
    eicar.write_bytes(EICAR)
    code, out, _ = run(capsys, daemon.socket_path, "--json", "scan", str(clean), str(eicar))
    results = {r["file"]: r["result"]["action"] for r in json.loads(out)}
    assert code == (0 if results[str(eicar)] == "allow" else 1)
    code, out, err = run(capsys, daemon.socket_path, "scan", str(clean), str(tmp_path / "gone"))
    assert code == 2 and "gone" in err and "Traceback" not in err


def test_policy_commands(daemon: Any, capsys: Capture) -> None:
    sock = daemon.socket_path
    code, out, err = run(capsys, sock, "--json", "policy", "list")
    skip_if_unserved(code, err, "policy_list")
    assert code == 0
    code, _, err = run(capsys, sock, "policy", "add", "block")
    assert code == 2 and "needs --sha256" in err
    sha = "ab" * 32
    code, out, err = run(capsys, sock, "--json", "policy", "add", "block", "--sha256", sha,
                         "--reason", "ctl test")
    skip_if_unserved(code, err, "policy_add")
    assert code == 0, err
    policy_id = json.loads(out)["policy_id"]
    code, out, _ = run(capsys, sock, "--json", "policy", "query", "--sha256", sha)
    assert code == 0 and json.loads(out)["action"] == "block"
    code, out, _ = run(capsys, sock, "policy", "list")
    assert code == 0 and sha[:16] in out
    code, _, err = run(capsys, sock, "policy", "rm", str(policy_id))
    assert code == 0, err


def test_threats_and_quarantine(daemon: Any, capsys: Capture, tmp_path: Path) -> None:
    sock = daemon.socket_path
    code, out, err = run(capsys, sock, "--json", "threats", "--limit", "5")
    skip_if_unserved(code, err, "threats")
    assert code == 0 and isinstance(json.loads(out)["threats"], list)
    code, out, err = run(capsys, sock, "--json", "quarantine", "list")
    skip_if_unserved(code, err, "quarantine_list")
    assert code == 0 and isinstance(json.loads(out)["items"], list)
    code, _, err = run(capsys, sock, "quarantine", "delete", "no-such-id")
    assert code == 2 and err.count("\n") == 1
    dest = tmp_path / "restored.bin"
    code, _, err = run(capsys, sock, "quarantine", "restore", "no-such-id", "--to", str(dest))
    assert code == 2 and err.count("\n") == 1
    assert not dest.exists()  # the empty file is removed again


def test_reload(daemon: Any, capsys: Capture) -> None:
    code, out, err = run(capsys, daemon.socket_path, "--json", "reload")
    skip_if_unserved(code, err, "reload")
    assert code == 0 and json.loads(out)["rules_version"]


def test_module_docstring_documents_the_exit_codes() -> None:
    doc = sentinelctl.__doc__ or ""
    assert "0 yes" in doc and "1 no" in doc and "2 the daemon is unreachable" in doc
