"""Schema contract: every version reads every other's data; the evolution rule is enforced."""
import io
import itertools
import json

import fastavro
import pytest

from txstream.io import compatibility, schema_registry, wire

REGISTRY = schema_registry.FileSchemaRegistry()


def _subjects():
  by_subject = {}
  for entry in REGISTRY.entries():
    by_subject.setdefault(entry["subject"], []).append(entry)
  return {s: sorted(v, key=lambda e: e["version"]) for s, v in by_subject.items()}


def _sample(schema: dict) -> dict:
  values = {"string": "x", "long": 1_522_540_800_000, "int": 7, "boolean": True, "double": 1.5}
  record = {}
  for field in schema["fields"]:
    t = field["type"]
    if isinstance(t, list):
      record[field["name"]] = values[t[1]]
    elif isinstance(t, dict):
      record[field["name"]] = values[t["type"]]
    else:
      record[field["name"]] = values[t]
  return record


@pytest.mark.parametrize("subject", sorted(_subjects()))
def test_every_version_reads_every_other(subject):
  versions = _subjects()[subject]
  for writer, reader in itertools.product(versions, versions):
    writer_schema = REGISTRY.parsed(writer["id"])
    reader_schema = REGISTRY.parsed(reader["id"])
    record = _sample(json.loads(REGISTRY.schema_json(writer["id"])))
    message = wire.encode(writer["id"], writer_schema, record)
    schema_id, body = wire.split_header(message)
    assert schema_id == writer["id"]
    decoded = fastavro.schemaless_reader(io.BytesIO(body), writer_schema, reader_schema)
    reader_fields = [f["name"] for f in json.loads(REGISTRY.schema_json(reader["id"]))["fields"]]
    assert list(decoded) == reader_fields
    for name in reader_fields:
      if name in record:
        assert decoded[name] == record[name], (writer["version"], reader["version"], name)
      else:
        assert decoded[name] is None  # added fields default to null


@pytest.mark.parametrize("subject", sorted(_subjects()))
def test_repo_schemas_follow_the_evolution_rule(subject):
  versions = [json.loads(REGISTRY.schema_json(e["id"])) for e in _subjects()[subject]]
  assert compatibility.check_full(versions) == []


def test_breaking_changes_are_named():
  v1 = json.loads(REGISTRY.schema_json(1))
  removed = dict(v1, fields=v1["fields"][:-1])
  retyped = dict(v1, fields=[dict(f, type="int") if f["name"] == "amount_minor" else f for f in v1["fields"]])
  no_default = dict(v1, fields=v1["fields"] + [{"name": "channel", "type": "string"}])
  assert compatibility.check_evolution(v1, removed) == ["field 'currency' removed or renamed"]
  assert compatibility.check_evolution(v1, retyped) == ["field 'amount_minor' retyped"]
  assert compatibility.check_evolution(v1, no_default) == ["field 'channel' added without a default"]
  with_default = dict(v1, fields=v1["fields"] + [{"name": "channel", "type": ["null", "string"], "default": None}])
  assert compatibility.check_evolution(v1, with_default) == []


def test_wire_header_errors_have_reasons():
  with pytest.raises(wire.WireFormatError) as e:
    wire.split_header(b"\x01\x00\x00\x00\x02abc")
  assert e.value.reason == "bad_magic_byte"
  with pytest.raises(wire.WireFormatError) as e:
    wire.split_header(b"\x00\x00")
  assert e.value.reason == "truncated_header"
  with pytest.raises(wire.WireFormatError) as e:
    wire.split_header(None)
  assert e.value.reason == "null_value"


def test_frames_round_trip_and_damage():
  buf = io.BytesIO()
  assert wire.write_frames(buf, [b"a", b"bc", b""]) == 3
  assert list(wire.read_frames(io.BytesIO(buf.getvalue()))) == [(0, b"a"), (1, b"bc"), (2, b"")]
  cut = io.BytesIO(buf.getvalue()[:-3])
  with pytest.raises(wire.WireFormatError) as e:
    list(wire.read_frames(cut))
  assert e.value.reason == "truncated_frame"
  with pytest.raises(wire.WireFormatError) as e:
    list(wire.read_frames(io.BytesIO(b"PAR1....")))
  assert e.value.reason == "not_a_frame_file"


def test_unknown_schema_id():
  with pytest.raises(schema_registry.UnknownSchemaError):
    REGISTRY.schema_json(999)
  assert REGISTRY.latest("transactions-value")[0] == 2
