"""``fedprune-agent``: the device owner's command. Only this module calls ``sys.exit``."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

from edge_agent.bundle import EnrollmentError
from edge_agent.configkit import ConfigError
from edge_agent.data import LocalDataError

EXIT_CODES = {
    0: "success, or stopped by SIGTERM/SIGINT",
    1: "unexpected error (a bug: please report it with the log)",
    2: "usage error (unknown command or flag)",
    78: "configuration or enrollment error (the message names the key or file and the fix)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprune-agent",
        description="The fedprune edge agent: masked local training, sealed sparse updates over MQTT, ONNX inference.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('fedprune')}")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser("run", help="join the federation: train when selected, upload sealed sparse updates")
    run.add_argument("--config", type=Path, required=True, help="agent TOML file")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting (repeatable), e.g. --set agent.device=cuda")
    run.set_defaults(handler=_run_agent)
    audit = commands.add_parser("audit", help="show what this device sent, when, and to which federation")
    audit.add_argument("--log", type=Path, required=True, help="the agent's audit log (audit.jsonl in its state dir)")
    audit.set_defaults(handler=_run_audit)
    return parser


def _run_agent(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config
    from edge_agent.daemon import AgentDaemon

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return AgentDaemon(load_config(args.config, overrides)).run()


def _run_audit(args: argparse.Namespace) -> int:
    from edge_agent.audit import AuditLog

    print(f"{'time':>17}  {'federation':<16} {'round':>5}  {'type':<10} {'bytes':>10}  sha256")
    for entry in AuditLog(args.log).records():
        print(f"{entry.time:17.3f}  {entry.federation:<16} {entry.round:5d}  {entry.message_type:<10} "
              f"{entry.bytes:10d}  {entry.sha256[:16]}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code = args.handler(args)
    except (ConfigError, EnrollmentError, LocalDataError) as exc:
        print(f"fedprune-agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 78
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
