"""The daemon builds each subsystem's config from one source: ``[resilience]``
holds every breaker/retry threshold and the scanner fail mode. A value a
subsystem cannot run with stops start-up at load time (exit 2, naming the key)."""

import subprocess
import sys
from pathlib import Path

import pytest

from sentinel_ipc.config import parse_config
from sentinel_ipc.daemon import Daemon
from sentinel_ipc.errors import ConfigError
from sentinel_ipc.messages import RuleMatch
from sentinel_ipc.policy import open_policy_service

TOML = """
[server]
admin_uids = [4242]

[resilience]
scanner_fail_mode = "closed"

[resilience.breakers.yara]
failure_threshold = 7
open_timeout = 1.5
success_threshold = 2

[resilience.breakers.database]
failure_threshold = 9
open_timeout = 4.0
success_threshold = 1

[resilience.retries.database]
attempts = 5
initial = 0.01
max_delay = 0.1
multiplier = 2.0

[scanner]
workers = 3
scan_timeout = 12.0
"""


def test_resilience_section_reaches_scanner_and_policy(tmp_path: Path) -> None:
    daemon = Daemon(parse_config(TOML), tmp_path / "s.sock", tmp_path / "data")
    scanner = daemon.scanner_config()
    assert (scanner.workers, scanner.scan_timeout) == (3, 12.0)
    assert (scanner.breaker.failure_threshold, scanner.breaker.open_timeout) == (7, 1.5)
    assert scanner.breaker.success_threshold == 2
    assert scanner.fail_closed is True

    policy = daemon.config.policy.to_config(daemon.config.resilience, [4242])
    assert (policy.breaker.failure_threshold, policy.breaker.open_timeout) == (9, 4.0)
    assert (policy.retry.attempts, policy.retry.initial) == (5, 0.01)
    assert policy.fail_closed is True
    assert policy.admin_uids == [4242]


async def test_threat_history_max_rows_reaches_the_policy_store(tmp_path: Path) -> None:
    """``[policy] threat_history_max_rows`` goes through PolicyConfig to the store
    that prunes: the newest rows of a real database are all that is left."""
    config = parse_config("[policy]\nthreat_history_max_rows = 3\n")
    policy = config.policy.to_config(config.resilience, [])
    assert policy.threat_history_max_rows == 3
    async with open_policy_service(policy, tmp_path / "data") as service:
        for n in range(5):
            await service.decide(sha256=f"{n:064x}", url=None, filename=f"{n}.exe",
                                 matches=[RuleMatch(rule="Evil")])
        threats = await service.threats(100)
    assert [t.filename for t in threats] == ["4.exe", "3.exe", "2.exe"]


def test_disabling_retries_leaves_one_attempt(tmp_path: Path) -> None:
    config = parse_config("[resilience]\nretries_enabled = false\n")
    daemon = Daemon(config, tmp_path / "s.sock", tmp_path / "data")
    assert daemon.scanner_config().retry.attempts == 1
    assert config.policy.to_config(config.resilience, []).retry.attempts == 1


@pytest.mark.parametrize(
    "text",
    [
        "[scanner]\nbreaker_open_timeout = 3.0\n",  # moved to [resilience.breakers.yara]
        "[scanner]\nfail_closed = true\n",  # moved to [resilience] scanner_fail_mode
    ],
)
def test_scanner_section_has_no_second_copy_of_resilience_knobs(text: str) -> None:
    with pytest.raises(ConfigError, match="scanner"):
        parse_config(text)


def test_the_readme_configuration_example_is_a_valid_config() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```toml", 1)[1].split("```", 1)[0]
    config = parse_config(example)
    assert config.server.socket_mode == 0o600
    assert config.policy.severity_actions == {"low": "warn"}
    assert config.policy.threat_history_max_rows == 100_000


# --- range checks: a value the daemon cannot run with stops start-up, naming the key ---

BAD_VALUES = [
    ("audit", "max_bytes", 10),  # AuditLog refused it later, with a traceback (exit 1)
    ("audit", "backups", -1),
    ("audit", "backups", 10**9),
    ("policy", "op_timeout", -1.0),  # trio.fail_after raised at start-up
    ("policy", "op_timeout", float("nan")),
    ("policy", "verify_interval", 0.0),  # the maintenance loop would spin
    ("policy", "probe_interval", -1.0),
    ("policy", "refresh_interval", float("inf")),
    ("policy", "busy_timeout_ms", -5),
    ("policy", "max_journal_bytes", 0),
    ("policy", "threat_history_max_rows", 0),  # every row deleted as it is written
]


def _toml_number(value: float) -> str:
    return {"nan": "nan", "inf": "inf"}.get(str(value), repr(value))


@pytest.mark.parametrize(("section", "key", "value"), BAD_VALUES)
def test_an_out_of_range_value_is_a_config_error_naming_the_key(
    section: str, key: str, value: float
) -> None:
    """Checked in the section's ``__post_init__``, so the loader reports the key."""
    with pytest.raises(ConfigError, match=rf"{section}: {key} must "):
        parse_config(f"[{section}]\n{key} = {_toml_number(value)}\n")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [BAD_VALUES[0], ("policy", "op_timeout", -1.0), ("policy", "verify_interval", 0.0)],
)
def test_sentineld_exits_2_naming_the_key_for_an_out_of_range_value(
    tmp_path: Path, section: str, key: str, value: float
) -> None:
    """The real daemon: exit 2 and one line naming the key, never a traceback
    (exit 1) from deep inside a subsystem, and never a daemon that starts and spins."""
    config = tmp_path / "sentinel.toml"
    config.write_text(f"[{section}]\n{key} = {_toml_number(value)}\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--config", str(config),
             "--socket", str(tmp_path / "s.sock"), "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=20,
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        pytest.fail(f"sentineld started with {section}.{key} = {value}")
    assert proc.returncode == 2, proc.stderr
    assert f"{section}: {key} must " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.sock").exists()


def test_values_on_the_bounds_are_accepted() -> None:
    """The bounds themselves are accepted (an off-by-one would refuse a valid file)."""
    config = parse_config(
        "[audit]\nmax_bytes = 4096\nbackups = 0\n"
        "[policy]\nbusy_timeout_ms = 0\nmax_journal_bytes = 1\nop_timeout = 0.001\n"
        "threat_history_max_rows = 1\n"
        "quarantine_max_bytes = 0\nquarantine_max_items = 0\n"
    )
    assert (config.audit.max_bytes, config.audit.backups) == (4096, 0)
    assert (config.policy.busy_timeout_ms, config.policy.max_journal_bytes) == (0, 1)
    assert config.policy.threat_history_max_rows == 1
    assert parse_config("[audit]\nbackups = 1000\n").audit.backups == 1000
