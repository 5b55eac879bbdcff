"""The local servers answer as what they claim to be, and ``txstream.services`` only ever stops its own."""
import http.server
import io
import os
import re
import socket
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from tests import helpers as h
from tests.integration.conftest import S3_CREDENTIALS
from tests.unit.test_score import featured_batch
from txstream import services as local_services
from txstream.core import decide, rules
from txstream.core.contracts import FEATURE_NAMES
from txstream.io import parquet


def test_status_reports_redis_and_postgres_up(services):
  endpoints = services.require("redis", "postgres")
  statuses = local_services.status(["redis", "postgres"], quiet=True)
  for name in ("redis", "postgres"):
    assert statuses[name].up, name
    assert (statuses[name].host, statuses[name].port) == (endpoints[name].host, endpoints[name].port)
    assert statuses[name].owned == endpoints[name].owned

  import psycopg2
  import redis
  client = redis.Redis.from_url(endpoints["redis"].url)
  key = f"txstream:it:{uuid.uuid4().hex}"
  client.set(key, b"v", ex=60)
  assert client.get(key) == b"v"
  client.close()
  with psycopg2.connect(endpoints["postgres"].url, connect_timeout=5) as conn, conn.cursor() as cur:
    cur.execute("SELECT current_user")
    assert cur.fetchone() == ("postgres",)
  conn.close()


def test_kafka_produce_then_consume_through_tansu(services):
  from confluent_kafka import Consumer, Producer, TopicPartition
  from confluent_kafka.admin import AdminClient, NewTopic
  bootstrap = services.require("kafka").url
  topic = f"txstream-it-{uuid.uuid4().hex[:12]}"
  admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the futures it returns
  for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
    future.result(timeout=10)
  sent = [(f"k{i}".encode(), f"value-{i}".encode()) for i in range(3)]
  producer = Producer({"bootstrap.servers": bootstrap})
  for key, value in sent:
    producer.produce(topic, key=key, value=value)
  assert producer.flush(10) == 0

  # assign() rather than subscribe(): a group join on tansu takes seconds and is not what this checks.
  consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic, "enable.auto.commit": False})
  consumer.assign([TopicPartition(topic, 0, 0)])
  received = []
  try:
    for _ in range(100):
      message = consumer.poll(0.2)
      if message is not None:
        assert message.error() is None, message.error()
        received.append((message.key(), message.value()))
      if len(received) == len(sent):
        break
  finally:
    consumer.close()
  assert received == sent


def test_s3_write_and_read_through_beam_filesystems(s3_bucket):
  path = f"s3://{s3_bucket.bucket}/dir/hello.txt"
  payload = b"card transactions\n" * 1000
  with FileSystems.create(path) as f:
    f.write(payload)
  with FileSystems.open(path) as f:
    assert f.read() == payload
  [match] = FileSystems.match([f"s3://{s3_bucket.bucket}/dir/*"])
  assert [(m.path, m.size_in_bytes) for m in match.metadata_list] == [(path, len(payload))]


def test_cold_tier_day_file_on_s3(s3_bucket):
  t = h.T0 + 13 * h.HOUR_MS
  featured = featured_batch([[0.9] * len(FEATURE_NAMES), [0.1] * len(FEATURE_NAMES)]).table
  featured = featured.set_column(1, "event_time_ms", pa.array([t + 1, t], pa.int64()))
  decisions = decide.decide(featured, np.array([0.9, 0.1]), "model-1", rules.load_rules(), decided_at_ms=t + 5)
  root = f"s3://{s3_bucket.bucket}/cold"
  files = parquet.DayFiles(root)
  files.write(int(t // h.DAY_MS), decisions)
  assert files.publish("00000-s00-00", lambda copy, path: copy()) == 2

  # Read back with pyarrow's own S3 client, not Beam's, so the object is checked independently of the writer.
  s3 = pyarrow.fs.S3FileSystem(access_key=S3_CREDENTIALS["access_key_id"],
                               secret_key=S3_CREDENTIALS["secret_access_key"], region=S3_CREDENTIALS["region_name"],
                               endpoint_override=s3_bucket.endpoint_url)
  key = f"{s3_bucket.bucket}/cold/event_date=2018-04-01/part-00000-s00-00.parquet"
  with s3.open_input_file(key) as f:
    table = pq.read_table(io.BytesIO(f.read()))
  assert table.schema == parquet.COLD_SCHEMA
  assert table.column("transaction_id").to_pylist() == ["tx-0", "tx-1"]
  assert table.column("score").to_pylist() == [0.9, 0.1]
  assert table.column("tx_amount").to_pylist() == [0.9, 0.1]
  assert [v.timestamp() * 1000 for v in table.column("event_time").to_pylist()] == [t + 1, t]
  assert [v.timestamp() * 1000 for v in table.column("decided_at").to_pylist()] == [t + 5, t + 5]


def test_clickhouse_answers_select_version(services):
  from clickhouse_driver import Client
  endpoint = services.require("clickhouse")
  client = Client(host=endpoint.host, port=endpoint.port, connect_timeout=5)
  try:
    [(version,)] = client.execute("SELECT version()")
    assert client.execute("SELECT 1 + 1") == [(2,)]
  finally:
    client.disconnect()
  assert re.match(r"^\d+\.\d+\.\d+", version), version


class _FakeS3(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # pylint: disable=invalid-name
    body = b'<?xml version="1.0"?><ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>'
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def external_s3(tmp_path, monkeypatch):
  """An S3-answering server that is not ours, and a state dir whose pid file names a live foreign process."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeS3)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("TXSTREAM_SERVICES_DIR", str(tmp_path))
  monkeypatch.setenv("TXSTREAM_S3_ADDR", f"127.0.0.1:{server.server_port}")
  (tmp_path / "s3").mkdir()
  # This test process: alive, but not moto, so the pid file is stale and must not be signalled.
  (tmp_path / "s3" / "pid").write_text(f"{os.getpid()}\n")
  try:
    yield server.server_port
  finally:
    server.shutdown()
    server.server_close()


def test_down_leaves_a_server_that_is_not_ours_running(external_s3):
  assert local_services.status(["s3"], quiet=True)["s3"] == local_services.Status(
      "s3", "127.0.0.1", external_s3, True, False, None)
  endpoint = local_services.up(["s3"], quiet=True)["s3"]
  assert (endpoint.port, endpoint.owned) == (external_s3, False)

  assert local_services.down(["s3"], quiet=True) == {"s3": "not ours"}

  socket.create_connection(("127.0.0.1", external_s3), timeout=2).close()
  assert local_services.status(["s3"], quiet=True)["s3"].up


def test_unknown_service_is_one_line_error():
  with pytest.raises(local_services.ServiceError, match=r"^unknown service 'nosuch' \(known: redis, "):
    local_services.up(["nosuch"], quiet=True)
  assert local_services.main(["up", "nosuch"]) == 2
