"""Rows per second each storage sink sustains alone, against the real local servers.

Two figures per sink:
  ``dofn``      the sink's DoFn driven directly (setup, process, finish_bundle):
                what the sink itself costs, with no Beam runner around it;
  ``pipeline``  decisions generated inside a pipeline on the in-process
                FnApiRunner, fused with the sink as in a bounded run; the same
                pipeline with a no-op in place of the sink is the baseline, and
                ``sink_rows_per_s`` is rows / (seconds - baseline_seconds).

Each run writes fresh transaction ids into a scratch store (Redis db 14,
PostgreSQL database ``txstream_bench``, ClickHouse database ``txstream_bench``),
which it empties before and after.

    .venv/bin/python benchmarks/bench_sinks.py --rows 100000
    .venv/bin/python benchmarks/bench_sinks.py --rows 20000 --sinks redis,postgres --modes dofn
"""
import argparse
import json
import os
import sys
import time
from typing import Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import apache_beam as beam
import psycopg2
import redis
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from clickhouse_driver import Client

from tests.integration.sink_fixtures import make_decisions
from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.io.postgres_sink import WriteToPostgres
from txstream.io.redis_sink import WriteToRedis

REDIS_URL = "redis://127.0.0.1:6379/14"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=txstream_bench"
CH_URL = "clickhouse://127.0.0.1:9000/txstream_bench"


def reset(sink: str) -> None:
  if sink == "redis":
    redis.Redis.from_url(REDIS_URL).flushdb()
  elif sink == "postgres":
    admin = psycopg2.connect(PG_ADMIN)
    admin.autocommit = True
    with admin.cursor() as cur:
      cur.execute("DROP DATABASE IF EXISTS txstream_bench WITH (FORCE)")
      cur.execute("CREATE DATABASE txstream_bench")
    admin.close()
  elif sink == "clickhouse":
    Client("127.0.0.1", port=9000).execute("DROP DATABASE IF EXISTS txstream_bench")


def transform(sink: str):
  if sink == "redis":
    return WriteToRedis(REDIS_URL)
  if sink == "postgres":
    return WriteToPostgres(PG_DSN)
  return WriteToClickHouse(CH_URL)


def bench_dofn(sink: str, decisions) -> float:
  t = transform(sink)
  t.preflight()
  fn = t._fn  # pylint: disable=protected-access
  fn.setup()
  fn.start_bundle()
  start = time.perf_counter()
  for d in decisions:
    for _ in fn.process(d):
      pass
  for _ in fn.finish_bundle():
    pass
  elapsed = time.perf_counter() - start
  fn.teardown()
  return elapsed


def _generate(args):
  chunk, rows, prefix = args
  return make_decisions(rows, prefix=f"{prefix}-{chunk}", customers=10_000, days=30)


def _pipeline_seconds(rows: int, prefix: str, sink_transform) -> float:
  """Decisions generated inside the pipeline (no coder round trip through Create), then the sink."""
  chunk = 5_000
  chunks = [(i, min(chunk, rows - i * chunk), prefix) for i in range((rows + chunk - 1) // chunk)]
  p = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))
  decisions = p | beam.Create(chunks) | beam.FlatMap(_generate)
  _ = decisions | sink_transform
  start = time.perf_counter()
  p.run().wait_until_finish()
  return time.perf_counter() - start


def bench_pipeline(sink: str, rows: int) -> Tuple[float, float]:
  """(seconds with the sink, seconds of the same pipeline with a no-op in its place)."""
  t = transform(sink)
  t.preflight()
  with_sink = _pipeline_seconds(rows, "pipeline", t)
  baseline = _pipeline_seconds(rows, "baseline", beam.Map(lambda d: None))
  return with_sink, baseline


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--rows", type=int, default=50_000)
  parser.add_argument("--sinks", default="redis,postgres,clickhouse")
  parser.add_argument("--modes", default="dofn,pipeline")
  args = parser.parse_args(argv)
  results = []
  for sink in args.sinks.split(","):
    for mode in args.modes.split(","):
      reset(sink)
      if mode == "dofn":
        elapsed = bench_dofn(sink, make_decisions(args.rows, prefix="dofn", customers=10_000, days=30))
        figures = {"seconds": round(elapsed, 3), "rows_per_s": round(args.rows / elapsed)}
      else:
        elapsed, baseline = bench_pipeline(sink, args.rows)
        figures = {"seconds": round(elapsed, 3), "baseline_seconds": round(baseline, 3),
                   "rows_per_s": round(args.rows / elapsed),
                   "sink_rows_per_s": round(args.rows / max(elapsed - baseline, 1e-9))}
      results.append({"sink": sink, "mode": mode, "rows": args.rows, **figures})
      print(json.dumps(results[-1]), flush=True)
    reset(sink)  # leave no scratch data behind
  print("command: .venv/bin/python benchmarks/bench_sinks.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
  main()
