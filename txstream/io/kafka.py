"""Kafka for txstream: read, write, produce, and the offsets a run driver commits.

Reading
  ``ReadFromKafkaNative`` is a splittable DoFn over confluent-kafka that runs
  on every runner; ``ReadFromKafkaXlang`` wraps Beam's cross-language (Java)
  ``ReadFromKafka`` for Flink and Dataflow; ``ReadTransactionsFromKafka``
  picks one (``--kafka_io``). Both emit ``RawBatch``es of records, each with
  ``source = "<topic>/<partition>@<offset>"``, the undecoded value (null for
  a null value) and the Kafka record timestamp.
  Nothing is decoded or dropped here: ``DecodeAndValidate`` turns bad bytes
  into dead letters. (``kafka_read``)

Offsets
  The readers never commit. ``commit_offsets`` is for the run driver, after
  every tier has written: in batch execution the read stage finalizes before
  the downstream stages run, so a commit at read finalization could lose data
  on a crash. A bounded rerun started with ``start="committed"`` continues
  where the last complete run ended. (``kafka_offsets``)

Writing
  ``WriteToKafka`` (a PTransform) and ``produce_messages`` (a plain loop for
  ``txstream generate``), both over an idempotent producer. (here)

Settings
  ``KafkaConfig`` and the ``KafkaOptions`` flags; secrets are masked.
  (``kafka_config``)

The defaults suit tansu, the local broker, and any real Kafka. Where tansu
deviates (DESIGN.md), the code takes the route that is right on both.
"""
import logging
import time
from typing import Callable, Iterable, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from txstream.io.kafka_config import PASSWORD_ENV, KafkaConfig, KafkaConfigError, KafkaOptions
from txstream.io.kafka_offsets import (UNBOUNDED, commit_offsets, committed_offsets, end_offsets, ensure_topic,
                                       offsets_at_time, partitions)
from txstream.io.kafka_read import ReadFromKafkaNative, ReadFromKafkaXlang, ReadTransactionsFromKafka

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"

__all__ = ["KafkaConfig", "KafkaConfigError", "KafkaOptions", "KafkaWriteError", "PASSWORD_ENV", "UNBOUNDED",
           "commit_offsets", "committed_offsets", "end_offsets", "ensure_topic", "offsets_at_time", "partitions",
           "ReadFromKafkaNative", "ReadFromKafkaXlang", "ReadTransactionsFromKafka", "WriteToKafka",
           "produce_messages", "produce"]


class KafkaWriteError(RuntimeError):
  """Messages the broker did not acknowledge; raised from the bundle so the runner retries it."""


# ----------------------------------------------------------------------------------------------- writing

def _key_bytes(key) -> Optional[bytes]:
  if key is None or isinstance(key, bytes):
    return key
  return str(key).encode("utf-8")


class _DeliveryTracker:
  """Counts a producer's acknowledgements and keeps its delivery errors (librdkafka calls back from poll/flush)."""
  def __init__(self):
    self.delivered = 0
    self.errors = []

  def __call__(self, err, _msg):
    if err is not None:
      self.errors.append(err)
    else:
      self.delivered += 1


def _produce(producer, topic: str, value, key, timestamp_ms: Optional[int], on_delivery) -> None:
  """Produces one message, serving callbacks while librdkafka's local queue is full."""
  while True:
    try:
      if timestamp_ms:
        producer.produce(topic, value=value, key=_key_bytes(key), timestamp=int(timestamp_ms),
                         on_delivery=on_delivery)
      else:
        producer.produce(topic, value=value, key=_key_bytes(key), on_delivery=on_delivery)
      return
    except BufferError:
      producer.poll(0.05)


def _undelivered(topic: str, tracker: _DeliveryTracker, remaining: int, timeout_s: float) -> KafkaWriteError:
  if tracker.errors:
    first = tracker.errors[0]
    return KafkaWriteError(f"{len(tracker.errors)} message(s) to Kafka topic {topic} failed: "
                           f"{first.name()}: {first.str()}")
  return KafkaWriteError(f"{remaining} message(s) to Kafka topic {topic} not acknowledged within {timeout_s:g} s")


def _raise_undelivered(topic: str, tracker: _DeliveryTracker, remaining: int, timeout_s: float) -> None:
  if tracker.errors or remaining:
    raise _undelivered(topic, tracker, remaining, timeout_s)


class _WriteFn(beam.DoFn):
  """Produces ``(key, value)`` pairs; a bundle commits only once the broker acknowledged all of it."""
  def __init__(self, config: KafkaConfig, topic: str, flush_timeout_s: float):
    self._config = config
    self._topic = topic
    self._flush_timeout_s = flush_timeout_s
    self._written = Metrics.counter(NAMESPACE, f"kafka.{topic}.written")
    self._failed = Metrics.counter(NAMESPACE, f"kafka.{topic}.failed")
    self._producer = None
    self._tracker = None
    self._since_poll = 0

  def setup(self):
    from confluent_kafka import Producer
    self._producer = Producer(self._config.producer_config())

  def start_bundle(self):
    self._tracker = _DeliveryTracker()
    self._since_poll = 0

  def process(self, element):
    key, value = element
    _produce(self._producer, self._topic, value, key, None, self._tracker)
    self._since_poll += 1
    if self._since_poll >= 1000:  # serve delivery reports now and then so failures surface early
      self._since_poll = 0
      self._producer.poll(0)
      if self._tracker.errors:
        self._fail(0)

  def finish_bundle(self):
    remaining = self._producer.flush(self._flush_timeout_s)
    if remaining or self._tracker.errors:
      self._fail(remaining)
    self._written.inc(self._tracker.delivered)

  def _fail(self, remaining: int):
    self._failed.inc(len(self._tracker.errors) + remaining)
    error = _undelivered(self._topic, self._tracker, remaining, self._flush_timeout_s)
    # The retried bundle produces them again; what is still queued must not go out as well.
    self._producer.purge()
    self._producer.poll(0)
    raise error

  def teardown(self):
    # Every successful bundle flushed; anything still queued belongs to a failed one and will be retried.
    if self._producer is not None:
      self._producer.purge()
      self._producer.poll(0)
      self._producer = None


class WriteToKafka(beam.PTransform):
  """Writes ``(key, value)`` pairs (``key``: str, bytes or None; ``value``: bytes) to ``topic``.

  An idempotent producer (acks=all) batches the messages; each bundle flushes
  in ``finish_bundle`` and raises ``KafkaWriteError`` on any delivery error, so
  the runner retries the bundle. Delivery is at least once: a retried bundle
  produces its messages again, so consumers must treat the key (the
  transaction id) as the idempotency key. Counter ``kafka.<topic>.written``
  (namespace ``txstream``) counts acknowledged messages, ``kafka.<topic>.failed``
  the failed or unacknowledged ones of failed bundles.
  """
  def __init__(self, config: KafkaConfig, topic: Optional[str] = None, flush_timeout_s: float = 60.0):
    super().__init__()
    self._config = config
    self._topic = topic or config.topic
    if not self._topic:
      raise ValueError("WriteToKafka needs a topic")
    if flush_timeout_s <= 0:
      raise ValueError("flush_timeout_s must be positive")
    self._flush_timeout_s = flush_timeout_s

  def expand(self, pcoll):
    return pcoll | "Produce" >> beam.ParDo(_WriteFn(self._config, self._topic, self._flush_timeout_s))


def produce_messages(config: KafkaConfig, topic: str,
                     messages: Iterable[Tuple],
                     rate: Optional[float] = None, progress: Optional[Callable[[int, float], None]] = None,
                     progress_interval_s: float = 1.0, flush_timeout_s: float = 60.0) -> int:
  """Produces ``(key, value, timestamp_ms)`` triples to ``topic``; returns how many were acknowledged.

  A 4-tuple ``(key, value, timestamp_ms, other_topic)`` goes to ``other_topic``.

  ``rate`` paces the sending at that many messages per second (from the
  start, so a slow moment is caught up); ``None`` sends as fast as the broker
  takes them. ``timestamp_ms`` None or 0 lets the producer stamp the send
  time. ``progress(sent, elapsed_s)`` is called about every
  ``progress_interval_s`` and once at the end. Raises ``KafkaWriteError`` on
  the first delivery error it sees, or if messages stay unacknowledged.
  """
  from confluent_kafka import Producer
  if rate is not None and rate <= 0:
    raise ValueError("rate must be positive")
  producer = Producer(config.producer_config())
  tracker = _DeliveryTracker()
  began = time.monotonic()
  next_report = began + progress_interval_s
  sent = 0
  for item in messages:
    key, value, timestamp_ms = item[:3]
    to = item[3] if len(item) > 3 else topic
    if rate is not None:
      ahead = began + sent / rate - time.monotonic()
      if ahead > 0:
        producer.poll(ahead)  # waits while serving delivery reports
    _produce(producer, to, value, key, timestamp_ms, tracker)
    sent += 1
    if sent % 1000 == 0:
      producer.poll(0)
      if tracker.errors:
        _raise_undelivered(topic, tracker, 0, flush_timeout_s)
    if progress is not None and time.monotonic() >= next_report:
      next_report += progress_interval_s
      progress(sent, time.monotonic() - began)
  remaining = producer.flush(flush_timeout_s)
  _raise_undelivered(topic, tracker, remaining, flush_timeout_s)
  if progress is not None:
    progress(sent, time.monotonic() - began)
  return tracker.delivered


# What `txstream generate --bootstrap_servers ... --topic ...` calls.
produce = produce_messages
