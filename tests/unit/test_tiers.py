"""The decisions topic's JSON messages, written for a whole batch at once."""
import json

import numpy as np

from tests.unit.test_score import VECTORS, featured_batch
from txstream.core import decide, rules
from txstream.core.batch import DecisionBatch
from txstream.transforms.tiers import decision_messages


def test_decision_messages_are_one_json_object_per_decision_keyed_by_transaction():
  featured = featured_batch(VECTORS).table
  table = decide.decide(featured, np.array([0.1, 0.95, 0.6, 0.2, 0.00001]), "model-1", rules.load_rules(),
                        decided_at_ms=123)
  messages = list(decision_messages(DecisionBatch(table)))
  assert [key for key, _ in messages] == [f"tx-{i}" for i in range(len(VECTORS))]
  first = json.loads(messages[0][1])
  assert list(first) == sorted(first)  # sorted keys, as consumers have always had them
  assert first == {"transaction_id": "tx-0", "event_time_ms": featured.column("event_time_ms")[0].as_py(),
                   "customer_id": 1, "terminal_id": 2, "card_token": featured.column("card_token")[0].as_py(),
                   "amount_minor": 4000, "currency": "EUR", "decision": "approve", "score": 0.1, "reason_codes": [],
                   "model_version": "model-1", "rules_version": rules.load_rules().version,
                   "pipeline_version": "0.1.0", "decided_at_ms": 123, "source": "t#0"}
  assert json.loads(messages[1][1])["reason_codes"] == ["MODEL_SCORE_HIGH", "AMOUNT_OVER_LIMIT", "AMOUNT_SPIKE_VS_30D"]
  assert json.loads(messages[4][1])["score"] == 1e-05
