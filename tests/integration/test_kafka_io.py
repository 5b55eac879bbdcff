"""txstream.io.kafka against the real local broker (tansu, ``services.require("kafka")``).

Every test works on topics and a consumer group of its own (uuid names), so
tests never see each other's messages or offsets.
"""
import logging
import os
import pickle
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp
from confluent_kafka import Consumer, TopicPartition

from txstream.io import kafka
from txstream.io.kafka import (KafkaConfig, KafkaConfigError, ReadFromKafkaNative, ReadFromKafkaXlang,
                               ReadTransactionsFromKafka, WriteToKafka)
from tests import helpers as h
from txstream.io.kafka_read import _OffsetTracker, _ReadLivePartitionFn, _to_raw

BASE_MS = 1_700_000_000_000
SECRET = "hunter2-do-not-log"


@pytest.fixture(scope="module")
def bootstrap(services):
  return services.require("kafka").url


@pytest.fixture
def new_topic(bootstrap):
  """``new_topic(partitions)`` -> a KafkaConfig on a fresh topic with a fresh consumer group."""
  def make(partitions: int = 1) -> KafkaConfig:
    name = f"it-kafka-{uuid.uuid4().hex[:10]}"
    config = KafkaConfig(bootstrap, topic=name, group_id=f"g-{name}")
    assert kafka.ensure_topic(config, name, partitions) == partitions
    return config
  return make


def pipeline() -> TestPipeline:
  return TestPipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))


# The in-process FnApiRunner unpickles _Collect by reference, so it appends to this very dict.
_COLLECTED = {}


class _Collect(beam.DoFn):
  def __init__(self, token: str):
    self._token = token

  def process(self, batch, timestamp=beam.DoFn.TimestampParam):
    rows = _rows(batch)
    # A batch is timestamped with its earliest record.
    assert timestamp.micros // 1000 == min(t for _, _, t in rows)
    _COLLECTED[self._token].extend(rows)


def _rows(batch) -> list:
  """(source, value, timestamp_ms) of each record of a RawBatch."""
  return h.rows(batch, "source", "value", "timestamp_ms")


def _at(ms: int) -> Timestamp:
  return Timestamp(micros=ms * 1000)


def read_all(read) -> list:
  """Runs ``read`` on the FnApiRunner and returns (source, value, timestamp_ms) of every record."""
  token = uuid.uuid4().hex
  _COLLECTED[token] = []
  p = pipeline()
  _ = p | "Read" >> read | "Collect" >> beam.ParDo(_Collect(token))
  p.run().wait_until_finish()
  return _COLLECTED.pop(token)


def produce(config: KafkaConfig, values, partition=None, timestamps=None):
  """Produces ``values`` (to one partition when given), timestamps BASE_MS + i unless given; waits for acks."""
  from confluent_kafka import Producer
  producer = Producer(config.producer_config())
  for i, value in enumerate(values):
    kwargs = {"partition": partition} if partition is not None else {}
    producer.produce(config.topic, value=value, key=f"k{i}".encode(),
                     timestamp=timestamps[i] if timestamps else BASE_MS + i, **kwargs)
  assert producer.flush(30) == 0


# ----------------------------------------------------------------------------------------------- bounded reads

def test_bounded_read_emits_every_message_undecoded_with_its_position_and_timestamp(new_topic):
  config = new_topic(1)
  values = [b"\x00\x00\x00\x00\x02avro-body-%d" % i for i in range(20)]
  values[3] = b"\xffgarbage\x00\x01"       # not the wire format: DecodeAndValidate's business
  values[7] = None                         # a null value (tombstone)
  values[11] = b""                         # empty, not null
  values[15] = os.urandom(900_000)         # close to the default 1 MB message limit
  produce(config, values, partition=0)
  read = ReadFromKafkaNative(config, start="earliest", stop_at="end")
  assert read.offset_ranges() == {0: (0, 20)}
  produce(config, [b"after-the-end-was-fixed"], partition=0)  # the stop is fixed once: not read

  got = read_all(read)

  assert sorted(got) == sorted((f"{config.topic}/0@{i}", v, BASE_MS + i) for i, v in enumerate(values))
  assert [v for s, v, _ in got if s.endswith("@7")] == [None]


def test_bounded_read_through_assert_that(new_topic):
  config = new_topic(1)
  produce(config, [b"a", None, b"\x00\x00\x00\x00\x01x"], partition=0)
  p = pipeline()
  records = p | ReadFromKafkaNative(config, start="earliest", stop_at="end")
  assert_that(h.flat(records, "Rows", "source", "value"),
              equal_to([(f"{config.topic}/0@0", b"a"), (f"{config.topic}/0@1", None),
                        (f"{config.topic}/0@2", b"\x00\x00\x00\x00\x01x")]))
  p.run().wait_until_finish()


def test_three_partitions_every_offset_read_exactly_once(new_topic):
  config = new_topic(3)
  counts = {0: 120, 1: 0, 2: 77}  # one partition empty
  for partition, n in counts.items():
    produce(config, [f"p{partition}-{i}".encode() for i in range(n)], partition=partition)
  assert kafka.end_offsets(config) == counts

  got = read_all(ReadFromKafkaNative(config, start="earliest", stop_at="end", batch_size=50))

  sources = [s for s, _, _ in got]
  assert len(sources) == len(set(sources)) == sum(counts.values())
  assert sorted(sources) == sorted(f"{config.topic}/{p}@{i}" for p, n in counts.items() for i in range(n))
  assert all(v == f"p{s.split('/')[1].split('@')[0]}-{s.split('@')[1]}".encode() for s, v, _ in got)


def test_end_offsets_are_the_fetch_high_watermark(new_topic):
  config = new_topic(1)
  for batch in range(3):  # three produce requests: three record batches in the log
    produce(config, [b"x"] * 10, partition=0)
  consumer = Consumer(config.consumer_config())
  try:
    listed = consumer.get_watermark_offsets(TopicPartition(config.topic, 0), timeout=10, cached=False)[1]
  finally:
    consumer.close()
  # tansu answers ListOffsets(latest) with the last batch's base offset + 1 (21); Kafka with 30.
  assert listed <= 30
  assert kafka.end_offsets(config) == {0: 30}


# ----------------------------------------------------------------------------------------------- offsets

def test_start_from_committed_offsets_reads_only_what_is_new(new_topic):
  config = new_topic(2)
  produce(config, [b"old-%d" % i for i in range(10)], partition=0)
  produce(config, [b"old-%d" % i for i in range(4)], partition=1)
  assert kafka.committed_offsets(config) == {0: None, 1: None}

  first = ReadFromKafkaNative(config, start="committed", stop_at="end")  # nothing committed: earliest
  assert len(read_all(first)) == 14
  # The driver commits only after every tier wrote; here, right after the run.
  kafka.commit_offsets(config, {p: stop for p, (_, stop) in first.offset_ranges().items()})
  assert kafka.committed_offsets(config) == {0: 10, 1: 4}  # read back through a new consumer

  produce(config, [b"new-%d" % i for i in range(3)], partition=0)
  got = read_all(ReadFromKafkaNative(config, start="committed", stop_at="end"))

  assert sorted((s, v) for s, v, _ in got) == [(f"{config.topic}/0@{10 + i}", b"new-%d" % i) for i in range(3)]
  other_group = KafkaConfig(config.bootstrap_servers, topic=config.topic, group_id=config.group_id + "-other")
  assert kafka.committed_offsets(other_group) == {0: None, 1: None}


def test_start_time_and_stop_time_select_by_record_timestamp(new_topic):
  config = new_topic(2)
  # Partition 0: one record per second; partition 1: every other second.
  produce(config, [b"a%d" % i for i in range(30)], partition=0, timestamps=[BASE_MS + 1000 * i for i in range(30)])
  produce(config, [b"b%d" % i for i in range(15)], partition=1,
          timestamps=[BASE_MS + 2000 * i for i in range(15)])

  assert kafka.offsets_at_time(config, BASE_MS + 10_000) == {0: 10, 1: 5}
  assert kafka.offsets_at_time(config, BASE_MS + 10_500) == {0: 11, 1: 6}
  assert kafka.offsets_at_time(config, BASE_MS + 10 ** 9) == {0: 30, 1: 15}  # later than any record: the end
  read = ReadFromKafkaNative(config, start_time=BASE_MS + 10_000, stop_time=BASE_MS + 20_000)
  assert read.offset_ranges() == {0: (10, 20), 1: (5, 10)}

  got = read_all(read)

  assert sorted(ts for _, _, ts in got) == sorted([BASE_MS + 1000 * i for i in range(10, 20)]
                                                  + [BASE_MS + 2000 * i for i in range(5, 10)])
  # A stop time later than every record stops at the end offsets found when the read starts.
  assert ReadFromKafkaNative(config, start="earliest", stop_time=BASE_MS + 10 ** 9).offset_ranges() == {
      0: (0, 30), 1: (0, 15)}


def test_a_missing_topic_is_one_line(bootstrap):
  config = KafkaConfig(bootstrap, topic=f"it-kafka-missing-{uuid.uuid4().hex[:8]}")
  with pytest.raises(KafkaConfigError, match="does not exist") as raised:
    ReadFromKafkaNative(config, stop_at="end").offset_ranges()
  assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------------------------- writing

def test_write_then_read_back(new_topic):
  config = new_topic(2)
  pairs = [(f"tx-{i:03d}", b"alert-%d" % i) for i in range(200)]
  p = pipeline()
  _ = p | beam.Create(pairs) | WriteToKafka(config)
  result = p.run()
  result.wait_until_finish()
  written = [c.committed for c in result.metrics().query()["counters"]
             if c.key.metric.name == f"kafka.{config.topic}.written"]
  assert sum(written) == 200

  got = read_all(ReadFromKafkaNative(config, start="earliest", stop_at="end"))
  assert sorted(v for _, v, _ in got) == sorted(v for _, v in pairs)
  consumer = Consumer(config.consumer_config())
  try:  # keys travel too: the same key always lands in the same partition
    consumer.assign([TopicPartition(config.topic, p, 0) for p in (0, 1)])
    keyed = {}
    while len(keyed) < 200:
      for message in consumer.consume(500, 1.0):
        keyed[message.key().decode()] = (message.value(), message.partition())
  finally:
    consumer.close()
  assert {k: v for k, (v, _) in keyed.items()} == dict(pairs)


def test_write_fails_the_bundle_when_the_broker_does_not_acknowledge():
  unreachable = KafkaConfig("127.0.0.1:1", topic="nowhere")
  p = pipeline()
  _ = p | beam.Create([("k", b"v")]) | WriteToKafka(unreachable, flush_timeout_s=1)
  with pytest.raises(Exception, match="1 message.s. to Kafka topic nowhere not acknowledged within 1 s"):
    p.run().wait_until_finish()


def test_produce_messages_paces_and_reports(new_topic):
  config = new_topic(1)
  reports = []
  began = time.monotonic()
  sent = kafka.produce_messages(config, config.topic, ((f"k{i}", b"v%d" % i, BASE_MS + i) for i in range(60)),
                                rate=200, progress=lambda n, s: reports.append(n), progress_interval_s=0.1)
  elapsed = time.monotonic() - began
  assert sent == 60
  assert 0.25 <= elapsed < 5  # 60 messages at 200/s take ~0.3 s
  assert reports[-1] == 60 and len(reports) >= 2
  assert kafka.end_offsets(config) == {0: 60}


# ----------------------------------------------------------------------------------------------- live reads

class _LiveRead:
  """Calls the live DoFn's ``process`` the way a runner does: a real tracker, a deferred residual."""
  def __init__(self, config: KafkaConfig, **kwargs):
    self.fn = _ReadLivePartitionFn(config, kwargs.get("batch_size", 100), kwargs.get("poll_timeout_s", 0.1),
                                   kwargs.get("checkpoint_interval_s", 1.0), 0)
    self.fn.setup()
    self.topic = config.topic
    self.watermark = ManualWatermarkEstimator(None)

  def call(self, restriction: OffsetRange):
    tracker = ThreadsafeRestrictionTracker(_OffsetTracker(restriction))
    outputs = []
    element = (self.topic, 0, restriction.start, restriction.stop)
    for output in self.fn.process(element, RestrictionTrackerView(tracker), self.watermark):
      # The watermark never passes a record still to be emitted (timestamps rise with the offsets here).
      current = self.watermark.current_watermark()
      assert current is None or current <= output.timestamp, (current, output.timestamp)
      outputs.append(output)
    tracker.check_done()
    deferred = tracker.deferred_status()
    return [row for output in outputs for row in _rows(output.value)], (deferred[0] if deferred else None)

  def close(self):
    self.fn.teardown()


def test_live_read_defers_when_caught_up_and_moves_the_watermark_only_at_the_end(new_topic):
  config = new_topic(1)
  old_ms = int(time.time() * 1000) - 3_600_000
  produce(config, [b"m%d" % i for i in range(250)], partition=0, timestamps=[old_ms + i for i in range(250)])
  before = Timestamp.now()
  # Checkpoints after every poll; polls so short that many come back empty while a fetch is on its way,
  # which is when a reader that trusted a stale or too low end would take itself for caught up.
  behind = _LiveRead(config, batch_size=100, checkpoint_interval_s=1e-6, poll_timeout_s=0.001)
  try:
    seen, residual = [], OffsetRange(0, kafka.UNBOUNDED)
    for _ in range(1000):
      outputs, residual = behind.call(residual)
      seen.extend(outputs)
      assert residual == OffsetRange(len(seen), kafka.UNBOUNDED)  # every call checkpoints, nothing is lost
      if len(seen) == 250:
        break
      # Behind the end: at most the newest record's timestamp, never "now".
      assert behind.watermark.current_watermark() in (None, _at(seen[-1][2]) if seen else None)
    assert [source for source, _, _ in seen] == [f"{config.topic}/0@{i}" for i in range(250)]
    assert behind.watermark.current_watermark() == _at(seen[-1][2])
  finally:
    behind.close()

  live = _LiveRead(config, checkpoint_interval_s=30.0, poll_timeout_s=0.001)
  try:
    began = time.monotonic()
    outputs, residual = live.call(residual)
    # Caught up: checkpointed at once (not after 30 s), nothing claimed, and only now the watermark is "now".
    assert outputs == [] and residual == OffsetRange(250, kafka.UNBOUNDED) and time.monotonic() - began < 5
    assert live.watermark.current_watermark() >= before

    # New records after the consumer cached the old end (250): read, not taken for "caught up".
    fresh_ms = int(time.time() * 1000) + 60_000
    produce(config, [b"n%d" % i for i in range(20)], partition=0, timestamps=[fresh_ms + i for i in range(20)])
    outputs, residual = live.call(residual)
    assert [(source, value) for source, value, _ in outputs] == [(f"{config.topic}/0@{250 + i}", b"n%d" % i)
                                                                 for i in range(20)]
    assert residual == OffsetRange(270, kafka.UNBOUNDED)
  finally:
    live.close()


def test_live_read_of_an_empty_partition_defers_with_the_watermark_at_now(new_topic):
  live = _LiveRead(new_topic(1))
  try:
    before = Timestamp.now()
    outputs, residual = live.call(OffsetRange(0, kafka.UNBOUNDED))
    assert outputs == [] and residual == OffsetRange(0, kafka.UNBOUNDED)
    assert live.watermark.current_watermark() >= before
  finally:
    live.close()


# ----------------------------------------------------------------------------------------------- xlang

def _expansion_error(config, **kwargs) -> str:
  p = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))
  with pytest.raises(KafkaConfigError) as raised:
    _ = p | ReadTransactionsFromKafka(config, kafka_io="xlang", **kwargs)
  return str(raised.value)


def test_xlang_without_an_expansion_service_fails_with_one_line(new_topic):
  from apache_beam.io.kafka import default_io_expansion_service
  from apache_beam.utils.subprocess_server import JavaJarServer
  jar = os.path.join(JavaJarServer.JAR_CACHE, os.path.basename(default_io_expansion_service().path_to_jar))
  if os.path.exists(jar):
    pytest.skip(f"{jar} is cached here, so Beam can start its own expansion service")
  message = _expansion_error(new_topic(1))
  assert message.startswith("--kafka_io=xlang needs a Kafka expansion service")
  assert "--expansion_service host:port" in message and jar in message and "\n" not in message


def test_xlang_with_an_unreachable_expansion_service_fails_with_one_line(new_topic):
  message = _expansion_error(new_topic(1), expansion_service="127.0.0.1:1")
  assert "none answers at 127.0.0.1:1" in message and "\n" not in message


def test_xlang_refuses_bounded_reads(new_topic):
  with pytest.raises(ValueError, match="--kafka_io=native"):
    ReadTransactionsFromKafka(new_topic(1), kafka_io="xlang", stop_at="end")


def test_xlang_rows_become_a_raw_batch():
  # The Row KafkaIO's RowsWithMetadata emits (Java field names).
  row = beam.Row(topic="tx", partition=2, offset=41, timestamp=BASE_MS, key=b"k", value=b"\x00v", headers=[],
                 timestampTypeId=0, timestampTypeName="CreateTime")
  assert _rows(_to_raw([row, beam.Row(topic="tx", partition=2, offset=42, timestamp=BASE_MS + 1, value=None)])) == [
      ("tx/2@41", b"\x00v", BASE_MS), ("tx/2@42", None, BASE_MS + 1)]


# ----------------------------------------------------------------------------------------------- secrets

def test_secrets_are_masked_in_repr_logs_and_the_pickled_pipeline(new_topic, caplog, monkeypatch):
  base = new_topic(1)
  explicit = KafkaConfig(base.bootstrap_servers, topic=base.topic, security_protocol="SASL_SSL",
                         sasl_mechanism="SCRAM-SHA-512", sasl_username="svc", sasl_password=SECRET,
                         extra=(("sasl.oauthbearer.client.secret", SECRET),))
  assert SECRET not in repr(explicit) and SECRET not in str(explicit) and "***" in repr(explicit)
  assert explicit.consumer_config()["sasl.password"] == SECRET  # the client itself gets it
  assert SECRET in explicit.java_consumer_config()["sasl.jaas.config"]

  monkeypatch.setenv(kafka.PASSWORD_ENV, SECRET)
  from_env = KafkaConfig.from_env({"TXSTREAM_KAFKA_BOOTSTRAP_SERVERS": base.bootstrap_servers,
                                   "TXSTREAM_KAFKA_TOPIC": base.topic, "TXSTREAM_KAFKA_SASL_PASSWORD": SECRET})
  assert from_env.sasl_password is None  # read where the client is made, so not pickled with the pipeline
  read = ReadFromKafkaNative(from_env, start="earliest", stop_at="end")
  assert SECRET.encode() not in pickle.dumps(read)

  caplog.set_level(logging.DEBUG)
  plaintext_with_password = KafkaConfig(base.bootstrap_servers, topic=base.topic, sasl_password=SECRET)
  logging.getLogger("test").info("config %s %r", plaintext_with_password, plaintext_with_password)
  produce(base, [b"x"], partition=0)
  assert len(read_all(ReadFromKafkaNative(plaintext_with_password, start="earliest", stop_at="end"))) == 1
  assert caplog.records and not [r for r in caplog.records if SECRET in r.getMessage()]


def test_options_and_config_validation():
  from txstream.io.kafka import KafkaOptions
  options = PipelineOptions(["--bootstrap_servers=h1:9092,h2:9092", "--topic=tx", "--group_id=g",
                             "--kafka_security_protocol=SASL_SSL", "--kafka_sasl_mechanism=PLAIN",
                             "--kafka_sasl_username=svc", "--kafka_io=xlang"])
  config = KafkaConfig.from_options(options, environ={})
  assert (config.bootstrap_servers, config.topic, config.group_id, config.sasl_username) == (
      "h1:9092,h2:9092", "tx", "g", "svc")
  assert options.view_as(KafkaOptions).kafka_io == "xlang"
  assert PipelineOptions([]).get_all_options()["kafka_start"] == "committed"  # no flag clashes with Beam's
  with pytest.raises(KafkaConfigError, match="SASL mechanism"):
    KafkaConfig("h:1", security_protocol="SASL_SSL")
  with pytest.raises(KafkaConfigError, match="security protocol"):
    KafkaConfig("h:1", security_protocol="TLS")
  with pytest.raises(ValueError, match="stop_at or stop_time"):
    ReadFromKafkaNative(KafkaConfig("h:1", topic="t"), stop_at="end", stop_time=1)
  with pytest.raises(ValueError, match="start must be"):
    ReadFromKafkaNative(KafkaConfig("h:1", topic="t"), start="newest")
  with pytest.raises(ValueError, match="kafka_io"):
    ReadTransactionsFromKafka(KafkaConfig("h:1", topic="t"), kafka_io="java")
  with pytest.raises(ValueError, match="needs config.topic"):
    ReadFromKafkaXlang(KafkaConfig("h:1"))
