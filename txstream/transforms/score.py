"""Score: XGBoost fraud probability through RunInference, then rules -> decision.

The model is read once per worker (RunInference shares it) and batches of up
to ``max_batch_size`` feature vectors go to one ``predict_proba`` call. Every
decision carries the model version, the reason codes of the rules that hit and
the pipeline version.
"""
import logging
import time
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

import txstream
from txstream.models import artifacts
from txstream.models.handler import fraud_model_handler
from txstream.records import Decision, Featured
from txstream.transforms import rules as rules_lib
from txstream.transforms.features import FEATURE_NAMES

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"


def to_example(featured: Featured):
  return featured, np.asarray(featured.features, dtype=np.float32).reshape(1, -1)


class _DecideFn(beam.DoFn):
  def __init__(self, rule_set: rules_lib.RuleSet, model_version: str):
    self._rules = rule_set
    self._model_version = model_version
    self._scored = Metrics.counter(NAMESPACE, "scored")
    self._by_decision = {a: Metrics.counter(NAMESPACE, f"decision.{a}") for a in rules_lib.ACTIONS}
    self._latency = Metrics.distribution(NAMESPACE, "event_to_decision_ms")

  def process(self, keyed):
    featured, prediction = keyed
    score = round(prediction.inference, 6)
    decision, codes = self._rules.decide(featured.features, score)
    now_ms = int(time.time() * 1000)
    self._scored.inc()
    self._by_decision[decision].inc()
    self._latency.update(max(0, now_ms - featured.transaction.event_time_ms))
    yield Decision(featured.transaction, featured.features, score, prediction.model_id or self._model_version,
                   codes, decision,
                   txstream.__version__, now_ms)


class Score(beam.PTransform):
  """Featured -> Decision. Fails at construction on a missing or corrupt model or rules file."""
  def __init__(self, model_dir: Optional[str] = None, rules_path: Optional[str] = None,
               max_batch_size: int = 1000, model_updates=None):
    """``model_updates``: optional PCollection of ModelMetadata (``model_id`` = a new model.json path),
    used as a side input so that a new model replaces the old one without a restart."""
    super().__init__()
    self._model_updates = model_updates
    if max_batch_size < 1:
      raise ValueError("max_batch_size must be >= 1")
    self._meta = artifacts.load_metadata(model_dir, FEATURE_NAMES)
    self._rules = rules_lib.load_rules(rules_path, FEATURE_NAMES)
    self._max_batch_size = max_batch_size

  @property
  def model_version(self) -> str:
    return self._meta["version"]

  def expand(self, featured):
    return (
        featured
        | "ToExample" >> beam.Map(to_example)
        | "Infer" >> RunInference(fraud_model_handler(self._meta["model_path"], self._max_batch_size, FEATURE_NAMES),
                                  model_metadata_pcoll=self._model_updates)
        | "Decide" >> beam.ParDo(_DecideFn(self._rules, self.model_version)).with_output_types(Decision))
