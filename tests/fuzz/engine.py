"""Drives the fuzz targets: a seeded mutator for CI and the long run, atheris when installed.

    python -m tests.fuzz.engine TARGET --iterations 100000 [--seed S]      seeded mutator
    python -m tests.fuzz.engine TARGET --atheris -runs=100000 [libFuzzer flags]  coverage-guided

The seeded mutator starts from the target's seeds plus its corpus (tests/fuzz/corpus/<target>/)
and applies libFuzzer-like mutations (bit flips, cuts, inserts, splices, magic bytes, random
blobs). For a target whose input holds a msgpack object (``Target.structure``), every third
input is structure-aware instead: a seed's object with one node replaced, dropped or added
(``mutate_object``), re-packed, so wrong types and ranges reach the field checks behind the
parser. It keeps an input that produced a new *outcome* (which exception type and reason, or
acceptance) in the working corpus, a cheap stand-in for coverage feedback. Each input runs
under a time bound; the run reports its tracemalloc peak, which the tests bound.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import signal
import sys
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprune.protocol.errors import ProtocolError

CORPUS = Path(__file__).parent / "corpus"
# msgpack's awkward bytes: reserved 0xc1, huge str/bin/array/map/ext length prefixes, deep nesting, NaN.
MAGIC = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xc1", b"\xd9\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
         b"\xdf\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xc5\xff\xff", b"\xdc\xff\xff", b"\x91" * 64,
         b"\x91" * 2000, b"\xc7\x05\x01", b"\xd4\x00\x00", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"FC\x01"]
# Leaves for structure-aware mutation: wrong types, out-of-range and non-finite numbers, over-long
# strings, empty and nested containers.
LEAVES: list[Any] = [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 70,
                     "dev-a", b"", b"\x00" * 9, [], {}, [1, 2], {"k": 1}, [[[]]], 3]
PER_INPUT_S = 5


class Hang(Exception):
    """An input ran longer than PER_INPUT_S."""


@dataclass
class Report:
    target: str
    inputs: int = 0
    accepted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    peak_mib: float = 0.0
    seconds: float = 0.0
    findings: list[tuple[bytes, str]] = field(default_factory=list)
    interesting: list[bytes] = field(default_factory=list)


def corpus_inputs(target: str) -> list[bytes]:
    directory = CORPUS / target
    return [p.read_bytes() for p in sorted(directory.glob("*.bin"))] if directory.is_dir() else []


def save_to_corpus(target: str, data: bytes) -> Path:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def mutate(data: bytes, r: random.Random, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(1 + (r.random() < 0.3) * r.randint(1, 3)):
        op = r.randrange(9)
        if op == 0 and b:
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif op == 1:
            del b[r.randrange(len(b) + 1):]
        elif op == 2:
            b += r.randbytes(r.randint(1, 64))
        elif op == 3:
            other = r.choice(pool)
            b = b[: r.randrange(len(b) + 1)] + other[r.randrange(len(other) + 1):]
        elif op == 4 and b:
            i = r.randrange(len(b))
            b[i: i + r.randint(1, 16)] = r.randbytes(r.randint(0, 16))
        elif op == 5:
            i = r.randrange(len(b) + 1)
            b[i:i] = r.choice(MAGIC)
        elif op == 6:
            b = bytearray(r.randbytes(r.randint(0, 300)))
        elif op == 7 and b:
            i = r.randrange(len(b))
            b[i: i + 8] = r.choice(MAGIC)[:8]
        elif b:
            i, j = sorted(r.randrange(len(b) + 1) for _ in range(2))
            b[i:i] = b[i:j]  # duplicate a slice: repeated ops for program targets
    return bytes(b[:8192])


def mutate_object(obj: Any, r: random.Random) -> Any:
    """Replace, drop or add one node somewhere in a parsed msgpack object."""
    if isinstance(obj, dict) and obj:
        key = r.choice(list(obj))
        out = dict(obj)
        roll = r.random()
        if roll < 0.1:
            del out[key]
        elif roll < 0.15:
            out["zz"] = r.choice(LEAVES)
        else:
            out[key] = mutate_object(obj[key], r) if r.random() < 0.5 else r.choice(LEAVES)
        return out
    if isinstance(obj, list) and obj:
        out = list(obj)
        i = r.randrange(len(out))
        roll = r.random()
        if roll < 0.1:
            del out[i]
        elif roll < 0.2:
            out.append(r.choice(LEAVES))
        else:
            out[i] = mutate_object(obj[i], r) if r.random() < 0.5 else r.choice(LEAVES)
        return out
    if isinstance(obj, bytes) and obj and r.random() < 0.5:
        return obj[: r.randrange(len(obj))]
    return r.choice(LEAVES)


def _on_alarm(*_: object) -> None:
    raise Hang(f"one input ran past {PER_INPUT_S} s")


def run_one(target, data: bytes) -> str:
    """The input's outcome label; raises on a finding (anything but ProtocolError)."""
    try:
        target.run(data)
    except ProtocolError as exc:
        return f"{type(exc).__name__}:{exc.reason}"
    return "ok"


def drive(name: str, iterations: int, seed: int = 0, memory: bool = True) -> Report:
    """Run ``iterations`` mutated inputs through target ``name``; collect findings, never stop."""
    from tests.fuzz.targets import all_targets

    target = all_targets()[name]()
    report = Report(name)
    pool = list(target.seeds) + corpus_inputs(name)
    trees = [target.structure.split(s) for s in target.seeds] if target.structure else []
    r = random.Random(seed)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    if memory:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        for i in range(iterations):
            if i < len(pool):
                data = pool[i]
            elif trees and i % 3 == 0:
                tree, rest = r.choice(trees)
                data = target.structure.join(mutate_object(tree, r), rest)
            else:
                data = mutate(r.choice(pool), r, pool)
            signal.alarm(PER_INPUT_S)
            try:
                outcome = run_one(target, data)
            except Exception as exc:  # a finding: record the input and go on
                outcome = f"FINDING {type(exc).__name__}"
                where = traceback.extract_tb(exc.__traceback__)[-1]
                report.findings.append((data, f"{type(exc).__name__}: {exc} at {Path(where.filename).name}:"
                                              f"{where.lineno} {where.line}"[:500]))
            finally:
                signal.alarm(0)
            report.inputs += 1
            report.accepted += outcome == "ok"
            if outcome not in report.outcomes:
                report.interesting.append(data)
                if len(pool) < 4096:
                    pool.append(data)
            report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
    finally:
        signal.signal(signal.SIGALRM, old)
        report.seconds = time.perf_counter() - started
        if memory:
            report.peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        target.close()
    target.notes and report.outcomes.update({f"translated {k}": v for k, v in target.notes.items()})
    return report


def run_atheris(name: str, argv: list[str]) -> int:
    """Coverage-guided: atheris instruments protocol/ and coordinator/ as they import."""
    import atheris

    with atheris.instrument_imports(include=["protocol", "coordinator"]):
        from tests.fuzz.targets import all_targets

        target = all_targets()[name]()
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)

    def one(data: bytes) -> None:
        try:
            target.run(data)
        except ProtocolError:
            pass

    for seed in target.seeds:
        one(seed)
    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided; remaining args go to libFuzzer")
    parser.add_argument("--save", action="store_true", help="add this run's new-outcome inputs to the corpus")
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        return run_atheris(args.target, rest)
    report = drive(args.target, args.iterations, args.seed)
    print(f"{report.target:<14} inputs={report.inputs} accepted={report.accepted} seconds={report.seconds:.1f} "
          f"peak_mib={report.peak_mib:.1f} findings={len(report.findings)}")
    for outcome, count in sorted(report.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>8}  {outcome}")
    for data, error in report.findings[:20]:
        path = save_to_corpus(report.target, data)
        print(f"FINDING {error}\n  input saved to {path}")
    if args.save:
        for data in report.interesting:
            if len(data) <= 2048:
                save_to_corpus(report.target, data)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
