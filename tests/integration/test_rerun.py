"""Run manifests and compliance reruns, on real files and a real PostgreSQL.

A run leaves a manifest (beside the cold table and in ``runs``) that names
its code, schemas, model, rules, reference data and inputs; a rerun of a
window from that manifest gives the original's decisions for the window,
in its own namespace; a changed model or rules file is refused unless given
explicitly; a promoted rerun is a new version of the production table, and
the version before it still reads as the original.
"""
import datetime
import hashlib
import json
import os
import shutil

import polars as pl
import psycopg2
import pytest
import yaml

from txstream import cli
from txstream.io import cold_table, parquet
from txstream.pipelines import generate, manifest, rerun, run
from txstream.pipelines.run import ConfigError

WINDOW = ("2018-04-15", "2018-04-18")


@pytest.fixture(scope="module")
def dsn(fresh_postgres):
  return fresh_postgres("txstream_rerun")


@pytest.fixture(scope="module")
def original(tmp_path_factory, dsn):
  """One run over 20 days, with its own rules file (so a test can change it)."""
  base = tmp_path_factory.mktemp("rerun")
  generate.generate(str(base / "in"), customers=150, terminals=300, days=20, start=datetime.date(2018, 4, 1),
                    seed=11)
  rules = base / "rules.yaml"
  shutil.copy(os.path.join(os.path.dirname(run.__file__), "..", "config", "rules.yaml"), rules)
  summary = run.run([f"--input={base}/in", f"--cold_path={base}/cold", f"--dead_letter_path={base}/dead",
                     f"--postgres_dsn={dsn}", f"--rules={rules}"])
  return {"base": base, "summary": summary, "rules": rules, "run_id": summary["run_id"]}


def _rerun(original, dsn, *extra):
  base = original["base"]
  return rerun.rerun(rerun.PipelineOptions([
      f"--of={original['run_id']}", f"--from={WINDOW[0]}", f"--to={WINDOW[1]}", f"--cold_path={base}/cold",
      f"--dead_letter_path={base}/dead", f"--postgres_dsn={dsn}", *extra]))


def _window_rows(root, version=None) -> pl.DataFrame:
  lo, hi = (datetime.datetime.fromisoformat(d).replace(tzinfo=datetime.timezone.utc) for d in WINDOW)
  rows = pl.from_arrow(cold_table.read(str(root), version=version))
  return rows.filter((pl.col("event_time") >= lo) & (pl.col("event_time") < hi)).drop("decided_at").sort(
      "transaction_id")


def test_a_run_records_its_manifest_beside_the_output_and_in_runs(original, dsn):
  base, summary = original["base"], original["summary"]
  path = manifest.path_for(str(base / "cold"), summary["run_id"])
  assert summary["manifest"] == path
  with open(path, encoding="utf-8") as f:
    m = json.load(f)
  assert m["status"] == "succeeded" and m["kind"] == "run" and m["summary"]["events_in"] == summary["events_in"]
  assert m["code"]["package_version"] and m["code"]["git_commit"]
  assert {s["id"] for s in m["schemas"]} >= {2} and all(len(s["sha256"]) == 64 for s in m["schemas"])
  with open(os.path.join(os.path.dirname(run.__file__), "..", "models", "default", "model.json"), "rb") as f:
    assert m["model"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert m["rules"] == {"path": str(original["rules"]), "version": summary["rules_version"]}
  assert m["reference"]["version"] == summary["reference_version"]
  transactions = [i for i in m["inputs"] if i["stream"] == "transactions"]
  assert len(transactions) == 20
  assert sum(i["records"][1] for i in transactions) == summary["events_in"]
  for entry in transactions[:2]:
    with open(entry["path"], "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT code_version, rules_version, status, kind, manifest, finished_at IS NOT NULL "
                "FROM runs WHERE run_id = %s", (summary["run_id"],))
    code_version, rules_version, status, kind, stored, finished = cur.fetchone()
  assert (code_version, rules_version, status, kind, finished) == (
      m["code"]["git_commit"], summary["rules_version"], "succeeded", "run", True)
  assert stored == json.loads(json.dumps(m))


def test_a_run_archives_every_accepted_message_once(original):
  base, summary = original["base"], original["summary"]
  assert summary["raw_archive"]["raw"]["messages"] == summary["events_in"] - summary["dead_letter_total"] > 0
  assert summary["raw_archive"]["raw_labels"]["messages"] == summary["labels_in"] > 0
  raw = pl.from_arrow(cold_table.read(str(base / "cold"), table="raw"))
  assert raw.height == summary["events_in"] and raw["transaction_id"].n_unique() == raw.height
  decisions = pl.from_arrow(cold_table.read(str(base / "cold")))
  assert set(raw["transaction_id"]) == set(decisions["transaction_id"])
  assert set(raw["schema_id"]) == {2} and raw["value"].bin.starts_with(b"\x00").all()
  assert (raw.sort("transaction_id")["event_time"] == decisions.sort("transaction_id")["event_time"]).all()


def test_a_rerun_from_the_archive_needs_no_original_input(original, dsn):
  base = original["base"]
  os.rename(base / "in" / "transactions", base / "in" / "moved")
  try:
    summary = _rerun(original, dsn, "--rerun_id=archived")
  finally:
    os.rename(base / "in" / "moved", base / "in" / "transactions")
  with open(summary["manifest"], encoding="utf-8") as f:
    assert set(json.load(f)["archive"]["versions"]) == {"raw", "raw_labels"}
  assert _window_rows(base / "cold" / "reruns" / "archived").equals(_window_rows(base / "cold"))


def test_a_rerun_of_a_window_gives_the_original_decisions_in_its_own_namespace(original, dsn):
  base = original["base"]
  summary = _rerun(original, dsn, "--rerun_id=same", f"--input={base}/in")
  assert summary["kind"] == "rerun" and summary["rerun_of"] == original["run_id"]
  assert summary["scored"] + summary["dead_letter_total"] + summary["filtered"] == summary["events_in"]
  assert summary["filtered_by_reason"]["before_window"] > 0 and summary["filtered_by_reason"]["after_window"] > 0
  again, before = _window_rows(base / "cold" / "reruns" / "same"), _window_rows(base / "cold")
  assert again.height == summary["scored"] > 0
  assert again.equals(before)
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM rerun_same.decisions")
    assert cur.fetchone()[0] == summary["scored"]
    cur.execute("SELECT count(*) FROM public.decisions")
    assert cur.fetchone()[0] == original["summary"]["scored"]
    cur.execute("SELECT kind, status, manifest->>'rerun_of', manifest->'window'->>'from' FROM runs "
                "WHERE run_id = 'same'")
    assert cur.fetchone() == ("rerun", "succeeded", original["run_id"], "2018-04-15T00:00:00+00:00")


def test_a_rerun_reconciles_with_its_original_to_parity(original, dsn, tmp_path, capsys):
  base = original["base"]
  _rerun(original, dsn, "--rerun_id=proof")
  columns = [f.name for f in parquet.COLD_SCHEMA if f.name not in ("transaction_id", "decided_at")]
  args = ["reconcile", f"--left=delta:{base}/cold@{original['summary']['cold_table_version']}", "--right=rerun:proof",
          f"--cold_path={base}/cold", f"--from={WINDOW[0]}", f"--to={WINDOW[1]}", "--by=day",
          f"--report={tmp_path}/report"]
  assert cli.main(args + [f"--columns={','.join(columns)}"]) == 0
  with open(tmp_path / "report" / "report.json", encoding="utf-8") as f:
    report = json.load(f)
  assert report["parity"] and report["matched"] == report["left_rows"] == report["right_rows"] > 0
  assert [w["window"] for w in report["windows"]] == ["2018-04-15", "2018-04-16", "2018-04-17"]
  # decided_at is when each run decided: it differs on every row, and reconcile says so.
  capsys.readouterr()
  assert cli.main(args + ["--columns=decided_at"]) == 1
  assert json.loads(capsys.readouterr().out)["mismatched_rows"] == report["matched"]


def test_a_rerun_refuses_changed_rules_unless_given_explicitly(original, dsn, tmp_path):
  rules = yaml.safe_load(original["rules"].read_text())
  rules["score_thresholds"]["review"] = 0.05
  changed = tmp_path / "rules.yaml"
  changed.write_text(yaml.safe_dump(rules))
  saved = original["rules"].read_bytes()
  original["rules"].write_text(yaml.safe_dump(rules))
  try:
    with pytest.raises(ConfigError, match="rules of run .* was rules-"):
      _rerun(original, dsn, "--rerun_id=refused")
  finally:
    original["rules"].write_bytes(saved)
  summary = _rerun(original, dsn, "--rerun_id=explicit", f"--rules={changed}")
  with open(summary["manifest"], encoding="utf-8") as f:
    assert json.load(f)["overridden"] == {"rules": str(changed)}


def test_a_promoted_rerun_is_a_new_version_and_the_one_before_reads_as_the_original(original, dsn, tmp_path):
  base = original["base"]
  rules = yaml.safe_load(original["rules"].read_text())
  rules["score_thresholds"]["review"] = 0.05
  stricter = tmp_path / "rules.yaml"
  stricter.write_text(yaml.safe_dump(rules))
  before = _window_rows(base / "cold")
  version_before = original["summary"]["cold_table_version"]
  summary = _rerun(original, dsn, "--rerun_id=promoted", f"--rules={stricter}", "--promote")
  assert summary["namespace"] == "production" and summary["cold_table_version"] == version_before + 1
  after = _window_rows(base / "cold")
  assert after.height == before.height
  assert (after["decision"] != before["decision"]).sum() > 0, "stricter rules must change some decisions"
  assert _window_rows(base / "cold", version=version_before).equals(before)
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM public.decisions WHERE rules_version = %s", (summary["rules_version"],))
    assert cur.fetchone()[0] == summary["scored"]


def test_the_command_reruns_and_reports_mistakes_in_one_line(original, dsn, capsys):
  base = original["base"]
  # This input's days decline far more than the default data-quality bounds allow (exit 3): not this test's concern.
  common = [f"--cold_path={base}/cold", f"--dead_letter_path={base}/dead", f"--of={original['run_id']}",
            "--dq_fail_ok"]
  assert cli.main(["rerun", "--from=2018-04-16", "--to=2018-04-17", "--rerun_id=cli", *common]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["run_id"] == "cli" and printed["scored"] == _window_rows(base / "cold").filter(
      pl.col("event_time").dt.day() == 16).height
  assert cli.main(["rerun", "--from=2018-04-16", "--to=2018-04-17", "--rerun_id=a b", *common]) == 2
  assert capsys.readouterr().err.strip() == "txstream: error: --rerun_id 'a b': use 1-48 letters, digits, - and _"


def test_bad_windows_are_one_line_errors(original, dsn):
  with pytest.raises(ConfigError, match="must be after"):
    rerun.rerun(rerun.PipelineOptions(["--from=2018-04-10", "--to=2018-04-09", f"--input={original['base']}/in"]))
  with pytest.raises(ConfigError, match="not a date"):
    rerun.rerun(rerun.PipelineOptions(["--from=yesterday", "--to=2018-04-09", f"--input={original['base']}/in"]))
  with pytest.raises(ConfigError, match="no manifest for run nope"):
    _rerun({"base": original["base"], "run_id": "nope"}, dsn)
