"""What both command-line programs share: the parser frame with --version, --log-level and the
exit-code table in its help, and the one function that turns errors into exit codes."""

from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn, Sequence

from fedprune.common.events import LOG_FORMATS, configure_logging

USER_ERROR = 78


def _installed_version() -> str:
    """The installed distribution's version; a source tree on PYTHONPATH has none, and must still run."""
    try:
        return version("fedprune")
    except PackageNotFoundError:
        return "(not installed: source tree)"


def new_parser(prog: str, description: str, exit_codes: dict[int, str]) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,  # `--log` is a subcommand's flag, not --log-*
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in exit_codes.items()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                        help="text: logfmt lines (event=... key=value); json: one JSON object per line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    return parser, commands


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
             user_errors: tuple[type[Exception], ...]) -> NoReturn:
    """Parse, run the chosen handler, exit: 0 ok, 78 for a user's mistake (message on stderr),
    0 on Ctrl-C; anything else is a bug and keeps its traceback (exit 1).

    Once the handler has returned, SIGTERM and SIGINT are ignored: interpreter teardown resets
    Python-level handlers to the default, so a stop request racing a daemon's own clean exit
    (its last round done) would otherwise turn exit 0 into death by signal. A teardown that hung
    would then need SIGKILL, which systemd sends after TimeoutStopSec anyway."""
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        code = args.handler(args)
    except user_errors as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = USER_ERROR
    except KeyboardInterrupt:
        code = 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
