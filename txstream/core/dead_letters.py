"""Dead-letter rows: where a bad input ended and why, one contracts.DEAD_LETTER row each."""
import base64
import json
from typing import Optional, Sequence

import pyarrow as pa

from txstream.core import contracts

MAX_MESSAGE = 500


def table(sources: Sequence[str], raws: Sequence[Optional[bytes]], stage: str, reasons, error_classes,
          messages: Sequence[str]) -> pa.Table:
  """Dead letters for parallel lists; ``reasons`` and ``error_classes`` may be one string for all rows."""
  n = len(sources)
  if isinstance(reasons, str):
    reasons = [reasons] * n
  if isinstance(error_classes, str):
    error_classes = [error_classes] * n
  return pa.table({
      "source": pa.array(sources, pa.string()),
      "raw": pa.array(raws, pa.binary()),
      "stage": pa.array([stage] * n, pa.string()),
      "reason": pa.array(reasons, pa.string()),
      "error_class": pa.array(error_classes, pa.string()),
      "message": pa.array([m[:MAX_MESSAGE] for m in messages], pa.string()),
      "pipeline_version": pa.array([contracts.PIPELINE_VERSION] * n, pa.string()),
  }, schema=contracts.DEAD_LETTER)


def of_errors(sources: Sequence[str], raws: Sequence[Optional[bytes]], stage: str, errors) -> pa.Table:
  """Dead letters from exceptions that carry a ``reason`` (decoding and validation errors)."""
  return table(sources, raws, stage, [e.reason for e in errors], [type(e).__name__ for e in errors],
               [str(e) for e in errors])


def to_json(row: dict) -> str:
  """One dead letter (a row of contracts.DEAD_LETTER as a dict) as JSON, the raw bytes in base64."""
  return json.dumps({
      "source": row["source"], "stage": row["stage"], "reason": row["reason"],
      "error_class": row["error_class"], "message": row["message"],
      "pipeline_version": row["pipeline_version"],
      "raw_base64": base64.b64encode(row["raw"]).decode() if row["raw"] is not None else None,
  }, sort_keys=True)
