"""Messages per second of a bounded ``ReadFromKafkaNative`` read, against the local broker (tansu).

Produces ``--messages`` small messages (``--value_bytes`` each, default 100,
about one wire-format transaction) to ``--topic`` unless it already holds at
least that many, then reads them all with ``start="earliest", stop_at="end"``
on the in-process FnApiRunner, piped into a global count:

  ``pipeline``  messages / seconds of ``run()`` to its end (the read, the count, runner overhead);
  ``resolve``   seconds to fix the offset ranges (at pipeline construction);
  ``ceiling``   a plain confluent-kafka consume loop over the same messages (no Beam).

    .venv/bin/txstream services up kafka
    .venv/bin/python benchmarks/bench_kafka_read.py --messages 200000
    .venv/bin/python benchmarks/bench_kafka_read.py --messages 200000 --partitions 2 --direct_num_workers 2
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from confluent_kafka import Consumer, TopicPartition

from txstream.io.kafka import KafkaConfig, ReadFromKafkaNative, end_offsets, ensure_topic, produce_messages


def ensure_messages(config: KafkaConfig, count: int, partitions: int, value_bytes: int) -> float:
  """Fills the topic up to ``count`` messages; returns the produce rate (0 when nothing was needed)."""
  ensure_topic(config, config.topic, partitions)
  have = sum(end_offsets(config).values())
  if have >= count:
    return 0.0
  body = os.urandom(value_bytes)
  base_ms = int(time.time() * 1000) - count
  began = time.monotonic()
  produce_messages(config, config.topic,
                   ((f"k{i}", body[:-8] + i.to_bytes(8, "big"), base_ms + i) for i in range(have, count)))
  return (count - have) / (time.monotonic() - began)


def pipeline_read(config: KafkaConfig, batch_size: int, workers: int):
  began = time.monotonic()
  read = ReadFromKafkaNative(config, start="earliest", stop_at="end", batch_size=batch_size)
  ranges = read.offset_ranges()
  resolve_s = time.monotonic() - began
  expected = sum(stop - start for start, stop in ranges.values())
  args = [f"--direct_num_workers={workers}"] + (["--direct_running_mode=multi_threading"] if workers > 1 else [])
  p = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions(args))
  counted = (p | "Read" >> read | "Count" >> beam.combiners.Count.Globally())
  _ = counted | "Check" >> beam.Map(_check, expected)
  began = time.monotonic()
  p.run().wait_until_finish()
  return expected, time.monotonic() - began, resolve_s


def _check(count, expected):
  if count != expected:
    raise AssertionError(f"read {count} messages, expected {expected}")


def ceiling_read(config: KafkaConfig, batch_size: int):
  ends = end_offsets(config)
  consumer = Consumer(config.consumer_config())
  consumer.assign([TopicPartition(config.topic, p, 0) for p in ends])
  remaining = dict(ends)
  count = 0
  began = time.monotonic()
  while any(remaining.values()):
    for message in consumer.consume(batch_size, 1.0):
      if message.error() is None and message.offset() < ends[message.partition()]:
        count += 1
        remaining[message.partition()] = max(0, ends[message.partition()] - message.offset() - 1)
  elapsed = time.monotonic() - began
  consumer.close()
  return count, elapsed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bootstrap_servers", default="127.0.0.1:9092")
  parser.add_argument("--messages", type=int, default=200_000)
  parser.add_argument("--partitions", type=int, default=1)
  parser.add_argument("--value_bytes", type=int, default=100)
  parser.add_argument("--topic", default=None, help="Default bench-read-<messages>-p<partitions>.")
  parser.add_argument("--batch_size", type=int, default=5000)
  parser.add_argument("--direct_num_workers", type=int, default=1)
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args(argv)
  topic = args.topic or f"bench-read-{args.messages}-p{args.partitions}"
  config = KafkaConfig(args.bootstrap_servers, topic=topic, group_id="txstream-bench")
  produce_rate = ensure_messages(config, args.messages, args.partitions, args.value_bytes)
  runs = []
  for _ in range(args.runs):
    count, seconds, resolve_s = pipeline_read(config, args.batch_size, args.direct_num_workers)
    runs.append({"messages": count, "seconds": round(seconds, 3), "msgs_per_s": round(count / seconds),
                 "resolve_s": round(resolve_s, 3)})
  count, seconds = ceiling_read(config, args.batch_size)
  best = max(runs, key=lambda r: r["msgs_per_s"])
  print(json.dumps({
      "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
      "topic": topic, "partitions": args.partitions, "value_bytes": args.value_bytes,
      "produce_msgs_per_s": round(produce_rate) if produce_rate else None,
      "pipeline_runs": runs, "pipeline_best_msgs_per_s": best["msgs_per_s"],
      "ceiling_consume_loop": {"messages": count, "seconds": round(seconds, 3), "msgs_per_s": round(count / seconds)},
  }, indent=2))


if __name__ == "__main__":
  main()
