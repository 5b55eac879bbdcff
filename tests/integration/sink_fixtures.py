"""Synthetic decisions and a pipeline factory shared by the sink integration tests."""
import socket
from typing import List

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from txstream.io.sinks import NAMESPACE, RetryPolicy
from txstream.records import Decision, Transaction
from txstream.transforms.features import FEATURE_NAMES

T0 = 1_522_540_800_000  # 2018-04-01T00:00:00Z
DAY_MS = 86_400_000
DECISIONS = ("approve", "review", "decline")
REASONS = ((), ("HIGH_AMOUNT",), ("NIGHT", "FAR_FROM_HOME"))
FAST_RETRY = RetryPolicy(initial_s=0.05, max_s=0.5, deadline_s=30.0, breaker_failures=5, breaker_cool_down_s=0.5)


def make_decisions(n: int, prefix: str = "tx", customers: int = 5, days: int = 3, start_ms: int = T0,
                   score_offset: float = 0.0) -> List[Decision]:
  """``n`` decisions spread over ``days`` event days and ``customers`` customers.

  Includes the awkward values a sink must carry: None optionals, tabs,
  backslashes and quotes in free-text fields, empty reason codes.
  """
  out = []
  for i in range(n):
    t = Transaction(
        transaction_id=f"{prefix}-{i:05d}",
        event_time_ms=start_ms + (i % days) * DAY_MS + i * 1_000,
        customer_id=i % customers,
        terminal_id=100 + i % 7,
        card_token=f"tok{i % customers:04d}",
        amount_minor=1_000 + 37 * i,
        currency="EUR" if i % 4 else "USD",
        entry_mode=None if i % 5 == 0 else "chip",
        merchant_category=None if i % 6 == 0 else 5411,
        schema_id=2,
        source=f"test.wire#{i}" if i % 9 else f"odd\tsource\\{i}\"q\"",
        customer_segment="retail",
        home_distance=float(i),
        reference_version=None if i % 8 == 0 else "ref-1")
    out.append(Decision(
        transaction=t,
        features=[float(i) + k / 4 for k in range(len(FEATURE_NAMES))],
        score=round((i % 100) / 100 + score_offset, 6),
        model_version="model-1",
        reason_codes=list(REASONS[i % 3]),
        decision=DECISIONS[i % 3],
        pipeline_version="0.1.0",
        decided_at_ms=start_ms + 10 * DAY_MS + i))
  return out


def pipeline() -> TestPipeline:
  """A TestPipeline on the in-process FnApiRunner (no Prism download attempt)."""
  return TestPipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))


def run_write(transform, decisions: List[Decision], expect_written: int, expect_dead: List[str] = ()) -> dict:
  """Runs Create(decisions) | transform, asserts on what it returns, and returns its counters.

  ``expect_written``: the sum of ``written``; ``expect_dead``: the messages'
  ``transaction_id=...`` prefixes of the expected dead letters.
  """
  p = pipeline()
  result = p | "Create" >> beam.Create(decisions, reshuffle=False) | "Sink" >> transform
  assert_that(result.written | "SumWritten" >> beam.CombineGlobally(sum), equal_to([expect_written]),
              label="written")
  assert_that(result.dead_letters | "DeadIds" >> beam.Map(lambda d: d.message.split(":", 1)[0]),
              equal_to(list(expect_dead)), label="dead")
  run = p.run()
  run.wait_until_finish()
  return counters(run)


def counters(run) -> dict:
  out = {}
  for c in run.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
