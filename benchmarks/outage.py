"""Server outages in the middle of a bounded `txstream run`: every tier still ends with each transaction once.

    .venv/bin/python benchmarks/outage.py                  # ~200k events, each server cut for 20 s
    .venv/bin/python benchmarks/outage.py --outage_s 0     # the same run without outages (a baseline)
    .venv/bin/python benchmarks/outage.py --days 3 --outage_s 5

Generates the input once (``data/outage/gen-<days>d-<customers>c``; 5,000
customers make about 9,700 events a day, so 21 days is about 200k events).
Puts a ``tests/tcp_proxy.TcpProxy`` in front of Redis, PostgreSQL, ClickHouse's
HTTP port (the analytics tier inserts there; start-up DDL goes to the native
port directly) and S3 (moto), and runs the real command line in a subprocess with all four
tiers (and the dead-letter files) pointed at the proxies, into scratch stores
made for this run: a Redis database that was empty (claimed with a marker
key), a new PostgreSQL database, a new ClickHouse database and a new bucket.

While the run is in flight the script polls the stores directly (not through
the proxies) and cuts one proxy at a time for ``--outage_s`` seconds once its
tier has started writing: Redis, then PostgreSQL, then ClickHouse (the three
are written by the same fused stage, so each cut stalls it), then S3 (the cold
tier only writes after its grouping, near the end). A cut drops every open
connection and refuses new ones, as a crashed server would.

Afterwards it reads every tier straight from its store and checks it holds
exactly ``scored`` distinct transactions (ClickHouse through ``FINAL``, as the
analytics tier's contract says), the same set in every tier, and no
duplicates. It prints one line per tier, ``lost=N duplicated=N`` and the
commands, keeps the run's log and a progress timeline under ``--out``, drops
the scratch stores unless ``--keep``, and exits 1 if anything was lost or
duplicated, the run failed, or a cut missed its tier.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.tcp_proxy import TcpProxy  # pylint: disable=wrong-import-position
from txstream import services  # pylint: disable=wrong-import-position

TXSTREAM = [sys.executable, "-m", "txstream.cli"]
S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing", "region_name": "us-east-1"}
REDIS_CANDIDATE_DBS = range(1, 12)  # 12, 13 and 15 belong to bench_run and the integration tests
CLAIM_KEY = "txstream:outage:claim"
TIERS = ("hot", "warm", "analytics", "cold")
SERVER_OF = {"hot": "redis", "warm": "postgres", "analytics": "clickhouse", "cold": "s3"}
# When to cut each tier: once this share of its expected rows (cold: files) is written.
CUT_AT = {"hot": 0.10, "warm": 0.30, "analytics": 0.50, "cold": 0.05}
GAP_S = 1.0  # between the end of one outage and the next cut
_RETRY_LINE = re.compile(r"\b(hot|warm|analytics|warm_dead_letters) sink: attempt \d+ failed"
                         r"|\b(cold|dead_letters): writing .* attempt \d+ failed")


def _generate(days: int, customers: int, terminals: int) -> str:
  out = os.path.join(ROOT, "data", "outage", f"gen-{days}d-{customers}c")
  if not os.path.exists(os.path.join(out, "manifest.json")):
    print(f"generating {days} days for {customers} customers into {out} ...", flush=True)
    subprocess.run(TXSTREAM + ["generate", "--days", str(days), "--customers", str(customers),
                               "--terminals", str(terminals), "--out", out],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return out


class Stores:
  """This run's scratch stores, reached directly (never through the proxies)."""

  def __init__(self, endpoints: Dict[str, services.Endpoint], suffix: str):
    import boto3
    import psycopg2
    import redis
    from clickhouse_driver import Client
    self.ep = endpoints
    self.name = f"txstream_outage_{suffix}"
    self.bucket = f"txstream-outage-{suffix}"
    r, pg, ch, s3 = (endpoints[n] for n in ("redis", "postgres", "clickhouse", "s3"))
    self.redis_db = self._claim_redis_db(lambda db: redis.Redis(host=r.host, port=r.port, db=db), suffix)
    self.redis = redis.Redis(host=r.host, port=r.port, db=self.redis_db)
    admin = psycopg2.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
      cur.execute(f"CREATE DATABASE {self.name}")
    admin.close()
    self.pg_dsn = f"host={pg.host} port={pg.port} user=postgres dbname={self.name}"
    self.pg = None
    self.ch = Client(host=ch.host, port=ch.port)
    self.s3 = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=S3_KEYS["access_key_id"],
                          aws_secret_access_key=S3_KEYS["secret_access_key"], region_name=S3_KEYS["region_name"])
    self.s3.create_bucket(Bucket=self.bucket)

  @staticmethod
  def _claim_redis_db(client, suffix: str) -> int:
    for db in REDIS_CANDIDATE_DBS:
      r = client(db)
      if r.dbsize() == 0 and r.set(CLAIM_KEY, suffix, nx=True):
        if r.dbsize() == 1:
          return db
        r.delete(CLAIM_KEY)  # someone else started writing here at the same moment
    raise SystemExit(f"no empty Redis database among {list(REDIS_CANDIDATE_DBS)}")

  # -- progress (cheap, approximate) ---------------------------------------
  def progress(self) -> Dict[str, int]:
    """Keys in the Redis db (transactions + customers), rows in PostgreSQL and ClickHouse, cold files."""
    out = {"hot": max(0, self.redis.dbsize() - 1)}
    out["warm"] = self._quietly(lambda: self._pg_one("SELECT count(*) FROM decisions"))
    out["analytics"] = self._quietly(lambda: self.ch.execute(f"SELECT count() FROM {self.name}.decisions")[0][0])
    out["cold"] = self._quietly(lambda: self.s3.list_objects_v2(Bucket=self.bucket, Prefix="cold/")["KeyCount"])
    return out

  @staticmethod
  def _quietly(fn) -> int:
    try:
      return fn()
    except Exception:  # pylint: disable=broad-except
      return 0  # the table is not there yet

  def _pg_one(self, sql):
    import psycopg2
    try:
      if self.pg is None:
        self.pg = psycopg2.connect(self.pg_dsn)
        self.pg.autocommit = True
      with self.pg.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]
    except psycopg2.Error:
      self.pg = None
      raise

  # -- what each tier holds (exact) ----------------------------------------
  def contents(self) -> Dict[str, List[str]]:
    """Every transaction_id row of each tier (ClickHouse through FINAL)."""
    import psycopg2
    import pyarrow as pa
    import pyarrow.parquet as pq
    hot = [k.decode().split(":", 1)[1] for k in self.redis.scan_iter("txn:*", count=10_000)]
    with psycopg2.connect(self.pg_dsn) as conn, conn.cursor() as cur:
      cur.execute("SELECT transaction_id FROM decisions")
      warm = [row[0] for row in cur.fetchall()]
    analytics = [row[0] for row in self.ch.execute(f"SELECT transaction_id FROM {self.name}.decisions FINAL")]
    cold = []
    for key in self._keys("cold/"):
      if key.endswith(".parquet"):
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        cold.extend(pq.read_table(pa.BufferReader(body), columns=["transaction_id"]).column(0).to_pylist())
    return {"hot": hot, "warm": warm, "analytics": analytics, "cold": cold}

  def analytics_rows_before_merge(self) -> int:
    return self.ch.execute(f"SELECT count() FROM {self.name}.decisions")[0][0]

  def _keys(self, prefix: str) -> List[str]:
    pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]

  def drop(self) -> None:
    import psycopg2
    if self.pg is not None:
      self.pg.close()
    self.redis.flushdb()  # the database was empty when this run claimed it
    self.ch.execute(f"DROP DATABASE IF EXISTS {self.name}")
    pg = self.ep["postgres"]
    admin = psycopg2.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
      cur.execute(f"DROP DATABASE IF EXISTS {self.name}")
    admin.close()
    keys = self._keys("")
    for i in range(0, len(keys), 1000):
      self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
    self.s3.delete_bucket(Bucket=self.bucket)


class Cut:
  """One planned outage and what the tier looked like when it started and ended."""

  def __init__(self, tier: str, target: int):
    self.tier = tier
    self.target = target  # rows (files) written before the cut
    self.started_s: Optional[float] = None
    self.ended_s: Optional[float] = None
    self.count_at_cut: Optional[int] = None

  def describe(self, final: int, unit: str, outage_s: float) -> str:
    if self.started_s is None:
      return "not cut (the tier never reached its cut point while the run was in flight)"
    hit = "while writing" if self.count_at_cut < final else "MISSED: the tier had finished"
    return (f"cut at {self.started_s:6.1f}s for {outage_s:.0f}s, {hit} ({self.count_at_cut:,} of {final:,} {unit})")


def _run_command(input_dir: str, out: str, stores: Stores, proxies: Dict[str, TcpProxy]) -> List[str]:
  p = {n: proxies[n].url_host_port for n in proxies}
  pg_host, pg_port = p["postgres"].rsplit(":", 1)
  return TXSTREAM + [
      "run", f"--input={input_dir}", f"--summary_json={out}/summary.json",
      f"--redis_url=redis://{p['redis']}/{stores.redis_db}",
      f"--postgres_dsn=host={pg_host} port={pg_port} user=postgres dbname={stores.name}",
      f"--clickhouse_url=clickhouse://{stores.ep['clickhouse'].host}:{stores.ep['clickhouse'].port}/{stores.name}"
      f"?http_port={proxies['clickhouse'].port}",
      f"--cold_path=s3://{stores.bucket}/cold", f"--dead_letter_path=s3://{stores.bucket}/dead",
      f"--s3_endpoint_url=http://{p['s3']}", f"--s3_access_key_id={S3_KEYS['access_key_id']}",
      f"--s3_secret_access_key={S3_KEYS['secret_access_key']}", f"--s3_region_name={S3_KEYS['region_name']}"]


def _watch(proc, stores: Stores, proxies: Dict[str, TcpProxy], cuts: Dict[str, Cut], outage_s: float,
           expected: Dict[str, int], start: float, poll_s: float) -> List[dict]:
  """Polls the stores until the run ends, cutting each tier's proxy once it is being written."""
  timeline, last_end = [], 0.0
  pending = [t for t in TIERS if t in cuts]
  while proc.poll() is None:
    now = time.monotonic() - start
    counts = stores.progress()
    timeline.append({"t": round(now, 2), **counts})
    active = [c for c in cuts.values() if c.started_s is not None and c.ended_s is None]
    for c in active:
      if not proxies[SERVER_OF[c.tier]].outage_ended.is_set():
        continue
      c.ended_s = now
      last_end = now
    if pending and not any(c.ended_s is None for c in cuts.values() if c.started_s is not None):
      tier = pending[0]
      if counts[tier] >= expected[tier]:
        pending.pop(0)  # finished before its turn came: reported as not cut
      elif counts[tier] >= cuts[tier].target and now - last_end >= GAP_S:
        cut = cuts[tier]
        cut.started_s, cut.count_at_cut = now, counts[tier]
        proxies[SERVER_OF[tier]].interrupt(outage_s)
        print(f"  {now:6.1f}s  cutting {SERVER_OF[tier]} ({tier}) for {outage_s:.0f}s at {counts[tier]:,}", flush=True)
        pending.pop(0)
    time.sleep(poll_s)
  timeline.append({"t": round(time.monotonic() - start, 2), **stores.progress()})
  return timeline


def _retries(log_path: str) -> Counter:
  out = Counter()
  with open(log_path, encoding="utf-8", errors="replace") as f:
    for line in f:
      m = _RETRY_LINE.search(line)
      if m:
        out[m.group(1) or m.group(2)] += 1
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--days", type=int, default=21, help="Days of generated traffic (21 = ~200k events).")
  parser.add_argument("--customers", type=int, default=5000)
  parser.add_argument("--terminals", type=int, default=10000)
  parser.add_argument("--outage_s", type=float, default=20.0, help="How long each server is cut off (0: no cuts).")
  parser.add_argument("--tiers", default=",".join(TIERS), help="Which tiers to cut, in this order: hot,warm,analytics,cold.")
  parser.add_argument("--poll_s", type=float, default=0.25, help="How often the stores are polled.")
  parser.add_argument("--out", default=os.path.join(ROOT, "out", "outage"), help="Output folder (log, summary).")
  parser.add_argument("--keep", action="store_true", help="Keep the scratch stores instead of dropping them.")
  raw_argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw_argv)
  to_cut = [t for t in args.tiers.split(",") if t] if args.outage_s > 0 else []
  if any(t not in TIERS for t in to_cut):
    parser.error(f"--tiers: choose from {','.join(TIERS)}")

  input_dir = _generate(args.days, args.customers, args.terminals)
  with open(os.path.join(input_dir, "manifest.json"), encoding="utf-8") as f:
    events = json.load(f)["transactions"]
  endpoints = services.up(["redis", "postgres", "clickhouse", "s3"], quiet=True)
  suffix = uuid.uuid4().hex[:8]
  out = os.path.join(args.out, suffix)
  os.makedirs(out, exist_ok=True)
  stores = Stores(endpoints, suffix)
  # Hot counts Redis keys: a value per transaction plus a recent-set per customer.
  expected = {"hot": events + args.customers, "warm": events, "analytics": events, "cold": args.days * 24}
  cuts = {t: Cut(t, max(1, int(CUT_AT[t] * expected[t]))) for t in to_cut}
  ports = {n: services.CLICKHOUSE_HTTP_PORT if n == "clickhouse" else endpoints[n].port for n in SERVER_OF.values()}
  proxies = {n: TcpProxy(endpoints[n].host, ports[n]).start() for n in SERVER_OF.values()}
  argv_run = _run_command(input_dir, out, stores, proxies)
  log_path = os.path.join(out, "run.log")
  try:
    print(f"{events:,} events; scratch stores {stores.name} (Redis db {stores.redis_db}, bucket {stores.bucket})",
          flush=True)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
      proc = subprocess.Popen(argv_run, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      try:
        timeline = _watch(proc, stores, proxies, cuts, args.outage_s, expected, start, args.poll_s)
      finally:
        if proc.poll() is None:
          proc.terminate()
          proc.wait(timeout=30)
    wall = time.monotonic() - start
    with open(os.path.join(out, "timeline.json"), "w", encoding="utf-8") as f:
      json.dump(timeline, f)
    return _report(proc.returncode, wall, out, log_path, stores, cuts, timeline[-1], args,
                   ["benchmarks/outage.py"] + raw_argv, argv_run)
  finally:
    for proxy in proxies.values():
      proxy.close()
    if not args.keep:
      stores.drop()


def _report(rc: int, wall: float, out: str, log_path: str, stores: Stores, cuts: Dict[str, Cut],
            final_progress: dict, args, argv_bench: List[str], argv_run: List[str]) -> int:
  summary = {}
  if os.path.exists(os.path.join(out, "summary.json")):
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
  n = summary.get("scored")
  print(f"run exit={rc} wall={wall:.1f}s events_in={summary.get('events_in')} scored={n} "
        f"dead_letters={summary.get('dead_letter_total')} filtered={summary.get('filtered')} "
        f"summary_tiers={summary.get('tiers')}")
  if rc != 0:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      print("run log tail:\n" + "".join(f.readlines()[-15:]))
  contents = stores.contents()
  union = set().union(*(set(ids) for ids in contents.values()))
  retries = _retries(log_path)
  lost = duplicated = 0
  ok = rc == 0 and n is not None
  for tier in TIERS:
    ids = contents[tier]
    distinct = set(ids)
    dup = len(ids) - len(distinct)
    missing = max((n or 0) - len(distinct), len(union - distinct))
    lost += missing
    duplicated += dup
    unit = "keys" if tier == "hot" else ("files" if tier == "cold" else "rows")
    cut = cuts[tier].describe(final_progress[tier], unit, args.outage_s) if tier in cuts else "not cut"
    ok &= tier not in cuts or (cuts[tier].started_s is not None and cuts[tier].count_at_cut < final_progress[tier])
    extra = f" rows_before_merge={stores.analytics_rows_before_merge()}" if tier == "analytics" else ""
    print(f"{tier:<9} {SERVER_OF[tier]:<10} {cut}; retries={retries.get(tier, 0)} "
          f"rows={len(ids)} distinct={len(distinct)} missing={missing} duplicated={dup}{extra}")
  if len(union) != (n or 0):
    print(f"the tiers hold {len(union)} distinct transactions between them, the run scored {n}")
    ok = False
  print(f"lost={lost} duplicated={duplicated}")
  python = os.path.relpath(sys.executable, ROOT)
  print("benchmark: " + shlex.join([python] + argv_bench))
  print("run: " + shlex.join([python] + argv_run[1:]))
  print(f"log: {os.path.relpath(log_path, ROOT)}")
  return 0 if ok and lost == 0 and duplicated == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
