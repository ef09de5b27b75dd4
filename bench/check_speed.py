"""How fast specs are checked, against the front end's budgets: `load_spec` in process under
100 ms per catalogue spec (warm, median of N runs), `python -m nlc check` from a cold
interpreter under 1 s. Baselines timed in the same run: the parse alone (syntax tree, no
schema) in process, and a bare interpreter start for the cold command.

    .venv/bin/python bench/check_speed.py [--runs 20] [--cold-runs 5] [--long]

--long also times pathological inputs (one long token, many members on one line, a long list).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nlc.spec import load_spec
from nlc.syntax import parse

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS_BUDGET_MS = 100.0
COLD_BUDGET_MS = 1000.0


def median_ms(fn, runs: int) -> float:
    fn()  # warm: the grammar is compiled once per process
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cold_ms(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=False, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def in_process(runs: int) -> None:
    print(f"in process, median of {runs} warm runs (budget {IN_PROCESS_BUDGET_MS:.0f} ms)")
    print(f"{'spec':<24}{'bytes':>7}{'parse ms':>10}{'check ms':>10}{'check/parse':>13}{'of budget':>11}")
    worst = 0.0
    for path in sorted((ROOT / "specs").glob("*.nl")):
        text = path.read_bytes()
        _, diagnostics, _ = load_spec(str(path), text)
        assert not diagnostics, diagnostics
        parse_ms = median_ms(lambda text=text, path=path: parse(text, str(path)), runs)
        check_ms = median_ms(lambda text=text, path=path: load_spec(str(path), text), runs)
        worst = max(worst, check_ms)
        print(f"{path.name:<24}{len(text):>7}{parse_ms:>10.2f}{check_ms:>10.2f}{check_ms / parse_ms:>12.1f}x{check_ms / IN_PROCESS_BUDGET_MS:>10.0%}")
    print(f"worst: {worst:.2f} ms = {worst / IN_PROCESS_BUDGET_MS:.0%} of the budget\n")


def cold(runs: int) -> None:
    python = sys.executable
    rows = [
        ("python -c pass (baseline)", [python, "-c", "pass"]),
        ("python -c 'import nlc.cli'", [python, "-c", "import nlc.cli"]),
        ("python -m nlc check specs/hope.nl", [python, "-m", "nlc", "check", "specs/hope.nl"]),
    ]
    print(f"cold command, median of {runs} runs (budget {COLD_BUDGET_MS:.0f} ms)")
    print(f"{'command':<38}{'ms':>9}{'x baseline':>12}{'of budget':>11}")
    base = None
    for name, argv in rows:
        ms = cold_ms(argv, runs)
        base = base or ms
        print(f"{name:<38}{ms:>9.1f}{ms / base:>11.1f}x{ms / COLD_BUDGET_MS:>10.0%}")
    print()


def long_inputs() -> None:
    cases = [
        ("1 MB comment", b"model m { dim = 1 }  # " + b"x" * 2**20),
        ("1 MB name", b"model m { " + b"a" * 2**20 + b" = 1 }"),
        ("1 MB string", b'model m { x = "' + b"s" * 2**20 + b'" }'),
        ("list of 20k numbers (60 kB)", b"model m { x = [" + b"1, " * 20_000 + b"] }"),
        ("1000 'a = 1;' on one line", b"model m {" + b"a = 1; " * 1000 + b"}"),
        ("2000 'a = 1;' on one line", b"model m {" + b"a = 1; " * 2000 + b"}"),
        ("2000 'a = 1' on own lines", b"model m {\n" + b"a = 1\n" * 2000 + b"}"),
    ]
    print("pathological inputs, one run each")
    print(f"{'input':<30}{'ms':>10}{'ms per kB':>11}")
    for name, data in cases:
        start = time.perf_counter()
        load_spec("long.nl", data)
        ms = (time.perf_counter() - start) * 1e3
        print(f"{name:<30}{ms:>10.0f}{ms / (len(data) / 1024):>11.2f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--long", action="store_true")
    args = parser.parse_args()
    in_process(args.runs)
    cold(args.cold_runs)
    if args.long:
        long_inputs()


if __name__ == "__main__":
    main()
