"""Legacy extract: round trip to the generated transactions, local times across DST, rules, determinism, CLI."""
import csv
import datetime
import decimal
import json
import os
import re
import shlex
import zoneinfo

import pyarrow as pa
import pytest

from txstream import cli
from txstream.core import contracts, decode
from txstream.io import schema_registry, wire
from txstream.pipelines import generate, legacy

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# Central European Summer Time ends on 2018-10-28 at 01:00 UTC: the days generated straddle it.
DST_END = datetime.date(2018, 10, 27)
ARGS = {"customers": 150, "terminals": 300, "days": 3, "start": DST_END, "corrupt_fraction": 0.1}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("legacy") / "data")
  manifest = generate.generate(out, seed=6, legacy_extract=True, **ARGS)
  return out, manifest


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _epoch_ms(text):
  return (datetime.datetime.fromisoformat(text) - EPOCH) // datetime.timedelta(milliseconds=1)


def _accepted(out):
  """transaction_id -> record of every message the run decodes and accepts."""
  decoder = decode.Decoder(schema_registry.FileSchemaRegistry(), schema_registry.TRANSACTION_SUBJECT)
  records = {}
  directory = os.path.join(out, "transactions")
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      for _, message in wire.read_frames(f):
        try:
          _, record = decoder.decode_message(message)
        except (wire.WireFormatError, decode.InvalidRecord):
          continue
        records[record["transaction_id"]] = record
  return records


def _table(event_ms, amounts):
  n = len(event_ms)
  return pa.table({"transaction_id": [f"t{i}" for i in range(n)], "event_time": pa.array(event_ms, pa.int64()),
                   "customer_id": pa.array(range(n), pa.int64()), "terminal_id": pa.array(range(n), pa.int64()),
                   "amount_minor": pa.array(amounts, pa.int64()), "currency": ["EUR"] * n})


def _ms(*local):
  return (datetime.datetime(*local, tzinfo=PARIS) - EPOCH) // datetime.timedelta(milliseconds=1)


def test_header_and_manifest(generated):
  out, manifest = generated
  path = os.path.join(out, "legacy", "decisions.csv")
  with open(path, encoding="utf-8") as f:
    assert f.readline().strip() == ",".join(legacy.COLUMNS)
  assert manifest["legacy_extract"] == {"path": path, "rows": len(_rows(path))}
  with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
    assert json.load(f)["legacy_extract"] == manifest["legacy_extract"]


def test_every_accepted_transaction_exactly_once(generated):
  out, manifest = generated
  rows = _rows(os.path.join(out, "legacy", "decisions.csv"))
  accepted = _accepted(out)
  refs = [r["TXN_REF"] for r in rows]
  assert len(refs) == len(set(refs)) == len(accepted) == manifest["transactions"] - manifest["corrupted"]
  assert set(refs) == set(accepted)
  for row in rows:
    record = accepted[row["TXN_REF"]]
    assert int(row["CUST_NO"]) == record["customer_id"]
    assert int(row["TERM_NO"]) == record["terminal_id"]
    assert row["CCY"] == record["currency"]
    assert re.fullmatch(r"\d+\.\d\d", row["AMT"]), row["AMT"]
    assert decimal.Decimal(row["AMT"]) * 100 == record["amount_minor"]
    assert _epoch_ms(row["TXN_TS_LOCAL"]) == record["event_time"]


def test_corrupted_records_are_left_out(generated):
  out, manifest = generated
  with open(os.path.join(out, "corrupted.json"), encoding="utf-8") as f:
    corrupted = {c["transaction_id"] for c in json.load(f)}
  assert len(corrupted) == manifest["corrupted"] > 0
  assert not corrupted & {r["TXN_REF"] for r in _rows(os.path.join(out, "legacy", "decisions.csv"))}


def test_local_times_follow_paris_across_the_dst_change(generated):
  out, _ = generated
  rows = _rows(os.path.join(out, "legacy", "decisions.csv"))
  offsets = set()
  for row in rows:
    local = datetime.datetime.fromisoformat(row["TXN_TS_LOCAL"])
    assert local.utcoffset() == local.astimezone(PARIS).utcoffset()
    offsets.add(row["TXN_TS_LOCAL"][-6:])
  assert offsets == {"+02:00", "+01:00"}


@pytest.mark.parametrize("event_ms, text", [
    (1_521_939_599_000, "2018-03-25T01:59:59+01:00"),      # last second of winter time
    (1_521_939_600_000, "2018-03-25T03:00:00+02:00"),      # 02:00 local never happens
    (1_521_939_600_123, "2018-03-25T03:00:00.123+02:00"),  # milliseconds kept when present
    (1_540_688_399_999, "2018-10-28T02:59:59.999+02:00"),  # first 02:59 of the night
    (1_540_688_400_000, "2018-10-28T02:00:00+01:00"),      # ...and 02:00 again an hour later
    (1_522_541_585_000, "2018-04-01T02:13:05+02:00"),
])
def test_local_time_text_and_exact_round_trip(event_ms, text):
  frame = legacy.extract(_table([event_ms], [100]))
  assert frame["TXN_TS_LOCAL"].to_list() == [text]
  assert _epoch_ms(text) == event_ms


@pytest.mark.parametrize("amount, text", [
    (1, "0.01"), (10, "0.10"), (105, "1.05"), (22_000, "220.00"),
    (100_000_000_000, "1000000000.00"),
    (2**53 + 1, "90071992547409.93"),  # not representable as a float
])
def test_amount_is_exact(amount, text):
  assert legacy.extract(_table([1_522_541_585_000], [amount]))["AMT"].to_list() == [text]


@pytest.mark.parametrize("local, amount, decision, rule", [
    ((2018, 4, 1, 14, 0), 22_001, "DECLINED", "HIGH_AMOUNT"),
    ((2018, 4, 1, 3, 0), 22_001, "DECLINED", "HIGH_AMOUNT"),
    ((2018, 4, 1, 14, 0), 22_000, "APPROVED", None),
    ((2018, 4, 1, 0, 0), 22_000, "REFERRED", "NIGHT_HIGH_AMOUNT"),
    ((2018, 4, 1, 5, 59, 59, 999_000), 15_000, "REFERRED", "NIGHT_HIGH_AMOUNT"),
    ((2018, 4, 1, 6, 0), 15_000, "APPROVED", None),
    ((2018, 4, 1, 3, 0), 14_999, "APPROVED", None),
    ((2018, 12, 1, 5, 30), 18_000, "REFERRED", "NIGHT_HIGH_AMOUNT"),  # local winter night, 04:30 UTC
    ((2018, 7, 1, 6, 30), 18_000, "APPROVED", None),                  # local summer morning, 04:30 UTC
])
def test_rules(local, amount, decision, rule):
  frame = legacy.extract(_table([_ms(*local)], [amount]))
  assert frame.row(0, named=True)["DECISION"] == decision
  assert frame.row(0, named=True)["RULE_HIT"] == rule


def test_generated_decisions_follow_the_rules(generated):
  out, _ = generated
  rows = _rows(os.path.join(out, "legacy", "decisions.csv"))
  seen = set()
  for row in rows:
    amount = decimal.Decimal(row["AMT"])
    night = datetime.datetime.fromisoformat(row["TXN_TS_LOCAL"]).hour < 6
    if amount > 220:
      expected = ("DECLINED", "HIGH_AMOUNT")
    elif amount >= 150 and night:
      expected = ("REFERRED", "NIGHT_HIGH_AMOUNT")
    else:
      expected = ("APPROVED", "")
    assert (row["DECISION"], row["RULE_HIT"]) == expected, row
    seen.add(row["DECISION"])
  assert seen == {"APPROVED", "REFERRED", "DECLINED"}  # seed 6 exercises every rule


def test_deterministic_with_the_seed(tmp_path, generated):
  out, _ = generated
  with open(os.path.join(out, "legacy", "decisions.csv"), "rb") as f:
    first = f.read()
  generate.generate(str(tmp_path / "same"), seed=6, legacy_extract=True, **ARGS)
  generate.generate(str(tmp_path / "other"), seed=7, legacy_extract=True, **ARGS)
  with open(tmp_path / "same" / "legacy" / "decisions.csv", "rb") as f:
    assert f.read() == first
  with open(tmp_path / "other" / "legacy" / "decisions.csv", "rb") as f:
    assert f.read() != first


def test_reconcile_map_covers_the_columns():
  words = shlex.split(legacy.RECONCILE_MAP)
  assert words[::2] == ["--map"] * (len(words) // 2)
  pairs = dict(w.split("=", 1) for w in words[1::2])
  assert set(pairs) == set(legacy.COLUMNS) - {"RULE_HIT"}
  assert {p.split(":")[0] for p in pairs.values()} <= set(contracts.DECISION.names)
  values = re.fullmatch(r"decision:values\((.*)\)", pairs["DECISION"]).group(1)
  mapped = dict(v.split("=") for v in values.split(","))
  assert set(mapped) == {"APPROVED", "REFERRED", "DECLINED"}
  assert set(mapped.values()) == set(contracts.ACTIONS)


def test_cli_flag(capsys, tmp_path):
  out = str(tmp_path / "data")
  argv = ["generate", "--out", out, "--customers", "20", "--terminals", "40", "--days", "2", "--seed", "3"]
  assert cli.main(argv + ["--legacy_extract"]) == 0
  manifest = json.loads(capsys.readouterr().out)
  path = os.path.join(out, "legacy", "decisions.csv")
  assert manifest["legacy_extract"] == {"path": path, "rows": manifest["transactions"]}
  assert len(_rows(path)) == manifest["transactions"] > 0
  plain = str(tmp_path / "plain")
  assert cli.main(["generate", "--out", plain] + argv[3:]) == 0
  assert "legacy_extract" not in json.loads(capsys.readouterr().out)
  assert not os.path.exists(os.path.join(plain, "legacy"))
