"""WriteTiers: decision batches to the storage tiers; dead letters to their own store.

The cold tier (Parquet) is on unless disabled; Redis, PostgreSQL and
ClickHouse are switched on by their connection flags. Every write is an upsert
or a replace keyed on ``transaction_id`` or on a deterministic file name, so
retries and reruns never duplicate. Each tier counts the rows it wrote under
``tier.<name>``.
"""
import io
import logging
import os
import tempfile
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import polars as pl
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from txstream.core import dead_letters
from txstream.core.batch import DeadLetterBatch, DecisionBatch, split_by
from txstream.io import cold_table, parquet
from txstream.io.file_retry import RetryingFileWrite
from txstream.io.sinks import RetryPolicy, SinkConfigError, SinkResult, one_line
from txstream.transforms import counting
from txstream.transforms.features import SHARDS

_LOGGER = logging.getLogger(__name__)
DEFAULT_TAG = "00000"


class TierConfig(NamedTuple):
  cold_path: Optional[str]
  dead_letter_path: Optional[str]
  redis_url: Optional[str] = None
  postgres_dsn: Optional[str] = None
  clickhouse_url: Optional[str] = None
  file_tag: str = DEFAULT_TAG
  run_id: str = "run"  # names the cold tier's staging directory; the run driver commits it


class _WriteColdFn(beam.DoFn):
  """Appends each batch's rows to the writer's file of their event day; publishes the files per bundle.

  Files go to the run's staging directory (``io.cold_table``), named after
  the terminal shards the bundle held (each shard is in exactly one bundle),
  so concurrent writers never share a name and a retried bundle replaces its
  own files.
  """
  def __init__(self, staging: str, retry: RetryPolicy):
    self._root = staging
    self._write = RetryingFileWrite("cold", retry)

  def start_bundle(self):
    self._files = parquet.DayFiles(self._root)
    self._shards = set()

  def process(self, batch: DecisionBatch):
    table = batch.table
    self._shards.update(np.unique(table.column("terminal_id").to_numpy() % SHARDS).tolist())
    for day, rows in split_by(table, parquet.event_days(table)):
      self._files.write(day, rows)

  def finish_bundle(self):
    if not self._shards:
      return
    name = f"s{min(self._shards):02d}-{max(self._shards):02d}"
    try:
      counting.inc("tier.cold", self._files.publish(name, self._write))
    finally:
      self._files.discard()

  def teardown(self):
    files = getattr(self, "_files", None)
    if files is not None:
      files.discard()


# In key order: the JSON objects come out with sorted keys.
_JSON_COLUMNS = sorted(("transaction_id", "event_time_ms", "customer_id", "terminal_id", "card_token", "amount_minor",
                        "currency", "decision", "score", "reason_codes", "model_version", "rules_version",
                        "pipeline_version", "decided_at_ms", "source"))


def decision_messages(decisions: DecisionBatch):
  """(transaction id, JSON value) per decision: the decisions topic's messages.

  The JSON lines are written by polars for the whole batch (a json.dumps per
  row cost the live hot path a third of its time).
  """
  table = decisions.table.select(_JSON_COLUMNS)
  buffer = io.BytesIO()
  pl.from_arrow(table).write_ndjson(buffer)
  yield from zip(table.column("transaction_id").to_pylist(), buffer.getvalue().splitlines())


def dead_letter_messages(letters: DeadLetterBatch):
  """(source position, JSON value with the raw bytes in base64) per dead letter."""
  for row in letters.table.to_pylist():
    yield row["source"], dead_letters.to_json(row).encode()


class _WriteJsonToKafka(beam.PTransform):
  def __init__(self, config, topic: str, to_messages):
    super().__init__()
    self._config, self._topic, self._to_messages = config, topic, to_messages

  def expand(self, batches):
    from txstream.io.kafka import WriteToKafka
    return (batches | "ToMessages" >> beam.FlatMap(self._to_messages)
            | "Write" >> WriteToKafka(self._config, self._topic))


def WriteDecisionsToKafka(config, topic: str) -> beam.PTransform:  # pylint: disable=invalid-name
  """DecisionBatches -> ``topic`` as JSON keyed by transaction id (at least once: consumers dedupe on the key)."""
  return _WriteJsonToKafka(config, topic, decision_messages)


def WriteDeadLettersToKafka(config, topic: str) -> beam.PTransform:  # pylint: disable=invalid-name
  """DeadLetterBatches -> ``topic`` as JSON (raw bytes in base64) keyed by source position."""
  return _WriteJsonToKafka(config, topic, dead_letter_messages)


class _WriteDeadLettersFn(beam.DoFn):
  def __init__(self, root: str, retry: RetryPolicy, file_tag: str):
    self._name = "{stage}.jsonl" if file_tag == DEFAULT_TAG else "{stage}-" + file_tag + ".jsonl"
    self._root = root
    self._write = RetryingFileWrite("dead_letters", retry)

  def process(self, stage_batches):
    stage, batches = stage_batches
    lines = sorted(dead_letters.to_json(row) for row in DeadLetterBatch.concat(batches).table.to_pylist())
    path = FileSystems.join(self._root, self._name.format(stage=stage))
    data = ("\n".join(lines) + "\n").encode()

    def write():
      with FileSystems.create(path) as f:
        f.write(data)

    self._write(write, path)
    counting.inc("tier.dead_letters", len(lines))
    yield stage


def _by_stage(batch: DeadLetterBatch):
  table = batch.table
  for stage in sorted(set(table.column("stage").to_pylist())):
    yield stage, DeadLetterBatch(table.filter(pc.equal(table.column("stage"), stage)))


def check_writable(path: str, what: str, options=None) -> None:
  """Raises ``SinkConfigError`` (one line) when the folder ``path`` cannot be written; leaves nothing behind.

  A path that cannot be written would otherwise fail the run only once its
  data has been read and decided. Local: the folder, or the nearest existing folder
  on the way to it, must take a probe file (created and removed at once;
  no folder is created). ``s3://``: a HEAD of the bucket with Beam's S3 flags
  from ``options`` (an object's write permission shows at the first write).
  Other schemes are left to the write.
  """
  if path.startswith("s3://"):
    _check_bucket(path, what, options)
  elif "://" not in path:
    _check_local_folder(path, what)


def _check_local_folder(path: str, what: str) -> None:
  existing = os.path.abspath(path)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise SinkConfigError(f"{what} {path}: {existing} is not a folder")
  try:
    with tempfile.NamedTemporaryFile(dir=existing, prefix=".txstream-probe-"):
      pass
  except OSError as error:
    raise SinkConfigError(f"{what} {path}: cannot write in {existing}: {error.strerror or error}") from None


def _check_bucket(path: str, what: str, options) -> None:
  from apache_beam.io.aws.clients.s3 import boto3_client
  from apache_beam.options.pipeline_options import PipelineOptions
  from botocore import exceptions as boto
  bucket = path[len("s3://"):].split("/", 1)[0]
  if not bucket:
    raise SinkConfigError(f"{what} {path}: no bucket")
  try:
    boto3_client.Client(options or PipelineOptions()).client.head_bucket(Bucket=bucket)
  except boto.ClientError as error:
    status = error.response.get("Error", {}).get("Code", "")
    reason = {"404": "no such bucket", "NoSuchBucket": "no such bucket",
              "403": "access denied"}.get(status, one_line(error))
    raise SinkConfigError(f"{what} {path}: S3 bucket {bucket!r}: {reason}") from None
  except boto.BotoCoreError as error:
    raise SinkConfigError(f"{what} {path}: cannot reach S3: {one_line(error)}") from None


class WriteColdTier(beam.PTransform[beam.PCollection[DecisionBatch], beam.PCollection]):
  """DecisionBatches -> the run's staged Parquet files, one per event day and writer, published per bundle.

  ``io.cold_table.commit(root, run_id)`` merges them into the Delta table
  once the whole run has succeeded. A write that fails on a store outage is
  retried with ``retry``'s backoff (counted as ``sink.cold.retried``);
  publishing replaces a whole file, which is idempotent.
  """
  def __init__(self, root: str, run_id: str, retry: RetryPolicy = RetryPolicy()):
    super().__init__()
    if not root:
      raise ValueError("a cold tier path is required")
    self._staging = cold_table.staging_path(root, run_id)
    self._retry = retry

  def expand(self, decisions):
    return decisions | "Write" >> beam.ParDo(_WriteColdFn(self._staging, self._retry))


class WriteDeadLetters(beam.PTransform[beam.PCollection[DeadLetterBatch], beam.PCollection]):
  """DeadLetterBatches -> one JSON-lines file per stage, sorted, replaced on rerun (retried as the cold tier is)."""
  def __init__(self, root: str, retry: RetryPolicy = RetryPolicy(), file_tag: str = DEFAULT_TAG):
    super().__init__()
    if not root:
      raise ValueError("a dead-letter path is required")
    self._root = root
    self._retry = retry
    self._file_tag = file_tag

  def expand(self, letters):
    return (letters
            | "ByStage" >> beam.FlatMap(_by_stage).with_output_types(Tuple[str, DeadLetterBatch])
            | "Collect" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteDeadLettersFn(self._root, self._retry, self._file_tag)))


class TierWrites(NamedTuple):
  """What ``WriteTiers`` returns: per tier, what it wrote; and records a store rejected."""
  written: dict
  dead_letters: beam.PCollection


class WriteTiers(beam.PTransform[beam.PCollection[DecisionBatch], TierWrites]):
  """DecisionBatches -> every configured tier.

  The cold tier is on when ``cold_path`` is set; Redis, PostgreSQL and
  ClickHouse when their URL or DSN is. ``preflight()`` checks every server
  tier (connects once, applies migrations and DDL) and raises
  ``SinkConfigError`` with one line; call it before reading any data.
  """
  def __init__(self, config: TierConfig):
    super().__init__()
    self._config = config
    self._sinks = {}
    if config.cold_path:
      self._sinks["cold"] = WriteColdTier(config.cold_path, config.run_id)
    if config.redis_url:
      from txstream.io.redis_sink import WriteToRedis
      self._sinks["hot"] = WriteToRedis(config.redis_url)
    if config.postgres_dsn:
      from txstream.io.postgres_sink import WriteToPostgres
      self._sinks["warm"] = WriteToPostgres(config.postgres_dsn)
    if config.clickhouse_url:
      from txstream.io.clickhouse_sink import WriteToClickHouse
      self._sinks["analytics"] = WriteToClickHouse(config.clickhouse_url)

  def with_file_tag(self, file_tag: str) -> "WriteTiers":
    """The same tiers, naming dead-letter files ``<stage>-<file_tag>.jsonl``."""
    return WriteTiers(self._config._replace(file_tag=file_tag))

  @property
  def config(self) -> TierConfig:
    return self._config

  @property
  def tiers(self):
    return sorted(self._sinks)

  def preflight(self) -> None:
    for sink in self._sinks.values():
      if hasattr(sink, "preflight"):
        sink.preflight()

  def expand(self, decisions):
    written, rejected = {}, []
    for name, sink in self._sinks.items():
      result = decisions | f"Write_{name}" >> sink
      if isinstance(result, SinkResult):
        written[name] = result.written
        rejected.append(result.dead_letters)
      else:
        written[name] = result
    if not rejected:
      rejected = [decisions.pipeline | "NoRejected" >> beam.Create([]).with_output_types(DeadLetterBatch)]
    return TierWrites(written, rejected | "Rejected" >> beam.Flatten())
