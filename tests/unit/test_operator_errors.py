"""Operator mistakes end in one line, ``txstream: error: ...`` and exit 2, before any data is read.

Each test damages a tiny generated input (or a flag) and runs the real
``txstream run``: the error must name what to fix, and the run must not
have created its outputs. Also the pieces that keep runtime noise to one
line: librdkafka's rate-limited log lines, the Kafka authentication check
and clickhouse-driver's one-line connection warnings.
"""
import datetime
import logging
import shutil

import fastavro
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from txstream import cli
from txstream.config.options import DEFAULT_OUT
from txstream.io import clickhouse_sink  # pylint: disable=unused-import  (installs the driver's log filter)
from txstream.io.kafka_config import RDKAFKA_LOGGER, AuthenticationCheck, KafkaConfigError, _RateLimitedLines
from txstream.pipelines import run
from txstream.pipelines.generate import generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("generated") / "in"
  generate(str(out), customers=20, terminals=40, days=2, start=datetime.date(2018, 4, 1), seed=0)
  return out


@pytest.fixture
def data(generated, tmp_path):
  """A copy of the generated input to damage."""
  return shutil.copytree(generated, tmp_path / "in")


def _run(capsys, tmp_path, data_dir, *flags) -> str:
  """Runs ``txstream run``; asserts exit 2, one line on stderr, no output written; returns the message."""
  out = tmp_path / "out"
  argv = ["run", f"--input={data_dir}", f"--cold_path={out}/cold", f"--dead_letter_path={out}/dead", *flags]
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith("txstream: error: ")
  assert captured.out == ""
  assert not out.exists()
  return lines[0][len("txstream: error: "):]


def _rewrite(path, edit_schema=lambda schema: schema, edit_records=lambda records: records):
  with open(path, "rb") as f:
    reader = fastavro.reader(f)
    schema, records = reader.writer_schema, list(reader)
  with open(path, "wb") as f:
    fastavro.writer(f, fastavro.parse_schema(edit_schema(schema)), edit_records(records))


# -- 1. reference data -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["customers.avro", "terminals.avro"])
def test_empty_reference_file(capsys, tmp_path, data, name):
  path = data / "reference" / name
  _rewrite(path, edit_records=lambda records: [])
  assert _run(capsys, tmp_path, data) == (
      f"reference file {path} has no records: every transaction would be a dead letter")


def test_duplicate_reference_ids(capsys, tmp_path, data):
  path = data / "reference" / "customers.avro"
  # Customer 3 three times, customer 7 twice.
  _rewrite(path, edit_records=lambda records: records + [records[3], records[3], records[7]])
  assert _run(capsys, tmp_path, data) == (
      f"reference file {path}: customer_id 3 is on file 3 times (2 customer_ids are on file more than once)")


def test_renamed_reference_column(capsys, tmp_path, data):
  path = data / "reference" / "terminals.avro"

  def rename(schema):
    for field in schema["fields"]:
      if field["name"] == "x":
        field["name"] = "lon"
    return schema

  _rewrite(path, rename, lambda records: [{("lon" if k == "x" else k): v for k, v in r.items()} for r in records])
  assert _run(capsys, tmp_path, data) == (
      f"reference file {path} has no column 'x' (its columns: terminal_id, lon, y, merchant_category)")


def test_reference_file_that_is_not_avro(capsys, tmp_path, data):
  path = data / "reference" / "customers.avro"
  path.write_bytes(b"customer_id,home_x\n1,2\n")
  assert _run(capsys, tmp_path, data).startswith(f"reference file {path} is not an Avro container file")


def test_missing_reference_file(capsys, tmp_path, data):
  path = data / "reference" / "terminals.avro"
  path.unlink()
  assert _run(capsys, tmp_path, data).startswith(f"cannot read reference file {path}: ")


# -- 2. transactions and labels ---------------------------------------------------------------------------

def test_missing_transactions_directory(capsys, tmp_path, data):
  shutil.rmtree(data / "transactions")
  assert _run(capsys, tmp_path, data) == (
      f"--input {data}: missing transactions/ (not written by `txstream generate`?)")


def test_transactions_directory_without_wire_files(capsys, tmp_path, data):
  for path in (data / "transactions").iterdir():
    path.rename(path.with_suffix(".bak"))
  assert _run(capsys, tmp_path, data) == f"--input {data}: no transactions/*.wire files"


def test_missing_labels_file(capsys, tmp_path, data):
  (data / "labels" / "labels.wire").unlink()
  assert _run(capsys, tmp_path, data) == f"--input {data}: missing labels/labels.wire"


def test_a_complete_input_passes_the_checks(data, tmp_path):
  run.check_config(PipelineOptions([f"--input={data}"]))
  run.preflight_tiers(PipelineOptions([f"--cold_path={tmp_path}/out/cold", f"--dead_letter_path={tmp_path}/dead",
                                       f"--summary_json={tmp_path}/summary.json"]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # the checks leave nothing behind


# -- 3. rules file ----------------------------------------------------------------------------------------

RULES = """version: 1
score_thresholds:
  decline: 0.85
  review: 0.5
rules:
  - code: AMOUNT_OVER_LIMIT
    feature: TX_AMOUNT
    op: ">"
    value: 220.0
    action: review
"""


@pytest.mark.parametrize("old,new,expected", [
    ("value: 220.0", "value: 22O.0", "rule 1 (AMOUNT_OVER_LIMIT): value '22O.0' is not a number"),
    ("value: 220.0", "value: yes", "rule 1 (AMOUNT_OVER_LIMIT): value True is not a number"),
    ("score_thresholds:", "score_treshold:", "unknown key 'score_treshold' (did you mean 'score_thresholds'?)"),
    ("rules:", "rule:", "unknown key 'rule' (did you mean 'rules'?)"),
    ("decline: 0.85", "decine: 0.85", "score_thresholds: unknown key 'decine' (did you mean 'decline'?)"),
    ("review: 0.5", "review: half", "score_thresholds: review 'half' is not a number"),
    ("    action: review", "    action: review\n    actoin: decline",
     "rule 1 (AMOUNT_OVER_LIMIT): unknown key 'actoin' (did you mean 'action'?)"),
    ("    action: review", "    action: review\n    severity: 3",
     "rule 1 (AMOUNT_OVER_LIMIT): unknown key 'severity' (one of: code, feature, op, value, action, ratio_of)"),
    ('op: ">"', 'op: ">>"', "rule 1 (AMOUNT_OVER_LIMIT): unknown op '>>' (did you mean '>'?)"),
    ("action: review", "action: reveiw",
     "rule 1 (AMOUNT_OVER_LIMIT): unknown action 'reveiw' (did you mean 'review'?)"),
    ("feature: TX_AMOUNT", "feature: TX_AMOUNTS",
     "rule 1 (AMOUNT_OVER_LIMIT): unknown feature 'TX_AMOUNTS' (did you mean 'TX_AMOUNT'?)"),
])
def test_rules_file_mistakes(capsys, tmp_path, data, old, new, expected):
  rules = tmp_path / "rules.yaml"
  assert old in RULES
  rules.write_text(RULES.replace(old, new, 1))
  message = _run(capsys, tmp_path, data, f"--rules={rules}")
  assert message.startswith(f"rules file {rules}")
  assert message.endswith(expected)


def test_the_bundled_rules_file_is_valid(data):
  run.check_config(PipelineOptions([f"--input={data}"]))


# -- 4. output paths --------------------------------------------------------------------------------------

def test_cold_path_under_a_file(capsys, tmp_path, data):
  (tmp_path / "a_file").write_text("")
  assert cli.main(["run", f"--input={data}", f"--cold_path={tmp_path}/a_file/cold",
                   f"--dead_letter_path={tmp_path}/out/dead"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"txstream: error: --cold_path {tmp_path}/a_file/cold: {tmp_path}/a_file is not a folder"]
  assert not (tmp_path / "out").exists()


def test_dead_letter_path_under_a_file(capsys, tmp_path, data):
  (tmp_path / "a_file").write_text("")
  assert _run(capsys, tmp_path, data, f"--dead_letter_path={tmp_path}/a_file/dead/x") == (
      f"--dead_letter_path {tmp_path}/a_file/dead/x: {tmp_path}/a_file is not a folder")


def test_summary_json_under_a_file(capsys, tmp_path, data):
  (tmp_path / "a_file").write_text("")
  assert _run(capsys, tmp_path, data, f"--summary_json={tmp_path}/a_file/runs/summary.json") == (
      f"--summary_json {tmp_path}/a_file/runs: {tmp_path}/a_file is not a folder")


def test_the_summary_folder_is_made_once_every_check_passed(tmp_path):
  summary = tmp_path / "runs" / "today" / "summary.json"
  run.preflight_tiers(PipelineOptions([f"--cold_path={tmp_path}/cold", f"--dead_letter_path={tmp_path}/dead",
                                       f"--summary_json={summary}"]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and summary.parent.is_dir()


def test_summary_json_that_is_a_folder(capsys, tmp_path, data):
  assert _run(capsys, tmp_path, data, f"--summary_json={data}") == f"--summary_json {data}: is a folder, not a file"


def test_default_output_paths_are_relative(tmp_path, monkeypatch):
  # The defaults (out/cold, out/dead_letters) need only the working directory to be writable.
  monkeypatch.chdir(tmp_path)
  run.preflight_tiers(PipelineOptions([]))
  assert not (tmp_path / DEFAULT_OUT).exists()


# -- runtime noise as one line ----------------------------------------------------------------------------

class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _record(text: str) -> logging.LogRecord:
  return logging.LogRecord(RDKAFKA_LOGGER.name, logging.ERROR, __file__, 1, "%s", (text,), None)


def test_librdkafka_lines_are_rate_limited_per_shape():
  clock = _Clock()
  lines = _RateLimitedLines(interval_s=60, clock=clock)
  refused = "FAIL [txstream#consumer-{}] [thrd:b:9092]: Connect to b:9092 failed: Connection refused (after {}ms)"
  kept = [lines.filter(_record(refused.format(n, n * 3))) for n in range(100)]
  assert kept == [True] + [False] * 99
  assert lines.filter(_record("FAIL [txstream#consumer-1] [thrd:b:9092]: Receive failed: Disconnected"))
  clock.now = 61
  record = _record(refused.format(1, 0))
  assert lines.filter(record)
  assert record.getMessage().endswith("(99 more like it in the last 60 s)")


def test_librdkafka_authentication_failures_are_left_to_the_error_callback():
  lines = _RateLimitedLines()
  assert not lines.filter(_record("FAIL [c] [thrd:b]: b: SASL PLAIN mechanism handshake failed: Broker: Unsupported"))
  assert not lines.filter(_record("FAIL [c] [thrd:b]: b: SASL authentication error: Authentication failed: bad pw"))


def test_authentication_check_raises_once_and_ignores_other_errors():
  from confluent_kafka import KafkaError
  check = AuthenticationCheck()
  check(KafkaError(KafkaError._TRANSPORT, "b:9092: Connect failed"))  # pylint: disable=protected-access
  failed = KafkaError(KafkaError._AUTHENTICATION,  # pylint: disable=protected-access
                      "sasl_plaintext://b:9092/bootstrap: SASL PLAIN mechanism handshake failed: Broker: no "
                      "(after 0ms in state AUTH_HANDSHAKE)")
  with pytest.raises(KafkaConfigError) as raised:
    check(failed)
  assert str(raised.value) == ("Kafka authentication failed: sasl_plaintext://b:9092/bootstrap: SASL PLAIN "
                               "mechanism handshake failed: Broker: no")
  check(failed)  # the client's close() serves the same error again: it must not raise there


def test_clickhouse_driver_warnings_are_one_line(caplog):
  try:
    raise ConnectionRefusedError(111, "Connection refused")
  except ConnectionRefusedError:
    with caplog.at_level(logging.WARNING, logger="clickhouse_driver.connection"):
      logging.getLogger("clickhouse_driver.connection").warning("Failed to connect to %s:%s", "h", 9000,
                                                                exc_info=True)
  assert caplog.text.count("\n") == 1 and "Traceback" not in caplog.text
  assert caplog.records[0].getMessage() == "Failed to connect to h:9000: [Errno 111] Connection refused"


def test_stream_checks_its_reference_data_too(capsys, data):
  # `txstream stream` fails on empty reference data before it connects to anything (no broker is needed).
  path = data / "reference" / "terminals.avro"
  _rewrite(path, edit_records=lambda records: [])
  assert cli.main(["stream", "--topic=t", "--bootstrap_servers=127.0.0.1:1", f"--reference_dir={data}/reference",
                   "--duration_s=1"]) == 2
  assert capsys.readouterr().err == (
      f"txstream: error: reference file {path} has no records: every transaction would be a dead letter\n")
