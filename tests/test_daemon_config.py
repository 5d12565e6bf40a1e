"""The daemon builds each subsystem's config from one source: ``[resilience]``
holds every breaker/retry threshold and the scanner fail mode."""

from pathlib import Path

import pytest

from sentinel_ipc.config import parse_config
from sentinel_ipc.daemon import Daemon
from sentinel_ipc.errors import ConfigError

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
