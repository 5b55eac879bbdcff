"""End to end: generated files with damaged records through `txstream run`.

Every input must end in exactly one place (scored, dead letter, filtered), the
damaged records must be exactly the dead letters, each with its reason, and a
rerun must replace the cold tier rather than add to it.
"""
import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from txstream.pipelines import generate, run


@pytest.fixture(scope="module")
def corrupted_input(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("gen"))
  generate.generate(out, customers=200, terminals=400, days=8, start=generate.datetime.date(2018, 4, 1), seed=7,
                    corrupt_fraction=0.01)
  return out


def _run(input_dir, out_dir):
  summary_path = os.path.join(out_dir, "summary.json")
  summary = run.run([f"--input={input_dir}", f"--cold_path={out_dir}/cold",
                     f"--dead_letter_path={out_dir}/dead", f"--summary_json={summary_path}"])
  with open(summary_path, encoding="utf-8") as f:
    assert json.load(f) == summary
  return summary


def _cold_ids(out_dir):
  ids = []
  for path in glob.glob(f"{out_dir}/cold/decisions/*/*.parquet"):
    ids.extend(pq.read_table(path, columns=["transaction_id"]).column("transaction_id").to_pylist())
  return ids


def _dead_letters(out_dir):
  letters = []
  for path in glob.glob(f"{out_dir}/dead/*.jsonl"):
    with open(path, encoding="utf-8") as f:
      letters.extend(json.loads(line) for line in f if line.strip())
  return letters


def test_damaged_records_are_exactly_the_dead_letters(corrupted_input, tmp_path):
  with open(os.path.join(corrupted_input, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  with open(os.path.join(corrupted_input, "corrupted.json"), encoding="utf-8") as f:
    corrupted = json.load(f)
  assert {c["kind"] for c in corrupted} == set(generate.DAMAGE), "the sample must hold every kind of damage"

  summary = _run(corrupted_input, str(tmp_path))

  assert summary["events_in"] == manifest["transactions"]
  assert summary["scored"] + summary["dead_letter_total"] + summary["filtered"] == summary["events_in"]
  assert summary["dead_letter_total"] == len(corrupted)
  letters = _dead_letters(str(tmp_path))
  assert sorted((x["source"], x["reason"]) for x in letters) == sorted((c["source"], c["reason"]) for c in corrupted)
  assert all(x["raw_base64"] for x in letters), "dead letters keep the original bytes"
  ids = _cold_ids(str(tmp_path))
  assert len(ids) == len(set(ids)) == summary["scored"] == summary["tiers"]["cold"]
  assert not set(ids) & {c["transaction_id"] for c in corrupted}


def test_rerun_replaces_the_cold_tier(corrupted_input, tmp_path):
  first = _run(corrupted_input, str(tmp_path))
  files = sorted(glob.glob(f"{tmp_path}/cold/decisions/*/*.parquet"))
  second = _run(corrupted_input, str(tmp_path))
  assert sorted(glob.glob(f"{tmp_path}/cold/decisions/*/*.parquet")) == files
  ids = _cold_ids(str(tmp_path))
  assert len(ids) == len(set(ids)) == first["scored"] == second["scored"]
