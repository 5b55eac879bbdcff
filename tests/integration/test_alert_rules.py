"""The Prometheus alert rules, checked and unit-tested by the real promtool.

promtool is installed on demand like the runners (``txstream services up
promtool``: Debian's prometheus package, the binary only). A machine that
cannot install it fails these tests with the one-line reason; they are never
skipped.
"""
import pathlib
import shutil
import subprocess

import pytest

from txstream import services

RULES_DIR = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="module", name="promtool")
def _promtool():
  try:
    return services.install_promtool(lambda line: None)
  except services.ServiceError as e:
    pytest.fail(str(e), pytrace=False)


def _run(promtool, *args, cwd=RULES_DIR):
  return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_rules_are_valid(promtool):
  done = _run(promtool, "check", "rules", "alerts.yml")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "SUCCESS: 6 rules found" in done.stdout


def test_every_rule_fires_and_stays_quiet_as_its_unit_tests_expect(promtool):
  done = _run(promtool, "test", "rules", "alerts_test.yml")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "SUCCESS" in done.stdout


def test_the_unit_tests_catch_a_loosened_threshold(promtool, tmp_path):
  # The tests must be able to fail: a dead-letter threshold of 50% no longer fires at 10%.
  shutil.copy(RULES_DIR / "alerts_test.yml", tmp_path)
  text = (RULES_DIR / "alerts.yml").read_text()
  assert "> 0.05" in text
  (tmp_path / "alerts.yml").write_text(text.replace("> 0.05", "> 0.5"))
  done = _run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
  assert done.returncode != 0
  assert "TxstreamDeadLetterRateHigh" in done.stdout + done.stderr
