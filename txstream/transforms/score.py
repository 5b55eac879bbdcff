"""Score: XGBoost fraud probability through RunInference, then rules -> decisions (``core.decide``).

Elements are FeaturedBatches: RunInference shares the model per worker and
one ``inplace_predict`` call scores a whole batch. Every decision carries the
model version, the rules version, the reason codes of the rules that hit and
the pipeline version. History rows (read for feature state only) are not
scored.
"""
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from txstream.core import contracts, decide
from txstream.core import rules as rules_lib
from txstream.core.batch import DecisionBatch, FeaturedBatch
from txstream.models import artifacts
from txstream.models.handler import FraudModelHandler
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)


class _DecideFn(beam.DoFn):
  def __init__(self, rule_set: rules_lib.RuleSet, model_version: str):
    self._rules = rule_set
    self._model_version = model_version

  def process(self, prediction):
    decisions = decide.decide(prediction.example.table, prediction.inference,
                              prediction.model_id or self._model_version, self._rules)
    if not decisions.num_rows:
      return
    counting.inc("scored", decisions.num_rows)
    counting.values(decisions, "decision", "decision")
    yield DecisionBatch(decisions)


class Score(beam.PTransform[beam.PCollection[FeaturedBatch], beam.PCollection[DecisionBatch]]):
  """FeaturedBatches -> DecisionBatches. Fails at construction on a missing or corrupt model or rules file."""
  def __init__(self, model_dir: Optional[str] = None, rules_path: Optional[str] = None, model_updates=None):
    """``model_updates``: optional PCollection of ModelMetadata (``model_id`` = a new model.json path),
    used as a side input so that a new model replaces the old one without a restart."""
    super().__init__()
    self._model_updates = model_updates
    self._meta = artifacts.load_metadata(model_dir, contracts.FEATURE_NAMES)
    self._rules = rules_lib.load_rules(rules_path)

  @property
  def model_version(self) -> str:
    return self._meta["version"]

  @property
  def rules_version(self) -> str:
    return self._rules.version

  def expand(self, featured):
    return (
        featured
        | "Infer" >> RunInference(FraudModelHandler(self._meta["model_path"]),
                                  model_metadata_pcoll=self._model_updates)
        | "Decide" >> beam.ParDo(_DecideFn(self._rules, self.model_version)).with_output_types(DecisionBatch))
