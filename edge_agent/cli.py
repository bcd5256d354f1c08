"""``fedprune-agent``: the device owner's command; exits only through ``cli_common.run_main``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fedprune.common.bundle import EnrollmentError
from fedprune.common.cli import new_parser, run_main
from fedprune.common.configkit import ConfigError, parse_assignments
from fedprune.common.data import LocalDataError, load_inputs, load_local_data

EXIT_CODES = {
    0: "success, or stopped by SIGTERM/SIGINT",
    1: "unexpected error (a bug: please report it with the log)",
    2: "usage error (unknown command or flag)",
    3: "infer: no model release has been received yet",
    78: "configuration or enrollment error (the message names the key or file and the fix)",
}


def build_parser() -> argparse.ArgumentParser:
    parser, commands = new_parser(
        "fedprune-agent",
        "The fedprune edge agent: masked local training, sealed sparse updates over MQTT, ONNX inference.",
        EXIT_CODES,
    )
    run = commands.add_parser("run", help="join the federation: train when selected, upload sealed sparse updates")
    run.add_argument("--config", type=Path, required=True, help="agent TOML file")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting (repeatable), e.g. --set agent.device=cuda")
    run.set_defaults(handler=_run_agent)
    infer = commands.add_parser("infer", help="predict with the newest verified model release")
    infer.add_argument("--config", type=Path, required=True, help="agent TOML file (finds the model store)")
    infer.add_argument("--input", type=Path, required=True,
                       help=".npz (X[, y]) or CSV (optional header row; features[, label]) file; or, read as the "
                            "config's [data] says (with labels), a directory, an image folder or sensor CSV")
    infer.add_argument("--output", type=Path, help="write predictions here (CSV: row,prediction); default stdout")
    infer.add_argument("--labels", action="store_true", help="the CSV's last column is a label: report accuracy")
    infer.set_defaults(handler=_run_infer)
    status = commands.add_parser("status", help="last round, bytes sent today and in all, privacy budget left, "
                                                "model release in use, last declined rounds")
    status.add_argument("--config", type=Path, required=True, help="agent TOML file (finds the state directory)")
    status.add_argument("--rounds", type=int, default=5, help="how many recent rounds to list")
    status.add_argument("--declines", type=int, default=5, help="how many declined rounds to list")
    status.add_argument("--json", action="store_true", help="machine-readable output (times: ISO 8601, UTC)")
    status.set_defaults(handler=_run_status)
    audit = commands.add_parser("audit", help="show what this device sent, when (ISO 8601, UTC), and to which federation")
    audit.add_argument("--log", type=Path, required=True, help="the agent's audit log (audit.jsonl in its state dir)")
    audit.add_argument("--json", action="store_true",
                       help="one JSON object per line (time: ISO 8601 UTC with milliseconds; full sha256)")
    audit.set_defaults(handler=_run_audit)
    return parser


def _run_agent(args: argparse.Namespace) -> int:
    from fedprune.edge_agent.config import load_config
    from fedprune.edge_agent.daemon import AgentDaemon

    overrides = parse_assignments(args.set)
    return AgentDaemon(load_config(args.config, overrides)).run()


def _run_infer(args: argparse.Namespace) -> int:
    from fedprune.edge_agent.config import load_config
    from fedprune.edge_agent.inference import Predictor
    from fedprune.edge_agent.release_store import ReleaseStore

    config = load_config(args.config)
    current = ReleaseStore(config.agent.state_dir / "models", keep=config.inference.keep_releases).current()
    if current is None:
        print("fedprune-agent: no model release received yet; run the agent until the coordinator "
              "publishes one", file=sys.stderr)
        return 3
    version, path = current
    if args.input.is_dir() or config.data.kind in ("image_folder", "sensor_csv", "factory"):
        X, y = load_local_data(args.input, config.data)  # read as the device reads its training data
    else:
        X, y = load_inputs(args.input, labelled=args.labels)
    predictor = Predictor.from_file(path, accelerator=config.inference.accelerator)
    try:
        X = predictor.check_input(X)
    except ValueError as exc:
        hint = "" if args.labels else " (if its last column is a label, pass --labels)"
        raise LocalDataError(f"{args.input}: {exc}{hint}") from None
    predictions = predictor.predictions(X)
    rows = predictions.reshape(len(predictions), -1)
    integral = predictions.dtype.kind == "i"
    lines = [f"{i}," + ",".join(str(int(v)) if integral else f"{float(v):.6g}" for v in row) for i, row in enumerate(rows)]
    header = "row," + (",".join(f"prediction{j}" for j in range(rows.shape[1])) if rows.shape[1] > 1 else "prediction")
    if args.output:
        args.output.write_text(header + "\n" + "\n".join(lines) + "\n")
    else:
        print(header, *lines, sep="\n")
    summary = f"model release {version} ({predictor.task}): {len(predictions)} predictions"
    if y is not None:
        summary += ", " + _label_score(predictor.task, predictions, y)
    print(summary, file=sys.stderr)
    return 0


def _label_score(task: str, predictions, y) -> str:
    """Accuracy of classes, RMSE of one regression target, exact-match rate of label sets."""
    import numpy as np

    y = np.asarray(y)
    if task == "regression":
        return f"rmse {float(np.sqrt(np.mean((predictions.reshape(y.shape) - y) ** 2))):.6g}"
    return f"accuracy {float(np.mean(np.all(predictions.reshape(len(y), -1) == y.reshape(len(y), -1), axis=1))):.4f}"


def _run_status(args: argparse.Namespace) -> int:
    from fedprune.edge_agent.config import load_config
    from fedprune.edge_agent.status import device_status, render

    config = load_config(args.config)
    report = device_status(config.agent.state_dir, config.inference.keep_releases, args.rounds,
                           last_declines=args.declines, privacy=config.privacy)
    print(render(report, as_json=args.json))
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from fedprune.edge_agent.audit import iso_time, read_records

    if not args.log.exists():
        print(f"fedprune-agent: {args.log}: nothing yet (the agent writes its audit log when it first sends)",
              file=sys.stderr)
        return 0
    if not args.log.is_file():
        raise ConfigError(f"{args.log} is not a file: pass the agent's audit log, audit.jsonl in its state_dir")
    if args.json:
        for entry in read_records(args.log):
            print(json.dumps({**asdict(entry), "time": iso_time(entry.time, milliseconds=True)}))
        return 0
    print(f"{'time (UTC)':<20}  {'federation':<16} {'round':>5}  {'type':<10} {'bytes':>10}  sha256")
    for entry in read_records(args.log):
        print(f"{iso_time(entry.time):<20}  {entry.federation:<16} {entry.round:5d}  {entry.message_type:<10} "
              f"{entry.bytes:10d}  {entry.sha256[:16]}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main("fedprune-agent", build_parser(), argv, (ConfigError, EnrollmentError, LocalDataError))


if __name__ == "__main__":
    main()
