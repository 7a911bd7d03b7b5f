"""`make bench`: run every benchmark, print its figures and write them as JSON and one markdown table under --out.

Each benchmark module has ``run(quick: bool) -> dict``; figures carry the machine they ran on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_inference",
    "bench_compile",
    "bench_engine",
    "bench_acquisition",
    "bench_live",
    "bench_publish",
    "bench_consumer",
    "bench_trust",
    "bench_refine",
    "bench_distributed",
    "bench_reprocess",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (for a smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark module names to run")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = [f"# `make bench` {stamp}", ""]
    failed: list[str] = []
    for name in args.only or BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            print(f"{name}: skipped ({err})")
            continue
        print(f"== {name}")
        try:
            result = module.run(quick=args.quick)
        except Exception:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            report += [f"## {name}: failed", "", "```", traceback.format_exc(limit=3).strip(), "```", ""]
            continue
        path = args.out / f"{name}-{stamp}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"   written to {path}")
        report += markdown(result)
    table = args.out / f"bench-{stamp}.md"
    table.write_text("\n".join(report) + "\n")
    print(f"tables written to {table}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def markdown(result: dict) -> list[str]:
    """One benchmark's rows as a markdown table, headed by its name and machine.

    Columns holding lists or tables (per-epoch curves, nested quality figures) stay in the JSON only.
    """
    lines = [f"## {result.get('benchmark', '?')}", "", f"Machine: `{json.dumps(result.get('machine', {}))}`", ""]
    # A benchmark of one measurement (acquisition) keeps its figures at the top level: one row.
    rows = result.get("results") or [{k: v for k, v in result.items() if k not in ("benchmark", "machine", "note")}]
    keys = [
        k
        for k in dict.fromkeys(k for row in rows for k in row)
        if not any(isinstance(row.get(k), list | dict) for row in rows)
    ]
    if keys:
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    if result.get("note"):
        lines += ["", result["note"]]
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
