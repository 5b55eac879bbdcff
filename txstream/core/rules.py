"""Decision rules: thresholds on features and score, combined into a decision with reason codes.

Loaded from YAML (``config/rules.yaml`` by default) and applied to whole
batches. The decision is the most severe action any hit proposes: decline >
review > approve. Reason codes are stable strings that downstream case tools
key on: the model's code first, then the rules' in file order. The rules
version is the file's content hash, stamped beside the model version.
"""
import dataclasses
import difflib
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


_TOP_KEYS = ("version", "score_thresholds", "rules")
_THRESHOLD_KEYS = ("decline", "review")
_RULE_KEYS = ("code", "feature", "op", "value", "action", "ratio_of")
_REQUIRED_RULE_KEYS = ("code", "feature", "op", "value", "action")


def _nearest(word, valid: Sequence[str]) -> str:
  """`` (did you mean 'x'?)`` for the closest valid word, else the valid words: a typo names its fix."""
  near = difflib.get_close_matches(str(word), list(valid), n=1)
  return f" (did you mean {near[0]!r}?)" if near else f" (one of: {', '.join(valid)})"


def _check_keys(spec: dict, valid: Sequence[str], where: str) -> None:
  """A misspelled key would otherwise be ignored and its default used without a word."""
  for key in spec:
    if key not in valid:
      raise RulesError(f"{where}: unknown key {key!r}{_nearest(key, valid)}")


def _number(value, where: str, key: str) -> float:
  # YAML reads `yes` as True, which float() would take as 1.0.
  if isinstance(value, bool):
    raise RulesError(f"{where}: {key} {value!r} is not a number")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise RulesError(f"{where}: {key} {value!r} is not a number") from None


def _rule(r, where: str, names: Sequence[str]) -> Rule:
  if not isinstance(r, dict):
    raise RulesError(f"{where}: must be a mapping")
  if "code" in r:
    where = f"{where} ({r['code']})"
  _check_keys(r, _RULE_KEYS, where)
  missing = [k for k in _REQUIRED_RULE_KEYS if k not in r]
  if missing:
    raise RulesError(f"{where}: missing {', '.join(missing)}")
  for key in ("feature", "ratio_of"):
    if r.get(key) is not None and r[key] not in names:
      raise RulesError(f"{where}: unknown {key} {r[key]!r}{_nearest(r[key], names)}")
  if r["op"] not in _OPS:
    raise RulesError(f"{where}: unknown op {r['op']!r}{_nearest(r['op'], tuple(_OPS))}")
  if r["action"] not in ACTIONS:
    raise RulesError(f"{where}: unknown action {r['action']!r}{_nearest(r['action'], ACTIONS)}")
  value = _number(r["value"], where, "value")
  return Rule(str(r["code"]), r["feature"], r["op"], value, r["action"], r.get("ratio_of"))


def _thresholds(spec: dict, where: str) -> Tuple[float, float]:
  """(decline, review) score thresholds, defaults 0.9 and 0.5."""
  thresholds = spec.get("score_thresholds", {})
  where = f"{where}, score_thresholds"
  if not isinstance(thresholds, dict):
    raise RulesError(f"{where}: must be a mapping of {' and '.join(_THRESHOLD_KEYS)}")
  _check_keys(thresholds, _THRESHOLD_KEYS, where)
  decline = _number(thresholds.get("decline", 0.9), where, "decline")
  review = _number(thresholds.get("review", 0.5), where, "review")
  if not 0 <= review <= decline <= 1:
    raise RulesError(f"{where}: need 0 <= review <= decline <= 1")
  return decline, review


def load_rules(path: Optional[str] = None, feature_names: Sequence[str] = contracts.FEATURE_NAMES) -> RuleSet:
  """Parses and checks a rules file; raises RulesError with the first problem found.

  Every key is checked at every level (the file, ``score_thresholds``, each
  rule) and every op, feature and action against what is valid: a typo is
  an error naming the closest valid word, never a silent default.
  """
  path = path or DEFAULT_RULES
  try:
    with open(path, "rb") as f:
      text = f.read()
    spec = yaml.safe_load(text)
  except OSError as e:
    raise RulesError(f"cannot read rules file {path}: {e.strerror}") from e
  except yaml.YAMLError as e:
    raise RulesError(f"rules file {path} is not valid YAML: {' '.join(str(e).split())}") from e
  where = f"rules file {path}"
  if not isinstance(spec, dict):
    raise RulesError(f"{where} must be a mapping with a 'rules' list")
  _check_keys(spec, _TOP_KEYS, where)
  if not isinstance(spec.get("rules"), list):
    raise RulesError(f"{where} must be a mapping with a 'rules' list")
  rules = tuple(_rule(r, f"{where}, rule {i + 1}", tuple(feature_names)) for i, r in enumerate(spec["rules"]))
  decline, review = _thresholds(spec, where)
  return RuleSet(rules, decline, review, "rules-" + hashlib.sha256(text).hexdigest()[:12])
