"""The one graph: ReadTransactions -> DecodeAndValidate -> Enrich -> ComputeFeatures -> Score -> WriteTiers.

``build_graph`` wires the composites from parsed options and returns the
output PCollections (of batches), so tests can swap any source (``Create``,
``TestStream``) and check any stage. Nothing here runs the pipeline.
"""
import dataclasses
import hashlib
import logging
import os
from typing import Dict, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from txstream.core.batch import DeadLetterBatch
from txstream.core.enrich import Reference
from txstream.config.options import FeatureOptions, ScoreOptions, SourceOptions, TierOptions
from txstream.io.kafka_config import KafkaConfig, KafkaOptions
from txstream.io import raw_archive
from txstream.io.kafka_read import ReadFromKafkaNative, ReadTransactionsFromKafka
from txstream.transforms.enrich import Enrich
from txstream.transforms.features import ComputeFeatures
from txstream.transforms.read import ReadFromSource, ReadLabels, ReadResult, ReadTransactions
from txstream.transforms.score import Score
from txstream.transforms.tiers import TierConfig, WriteDeadLetters, WriteTiers
from txstream.transforms.validate import DecodeAndValidate, DecodeLabels, EventWindow

_LOGGER = logging.getLogger(__name__)

Ranges = Dict[int, Tuple[int, int]]


class GraphOutputs(NamedTuple):
  decisions: beam.PCollection      # DecisionBatch
  dead_letters: beam.PCollection   # DeadLetterBatch of the transactions
  label_dead_letters: beam.PCollection
  filtered: beam.PCollection       # TransactionBatch of exact duplicates
  tier_writes: dict
  model_version: str
  reference_version: Optional[str] = None
  kafka_ranges: Optional[Ranges] = None
  label_ranges: Optional[Ranges] = None
  rules_version: Optional[str] = None
  archived: bool = False  # the run staged its accepted messages for the raw archive


class Sources(NamedTuple):
  """Optional replacements for the graph's sources (tests): PCollections of RawBatch, in-memory reference data."""
  raw: Optional[beam.PCollection] = None
  raw_labels: Optional[beam.PCollection] = None
  reference: Optional[Reference] = None
  archive: Optional[Tuple[str, Optional[int]]] = None  # (cold root, end ms): read its raw archive (a rerun)


class FeatureOutputs(NamedTuple):
  featured: beam.PCollection
  filtered: beam.PCollection
  dead_letters: beam.PCollection
  label_dead_letters: beam.PCollection
  reference_version: Optional[str] = None
  kafka_ranges: Optional[Ranges] = None
  label_ranges: Optional[Ranges] = None
  archive: Tuple[beam.PCollection, ...] = ()  # (transactions, labels) ArchiveBatches when archiving


class _KafkaSources(NamedTuple):
  transactions: beam.PTransform
  labels: Optional[beam.PTransform]
  ranges: Optional[Ranges]
  label_ranges: Optional[Ranges]


def _kafka_sources(options) -> _KafkaSources:
  """The Kafka reads the options ask for: bounded unless streaming; history marked for feature state.

  A bounded read starts at the group's committed offsets (``--kafka_start``)
  and stops at the end offsets fixed here, so the driver knows exactly which
  offsets to commit once every tier has written. With ``--kafka_history
  earliest`` it also reads each partition from its earliest offset, the
  records below the start marked as history: they go through every stage for
  feature state, and their outcomes (an earlier run's) are dropped. Labels:
  every label so far, those below the group's offsets as history.
  """
  flags = options.view_as(KafkaOptions)
  config = KafkaConfig.from_options(options)
  streaming = options.view_as(StandardOptions).streaming
  stop_at = flags.kafka_stop_at or (None if streaming or flags.kafka_stop_time_ms else "end")
  read = ReadTransactionsFromKafka(config, kafka_io=flags.kafka_io, start=flags.kafka_start, stop_at=stop_at,
                                   start_time=flags.kafka_start_time_ms, stop_time=flags.kafka_stop_time_ms,
                                   expansion_service=flags.expansion_service)
  ranges = read.reader.offset_ranges() if hasattr(read.reader, "offset_ranges") else None
  if ranges is not None and flags.kafka_history == "earliest":
    read = ReadFromKafkaNative(config, start="earliest", stop_at={p: stop for p, (_, stop) in ranges.items()},
                               history_below={p: start for p, (start, _) in ranges.items()})
  labels, label_ranges = None, None
  if flags.labels_topic:
    label_config = dataclasses.replace(config, topic=flags.labels_topic)
    if streaming:
      labels = ReadFromKafkaNative(label_config, start="earliest")
    else:
      label_ranges = ReadFromKafkaNative(label_config, start="committed", stop_at="end").offset_ranges()
      labels = ReadFromKafkaNative(label_config, start="earliest",
                                   stop_at={p: stop for p, (_, stop) in label_ranges.items()},
                                   history_below={p: start for p, (start, _) in label_ranges.items()})
  return _KafkaSources(read, labels, ranges, label_ranges)


def _reads(pipeline: beam.Pipeline, options, sources: Sources):
  """(transactions ReadResult, labels ReadResult or None, Kafka ranges, label ranges)."""
  src = options.view_as(SourceOptions)
  kafka = _kafka_sources(options) if sources.raw is None and options.view_as(KafkaOptions).topic else None
  if sources.raw is not None:
    raw = ReadResult(sources.raw, pipeline | "NoReadDeadLetters" >> beam.Create([]).with_output_types(DeadLetterBatch))
  elif sources.archive is not None:
    raw = pipeline | "ReadTransactions" >> ReadFromSource(
        raw_archive.ReadArchive(sources.archive[0], raw_archive.TRANSACTIONS, sources.archive[1], options))
  elif kafka is not None:
    raw = pipeline | "ReadTransactions" >> ReadFromSource(kafka.transactions)
  else:
    raw = pipeline | "ReadTransactions" >> ReadTransactions(src.input)
  labels = None
  if sources.raw_labels is not None:
    labels = ReadResult(sources.raw_labels,
                        pipeline | "NoLabelReadDeadLetters" >> beam.Create([]).with_output_types(DeadLetterBatch))
  elif sources.archive is not None:
    labels = pipeline | "ReadLabels" >> ReadFromSource(
        raw_archive.ReadArchive(sources.archive[0], raw_archive.LABELS, sources.archive[1], options), "labels")
  elif kafka is not None and kafka.labels is not None:
    labels = pipeline | "ReadLabels" >> ReadFromSource(kafka.labels, "labels")
  elif src.input:
    labels = pipeline | "ReadLabels" >> ReadLabels(src.input)
  return raw, labels, kafka.ranges if kafka else None, kafka.label_ranges if kafka else None


def build_features(pipeline: beam.Pipeline, options, sources: Sources = Sources(),
                   window: Optional[Tuple[int, int]] = None, archive: bool = False) -> FeatureOutputs:
  """Read -> DecodeAndValidate -> Enrich -> ComputeFeatures: shared by scoring and training.

  ``window`` = (from_ms, to_ms) decides only the events in ``[from, to)``,
  those before read as feature state (``EventWindow``). ``archive`` also
  returns the accepted messages for the raw archive (``io.raw_archive``).
  """
  src = options.view_as(SourceOptions)
  feat = options.view_as(FeatureOptions)
  raw, raw_labels, kafka_ranges, label_ranges = _reads(pipeline, options, sources)
  if sources.reference is not None:
    enrich = Enrich(reference=sources.reference)
  else:
    enrich = Enrich(src.reference_dir or os.path.join(src.input or ".", "reference"))
  decoded = raw.records | "DecodeAndValidate" >> DecodeAndValidate(src.schema_registry_url, archive)
  archived = (decoded.archive,) if archive else ()
  labels, label_dead = None, []
  if raw_labels is not None:
    decoded_labels = raw_labels.records | "DecodeLabels" >> DecodeLabels(src.schema_registry_url, archive)
    labels, label_dead = decoded_labels.valid, [raw_labels.dead_letters, decoded_labels.dead_letters]
    archived += (decoded_labels.archive,) if archive else ()
  valid = decoded.valid
  if window is not None:
    valid = valid | "EventWindow" >> EventWindow(*window)
  enriched = valid | "Enrich" >> enrich
  features = enriched.enriched | "ComputeFeatures" >> ComputeFeatures(
      labels, feat.allowed_lateness_s, feat.terminal_delay_days,
      bounded=not options.view_as(StandardOptions).streaming)
  dead = ((raw.dead_letters, decoded.dead_letters, enriched.dead_letters, features.dead_letters)
          | "AllDeadLetters" >> beam.Flatten())
  label_dead = (label_dead or [pipeline | "NoLabels" >> beam.Create([]).with_output_types(DeadLetterBatch)]
                ) | "AllLabelDeadLetters" >> beam.Flatten()
  return FeatureOutputs(features.featured, features.filtered, dead, label_dead, enrich.reference_version,
                        kafka_ranges, label_ranges, archived)


def kafka_file_tag(topic: str, ranges: Ranges) -> str:
  """A file tag for an incremental Kafka run: the same for a retry of a run (same start offsets)."""
  starts = ",".join(f"{p}:{start}" for p, (start, _) in sorted(ranges.items()))
  return "k" + hashlib.sha1(f"{topic}|{starts}".encode()).hexdigest()[:12]


def build_tiers(options, run_id: str = "run") -> WriteTiers:
  """The WriteTiers transform the options ask for (so callers can preflight it before reading)."""
  tiers = options.view_as(TierOptions)
  return WriteTiers(TierConfig(None if tiers.no_cold else tiers.cold_path, tiers.dead_letter_path,
                               tiers.redis_url, tiers.postgres_dsn, tiers.clickhouse_url, run_id=run_id))


def _score(pipeline: beam.Pipeline, options) -> Score:
  score_opts = options.view_as(ScoreOptions)
  model_updates = None
  if score_opts.model_watch_pattern:
    if not options.view_as(StandardOptions).streaming:
      raise ValueError("--model_watch_pattern needs --streaming (a bounded run scores with one model)")
    from apache_beam.ml.inference.utils import WatchFilePattern
    model_updates = pipeline | "WatchModels" >> WatchFilePattern(file_pattern=score_opts.model_watch_pattern)
  return Score(score_opts.model_dir, score_opts.rules, model_updates)


def build_graph(pipeline: beam.Pipeline, options, sources: Sources = Sources(),
                write_tiers: Optional[WriteTiers] = None, window: Optional[Tuple[int, int]] = None) -> GraphOutputs:
  """The whole graph; returns decisions, dead letters, filtered records and tier write results."""
  tiers = options.view_as(TierOptions)
  score = _score(pipeline, options)  # checks the model and rules before anything is read
  write_tiers = write_tiers or build_tiers(options)
  cold_path = write_tiers.config.cold_path
  # A bounded run archives its accepted messages; the run driver commits them (``io.raw_archive``).
  archive = (bool(cold_path) and window is None and not tiers.no_raw_archive
             and not options.view_as(StandardOptions).streaming)
  features = build_features(pipeline, options, sources, window, archive)
  if archive:
    for table, rows in zip((raw_archive.TRANSACTIONS, raw_archive.LABELS), features.archive):
      rows | f"Archive_{table}" >> raw_archive.StageArchive(cold_path, write_tiers.config.run_id, table)
  decisions = features.featured | "Score" >> score
  file_tag = "00000"
  if features.kafka_ranges is not None:
    file_tag = kafka_file_tag(options.view_as(KafkaOptions).topic, features.kafka_ranges)
    write_tiers = write_tiers.with_file_tag(file_tag)
  writes = decisions | "WriteTiers" >> write_tiers
  written = dict(writes.written)
  all_dead = ((features.dead_letters, features.label_dead_letters, writes.dead_letters)
              | "DeadAndLabelDead" >> beam.Flatten())
  if tiers.dead_letter_path:
    written["dead_letters"] = all_dead | "WriteDeadLetters" >> WriteDeadLetters(tiers.dead_letter_path,
                                                                              file_tag=file_tag)
  kafka_flags = options.view_as(KafkaOptions)
  if kafka_flags.decisions_topic or kafka_flags.dead_letter_topic:
    from txstream.transforms.tiers import WriteDeadLettersToKafka, WriteDecisionsToKafka
    config = KafkaConfig.from_options(options)
    if kafka_flags.decisions_topic:
      decisions | "DecisionsToKafka" >> WriteDecisionsToKafka(config, kafka_flags.decisions_topic)
    if kafka_flags.dead_letter_topic:
      all_dead | "DeadLettersToKafka" >> WriteDeadLettersToKafka(config, kafka_flags.dead_letter_topic)
  if tiers.postgres_dsn:
    from txstream.io.postgres_sink import WriteDeadLettersToPostgres
    written["warm_dead_letters"] = (
        all_dead | "WriteDeadLettersToPostgres" >> WriteDeadLettersToPostgres(tiers.postgres_dsn)).written
  return GraphOutputs(decisions, features.dead_letters, features.label_dead_letters, features.filtered, written,
                      score.model_version, features.reference_version, features.kafka_ranges,
                      features.label_ranges, score.rules_version, archive)
