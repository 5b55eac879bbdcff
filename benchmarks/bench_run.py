"""Events per second of a bounded `txstream run` over generated data, with and without the server tiers.

    .venv/bin/python benchmarks/bench_run.py                    # ~1M events, cold tier only
    .venv/bin/python benchmarks/bench_run.py --tiers all        # + Redis, PostgreSQL, ClickHouse
    .venv/bin/python benchmarks/bench_run.py --days 10 --tiers none
    .venv/bin/python benchmarks/bench_run.py --kafka 127.0.0.1:9092   # read from Kafka instead of files
    .venv/bin/python benchmarks/bench_run.py --customers 50000 --terminals 100000 --days 52   # ~5M events

Generates the input once (``data/bench-<days>d`` for the default 5,000
customers and 10,000 terminals: about 9,700 events a day, so 103 days is
about 1M events; ``data/bench-<customers>c-<terminals>t-<days>d`` for other
sizes), then runs the real command line in a subprocess and prints its
summary figures, the peak memory of that process alone (``os.wait4``) and
the exact command. ``--tiers all`` writes into scratch stores (Redis db 12,
PostgreSQL and ClickHouse database ``txstream_bench``) that it empties first;
the servers come from ``txstream services up``.
``--kafka`` first produces the input (transactions and labels, 3 partitions)
to fresh topics, then runs the graph bounded from them (``--kafka_start
earliest``, to the end offsets at the start).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TXSTREAM = [sys.executable, "-m", "txstream.cli"]
REDIS_URL = "redis://127.0.0.1:6379/12"
POSTGRES_DB = "txstream_bench"
CLICKHOUSE_URL = "clickhouse://127.0.0.1:9000/txstream_bench"
DEFAULT_CUSTOMERS, DEFAULT_TERMINALS = 5000, 10000


class Measured(NamedTuple):
  seconds: float      # wall time, start to exit
  peak_rss_mib: int   # the child's peak RSS (with any process it waited for), not that of other children
  cpu_seconds: float  # user + system


def run_measured(command: list, **popen_args) -> Measured:
  """Runs ``command`` to completion; raises ``CalledProcessError`` if it fails.

  ``os.wait4`` gives the resource use of this child alone, where
  ``getrusage(RUSAGE_CHILDREN)`` is the largest of every child so far
  (``txstream generate`` included).
  """
  start = time.monotonic()
  child = subprocess.Popen(command, **popen_args)
  try:
    _, status, usage = os.wait4(child.pid, 0)
  except BaseException:  # interrupted: leave no child behind
    child.kill()
    child.wait()
    raise
  wall = time.monotonic() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise subprocess.CalledProcessError(child.returncode, command)
  return Measured(round(wall, 1), round(usage.ru_maxrss / 1024), round(usage.ru_utime + usage.ru_stime, 1))


def data_dir(days: int, customers: int = DEFAULT_CUSTOMERS, terminals: int = DEFAULT_TERMINALS) -> str:
  """Where the generated input of these sizes lives (the default sizes keep their old name)."""
  if (customers, terminals) == (DEFAULT_CUSTOMERS, DEFAULT_TERMINALS):
    return os.path.join(ROOT, "data", f"bench-{days}d")
  return os.path.join(ROOT, "data", f"bench-{customers}c-{terminals}t-{days}d")


def generate(days: int, customers: int = DEFAULT_CUSTOMERS, terminals: int = DEFAULT_TERMINALS) -> str:
  """Generates the input once (``txstream generate``); returns its directory."""
  out = data_dir(days, customers, terminals)
  if not os.path.exists(os.path.join(out, "manifest.json")):
    print(f"generating {days} days of {customers} customers and {terminals} terminals into {out} ...", flush=True)
    subprocess.run(TXSTREAM + ["generate", "--days", str(days), "--customers", str(customers),
                               "--terminals", str(terminals), "--out", out], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
  return out


def _scratch_stores() -> list:
  import psycopg2
  import redis
  from clickhouse_driver import Client
  subprocess.run(TXSTREAM + ["services", "up", "redis", "postgres", "clickhouse"], check=True, cwd=ROOT)
  redis.Redis.from_url(REDIS_URL).flushdb()
  admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
  admin.autocommit = True
  with admin.cursor() as cur:
    cur.execute(f"DROP DATABASE IF EXISTS {POSTGRES_DB}")
    cur.execute(f"CREATE DATABASE {POSTGRES_DB}")
  admin.close()
  Client(host="127.0.0.1").execute(f"DROP DATABASE IF EXISTS {POSTGRES_DB}")
  return [f"--redis_url={REDIS_URL}", f"--postgres_dsn=host=127.0.0.1 user=postgres dbname={POSTGRES_DB}",
          f"--clickhouse_url={CLICKHOUSE_URL}"]


def _produce(input_dir: str, bootstrap: str) -> list:
  """Produces the input to fresh topics; returns the `txstream run` flags, then a note on the produce."""
  import uuid
  sys.path.insert(0, ROOT)
  from txstream.pipelines import generate
  topic = f"bench-run-{uuid.uuid4().hex[:8]}"
  start = time.monotonic()
  produced = generate.produce_to_kafka(input_dir, bootstrap, topic, f"{topic}.labels", partitions=3)
  note = f"{produced['messages']} messages in {time.monotonic() - start:.0f} s"
  print(f"produced {note} to {topic}", flush=True)
  return [f"--bootstrap_servers={bootstrap}", f"--topic={topic}", f"--labels_topic={topic}.labels",
          f"--reference_dir={input_dir}/reference", "--kafka_start=earliest", f"--group_id={topic}", note]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--days", type=int, default=103, help="Days of generated traffic (103 = ~1M events).")
  parser.add_argument("--customers", type=int, default=DEFAULT_CUSTOMERS, help="Customers in the generated data.")
  parser.add_argument("--terminals", type=int, default=DEFAULT_TERMINALS, help="Terminals in the generated data.")
  parser.add_argument("--tiers", choices=("none", "cold", "all"), default="cold",
                      help="none: no tier at all; cold: Parquet only (the default run); all: + the three servers.")
  parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"), help="Output folder.")
  parser.add_argument("--kafka", default=None, metavar="HOST:PORT",
                      help="Produce the input to fresh Kafka topics and read it from there.")
  parser.add_argument("beam_args", nargs="*", help="Extra flags passed to `txstream run` (after --).")
  args = parser.parse_args(argv)
  input_dir = generate(args.days, args.customers, args.terminals)
  summary_path = os.path.join(args.out, "summary.json")
  # A run over new data into an empty cold tier, every time (a rerun into the same table would MERGE instead).
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out, exist_ok=True)
  flags = [f"--summary_json={summary_path}", f"--dead_letter_path={args.out}/dead"]
  produced = None
  if args.kafka:
    flags += _produce(input_dir, args.kafka)
    produced = flags.pop()
  else:
    flags.append(f"--input={input_dir}")
  flags.append("--no_cold" if args.tiers == "none" else f"--cold_path={args.out}/cold")
  if args.tiers == "all":
    flags += _scratch_stores()
  command = TXSTREAM + ["run"] + flags + list(args.beam_args)
  measured = run_measured(command, cwd=ROOT, stdout=subprocess.DEVNULL)
  with open(summary_path, encoding="utf-8") as f:
    summary = json.load(f)
  print(json.dumps({
      "tiers": args.tiers, "events_in": summary["events_in"], "scored": summary["scored"],
      "tier_rows": summary["tiers"], "pipeline_seconds": summary["wall_seconds"],
      "events_per_second": summary["events_per_second"], "process_seconds": measured.seconds,
      "process_cpu_seconds": measured.cpu_seconds, "peak_rss_mib": measured.peak_rss_mib, "cpus": os.cpu_count(),
      "kafka_produce": produced}, indent=2))
  print("command: benchmarks/bench_run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
