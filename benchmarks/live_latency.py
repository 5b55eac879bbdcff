"""Live mode latency: produce at a steady rate, time each decision from produce to the decisions topic.

    .venv/bin/python benchmarks/live_latency.py                          # 2,000 ev/s for 60 s
    .venv/bin/python benchmarks/live_latency.py --rates 1000,2000,4000,8000 --seconds 30
    .venv/bin/python benchmarks/live_latency.py --redis_url redis://127.0.0.1:6379/14
    .venv/bin/python benchmarks/live_latency.py -- --live_checkpoint_ms=20   # flags for `txstream stream`
    .venv/bin/python benchmarks/live_latency.py --backlog --rates 30000 --seconds 7   # throughput on a backlog

For each rate: a fresh topic (3 partitions) and labels topic; the first
``--history_days`` of generated traffic are produced up front and replayed by
`txstream stream` as feature history (``--warmup history``); then the stream
runs while the rest is produced at the rate for ``--seconds``. A consumer
reads the decisions topic as they come; latency = the moment a decision is
received minus the input record's Kafka timestamp (its produce time), so it
covers broker, read, decode, features, model, rules, the sinks' flush and the
broker again. The stream's own in-process latency (record batch fetched ->
decision produced, over the whole run) is read from its progress log.
Needs `txstream services up kafka` (and Redis for --redis_url).
"""
import argparse
import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from confluent_kafka import Consumer, TopicPartition

from txstream.io import kafka
from txstream.pipelines import generate


def _collect(bootstrap, topic, partitions, received, stop):
  consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 50})
  consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
  while not stop.is_set():
    for message in consumer.consume(1000, 0.1):
      if message.error() is None:
        received.append((time.time() * 1000, json.loads(message.value())["source"]))
  consumer.close()


def _produce_times(bootstrap, topic):
  """{source: produce timestamp ms} of every record of ``topic``."""
  ends = kafka.end_offsets(kafka.KafkaConfig(bootstrap, topic=topic))
  consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False})
  out = {}
  for p, high in ends.items():
    consumer.assign([TopicPartition(topic, p, 0)])
    got = 0
    while got < high:
      for m in consumer.consume(5000, 1.0):
        if m.error() is None:
          out[f"{topic}/{p}@{m.offset()}"] = m.timestamp()[1]
          got += 1
  consumer.close()
  return out


def run_rate(args, data, rate):
  bootstrap = args.bootstrap_servers
  topic = f"bench-live-{uuid.uuid4().hex[:8]}"
  labels = f"{topic}.labels"
  config = kafka.KafkaConfig(bootstrap, topic=topic)
  kafka.ensure_topic(config, topic, 3)
  kafka.ensure_topic(config, labels, 1)
  kafka.ensure_topic(config, f"{topic}.decisions", 3)
  history_end = int(datetime.datetime(2018, 4, 1, tzinfo=datetime.timezone.utc).timestamp() * 1000
                    + args.history_days * 86_400_000)
  history = list(generate.timeline(data, topic, labels, stop_ms=history_end))
  live = list(itertools.islice(generate.timeline(data, topic, labels, start_ms=history_end),
                               int(rate * args.seconds)))
  kafka.produce_messages(config, topic, history)
  # As after a restart: the history is committed, so the stream replays it as feature state only.
  for name in (topic, labels):
    kafka.commit_offsets(config, kafka.end_offsets(config, name), topic=name)
  if args.backlog:  # the live traffic waits in the topic: the stream's own throughput, no producer beside it
    kafka.produce_messages(config, topic, live)
  log_path = os.path.join(args.work, f"stream-{rate}.log")
  log = open(log_path, "wb")  # pylint: disable=consider-using-with
  argv = [sys.executable, "-m", "txstream.cli", "stream", f"--bootstrap_servers={bootstrap}", f"--topic={topic}",
          f"--labels_topic={labels}", f"--reference_dir={data}/reference", "--progress_interval_s=5"]
  if args.redis_url:
    argv.append(f"--redis_url={args.redis_url}")
  argv += args.stream_args
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log)
  started = time.monotonic()
  while time.monotonic() - started < 600:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if "feature history replayed" in text or "no feature history" in text:
      break
    if proc.poll() is not None:
      raise SystemExit(f"txstream stream exited early; see {log_path}")
    time.sleep(0.2)
  warmup_s = time.monotonic() - started
  received, stop = [], threading.Event()
  collector = threading.Thread(target=_collect, args=(bootstrap, f"{topic}.decisions", 3, received, stop))
  collector.start()
  began = time.monotonic()
  if not args.backlog:
    kafka.produce_messages(config, topic, live, rate=rate)
  produce_s = time.monotonic() - began
  deadline = time.monotonic() + args.drain_s
  expected = sum(1 for item in live if item[3] == topic)
  while len(received) < expected and time.monotonic() < deadline:
    time.sleep(0.2)
  drained_s = time.monotonic() - began
  proc.send_signal(signal.SIGINT)
  proc.wait(60)
  stop.set()
  collector.join()
  log.close()
  produced = _produce_times(bootstrap, topic)
  latencies = np.array([at - produced[source] for at, source in received if source in produced])
  with open(log_path, encoding="utf-8", errors="replace") as f:
    in_process = re.findall(r"in-process \(fetched -> decided\) over the run p50 (\d+) ms p99 (\d+) ms", f.read())
  p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (float("nan"),) * 3
  return {"rate": rate, "history_events": len(history), "start_and_replay_s": round(warmup_s, 1),
          "live_events": expected, "decided": len(received), "produce_s": round(produce_s, 1),
          "all_decided_after_s": round(drained_s, 1) if len(received) >= expected else None,
          "decided_per_s": round(len(received) / drained_s) if drained_s else None,
          "p50_ms": round(float(p50)), "p95_ms": round(float(p95)), "p99_ms": round(float(p99)),
          "max_ms": round(float(latencies.max())) if len(latencies) else None,
          "in_process_p50_ms": int(in_process[-1][0]) if in_process else None,
          "in_process_p99_ms": int(in_process[-1][1]) if in_process else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rates", default="2000", help="Comma-separated events/s (default 2000).")
  parser.add_argument("--seconds", type=float, default=60.0, help="Seconds of live traffic per rate.")
  parser.add_argument("--history_days", type=int, default=7, help="Days produced up front as feature history.")
  parser.add_argument("--customers", type=int, default=5000)
  parser.add_argument("--terminals", type=int, default=10000)
  parser.add_argument("--days", type=int, default=30)
  parser.add_argument("--drain_s", type=float, default=60.0, help="Wait this long for the backlog after producing.")
  parser.add_argument("--redis_url", default=None, help="Also write the hot tier (Redis).")
  parser.add_argument("--backlog", action="store_true",
                      help="Produce the live traffic before the stream starts and time how fast it is decided "
                           "(the hot path's own throughput; --rates then only sizes the traffic).")
  parser.add_argument("--bootstrap_servers", default="127.0.0.1:9092")
  parser.add_argument("stream_args", nargs="*", help="Extra flags for `txstream stream` (after --).")
  parser.add_argument("--work", default=os.path.join(ROOT, "data", "bench-live"))
  args = parser.parse_args(argv)
  data = os.path.join(args.work, f"g-{args.customers}-{args.days}")
  if not os.path.exists(os.path.join(data, "manifest.json")):
    generate.generate(data, args.customers, args.terminals, args.days, datetime.date(2018, 4, 1), seed=0)
  for rate in (float(r) for r in args.rates.split(",")):
    print(json.dumps(run_rate(args, data, rate)), flush=True)
  print("command: .venv/bin/python benchmarks/live_latency.py " + " ".join(sys.argv[1:] if argv is None else argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
