"""Events per second of a bounded `txstream run` over generated data, with and without the server tiers.

    .venv/bin/python benchmarks/bench_run.py                    # ~1M events, cold tier only
    .venv/bin/python benchmarks/bench_run.py --tiers all        # + Redis, PostgreSQL, ClickHouse
    .venv/bin/python benchmarks/bench_run.py --days 10 --tiers none

Generates the input once (``data/bench-<days>d``, 5,000 customers and 10,000
terminals: about 9,700 events a day, so 103 days is about 1M events), then
runs the real command line in a subprocess and prints its summary figures,
peak memory and the exact command. ``--tiers all`` writes into scratch
stores (Redis db 12, PostgreSQL and ClickHouse database ``txstream_bench``)
that it empties first; the servers come from ``txstream services up``.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TXSTREAM = [sys.executable, "-m", "txstream.cli"]
REDIS_URL = "redis://127.0.0.1:6379/12"
POSTGRES_DB = "txstream_bench"
CLICKHOUSE_URL = "clickhouse://127.0.0.1:9000/txstream_bench"


def _generate(days: int) -> str:
  out = os.path.join(ROOT, "data", f"bench-{days}d")
  if not os.path.exists(os.path.join(out, "manifest.json")):
    print(f"generating {days} days into {out} ...", flush=True)
    subprocess.run(TXSTREAM + ["generate", "--days", str(days), "--out", out], check=True, cwd=ROOT,
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--days", type=int, default=103, help="Days of generated traffic (103 = ~1M events).")
  parser.add_argument("--tiers", choices=("none", "cold", "all"), default="cold",
                      help="none: no tier at all; cold: Parquet only (the default run); all: + the three servers.")
  parser.add_argument("--out", default=os.path.join(ROOT, "out", "bench"), help="Output folder.")
  parser.add_argument("beam_args", nargs="*", help="Extra flags passed to `txstream run` (after --).")
  args = parser.parse_args(argv)
  input_dir = _generate(args.days)
  summary_path = os.path.join(args.out, "summary.json")
  os.makedirs(args.out, exist_ok=True)
  flags = [f"--input={input_dir}", f"--summary_json={summary_path}", f"--dead_letter_path={args.out}/dead"]
  flags.append("--no_cold" if args.tiers == "none" else f"--cold_path={args.out}/cold")
  if args.tiers == "all":
    flags += _scratch_stores()
  command = TXSTREAM + ["run"] + flags + list(args.beam_args)
  start = time.monotonic()
  subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  wall = time.monotonic() - start
  peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  with open(summary_path, encoding="utf-8") as f:
    summary = json.load(f)
  print(json.dumps({
      "tiers": args.tiers, "events_in": summary["events_in"], "scored": summary["scored"],
      "tier_rows": summary["tiers"], "pipeline_seconds": summary["wall_seconds"],
      "events_per_second": summary["events_per_second"], "process_seconds": round(wall, 1),
      "peak_rss_mib": round(peak_mib), "cpus": os.cpu_count()}, indent=2))
  print("command: benchmarks/bench_run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
