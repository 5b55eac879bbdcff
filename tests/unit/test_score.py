"""Score: RunInference with the bundled model, rules and reason codes, lineage stamps."""
import apache_beam as beam
import numpy as np
import pytest
import xgboost
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import txstream
from tests import helpers as h
from txstream.models import artifacts
from txstream.records import Featured, Transaction
from txstream.transforms import rules as rules_lib
from txstream.transforms.features import FEATURE_NAMES
from txstream.transforms.score import Score


def _featured(i, amount, nb_tx_1d=1.0, avg_30d=50.0, terminal_risk_7d=0.0):
  values = dict.fromkeys(FEATURE_NAMES, 0.0)
  values.update(TX_AMOUNT=amount, CUSTOMER_ID_NB_TX_1DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW=avg_30d,
                CUSTOMER_ID_NB_TX_7DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW=avg_30d,
                CUSTOMER_ID_NB_TX_30DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW=avg_30d,
                TERMINAL_ID_RISK_7DAY_WINDOW=terminal_risk_7d, HOME_DISTANCE=3.0)
  tx = Transaction(f"tx-{i}", h.T0 + i, 1, 2, h.token(1), int(amount * 100), "EUR", "chip", 5411, 2, f"t#{i}")
  return Featured(tx, [values[n] for n in FEATURE_NAMES])


INPUTS = [_featured(0, 40.0), _featured(1, 400.0), _featured(2, 60.0, nb_tx_1d=12),
          _featured(3, 300.0, avg_30d=50.0, terminal_risk_7d=0.5), _featured(4, 80.0)]


def _expected_scores():
  meta = artifacts.load_metadata(None, FEATURE_NAMES)
  model = xgboost.XGBClassifier()
  model.load_model(meta["model_path"])
  x = np.array([f.features for f in INPUTS], dtype=np.float32)
  return meta["version"], model.predict_proba(x)[:, 1]


def test_scores_match_the_model_and_rules_add_reason_codes():
  version, probabilities = _expected_scores()
  rule_set = rules_lib.load_rules(None, FEATURE_NAMES)
  expected = []
  for featured, p in zip(INPUTS, probabilities):
    decision, codes = rule_set.decide(featured.features, round(float(p), 6))
    expected.append((featured.transaction.transaction_id, round(float(p), 6), decision, tuple(codes)))
  assert "AMOUNT_OVER_LIMIT" in expected[1][3]
  assert "CUSTOMER_VELOCITY_1D" in expected[2][3]
  assert {"AMOUNT_SPIKE_VS_30D", "TERMINAL_RISK_7D"} <= set(expected[3][3])
  assert expected[0][2] == "approve" and expected[0][3] == ()

  with TestPipeline() as p:
    decisions = p | beam.Create(INPUTS) | Score(max_batch_size=2)
    assert_that(decisions | "Values" >> beam.Map(
        lambda d: (d.transaction.transaction_id, round(d.score, 6), d.decision, tuple(d.reason_codes))),
        equal_to(expected), label="values")
    assert_that(decisions | "Lineage" >> beam.Map(lambda d: (d.model_version, d.pipeline_version)),
                equal_to([(version, txstream.__version__)] * len(INPUTS)), label="lineage")


def test_rules_decide():
  rule_set = rules_lib.load_rules(None, FEATURE_NAMES)
  quiet = _featured(0, 10.0).features
  assert rule_set.decide(quiet, 0.1) == ("approve", [])
  decision, codes = rule_set.decide(quiet, 0.9)
  assert decision == "decline" and "MODEL_SCORE_HIGH" in codes
  decision, codes = rule_set.decide(quiet, 0.6)
  assert decision == "review" and "MODEL_SCORE_ELEVATED" in codes


def test_bad_batch_size():
  with pytest.raises(ValueError):
    Score(max_batch_size=0)


def test_new_model_from_side_input_replaces_the_bundled_one(tmp_path):
  """A ModelMetadata side input swaps the model without rebuilding the graph; decisions carry its version."""
  from apache_beam.ml.inference.base import ModelMetadata
  rng = np.random.default_rng(0)
  x = rng.random((300, len(FEATURE_NAMES)), dtype=np.float32) * 100
  y = x[:, 0] > 60
  model = xgboost.XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1).fit(x, y)
  model.save_model(str(tmp_path / "m.json"))
  meta = artifacts.write_artifact(str(tmp_path / "new"), (tmp_path / "m.json").read_bytes(),
                                  {"feature_names": list(FEATURE_NAMES)})
  bundled_version, _ = _expected_scores()
  assert meta["version"] != bundled_version
  expected = model.predict_proba(np.array([f.features for f in INPUTS], dtype=np.float32))[:, 1]
  with TestPipeline() as p:
    updates = p | "Updates" >> beam.Create([ModelMetadata(model_id=str(tmp_path / "new" / "model.json"),
                                                          model_name="new")])
    decisions = p | beam.Create(INPUTS) | Score(model_updates=updates)
    assert_that(decisions | beam.Map(lambda d: (d.transaction.transaction_id, round(d.score, 6), d.model_version)),
                equal_to([(f.transaction.transaction_id, round(float(s), 6), meta["version"])
                          for f, s in zip(INPUTS, expected)]))
