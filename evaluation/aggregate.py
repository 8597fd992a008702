"""Summarise every results.csv under a folder (a multirun sweep, sharded jobs, a benchmark) in one table.

    python -m evaluation.aggregate multirun/2026-11-23/10-00-00 [--out summary.csv]

Jobs are told apart by the ``run`` column (their overrides, shard keys excluded, so the shards of one configuration
summarise together); rows of the same item in the same run (overlapping shards, retried jobs) keep the latest.
Prints the cost table (seconds per edit, UNet evaluations, peak memory per editor / model / precision) and the full
summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from evaluation.summary import RUN_COLUMNS, format_summary, summarize

COST_VIEW = (*RUN_COLUMNS, "n", "seconds", "nfe", "backward_passes", "peak_mem_mb")


def collect(folder: Path) -> pd.DataFrame:
    files = sorted(folder.rglob("results.csv"))
    if not files:
        raise FileNotFoundError(f"no results.csv under {folder}")
    frames = [pd.read_csv(f, dtype={"image_id": str, "edit_type": str, "error": str}) for f in files]
    results = pd.concat(frames, ignore_index=True)
    results["error"] = results["error"].fillna("")
    keys = [c for c in RUN_COLUMNS if c in results]
    return results.drop_duplicates([*keys, "image_id"], keep="last").reset_index(drop=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="summary CSV (default: <folder>/aggregate_summary.csv)")
    args = parser.parse_args(argv)
    results = collect(args.folder)
    summary = summarize(results)
    summary.to_csv(args.out or args.folder / "aggregate_summary.csv", index=False)
    overall = summary[summary["edit_type"] == "all"]
    failed = int((results["error"] != "").sum())
    print(f"{len(results)} items ({failed} failed) from {args.folder}\n")
    print(format_summary(overall[[c for c in COST_VIEW if c in overall]]))
    print()
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
