"""Byte fuzzing of the OCPP frame decoder and validator (RELIABILITY.md O-19).

    .venv/bin/pip install -e '.[fuzz]'      # atheris (libFuzzer for Python)
    .venv/bin/python benchmarks/fuzz_frames.py --execs 1000000 --max-seconds 600

Every input is what a charge point could put in one WebSocket frame: bytes that decode as UTF-8
become a text frame, the others a binary frame. Each goes through
`adapters.ocpp.frames.FrameChecker.check` (JSON decoding, frame shape, id window, schema,
semantic checks, answer matching) with a boot accepted and three CALLs of ours outstanding; a
CALL that passes is translated as the central system would (snake_case payload ->
`MeterSampled` events, the transaction's sample ledger rows, timestamps). Seeds are valid
frames of every action the central system takes, the malformed-frame corpus of the tests, and
answers to the outstanding CALLs; libFuzzer mutates them with coverage feedback from the
instrumented modules.

A crash is any exception other than the documented refusal of an event (`InvalidEvent`, which
the central system answers PropertyConstraintViolation). Exceptions are caught and counted,
not raised, so one run reports them all. Printed: execs, execs/s, crashes (with the first
input), verdicts by kind, the slowest input and its time (target: no crash, none > 100 ms).
Timings are wall time on a shared machine: noisy; the slowest input is re-timed alone to tell
a slow input from a scheduling hiccup.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOW = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)
OUTSTANDING = ("fz1", "fz2", "fz3")
SEEDS: list[Any] = [
    [2, "b1", "BootNotification", {"chargePointVendor": "acme", "chargePointModel": "m"}],
    [2, "h1", "Heartbeat", {}],
    [2, "a1", "Authorize", {"idTag": "TAG-1"}],
    [
        2,
        "s1",
        "StatusNotification",
        {
            "connectorId": 1,
            "errorCode": "NoError",
            "status": "Charging",
            "timestamp": "2024-03-04T15:59:00+01:00",
        },
    ],
    [
        2,
        "t1",
        "StartTransaction",
        {"connectorId": 1, "idTag": "T", "meterStart": 10, "timestamp": "2024-03-04T12:00:00Z"},
    ],
    [
        2,
        "m1",
        "MeterValues",
        {
            "connectorId": 1,
            "transactionId": 7,
            "meterValue": [
                {
                    "timestamp": "2024-03-04T15:59:50.250Z",
                    "sampledValue": [
                        {
                            "value": "12.5",
                            "measurand": "Energy.Active.Import.Register",
                            "unit": "kWh",
                        },
                        {
                            "value": "2.0",
                            "measurand": "Power.Active.Import",
                            "unit": "kW",
                            "phase": "L1",
                        },
                        {"value": "41", "measurand": "SoC", "unit": "Percent"},
                        {"value": "1.5e3", "measurand": "Power.Active.Export", "unit": "W"},
                    ],
                }
            ],
        },
    ],
    [
        2,
        "x1",
        "StopTransaction",
        {
            "meterStop": 900,
            "timestamp": "2024-03-04T15:00:00Z",
            "transactionId": 7,
            "reason": "PowerLoss",
            "transactionData": [
                {"timestamp": "2024-03-04T14:00:00Z", "sampledValue": [{"value": "500"}]}
            ],
        },
    ],
    [2, "d1", "DataTransfer", {"vendorId": "com.acme", "messageId": "x", "data": "{}"}],
    [2, "f1", "FirmwareStatusNotification", {"status": "Installed"}],
    [2, "g1", "DiagnosticsStatusNotification", {"status": "Uploaded"}],
    [2, "r1", "Reset", {"type": "Soft"}],
    [2, "u1", "FooBar", {}],
    [3, "fz1", {"status": "Accepted", "data": "x"}],
    [4, "fz2", "FormatViolation", "2.0.1 spelling", "not an object"],
    [4, "fz3"],
    [9, "m", "Heartbeat", {}],
    [2, 17, "Heartbeat", {}],
]
RAW_SEEDS = [b"not json", b'[2,"m9","Heartbeat"', b"[" * 64, b"\xff\xfe\xfd", b'[2,"n","X",NaN]']


class Harness:
    """The code under fuzz, its bookkeeping, and the per-input measurements."""

    def __init__(self) -> None:
        from adapters.ocpp.frames import FrameChecker

        self.checker = FrameChecker(now=lambda: NOW, connectors=lambda: frozenset({1, 2}))
        self.checker.boot_accepted = True
        for unique_id in OUTSTANDING:
            self.checker.sent_call(unique_id)
        self.execs = 0
        self.crashes: Counter[str] = Counter()
        self.first_crash: tuple[bytes, str] | None = None
        self.verdicts: Counter[str] = Counter()
        self.refusals = 0
        self.refusal_reasons: Counter[str] = Counter()
        self.slowest = (0.0, b"")  # wall time
        self.slowest_cpu = (0.0, b"")  # this thread's CPU time: less shaken by neighbours
        self.started = time.perf_counter()

    def one(self, data: bytes) -> None:
        """Check one frame (and translate it when it passes); never raises."""
        from controller.errors import InvalidEvent

        begun = time.perf_counter()
        begun_cpu = time.thread_time()
        try:
            self._run(data)
        except InvalidEvent as refusal:
            self.refusals += 1
            self.refusal_reasons[
                re.sub(r"[-+]?\d[\d.e+-]*", "#", str(refusal).split(": ", 1)[-1])
            ] += 1
        except Exception as exc:  # a crash: counted, its first input kept
            name = f"{type(exc).__name__}: {str(exc)[:120]}"
            self.crashes[type(exc).__name__] += 1
            if self.first_crash is None:
                self.first_crash = (data, name)
        spent = time.perf_counter() - begun
        spent_cpu = time.thread_time() - begun_cpu
        if spent > self.slowest[0]:
            self.slowest = (spent, data)
        if spent_cpu > self.slowest_cpu[0]:
            self.slowest_cpu = (spent_cpu, data)
        self.execs += 1

    def _run(self, data: bytes) -> None:
        from ocpp.charge_point import camel_to_snake_case

        from adapters.ocpp.transactions import parse_row, sample_rows
        from adapters.ocpp.translate import meter_events, timestamp

        try:
            raw: str | bytes = data.decode("utf-8")
        except UnicodeDecodeError:
            raw = data
        verdict = self.checker.check(raw)
        self.verdicts[verdict.kind] += 1
        if verdict.kind in ("result", "error"):
            self.checker.sent_call(verdict.unique_id)  # keep the answer path open
        if verdict.kind != "call":
            return
        message = json.loads(verdict.text)
        payload = camel_to_snake_case(message[3])
        action = message[2]
        if action == "MeterValues":
            entries = payload["meter_value"]
            meter_events("CP", payload["connector_id"], payload.get("transaction_id"), entries)
            for key, value in sample_rows(payload["connector_id"], entries, lambda _m: True):
                parse_row(key, value).register_wh  # noqa: B018  (the round trip must hold)
        elif action == "StopTransaction":
            entries = payload.get("transaction_data") or []
            meter_events("CP", 1, payload["transaction_id"], entries)
            for key, value in sample_rows(1, entries, lambda _m: True):
                parse_row(key, value).register_wh  # noqa: B018
            timestamp(payload["timestamp"])
        elif action in ("StartTransaction", "StatusNotification") and "timestamp" in payload:
            timestamp(payload["timestamp"])

    def report(self, *, final: bool) -> None:
        """Print the figures so far."""
        wall = time.perf_counter() - self.started
        slow_s, slow_input = self.slowest
        cpu_s, cpu_input = self.slowest_cpu
        print(f"execs                {self.execs:,}")
        print(f"wall time            {wall:.1f} s ({self.execs / max(wall, 1e-9):,.0f} execs/s)")
        print(f"crashes              {sum(self.crashes.values())} {dict(self.crashes)}")
        if self.first_crash is not None:
            print(f"first crash          {self.first_crash[1]} on {self.first_crash[0][:200]!r}")
        print(f"verdicts             {dict(sorted(self.verdicts.items()))}")
        print(f"InvalidEvent refusals {self.refusals} {dict(self.refusal_reasons.most_common(3))}")
        print(f"slowest input, wall  {slow_s * 1000:.2f} ms ({len(slow_input)} bytes)")
        print(f"slowest input, CPU   {cpu_s * 1000:.2f} ms ({len(cpu_input)} bytes)")
        if final:
            retimed = max(_retime(slow_input), _retime(cpu_input))
            print(f"both re-timed alone  {retimed * 1000:.2f} ms (median of 5 runs, the worse)")
            verdict = "PASS" if not self.crashes and retimed <= 0.1 else "CHECK"
            print(f"RESULT {verdict} (targets: 0 crashes, no input over 100 ms)")


def _retime(data: bytes) -> float:
    """Median wall time of one input over five runs, each on a fresh checker."""
    times = []
    for _ in range(5):
        again = Harness()
        again.one(data)
        times.append(again.slowest[0])
    return sorted(times)[2]


def dictionary(path: Path) -> None:
    """A libFuzzer dictionary of OCPP tokens: property names, actions, enum values, units."""
    from adapters.ocpp.frames import HANDLED_ACTIONS, ONE_SIX_CODES

    tokens: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                tokens.add(json.dumps(key))
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            tokens.add(json.dumps(value))

    walk(SEEDS)
    tokens.update(json.dumps(a) for a in HANDLED_ACTIONS | ONE_SIX_CODES)
    tokens.update(["1e999", "-0", "NaN", "null", "true", '"\\u0000"', "[2,", "[3,", "[4,"])
    lines = [f"kw{i}={json.dumps(t)}" for i, t in enumerate(sorted(tokens))]
    path.write_text("\n".join(lines) + "\n")


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (keys and indexes), the root excluded."""
    found: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        found.append((*here, key))
        found.extend(_paths(item, (*here, key)))
    return found


def _fuzzed_value(fdp: Any) -> Any:
    """A JSON value chosen by the fuzzer's bytes."""
    pick = fdp.ConsumeIntInRange(0, 7)
    if pick == 0:
        return fdp.ConsumeInt(8)
    if pick == 1:
        return fdp.ConsumeRegularFloat()
    if pick == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 48))
    if pick == 3:
        return fdp.ConsumeBool()
    if pick == 4:
        return None
    if pick == 5:
        return [_fuzzed_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if pick == 6:
        key = fdp.ConsumeUnicodeNoSurrogates(12)
        return {key: _fuzzed_value(fdp)}
    return str(fdp.ConsumeRegularFloat())  # a decimal string, as meter values are


def mutated_frame(fdp: Any) -> bytes:
    """A valid seed frame with up to four values replaced, removed or added."""
    frame = json.loads(json.dumps(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        paths = _paths(frame)
        if not paths:
            break
        path = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
        parent = frame
        for key in path[:-1]:
            parent = parent[key]
        action = fdp.ConsumeIntInRange(0, 2)
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == 1 and isinstance(parent, dict):
            parent[fdp.ConsumeUnicodeNoSurrogates(16)] = _fuzzed_value(fdp)
        else:
            parent[path[-1]] = _fuzzed_value(fdp)
    return json.dumps(frame, ensure_ascii=fdp.ConsumeBool()).encode("utf-8", "surrogatepass")


def seed_corpus(directory: Path) -> None:
    """Write the seeds, one file each, for libFuzzer to start from."""
    from tests.ocpp.test_frames import CORPUS

    texts: list[bytes] = [json.dumps(s).encode() for s in SEEDS] + RAW_SEEDS
    for bad, _expected in CORPUS.values():
        texts.append(bad if isinstance(bad, bytes) else bad.encode("utf-8", "surrogatepass"))
    for i, text in enumerate(texts):
        (directory / f"seed{i:03d}").write_bytes(text)


def main() -> None:
    """Parse options, seed, fuzz until the exec or time budget, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=1_000_000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-len", type=int, default=4096, help="longest input in bytes")
    options, rest = parser.parse_known_args()
    try:
        atheris: Any = importlib.import_module("atheris")
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install -e '.[fuzz]'")
    with atheris.instrument_imports(include=["adapters", "controller"]):
        harness = Harness()
        harness.one(b"[]")  # imports the translation path under instrumentation
    for seed in SEEDS:  # loads every schema once, so the first inputs are not timed with it
        harness.one(json.dumps(seed).encode())
    harness = Harness()
    deadline = harness.started + options.max_seconds
    every = max(options.execs // 10, 1)

    def test_one_input(data: bytes) -> None:
        # Odd first byte: the rest steers mutations of a valid frame (deep paths: schema,
        # semantics, translation); even: the bytes are the frame itself.
        if data and data[0] & 1:
            data = mutated_frame(atheris.FuzzedDataProvider(data[1:]))
        harness.one(data)
        if harness.execs % every == 0:
            print(f"... {harness.execs:,} execs", flush=True)
        if harness.execs >= options.execs or time.perf_counter() > deadline:
            harness.report(final=True)
            sys.stdout.flush()
            os._exit(0 if not harness.crashes else 1)

    work = Path(tempfile.mkdtemp(prefix="voltpool-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir()
    seed_corpus(corpus)
    dictionary(work / "ocpp.dict")
    argv = [
        sys.argv[0],
        *rest,
        f"-max_len={options.max_len}",
        f"-runs={options.execs + 1_000}",
        "-print_final_stats=0",
        f"-dict={work / 'ocpp.dict'}",
        str(corpus),
    ]
    print(f"fuzzing FrameChecker + translation; seeds in {corpus}", flush=True)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
