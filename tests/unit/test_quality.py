"""Data-quality suites (txstream.quality): each planted defect fails exactly its expectation; drift fails its window."""
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from txstream.core import contracts
from txstream.quality import report, validate

T0 = 1_522_540_800_000  # 2018-04-01T00:00:00Z
DAY = contracts.DAY_MS
REVIEW, DECLINE = 0.5, 0.85


def decisions(days: int = 10, per_day: int = 1000, seed: int = 3, decline_every: int = 400) -> pa.Table:
  """Clean decisions: ``per_day`` a day, one decline in ``decline_every`` (score 0.9), the rest approved."""
  rng = np.random.default_rng(seed)
  n = days * per_day
  t = T0 + np.repeat(np.arange(days), per_day) * DAY + rng.integers(0, DAY, n)
  declined = np.arange(n) % decline_every == 0
  score = np.where(declined, 0.9, rng.uniform(0, 0.02, n))
  columns = {"transaction_id": pa.array([f"tx-{i:06d}" for i in range(n)]),
             "amount_minor": pa.array(rng.integers(100, 20_000, n)),
             "currency": pa.array(["EUR"] * n),
             "event_time_ms": pa.array(t),
             "score": pa.array(score),
             "decision": pa.array(np.where(declined, "decline", "approve")),
             "reason_codes": pa.array([[contracts.SCORE_HIGH] if d else [] for d in declined],
                                      pa.list_(pa.string())),
             "model_version": pa.array(["m1"] * n),
             "decided_at_ms": pa.array(t + 5)}
  for name in contracts.FEATURE_COLUMNS:
    columns[name] = pa.array(rng.uniform(0, 1, n))
  return pa.table(columns)


def counts(table: pa.Table, dead: int = 0) -> dict:
  return {"events_in": table.num_rows + dead, "scored": table.num_rows, "dead_letter_total": dead, "filtered": 0}


def with_values(table: pa.Table, row: int, **values) -> pa.Table:
  for name, value in values.items():
    column = table.column(name).to_pylist()
    column[row] = value
    table = table.set_column(table.schema.get_field_index(name), name,
                             pa.array(column, table.schema.field(name).type))
  return table


def failures(result: dict) -> set:
  return {(s["suite"], f["expectation"], f["column"]) for s in result["suites"] for f in s["failed"]}


@pytest.fixture(scope="module", name="config")
def _config():
  return validate.QualityConfig.load()


def test_clean_decisions_pass_every_suite(config):
  table = decisions()
  result = validate.check(table, counts(table), config, REVIEW, DECLINE)
  assert result["success"], failures(result)
  assert [(s["suite"], s["evaluated"]) for s in result["suites"]] == [
      ("decisions", 10), ("feature_ranges", 30), ("window_distribution", 4), ("run_distribution", 5)]
  assert len(result["suites"][2]["windows"]) == 10
  json.dumps(result)  # JSON-able as it is, for the summary and dq_results


_DEFECTS = [
    ({"transaction_id": "tx-000002"}, ("decisions", "expect_column_values_to_be_unique", "transaction_id"),
     ["tx-000002", "tx-000002"]),
    ({"transaction_id": None}, ("decisions", "expect_column_values_to_not_be_null", "transaction_id"), None),
    ({"amount_minor": -5}, ("decisions", "expect_column_values_to_be_between", "amount_minor"), [-5]),
    ({"currency": "EUX"}, ("decisions", "expect_column_values_to_be_in_set", "currency"), ["EUX"]),
    # An approved score of 1.5 is out of range, and above the decline threshold too.
    ({"score": 1.5}, ("decisions", "expect_column_values_to_be_between", "score"), [1.5],
     ("decisions", "expect_column_values_to_be_in_set", "score_band")),
    # An unknown decision has no consistent reasons or score band either.
    ({"decision": "maybe"}, ("decisions", "expect_column_values_to_be_in_set", "decision"), ["maybe"],
     ("decisions", "expect_column_values_to_be_in_set", "decision_evidence"),
     ("decisions", "expect_column_values_to_be_in_set", "score_band")),
    ({"decision": "review", "score": 0.6}, ("decisions", "expect_column_values_to_be_in_set", "decision_evidence"),
     ["review:none"]),
    ({"score": 0.95}, ("decisions", "expect_column_values_to_be_in_set", "score_band"), ["high:approve"]),
    ({"terminal_id_risk_7day_window": 1.7}, ("feature_ranges", "expect_column_values_to_be_between",
                                             "terminal_id_risk_7day_window_max"), [1.7]),
    ({"customer_id_nb_tx_1day_window": -2.0}, ("feature_ranges", "expect_column_values_to_be_between",
                                               "customer_id_nb_tx_1day_window_min"), [-2.0]),
    ({"model_version": None}, ("decisions", "expect_column_values_to_not_be_null", "model_version"), None),
]


@pytest.mark.parametrize("values,expected,observed,also", [d[:3] + (d[3:],) for d in _DEFECTS])
def test_each_planted_defect_fails_exactly_its_expectation(config, values, expected, observed, also):
  table = with_values(decisions(), 1, **values)
  result = validate.check(table, counts(table), config, REVIEW, DECLINE)
  assert not result["success"]
  assert failures(result) == {expected, *also}
  failed = next(f for s in result["suites"] for f in s["failed"] if (s["suite"], f["expectation"], f["column"]) == expected)
  if observed is not None:
    assert failed["observed"] == observed
  if "unexpected_count" in failed:
    assert failed["unexpected_count"] == (2 if values.get("transaction_id") else 1)


def test_event_times_outside_the_run_s_window_fail(config):
  table = decisions(days=3)
  window = (T0, T0 + 2 * DAY)  # the third day is outside
  result = validate.check(table, counts(table), config, REVIEW, DECLINE, window=window)
  assert failures(result) == {("decisions", "expect_column_values_to_be_between", "event_time_ms")}
  assert result["suites"][0]["failed"][0]["unexpected_count"] == 1000


def test_a_day_with_ten_times_the_decline_rate_fails_exactly_its_window_s_decline_rate(config):
  table = decisions(days=10, decline_every=400)  # 0.25% declined a day
  drifted_day = 6
  rows = np.arange(drifted_day * 1000, (drifted_day + 1) * 1000)
  decline = set(rows[::40].tolist())  # 2.5% of the day declined: ten times the usual rate (one in 400 are already)
  decision = table.column("decision").to_pylist()
  score = table.column("score").to_pylist()
  reasons = table.column("reason_codes").to_pylist()
  for i in decline:
    decision[i], score[i], reasons[i] = "decline", 0.9, [contracts.SCORE_HIGH]
  table = (table.set_column(table.schema.get_field_index("decision"), "decision", pa.array(decision))
           .set_column(table.schema.get_field_index("score"), "score", pa.array(score))
           .set_column(table.schema.get_field_index("reason_codes"), "reason_codes",
                       pa.array(reasons, pa.list_(pa.string()))))
  tight = validate.QualityConfig(**{**config.__dict__, "window": {**config.window, "decline_rate": {"max": 0.02}}})
  result = validate.check(table, counts(table), tight, REVIEW, DECLINE)
  assert failures(result) == {("window_distribution", "expect_column_values_to_be_between", "decline_rate")}
  windows = result["suites"][2]["windows"]
  failed = [w for w in windows if not w["success"]]
  assert [w["window_start_ms"] for w in failed] == [T0 + drifted_day * DAY]
  assert failed[0]["failed"][0]["observed"] == pytest.approx(len(decline | set(rows[::400].tolist())) / 1000)
  assert result["suites"][2]["failed_windows"] == 1


def test_volume_drift_and_dead_letters_and_unaccounted_events_fail_the_distribution_suites(config):
  table = decisions(days=5)
  keep = np.ones(table.num_rows, bool)
  keep[2000:2900] = False  # the middle day lost 90% of its decisions
  thin = table.filter(pa.array(keep))
  result = validate.check(thin, {"events_in": thin.num_rows + 500, "scored": thin.num_rows,
                                 "dead_letter_total": 400, "filtered": 0}, config, REVIEW, DECLINE)
  assert failures(result) == {("window_distribution", "expect_column_values_to_be_between", "rows_vs_median"),
                              ("run_distribution", "expect_column_values_to_be_between", "dead_letter_rate"),
                              ("run_distribution", "expect_column_values_to_be_between", "unaccounted")}
  run_failed = {f["column"]: f["observed"] for f in result["suites"][3]["failed"]}
  assert run_failed["unaccounted"] == [100]


def test_without_decisions_the_run_suite_still_reads_the_counters(config):
  counts_only = {"events_in": 1100, "scored": 1000, "dead_letter_total": 100, "filtered": 0,
                 "decisions": {"approve": 800, "review": 100, "decline": 100}}
  result = validate.check(None, counts_only, config, REVIEW, DECLINE)
  assert [s["evaluated"] for s in result["suites"]] == [0, 0, 0, 5]
  assert failures(result) == {("run_distribution", "expect_column_values_to_be_between", "decline_rate"),
                              ("run_distribution", "expect_column_values_to_be_between", "review_rate"),
                              ("run_distribution", "expect_column_values_to_be_between", "dead_letter_rate")}


def test_a_run_too_small_for_its_rates_is_held_to_its_accounting_only(config):
  table = decisions(days=1, per_day=90, decline_every=10)  # 10% declined, far above the bounds
  result = validate.check(table, {**counts(table, dead=50), "events_in": 141}, config, REVIEW, DECLINE)
  assert failures(result) == {("run_distribution", "expect_column_values_to_be_between", "unaccounted")}
  assert "fewer than run.min_rows (1000)" in result["suites"][3]["note"]
  big = decisions(days=1, per_day=1000, decline_every=10)
  assert ("run_distribution", "expect_column_values_to_be_between", "decline_rate") in failures(
      validate.check(big, counts(big), config, REVIEW, DECLINE))


@pytest.mark.parametrize("text,message", [
    ("window:\n  decline_rat: {max: 0.1}\n", "unknown key window.decline_rat (did you mean 'decline_rate'?)"),
    ("window:\n  decline_rate: {max: 0.1, min: 0.5}\n", "window.decline_rate: min 0.5 is above max 0.1"),
    ("run:\n  mean_score: 0.3\n", "run.mean_score must be a mapping of min and/or max"),
    ("live_window_s: 0\n", "live_window_s must be a positive number"),
    ("decisions:\n  currencies: [euro]\n", "decisions.currencies must be a list of ISO 4217 codes"),
    ("- a list\n", "expected a mapping"),
])
def test_config_mistakes_are_one_line(tmp_path, text, message):
  path = tmp_path / "quality.yaml"
  path.write_text(text)
  with pytest.raises(validate.QualityConfigError) as e:
    validate.QualityConfig.load(str(path))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_file_overrides_only_what_it_names(tmp_path):
  path = tmp_path / "quality.yaml"
  path.write_text("window:\n  decline_rate: {max: 0.5}\n")
  bundled, own = validate.QualityConfig.load(), validate.QualityConfig.load(str(path))
  assert own.window["decline_rate"] == {"max": 0.5}
  assert own.window["review_rate"] == bundled.window["review_rate"] and own.currencies == bundled.currencies
  assert own.run == bundled.run and own.path == str(path)


def test_rows_and_page_hold_every_window_and_failure(config, tmp_path):
  table = with_values(decisions(days=3), 5, score=1.5)
  result = validate.check(table, counts(table), config, REVIEW, DECLINE)
  stored = report.rows("run-1", result, "docs.html")
  assert [(r[1], r[2]) for r in stored] == ([("decisions", "run"), ("feature_ranges", "run"),
                                             ("window_distribution", "run")]
                                            + [("window_distribution", "window")] * 3 + [("run_distribution", "run")])
  assert [r[5] for r in stored] == [False, True, True, True, True, True, True]
  assert json.loads(stored[0][8])[0]["observed"] == [1.5]
  path = report.write_page(str(tmp_path), "run-1<x>", result)
  text = open(path, encoding="utf-8").read()
  assert "FAILED" in text and "expect_column_values_to_be_between" in text and "run-1&lt;x&gt;" in text
  assert "<script" not in text
  assert "run-1&lt;x&gt;" in open(os.path.join(tmp_path, "index.html"), encoding="utf-8").read()


def test_a_validation_that_cannot_run_is_a_failed_result_with_its_error(tmp_path):
  from txstream.quality import worker
  day = tmp_path / "staging" / "event_date=2018-04-01"
  day.mkdir(parents=True)
  (day / "w0.parquet").write_bytes(b"not parquet at all")
  validator = worker.Validator()
  validator.submit(str(tmp_path / "staging"), {}, {"events_in": 1, "scored": 1}, None, REVIEW, DECLINE, None)
  result = validator.result()
  assert result["success"] is False and "\n" not in result["error"]
  assert "parquet" in result["error"].lower() or "magic" in result["error"].lower()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]  # the child removed its snapshot


def test_a_validator_without_a_job_ends_quietly():
  from txstream.quality import worker
  validator = worker.Validator()
  validator.close()
  assert validator._process.returncode == 0  # pylint: disable=protected-access
