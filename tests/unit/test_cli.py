"""The `txstream` command: help for every subcommand, one-line errors, exit codes."""
import json
import os
import subprocess
import sys

import pytest

from txstream import cli

TXSTREAM = [sys.executable, "-m", "txstream.cli"]


def _one_line_error(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("txstream: error: ")
  assert "\n" not in err and "Traceback" not in err
  return err


@pytest.mark.parametrize("command", [[], ["generate"], ["run"], ["train"]])
def test_help(command):
  done = subprocess.run(TXSTREAM + command + ["--help"], capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert "usage:" in done.stdout


def test_run_help_lists_own_flags(capsys):
  assert cli.main(["run", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--input", "--cold_path", "--redis_url", "--summary_json", "--model_dir"):
    assert flag in out


def test_unknown_flag(capsys):
  assert "--no_such_flag" in _one_line_error(capsys, ["run", "--input", "x", "--no_such_flag=1"])


def test_bad_value(capsys):
  assert "allowed_lateness_s" in _one_line_error(capsys, ["run", "--input", "x", "--allowed_lateness_s", "soon"])


def test_missing_input(capsys, tmp_path):
  assert "no such directory" in _one_line_error(capsys, ["run", "--input", str(tmp_path / "absent")])
  assert "--input" in _one_line_error(capsys, ["run"])


def test_not_generated_input(capsys, tmp_path):
  assert "missing transactions/" in _one_line_error(capsys, ["run", "--input", str(tmp_path)])


def test_corrupt_model(capsys, tmp_path):
  (tmp_path / "transactions").mkdir()
  (tmp_path / "labels").mkdir()
  (tmp_path / "reference").mkdir()
  model = tmp_path / "model"
  model.mkdir()
  (model / "metadata.json").write_text(json.dumps({"content_hash": "0" * 64}))
  (model / "model.json").write_text("{}")
  assert "content hash" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--model_dir", str(model)])
  assert "cannot read" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--model_dir",
                                                   str(tmp_path / "nomodel")])


def test_bad_rules(capsys, tmp_path):
  for sub in ("transactions", "labels", "reference"):
    (tmp_path / sub).mkdir()
  rules = tmp_path / "rules.yaml"
  rules.write_text("version: 1\nrules:\n  - code: X\n    feature: NOT_A_FEATURE\n    op: '>'\n    value: 1\n"
                   "    action: review\n")
  assert "NOT_A_FEATURE" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--rules", str(rules)])


def test_generate_errors(capsys, tmp_path):
  assert "not a date" in _one_line_error(capsys, ["generate", "--out", str(tmp_path), "--start", "April"])
  assert "corrupt_fraction" in _one_line_error(capsys, ["generate", "--out", str(tmp_path),
                                                        "--corrupt_fraction", "2"])


def test_unknown_command(capsys):
  assert "invalid choice" in _one_line_error(capsys, ["frobnicate"])


def test_console_script_error_has_no_traceback(tmp_path):
  done = subprocess.run(TXSTREAM + ["run", "--input", str(tmp_path / "absent")], capture_output=True, text=True,
                        timeout=120, check=False, env=dict(os.environ, PYTHONWARNINGS="ignore"))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [f"txstream: error: --input {tmp_path / 'absent'}: no such directory"]
