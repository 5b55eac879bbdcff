"""Score: RunInference with the bundled model over FeaturedBatches, rules and reason codes, lineage stamps."""
import apache_beam as beam
import numpy as np
import pyarrow as pa
import xgboost
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import txstream
from tests import helpers as h
from txstream.core import contracts, decide
from txstream.core import rules as rules_lib
from txstream.core.batch import FeaturedBatch
from txstream.core.contracts import FEATURE_NAMES
from txstream.models import artifacts
from txstream.transforms.score import Score


def _values(amount, nb_tx_1d=1.0, avg_30d=50.0, terminal_risk_7d=0.0):
  values = dict.fromkeys(FEATURE_NAMES, 0.0)
  values.update(TX_AMOUNT=amount, CUSTOMER_ID_NB_TX_1DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW=avg_30d,
                CUSTOMER_ID_NB_TX_7DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW=avg_30d,
                CUSTOMER_ID_NB_TX_30DAY_WINDOW=nb_tx_1d, CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW=avg_30d,
                TERMINAL_ID_RISK_7DAY_WINDOW=terminal_risk_7d, HOME_DISTANCE=3.0)
  return [values[n] for n in FEATURE_NAMES]


VECTORS = [_values(40.0), _values(400.0), _values(60.0, nb_tx_1d=12), _values(300.0, avg_30d=50.0, terminal_risk_7d=0.5),
           _values(80.0)]


def featured_batch(vectors, history=None, first: int = 0) -> FeaturedBatch:
  n = len(vectors)
  columns = {
      "transaction_id": [f"tx-{first + i}" for i in range(n)], "event_time_ms": [h.T0 + i for i in range(n)],
      "customer_id": [1] * n, "terminal_id": [2] * n, "card_token": [h.token(1)] * n,
      "amount_minor": [int(v[0] * 100) for v in vectors], "currency": ["EUR"] * n, "entry_mode": ["chip"] * n,
      "merchant_category": [5411] * n, "schema_id": [2] * n, "source": [f"t#{first + i}" for i in range(n)],
      "history": history or [False] * n, "customer_segment": ["retail"] * n, "reference_version": ["ref"] * n}
  for j, name in enumerate(contracts.FEATURE_COLUMNS):
    columns[name] = [v[j] for v in vectors]
  return FeaturedBatch(pa.table({f.name: pa.array(columns[f.name], f.type) for f in contracts.FEATURED}))


def _expected_scores(vectors=VECTORS):
  meta = artifacts.load_metadata(None, FEATURE_NAMES)
  model = xgboost.XGBClassifier()
  model.load_model(meta["model_path"])
  return meta["version"], model.predict_proba(np.array(vectors, dtype=np.float32))[:, 1]


def _columns(vectors):
  return {name: np.array([v[j] for v in vectors]) for j, name in enumerate(FEATURE_NAMES)}


def test_scores_match_the_model_and_rules_add_reason_codes():
  version, probabilities = _expected_scores()
  rule_set = rules_lib.load_rules()
  scores = np.array([round(float(p), 6) for p in probabilities])
  decisions, codes = rule_set.decide(_columns(VECTORS), scores)
  expected = [(f"tx-{i}", scores[i], decisions[i].as_py(), tuple(codes[i].as_py())) for i in range(len(VECTORS))]
  assert "AMOUNT_OVER_LIMIT" in expected[1][3]
  assert "CUSTOMER_VELOCITY_1D" in expected[2][3]
  assert {"AMOUNT_SPIKE_VS_30D", "TERMINAL_RISK_7D"} <= set(expected[3][3])
  assert expected[0][2] == "approve" and expected[0][3] == ()

  with TestPipeline() as p:
    batches = p | beam.Create([featured_batch(VECTORS[:2]), featured_batch(VECTORS[2:], first=2)])
    decisions = batches | Score()
    assert_that(h.flat(decisions, "Values", "transaction_id", "score", "decision", "reason_codes")
                | beam.MapTuple(lambda i, s, d, c: (i, s, d, tuple(c))), equal_to(expected), label="values")
    assert_that(h.flat(decisions, "Lineage", "model_version", "rules_version", "pipeline_version"),
                equal_to([(version, rule_set.version, txstream.__version__)] * len(VECTORS)), label="lineage")


def test_history_rows_are_not_scored():
  with TestPipeline() as p:
    decisions = p | beam.Create([featured_batch(VECTORS[:3], history=[True, False, True])]) | Score()
    assert_that(h.flat(decisions, "Ids", "transaction_id"), equal_to([("tx-1",)]))


def test_rules_decide():
  rule_set = rules_lib.load_rules()
  quiet = _columns([_values(10.0)] * 3)
  decisions, codes = rule_set.decide(quiet, np.array([0.1, 0.9, 0.6]))
  assert decisions.to_pylist() == ["approve", "decline", "review"]
  assert codes.to_pylist() == [[], ["MODEL_SCORE_HIGH"], ["MODEL_SCORE_ELEVATED"]]


def test_scores_round_exactly_as_python():
  rng = np.random.default_rng(3)
  p = np.concatenate([rng.random(100_000), np.array([0.0078125, 0.5000005, 0.1234565, 0.9999995])])
  assert decide.numeric.round_like_python(p, 6).tolist() == [round(x, 6) for x in p.tolist()]


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
  expected = model.predict_proba(np.array(VECTORS, dtype=np.float32))[:, 1]
  with TestPipeline() as p:
    updates = p | "Updates" >> beam.Create([ModelMetadata(model_id=str(tmp_path / "new" / "model.json"),
                                                          model_name="new")])
    decisions = p | beam.Create([featured_batch(VECTORS)]) | Score(model_updates=updates)
    assert_that(h.flat(decisions, "Rows", "transaction_id", "score", "model_version"),
                equal_to([(f"tx-{i}", round(float(s), 6), meta["version"]) for i, s in enumerate(expected)]))
