"""OpenLineage events from run manifests: valid per the client, no secrets, and delivered to a file or HTTP."""
import http.server
import json
import logging
import threading
import urllib.parse
import uuid

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from openlineage.client.event_v2 import Job, Run, RunEvent, RunState

from txstream import lineage

_PASSWORD = "hunter2-secret"
_RERUN_ID = "rerun-20261201-abc"


def _manifest(**overrides) -> dict:
  """A manifest as ``run._start_manifest`` builds it, ended by a run with two input files and two tiers."""
  manifest = {
      "run_id": "0b3c1f4e-8a51-4d7e-9f7a-2a6f4c9b1d11", "kind": "run", "status": "succeeded",
      "started_at": "2026-12-01T06:00:00.123000+00:00", "finished_at": "2026-12-01T06:02:30.456000+00:00",
      "code": {"package_version": "0.1.0", "git_commit": "3f2a9c1d0e+dirty"},
      "schemas": [{"id": 1, "subject": "transactions-value", "sha256": "a" * 64},
                  {"id": 2, "subject": "labels-value", "sha256": "b" * 64}],
      "model": {"version": "xgb-7", "dir": "bundled", "sha256": "c" * 64},
      "rules": {"path": "bundled", "version": "rules-d41d8c"},
      "reference": {"dir": "/data/in/reference", "version": "ref-9e107d"},
      "source": {"input": "/data/in", "topic": None},
      "inputs": [{"stream": "transactions", "path": "/data/in/transactions/part-0.wire", "bytes": 100,
                  "sha256": "d" * 64, "records": [0, 40]},
                 {"stream": "labels", "path": "/data/in/labels/part-0.wire", "bytes": 10,
                  "sha256": "e" * 64, "records": [0, 3]}],
      "window": None,
      "outputs": {"cold_path": "/data/out/cold", "dead_letter_path": "/data/out/dead_letters"},
      "summary": {"events_in": 40, "scored": 38, "dead_letter_total": 2, "tiers": {"cold": 38, "warm": 38}},
  }
  manifest.update(overrides)
  return manifest


def _options(*extra) -> PipelineOptions:
  return PipelineOptions(["--cold_path", "/data/out/cold",
                          "--postgres_dsn", f"host=db.local port=5433 dbname=txstream user=tx password={_PASSWORD}",
                          *extra])


def _assert_valid(event: dict, event_type: str) -> None:
  """What the OpenLineage 2-0-2 RunEvent schema requires, checked with the client's own validating classes."""
  for key in ("eventTime", "producer", "schemaURL", "run", "job"):
    assert key in event, key
  assert event["eventType"] == event_type
  assert event["schemaURL"].startswith("https://openlineage.io/spec/2-0-2/OpenLineage.json")
  # Rebuilding through the client re-runs its validators: UUID runId, ISO-8601 date-time with a time.
  RunEvent(eventType=RunState(event["eventType"]), eventTime=event["eventTime"], producer=event["producer"],
           run=Run(runId=event["run"]["runId"]), job=Job(namespace=event["job"]["namespace"],
                                                          name=event["job"]["name"]))
  facets = [*event["run"]["facets"].values(), *event["job"]["facets"].values()]
  for dataset in event["inputs"] + event["outputs"]:
    assert dataset["namespace"] and dataset["name"]
    facets += [*dataset.get("facets", {}).values(), *dataset.get("inputFacets", {}).values(),
               *dataset.get("outputFacets", {}).values()]
  for facet in facets:
    for key in ("_producer", "_schemaURL"):
      parsed = urllib.parse.urlparse(facet[key])  # the spec's "format: uri": an absolute URI (a URL or a URN)
      assert (parsed.scheme == "https" and parsed.netloc) or (parsed.scheme == "urn" and parsed.path), (key, facet)


@pytest.mark.parametrize("event_type", ["START", "COMPLETE", "FAIL"])
def test_events_are_valid_openlineage(event_type):
  manifest = _manifest(error="RuntimeError: boom") if event_type == "FAIL" else _manifest()
  event = lineage.event(event_type, manifest, _options())
  _assert_valid(event, event_type)
  assert event["run"]["runId"] == manifest["run_id"]
  assert event["job"] == {"namespace": "txstream", "name": "txstream.run", "facets": event["job"]["facets"]}
  assert event["job"]["facets"]["sourceCodeLocation"]["version"] == "3f2a9c1d0e+dirty"
  assert event["run"]["facets"]["processing_engine"]["name"] == "Apache Beam"
  versions = event["run"]["facets"]["txstream_versions"]
  assert (versions["model"]["version"], versions["rules"]["version"], versions["reference"]["version"]) == (
      "xgb-7", "rules-d41d8c", "ref-9e107d")
  assert [s["sha256"] for s in versions["schemas"]] == ["a" * 64, "b" * 64]
  assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [
      ("file", "/data/in/transactions/part-0.wire"), ("file", "/data/in/labels/part-0.wire")]
  assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
      ("file", "/data/out/cold/decisions"), ("postgres://db.local:5433", "txstream.public.decisions")]
  assert event["eventTime"] == (manifest["started_at"] if event_type == "START" else manifest["finished_at"])


def test_inputs_carry_the_schema_of_their_stream():
  transactions, labels = lineage.event("START", _manifest(), _options())["inputs"]
  tx_fields = {f["name"]: f["type"] for f in transactions["facets"]["schema"]["fields"]}
  assert tx_fields["transaction_id"] == "string" and tx_fields["event_time"] == "timestamp-millis"
  assert "label_time" in {f["name"] for f in labels["facets"]["schema"]["fields"]}
  assert transactions["facets"]["schema"]["fields"][0]["ordinal_position"] == 1


def test_complete_carries_row_counts_and_start_does_not():
  complete = lineage.event("COMPLETE", _manifest(), _options())
  assert [d["outputFacets"]["outputStatistics"]["rowCount"] for d in complete["outputs"]] == [38, 38]
  start = lineage.event("START", _manifest(summary=None), _options())
  assert all(not d["outputFacets"] for d in start["outputs"])


def test_fail_carries_the_error():
  event = lineage.event("FAIL", _manifest(status="failed", error="OSError: disk full"), _options())
  assert event["run"]["facets"]["errorMessage"]["message"] == "OSError: disk full"
  assert event["run"]["facets"]["errorMessage"]["programmingLanguage"] == "python"
  assert "errorMessage" not in lineage.event("COMPLETE", _manifest(), _options())["run"]["facets"]


def test_no_password_in_any_event():
  options = _options("--redis_url", f"redis://:{_PASSWORD}@cache:6379/0",
                     "--clickhouse_url", f"clickhouse://tx:{_PASSWORD}@ch:9000/txstream")
  manifest = _manifest(status="failed", error=f"OperationalError: password={_PASSWORD} rejected")
  for event_type in ("START", "COMPLETE", "FAIL"):
    event = lineage.event(event_type, manifest, options)
    assert _PASSWORD not in json.dumps(event)
  assert ("clickhouse://ch:9000", "txstream.decisions") in [(d["namespace"], d["name"]) for d in event["outputs"]]
  assert ("redis://cache:6379", "0") in [(d["namespace"], d["name"]) for d in event["outputs"]]


def test_kafka_inputs_are_one_dataset_per_topic():
  inputs = [{"stream": "transactions", "topic": "tx", "partition": p, "offsets": [0, 9]} for p in (0, 1)]
  event = lineage.event("START", _manifest(inputs=inputs), _options("--bootstrap_servers", "k1:9092,k2:9092"))
  assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("kafka://k1:9092", "tx")]


def test_rerun_id_that_is_not_a_uuid_gets_a_stable_uuid5():
  manifest = _manifest(run_id=_RERUN_ID, kind="rerun", rerun_of="0b3c1f4e-8a51-4d7e-9f7a-2a6f4c9b1d11")
  start = lineage.event("START", manifest, _options())
  complete = lineage.event("COMPLETE", manifest, _options())
  run_id = uuid.UUID(start["run"]["runId"])
  assert run_id.version == 5
  assert complete["run"]["runId"] == start["run"]["runId"] == lineage.run_uuid(_RERUN_ID)
  assert lineage.run_uuid("rerun-other") != start["run"]["runId"]
  assert start["run"]["facets"]["txstream_versions"]["originalRunId"] == _RERUN_ID
  assert start["job"]["name"] == "txstream.rerun"


def test_file_sink_appends_one_line_per_event(tmp_path):
  path = tmp_path / "lineage.jsonl"
  options = _options("--openlineage_file", str(path))
  for event_type in ("START", "COMPLETE"):
    lineage.emit_run_event(event_type, _manifest(), options)
  lines = path.read_text(encoding="utf-8").splitlines()
  assert [json.loads(line)["eventType"] for line in lines] == ["START", "COMPLETE"]


class _Collector(http.server.BaseHTTPRequestHandler):
  received = []

  def do_POST(self):  # pylint: disable=invalid-name
    body = self.rfile.read(int(self.headers["Content-Length"]))
    self.received.append((self.path, self.headers.get("Authorization"), json.loads(body)))
    self.send_response(201)
    self.end_headers()

  def log_message(self, *args):  # pylint: disable=arguments-differ
    """Keeps the server quiet in test output."""


@pytest.fixture
def collector():
  _Collector.received = []
  server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
  server.shutdown()
  server.server_close()


def test_http_sink_posts_to_the_lineage_endpoint(collector, monkeypatch):
  url, received = collector
  monkeypatch.setenv(lineage.API_KEY_ENV, "key-1")
  lineage.emit_run_event("START", _manifest(), _options("--openlineage_url", url))
  assert len(received) == 1
  path, auth, body = received[0]
  assert (path, auth, body["eventType"], body["run"]["runId"]) == (
      "/api/v1/lineage", "Bearer key-1", "START", _manifest()["run_id"])


def test_unreachable_server_logs_one_warning_and_does_not_raise(caplog, tmp_path):
  server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
  port = server.server_address[1]
  server.server_close()  # nothing listens on the port now
  options = _options("--openlineage_url", f"http://127.0.0.1:{port}",
                     "--openlineage_file", str(tmp_path / "missing-dir" / "lineage.jsonl"))
  with caplog.at_level(logging.WARNING, logger=lineage.__name__):
    lineage.emit_run_event("COMPLETE", _manifest(), options)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2 and "not written" in warnings[0] and "not posted" in warnings[1]


def test_no_target_builds_nothing(monkeypatch):
  def fail(*_):
    raise AssertionError("event built without a lineage target")
  monkeypatch.setattr(lineage, "event", fail)
  lineage.emit_run_event("START", _manifest(), _options())
