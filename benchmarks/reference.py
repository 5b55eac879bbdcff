"""A single-process reference for ``txstream run`` with the cold tier: the same core functions, without Beam.

    .venv/bin/python benchmarks/reference.py --input data/bench-103d --cold_path out/reference/cold \\
        --dead_letter_path out/reference/dead --summary_json out/reference/summary.json

It does the work of the bounded graph, stage for stage, by calling the same
functions the graph's DoFns call: every transactions file streamed in batches
of ``BATCH_RECORDS`` with ``wire.read_frame_batches``, ``decode_transactions``
and ``enrich`` per batch, the labels decoded the same way, features in one
sorted pass per shard (``CustomerEngine`` then ``TerminalEngine``, with
``keep_state=False`` as the bounded graph runs them), ``Model.predict`` and
``decide`` per batch of ``OUTPUT_ROWS``, decisions written with ``DayFiles``
(one file per event day) and dead letters as the graph writes them (one
sorted JSON-lines file per stage). What it leaves out is Beam's orchestration:
no runner, no bundles, no coders, no shuffles, no metrics. So the ratio of the
graph's speed to this one's measures what orchestration costs, not a
different algorithm. ``--shards 16`` splits the features exactly as the graph
does; the default (1) is one pass over the whole input. Features are a pure
function of the input either way, so the decisions are the same.

Holds the whole decoded input in memory (as the graph's shuffle does), so
memory grows with the input; this is a yardstick, not a production path.
Writes a summary JSON with the fields of ``txstream run``'s that ``compare.py``
checks. Nothing else in the project imports it.
"""
import argparse
import collections
import glob
import json
import logging
import os
import shutil
import sys
import time
from typing import Dict, Iterator, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from txstream.core import contracts, dead_letters, decide, decode, enrich  # noqa: E402
from txstream.core import features as engine  # noqa: E402
from txstream.core.batch import LabelBatch, TransactionBatch, shard_of, split_by  # noqa: E402
from txstream.core.rules import load_rules  # noqa: E402
from txstream.io import parquet, schema_registry, wire  # noqa: E402
from txstream.models.artifacts import load_model  # noqa: E402
from txstream.transforms.enrich import load_reference  # noqa: E402
from txstream.transforms.read import BATCH_RECORDS  # noqa: E402

_LOGGER = logging.getLogger(__name__)
OUTPUT_ROWS = 50_000  # rows scored per predict call: the graph's terminal stage hands on batches of this size


class _Tally:
  """What the run emitted, counted as ``txstream run``'s summary counts it."""

  def __init__(self):
    self.counts = collections.Counter()
    self.dead: List[pa.Table] = []

  def dead_letters(self, table: pa.Table, prefix: str = "dead_letter") -> None:
    if not table.num_rows:
      return
    self.dead.append(table)
    for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
      self.counts[f"{prefix}.{stage}.{reason}"] += 1


def _raw_batches(pattern: str, stream: str, tally: _Tally, prefix: str) -> Iterator[pa.Table]:
  """contracts.RAW tables of every file matching ``pattern``; framing damage is one dead letter per file."""
  for path in sorted(glob.glob(pattern)):
    name = os.path.basename(path)
    try:
      with open(path, "rb") as f:
        for frames in wire.read_frame_batches(f, BATCH_RECORDS):
          tally.counts[f"{stream}_in"] += len(frames.values)
          yield frames.raw(name)
    except wire.WireFormatError as e:
      tally.counts[f"{stream}_in"] += 1
      tally.dead_letters(dead_letters.of_errors([f"{name}#{e.index}"], [None], contracts.READ, [e]), prefix)


def read_transactions(input_dir: str, reference: enrich.Reference, tally: _Tally) -> pa.Table:
  """Every valid, enriched transaction of ``input_dir`` (contracts.TRANSACTION), in file order."""
  decoder = decode.Decoder(schema_registry.make_registry(None), schema_registry.TRANSACTION_SUBJECT)
  parts = []
  for raw in _raw_batches(os.path.join(input_dir, "transactions", "*.wire"), "events", tally, "dead_letter"):
    valid, dead = decode.decode_transactions(raw, decoder)
    tally.dead_letters(dead)
    enriched, dead = enrich.enrich(valid, reference)
    tally.dead_letters(dead)
    if enriched.num_rows:
      parts.append(TransactionBatch(enriched))
  return TransactionBatch.concat(parts).table


def read_labels(input_dir: str, tally: _Tally) -> pa.Table:
  """Every decoded label of ``input_dir`` (contracts.LABEL), in file order."""
  decoder = decode.Decoder(schema_registry.make_registry(None), schema_registry.LABEL_SUBJECT)
  parts = []
  for raw in _raw_batches(os.path.join(input_dir, "labels", "*.wire"), "labels", tally, "label_dead_letter"):
    labels, dead = decode.decode_labels(raw, decoder)
    tally.dead_letters(dead, "label_dead_letter")
    parts.append(LabelBatch(labels))
  return LabelBatch.concat(parts).table


def _by_shard(table: pa.Table, column: str, shards: int) -> Dict[int, pa.Table]:
  if shards == 1:
    return {0: table}
  return dict(split_by(table, shard_of(table.column(column).to_numpy(), shards)))


def featured_by_terminal_shard(tx: pa.Table, labels: pa.Table, shards: int, delay_days: int,
                               tally: _Tally) -> Iterator[pa.Table]:
  """contracts.FEATURED tables, one per terminal shard: the graph's two feature stages, run in turn."""
  parts: Dict[int, List[pa.Table]] = collections.defaultdict(list)
  by_customer = _by_shard(tx, "customer_id", shards)
  del tx  # the caller let go of it: the shards are all that is left of the input
  for shard in sorted(by_customer):
    rows = by_customer.pop(shard)
    featured, duplicates, dead = engine.outcomes(rows, engine.CustomerEngine(keep_state=False).update(rows))
    tally.counts["filtered.duplicate"] += duplicates.num_rows
    tally.dead_letters(dead)
    for terminal_shard, part in _by_shard(featured, "terminal_id", shards).items():
      parts[terminal_shard].append(part)
  labels_by_shard = _by_shard(labels, "terminal_id", shards)
  for shard in sorted(parts):
    rows = pa.concat_tables(parts.pop(shard))
    terminals = engine.TerminalEngine(delay_days, keep_state=False)
    terminals.add_labels(labels_by_shard.get(shard, contracts.empty(contracts.LABEL)))
    yield engine.with_features(rows, contracts.TERMINAL_FEATURES, terminals.update(rows))


def score_and_write(featured: Iterator[pa.Table], model: decide.Model, rules, files: parquet.DayFiles,
                    tally: _Tally) -> None:
  decided_at_ms = int(time.time() * 1000)
  for table in featured:
    for start in range(0, table.num_rows, OUTPUT_ROWS):
      rows = table.slice(start, OUTPUT_ROWS)
      decisions = decide.decide(rows, model.predict(decide.feature_matrix(rows)), model.version, rules,
                                decided_at_ms)
      tally.counts["scored"] += decisions.num_rows
      for count in pc.value_counts(decisions.column("decision")).to_pylist():
        tally.counts[f"decision.{count['values']}"] += count["counts"]
      for day, day_rows in split_by(decisions, parquet.event_days(decisions)):
        files.write(day, day_rows)


def write_dead_letters(root: str, tables: List[pa.Table]) -> int:
  """One ``<stage>.jsonl`` per stage, lines sorted: what ``WriteDeadLetters`` writes."""
  by_stage: Dict[str, List[str]] = collections.defaultdict(list)
  for table in tables:
    for row in table.to_pylist():
      by_stage[row["stage"]].append(dead_letters.to_json(row))
  os.makedirs(root, exist_ok=True)
  for stage, lines in by_stage.items():
    with open(os.path.join(root, f"{stage}.jsonl"), "w", encoding="utf-8") as f:
      f.write("\n".join(sorted(lines)) + "\n")
  return sum(len(lines) for lines in by_stage.values())


def summarize(counts: collections.Counter, wall_seconds: float, model_version: str) -> dict:
  """The fields of ``txstream run``'s summary, from the same counter names."""
  dead = collections.Counter()
  for name, n in counts.items():
    if name.startswith("dead_letter."):
      dead[name.rsplit(".", 1)[1]] += n
  prefixed = lambda prefix: {k.split(".", 1)[1]: n for k, n in sorted(counts.items()) if k.startswith(prefix) and n}
  return {
      "events_in": counts["events_in"], "scored": counts["scored"],
      "dead_letter_total": sum(dead.values()), "dead_letter": dict(sorted(dead.items())),
      "filtered": sum(prefixed("filtered.").values()), "filtered_by_reason": prefixed("filtered."),
      "labels_in": counts["labels_in"],
      "label_dead_letter_total": sum(n for k, n in counts.items() if k.startswith("label_dead_letter.")),
      "decisions": prefixed("decision."), "tiers": prefixed("tier."), "model_version": model_version,
      "wall_seconds": round(wall_seconds, 3),
      "events_per_second": round(counts["events_in"] / wall_seconds, 1) if wall_seconds > 0 else 0.0,
  }


def run(input_dir: str, cold_path: str, dead_letter_path: str, shards: int = 1, delay_days: int = 7) -> dict:
  start = time.monotonic()
  model, rules = load_model(None), load_rules(None)
  reference = load_reference(os.path.join(input_dir, "reference"))
  tally = _Tally()
  labels = read_labels(input_dir, tally)
  tx = read_transactions(input_dir, reference, tally)
  featured = featured_by_terminal_shard(tx, labels, shards, delay_days, tally)
  del tx
  files = parquet.DayFiles(cold_path)
  try:
    score_and_write(featured, model, rules, files, tally)
    tally.counts["tier.cold"] += files.publish("reference", lambda copy, path: copy())
  finally:
    files.discard()
  if dead_letter_path:
    tally.counts["tier.dead_letters"] += write_dead_letters(dead_letter_path, tally.dead)
  return summarize(tally.counts, time.monotonic() - start, model.version)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help="Directory written by `txstream generate`.")
  parser.add_argument("--cold_path", required=True, help="Cold tier root (emptied first).")
  parser.add_argument("--dead_letter_path", default=None, help="Folder for dead-letter JSON lines (emptied first).")
  parser.add_argument("--summary_json", default=None, help="Where to write the summary.")
  parser.add_argument("--shards", type=int, default=1,
                      help="Feature shards per kind (1: one pass over everything; the graph uses 16).")
  parser.add_argument("--terminal_delay_days", type=int, default=7)
  args = parser.parse_args(argv)
  if args.shards < 1:
    parser.error("--shards must be >= 1")
  for path in (args.cold_path, args.dead_letter_path):
    if path:
      shutil.rmtree(path, ignore_errors=True)
  summary = run(args.input, args.cold_path, args.dead_letter_path, args.shards, args.terminal_delay_days)
  if args.summary_json:
    os.makedirs(os.path.dirname(os.path.abspath(args.summary_json)), exist_ok=True)
    with open(args.summary_json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  print(json.dumps(summary, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
