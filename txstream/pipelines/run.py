"""``txstream run``: the graph, bounded, with a summary that accounts for every input.

The summary JSON reports ``events_in``, ``scored``, ``dead_letter_total``,
``dead_letter`` (reason -> count), ``filtered``, ``tiers`` (tier -> rows),
``wall_seconds`` and ``events_per_second``; ``scored + dead_letter_total +
filtered == events_in`` holds for every completed run.
"""
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.config.options import RunOptions, ScoreOptions, SourceOptions, TierOptions
from txstream.io.kafka_config import KafkaConfig, KafkaOptions
from txstream.io import cold_table
from txstream.io.kafka_offsets import commit_offsets
from txstream.io.schema_registry import registered_schema_ids
from txstream.pipelines.graph import build_graph, build_tiers
from txstream.runners.profiles import run_context, runner_for

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"


class ConfigError(ValueError):
  """A configuration mistake the user can fix; reported as one line."""


def counters(result) -> Counter:
  out = Counter()
  for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    out[c.key.metric.name] += c.committed if c.committed is not None else c.attempted
  return out


def summarize(values: Counter, wall_seconds: float, model_version: str) -> dict:
  dead = Counter()
  for name, n in values.items():
    if name.startswith("dead_letter.") and n:
      dead[name.rsplit(".", 1)[1]] += n
  events_in = values["events_in"]
  return {
      "events_in": events_in,
      "scored": values["scored"],
      "dead_letter_total": sum(dead.values()),
      "dead_letter": dict(sorted(dead.items())),
      "filtered": sum(n for k, n in values.items() if k.startswith("filtered.")),
      "filtered_by_reason": {k.split(".", 1)[1]: n for k, n in sorted(values.items()) if k.startswith("filtered.")},
      "labels_in": values["labels_in"],
      "label_dead_letter_total": sum(n for k, n in values.items() if k.startswith("label_dead_letter.")),
      "decisions": {k.split(".", 1)[1]: n for k, n in sorted(values.items()) if k.startswith("decision.")},
      "tiers": {k.split(".", 1)[1]: n for k, n in sorted(values.items()) if k.startswith("tier.")},
      "model_version": model_version,
      "wall_seconds": round(wall_seconds, 3),
      "events_per_second": round(events_in / wall_seconds, 1) if wall_seconds > 0 else 0.0,
  }


def check_config(options) -> None:
  src = options.view_as(SourceOptions)
  if options.view_as(ScoreOptions).model_watch_pattern:
    raise ConfigError("--model_watch_pattern needs a streaming run; `txstream run` scores with one model")
  if options.view_as(KafkaOptions).topic:
    if src.input:
      raise ConfigError("give either --input DIR or --topic T, not both")
    if not src.reference_dir or ("://" not in src.reference_dir and not os.path.isdir(src.reference_dir)):
      raise ConfigError("--topic needs --reference_dir DIR (customers.avro, terminals.avro)")
    try:
      KafkaConfig.from_options(options)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    return
  if not src.input:
    raise ConfigError("--input DIR (files written by `txstream generate`) or --topic T is required")
  if not os.path.isdir(src.input) and "://" not in src.input:
    raise ConfigError(f"--input {src.input}: no such directory")
  for sub in ("transactions", "labels", "reference"):
    if "://" not in src.input and not os.path.isdir(os.path.join(src.input, sub)):
      raise ConfigError(f"--input {src.input}: missing {sub}/ (not written by `txstream generate`?)")


def preflight_tiers(options, run_id: str = "run"):
  """Builds WriteTiers and checks every server tier before any data is read."""
  from txstream.io.sinks import SinkConfigError
  write_tiers = build_tiers(options, run_id)
  try:
    write_tiers.preflight()
  except SinkConfigError as e:
    raise ConfigError(str(e)) from e
  return write_tiers


def _record_run(options, record: dict) -> None:
  dsn = options.view_as(TierOptions).postgres_dsn
  if dsn:
    from txstream.io.postgres_runs import record_run
    record_run(dsn, record)


def run(argv=None, options: Optional[PipelineOptions] = None) -> dict:
  """Runs the bounded graph to completion and returns the summary.

  With a warm tier the run is recorded in PostgreSQL's ``runs`` table: code,
  model, reference-data and schema versions at the start, the summary at the
  end (what a compliance rerun needs to show what produced its output).
  """
  options = options or PipelineOptions(argv)
  check_config(options)
  run_id = str(uuid.uuid4())
  write_tiers = preflight_tiers(options, run_id)
  start = time.monotonic()
  started_at = int(time.time() * 1000)
  runner = runner_for(options)
  pipeline = beam.Pipeline(runner=runner, options=options)
  outputs = build_graph(pipeline, options, write_tiers=write_tiers)
  _record_run(options, {"run_id": run_id, "started_at": started_at, "model_version": outputs.model_version,
                        "reference_version": outputs.reference_version, "schema_ids": registered_schema_ids()})
  with run_context(runner):
    result = pipeline.run()
    result.wait_until_finish()
  wall = time.monotonic() - start
  summary = summarize(counters(result), wall, outputs.model_version)
  summary["run_id"] = run_id
  summary["reference_version"] = outputs.reference_version
  summary["rules_version"] = outputs.rules_version
  cold_path = write_tiers.config.cold_path
  if cold_path:
    # The whole graph succeeded: publish the run's staged cold-tier rows as one table version.
    committed = cold_table.commit(cold_path, run_id, options)
    summary["cold_table_version"] = committed.version
    # What the table took, not what the writers counted (a runner may drop a bundle's late counter updates).
    summary["tiers"]["cold"] = committed.inserted + committed.updated
  if outputs.kafka_ranges is not None:
    # Only now, with every tier written, do the offsets move on: a run that
    # dies earlier leaves them where they were and the next run rereads its
    # range, which the upserting tiers absorb without duplicates.
    ranges = {p: stop for p, (_, stop) in outputs.kafka_ranges.items()}
    config = KafkaConfig.from_options(options)
    commit_offsets(config, ranges)
    if outputs.label_ranges:
      commit_offsets(config, {p: stop for p, (_, stop) in outputs.label_ranges.items()},
                     topic=options.view_as(KafkaOptions).labels_topic)
    summary["kafka_offsets"] = {str(p): [start, stop] for p, (start, stop) in sorted(outputs.kafka_ranges.items())}
  _record_run(options, {"run_id": run_id, "finished_at": int(time.time() * 1000), "summary": summary})
  path = options.view_as(RunOptions).summary_json
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary
