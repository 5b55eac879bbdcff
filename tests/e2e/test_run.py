"""End to end: generated files with damaged records through `txstream run`.

Every input must end in exactly one place (scored, dead letter, filtered), the
damaged records must be exactly the dead letters, each with its reason; a
rerun replaces its rows in the cold tier (a new table version), and split
inputs sharing days add to each other.
"""
import glob
import json
import os
import shutil

import pytest

from txstream.io import cold_table, wire
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


def _cold_ids(out_dir, version=None):
  return cold_table.read(f"{out_dir}/cold", version=version).column("transaction_id").to_pylist()


def _dead_letters(out_dir):
  letters = []
  for path in glob.glob(f"{out_dir}/dead/*.jsonl"):
    with open(path, encoding="utf-8") as f:
      letters.extend(json.loads(line) for line in f if line.strip())
  return letters


def test_metrics_file_and_lineage_events_hold_the_run_figures(corrupted_input, tmp_path):
  from prometheus_client.parser import text_string_to_metric_families
  summary = run.run([f"--input={corrupted_input}", f"--cold_path={tmp_path}/cold", f"--dead_letter_path={tmp_path}/d",
                     f"--metrics_file={tmp_path}/m/txstream.prom", f"--openlineage_file={tmp_path}/lineage.jsonl"])
  with open(tmp_path / "lineage.jsonl", encoding="utf-8") as f:
    events = [json.loads(line) for line in f]
  assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
  assert events[0]["run"]["runId"] == events[1]["run"]["runId"] == summary["run_id"]
  cold = [o for o in events[1]["outputs"] if o["name"].endswith("cold/decisions")]
  assert cold[0]["outputFacets"]["outputStatistics"]["rowCount"] == summary["tiers"]["cold"]
  assert summary["metrics_file"] == f"{tmp_path}/m/txstream.prom"
  with open(summary["metrics_file"], encoding="utf-8") as f:
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(f.read()) for s in family.samples}
  assert samples[("txstream_events_in_total", ())] == summary["events_in"]
  assert sum(v for (name, _), v in samples.items() if name == "txstream_dead_letters_total") == (
      summary["dead_letter_total"])
  assert sum(v for (name, _), v in samples.items() if name == "txstream_decisions_total") == summary["scored"]


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


def test_a_rerun_replaces_its_rows_as_a_new_version(corrupted_input, tmp_path):
  first = _run(corrupted_input, str(tmp_path))
  second = _run(corrupted_input, str(tmp_path))
  assert (first["cold_table_version"], second["cold_table_version"]) == (1, 2)
  ids = _cold_ids(str(tmp_path))
  assert len(ids) == len(set(ids)) == first["scored"] == second["scored"]
  assert sorted(_cold_ids(str(tmp_path), version=1)) == sorted(ids)  # time travel: the first run's version
  assert not os.listdir(f"{tmp_path}/cold/_staging"), "a committed run leaves no staged files"
  # The raw archive holds every accepted message once, whatever the number of runs.
  assert [s["raw_archive"]["raw"]["version"] for s in (first, second)] == [1, 2]
  archived = cold_table.read(f"{tmp_path}/cold", table="raw").column("transaction_id").to_pylist()
  assert sorted(archived) == sorted(ids)


def test_split_inputs_sharing_days_keep_every_row(corrupted_input, tmp_path):
  # Two runs over halves of the same days into one cold tier: the second adds to the first, never replaces.
  halves = [tmp_path / "a", tmp_path / "b"]
  for half in halves:
    for sub in ("labels", "reference"):
      shutil.copytree(f"{corrupted_input}/{sub}", half / sub)
    (half / "transactions").mkdir()
  for path in sorted(glob.glob(f"{corrupted_input}/transactions/*.wire")):
    with open(path, "rb") as f:
      frames = [m for _, m in wire.read_frames(f)]
    for k, half in enumerate(halves):
      with open(half / "transactions" / os.path.basename(path), "wb") as f:
        wire.write_frames(f, frames[k::2])
  out = tmp_path / "out"
  summaries = [run.run([f"--input={half}", f"--cold_path={out}/cold", f"--dead_letter_path={out}/dead-{half.name}"])
               for half in halves]
  ids = _cold_ids(str(out))
  assert len(ids) == len(set(ids)) == sum(s["scored"] for s in summaries)
  archived = cold_table.read(f"{out}/cold", table="raw").column("transaction_id").to_pylist()
  assert sorted(archived) == sorted(ids)
  labels = cold_table.read(f"{out}/cold", table="raw_labels")
  assert labels.num_rows == summaries[0]["labels_in"] == summaries[1]["labels_in"]
