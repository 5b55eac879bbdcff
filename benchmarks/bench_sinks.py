"""Rows per second each storage sink sustains alone, against the real local servers.

Elements are ``DecisionBatch``es of ``--batch_rows`` rows (default 10,000), as
the batch graph hands them to ``WriteTiers``. Two figures per sink:
  ``dofn``      the sink's DoFn driven directly (setup, process, finish_bundle):
                what the sink itself costs, with no Beam runner around it;
  ``pipeline``  batches generated inside a pipeline on the in-process
                FnApiRunner, fused with the sink as in a bounded run; the same
                pipeline with a no-op in place of the sink is the baseline, and
                ``sink_rows_per_s`` is rows / (seconds - baseline_seconds).

Every figure is the median of ``--repeats`` runs (best in ``best_rows_per_s``);
each run writes fresh transaction ids into a scratch store it empties first
(Redis db 14, PostgreSQL database ``txstream_bench``, ClickHouse database
``txstream_bench``), and everything is emptied at the end. Sinks use their
default batch sizes (Redis 10,000, PostgreSQL 10,000, ClickHouse 100,000 rows).
``--customers`` (default 10,000) sets how many customers the rows spread
over: at 10,000, a 10,000-row batch holds one row per customer, the Redis
tier's worst case (three recent-set commands for every decision).

    .venv/bin/python benchmarks/bench_sinks.py --rows 100000
    .venv/bin/python benchmarks/bench_sinks.py --rows 20000 --sinks redis,postgres --modes dofn
    .venv/bin/python benchmarks/bench_sinks.py --sinks redis --customers 1000   # 10 rows per customer per batch
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import apache_beam as beam
import psycopg2
import redis
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from clickhouse_driver import Client

from tests.integration.sink_fixtures import make_decisions
from txstream.core.batch import DecisionBatch
from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.io.postgres_sink import WriteToPostgres
from txstream.io.redis_sink import WriteToRedis

REDIS_URL = "redis://127.0.0.1:6379/14"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=txstream_bench"
CH_URL = "clickhouse://127.0.0.1:9000/txstream_bench"
DAYS = 30


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


def bench_dofn(sink: str, batches: List[DecisionBatch]) -> float:
  t = transform(sink)
  t.preflight()
  fn = t._fn  # pylint: disable=protected-access
  fn.setup()
  fn.start_bundle()
  start = time.perf_counter()
  for batch in batches:
    for _ in fn.process(batch):
      pass
  for _ in fn.finish_bundle():
    pass
  elapsed = time.perf_counter() - start
  fn.teardown()
  return elapsed


def _generate(args) -> List[DecisionBatch]:
  chunk, rows, prefix, customers = args
  return make_decisions(rows, prefix=f"{prefix}-{chunk}", customers=customers, days=DAYS)


def _pipeline_seconds(rows: int, batch_rows: int, customers: int, prefix: str, sink_transform) -> float:
  """Batches generated inside the pipeline (no coder round trip through Create), then the sink."""
  chunks = [(i, min(batch_rows, rows - i * batch_rows), prefix, customers)
            for i in range((rows + batch_rows - 1) // batch_rows)]
  p = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))
  batches = p | beam.Create(chunks) | beam.FlatMap(_generate).with_output_types(DecisionBatch)
  _ = batches | sink_transform
  start = time.perf_counter()
  p.run().wait_until_finish()
  return time.perf_counter() - start


def bench_pipeline(sink: str, rows: int, batch_rows: int, customers: int, run: int) -> Tuple[float, float]:
  """(seconds with the sink, seconds of the same pipeline with a no-op in its place)."""
  t = transform(sink)
  t.preflight()
  with_sink = _pipeline_seconds(rows, batch_rows, customers, f"pipeline{run}", t)
  baseline = _pipeline_seconds(rows, batch_rows, customers, f"baseline{run}", beam.Map(lambda b: None))
  return with_sink, baseline


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--rows", type=int, default=100_000)
  parser.add_argument("--batch_rows", type=int, default=10_000, help="rows per DecisionBatch element")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--customers", type=int, default=10_000, help="customers the rows spread over")
  parser.add_argument("--sinks", default="redis,postgres,clickhouse")
  parser.add_argument("--modes", default="dofn,pipeline")
  args = parser.parse_args(argv)
  for sink in args.sinks.split(","):
    for mode in args.modes.split(","):
      runs = []
      for run in range(args.repeats):
        reset(sink)
        if mode == "dofn":
          batches = make_decisions(args.rows, prefix=f"dofn{run}", customers=args.customers, days=DAYS,
                                   batch_rows=args.batch_rows)
          runs.append((bench_dofn(sink, batches), 0.0))
        else:
          runs.append(bench_pipeline(sink, args.rows, args.batch_rows, args.customers, run))
      seconds = statistics.median(s for s, _ in runs)
      figures = {"seconds": round(seconds, 3), "rows_per_s": round(args.rows / seconds),
                 "best_rows_per_s": round(args.rows / min(s for s, _ in runs))}
      if mode == "pipeline":
        baseline = statistics.median(b for _, b in runs)
        sink_rates = [args.rows / max(s - b, 1e-9) for s, b in runs]
        figures.update(baseline_seconds=round(baseline, 3), sink_rows_per_s=round(statistics.median(sink_rates)))
      print(json.dumps({"sink": sink, "mode": mode, "rows": args.rows, "batch_rows": args.batch_rows,
                        "customers": args.customers, "repeats": args.repeats, **figures}), flush=True)
    reset(sink)  # leave no scratch data behind
  print("command: .venv/bin/python benchmarks/bench_sinks.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
  main()
