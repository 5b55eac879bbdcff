"""Decision rules: thresholds on features and score, combined into a decision with reason codes.

Loaded from YAML (``config/rules.yaml`` by default) and applied to whole
batches. The decision is the most severe action any hit proposes: decline >
review > approve. Reason codes are stable strings that downstream case tools
key on: the model's code first, then the rules' in file order. The rules
version is the file's content hash, stamped beside the model version.
"""
import dataclasses
import hashlib
import operator
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import yaml

from txstream.core import contracts

DEFAULT_RULES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "config", "rules.yaml")
ACTIONS = contracts.ACTIONS
_SEVERITY = {a: i for i, a in enumerate(ACTIONS)}
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}


class RulesError(ValueError):
  """The rules file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Rule:
  code: str
  feature: str
  op: str
  value: float
  action: str
  ratio_of: Optional[str] = None

  def hits(self, columns: Dict[str, np.ndarray]) -> np.ndarray:
    """Which rows the rule hits; a ratio to a base that is not positive never hits."""
    x = columns[self.feature]
    if self.ratio_of is None:
      return _OPS[self.op](x, self.value)
    base = columns[self.ratio_of]
    positive = base > 0
    ratio = np.divide(x, base, out=np.zeros_like(x), where=positive)
    return positive & _OPS[self.op](ratio, self.value)


@dataclasses.dataclass(frozen=True)
class RuleSet:
  rules: Tuple[Rule, ...]
  decline_score: float
  review_score: float
  version: str = ""

  def decide(self, columns: Dict[str, np.ndarray], scores: np.ndarray) -> Tuple[pa.Array, pa.Array]:
    """(decision, reason codes) arrays for a batch: feature columns by FEATURE_NAMES name, and the scores."""
    n = len(scores)
    codes = [contracts.SCORE_HIGH, contracts.SCORE_ELEVATED] + [r.code for r in self.rules]
    high = scores >= self.decline_score
    hits = [high, ~high & (scores >= self.review_score)] + [r.hits(columns) for r in self.rules]
    severity = np.where(high, 2, np.where(hits[1], 1, 0)).astype(np.int8)
    for rule, hit in zip(self.rules, hits[2:]):
      severity = np.where(hit & (severity < _SEVERITY[rule.action]), _SEVERITY[rule.action], severity)
    matrix = np.column_stack(hits) if n else np.zeros((0, len(codes)), bool)
    rows, which = np.nonzero(matrix)  # row-major: each row's codes in rule order
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    reason_codes = pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes, pa.string()).take(pa.array(which)))
    decision = pa.array(ACTIONS, pa.string()).take(pa.array(severity))
    return decision, reason_codes


def load_rules(path: Optional[str] = None, feature_names: Sequence[str] = contracts.FEATURE_NAMES) -> RuleSet:
  """Parses and checks a rules file; raises RulesError with the first problem found."""
  path = path or DEFAULT_RULES
  try:
    with open(path, "rb") as f:
      text = f.read()
    spec = yaml.safe_load(text)
  except OSError as e:
    raise RulesError(f"cannot read rules file {path}: {e.strerror}") from e
  except yaml.YAMLError as e:
    raise RulesError(f"rules file {path} is not valid YAML: {e}") from e
  if not isinstance(spec, dict) or not isinstance(spec.get("rules"), list):
    raise RulesError(f"rules file {path} must be a mapping with a 'rules' list")
  names = set(feature_names)
  rules = []
  for i, r in enumerate(spec["rules"]):
    where = f"rules file {path}, rule {i + 1}"
    if not isinstance(r, dict):
      raise RulesError(f"{where}: must be a mapping")
    missing = {"code", "feature", "op", "value", "action"} - set(r)
    if missing:
      raise RulesError(f"{where}: missing {', '.join(sorted(missing))}")
    if r["feature"] not in names:
      raise RulesError(f"{where}: unknown feature {r['feature']!r}")
    if r["op"] not in _OPS:
      raise RulesError(f"{where}: unknown op {r['op']!r} (use one of {' '.join(_OPS)})")
    if r["action"] not in ACTIONS:
      raise RulesError(f"{where}: action must be one of {', '.join(ACTIONS)}")
    ratio = r.get("ratio_of")
    if ratio is not None and ratio not in names:
      raise RulesError(f"{where}: unknown feature {ratio!r} in ratio_of")
    try:
      value = float(r["value"])
    except (TypeError, ValueError):
      raise RulesError(f"{where}: value must be a number") from None
    rules.append(Rule(str(r["code"]), r["feature"], r["op"], value, r["action"], ratio))
  thresholds = spec.get("score_thresholds", {})
  decline, review = float(thresholds.get("decline", 0.9)), float(thresholds.get("review", 0.5))
  if not 0 <= review <= decline <= 1:
    raise RulesError(f"rules file {path}: need 0 <= review <= decline <= 1")
  return RuleSet(tuple(rules), decline, review, "rules-" + hashlib.sha256(text).hexdigest()[:12])
