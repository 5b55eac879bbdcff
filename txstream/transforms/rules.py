"""Decision rules: thresholds on features and score, combined into a decision with reason codes.

Pure functions over a feature vector, loaded from YAML (``config/rules.yaml``
by default). The decision is the most severe action any hit proposes:
decline > review > approve. Reason codes are stable strings that downstream
case tools key on; their order follows the rule file.
"""
import dataclasses
import operator
import os
from typing import List, Optional, Sequence, Tuple

import yaml

DEFAULT_RULES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "config", "rules.yaml")
ACTIONS = ("approve", "review", "decline")
_SEVERITY = {a: i for i, a in enumerate(ACTIONS)}
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}


class RulesError(ValueError):
  """The rules file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Rule:
  code: str
  index: int
  op: str
  value: float
  action: str
  ratio_index: Optional[int] = None

  def hit(self, features: Sequence[float]) -> bool:
    x = features[self.index]
    if self.ratio_index is not None:
      base = features[self.ratio_index]
      if base <= 0:
        return False
      x = x / base
    return _OPS[self.op](x, self.value)


@dataclasses.dataclass(frozen=True)
class RuleSet:
  rules: Tuple[Rule, ...]
  decline_score: float
  review_score: float

  def decide(self, features: Sequence[float], score: float) -> Tuple[str, List[str]]:
    """(decision, reason codes) for one transaction."""
    codes, severity = [], 0
    if score >= self.decline_score:
      codes.append("MODEL_SCORE_HIGH")
      severity = 2
    elif score >= self.review_score:
      codes.append("MODEL_SCORE_ELEVATED")
      severity = 1
    for rule in self.rules:
      if rule.hit(features):
        codes.append(rule.code)
        severity = max(severity, _SEVERITY[rule.action])
    return ACTIONS[severity], codes


def load_rules(path: Optional[str], feature_names: Sequence[str]) -> RuleSet:
  """Parses and checks a rules file; raises RulesError with the first problem found."""
  path = path or DEFAULT_RULES
  try:
    with open(path, encoding="utf-8") as f:
      spec = yaml.safe_load(f)
  except OSError as e:
    raise RulesError(f"cannot read rules file {path}: {e.strerror}") from e
  except yaml.YAMLError as e:
    raise RulesError(f"rules file {path} is not valid YAML: {e}") from e
  if not isinstance(spec, dict) or not isinstance(spec.get("rules"), list):
    raise RulesError(f"rules file {path} must be a mapping with a 'rules' list")
  names = {n: i for i, n in enumerate(feature_names)}
  rules = []
  for i, r in enumerate(spec["rules"]):
    where = f"rules file {path}, rule {i + 1}"
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
    rules.append(Rule(str(r["code"]), names[r["feature"]], r["op"], float(r["value"]), r["action"],
                      names[ratio] if ratio else None))
  thresholds = spec.get("score_thresholds", {})
  decline, review = float(thresholds.get("decline", 0.9)), float(thresholds.get("review", 0.5))
  if not 0 <= review <= decline <= 1:
    raise RulesError(f"rules file {path}: need 0 <= review <= decline <= 1")
  return RuleSet(tuple(rules), decline, review)
