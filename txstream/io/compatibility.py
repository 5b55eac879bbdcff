"""The schema evolution rule, checked: add fields only with defaults.

Full compatibility (every version reads every other's data) holds when, between
any two versions of a record, no field is removed, renamed or retyped and every
added field carries a default. ``check_full`` returns the violations so CI can
name them; an empty list means compatible.
"""
import json
from typing import List


def _type_key(avro_type) -> str:
  return json.dumps(avro_type, sort_keys=True)


def check_evolution(old: dict, new: dict) -> List[str]:
  """Violations of the evolution rule going from ``old`` to ``new``."""
  problems = []
  if old.get("name") != new.get("name") or old.get("namespace") != new.get("namespace"):
    problems.append(f"record renamed from {old.get('name')} to {new.get('name')}")
  old_fields = {f["name"]: f for f in old["fields"]}
  new_fields = {f["name"]: f for f in new["fields"]}
  for name, field in old_fields.items():
    if name not in new_fields:
      problems.append(f"field {name!r} removed or renamed")
    elif _type_key(field["type"]) != _type_key(new_fields[name]["type"]):
      problems.append(f"field {name!r} retyped")
  for name, field in new_fields.items():
    if name not in old_fields and "default" not in field:
      problems.append(f"field {name!r} added without a default")
  return problems


def check_full(versions: List[dict]) -> List[str]:
  """Violations between every ordered pair of consecutive versions."""
  problems = []
  for i in range(1, len(versions)):
    problems += [f"v{i} -> v{i + 1}: {p}" for p in check_evolution(versions[i - 1], versions[i])]
  return problems
