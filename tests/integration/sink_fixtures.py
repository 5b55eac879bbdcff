"""Synthetic decision batches and a pipeline factory shared by the sink integration tests."""
import socket
from typing import Dict, List, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from txstream.core import contracts
from txstream.core.batch import DeadLetterBatch, DecisionBatch
from txstream.io.sinks import FEATURE_POSITIONS, NAMESPACE, RetryPolicy, column_position

T0 = 1_522_540_800_000  # 2018-04-01T00:00:00Z
DAY_MS = 86_400_000
DECISIONS = ("approve", "review", "decline")
REASONS = ((), ("HIGH_AMOUNT",), ("NIGHT", "FAR_FROM_HOME"))
FAST_RETRY = RetryPolicy(initial_s=0.05, max_s=0.5, deadline_s=30.0, breaker_failures=5, breaker_cool_down_s=0.5)
FEATURES = contracts.FEATURE_COLUMNS
_HOME_DISTANCE = column_position("home_distance")  # the HOME_DISTANCE feature; -1.0 when not on file


def decision_table(n: int, prefix: str = "tx", customers: int = 5, days: int = 3, start_ms: int = T0,
                   score_offset: float = 0.0) -> pa.Table:
  """``n`` decisions spread over ``days`` event days and ``customers`` customers, as one table.

  Includes the awkward values a sink must carry: None optionals, tabs,
  backslashes and quotes in free-text fields, empty reason codes, a
  HOME_DISTANCE of -1 (terminal not on file) in every tenth row (i % 10 == 4).
  """
  index = range(n)
  columns = {
      "transaction_id": [f"{prefix}-{i:05d}" for i in index],
      "event_time_ms": [start_ms + (i % days) * DAY_MS + i * 1_000 for i in index],
      "customer_id": [i % customers for i in index],
      "terminal_id": [100 + i % 7 for i in index],
      "card_token": [f"tok{i % customers:04d}" for i in index],
      "amount_minor": [1_000 + 37 * i for i in index],
      "currency": ["EUR" if i % 4 else "USD" for i in index],
      "entry_mode": [None if i % 5 == 0 else "chip" for i in index],
      "merchant_category": [None if i % 6 == 0 else 5411 for i in index],
      "schema_id": [2] * n,
      "source": [f"test.wire#{i}" if i % 9 else f"odd\tsource\\{i}\"q\"" for i in index],
      "customer_segment": ["retail"] * n,
      "reference_version": [None if i % 8 == 0 else "ref-1" for i in index],
      "score": [round((i % 100) / 100 + score_offset, 6) for i in index],
      "decision": [DECISIONS[i % 3] for i in index],
      "reason_codes": [list(REASONS[i % 3]) for i in index],
      "model_version": ["model-1"] * n,
      "rules_version": [None if i % 10 == 3 else "rules-1" for i in index],
      "pipeline_version": ["0.1.0"] * n,
      "decided_at_ms": [start_ms + 10 * DAY_MS + i for i in index],
  }
  arrays = []
  for position, field in enumerate(contracts.DECISION):
    if position == _HOME_DISTANCE:
      values = [-1.0 if i % 10 == 4 else float(i) for i in index]
    elif position in FEATURE_POSITIONS:
      k = FEATURE_POSITIONS.index(position)
      values = [float(i) + k / 4 for i in index]
    else:
      values = columns[field.name]
    arrays.append(pa.array(values, field.type))
  return pa.Table.from_arrays(arrays, schema=contracts.DECISION)


def make_decisions(n: int, prefix: str = "tx", customers: int = 5, days: int = 3, start_ms: int = T0,
                   score_offset: float = 0.0, batch_rows: Optional[int] = None) -> List[DecisionBatch]:
  """``decision_table(...)`` as ``DecisionBatch``es of ``batch_rows`` rows (default: one batch)."""
  return batches_of(decision_table(n, prefix, customers, days, start_ms, score_offset), batch_rows)


def batches_of(table: pa.Table, batch_rows: Optional[int] = None) -> List[DecisionBatch]:
  step = batch_rows or max(table.num_rows, 1)
  return [DecisionBatch(table.slice(start, step)) for start in range(0, table.num_rows, step)]


def table_of(batches: Sequence[DecisionBatch]) -> pa.Table:
  return DecisionBatch.concat(batches).table.combine_chunks()


def rows(batches: Sequence[DecisionBatch]) -> List[Dict]:
  """Every row as a dict, with ``features`` the feature columns as a vector in order."""
  table = table_of(batches)
  plain = [i for i in range(table.num_columns) if i not in FEATURE_POSITIONS]
  out = pa.Table.from_arrays([table.column(i) for i in plain], names=[table.schema.names[i] for i in plain]).to_pylist()
  features = zip(*[table.column(i).to_pylist() for i in FEATURE_POSITIONS])
  for row, vector in zip(out, features):
    row["features"] = list(vector)
  return out


def with_values(batches: Sequence[DecisionBatch], index: int, **values) -> List[DecisionBatch]:
  """The same batches (same boundaries) with row ``index`` (counted across batches) changed."""
  sizes = [len(b) for b in batches]
  table = table_of(batches)
  arrays = list(table.columns)
  for name, value in values.items():
    position = table.schema.names.index(name)
    column = arrays[position].to_pylist()
    column[index] = value
    arrays[position] = pa.array(column, table.schema.field(position).type)
  changed = pa.Table.from_arrays(arrays, schema=table.schema)
  out, start = [], 0
  for size in sizes:
    out.append(DecisionBatch(changed.slice(start, size)))
    start += size
  return out


def with_columns(batches: Sequence[DecisionBatch], **columns) -> List[DecisionBatch]:
  """The same batches (same boundaries) with whole columns replaced (lists over all rows)."""
  sizes = [len(b) for b in batches]
  table = table_of(batches)
  for name, values in columns.items():
    position = table.schema.names.index(name)
    field = table.schema.field(position)
    table = table.set_column(position, field, pa.array(values, field.type))
  out, start = [], 0
  for size in sizes:
    out.append(DecisionBatch(table.slice(start, size)))
    start += size
  return out


def take(batches: Sequence[DecisionBatch], indices: Sequence[int], batch_rows: Optional[int] = None
         ) -> List[DecisionBatch]:
  """Rows ``indices`` (in that order) as batches of ``batch_rows``."""
  return batches_of(table_of(batches).take(pa.array(indices, pa.int64())), batch_rows)


def reversed_rows(batches: Sequence[DecisionBatch], batch_rows: Optional[int] = None) -> List[DecisionBatch]:
  n = sum(len(b) for b in batches)
  return take(batches, range(n - 1, -1, -1), batch_rows)


def dead_letter_batch(letters: Sequence[Dict]) -> DeadLetterBatch:
  return DeadLetterBatch(pa.Table.from_pylist(list(letters), schema=contracts.DEAD_LETTER))


def pipeline() -> TestPipeline:
  """A TestPipeline on the in-process FnApiRunner (no Prism download attempt)."""
  return TestPipeline(runner=fn_runner.FnApiRunner(), options=PipelineOptions([]))


def run_write(transform, batches, expect_written: int, expect_dead: Sequence[str] = (),
              expect_writes: Optional[int] = None, expect_dead_letters: Optional[Sequence[tuple]] = None) -> dict:
  """Runs Create(batches) | transform, asserts on what it returns, and returns its counters.

  ``expect_written``: the sum of ``written``; ``expect_dead``: the messages'
  ``transaction_id=...`` prefixes of the expected dead letters;
  ``expect_writes``: the number of batch writes (elements of ``written``);
  ``expect_dead_letters``: ``(source, stage, reason, message prefix)`` of each dead letter.
  """
  p = pipeline()
  result = p | "Create" >> beam.Create(list(batches), reshuffle=False) | "Sink" >> transform
  assert_that(result.written | "SumWritten" >> beam.CombineGlobally(sum), equal_to([expect_written]),
              label="written")
  if expect_writes is not None:
    assert_that(result.written | "CountWrites" >> beam.combiners.Count.Globally(), equal_to([expect_writes]),
                label="writes")
  letters = result.dead_letters | "DeadRows" >> beam.FlatMap(lambda b: b.table.to_pylist())
  assert_that(letters | "DeadIds" >> beam.Map(lambda d: d["message"].split(":", 1)[0]),
              equal_to(list(expect_dead)), label="dead")
  if expect_dead_letters is not None:
    assert_that(letters | "DeadFields" >> beam.Map(
        lambda d: (d["source"], d["stage"], d["reason"], d["message"].split(":", 1)[0])),
                equal_to(list(expect_dead_letters)), label="dead_fields")
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
