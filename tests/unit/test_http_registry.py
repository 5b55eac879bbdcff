"""HttpSchemaRegistry against a Confluent-compatible REST endpoint served by the test.

No registry server is packaged for this machine, so the test serves the
Confluent REST paths the client uses (GET /schemas/ids/N, GET
/subjects/S/versions/latest, POST /subjects/S/versions) from the bundled schemas.
"""
import http.server
import json
import threading

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from txstream.io import schema_registry
from txstream.transforms.validate import DecodeAndValidate

FILES = schema_registry.FileSchemaRegistry()


class _Handler(http.server.BaseHTTPRequestHandler):
  seen_auth = []
  registered = {}

  def log_message(self, *args):  # keep test output quiet
    pass

  def _send(self, code, payload):
    body = json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):  # pylint: disable=invalid-name
    self.seen_auth.append(self.headers.get("Authorization"))
    parts = self.path.strip("/").split("/")
    try:
      if parts[:2] == ["schemas", "ids"]:
        return self._send(200, {"schema": FILES.schema_json(int(parts[2]))})
      if parts[0] == "subjects" and parts[2:] == ["versions", "latest"]:
        schema_id, schema = FILES.latest(parts[1])
        return self._send(200, {"id": schema_id, "schema": schema, "subject": parts[1], "version": 1})
    except schema_registry.UnknownSchemaError:
      pass
    return self._send(404, {"error_code": 40403, "message": "Schema not found"})

  def do_POST(self):  # pylint: disable=invalid-name
    length = int(self.headers["Content-Length"])
    schema = json.loads(self.rfile.read(length))["schema"]
    self.registered.setdefault(schema, 100 + len(self.registered))
    return self._send(200, {"id": self.registered[schema]})


@pytest.fixture(scope="module")
def registry_url():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()


def test_client_reads_ids_subjects_and_registers(registry_url, monkeypatch):
  monkeypatch.setenv("TXSTREAM_SCHEMA_REGISTRY_AUTH", "Basic dGVzdDp0ZXN0")
  client = schema_registry.HttpSchemaRegistry(registry_url)
  assert json.loads(client.schema_json(1)) == json.loads(FILES.schema_json(1))
  assert client.latest(schema_registry.TRANSACTION_SUBJECT)[0] == 2
  with pytest.raises(schema_registry.UnknownSchemaError):
    client.schema_json(999)
  schema = schema_registry.load_schema_file("transaction_v2.avsc")
  first = client.register("transactions-value", schema)
  assert client.register("transactions-value", schema) == first
  assert "Basic dGVzdDp0ZXN0" in _Handler.seen_auth


def test_bad_url():
  with pytest.raises(ValueError, match="http://"):
    schema_registry.HttpSchemaRegistry("registry.local:8081")


def test_pipeline_decodes_through_http_registry(registry_url):
  inputs = [h.raw(0, h.message(h.tx_record(1, h.T0))), h.raw(1, h.message(h.tx_record(2, h.T0), schema_id=1)),
            h.raw(2, h.message(h.tx_record(3, h.T0))[:1] + (999).to_bytes(4, "big") + b"\x00")]
  with TestPipeline() as p:
    out = p | beam.Create([h.raw_batch(inputs)]) | DecodeAndValidate(registry_url)
    assert_that(h.flat(out.valid, "Ids", "transaction_id", "schema_id"),
                equal_to([("tx-00001", 2), ("tx-00002", 1)]), label="valid")
    assert_that(h.flat(out.dead_letters, "Reasons", "source", "reason"),
                equal_to([("test.wire#2", "unknown_schema_id")]), label="dead")
