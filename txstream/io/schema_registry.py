"""Schema registries: resolve Confluent schema ids to parsed Avro schemas.

``FileSchemaRegistry`` reads the versioned schemas shipped in
``txstream/io/schemas`` (the default, no server needed).
``HttpSchemaRegistry`` talks to any Confluent-compatible registry
(``--schema_registry_url``). Both cache parsed schemas: a schema id never
changes meaning, so caching is always safe.
"""
import functools
import json
import logging
import os
import urllib.error
import urllib.request
from typing import Dict, Optional

import fastavro

_LOGGER = logging.getLogger(__name__)

SCHEMA_DIR = os.path.join(os.path.dirname(__file__), "schemas")
TRANSACTION_SUBJECT = "transactions-value"
LABEL_SUBJECT = "labels-value"


class UnknownSchemaError(KeyError):
  """The registry has no schema with the requested id or subject."""


def load_schema_file(name: str) -> dict:
  with open(os.path.join(SCHEMA_DIR, name), encoding="utf-8") as f:
    return json.load(f)


def _strip_logical_types(node):
  # timestamp-millis is a long on the wire; the pipeline keeps epoch millis as
  # ints, so decoding skips fastavro's datetime conversion (and its cost).
  if isinstance(node, dict):
    return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
  if isinstance(node, list):
    return [_strip_logical_types(v) for v in node]
  return node


@functools.lru_cache(maxsize=None)
def parse(schema_json: str):
  """Parsed schema for encoding and decoding; timestamps stay epoch-millis ints."""
  return fastavro.parse_schema(_strip_logical_types(json.loads(schema_json)))


class SchemaRegistry:
  """Interface: schema ids to schemas, subjects to their latest version."""
  def schema_json(self, schema_id: int) -> str:
    raise NotImplementedError

  def latest(self, subject: str) -> "tuple[int, str]":
    """Returns (schema_id, schema_json) of the subject's latest version."""
    raise NotImplementedError

  def parsed(self, schema_id: int):
    return parse(self.schema_json(schema_id))


class FileSchemaRegistry(SchemaRegistry):
  """Schemas listed in ``registry.json`` beside the ``.avsc`` files."""
  def __init__(self, directory: str = SCHEMA_DIR):
    self._directory = directory
    with open(os.path.join(directory, "registry.json"), encoding="utf-8") as f:
      entries = json.load(f)["schemas"]
    self._by_id: Dict[int, dict] = {e["id"]: e for e in entries}
    self._json: Dict[int, str] = {}

  def entries(self):
    return sorted(self._by_id.values(), key=lambda e: e["id"])

  def schema_json(self, schema_id: int) -> str:
    if schema_id not in self._json:
      entry = self._by_id.get(schema_id)
      if entry is None:
        raise UnknownSchemaError(f"schema id {schema_id} is not registered")
      with open(os.path.join(self._directory, entry["file"]), encoding="utf-8") as f:
        self._json[schema_id] = json.dumps(json.load(f), sort_keys=True)
    return self._json[schema_id]

  def latest(self, subject: str):
    versions = [e for e in self._by_id.values() if e["subject"] == subject]
    if not versions:
      raise UnknownSchemaError(f"subject {subject!r} is not registered")
    entry = max(versions, key=lambda e: e["version"])
    return entry["id"], self.schema_json(entry["id"])


class HttpSchemaRegistry(SchemaRegistry):
  """Client for the Confluent Schema Registry REST API (GET by id, register)."""
  def __init__(self, url: str, timeout: float = 10.0, auth_header: Optional[str] = None):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"schema registry url must start with http:// or https://, got {url!r}")
    self._url = url.rstrip("/")
    self._timeout = timeout
    # Credentials come from the environment, never from flags that end up in logs.
    self._auth = auth_header or os.environ.get("TXSTREAM_SCHEMA_REGISTRY_AUTH")
    self._json: Dict[int, str] = {}

  def _request(self, path: str, body: Optional[dict] = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(self._url + path, data=data, method="POST" if data else "GET")
    req.add_header("Accept", "application/vnd.schemaregistry.v1+json")
    if data:
      req.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
    if self._auth:
      req.add_header("Authorization", self._auth)
    try:
      with urllib.request.urlopen(req, timeout=self._timeout) as resp:
        return json.loads(resp.read())
    except urllib.error.HTTPError as e:
      if e.code == 404:
        raise UnknownSchemaError(f"schema registry has no {path}") from e
      raise

  def schema_json(self, schema_id: int) -> str:
    if schema_id not in self._json:
      payload = self._request(f"/schemas/ids/{schema_id}")
      self._json[schema_id] = json.dumps(json.loads(payload["schema"]), sort_keys=True)
    return self._json[schema_id]

  def latest(self, subject: str):
    payload = self._request(f"/subjects/{subject}/versions/latest")
    schema = json.dumps(json.loads(payload["schema"]), sort_keys=True)
    self._json[payload["id"]] = schema
    return payload["id"], schema

  def register(self, subject: str, schema: dict) -> int:
    payload = self._request(f"/subjects/{subject}/versions", {"schema": json.dumps(schema)})
    return payload["id"]


def registered_schema_ids() -> list:
  """The schema ids bundled with this version (recorded with every run)."""
  return [e["id"] for e in FileSchemaRegistry().entries()]


def make_registry(url: Optional[str]) -> SchemaRegistry:
  return HttpSchemaRegistry(url) if url else FileSchemaRegistry()
