"""Versioned model artifacts: ``model.json`` (XGBoost) + ``metadata.json``.

The metadata names the feature order the model expects, the training window,
parameters, metrics and the model file's content hash; the version stamped on
every decision is derived from that hash, so two artifacts with the same bytes
have the same version and a changed model can never pass for the old one.
"""
import hashlib
import json
import os
from typing import Optional, Sequence

from apache_beam.io.filesystems import FileSystems

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default")
MODEL_FILE = "model.json"
METADATA_FILE = "metadata.json"


class ModelError(ValueError):
  """The model artifact is missing, corrupt or does not fit the pipeline."""


def content_hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _read(path: str) -> bytes:
  try:
    with FileSystems.open(path) as f:
      return f.read()
  except Exception as e:  # FileSystems raises BeamIOError/IOError variants per scheme.
    raise ModelError(f"cannot read {path}: {e}") from e


def load_metadata(model_dir: Optional[str], feature_names: Sequence[str]) -> dict:
  """Reads and checks an artifact; returns its metadata with ``model_path`` added.

  Checks run at start-up so a bad artifact fails before any data is read.
  """
  model_dir = model_dir or DEFAULT_MODEL_DIR
  model_path = FileSystems.join(model_dir, MODEL_FILE)
  raw_meta = _read(FileSystems.join(model_dir, METADATA_FILE))
  try:
    meta = json.loads(raw_meta)
  except ValueError as e:
    raise ModelError(f"{model_dir}/{METADATA_FILE} is not valid JSON") from e
  model_bytes = _read(model_path)
  if content_hash(model_bytes) != meta.get("content_hash"):
    raise ModelError(f"{model_path} does not match the content hash in its metadata (corrupt or replaced)")
  try:
    json.loads(model_bytes)
  except ValueError as e:
    raise ModelError(f"{model_path} is not a valid XGBoost JSON model") from e
  if list(meta.get("feature_names", [])) != list(feature_names):
    raise ModelError(f"{model_dir}: model features differ from the pipeline's feature list")
  meta["model_path"] = model_path
  return meta


def load_model(model_dir: Optional[str]):
  """The checked artifact of ``model_dir`` (default: the bundled model) as a ``core.decide.Model``."""
  from txstream.core import contracts
  from txstream.core.decide import Model
  meta = load_metadata(model_dir, contracts.FEATURE_NAMES)
  return Model.from_bytes(_read(meta["model_path"]), meta["version"])


def write_artifact(model_dir: str, model_bytes: bytes, metadata: dict) -> dict:
  """Writes model + metadata; the version is the first 12 hex digits of the content hash."""
  digest = content_hash(model_bytes)
  metadata = dict(metadata, content_hash=digest, version=f"xgb-{digest[:12]}")
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, MODEL_FILE), "wb") as f:
    f.write(model_bytes)
  with open(os.path.join(model_dir, METADATA_FILE), "w", encoding="utf-8") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  return metadata
