"""WriteTiers: decisions to the storage tiers, dead letters to their own store.

The cold tier (Parquet) is always on unless disabled; Redis, PostgreSQL and
ClickHouse are switched on by their connection flags. Every write is an upsert
or a deterministic replace keyed on ``transaction_id``, so retries and reruns
never duplicate. Each tier counts the rows it wrote under ``tier.<name>``.

Cold and dead-letter files are grouped per partition with a lifted combiner:
each bundle pre-aggregates its rows, so the shuffle moves one list per
partition and bundle instead of one element per row.
"""
import base64
import json
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from txstream.io import parquet
from txstream.io.file_retry import RetryingFileWrite
from txstream.io.sinks import RetryPolicy, SinkResult
from txstream.records import DeadLetter, Decision
from txstream.transforms.features import FEATURE_NAMES

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"


class TierConfig(NamedTuple):
  cold_path: Optional[str]
  dead_letter_path: Optional[str]
  redis_url: Optional[str] = None
  postgres_dsn: Optional[str] = None
  clickhouse_url: Optional[str] = None
  file_tag: str = "00000"


class _WriteColdFn(beam.DoFn):
  def __init__(self, root: str, retry: RetryPolicy = RetryPolicy(), file_tag: str = "00000"):
    self._file_tag = file_tag
    self._root = root
    self._rows = Metrics.counter(NAMESPACE, "tier.cold")
    self._write = RetryingFileWrite("cold", retry)

  def process(self, partition_rows):
    partition, rows = partition_rows
    # The partition's file name is fixed, so a retried write replaces what a failed one left.
    self._rows.inc(self._write(lambda: parquet.write_rows(self._root, partition, rows, FEATURE_NAMES,
                                                                  self._file_tag), partition))
    yield partition


def dead_letter_json(letter: DeadLetter) -> str:
  return json.dumps({
      "source": letter.source, "stage": letter.stage, "reason": letter.reason,
      "error_class": letter.error_class, "message": letter.message,
      "pipeline_version": letter.pipeline_version,
      "raw_base64": base64.b64encode(letter.raw).decode() if letter.raw is not None else None,
  }, sort_keys=True)


def decision_json(d: Decision) -> str:
  """A decision as one JSON object (the decisions topic's message value; key: the transaction id)."""
  t = d.transaction
  return json.dumps({
      "transaction_id": t.transaction_id, "event_time_ms": t.event_time_ms, "customer_id": t.customer_id,
      "terminal_id": t.terminal_id, "card_token": t.card_token, "amount_minor": t.amount_minor,
      "currency": t.currency, "decision": d.decision, "score": d.score, "reason_codes": list(d.reason_codes),
      "model_version": d.model_version, "pipeline_version": d.pipeline_version, "decided_at_ms": d.decided_at_ms,
      "source": t.source,
  }, sort_keys=True)


def _decision_message(d: Decision):
  return d.transaction.transaction_id, decision_json(d).encode()


def _dead_letter_message(letter: DeadLetter):
  return letter.source, dead_letter_json(letter).encode()


class _WriteJsonToKafka(beam.PTransform):
  def __init__(self, config, topic: str, to_message):
    super().__init__()
    self._config, self._topic, self._to_message = config, topic, to_message

  def expand(self, rows):
    from txstream.io.kafka import WriteToKafka
    return rows | "ToMessage" >> beam.Map(self._to_message) | "Write" >> WriteToKafka(self._config, self._topic)


def WriteDecisionsToKafka(config, topic: str) -> beam.PTransform:  # pylint: disable=invalid-name
  """Decisions -> ``topic`` as JSON keyed by transaction id (at least once: consumers dedupe on the key)."""
  return _WriteJsonToKafka(config, topic, _decision_message)


def WriteDeadLettersToKafka(config, topic: str) -> beam.PTransform:  # pylint: disable=invalid-name
  """DeadLetters -> ``topic`` as JSON (raw bytes in base64) keyed by source position."""
  return _WriteJsonToKafka(config, topic, _dead_letter_message)


class _WriteDeadLettersFn(beam.DoFn):
  def __init__(self, root: str, retry: RetryPolicy = RetryPolicy(), file_tag: str = "00000"):
    self._name = "{stage}.jsonl" if file_tag == "00000" else "{stage}-" + file_tag + ".jsonl"
    self._root = root
    self._rows = Metrics.counter(NAMESPACE, "tier.dead_letters")
    self._write = RetryingFileWrite("dead_letters", retry)

  def process(self, stage_letters):
    stage, letters = stage_letters
    lines = sorted(dead_letter_json(x) for x in letters)
    path = FileSystems.join(self._root, self._name.format(stage=stage))
    data = ("\n".join(lines) + "\n").encode()

    def write():
      with FileSystems.create(path) as f:
        f.write(data)

    self._write(write, path)
    self._rows.inc(len(lines))
    yield stage


class WriteColdTier(beam.PTransform):
  """Decisions -> Parquet partitions (batch: one file per event hour, replaced on rerun).

  A file write that fails on a store outage is retried with ``retry``'s backoff
  (counted as ``sink.cold.retried``); replacing a whole file is idempotent.
  """
  def __init__(self, root: str, retry: RetryPolicy = RetryPolicy(), file_tag: str = "00000"):
    super().__init__()
    self._file_tag = file_tag
    if not root:
      raise ValueError("a cold tier path is required")
    self._root = root
    self._retry = retry

  def expand(self, decisions):
    return (decisions
            | "ByHour" >> beam.Map(lambda d: (parquet.partition_of(d.transaction.event_time_ms),
                                              parquet.decision_row(d)))
            | "Collect" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
            | "Write" >> beam.ParDo(_WriteColdFn(self._root, self._retry, self._file_tag)))


class WriteDeadLetters(beam.PTransform):
  """DeadLetters -> one JSON-lines file per stage, sorted, replaced on rerun (retried as the cold tier is)."""
  def __init__(self, root: str, retry: RetryPolicy = RetryPolicy(), file_tag: str = "00000"):
    super().__init__()
    self._file_tag = file_tag
    if not root:
      raise ValueError("a dead-letter path is required")
    self._root = root
    self._retry = retry

  def expand(self, letters):
    return (letters
            | "ByStage" >> beam.Map(lambda x: (x.stage, x))
            | "Collect" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
            | "Write" >> beam.ParDo(_WriteDeadLettersFn(self._root, self._retry, self._file_tag)))


class TierWrites(NamedTuple):
  """What ``WriteTiers`` returns: per tier, what it wrote; and records a store rejected."""
  written: dict
  dead_letters: beam.PCollection


class WriteTiers(beam.PTransform):
  """Decisions -> every configured tier.

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
      self._sinks["cold"] = WriteColdTier(config.cold_path, file_tag=config.file_tag)
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
    """The same tiers, naming cold-tier files ``part-<file_tag>`` (see ``parquet.write_rows``)."""
    return WriteTiers(self._config._replace(file_tag=file_tag))

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
      rejected = [decisions.pipeline | "NoRejected" >> beam.Create([]).with_output_types(DeadLetter)]
    return TierWrites(written, rejected | "Rejected" >> beam.Flatten())
