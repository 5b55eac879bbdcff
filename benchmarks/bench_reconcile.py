"""``txstream reconcile`` against datacompy on two decisions-like Parquet tables (figures, not pass/fail).

Writes two tables of ``--rows`` rows (the right one shuffled, with
``--diff_fraction`` of its rows planted as differences: a third missing, a
third extra, a third changed in amount, score or decision) under ``--out``
(outside the repository by default), then runs, each as a subprocess, once:
``txstream reconcile`` and datacompy's ``PolarsCompare`` on the same files.
Prints wall time and peak RSS (``wait4``) of each, with the command lines,
and whether both found exactly the planted differences.

datacompy pins older polars and pandas than txstream, so it runs from its own
virtualenv (``--datacompy_python``; made with pip on first use)::

  .venv/bin/python benchmarks/bench_reconcile.py --rows 10000000
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl

_DATACOMPY = """
import json, sys, time
import datacompy, polars as pl
left, right = pl.read_parquet(sys.argv[1]), pl.read_parquet(sys.argv[2])
compare = datacompy.PolarsCompare(left, right, join_columns=["transaction_id"], abs_tol=0, rel_tol=0)
mismatch = compare.all_mismatch()
print(json.dumps({"missing_in_left": compare.df2_unq_rows.height, "missing_in_right": compare.df1_unq_rows.height,
                  "mismatched_rows": mismatch.height}))
"""


def _table(rows: int, seed: int) -> pl.DataFrame:
  rng = np.random.default_rng(seed)
  score = rng.random(rows)
  return pl.DataFrame({
      "transaction_id": "tx-" + pl.int_range(rows, eager=True).cast(pl.String).str.zfill(10),
      "event_time_ms": 1522540800000 + np.sort(rng.integers(0, 30 * 86_400_000, rows)),
      "customer_id": rng.integers(0, 5000, rows),
      "terminal_id": rng.integers(0, 10000, rows),
      "amount_minor": rng.integers(1, 500_000, rows),
      "currency": np.full(rows, "EUR"),
      "score": np.round(score, 6),
      "decision": np.where(score > 0.9, "decline", np.where(score > 0.7, "review", "approve")),
      **{f"feature_{i}": rng.random(rows) for i in range(4)},
  })


def write_tables(rows: int, diff_fraction: float, out: str, seed: int = 0) -> dict:
  """Writes left.parquet and right.parquet; returns the planted counts."""
  left = _table(rows, seed)
  planted = max(3, int(rows * diff_fraction)) // 3
  rng = np.random.default_rng(seed + 1)
  chosen = rng.choice(rows, size=3 * planted, replace=False)
  dropped, changed = chosen[:planted], np.sort(chosen[planted:])
  right = left.with_row_index("i").with_columns(
      pl.when(pl.col("i").is_in(changed[0::3])).then(pl.col("amount_minor") + 1).otherwise(pl.col("amount_minor"))
      .alias("amount_minor"),
      pl.when(pl.col("i").is_in(changed[1::3])).then(pl.col("score") + 0.01).otherwise(pl.col("score")).alias("score"),
      pl.when(pl.col("i").is_in(changed[2::3])).then(pl.lit("review")).otherwise(pl.col("decision"))
      .alias("decision"),
  ).filter(~pl.col("i").is_in(dropped)).drop("i")
  extra = _table(planted, seed + 2).with_columns(("extra-" + pl.col("transaction_id")).alias("transaction_id"))
  right = pl.concat([right, extra]).sample(fraction=1.0, shuffle=True, seed=seed)
  # Some of the changed decisions may already be "review": count what really changed.
  mismatched = left.join(right, on="transaction_id", suffix="_r").filter(
      (pl.col("amount_minor") != pl.col("amount_minor_r")) | (pl.col("score") != pl.col("score_r"))
      | (pl.col("decision") != pl.col("decision_r"))).height
  left.write_parquet(os.path.join(out, "left.parquet"), row_group_size=1_000_000, compression="zstd")
  right.write_parquet(os.path.join(out, "right.parquet"), row_group_size=1_000_000, compression="zstd")
  return {"missing_in_left": planted, "missing_in_right": planted, "mismatched_rows": mismatched}


def measure(argv, timeout_s: float) -> dict:
  """Runs ``argv``; wall seconds, peak RSS (MiB) from ``wait4``, exit status and stdout."""
  with tempfile.TemporaryFile() as stdout:
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=stdout)  # pylint: disable=consider-using-with
    deadline = start + timeout_s
    while True:
      pid, status, usage = os.wait4(process.pid, os.WNOHANG)
      if pid:
        break
      if time.monotonic() > deadline:
        process.kill()
        _, status, usage = os.wait4(process.pid, 0)
        return {"wall_s": None, "peak_rss_mib": usage.ru_maxrss / 1024, "status": "timeout", "out": ""}
      time.sleep(0.05)
    wall = time.monotonic() - start
    stdout.seek(0)
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "status": os.waitstatus_to_exitcode(status),
            "out": stdout.read().decode()}


def _datacompy_python(path: str) -> str:
  python = os.path.join(path, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "datacompy>=1.1,<2", "pyarrow"], check=True)
  return python


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=10_000_000)
  parser.add_argument("--diff_fraction", type=float, default=0.001)
  parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "txstream-bench-reconcile"))
  parser.add_argument("--shards", type=int, default=16)
  parser.add_argument("--datacompy_python", default=os.path.join(tempfile.gettempdir(), "txstream-datacompy-venv"),
                      help="Virtualenv for datacompy (made on first use).")
  parser.add_argument("--datacompy_timeout_s", type=float, default=1800)
  parser.add_argument("--skip_datacompy", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.monotonic()
  # In a process of its own: a child forked from a parent holding the tables would count them in its peak RSS.
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    planted = pool.apply(write_tables, (args.rows, args.diff_fraction, args.out))
  print(f"wrote {args.rows:,} rows a side in {time.monotonic() - start:.1f} s under {args.out}; planted {planted}")
  left, right = os.path.join(args.out, "left.parquet"), os.path.join(args.out, "right.parquet")
  runs = {"txstream reconcile": [sys.executable, "-m", "txstream.cli", "reconcile", f"--left=parquet:{left}",
                                 f"--right=parquet:{right}", f"--report={os.path.join(args.out, 'report')}",
                                 f"--shards={args.shards}", "--progress_interval_s=10"]}
  if not args.skip_datacompy:
    script = os.path.join(args.out, "datacompy_run.py")
    with open(script, "w", encoding="utf-8") as f:
      f.write(_DATACOMPY)
    runs["datacompy PolarsCompare"] = [_datacompy_python(args.datacompy_python), script, left, right]
  print(f"{'tool':<26}{'wall s':>9}{'peak RSS MiB':>14}  counts agree  command")
  for name, command in runs.items():
    result = measure(command, args.datacompy_timeout_s if "datacompy" in name else 3600)
    counts = {}
    if result["out"].strip():
      found = json.loads(result["out"].strip().splitlines()[-1])
      counts = {k: found.get(k) for k in planted}
    wall = f"{result['wall_s']:.1f}" if result["wall_s"] is not None else result["status"]
    print(f"{name:<26}{wall:>9}{result['peak_rss_mib']:>14.0f}  {str(counts == planted):<12}  {' '.join(command)}")
    if counts != planted:
      print(f"  found {counts}, exit {result['status']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
