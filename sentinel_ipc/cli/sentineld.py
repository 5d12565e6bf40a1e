"""``sentineld``: run the Sentinel daemon.

Exit codes: 0 after a clean shutdown, 1 when it cannot start (already
running, socket cannot be created), 2 for a bad command line or config file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import msgspec
import trio

from ..config import Config, default_data_dir, default_socket_path, load_config
from ..daemon import Daemon
from ..errors import SentinelError
from ..logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentineld", description="Sentinel download-scanning daemon"
    )
    parser.add_argument("--socket", type=Path, help="Unix socket path to listen on")
    parser.add_argument("--data-dir", type=Path, help="state directory (database, journal...)")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--rules", type=Path, help="directory of .yar/.yara rule files")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="log verbosity"
    )
    return parser


def resolve(args: argparse.Namespace) -> tuple[Config, Path, Path]:
    """Apply precedence: flags > environment > config file > defaults."""
    config = load_config(args.config)
    if args.socket is not None:
        socket_path = args.socket
    elif config.socket is not None and "SENTINEL_SOCKET" not in os.environ:
        socket_path = Path(config.socket)
    else:
        socket_path = default_socket_path()
    if args.data_dir is not None:
        data_dir = args.data_dir
    elif config.data_dir is not None and "SENTINEL_DATA_DIR" not in os.environ:
        data_dir = Path(config.data_dir)
    else:
        data_dir = default_data_dir()
    if args.log_level:
        config.logging.level = args.log_level
    apply_rules_flag(config, args.rules)
    return config, socket_path.expanduser().absolute(), data_dir.expanduser().absolute()


def apply_rules_flag(config: Config, rules: Path | None) -> None:
    """``--rules`` overrides the config's ``scanner.rules_dir``."""
    if rules is not None:
        config.scanner = msgspec.structs.replace(config.scanner, rules_dir=str(rules))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, socket_path, data_dir = resolve(args)
    except SentinelError as exc:
        print(f"sentineld: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level)
    # Everything the daemon creates (database, journal, audit log, quarantine,
    # rules cache) is the user's business, and a file created wide and
    # chmod'ed after is readable to whoever opens it in between. The socket's
    # group sharing sets its modes explicitly.
    os.umask(0o077)
    daemon = Daemon(config, socket_path, data_dir)
    try:
        trio.run(daemon.run)
    except SentinelError as exc:
        print(f"sentineld: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
