"""`txstream stream` against the real broker and Redis: live traffic in, decisions out.

Traffic is produced while the stream runs; the stream is SIGKILLed once in the
middle and restarted, then stopped the clean way (``--duration_s``, the same
path as Ctrl-C). Every valid transaction must end in Redis exactly once and on
the decisions topic at least once (distinct keys), every kind of bad input in
the dead-letter topic with its topic/partition/offset and reason, and the
committed offsets at the end of each topic.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from tests import helpers as h
from txstream.io import kafka
from txstream.pipelines import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REDIS_DB = 11

# Every kind of bad input the issue names, as (key, value, expected reason).
BAD = [
    ("bad-garbage", b"\x13garbage bytes", "bad_magic_byte"),
    ("bad-magic", b"\x07" + h.message(h.tx_record(1, h.T0))[1:], "bad_magic_byte"),
    ("bad-schema-id", b"\x00" + (999_999).to_bytes(4, "big") + h.message(h.tx_record(2, h.T0))[5:],
     "unknown_schema_id"),
    ("bad-truncated", h.message(h.tx_record(3, h.T0))[:20], "avro_decode_error"),
    ("bad-other-schema", h.label_message("tx-9", h.T0, h.T0, 1, 10), "wrong_schema"),
    ("bad-null", None, "null_value"),
    ("bad-oversized", h.message(h.tx_record(4, h.T0)) + b"\x00" * (100 << 10), "oversized_message"),
]


def _read_all(bootstrap: str, topic: str):
  """Every message of ``topic`` now (to the fetch high watermark: tansu's ListOffsets can lag behind it)."""
  consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False})
  ends = kafka.end_offsets(kafka.KafkaConfig(bootstrap, topic=topic))
  out = []
  try:
    for p, high in sorted(ends.items()):
      low = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0]
      if high <= low:
        continue
      consumer.assign([TopicPartition(topic, p, low)])
      got, deadline = 0, time.monotonic() + 30
      while got < high - low and time.monotonic() < deadline:
        for message in consumer.consume(500, 1.0):
          if message.error() is None:
            out.append(message)
            got += 1
  finally:
    consumer.close()
  return out


def _stream(argv, log_path, duration_s=None):
  args = [sys.executable, "-m", "txstream.cli", "stream"] + argv
  if duration_s:
    args.append(f"--duration_s={duration_s}")
  log = open(log_path, "ab")  # pylint: disable=consider-using-with
  return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log), log


def _wait_for(log_path, text, timeout_s=90.0):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      if text in f.read():
        return
    time.sleep(0.2)
  raise AssertionError(f"{text!r} not in {log_path} after {timeout_s} s")


@pytest.fixture
def hot(services):
  services.require("redis")
  redis.Redis(db=REDIS_DB).flushdb()
  yield f"redis://127.0.0.1:6379/{REDIS_DB}"
  redis.Redis(db=REDIS_DB).flushdb()


def test_live_stream_survives_a_kill_and_decides_every_transaction_once(services, hot, tmp_path):
  broker = services.require("kafka")
  bootstrap = f"{broker.host}:{broker.port}"
  data = str(tmp_path / "g")
  generate.generate(data, customers=150, terminals=300, days=6, start=generate.datetime.date(2018, 4, 1), seed=4)
  topic = f"it-live-{uuid.uuid4().hex[:8]}"
  labels = f"{topic}.labels"
  config = kafka.KafkaConfig(bootstrap, topic=topic)
  kafka.ensure_topic(config, topic, 2)
  kafka.ensure_topic(config, labels, 1)
  timeline = list(generate.timeline(data, topic, labels))
  step = len(timeline) // (len(BAD) + 1)
  for i, (key, value, _) in enumerate(BAD):  # bad input spread through the traffic
    timeline.insert((i + 1) * step, (key, value, None, topic))
  history, live = timeline[:len(timeline) // 3], timeline[len(timeline) // 3:]
  kafka.produce_messages(config, topic, history)

  log_path = str(tmp_path / "stream.log")
  argv = [f"--bootstrap_servers={bootstrap}", f"--topic={topic}", f"--labels_topic={labels}",
          f"--reference_dir={data}/reference", f"--redis_url={hot}", "--progress_interval_s=2"]
  producer = threading.Thread(target=kafka.produce_messages, args=(config, topic, live), kwargs={"rate": 150})
  proc, log = _stream(argv, log_path)
  try:
    _wait_for(log_path, "live hot path")
    producer.start()
    time.sleep(3.0)
    proc.send_signal(signal.SIGKILL)  # mid-traffic, mid-bundle
    assert proc.wait(30) == -signal.SIGKILL
  finally:
    log.close()
  producer.join(120)
  proc, log = _stream(argv, log_path, duration_s=25)
  try:
    assert proc.wait(120) == 0, open(log_path, encoding="utf-8").read()[-3000:]
  finally:
    log.close()

  # What should have come out, from the input topic itself.
  expected, bad_sources = set(), {}
  bad_reasons = {key: reason for key, _, reason in BAD}
  for m in _read_all(bootstrap, topic):
    source = f"{m.topic()}/{m.partition()}@{m.offset()}"
    key = m.key().decode() if m.key() else None
    if key in bad_reasons:
      bad_sources[source] = bad_reasons[key]
    else:
      expected.add(source)
  assert len(bad_sources) == len(BAD) and len(expected) > 1000

  decisions = [json.loads(m.value()) for m in _read_all(bootstrap, f"{topic}.decisions")]
  assert {d["source"] for d in decisions} == expected  # nothing lost
  assert len({d["transaction_id"] for d in decisions}) == len(expected)  # at least once, keyed
  dead = [json.loads(m.value()) for m in _read_all(bootstrap, f"{topic}.dead_letters")]
  assert {d["source"]: d["reason"] for d in dead} == bad_sources
  assert sum(1 for _ in redis.Redis(db=REDIS_DB).scan_iter("txn:*", count=1000)) == len(expected)

  ends = {topic: kafka.end_offsets(config, topic), labels: kafka.end_offsets(config, labels)}
  for name in (topic, labels):
    assert kafka.committed_offsets(config, name) == ends[name], name
