"""``txstream run``: the graph, bounded, with a summary that accounts for every input.

The summary JSON reports ``events_in``, ``scored``, ``dead_letter_total``,
``dead_letter`` (reason -> count), ``filtered``, ``tiers`` (tier -> rows),
``wall_seconds`` and ``events_per_second``; ``scored + dead_letter_total +
filtered == events_in`` holds for every completed run.
"""
import glob
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

import txstream
from txstream import lineage, metrics
from txstream import progress
from txstream.config.options import (LiveOptions, QualityOptions, RunOptions, ScoreOptions, SourceOptions, TierOptions,
                                     dq_docs_dir)
from txstream.core import contracts
from txstream.core.enrich import ReferenceDataError
from txstream.core.rules import load_rules
from txstream.io.kafka_config import KafkaConfig, KafkaOptions
from txstream.io import cold_table, raw_archive
from txstream.io.kafka_offsets import commit_offsets
from txstream.io.sinks import SinkConfigError
from txstream.models import artifacts
from txstream.pipelines import manifest as manifest_lib
from txstream.pipelines.graph import Sources, build_graph, build_tiers
from txstream.quality import report as dq_report
from txstream.quality import validate as dq
from txstream.quality import worker as dq_worker
from txstream.runners.profiles import run_context, runner_for
from txstream.transforms.enrich import load_reference
from txstream.transforms.tiers import check_writable

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
  """Checks the flags and the files they name before anything is read; each mistake is one line.

  ``ConfigError`` for the flags, the input directory (transactions and
  labels files) and the reference data (``core.enrich.ReferenceDataError``'s
  checks); the model, rules and runner raise their own ``ModelError``,
  ``RulesError`` and ``RunnerError``. Output paths and servers are
  ``preflight_tiers``'s.
  """
  src = options.view_as(SourceOptions)
  check_quality(options)
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
    check_scoring_and_runner(options)
    check_reference(options, src.reference_dir)
    return
  if not src.input:
    raise ConfigError("--input DIR (files written by `txstream generate`) or --topic T is required")
  if not os.path.isdir(src.input) and "://" not in src.input:
    raise ConfigError(f"--input {src.input}: no such directory")
  for sub in ("transactions", "labels", "reference"):
    if "://" not in src.input and not os.path.isdir(os.path.join(src.input, sub)):
      raise ConfigError(f"--input {src.input}: missing {sub}/ (not written by `txstream generate`?)")
  check_scoring_and_runner(options)
  _check_input_files(src.input)
  check_reference(options, src.reference_dir or os.path.join(src.input, "reference"))


def check_quality(options) -> Optional[dq.QualityConfig]:
  """The data-quality thresholds (``--dq_config``), None with ``--no_dq``; ``ConfigError`` if wrong."""
  flags = options.view_as(QualityOptions)
  if flags.no_dq:
    return None
  try:
    return dq.QualityConfig.load(flags.dq_config)
  except dq.QualityConfigError as e:
    raise ConfigError(str(e)) from None


def check_scoring_and_runner(options) -> None:
  """The model and rules files, as ``Score`` will load them (both are small), and the runner.

  These come before the input files: a flag is the likelier mistake, and its
  error should not hide behind one about the data.
  """
  score = options.view_as(ScoreOptions)
  artifacts.load_metadata(score.model_dir, contracts.FEATURE_NAMES)
  load_rules(score.rules)
  runner_for(options)  # RunnerError for a runner that is not installed here


def _check_input_files(input_dir: str) -> None:
  """An input without transactions or labels would run and account for nothing, or score without labels."""
  if "://" in input_dir:
    return
  if not glob.glob(os.path.join(input_dir, "transactions", "*.wire")):
    raise ConfigError(f"--input {input_dir}: no transactions/*.wire files")
  if not glob.glob(os.path.join(input_dir, "labels", "*.wire")):
    raise ConfigError(f"--input {input_dir}: missing labels/labels.wire")


def check_reference(options, reference_dir: str) -> None:
  """Empty, duplicated or malformed reference data would dead-letter or mis-join transactions silently."""
  if "://" in reference_dir:
    # What beam.Pipeline() does first anyway: an s3:// directory is read with the run's S3 flags.
    FileSystems.set_options(options)
  try:
    load_reference(reference_dir)
  except ReferenceDataError as e:
    raise ConfigError(str(e)) from None


def _check_outputs(options, config) -> None:
  """Every output path, before the run: a path that fails at the end loses a completed run's output."""
  if config.cold_path:
    check_writable(config.cold_path, "--cold_path", options)
  if config.dead_letter_path:
    check_writable(config.dead_letter_path, "--dead_letter_path", options)
  summary = options.view_as(RunOptions).summary_json
  if summary:
    if os.path.isdir(summary):
      raise ConfigError(f"--summary_json {summary}: is a folder, not a file")
    check_writable(os.path.dirname(os.path.abspath(summary)), "--summary_json", options)
  metrics_file = options.view_as(metrics.MetricsOptions).metrics_file
  if metrics_file:
    check_writable(os.path.dirname(os.path.abspath(metrics_file)), "--metrics_file", options)
  if not options.view_as(QualityOptions).no_dq:
    check_writable(dq_docs_dir(options), "--dq_docs_dir", options)


def _make_summary_folder(options) -> None:
  """The summary is written with ``open`` once the run is done: its folder must be there by then."""
  summary = options.view_as(RunOptions).summary_json
  if summary:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
    except OSError as e:
      raise ConfigError(f"--summary_json {summary}: {e.strerror}") from None


def preflight_tiers(options, run_id: str = "run"):
  """Builds WriteTiers and checks every output path and server tier before any data is read.

  Creates nothing unless every check passes; then only the summary's folder.
  """
  write_tiers = build_tiers(options, run_id)
  try:
    _check_outputs(options, write_tiers.config)
    write_tiers.preflight()
  except SinkConfigError as e:
    raise ConfigError(str(e)) from e
  _make_summary_folder(options)
  return write_tiers


def run(argv=None, options: Optional[PipelineOptions] = None) -> dict:
  """Runs the bounded graph to completion and returns the summary (see ``execute``)."""
  options = options or PipelineOptions(argv)
  check_config(options)
  return execute(options, str(uuid.uuid4()))


def _inputs(options, outputs) -> list:
  if outputs.kafka_ranges is not None:
    flags = options.view_as(KafkaOptions)
    return manifest_lib.kafka_inputs(flags.topic, outputs.kafka_ranges, flags.labels_topic, outputs.label_ranges)
  src = options.view_as(SourceOptions)
  return manifest_lib.file_inputs(src.input) if src.input and "://" not in src.input else []


def _start_manifest(options, run_id: str, kind: str, outputs, window, extra: dict) -> dict:
  score = options.view_as(ScoreOptions)
  src = options.view_as(SourceOptions)
  return {
      "run_id": run_id, "kind": kind, "status": "running",
      "started_at": manifest_lib.utc_iso(int(time.time() * 1000)), "finished_at": None,
      "code": {"package_version": txstream.__version__, "git_commit": manifest_lib.code_version()},
      "schemas": manifest_lib.schema_fingerprints(),
      "model": manifest_lib.model_entry(score.model_dir, outputs.model_version),
      "rules": {"path": score.rules or "bundled", "version": outputs.rules_version},
      "reference": {"dir": src.reference_dir or (os.path.join(src.input, "reference") if src.input else None),
                    "version": outputs.reference_version},
      "source": {"input": os.path.abspath(src.input) if src.input and "://" not in src.input else src.input,
                 "topic": options.view_as(KafkaOptions).topic},
      "inputs": _inputs(options, outputs),
      "window": ({"from": manifest_lib.utc_iso(window[0]), "to": manifest_lib.utc_iso(window[1]),
                  "from_ms": window[0], "to_ms": window[1], "bounds": "[from, to)"} if window else None),
      "outputs": {"cold_path": options.view_as(TierOptions).cold_path,
                  "dead_letter_path": options.view_as(TierOptions).dead_letter_path},
      "summary": None,
      **extra,
  }


def _record_manifest(runs_dsn: Optional[str], cold_root: Optional[str], manifest: dict, first: bool = False) -> None:
  """The manifest beside the output and in the ``runs`` row."""
  if cold_root:
    manifest_lib.write(cold_root, manifest)
  record = {"run_id": manifest["run_id"], "manifest": manifest, "status": manifest["status"]}
  if first:
    record.update(started_at=manifest["started_at"], code_version=manifest["code"]["git_commit"],
                  model_version=manifest["model"]["version"], rules_version=manifest["rules"]["version"],
                  reference_version=manifest["reference"]["version"],
                  schema_ids=[s["id"] for s in manifest["schemas"]], kind=manifest["kind"])
  else:
    record.update(finished_at=manifest["finished_at"], summary=manifest["summary"] or {})
  if runs_dsn:
    from txstream.io.postgres_runs import record_run
    record_run(runs_dsn, record)


def execute(options: PipelineOptions, run_id: str, kind: str = "run", window: Optional[Tuple[int, int]] = None,
            manifest_extra: Optional[dict] = None, runs_dsn: Optional[str] = None,
            sources: Sources = Sources()) -> dict:
  """Runs the graph once, bounded, with a manifest for the run; returns the summary.

  The manifest (``pipelines.manifest``) is written at the start and again at
  the end, beside the cold tier and in PostgreSQL's ``runs`` (``runs_dsn``,
  by default the warm tier's): code, model, rules, reference-data and schema
  versions, the inputs, the window, then the summary and the exit status. A
  run that fails still ends its manifest, as ``failed`` with the error.
  ``window`` = (from_ms, to_ms): only events in ``[from, to)`` are decided,
  those before are read as feature state only (a rerun); ``sources`` can
  replace the inputs (a rerun reads the raw archive).
  """
  write_tiers = preflight_tiers(options, run_id)
  cold_path = write_tiers.config.cold_path
  start = time.monotonic()
  runner = runner_for(options)
  pipeline = beam.Pipeline(runner=runner, options=options)
  outputs = build_graph(pipeline, options, sources=sources, write_tiers=write_tiers, window=window)
  runs_dsn = runs_dsn or options.view_as(TierOptions).postgres_dsn
  manifest = _start_manifest(options, run_id, kind, outputs, window, manifest_extra or {})
  _record_manifest(runs_dsn, cold_path, manifest, first=True)
  lineage.emit_run_event("START", manifest, options)
  try:
    summary = _execute(options, pipeline, runner, outputs, run_id, cold_path, start,
                       progress.expected_events(manifest["inputs"]), window, runs_dsn)
  except BaseException as e:
    manifest.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:500],
                    finished_at=manifest_lib.utc_iso(int(time.time() * 1000)))
    try:
      _record_manifest(runs_dsn, cold_path, manifest)
    except Exception:  # pylint: disable=broad-except
      _LOGGER.exception("could not record the failed run %s", run_id)
    lineage.emit_run_event("FAIL", manifest, options)
    raise
  summary["kind"] = kind
  if window:
    summary["window"] = {"from": manifest["window"]["from"], "to": manifest["window"]["to"]}
  summary.update({k: manifest[k] for k in ("rerun_of", "namespace") if k in manifest})
  manifest.update(status="succeeded", summary=summary, finished_at=manifest_lib.utc_iso(int(time.time() * 1000)))
  _record_manifest(runs_dsn, cold_path, manifest)
  lineage.emit_run_event("COMPLETE", manifest, options)
  if cold_path:
    summary["manifest"] = manifest_lib.path_for(cold_path, run_id)
  path = options.view_as(RunOptions).summary_json
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def _data_quality(options, validator, cold_path: Optional[str], run_id: str, summary: dict,
                  window: Optional[Tuple[int, int]], runs_dsn: Optional[str]) -> dict:
  """The run's data-quality result (``quality.worker``'s), onto its data-docs page and into ``dq_results``.

  ``validator`` has been sent the job (``submit``) before the cold-tier
  commit. A failed suite loses nothing: the commit has published the
  decisions all the same, and the command exits 3 (``--dq_fail_ok``: 0). A
  validation that cannot run at all counts as failed, with its error.
  """
  result = validator.result()
  if "suites" not in result:
    return result
  result["docs"] = dq_report.write_page(dq_docs_dir(options), run_id, result)
  if runs_dsn:
    try:
      dq_report.record(runs_dsn, run_id, result, result["docs"])
      result["recorded_in"] = "dq_results"
    except Exception as e:  # pylint: disable=broad-except
      # The decisions are committed regardless; the run ends as a data-quality failure (exit 3).
      _LOGGER.exception("data quality: could not record the result in dq_results")
      result.update(success=False, error=f"not recorded in dq_results: {type(e).__name__}: {e}".splitlines()[0])
  level = logging.INFO if result["success"] else logging.WARNING
  _LOGGER.log(level, "data quality: %s, %d expectations evaluated, %d failed in %.2fs; page %s",
              "passed" if result["success"] else "FAILED", result["evaluated"], result["failed"], result["seconds"],
              result["docs"])
  return result


def _execute(options, pipeline, runner, outputs, run_id: str, cold_path: Optional[str], start: float,
             expected_events: Optional[int] = None, window: Optional[Tuple[int, int]] = None,
             runs_dsn: Optional[str] = None) -> dict:
  reporter = progress.ProgressReporter(options.view_as(LiveOptions).progress_interval_s, expected_events)
  quality = check_quality(options)
  # Great Expectations imports in a process of its own while the pipeline runs (quality.worker).
  validator = dq_worker.Validator() if quality is not None else None
  with run_context(runner):
    reporter.start()
    try:
      result = pipeline.run()
      result.wait_until_finish()
    except BaseException:
      if validator is not None:
        validator.close()
      raise
    finally:
      reporter.stop()
  wall = time.monotonic() - start
  summary = summarize(counters(result), wall, outputs.model_version)
  reporter.finish(summary["events_in"], summary["scored"], wall)
  summary["run_id"] = run_id
  summary["reference_version"] = outputs.reference_version
  summary["rules_version"] = outputs.rules_version
  values, distributions = metrics.collect(result)
  summary["latency"] = metrics.run_latency(values, distributions)
  if validator is not None:
    # The child reads the staged decisions now; it validates them while the commit below publishes them.
    rules = load_rules(options.view_as(ScoreOptions).rules)
    validator.submit(cold_table.staging_path(cold_path, run_id) if cold_path else None,
                     cold_table.storage_options(options), summary, quality.path, rules.review_score,
                     rules.decline_score, window)
  if cold_path:
    # The whole graph succeeded: publish the run's staged cold-tier rows as one table version.
    committed = cold_table.commit(cold_path, run_id, options)
    summary["cold_table_version"] = committed.version
    # What the table took, not what the writers counted (a runner may drop a bundle's late counter updates).
    summary["tiers"]["cold"] = committed.inserted + committed.updated
    if outputs.archived:
      archived = {table: raw_archive.commit(cold_path, run_id, table, options)
                  for table in (raw_archive.TRANSACTIONS, raw_archive.LABELS)}
      summary["raw_archive"] = {table: {"messages": c.rows, "version": c.version} for table, c in archived.items()}
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
  summary["data_quality"] = (_data_quality(options, validator, cold_path, run_id, summary, window, runs_dsn)
                             if validator is not None else {"success": True, "skipped": "--no_dq"})
  metrics_file = options.view_as(metrics.MetricsOptions).metrics_file
  if metrics_file:
    os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
    metrics.write_textfile(metrics_file, metrics.from_run(values, distributions, summary))
    summary["metrics_file"] = metrics_file
  return summary
