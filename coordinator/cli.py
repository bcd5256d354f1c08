"""``fedprune-coordinator``: the operator's command; exits only through ``cli_common.run_main``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from fedprune.coordinator.state import StateError
from fedprune.common.bundle import EnrollmentError
from fedprune.common.cli import new_parser, run_main
from fedprune.common.models import TRAINING_DEVICES
from fedprune.common.configkit import ConfigError, parse_assignments

EXIT_CODES = {
    0: "success, or stopped by SIGTERM/SIGINT after finishing the current write",
    1: "unexpected error (a bug: please report it with the log)",
    2: "usage error (unknown command or flag)",
    78: "configuration, state or enrollment error (the message names the key or file and the fix)",
}

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser, commands = new_parser(
        "fedprune-coordinator",
        "Run fedprune federations: rounds, contribution-weighted aggregation, sparse masks, ONNX releases.",
        EXIT_CODES,
    )
    for register in _COMMANDS:
        register(commands)
    return parser


def _add_simulate(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "simulate",
        help="run a whole federation in one process: the coordinator and agent daemons over an in-memory broker",
        description="Simulate a federation from a TOML config; writes results JSON and PNG plots.",
    )
    sub.add_argument("--config", required=True, help="simulation TOML file (see docs/ and benchmarks/experiments/)")
    sub.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    sub.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    sub.add_argument("--keep-federation", action="store_true",
                     help="keep the federation's files in <out>/federation: the coordinator's state and history, "
                          "each device's audit log, privacy ledger and installed release")
    sub.add_argument("--device", default="cpu", choices=TRAINING_DEVICES,
                     help="where the simulated devices train (auto: CUDA when torch sees a GPU)")
    sub.set_defaults(handler=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from fedprune.coordinator.lab import simulate

    return simulate.main(args.config, out_dir=args.out, progress=not args.no_progress, device=args.device,
                         keep_federation=args.keep_federation)


def _add_config_flags(sub: argparse.ArgumentParser, required: bool = True) -> None:
    sub.add_argument("--config", type=Path, required=required, help="coordinator TOML file (made by `init`)")
    sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting (repeatable), e.g. --set rounds.total=50")


def _load(args: argparse.Namespace):
    from fedprune.coordinator.config import load_config

    return load_config(args.config, parse_assignments(args.set))


def _add_init(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("init", help="write a commented config and generate the coordinator's keys")
    sub.add_argument("--config", type=Path, default=Path("coordinator.toml"), help="config file to write")
    sub.add_argument("--state", type=Path, default=Path("fedprune-state"), help="state directory to create")
    sub.add_argument("--federation", default="demo", help="federation id")
    sub.add_argument("--broker-url", default="mqtt://127.0.0.1:1883", help="broker URL devices and coordinator use")
    sub.add_argument("--embedded-broker", action="store_true", help="start an in-process amqtt broker (single box)")
    sub.add_argument("--force", action="store_true", help="overwrite an existing config file")
    sub.set_defaults(handler=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    from fedprune.coordinator.fleet import enrollment

    enrollment.init(config_path=args.config, state_dir=args.state, federation=args.federation,
                    broker_url=args.broker_url, embedded_broker=args.embedded_broker, force=args.force)
    print(f"wrote {args.config} and the coordinator keys in {args.state}/keys")
    return 0


def _add_enroll(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("enroll", help="add a device to the allow-list and write its enrollment bundle")
    sub.add_argument("device_id", help="device id (1-64 of A-Z a-z 0-9 . _ -); also its broker user name")
    _add_config_flags(sub)
    sub.add_argument("--out", type=Path, required=True, help="bundle file to write (copy it to the device)")
    sub.add_argument("--broker-password", default="", help="the device's broker password (from `provision`)")
    sub.add_argument("--broker-url", default="", help="URL the device uses; default: the coordinator's")
    sub.set_defaults(handler=_run_enroll)


def _run_enroll(args: argparse.Namespace) -> int:
    from fedprune.coordinator.fleet import enrollment

    bundle = enrollment.enroll(_load(args), args.device_id, args.out, broker_password=args.broker_password,
                               broker_url=args.broker_url or None)
    print(f"enrolled {bundle.device_id} (key {bundle.identity.public.fingerprint()}); bundle: {args.out}")
    return 0


def _add_provision(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "provision", help="make the broker's CA, certificate, passwords, ACL and config, and device bundles",
        description="Idempotent: re-run with more devices to add them; existing keys, passwords and bundles "
                    "are kept. Updates the config's [broker] url, ca_file and password in place.",
    )
    sub.add_argument("--config", type=Path, required=True, help="coordinator TOML file (made by `init`); updated in place")
    sub.add_argument("--devices", default="", metavar="ID,ID,...", help="device ids to enroll (comma-separated)")
    sub.add_argument("--out", type=Path, required=True, help="directory for the broker files and bundles/")
    sub.add_argument("--broker-host", action="append", default=[], metavar="NAME",
                     help="host name or IP devices connect to (repeatable; the first goes into URLs)")
    sub.add_argument("--broker-port", type=int, default=8883, help="TLS listener port")
    sub.add_argument("--install-dir", type=Path, default=None,
                     help="where the broker host reads these files (paths in mosquitto.conf); default --out")
    sub.add_argument("--persistence-dir", type=Path, default=Path("/var/lib/mosquitto"),
                     help="Mosquitto's persistence directory (writable by the mosquitto user)")
    sub.add_argument("--bind-address", default="0.0.0.0", help="address the listener binds")
    sub.set_defaults(handler=_run_provision)


def _run_provision(args: argparse.Namespace) -> int:
    from fedprune.coordinator.fleet.provision import provision

    report = provision(args.config, args.devices.split(","), args.out, broker_hosts=args.broker_host,
                       broker_port=args.broker_port, install_dir=args.install_dir,
                       persistence_dir=args.persistence_dir, bind_address=args.bind_address)
    print("\n".join(report.lines()))
    return 0


def _add_revoke(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("revoke", help="remove a device from the allow-list and, with [broker] password_file, "
                                             "from the broker")
    sub.add_argument("device_id")
    _add_config_flags(sub)
    sub.set_defaults(handler=_run_revoke)


def _run_revoke(args: argparse.Namespace) -> int:
    from fedprune.coordinator.fleet import enrollment

    print("\n".join(enrollment.revoke(_load(args), args.device_id).lines()))
    return 0


def _add_run(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("run", help="run the coordinator daemon until the configured rounds are done")
    _add_config_flags(sub)
    sub.set_defaults(handler=_run_daemon)


def _run_daemon(args: argparse.Namespace) -> int:
    from fedprune.coordinator.daemon import run_with_broker

    return run_with_broker(_load(args))


def _add_status(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("status", help="show rounds, accuracy and devices from the state directory")
    _add_config_flags(sub)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from fedprune.coordinator.status import status_report

    print(status_report(_load(args), as_json=args.json))
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("export", help="export the current global model from the state directory to ONNX")
    _add_config_flags(sub)
    sub.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    sub.add_argument("--variant", choices=("dense", "compact", "int8"), default=None,
                     help="default: [export] variant of the config")
    sub.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from fedprune.coordinator.releases import export_checkpoint

    config = _load(args)
    size, metadata = export_checkpoint(config, args.out, variant=args.variant or config.export.variant)
    print(f"wrote {args.out} ({size:,} bytes): round {metadata['round']}, mask version {metadata['mask_version']}, "
          f"sparsity {float(metadata['sparsity']):.3f}")
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    from fedprune.coordinator.report import FLAG_RULE

    sub = commands.add_parser(
        "report", help="write the PNG plots `simulate` writes, and a summary, from the state directory",
        description="Reads <state dir>/history.jsonl (safe while the daemon runs) and writes accuracy_vs_round.png, "
                    f"accuracy_vs_uplink.png, importance_vs_round.png (flagged devices in red: {FLAG_RULE}) "
                    "and summary.json; prints the paths written.",
    )
    _add_config_flags(sub)
    sub.add_argument("--out", type=Path, default=None, help="output directory (default: <state dir>/report)")
    sub.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from fedprune.coordinator.report import write_report

    paths, summary = write_report(_load(args), args.out)
    if summary["skipped_lines"]:
        print(f"note: skipped {summary['skipped_lines']} incomplete line(s) of history.jsonl", file=sys.stderr)
    print("\n".join(str(p) for p in paths))
    return 0


_COMMANDS = [_add_init, _add_provision, _add_enroll, _add_revoke, _add_run, _add_status, _add_export, _add_report,
             _add_simulate]


def main(argv: Sequence[str] | None = None) -> None:
    run_main("fedprune-coordinator", build_parser(), argv, (ConfigError, StateError, EnrollmentError))


if __name__ == "__main__":
    main()
