"""The one graph: ReadTransactions -> DecodeAndValidate -> Enrich -> ComputeFeatures -> Score -> WriteTiers.

``build_graph`` wires the composites from parsed options and returns the
output PCollections, so tests can swap any source (``Create``, ``TestStream``)
and check any stage. Nothing here runs the pipeline.
"""
import dataclasses
import hashlib
import logging
import os
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import StandardOptions

from txstream.config.options import FeatureOptions, ScoreOptions, SourceOptions, TierOptions
from txstream.io.kafka_config import KafkaConfig, KafkaOptions
from txstream.io.kafka_read import ReadFromKafkaNative, ReadTransactionsFromKafka, parse_source
from txstream.records import DeadLetter, RawRecord
from txstream.transforms.enrich import Enrich, ReadReference, reference_version
from txstream.transforms.features import ComputeFeatures
from txstream.transforms.read import ReadLabels, ReadTransactions
from txstream.transforms.score import Score
from txstream.transforms.tiers import TierConfig, WriteDeadLetters, WriteTiers
from txstream.transforms.validate import DecodeAndValidate, DecodeLabels

_LOGGER = logging.getLogger(__name__)


class GraphOutputs(NamedTuple):
  decisions: beam.PCollection
  dead_letters: beam.PCollection
  label_dead_letters: beam.PCollection
  filtered: beam.PCollection
  tier_writes: dict
  model_version: str
  reference_version: Optional[str] = None
  kafka_ranges: Optional[dict] = None
  label_ranges: Optional[dict] = None


class Sources(NamedTuple):
  """Optional replacements for the graph's sources (tests, Kafka)."""
  raw: Optional[beam.PCollection] = None
  raw_labels: Optional[beam.PCollection] = None
  customers: Optional[beam.PCollection] = None
  terminals: Optional[beam.PCollection] = None
  reference_version: Optional[str] = None


class FeatureOutputs(NamedTuple):
  featured: beam.PCollection
  filtered: beam.PCollection
  dead_letters: beam.PCollection
  label_dead_letters: beam.PCollection
  reference_version: Optional[str] = None
  kafka_ranges: Optional[dict] = None
  label_ranges: Optional[dict] = None


_EVENTS_IN = Metrics.counter("txstream", "events_in")


def _count_in(record: RawRecord) -> RawRecord:
  if not record.source.startswith(_Current.HISTORY):
    _EVENTS_IN.inc()
  return record


class _Current:
  """Kafka history: records below a partition's start offset feed feature state only.

  They are read with their source prefixed by ``HISTORY``, so every stage
  treats them like any other record (same features, same order), and the run
  drops what they produce (decisions, dead letters, filtered duplicates)
  before scoring and writing: an earlier run already did that for them.
  """
  HISTORY = "history:"

  def __init__(self, starts: dict):
    self._starts = dict(starts)

  def mark(self, record: RawRecord) -> RawRecord:
    _, partition, offset = parse_source(record.source)
    if offset < self._starts.get(partition, 0):
      return record._replace(source=self.HISTORY + record.source)
    return record

  @classmethod
  def keep(cls, source: str) -> bool:
    return not source.startswith(cls.HISTORY)


class _DropHistory(beam.DoFn):
  """Drops what history records produced; a dropped dead letter or filtered record is taken back out of
  the counter its stage incremented, so the run's summary accounts for its own records only."""
  def __init__(self, source_of, counter_of=None):
    self._source_of = source_of
    self._counter_of = counter_of

  def process(self, element):
    if _Current.keep(self._source_of(element)):
      yield element
    elif self._counter_of is not None:
      Metrics.counter("txstream", self._counter_of(element)).dec()


def _own_outputs(current, featured, filtered, dead):
  if current is None:
    return featured, filtered, dead
  return (featured | "OwnFeatured" >> beam.ParDo(_DropHistory(lambda f: f.transaction.source)),
          filtered | "OwnFiltered" >> beam.ParDo(_DropHistory(lambda kv: kv[1].source, lambda kv: f"filtered.{kv[0]}")),
          dead | "OwnDeadLetters" >> beam.ParDo(_DropHistory(lambda d: d.source,
                                                             lambda d: f"dead_letter.{d.stage}.{d.reason}")))


def kafka_transactions(options) -> ReadTransactionsFromKafka:
  """The Kafka source the options ask for; bounded unless the pipeline is streaming.

  A bounded read starts at the group's committed offsets (``--kafka_start``)
  and stops at the end offsets fixed when the graph is built, so the driver
  knows exactly which offsets to commit once every tier has written.
  """
  flags = options.view_as(KafkaOptions)
  streaming = options.view_as(StandardOptions).streaming
  stop_at = flags.kafka_stop_at or (None if streaming or flags.kafka_stop_time_ms else "end")
  return ReadTransactionsFromKafka(
      KafkaConfig.from_options(options), kafka_io=flags.kafka_io, start=flags.kafka_start, stop_at=stop_at,
      start_time=flags.kafka_start_time_ms, stop_time=flags.kafka_stop_time_ms,
      expansion_service=flags.expansion_service)


def build_features(pipeline: beam.Pipeline, options, sources: Sources = Sources()) -> FeatureOutputs:
  """Read -> DecodeAndValidate -> Enrich -> ComputeFeatures: shared by scoring and training."""
  src = options.view_as(SourceOptions)
  feat = options.view_as(FeatureOptions)
  raw = sources.raw
  read_dead = []
  kafka_ranges = None
  current = None  # with Kafka history: whether a source position is the run's own (not history)
  if raw is None and options.view_as(KafkaOptions).topic:
    kafka_read = kafka_transactions(options)
    if hasattr(kafka_read.reader, "offset_ranges"):
      kafka_ranges = kafka_read.reader.offset_ranges()
    if options.view_as(KafkaOptions).kafka_history == "earliest" and kafka_ranges is not None:
      current = _Current({p: start for p, (start, _) in kafka_ranges.items()})
      kafka_read = ReadFromKafkaNative(KafkaConfig.from_options(options), start="earliest",
                                       stop_at={p: stop for p, (_, stop) in kafka_ranges.items()})
    raw = pipeline | "ReadTransactionsFromKafka" >> kafka_read
    if current is not None:
      raw = raw | "Marked" >> beam.Map(current.mark).with_output_types(RawRecord)
    raw = raw | "CountIn" >> beam.Map(_count_in).with_output_types(RawRecord)
  elif raw is None:
    read = pipeline | "ReadTransactions" >> ReadTransactions(src.input)
    raw, read_dead = read.records, [read.dead_letters]
  raw_labels = sources.raw_labels
  label_dead = []
  labels_topic = options.view_as(KafkaOptions).labels_topic
  label_ranges = None
  label_current = None
  if raw_labels is None and labels_topic and not src.input:
    # Every label so far (bounded: up to the end when the run starts): a run's
    # terminal features need the frauds known before its first transaction.
    # Labels below the group's committed offsets were read by an earlier run:
    # history, whose dead letters that run already wrote.
    config = dataclasses.replace(KafkaConfig.from_options(options), topic=labels_topic)
    if options.view_as(StandardOptions).streaming:
      raw_labels = pipeline | "ReadLabelsFromKafka" >> ReadFromKafkaNative(config, start="earliest")
    else:
      label_ranges = ReadFromKafkaNative(config, start="committed", stop_at="end").offset_ranges()
      label_current = _Current({p: start for p, (start, _) in label_ranges.items()})
      raw_labels = (pipeline
                    | "ReadLabelsFromKafka" >> ReadFromKafkaNative(
                        config, start="earliest", stop_at={p: stop for p, (_, stop) in label_ranges.items()})
                    | "MarkedLabels" >> beam.Map(label_current.mark).with_output_types(RawRecord))
  if raw_labels is None and src.input:
    labels_read = pipeline | "ReadLabels" >> ReadLabels(src.input)
    raw_labels, label_dead = labels_read.records, [labels_read.dead_letters]
  customers, terminals, version = sources.customers, sources.terminals, sources.reference_version
  if customers is None:
    reference_dir = src.reference_dir or os.path.join(src.input or ".", "reference")
    customers, terminals = pipeline | "ReadReference" >> ReadReference(reference_dir)
    version = reference_version(reference_dir)

  decoded = raw | "DecodeAndValidate" >> DecodeAndValidate(src.schema_registry_url)
  labels = None
  if raw_labels is not None:
    decoded_labels = raw_labels | "DecodeLabels" >> DecodeLabels(src.schema_registry_url)
    labels = decoded_labels.valid
    label_dead.append(decoded_labels.dead_letters)
  enriched = decoded.valid | "Enrich" >> Enrich(customers, terminals, version)
  bounded = not options.view_as(StandardOptions).streaming
  features = enriched.enriched | "ComputeFeatures" >> ComputeFeatures(
      labels, feat.allowed_lateness_s, feat.terminal_delay_days, bounded=bounded)
  dead = (read_dead + [decoded.dead_letters, enriched.dead_letters, features.dead_letters]
          ) | "AllDeadLetters" >> beam.Flatten()
  label_dead = (label_dead or [pipeline | "NoLabels" >> beam.Create([]).with_output_types(DeadLetter)]
                ) | "AllLabelDeadLetters" >> beam.Flatten()
  featured, filtered, dead = _own_outputs(current, features.featured, features.filtered, dead)
  if label_current is not None:
    label_dead = label_dead | "OwnLabelDeadLetters" >> beam.ParDo(
        _DropHistory(lambda d: d.source, lambda d: "label_dead_letter.decode"))
  return FeatureOutputs(featured, filtered, dead, label_dead, version, kafka_ranges, label_ranges)


def kafka_file_tag(topic: str, ranges: dict) -> str:
  """A file tag for an incremental Kafka run: the same for a retry of a run (same start offsets)."""
  starts = ",".join(f"{p}:{start}" for p, (start, _) in sorted(ranges.items()))
  return "k" + hashlib.sha1(f"{topic}|{starts}".encode()).hexdigest()[:12]


def build_tiers(options) -> WriteTiers:
  """The WriteTiers transform the options ask for (so callers can preflight it before reading)."""
  tiers = options.view_as(TierOptions)
  return WriteTiers(TierConfig(None if tiers.no_cold else tiers.cold_path, tiers.dead_letter_path,
                               tiers.redis_url, tiers.postgres_dsn, tiers.clickhouse_url))


def build_graph(pipeline: beam.Pipeline, options, sources: Sources = Sources(),
                write_tiers: Optional[WriteTiers] = None) -> GraphOutputs:
  """The whole graph; returns decisions, dead letters, filtered records and tier write results."""
  score_opts = options.view_as(ScoreOptions)
  tiers = options.view_as(TierOptions)
  # Constructing Score first checks the model and rules before anything is read.
  model_updates = None
  if score_opts.model_watch_pattern:
    if not options.view_as(StandardOptions).streaming:
      raise ValueError("--model_watch_pattern needs --streaming (a bounded run scores with one model)")
    from apache_beam.ml.inference.utils import WatchFilePattern
    model_updates = pipeline | "WatchModels" >> WatchFilePattern(file_pattern=score_opts.model_watch_pattern)
  score = Score(score_opts.model_dir, score_opts.rules, score_opts.inference_batch_size, model_updates)
  write_tiers = write_tiers or build_tiers(options)
  features = build_features(pipeline, options, sources)
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
                      features.label_ranges)
