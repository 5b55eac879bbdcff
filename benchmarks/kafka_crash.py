"""Kill `txstream run` from Kafka 5 times (SIGKILL) while ~100k events flow; print what was lost or doubled.

    .venv/bin/python benchmarks/kafka_crash.py                  # 5,000 customers x 10 days, 5 kills
    .venv/bin/python benchmarks/kafka_crash.py --days 3 --kills 3

Events are produced in waves between runs; every run starts from the group's
committed offsets, which move only after every tier has written. The stores
(PostgreSQL decisions and dead letters, cold-tier Parquet) are then read
directly. Needs `txstream services up kafka postgres`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from tests import crash_driver


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--customers", type=int, default=5000)
  parser.add_argument("--days", type=int, default=10)
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--bootstrap_servers", default="127.0.0.1:9092")
  args = parser.parse_args(argv)
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="txstream-crash-") as work:
    outcome = crash_driver.crash_and_recover(
        work, args.bootstrap_servers, {"host": "127.0.0.1", "port": 5432, "user": "postgres"},
        customers=args.customers, days=args.days, kills=args.kills, seed=args.seed, kill_window_s=(8.0, 40.0))
  print(f"events={outcome.expected + outcome.dead_expected} valid={outcome.expected} bad={outcome.dead_expected} "
        f"runs={outcome.runs} killed={outcome.killed} wall_s={time.monotonic() - start:.0f}")
  print(f"dead_letters_lost={outcome.dead_lost} dead_letters_duplicated={outcome.dead_duplicated}")
  print(f"lost={outcome.lost} duplicated={outcome.duplicated}")
  print("command: .venv/bin/python benchmarks/kafka_crash.py " + " ".join(sys.argv[1:] if argv is None else argv))
  return 0 if outcome.lost == outcome.duplicated == outcome.dead_lost == outcome.dead_duplicated == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
