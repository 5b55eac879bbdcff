"""The RunInference model handler: XGBoost on whole FeaturedBatches, loaded once per worker.

Each example is a ``FeaturedBatch``; one ``inplace_predict`` call scores all
of its rows (``core.decide.Model``). RunInference shares the model per worker
and takes model updates: ``Score`` can pass a side input of ``ModelMetadata``
(``model_id`` = the new ``model.json`` path, e.g. from ``WatchFilePattern``),
and the handler checks the new artifact (content hash, feature order) before
loading it. Every prediction carries the version of the model that made it.
"""
import os
from typing import Any, Dict, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from txstream.core import contracts
from txstream.core.batch import FeaturedBatch
from txstream.core.decide import Model, feature_matrix
from txstream.models import artifacts


class FraudModelHandler(ModelHandler[FeaturedBatch, PredictionResult, Model]):
  """FeaturedBatch -> PredictionResult(example=batch, inference=P(fraud) per row, model_id=version)."""

  def __init__(self, model_path: str):
    super().__init__()
    self._model_path = model_path

  def load_model(self) -> Model:
    return artifacts.load_model(os.path.dirname(self._model_path))

  def run_inference(self, batch: Sequence[FeaturedBatch], model: Model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    return [PredictionResult(b, model.predict(feature_matrix(b.table)), model.version) for b in batch]

  def update_model_path(self, model_path: Optional[str] = None):
    if model_path:
      self._model_path = model_path

  def batch_elements_kwargs(self):
    # Elements are already batches of thousands of rows.
    return {"min_batch_size": 1, "max_batch_size": 1}

  def get_num_bytes(self, batch: Sequence[FeaturedBatch]) -> int:
    return sum(len(b) for b in batch) * 8 * len(contracts.FEATURE_NAMES)

  def get_metrics_namespace(self) -> str:
    return contracts.NAMESPACE
