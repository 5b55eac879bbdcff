"""The cold tier and the dead-letter files on s3:// survive an S3 outage in the middle of the write.

Beam's S3 filesystem talks to the local S3 (moto) through a ``TcpProxy`` that
is cut for 3 s: once after the first day files have been published, once
before the first dead-letter write. The objects are then read straight from
S3 (not through the proxy): every row is there exactly once, and no staged
or temporary object is left.
"""
import json
import uuid

import apache_beam as beam
import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.testing.test_pipeline import TestPipeline

from tests.integration import sink_fixtures as fx
from tests.integration.conftest import S3_CREDENTIALS, s3_pipeline_options
from txstream.io import cold_table
from tests.tcp_proxy import TcpProxy
from txstream.transforms.tiers import WriteColdTier, WriteDeadLetters

DAYS = 16
ROWS = 480  # 30 rows on each of 16 event days


@pytest.fixture
def s3(services):
  endpoint = services.require("s3")
  client = boto3.client("s3", endpoint_url=endpoint.url, aws_access_key_id=S3_CREDENTIALS["access_key_id"],
                        aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
                        region_name=S3_CREDENTIALS["region_name"])
  bucket = f"txstream-outage-{uuid.uuid4().hex[:12]}"
  client.create_bucket(Bucket=bucket)
  previous = FileSystems._pipeline_options  # pylint: disable=protected-access
  with TcpProxy(endpoint.host, endpoint.port) as proxy:
    yield client, bucket, proxy
  FileSystems.set_options(previous)


def _run(proxy, build) -> dict:
  # Beam's Pipeline sets FileSystems' options from its own: S3 goes through the proxy.
  p = TestPipeline(runner=fn_runner.FnApiRunner(), options=s3_pipeline_options(f"http://{proxy.url_host_port}"))
  build(p)
  result = p.run()
  result.wait_until_finish()
  return fx.counters(result)


def _objects(client, bucket, prefix):
  pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
  return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_cold_tier_outage_mid_write_loses_and_duplicates_nothing(s3):
  client, bucket, proxy = s3
  decisions = fx.make_decisions(ROWS, customers=20, days=DAYS)
  # Each day file costs ~20 kB of requests: the cut lands after about a third of them.
  proxy.interrupt_after_bytes(100_000, outage_s=3.0)
  counts = _run(proxy, lambda p: (p | beam.Create(decisions, reshuffle=False)
                                  | WriteColdTier(f"s3://{bucket}/cold", "run-1", retry=fx.FAST_RETRY)))
  assert proxy.interruptions == 1
  assert counts["sink.cold.retried"] >= 1
  assert counts.get("sink.cold.failed", 0) == 0
  assert counts["tier.cold"] == ROWS

  keys = _objects(client, bucket, "cold/_staging/run-1/")
  assert len(keys) == DAYS and all(k.rsplit("/", 1)[1].startswith("part-s") for k in keys), keys
  ids = []
  for key in keys:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    ids.extend(pq.read_table(pa.BufferReader(body), columns=["transaction_id"]).column(0).to_pylist())
  assert len(ids) == len(set(ids)) == ROWS
  assert set(ids) == set(fx.table_of(decisions).column("transaction_id").to_pylist())

  # The run driver's commit: one Delta version with every row, the staging gone.
  options = s3_pipeline_options(client.meta.endpoint_url)
  committed = cold_table.commit(f"s3://{bucket}/cold", "run-1", options)
  assert (committed.version, committed.inserted) == (1, ROWS)
  assert sorted(cold_table.read(f"s3://{bucket}/cold", options).column("transaction_id").to_pylist()) == sorted(ids)
  assert not _objects(client, bucket, "cold/_staging/run-1/")


def test_dead_letters_wait_for_s3_to_come_back(s3):
  client, bucket, proxy = s3
  letters = [fx.dead_letter_batch([{"source": f"f#{i}", "raw": b"x", "stage": ("decode", "enrich")[i % 2],
                                    "reason": "bad", "error_class": "ValueError", "message": str(i),
                                    "pipeline_version": "0.1.0"} for i in range(k, k + 10)]) for k in range(0, 50, 10)]
  proxy.interrupt(3.0)  # S3 is unreachable when the first file is written
  counts = _run(proxy, lambda p: (p | beam.Create(letters, reshuffle=False)
                                  | WriteDeadLetters(f"s3://{bucket}/dead", retry=fx.FAST_RETRY)))
  assert counts["sink.dead_letters.retried"] >= 1
  assert counts["tier.dead_letters"] == 50
  assert sorted(_objects(client, bucket, "dead/")) == ["dead/decode.jsonl", "dead/enrich.jsonl"]
  sources = []
  for stage in ("decode", "enrich"):
    body = client.get_object(Bucket=bucket, Key=f"dead/{stage}.jsonl")["Body"].read().decode()
    sources.extend(json.loads(line)["source"] for line in body.splitlines())
  assert sorted(sources) == sorted(f"f#{i}" for i in range(50))
