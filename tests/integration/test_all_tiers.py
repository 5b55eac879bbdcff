"""`txstream run` with all four tiers on real servers: every tier holds exactly the scored transactions.

Checked by querying the servers directly; a second run of the same command
must leave every tier's count unchanged (every write is an upsert or a
deterministic replace keyed on transaction_id).
"""
import datetime
import json
import os
import shutil
import subprocess
import sys
import uuid

import boto3
import psycopg2
import pytest
import redis
from clickhouse_driver import Client

from tests import helpers as h
from tests.integration.conftest import S3_CREDENTIALS, s3_pipeline_options
from txstream.io import cold_table, wire
from txstream.pipelines import generate


@pytest.fixture(scope="module")
def servers(services):
  return services.require("redis", "postgres", "clickhouse", "s3")


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("gen"))
  generate.generate(out, customers=100, terminals=200, days=5, start=datetime.date(2018, 4, 1), seed=3,
                    corrupt_fraction=0.01)
  return out


@pytest.fixture(scope="module")
def targets(servers):
  suffix = uuid.uuid4().hex[:8]
  pg, ch, s3 = servers["postgres"], servers["clickhouse"], servers["s3"]
  dbname = f"txstream_e2e_{suffix}"
  admin = psycopg2.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres")
  admin.autocommit = True
  with admin.cursor() as cur:
    cur.execute(f"CREATE DATABASE {dbname}")
  bucket = f"txstream-e2e-{suffix}"
  boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=S3_CREDENTIALS["access_key_id"],
               aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
               region_name=S3_CREDENTIALS["region_name"]).create_bucket(Bucket=bucket)
  redis_db = 13
  redis.Redis(host=servers["redis"].host, port=servers["redis"].port, db=redis_db).flushdb()
  yield {
      "redis_url": f"redis://{servers['redis'].host}:{servers['redis'].port}/{redis_db}",
      "postgres_dsn": f"host={pg.host} port={pg.port} user=postgres dbname={dbname}",
      "clickhouse_url": f"clickhouse://{ch.host}:{ch.port}/txstream_e2e_{suffix}",
      "bucket": bucket, "s3_url": s3.url, "ch_db": f"txstream_e2e_{suffix}", "redis_db": redis_db,
  }
  Client(host=ch.host, port=ch.port).execute(f"DROP DATABASE IF EXISTS txstream_e2e_{suffix}")
  with admin.cursor() as cur:
    cur.execute(f"DROP DATABASE IF EXISTS {dbname}")
  admin.close()


def _run(input_dir, targets, out_dir):
  summary_path = os.path.join(out_dir, "summary.json")
  argv = ["run", f"--input={input_dir}", f"--summary_json={summary_path}",
          f"--cold_path=s3://{targets['bucket']}/cold", f"--dead_letter_path={out_dir}/dead",
          f"--redis_url={targets['redis_url']}", f"--postgres_dsn={targets['postgres_dsn']}",
          f"--clickhouse_url={targets['clickhouse_url']}", f"--s3_endpoint_url={targets['s3_url']}",
          f"--s3_access_key_id={S3_CREDENTIALS['access_key_id']}",
          f"--s3_secret_access_key={S3_CREDENTIALS['secret_access_key']}",
          f"--s3_region_name={S3_CREDENTIALS['region_name']}"]
  done = subprocess.run([sys.executable, "-m", "txstream.cli"] + argv, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(summary_path, encoding="utf-8") as f:
    return json.load(f)


def _tier_ids(targets, servers):
  r = redis.Redis(host=servers["redis"].host, port=servers["redis"].port, db=targets["redis_db"])
  hot = {k.decode().split(":", 1)[1] for k in r.scan_iter("txn:*", count=1000)}
  with psycopg2.connect(targets["postgres_dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT transaction_id FROM decisions")
    warm = [row[0] for row in cur.fetchall()]
    cur.execute("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL")
    runs = cur.fetchone()[0]
  ch = Client(host=servers["clickhouse"].host, port=servers["clickhouse"].port)
  analytics = [row[0] for row in ch.execute(f"SELECT transaction_id FROM {targets['ch_db']}.decisions FINAL")]
  # The cold tier is a Delta table: read with deltalake's own S3 client, not Beam's.
  cold = cold_table.read(f"s3://{targets['bucket']}/cold", s3_pipeline_options(targets["s3_url"])).column(
      "transaction_id").to_pylist()
  return hot, warm, analytics, cold, runs


def test_every_tier_holds_each_scored_transaction_once(input_dir, targets, servers, tmp_path):
  first = _run(input_dir, targets, str(tmp_path / "one"))
  assert first["scored"] + first["dead_letter_total"] + first["filtered"] == first["events_in"]
  assert first["dead_letter_total"] > 0
  n = first["scored"]
  assert first["tiers"]["hot"] == first["tiers"]["warm"] == first["tiers"]["analytics"] == first["tiers"]["cold"] == n
  hot, warm, analytics, cold, runs = _tier_ids(targets, servers)
  assert len(hot) == n
  assert len(warm) == len(set(warm)) == n
  assert len(analytics) == len(set(analytics)) == n
  assert len(cold) == len(set(cold)) == n
  assert set(warm) == hot == set(analytics) == set(cold)
  assert runs == 1

  second = _run(input_dir, targets, str(tmp_path / "two"))
  assert second["scored"] == n
  hot2, warm2, analytics2, cold2, runs2 = _tier_ids(targets, servers)
  assert (len(hot2), len(warm2), len(analytics2), len(cold2)) == (n, n, n, n)
  assert set(warm2) == set(warm)
  assert runs2 == 2
  with psycopg2.connect(targets["postgres_dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM dead_letters")
    assert cur.fetchone()[0] == first["dead_letter_total"]


def test_unreachable_tier_fails_before_reading(input_dir, tmp_path):
  done = subprocess.run([sys.executable, "-m", "txstream.cli", "run", f"--input={input_dir}",
                         "--postgres_dsn=host=127.0.0.1 port=1 user=postgres dbname=x",
                         f"--cold_path={tmp_path}/cold"], capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("txstream: error: "), done.stderr
  assert not os.path.exists(f"{tmp_path}/cold"), "nothing may be written when a tier is misconfigured"


def test_a_transaction_id_reused_on_another_day_leaves_the_tiers_agreeing(input_dir, targets, servers, tmp_path):
  # The last write wins in every tier: a later input carries a stored id with another day and amount.
  _run(input_dir, targets, str(tmp_path / "first"))
  stored = cold_table.read(f"s3://{targets['bucket']}/cold", s3_pipeline_options(targets["s3_url"])).slice(0, 1)
  row = stored.to_pylist()[0]
  event_ms = int(row["event_time"].timestamp() * 1000) + 3 * h.DAY_MS
  amount = row["amount_minor"] + 1234
  later = tmp_path / "later"
  shutil.copytree(os.path.join(input_dir, "reference"), later / "reference")
  (later / "labels").mkdir()
  with open(later / "labels" / "labels.wire", "wb") as f:
    wire.write_frames(f, [])
  (later / "transactions").mkdir()
  record = h.tx_record(0, event_ms, customer=row["customer_id"], terminal=row["terminal_id"], amount=amount,
                       transaction_id=row["transaction_id"], card_token=row["card_token"])
  with open(later / "transactions" / "day-later.wire", "wb") as f:
    wire.write_frames(f, [h.message(record)])
  summary = _run(str(later), targets, str(tmp_path / "second"))
  assert summary["scored"] == 1
  tid = row["transaction_id"]
  r = redis.Redis(host=servers["redis"].host, port=servers["redis"].port, db=targets["redis_db"])
  hot = json.loads(r.get(f"txn:{tid}"))
  with psycopg2.connect(targets["postgres_dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT amount_minor, (extract(epoch from event_time) * 1000)::bigint FROM decisions "
                "WHERE transaction_id = %s", (tid,))
    warm = cur.fetchall()
  ch = Client(host=servers["clickhouse"].host, port=servers["clickhouse"].port)
  analytics = ch.execute(f"SELECT amount_minor, event_time_ms FROM {targets['ch_db']}.decisions FINAL "
                         f"WHERE transaction_id = %(t)s", {"t": tid})
  cold = [r for r in cold_table.read(f"s3://{targets['bucket']}/cold", s3_pipeline_options(targets["s3_url"]))
          .to_pylist() if r["transaction_id"] == tid]
  assert (hot["amount_minor"], hot["event_time_ms"]) == (amount, event_ms)
  assert warm == [(amount, event_ms)]
  assert [tuple(x) for x in analytics] == [(amount, event_ms)]
  assert [(c["amount_minor"], int(c["event_time"].timestamp() * 1000)) for c in cold] == [(amount, event_ms)]
