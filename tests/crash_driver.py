"""Kill `txstream run` from Kafka with SIGKILL while events flow, restart it, and count the damage.

Used by tests/integration/test_kafka_exactly_once.py (small) and
benchmarks/kafka_crash.py (100k events, 5 kills). Each bounded run starts at
the group's committed offsets and commits its end offsets only after every
tier has written; a killed run commits nothing, so the next run rereads its
range and the upserting tiers absorb the repeat. The check reads the stores
directly: PostgreSQL decisions and dead letters, and the cold-tier Parquet
files (where a repeat would show as a second copy of a transaction).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from typing import List, NamedTuple

import psycopg2

from txstream.io import cold_table, kafka
from txstream.pipelines import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Outcome(NamedTuple):
  expected: int
  lost: int
  duplicated: int
  dead_expected: int
  dead_lost: int
  dead_duplicated: int
  kills: int
  runs: int
  killed: int = 0


def _chunks(items: List, n: int) -> List[List]:
  size = -(-len(items) // n)
  return [items[i:i + size] for i in range(0, len(items), size)]


def _produce(config, topic, messages):
  kafka.produce_messages(config, topic, ((None, m, None) for m in messages))


def _run(argv: List[str], log, kill_after_s=None) -> bool:
  """Runs `txstream run`; returns True if it completed, False if it was killed."""
  proc = subprocess.Popen([sys.executable, "-m", "txstream.cli", "run"] + argv, cwd=ROOT, stdout=log, stderr=log,
                          start_new_session=True)
  try:
    proc.wait(timeout=kill_after_s)
  except subprocess.TimeoutExpired:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return False
  if proc.returncode != 0:
    raise RuntimeError(f"txstream run failed with status {proc.returncode}; see {log.name}")
  return True


def crash_and_recover(work_dir: str, bootstrap_servers: str, admin_dsn_parts: dict, customers: int, days: int,
                      kills: int, seed: int = 0, kill_window_s=(4.0, 12.0), corrupt_fraction: float = 0.01,
                      progress=print) -> Outcome:
  """Generates, produces in ``kills + 1`` waves, kills ``kills`` runs at random moments, then finishes."""
  rng = random.Random(seed)
  gen_dir = os.path.join(work_dir, "gen")
  manifest = generate.generate(gen_dir, customers, customers * 2, days, generate.datetime.date(2018, 4, 1), seed,
                               corrupt_fraction=corrupt_fraction)
  with open(os.path.join(gen_dir, "corrupted.json"), encoding="utf-8") as f:
    corrupted = json.load(f)
  messages = [m for _, m, _ in generate._messages(os.path.join(gen_dir, "transactions"))]  # pylint: disable=protected-access
  bad_ids = {c["transaction_id"] for c in corrupted}
  expected_ids = set(generate.transaction_ids(seed, manifest["transactions"])) - bad_ids

  suffix = uuid.uuid4().hex[:8]
  topic, dbname = f"crash-{suffix}", f"txstream_crash_{suffix}"
  admin = psycopg2.connect(dbname="postgres", **admin_dsn_parts)
  admin.autocommit = True
  with admin.cursor() as cur:
    cur.execute(f"CREATE DATABASE {dbname}")
  dsn = " ".join(f"{k}={v}" for k, v in dict(admin_dsn_parts, dbname=dbname).items())
  config = kafka.KafkaConfig.from_env(bootstrap_servers=bootstrap_servers, topic=topic)
  kafka.ensure_topic(config, topic, num_partitions=3)
  argv = [f"--bootstrap_servers={bootstrap_servers}", f"--topic={topic}", f"--group_id=crash-{suffix}",
          f"--reference_dir={gen_dir}/reference", f"--postgres_dsn={dsn}", f"--cold_path={work_dir}/cold",
          f"--dead_letter_path={work_dir}/dead"]
  waves = _chunks(messages, kills + 1)
  runs = killed = 0
  try:
    with open(os.path.join(work_dir, "runs.log"), "w", encoding="utf-8") as log:
      lo, hi = kill_window_s
      wave = 0
      while killed < kills and runs < 3 * kills:
        if wave < kills:
          _produce(config, topic, waves[wave])
          wave += 1
        delay = rng.uniform(lo, hi)
        started = time.monotonic()
        completed = _run(argv, log, kill_after_s=delay)
        runs += 1
        killed += not completed
        if completed:  # too late: aim the next kill inside the run
          hi = max(lo + 0.5, min(hi, (time.monotonic() - started) * 0.9))
          lo = min(lo, hi - 0.5)
        progress(f"run {runs}: {'completed before the kill' if completed else f'killed after {delay:.1f} s'}")
      for rest in waves[wave:-1]:
        _produce(config, topic, rest)
      _produce(config, topic, waves[-1])
      _run(argv, log)
      runs += 1
      progress(f"run {runs}: completed")
    return _outcome(dsn, work_dir, expected_ids, corrupted, kills, runs)._replace(killed=killed)
  finally:
    with admin.cursor() as cur:
      cur.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    admin.close()


def _outcome(dsn, work_dir, expected_ids, corrupted, kills, runs) -> Outcome:
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT transaction_id FROM decisions")
    warm = [r[0] for r in cur.fetchall()]
    cur.execute("SELECT source FROM dead_letters")
    dead_sources = [r[0] for r in cur.fetchall()]
  cold = (cold_table.read(f"{work_dir}/cold").column("transaction_id").to_pylist()
          if os.path.exists(f"{work_dir}/cold/decisions") else [])
  # A corrupted record's source names its topic position, not its file; match them by count.
  lost = len(expected_ids - set(warm)) + len(expected_ids - set(cold))
  duplicated = (len(warm) - len(set(warm))) + (len(cold) - len(set(cold)))
  dead_lost = max(0, len(corrupted) - len(set(dead_sources)))
  return Outcome(len(expected_ids), lost, duplicated, len(corrupted), dead_lost,
                 len(dead_sources) - len(set(dead_sources)) + max(0, len(set(dead_sources)) - len(corrupted)),
                 kills, runs)

