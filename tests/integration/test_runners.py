"""The bounded graph on every runner that runs here: the same input, the same decisions, the same counts.

DirectRunner (the in-process FnApiRunner), PrismRunner (Beam's Go runner,
built by ``txstream services up prism``) and PortableRunner on the embedded
job service each run ``txstream run`` as a user would, with no runner flag
beyond ``--runner``; every column of every cold-tier row (but the decision
time) and every summary count must be equal.
"""
import datetime
import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from txstream import services as local_services
from txstream.io import cold_table
from txstream.pipelines import generate
from txstream.runners import install

RUNNERS = {
    "direct": [],
    "prism": ["--runner=PrismRunner"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed"],
}
COUNTS = ("events_in", "scored", "dead_letter_total", "dead_letter", "filtered", "labels_in", "decisions", "tiers",
          "model_version", "rules_version", "reference_version")


@pytest.fixture(scope="module")
def prism():
  try:
    install.up(["prism"], lambda line: None)
  except local_services.ServiceError as e:
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("matrix"))
  generate.generate(out, customers=120, terminals=240, days=6, start=datetime.date(2018, 4, 1), seed=5,
                    corrupt_fraction=0.01)
  return out


def _run(runner: str, input_dir: str, out: str) -> dict:
  summary = os.path.join(out, "summary.json")
  command = [sys.executable, "-m", "txstream.cli", "run", f"--input={input_dir}", f"--cold_path={out}/cold",
             f"--dead_letter_path={out}/dead", f"--summary_json={summary}"] + RUNNERS[runner]
  done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, f"{runner}: {done.stderr[-2000:]}"
  with open(summary, encoding="utf-8") as f:
    return json.load(f)


def _cold(out: str) -> pa.Table:
  return cold_table.read(f"{out}/cold").drop_columns(["decided_at"]).sort_by("transaction_id")


def _dead_letters(out: str) -> list:
  lines = []
  for path in glob.glob(f"{out}/dead/*.jsonl"):
    with open(path, encoding="utf-8") as f:
      lines.extend(f.read().splitlines())
  return sorted(lines)


def test_direct_prism_and_portable_give_identical_decisions(prism, input_dir, tmp_path):  # pylint: disable=unused-argument
  results = {runner: (_run(runner, input_dir, str(tmp_path / runner))) for runner in RUNNERS}
  direct = results["direct"]
  assert direct["scored"] > 1000 and direct["dead_letter_total"] > 0
  reference = _cold(str(tmp_path / "direct"))
  for runner, summary in results.items():
    assert {k: summary[k] for k in COUNTS} == {k: direct[k] for k in COUNTS}, runner
    assert _cold(str(tmp_path / runner)).equals(reference), runner
    assert _dead_letters(str(tmp_path / runner)) == _dead_letters(str(tmp_path / "direct")), runner
