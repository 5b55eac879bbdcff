"""Reading Kafka into ``RawBatch``es: a native splittable DoFn, Beam's Java reader, and the choice between them.

``ReadFromKafkaNative``
  One element per partition, ``(topic, partition, start, stop)``, whose
  restriction is ``OffsetRange(start, stop)``; ``stop`` is ``UNBOUNDED`` for a
  live read. The offsets are resolved once, in ``expand`` (or when
  ``offset_ranges()`` is first called), on the machine that builds the
  pipeline: a retried or split bundle never moves them, and the run driver can
  commit exactly the stops it read to, after every tier has written.

  Each DoFn instance owns one consumer, made in ``setup`` and ``assign``-ed to
  the partition it is reading (no group join: joins take seconds on tansu and
  would rebalance). Records come in batches; every offset is claimed before
  its record is emitted, so a split or a checkpoint never loses or repeats one.

  Watermark (``ManualWatermarkEstimator``, per partition): the largest record
  timestamp emitted so far minus ``watermark_delay_ms``. Only when a poll finds
  nothing *and* the reader has reached the partition's end does it move to
  "now" minus that delay: the end is the larger of the fetch response's high
  watermark (right on tansu, but possibly from an earlier assignment) and a
  fresh ListOffsets(latest) (a lower bound on tansu, never stale). Moving on
  anything less would declare a backlog late. A live read caught up with its
  partition checkpoints (``defer_remainder``) and is resumed by the runner; it
  also checkpoints every ``checkpoint_interval_s`` so bundles end and their
  output moves on.

``ReadFromKafkaXlang``
  Beam's cross-language ``ReadFromKafka`` (Java KafkaIO) with metadata, for
  Flink and Dataflow; unbounded only. Expanding it needs Java and a Kafka
  expansion service (``expansion_service="host:port"``, or Beam's jar, which it
  downloads or finds in ``~/.apache_beam/cache/jars``); without one it fails
  with one line.
"""
import logging
import os
import time

import numpy as np
import pyarrow as pa
from typing import Dict, Mapping, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from txstream.io.kafka_config import KafkaConfig, KafkaConfigError
from txstream.io.kafka_offsets import UNBOUNDED, Start, Stop, resolve_ranges
from txstream.core import contracts
from txstream.core.batch import RawBatch

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
_STARTS = ("committed", "earliest", "latest")

# A bounded read whose partition ends in offsets without records (compaction, transaction markers) would
# wait for them forever; after this long with the fetch high watermark at or past the stop, it finishes.
_HOLE_TIMEOUT_S = 30.0


class _OffsetTracker(OffsetRestrictionTracker):
  """``OffsetRestrictionTracker`` that knows an ``UNBOUNDED`` stop is not bounded (drain truncates it)."""
  def is_bounded(self):
    return self.current_restriction().stop < UNBOUNDED


class _PartitionRestrictions(RestrictionProvider):
  """The restriction of a ``(topic, partition, start, stop)`` element: ``OffsetRange(start, stop)``, unsplit."""
  def initial_restriction(self, element):
    return OffsetRange(element[2], element[3])

  def create_tracker(self, restriction):
    return _OffsetTracker(restriction)

  def restriction_size(self, element, restriction):
    # An open-ended restriction's backlog is unknown here; 1 keeps it schedulable without claiming it is huge.
    return 1 if restriction.stop >= UNBOUNDED else restriction.size()


_RESTRICTIONS = _PartitionRestrictions()
_WATERMARKS = ManualWatermarkEstimator.default_provider()


def _advance(watermark_estimator, to: Timestamp) -> None:
  current = watermark_estimator.current_watermark()
  if current is None or to > current:
    watermark_estimator.set_watermark(to)


class _Batch:
  """The records of one poll of one partition, emitted as one RawBatch (timestamp: the earliest record's)."""
  __slots__ = ("_prefix", "_history_below", "_offsets", "_values", "_times")

  def __init__(self, prefix: str, history_below: int):
    self._prefix, self._history_below = prefix, history_below
    self._offsets, self._values, self._times = [], [], []

  def add(self, offset: int, value: Optional[bytes], timestamp_ms: int) -> None:
    self._offsets.append(offset)
    self._values.append(value)
    self._times.append(timestamp_ms)

  def emit(self):
    if not self._offsets:
      return
    offsets = np.asarray(self._offsets, dtype=np.int64)
    sources = pa.compute.binary_join_element_wise(pa.scalar(self._prefix), pa.array(offsets).cast(pa.string()), "")
    table = pa.Table.from_arrays([sources, pa.array(self._values, pa.binary()), pa.array(self._times, pa.int64()),
                                  pa.array(offsets < self._history_below)], schema=contracts.RAW)
    yield TimestampedValue(RawBatch(table), Timestamp(micros=min(self._times) * 1000))
    self._offsets, self._values, self._times = [], [], []


class _ReadPartitionFn(beam.DoFn):
  """Reads one partition's offset range; see the module notes for claiming and the watermark."""
  def __init__(self, config: KafkaConfig, batch_size: int, poll_timeout_s: float, checkpoint_interval_s: float,
               watermark_delay_ms: int, history_below: Optional[Mapping[Tuple[str, int], int]] = None):
    self._config = config
    # Offsets below these are read as history: feature state only, decided by an earlier run.
    self._history_below = dict(history_below or {})
    self._batch_size = batch_size
    self._poll_timeout_s = poll_timeout_s
    self._checkpoint_interval_s = checkpoint_interval_s
    self._delay = Duration(micros=watermark_delay_ms * 1000)
    # One consumer per partition this instance reads, each assigned to its
    # partition once, so a resumed partition goes on with what librdkafka
    # already prefetched instead of fetching again after a reassignment.
    self._consumers = {}
    # (topic, partition) -> the offset its consumer is at and has delivered nothing past.
    self._assigned: Dict[Tuple[str, int], int] = {}
    self._consumer = None
    self._read = {}

  def teardown(self):
    for consumer in self._consumers.values():
      consumer.close()
    self._consumers, self._assigned, self._consumer = {}, {}, None

  def _counter(self, topic: str):
    if topic not in self._read:
      self._read[topic] = Metrics.counter(NAMESPACE, f"kafka.{topic}.read")
    return self._read[topic]

  def _assign(self, topic: str, partition: int, offset: int) -> None:
    """Makes ``self._consumer`` the partition's consumer, positioned at ``offset``."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = self._consumers.get((topic, partition))
    if consumer is None:
      consumer = self._consumers[(topic, partition)] = Consumer(self._config.consumer_config())
    if self._assigned.pop((topic, partition), None) != offset:
      consumer.assign([TopicPartition(topic, partition, offset)])
    # Not in _assigned until this call ends with the consumer exactly at the next unread offset.
    self._consumer = consumer

  def _poll(self):
    """Whatever is prefetched, else waits up to ``poll_timeout_s`` for the first record (consume(n, t)
    would wait the whole timeout for n)."""
    messages = self._consumer.consume(self._batch_size, 0)
    if not messages:
      messages = self._consumer.consume(1, self._poll_timeout_s)
      if messages and self._batch_size > 1:
        messages.extend(self._consumer.consume(self._batch_size - 1, 0))
    return messages

  def _end(self, topic: str, partition: int) -> int:
    """The partition's end as far as known now: see the module notes (never above the true end)."""
    from confluent_kafka import TopicPartition
    tp = TopicPartition(topic, partition)
    fetched = self._consumer.get_watermark_offsets(tp, cached=True)[1]
    listed = self._consumer.get_watermark_offsets(tp, timeout=self._poll_timeout_s * 10 + 5, cached=False)[1]
    return max(fetched, listed)

  def process(self, element, tracker=beam.DoFn.RestrictionParam(_RESTRICTIONS),
              watermark_estimator=beam.DoFn.WatermarkEstimatorParam(_WATERMARKS)):
    topic, partition = element[0], element[1]
    restriction = tracker.current_restriction()
    live = restriction.stop >= UNBOUNDED
    next_offset = restriction.start
    if next_offset >= restriction.stop:
      return
    self._assign(topic, partition, next_offset)
    prefix = f"{topic}/{partition}@"
    counter = self._counter(topic)
    checkpoint_at = time.monotonic() + self._checkpoint_interval_s
    idle_since = None
    while True:
      messages = self._poll()
      if messages:
        idle_since = None
        newest = None
        emitted = 0
        batch = _Batch(prefix, self._history_below.get((topic, partition), -1))
        for message in messages:
          error = message.error()
          if error is not None:
            if error.fatal() or not error.retriable():
              from confluent_kafka import KafkaException
              raise KafkaException(error)
            _LOGGER.warning("Kafka %s%d: %s (retrying)", prefix, next_offset, error.str())
            continue
          offset = message.offset()
          if offset < next_offset:
            continue  # delivered before an assignment took effect
          if not tracker.try_claim(offset):
            # The rest belongs to a split-off residual or lies past a bounded stop.
            counter.inc(emitted)
            yield from batch.emit()
            self._consumers.pop((topic, partition)).close()  # it has prefetched past the split; start afresh
            return
          kind, timestamp_ms = message.timestamp()
          if kind == 0:  # TIMESTAMP_NOT_AVAILABLE: a pre-0.10 record; processing time is all there is
            timestamp_ms = int(time.time() * 1000)
          if newest is None or timestamp_ms > newest:
            newest = timestamp_ms
          batch.add(offset, message.value(), timestamp_ms)
          next_offset = offset + 1
          emitted += 1
        counter.inc(emitted)
        yield from batch.emit()
        if newest is not None:
          _advance(watermark_estimator, Timestamp(micros=newest * 1000) - self._delay)
        if next_offset >= tracker.current_restriction().stop:
          self._assigned[(topic, partition)] = next_offset
          return
      else:
        end = self._end(topic, partition)
        caught_up = next_offset >= end
        if caught_up:
          _advance(watermark_estimator, Timestamp.now() - self._delay)
        if live and caught_up:
          self._assigned[(topic, partition)] = next_offset
          tracker.defer_remainder()
          return
        stop = tracker.current_restriction().stop
        if not live and end >= stop:
          idle_since = idle_since or time.monotonic()
          if time.monotonic() - idle_since > _HOLE_TIMEOUT_S:
            _LOGGER.warning("Kafka %s[%d, %d): no records though the partition ends at %d; taking them as "
                            "compacted or transaction markers", prefix, next_offset, stop, end)
            tracker.try_claim(stop)
            return
      if live and time.monotonic() >= checkpoint_at:
        self._assigned[(topic, partition)] = next_offset  # every record polled so far was handled
        tracker.defer_remainder()
        return


class _ReadLivePartitionFn(_ReadPartitionFn):
  """The same, marked as unbounded per element so runners treat its output as an unbounded PCollection."""
  @beam.DoFn.unbounded_per_element()
  def process(self, element, tracker=beam.DoFn.RestrictionParam(_RESTRICTIONS),
              watermark_estimator=beam.DoFn.WatermarkEstimatorParam(_WATERMARKS)):
    return super().process(element, tracker, watermark_estimator)


def _check_start(start) -> None:
  if isinstance(start, str):
    if start not in _STARTS:
      raise ValueError(f"start must be one of {', '.join(_STARTS)} or {{partition: offset}}, got {start!r}")
  elif not isinstance(start, Mapping):
    raise ValueError(f"start must be one of {', '.join(_STARTS)} or {{partition: offset}}, got {start!r}")


class ReadFromKafkaNative(beam.PTransform):
  """``config.topic`` -> PCollection[RawBatch], one per poll and partition, timestamped with its earliest record.

  Where to start (``start``, or ``start_time`` which replaces it) and stop
  (``stop_at`` or ``stop_time``) are described in ``kafka_offsets.resolve_ranges``:
  ``start="committed"`` falls back to the earliest offset where the group
  committed nothing; ``stop_at="end"`` fixes the end offsets once, in
  ``expand``. With neither ``stop_at`` nor ``stop_time`` the read is live
  (unbounded). Every offset in range is emitted exactly once, in offset order
  within a partition; nothing is decoded, and null values stay ``None``.
  Offsets are never committed here (``kafka_offsets.commit_offsets``).

  Partitions are those of the topic at ``expand``; partitions added later are
  not read until the pipeline is built again. Counter ``kafka.<topic>.read``.
  """
  def __init__(self, config: KafkaConfig, start: Start = "committed", stop_at: Stop = None,
               start_time: Optional[int] = None, stop_time: Optional[int] = None, batch_size: int = 5000,
               poll_timeout_s: float = 0.1, checkpoint_interval_s: float = 1.0, watermark_delay_ms: int = 0,
               resolve_timeout_s: float = 30.0, history_below: Optional[Mapping[int, int]] = None):
    """``history_below``: ``{partition: offset}``; records below it are marked ``history`` (feature state
    only: an earlier run decided them)."""
    super().__init__()
    if not config.topic:
      raise ValueError("ReadFromKafkaNative needs config.topic")
    self._history_below = {(config.topic, p): o for p, o in (history_below or {}).items()}
    _check_start(start)
    if stop_at is not None and stop_at != "end" and not isinstance(stop_at, Mapping):
      raise ValueError(f"stop_at must be None, 'end' or {{partition: offset}}, got {stop_at!r}")
    if stop_at is not None and stop_time is not None:
      raise ValueError("give stop_at or stop_time, not both")
    if start_time is not None and stop_time is not None and stop_time < start_time:
      raise ValueError(f"stop_time {stop_time} is before start_time {start_time}")
    if batch_size < 1 or poll_timeout_s <= 0 or checkpoint_interval_s <= 0 or watermark_delay_ms < 0:
      raise ValueError("batch_size >= 1, poll_timeout_s > 0, checkpoint_interval_s > 0 and "
                       "watermark_delay_ms >= 0 are required")
    self._config = config
    self._start, self._stop_at = start, stop_at
    self._start_time, self._stop_time = start_time, stop_time
    self._batch_size = batch_size
    self._poll_timeout_s = poll_timeout_s
    self._checkpoint_interval_s = checkpoint_interval_s
    self._watermark_delay_ms = watermark_delay_ms
    self._resolve_timeout_s = resolve_timeout_s
    self._ranges: Optional[Dict[int, Tuple[int, int]]] = None

  @property
  def bounded(self) -> bool:
    return self._stop_at is not None or self._stop_time is not None

  def offset_ranges(self) -> Dict[int, Tuple[int, int]]:
    """``{partition: (start, stop)}`` this read covers, resolved against the broker on the first call only.

    After a bounded run has been written by every tier, ``commit_offsets(config,
    {p: stop for p, (_, stop) in read.offset_ranges().items()})`` records how far it got.
    """
    if self._ranges is None:
      self._ranges = resolve_ranges(self._config, self._config.topic, self._start, self._stop_at,
                                    self._start_time, self._stop_time, self._resolve_timeout_s)
      _LOGGER.info("Kafka read of %s: %s", self._config.topic,
                   {p: (a, "end" if b >= UNBOUNDED else b) for p, (a, b) in self._ranges.items()})
    return dict(self._ranges)

  def expand(self, pbegin):
    topic = self._config.topic
    elements = [(topic, p, start, stop) for p, (start, stop) in sorted(self.offset_ranges().items())]
    fn_class = _ReadPartitionFn if self.bounded else _ReadLivePartitionFn
    fn = fn_class(self._config, self._batch_size, self._poll_timeout_s, self._checkpoint_interval_s,
                  self._watermark_delay_ms, self._history_below)
    return (pbegin
            | "Partitions" >> beam.Create(elements)
            | "ReadPartitions" >> beam.ParDo(fn).with_output_types(RawBatch))


class ReadPartitionsLive(beam.PTransform):
  """``{(topic, partition): start offset}`` -> PCollection[RawBatch], read live (unbounded).

  The same reader as ``ReadFromKafkaNative``, over partitions of several
  topics at once (the live hot path reads transactions and labels together).
  """
  def __init__(self, config: KafkaConfig, starts: Mapping[Tuple[str, int], int], batch_size: int = 5000,
               poll_timeout_s: float = 0.02, checkpoint_interval_s: float = 0.5, watermark_delay_ms: int = 0,
               history_below: Optional[Mapping[Tuple[str, int], int]] = None):
    super().__init__()
    if not starts:
      raise ValueError("ReadPartitionsLive needs at least one partition")
    self._config = config
    self._elements = [(topic, p, int(start), UNBOUNDED) for (topic, p), start in sorted(starts.items())]
    self._fn_args = (batch_size, poll_timeout_s, checkpoint_interval_s, watermark_delay_ms, history_below)

  def expand(self, pbegin):
    return (pbegin
            | "Partitions" >> beam.Create(self._elements)
            | "ReadPartitions" >> beam.ParDo(_ReadLivePartitionFn(self._config, *self._fn_args))
            .with_output_types(RawBatch))


def parse_source(source: str) -> Tuple[str, int, int]:
  """A Kafka source position, ``"topic/partition@offset"``, as (topic, partition, offset)."""
  head, offset = source.rsplit("@", 1)
  topic, partition = head.rsplit("/", 1)
  return topic, int(partition), int(offset)


def _to_raw(rows) -> RawBatch:
  """Beam Rows of Java KafkaIO (with metadata) as one RawBatch."""
  rows = list(rows)
  return RawBatch(pa.Table.from_arrays([
      pa.array([f"{r.topic}/{r.partition}@{r.offset}" for r in rows], pa.string()),
      pa.array([None if r.value is None else bytes(r.value) for r in rows], pa.binary()),
      pa.array([getattr(r, "timestamp", None) for r in rows], pa.int64()),
      pa.array(np.zeros(len(rows), bool))], schema=contracts.RAW))


def _expansion_failure(error: BaseException, expansion_service: Optional[str]) -> str:
  if expansion_service:
    cause = f"none answers at {expansion_service}"
  else:
    from apache_beam.io.kafka import default_io_expansion_service
    from apache_beam.utils.subprocess_server import JavaJarServer
    jar = os.path.join(JavaJarServer.JAR_CACHE, os.path.basename(default_io_expansion_service().path_to_jar))
    cause = f"Beam could not start its own (no {jar}, and it cannot be downloaded here)"
  detail = " ".join(str(error).split())[:160]
  return (f"--kafka_io=xlang needs a Kafka expansion service: {cause}; pass --expansion_service host:port or use "
          f"--kafka_io=native [{type(error).__name__}: {detail}]")


class ReadFromKafkaXlang(beam.PTransform):
  """``config.topic`` via Beam's Java KafkaIO -> PCollection[RawBatch] (unbounded; Flink, Dataflow).

  ``start``: "committed" (the group's offsets, else the earliest), "earliest"
  or "latest"; ``start_time`` (epoch ms) replaces it. Element timestamps are
  the records' CreateTime. Offsets are never committed by the reader.
  Expanding raises ``KafkaConfigError`` (one line) when no expansion service
  can be reached or started.
  """
  def __init__(self, config: KafkaConfig, start: str = "committed", start_time: Optional[int] = None,
               expansion_service: Optional[str] = None, consumer_polling_timeout_s: int = 2):
    super().__init__()
    if not config.topic:
      raise ValueError("ReadFromKafkaXlang needs config.topic")
    if start not in _STARTS:
      raise ValueError(f"--kafka_io=xlang starts at one of {', '.join(_STARTS)}, got {start!r}")
    self._config = config
    self._start = start
    self._start_time = start_time
    self._expansion_service = expansion_service
    self._polling_timeout_s = consumer_polling_timeout_s

  def _consumer_config(self) -> Dict[str, str]:
    if self._start == "committed":
      return self._config.java_consumer_config(**{"group.id": self._config.group_id,
                                                  "auto.offset.reset": "earliest"})
    return self._config.java_consumer_config(**{"auto.offset.reset": self._start})

  def expand(self, pbegin):
    import grpc
    from apache_beam.io.kafka import ReadFromKafka
    read = ReadFromKafka(consumer_config=self._consumer_config(), topics=[self._config.topic], with_metadata=True,
                         start_read_time=self._start_time, commit_offset_in_finalize=False,
                         timestamp_policy=ReadFromKafka.create_time_policy,
                         consumer_polling_timeout=self._polling_timeout_s, expansion_service=self._expansion_service)
    try:
      rows = pbegin | "ReadFromKafka" >> read
    except (RuntimeError, OSError, grpc.RpcError) as e:
      raise KafkaConfigError(_expansion_failure(e, self._expansion_service)) from e
    return (rows
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=5000, max_batch_duration_secs=0.1)
            | "ToRawBatch" >> beam.Map(_to_raw).with_output_types(RawBatch))


class ReadTransactionsFromKafka(beam.PTransform):
  """The transactions topic as RawBatches, through ``kafka_io`` "native" (default) or "xlang".

  "xlang" reads live only: a bounded read (``stop_at``, ``stop_time``) or
  explicit start offsets need "native", and asking for them is a ``ValueError``.
  ``native_options`` go to ``ReadFromKafkaNative`` (batch_size, poll_timeout_s, ...).
  """
  def __init__(self, config: KafkaConfig, kafka_io: str = "native", start: Start = "committed",
               stop_at: Stop = None, start_time: Optional[int] = None, stop_time: Optional[int] = None,
               expansion_service: Optional[str] = None, **native_options):
    super().__init__()
    if kafka_io == "native":
      self._read = ReadFromKafkaNative(config, start=start, stop_at=stop_at, start_time=start_time,
                                       stop_time=stop_time, **native_options)
    elif kafka_io == "xlang":
      if stop_at is not None or stop_time is not None or not isinstance(start, str):
        raise ValueError("--kafka_io=xlang reads live only: a bounded or offset-exact read needs --kafka_io=native")
      self._read = ReadFromKafkaXlang(config, start=start, start_time=start_time,
                                      expansion_service=expansion_service)
    else:
      raise ValueError(f"kafka_io must be 'native' or 'xlang', got {kafka_io!r}")

  @property
  def reader(self) -> Union[ReadFromKafkaNative, ReadFromKafkaXlang]:
    """The chosen reader (``offset_ranges()`` on the native one tells a driver what to commit)."""
    return self._read

  def expand(self, pbegin):
    return pbegin | "Read" >> self._read
