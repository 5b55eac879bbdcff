"""The README's parallel-run walkthrough: generate with a legacy extract, run, reconcile against the legacy side.

The legacy system decides with its own rule table, so decisions may differ;
everything else (ids, amounts, times, customers, terminals, currency) must
reconcile exactly through the documented mapping, and the report must count
exactly the decisions the two systems made differently.
"""
import json
import shlex

import polars as pl

from txstream import cli
from txstream.io import cold_table
from txstream.pipelines import legacy


def test_legacy_extract_reconciles_through_the_documented_mapping(tmp_path, capsys):
  data, out = tmp_path / "in", tmp_path / "out"
  assert cli.main(["generate", f"--out={data}", "--customers=120", "--terminals=240", "--days=4", "--seed=5",
                   "--corrupt_fraction=0.01", "--legacy_extract"]) == 0
  assert cli.main(["run", f"--input={data}", f"--cold_path={out}/cold", f"--dead_letter_path={out}/dead"]) == 0
  capsys.readouterr()
  status = cli.main(["reconcile", f"--left=delta:{out}/cold", f"--right=csv:{data}/legacy/decisions.csv",
                     *shlex.split(legacy.RECONCILE_MAP), "--by=day", f"--report={out}/report"])
  report = json.loads((out / "report" / "report.json").read_text())
  ours = pl.from_arrow(cold_table.read(f"{out}/cold")).select("transaction_id", "decision")
  theirs = pl.read_csv(data / "legacy" / "decisions.csv", infer_schema=False).select(
      pl.col("TXN_REF").alias("transaction_id"),
      pl.col("DECISION").replace_strict({"APPROVED": "approve", "REFERRED": "review", "DECLINED": "decline"}))
  differing = ours.join(theirs, on="transaction_id").filter(pl.col("decision") != pl.col("DECISION")).height
  assert report["matched"] == report["left_rows"] == report["right_rows"] == ours.height > 0
  assert report["missing_in_left"] == report["missing_in_right"] == 0
  assert report["mismatches_by_column"] == {"amount_minor": 0, "currency": 0, "customer_id": 0,
                                            "decision": differing, "event_time_ms": 0, "terminal_id": 0}
  assert report["mismatched_rows"] == differing > 0 and status == 1 and not report["parity"]
  assert len(report["windows"]) == 4 and sum(w["mismatched_rows"] for w in report["windows"]) == differing
  assert "<svg" in (out / "report" / "report.html").read_text()
