"""Run manifests: what produced a run's output, so it can be rerun and proven.

Every ``txstream run`` and ``txstream rerun`` writes one manifest, JSON, to
``<cold root>/manifests/<run_id>.json`` (beside the output it describes) and
to PostgreSQL's ``runs`` row when there is a warm tier. It names:

- ``code``: package version and git commit (``+dirty`` when the work tree had
  changes; absent outside a git checkout);
- ``schemas``: every registered schema id with the SHA-256 of its canonical
  JSON (a schema id never changes meaning; the fingerprint proves it);
- ``model``: version, artifact directory and the SHA-256 of ``model.json``;
  ``rules``: the rules file and its version (its content hash);
  ``reference``: the reference-data version (content hash of its files);
- ``inputs``: files with their size, SHA-256 and record range ``[0, n)``, or
  Kafka topic/partition offset ranges ``[start, stop)``;
- ``window``: the event-time window ``[from, to)`` of a rerun (null for a run);
- ``summary`` and ``status`` (``running``, ``succeeded``, ``failed`` with its
  error), ``started_at``/``finished_at`` (UTC ISO-8601).

A rerun reads the original's manifest to default its model, rules and
reference data to the versions the original used.
"""
import datetime
import glob
import hashlib
import json
import os
import subprocess
from typing import Optional

from apache_beam.io.filesystems import FileSystems

import txstream
from txstream.io import wire
from txstream.io.schema_registry import FileSchemaRegistry

MANIFESTS = "manifests"
_HASH_CHUNK = 8 << 20


def utc_iso(epoch_ms: int) -> str:
  return datetime.datetime.fromtimestamp(epoch_ms / 1000, tz=datetime.timezone.utc).isoformat()


def code_version() -> Optional[str]:
  """The git commit this package runs from, ``+dirty`` with local changes; None outside a checkout."""
  here = os.path.dirname(os.path.abspath(txstream.__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with FileSystems.open(path) as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def schema_fingerprints() -> list:
  registry = FileSchemaRegistry()
  return [{"id": e["id"], "subject": e.get("subject"),
           "sha256": hashlib.sha256(registry.schema_json(e["id"]).encode()).hexdigest()}
          for e in registry.entries()]


class _Hashing:
  """A binary stream that hashes what is read through it: one pass gives a file's records and its SHA-256."""
  def __init__(self, stream):
    self._stream, self.digest = stream, hashlib.sha256()

  def read(self, n: int = -1) -> bytes:
    data = self._stream.read(n)
    self.digest.update(data)
    return data


def _scan(path: str, schema_ids: list) -> dict:
  """Size, SHA-256 and ``records`` ``[0, n)`` of a framed file, numbered as the reader numbers them (a
  damaged stretch is one record); ``damaged`` lists each stretch of broken framing (record index, byte offset,
  reason). The file is read once."""
  n, damaged = 0, []
  with open(path, "rb") as f:
    hashing = _Hashing(f)
    for item in wire.read_frame_segments(hashing, schema_ids, 100_000):
      if isinstance(item, wire.Damage):
        damaged.append({"index": item.index, "offset": item.offset, "reason": item.reason})
        n += 1
      else:
        n += len(item.values)
    while hashing.read(_HASH_CHUNK):
      pass  # whatever the reader left unread still counts in the hash
  return {"bytes": os.path.getsize(path), "sha256": hashing.digest.hexdigest(), "records": [0, n],
          **({"damaged": damaged} if damaged else {})}


def file_inputs(input_dir: str) -> list:
  """Every transaction and label file of a generated input directory, with size, hash and record range."""
  ids = [e["id"] for e in FileSchemaRegistry().entries()]
  return [{"stream": stream, "path": os.path.abspath(path), **_scan(path, ids)}
          for stream in ("transactions", "labels")
          for path in sorted(glob.glob(os.path.join(input_dir, stream, "*.wire")))]


def kafka_inputs(topic: str, ranges, labels_topic: Optional[str] = None, label_ranges=None) -> list:
  out = [{"stream": "transactions", "topic": topic, "partition": p, "offsets": [start, stop]}
         for p, (start, stop) in sorted(ranges.items())]
  out += [{"stream": "labels", "topic": labels_topic, "partition": p, "offsets": [start, stop]}
          for p, (start, stop) in sorted((label_ranges or {}).items())]
  return out


def model_entry(model_dir: Optional[str], version: str) -> dict:
  from txstream.models.artifacts import DEFAULT_MODEL_DIR, MODEL_FILE
  directory = model_dir or DEFAULT_MODEL_DIR
  return {"version": version, "dir": directory if model_dir else "bundled",
          "sha256": _sha256_file(FileSystems.join(directory, MODEL_FILE))}


def path_for(cold_root: str, run_id: str) -> str:
  return FileSystems.join(cold_root, MANIFESTS, f"{run_id}.json")


def write(cold_root: str, manifest: dict) -> str:
  """Writes the manifest beside the run's output (replacing an earlier state of it); returns its path."""
  path = path_for(cold_root, manifest["run_id"])
  if "://" not in path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with FileSystems.create(path) as f:
    f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
  return path


def read(cold_root: str, run_id: str) -> dict:
  path = path_for(cold_root, run_id)
  try:
    with FileSystems.open(path) as f:
      return json.loads(f.read())
  except Exception as e:  # FileSystems raises BeamIOError/IOError variants per scheme.
    raise FileNotFoundError(f"no manifest for run {run_id} at {path}") from e
