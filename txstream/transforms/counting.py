"""Beam counters for what a stage emits: one increment per batch, by the batch's size.

Names (namespace ``txstream``): ``events_in``, ``labels_in``, ``decode_valid``,
``dead_letter.<stage>.<reason>``, ``label_dead_letter.<stage>.<reason>``,
``filtered.<reason>``, ``scored``, ``decision.<action>``, ``tier.<name>``.
The run summary reads them; a stage counts what it emits, never takes a count
back.
"""
import collections

import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from txstream import progress
from txstream.core import contracts


def inc(name: str, n: int = 1) -> None:
  """Counts ``n`` in Beam's metrics and in this process's progress tally (read while an in-process run runs)."""
  if n:
    Metrics.counter(contracts.NAMESPACE, name).inc(n)
    progress.record(name, n)


def dead_letters(table: pa.Table, prefix: str = "dead_letter") -> None:
  """Counts ``prefix.<stage>.<reason>`` for every row of a contracts.DEAD_LETTER table."""
  if not table.num_rows:
    return
  pairs = collections.Counter(zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()))
  for (stage, reason), n in pairs.items():
    inc(f"{prefix}.{stage}.{reason}", n)


def values(table: pa.Table, column: str, prefix: str) -> None:
  """Counts ``prefix.<value>`` per distinct value of a string column."""
  if not table.num_rows:
    return
  for pair in pc.value_counts(table.column(column)).to_pylist():
    inc(f"{prefix}.{pair['values']}", pair["counts"])
