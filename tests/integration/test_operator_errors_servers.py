"""Operator mistakes and outages against the real local servers: one line each on stderr, never a traceback.

``txstream run`` runs in a subprocess where logging is involved, so stderr
holds everything an operator sees.
"""
import datetime
import os
import subprocess
import sys
import time
import uuid

import pytest
from clickhouse_driver import Client

from tests.integration import sink_fixtures as fx
from tests.integration.conftest import S3_CREDENTIALS
from tests.tcp_proxy import TcpProxy
from txstream import cli
from txstream.io.kafka_config import PASSWORD_ENV
from txstream.pipelines.generate import generate
from txstream.services import CLICKHOUSE_HTTP_PORT
from txstream.transforms.tiers import check_writable

TXSTREAM = [sys.executable, "-m", "txstream.cli"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("generated") / "in"
  generate(str(out), customers=20, terminals=40, days=2, start=datetime.date(2018, 4, 1), seed=0)
  return out


def _txstream(*argv, env=None, timeout=120):
  began = time.monotonic()
  done = subprocess.run(TXSTREAM + list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                        env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
  return done, time.monotonic() - began


def _outputs(tmp_path):
  return [f"--cold_path={tmp_path}/out/cold", f"--dead_letter_path={tmp_path}/out/dead"]


def test_unreachable_clickhouse_is_one_line(generated, tmp_path):
  port = fx.free_port()
  done, _ = _txstream("run", f"--input={generated}", *_outputs(tmp_path),
                      f"--clickhouse_url=clickhouse://127.0.0.1:{port}/txstream")
  assert done.returncode == 2
  assert done.stderr.splitlines() == [
      f"txstream: error: cannot connect to ClickHouse at 127.0.0.1:{port}: Connection refused (127.0.0.1:{port})"]
  assert not (tmp_path / "out").exists()


def test_a_run_through_a_clickhouse_outage_logs_one_line_per_retry(services, generated, tmp_path):
  endpoint = services.require("clickhouse")
  database = f"txstream_oe_{uuid.uuid4().hex[:8]}"
  with TcpProxy(endpoint.host, CLICKHOUSE_HTTP_PORT) as proxy:  # inserts go over HTTP
    process = subprocess.Popen(
        TXSTREAM + ["run", f"--input={generated}", *_outputs(tmp_path),
                    f"--clickhouse_url=clickhouse://{endpoint.host}:{endpoint.port}/{database}?http_port={proxy.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    # Preflight's check of the HTTP port is the first request; once it is through, the next bytes (the
    # worker's) start the outage.
    deadline = time.monotonic() + 60
    sent = 0
    while process.poll() is None and time.monotonic() < deadline and not (sent and sent == proxy.bytes_up):
      sent = proxy.bytes_up
      time.sleep(0.2)
    proxy.interrupt_after_bytes(1, outage_s=3.0)
    out, err = process.communicate(timeout=120)
    assert proxy.interruptions == 1
  assert process.returncode == 0, err
  assert "Traceback" not in err
  retries = [line for line in err.splitlines() if "analytics sink: attempt" in line]
  assert len(retries) >= 2, err
  assert all(" WARNING txstream.io.sinks: analytics sink: attempt " in line and "; retrying in " in line
             for line in retries)
  client = Client(endpoint.host, port=endpoint.port)
  try:
    written = client.execute(f"SELECT count() FROM {database}.decisions FINAL")[0][0]
    client.execute(f"DROP DATABASE {database}")
  finally:
    client.disconnect()
  assert '"scored": %d' % written in out and written > 0


def test_failed_kafka_authentication_is_one_line_at_once(services, generated, tmp_path):
  kafka = services.require("kafka")
  done, seconds = _txstream(
      "run", f"--topic=oe-{uuid.uuid4().hex[:8]}", f"--bootstrap_servers={kafka.url}",
      "--kafka_security_protocol=SASL_PLAINTEXT", "--kafka_sasl_mechanism=PLAIN", "--kafka_sasl_username=nobody",
      f"--reference_dir={generated}/reference", *_outputs(tmp_path), env={PASSWORD_ENV: "wrong"})
  assert done.returncode == 2
  lines = done.stderr.splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("txstream: error: Kafka authentication failed: ")
  assert "SASL PLAIN" in lines[0]
  assert seconds < 20  # librdkafka would retry until the 30 s metadata timeout


def test_missing_s3_bucket_is_one_line_before_the_run(services, generated, tmp_path, capsys):
  # No logging involved: in process, which is faster.
  endpoint = services.require("s3").url
  bucket = f"txstream-absent-{uuid.uuid4().hex[:12]}"
  assert cli.main(["run", f"--input={generated}", f"--cold_path=s3://{bucket}/cold",
                   f"--dead_letter_path={tmp_path}/out/dead", f"--s3_endpoint_url={endpoint}",
                   f"--s3_access_key_id={S3_CREDENTIALS['access_key_id']}",
                   f"--s3_secret_access_key={S3_CREDENTIALS['secret_access_key']}",
                   f"--s3_region_name={S3_CREDENTIALS['region_name']}"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"txstream: error: --cold_path s3://{bucket}/cold: S3 bucket '{bucket}': no such bucket"]
  assert not (tmp_path / "out").exists()


def test_an_existing_s3_bucket_passes(s3_bucket):
  check_writable(f"s3://{s3_bucket.bucket}/cold", "--cold_path", s3_bucket.options)
  check_writable(f"s3://{s3_bucket.bucket}", "--dead_letter_path", s3_bucket.options)
