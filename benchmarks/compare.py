"""`txstream run` against the Beam-free reference (``reference.py``) on one input: speed, memory, same decisions.

    .venv/bin/python benchmarks/compare.py                       # data/bench-103d (~1M events), once each
    .venv/bin/python benchmarks/compare.py --repeats 3           # alternating order; medians
    .venv/bin/python benchmarks/compare.py --check_rows 100000   # every id, a sample of the other columns
    .venv/bin/python benchmarks/compare.py --days 10 -- --direct_num_workers=1   # flags after -- go to `txstream run`

Generates the input if it is missing (``bench_run.generate``), then runs the
reference and the pipeline (cold tier only) each in its own subprocess,
alternating which goes first when repeated, and measures each child's wall
time, CPU time and peak RSS with ``os.wait4`` (that child alone). Events per
second are of the whole process, start-up included, as a user sees it; the
JSON also gives each side's own in-process time. ``ratio`` is pipeline
events/s over reference events/s; ``ratio_in_process`` the same from each
side's own timer, and ``ratio_cpu`` from CPU seconds (reference over
pipeline), which other jobs on a shared machine disturb least.

Then it checks the outputs of the last run of each: both cold tiers hold the
same rows, by (transaction_id, source), with equal values in every column
(floats bit for bit, NaN equal to NaN) except ``decided_at``; the event-date
partition of each row's file counts as a column. ``--check_rows N``
compares N rows picked at random (seed 0) after checking every id. It also
checks the dead-letter files are byte-identical and the summaries' counts
agree. Exits 1 if anything differs. Read from files, the cold tiers are
compared a column at a time, so memory stays small however many rows there are.
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_run  # noqa: E402  (a sibling script, not a package)
from txstream.io import cold_table  # noqa: E402

ROOT = bench_run.ROOT
REFERENCE = [sys.executable, os.path.join(ROOT, "benchmarks", "reference.py")]
SIDES = ("reference", "pipeline")
SUMMARY_KEYS = ("events_in", "scored", "dead_letter_total", "dead_letter", "filtered", "filtered_by_reason",
                "labels_in", "label_dead_letter_total", "decisions", "tiers")
IGNORED = {"decided_at"}
_EXAMPLES = 5


# ----------------------------------------------------------------------------------------------- running

def _command(side: str, input_dir: str, out: str, args) -> List[str]:
  flags = [f"--input={input_dir}", f"--cold_path={out}/cold", f"--dead_letter_path={out}/dead",
           f"--summary_json={out}/summary.json"]
  if side == "reference":
    return REFERENCE + flags + [f"--shards={args.reference_shards}"]
  return bench_run.TXSTREAM + ["run"] + flags + list(args.beam_args)


def _run(side: str, command: List[str], out: str) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  load = os.getloadavg()[0]
  print(f"running the {side} ...", file=sys.stderr, flush=True)
  measured = bench_run.run_measured(command, cwd=ROOT, stdout=subprocess.DEVNULL)
  with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  print(f"  {side}: {measured.seconds} s, peak RSS {measured.peak_rss_mib} MiB", file=sys.stderr, flush=True)
  return {"measured": measured, "summary": summary, "load_before": round(load, 2)}


def _figures(runs: List[dict]) -> dict:
  events = runs[-1]["summary"]["events_in"]
  seconds = statistics.median(r["measured"].seconds for r in runs)
  return {
      "events": events, "seconds": seconds, "events_per_second": round(events / seconds, 1),
      "in_process_seconds": statistics.median(r["summary"]["wall_seconds"] for r in runs),
      "cpu_seconds": statistics.median(r["measured"].cpu_seconds for r in runs),
      "peak_rss_mib": max(r["measured"].peak_rss_mib for r in runs),
      "runs": [{"seconds": r["measured"].seconds, "cpu_seconds": r["measured"].cpu_seconds,
                "peak_rss_mib": r["measured"].peak_rss_mib, "load_before": r["load_before"]} for r in runs],
  }


# ----------------------------------------------------------------------------------------------- cold tiers

def _parquet_files(root: str) -> List[str]:
  """Published Parquet files under ``root``, in a fixed order (names starting with '.' or '_' are not data)."""
  files = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)):
    parts = os.path.relpath(path, root).split(os.sep)
    if not any(p.startswith((".", "_")) for p in parts):
      files.append(path)
  return files


class _ColdTier:
  """One side's cold tier: the pipeline's Delta table, or the reference's day files."""

  def __init__(self, root: str):
    if os.path.isdir(os.path.join(root, cold_table.TABLE, "_delta_log")):
      self.table = cold_table.read(root)
      self.files = [f for f in _parquet_files(os.path.join(root, cold_table.TABLE))]
    else:
      self.files = _parquet_files(root)
      self.table = pa.concat_tables([pq.read_table(f) for f in self.files]) if self.files else None
    self.rows = [self.table.num_rows if self.table is not None else 0]
    self.schema = self.table.schema if self.table is not None else None

  def column(self, name: str) -> pa.ChunkedArray:
    return self.table.column(name)

  def order(self) -> Tuple[pa.Table, np.ndarray]:
    keys = pa.table({"transaction_id": self.column("transaction_id"), "source": self.column("source")})
    order = pc.sort_indices(keys, [("transaction_id", "ascending"), ("source", "ascending")]).to_numpy()
    return keys.take(order), order


def _differs(a: pa.Array, b: pa.Array) -> np.ndarray:
  """Per row, whether the values differ (floats bit for bit, NaN equal to NaN; nulls equal only to nulls)."""
  if a.equals(b):
    return np.zeros(len(a), bool)
  if pa.types.is_floating(a.type) and a.type == b.type:
    x, y = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
    same = (x.view(np.uint64) == y.view(np.uint64)) | (np.isnan(x) & np.isnan(y))
    return ~same | (a.is_null().to_numpy(zero_copy_only=False) != b.is_null().to_numpy(zero_copy_only=False))
  return np.array([u != v for u, v in zip(a.to_pylist(), b.to_pylist())], bool)


def compare_cold(pipeline_root: str, reference_root: str, check_rows: int) -> dict:
  """Same rows (every id) and the same values in every column but ``decided_at`` (all rows or a sample)."""
  sides = {"pipeline": _ColdTier(pipeline_root), "reference": _ColdTier(reference_root)}
  p, r = sides["pipeline"], sides["reference"]
  result = {"pipeline_rows": sum(p.rows), "reference_rows": sum(r.rows),
            "pipeline_files": len(p.files), "reference_files": len(r.files)}
  if not p.files or not r.files:
    return dict(result, match=False, problem="a cold tier is empty")
  p_names = [n for n in p.schema.names if n not in IGNORED and n != "event_date"]
  if set(p.schema.names) != set(r.schema.names):
    return dict(result, match=False, problem="the Parquet schemas differ",
                pipeline_schema=str(p.schema), reference_schema=str(r.schema))
  (p_keys, p_order), (r_keys, r_order) = p.order(), r.order()
  if not p_keys.equals(r_keys):
    p_ids, r_ids = p_keys.column("transaction_id"), r_keys.column("transaction_id")
    only_p = p_ids.filter(pc.invert(pc.is_in(p_ids, value_set=r_ids.combine_chunks())))
    only_r = r_ids.filter(pc.invert(pc.is_in(r_ids, value_set=p_ids.combine_chunks())))
    return dict(result, match=False, problem="the rows differ (by transaction_id, source)",
                only_in_pipeline=len(only_p), only_in_reference=len(only_r),
                examples_only_in_pipeline=only_p[:_EXAMPLES].to_pylist(),
                examples_only_in_reference=only_r[:_EXAMPLES].to_pylist())
  n = len(p_order)
  picked = np.arange(n)
  if check_rows and check_rows < n:
    picked = np.sort(np.random.default_rng(0).choice(n, check_rows, replace=False))
  p_take, r_take = pa.array(p_order[picked]), pa.array(r_order[picked])
  ids = p_keys.column("transaction_id").take(pa.array(picked))
  mismatches: Dict[str, dict] = {}
  for name in p_names + ["event_date"]:
    a = p.column(name).take(p_take).combine_chunks()
    b = r.column(name).take(r_take).combine_chunks()
    differs = _differs(a, b)
    if differs.any():
      first = int(np.flatnonzero(differs)[0])
      mismatches[name] = {"rows": int(differs.sum()), "example": {
          "transaction_id": ids[first].as_py(), "pipeline": repr(a[first].as_py()),
          "reference": repr(b[first].as_py())}}
  return dict(result, match=not mismatches, rows_compared=len(picked),
              columns_compared=len(p_names) + 1, ignored=sorted(IGNORED), mismatches=mismatches)


def compare_dead_letters(pipeline_dir: str, reference_dir: str) -> dict:
  def read(folder):
    return {os.path.basename(f): open(f, "rb").read() for f in sorted(glob.glob(os.path.join(folder, "*.jsonl")))}
  a, b = read(pipeline_dir), read(reference_dir)
  return {"match": a == b, "files": sorted(a), "reference_files": sorted(b),
          "lines": sum(v.count(b"\n") for v in a.values()),
          "differing": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}


def compare_summaries(pipeline: dict, reference: dict) -> dict:
  differing = {k: {"pipeline": pipeline.get(k), "reference": reference.get(k)} for k in SUMMARY_KEYS
               if pipeline.get(k) != reference.get(k)}
  return {"match": not differing, "differing": differing}


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", default=None,
                      help="Input directory (default: the generated one of --days/--customers/--terminals).")
  parser.add_argument("--days", type=int, default=103, help="Days of generated traffic (103 = ~1M events).")
  parser.add_argument("--customers", type=int, default=bench_run.DEFAULT_CUSTOMERS)
  parser.add_argument("--terminals", type=int, default=bench_run.DEFAULT_TERMINALS)
  parser.add_argument("--out", default=os.path.join(ROOT, "out", "compare"), help="Output folder (emptied).")
  parser.add_argument("--repeats", type=int, default=1, help="Runs of each side, alternating which goes first.")
  parser.add_argument("--check_rows", type=int, default=0, help="Rows to compare column by column (0: all).")
  parser.add_argument("--reference_shards", type=int, default=1,
                      help="The reference's feature shards (1: one pass; 16 splits as the graph does).")
  parser.add_argument("beam_args", nargs="*", help="Extra flags passed to `txstream run` (after --).")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.input:
    if not os.path.isdir(args.input):
      parser.error(f"--input {args.input}: no such directory")
    input_dir = os.path.abspath(args.input)
  else:
    input_dir = bench_run.generate(args.days, args.customers, args.terminals)
  outs = {side: os.path.join(args.out, side) for side in SIDES}
  commands = {side: _command(side, input_dir, outs[side], args) for side in SIDES}
  runs: Dict[str, List[dict]] = {side: [] for side in SIDES}
  for i in range(args.repeats):
    for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
      runs[side].append(_run(side, commands[side], outs[side]))
  print("comparing the outputs ...", file=sys.stderr, flush=True)
  figures = {side: _figures(runs[side]) for side in SIDES}
  checks = {
      "cold_tier": compare_cold(f"{outs['pipeline']}/cold", f"{outs['reference']}/cold", args.check_rows),
      "dead_letters": compare_dead_letters(f"{outs['pipeline']}/dead", f"{outs['reference']}/dead"),
      "summaries": compare_summaries(runs["pipeline"][-1]["summary"], runs["reference"][-1]["summary"]),
  }
  matched = all(c["match"] for c in checks.values())
  print(json.dumps({
      "input": os.path.relpath(input_dir, ROOT), **figures,
      "ratio": round(figures["pipeline"]["events_per_second"] / figures["reference"]["events_per_second"], 3),
      "ratio_in_process": round(figures["reference"]["in_process_seconds"]
                                / figures["pipeline"]["in_process_seconds"], 3),
      "ratio_cpu": round(figures["reference"]["cpu_seconds"] / figures["pipeline"]["cpu_seconds"], 3),
      "outputs_match": matched, "checks": checks, "repeats": args.repeats, "cpus": os.cpu_count(),
      "command": "benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      "child_commands": {side: " ".join(commands[side]) for side in SIDES},
  }, indent=2))
  return 0 if matched else 1


if __name__ == "__main__":
  sys.exit(main())
