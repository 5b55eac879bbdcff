"""ComputeFeatures: per-customer and per-terminal behavioural features over event time (``core.features``).

Batches are split by shard (``customer_id % shards``, ``terminal_id %
shards``) and each shard's rows go through the core's feature engines in
(event time, transaction_id) order, so features depend only on events and
labels at or before a transaction's own time: never on arrival order or
bundle boundaries.

Bounded (``bounded=True``, batch execution only): one GroupByKey per shard
kind and one sorted pass per shard, no state or timers. Customer shards come
first and hand their rows, with customer features, to the terminal shards
with the labels.

Streaming: state per shard key and event-time timers. Each stage buffers its
input and, when the watermark passes a row's time plus the allowed lateness,
processes the rows up to there. Python runners hold no watermark for pending
timers, so a stage fed by another stage's timers could find rows behind its
own horizon after a watermark jump; the customer and terminal stages
therefore both read the enriched rows, and a join per customer shard pairs
their parts by (transaction_id, source). A transaction later than the
allowed lateness is a ``late`` dead letter, as is a label behind its
terminals' processed time.
"""
import logging
from typing import NamedTuple, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from txstream.core import contracts, dead_letters
from txstream.core import features as engine
from txstream.core.batch import (Batch, DeadLetterBatch, StateBatchCoder, FeaturedBatch, LabelBatch, TransactionBatch,
                                 shard_of, split_by)
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"
FILTERED = "filtered"
SHARDS = 16  # per shard kind; measured on 2 cores: 8-32 best, fewer keys make bigger sorts
_OUTPUT_ROWS = 25_000  # largest batch handed downstream
_SHUFFLE_ROWS = 25_000  # rows gathered per shard before a batch is shuffled (zstd pays per buffer)


class FeaturesResult(NamedTuple):
  featured: beam.PCollection   # FeaturedBatch
  filtered: beam.PCollection   # TransactionBatch of exact duplicates
  dead_letters: beam.PCollection  # DeadLetterBatch




def _chunks(table: pa.Table, rows: int = _OUTPUT_ROWS):
  for start in range(0, table.num_rows, rows):
    yield table.slice(start, rows)


def _by_shard(batch, column: str, shards: int):
  table = batch.table
  for shard, part in split_by(table, shard_of(table.column(column).to_numpy(), shards)):
    yield shard, type(batch)(part)


class _ShardBuffer:
  """Rows per shard, handed on in batches of about ``rows``: a shuffled batch costs per buffer, not per row."""

  def __init__(self, column: str, shards: int, rows: int = _SHUFFLE_ROWS):
    self._column, self._shards, self._rows = column, shards, rows
    self._parts, self._counts = {}, {}

  def add(self, batch):
    """Adds a batch's rows; yields (shard, batch) for every shard that has filled up."""
    table = batch.table
    for shard, part in split_by(table, shard_of(table.column(self._column).to_numpy(), self._shards)):
      self._parts.setdefault(shard, []).append(part)
      self._counts[shard] = self._counts.get(shard, 0) + part.num_rows
      if self._counts[shard] >= self._rows:
        yield shard, type(batch).concat([type(batch)(p) for p in self._parts.pop(shard)])
        del self._counts[shard]
    self._kind = type(batch)

  def drain(self):
    """Yields (shard, batch) for what is left, as WindowedValues in the global window (from finish_bundle)."""
    for shard in sorted(self._parts):
      batch = self._kind.concat([self._kind(p) for p in self._parts[shard]])
      yield WindowedValue((shard, batch), MIN_TIMESTAMP, (GlobalWindow(),))
    self._parts, self._counts = {}, {}


class _ShardSplitFn(beam.DoFn):
  """Batch -> (shard, batch of that shard's rows), gathered over the bundle (bounded runs)."""

  def __init__(self, column: str, shards: int):
    self._column, self._shards = column, shards

  def start_bundle(self):
    self._buffer = _ShardBuffer(self._column, self._shards)

  def process(self, batch):
    yield from self._buffer.add(batch)

  def finish_bundle(self):
    yield from self._buffer.drain()


def count_repeats(duplicates: pa.Table, dead: pa.Table) -> None:
  """Counts what the customer stage filtered (``filtered.duplicate``) and dead-lettered."""
  counting.inc("filtered.duplicate", duplicates.num_rows)
  counting.dead_letters(dead)


def counted(result: engine.Outcomes) -> engine.Outcomes:
  count_repeats(result.duplicates, result.dead_letters)
  return result


# ----------------------------------------------------------------------------------------------- bounded

class _CustomerShardFn(beam.DoFn):
  """(customer shard, TransactionBatches) -> (terminal shard, FeaturedBatch with customer features)."""
  def __init__(self, shards: int):
    self._shards = shards

  def start_bundle(self):
    self._out = _ShardBuffer("terminal_id", self._shards)

  def finish_bundle(self):
    yield from self._out.drain()

  def process(self, shard_batches):
    tx = TransactionBatch.concat(shard_batches[1]).table
    featured, duplicates, dead = counted(engine.outcomes(tx, engine.CustomerEngine(keep_state=False).update(tx)))
    if duplicates.num_rows:
      yield beam.pvalue.TaggedOutput(FILTERED, TransactionBatch(duplicates))
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))
    yield from self._out.add(FeaturedBatch(featured))


class _TerminalShardFn(beam.DoFn):
  """(terminal shard, FeaturedBatches) + every LabelBatch (side input) -> FeaturedBatches with every feature.

  Labels are few (chargebacks), so they come as a side input rather than
  through the shuffle: the FnApiRunner materialises a Flatten before a
  GroupByKey, which would hold every row a second time.
  """
  def __init__(self, delay_days: int, shards: int):
    self._delay_days = delay_days
    self._shards = shards

  def process(self, shard_batches, labels):
    shard = shard_batches[0]
    terminals = engine.TerminalEngine(self._delay_days, keep_state=False)
    for batch in labels:
      table = batch.table
      terminals.add_labels(table.filter(pa.array(shard_of(table.column("terminal_id").to_numpy(), self._shards)
                                                 == shard)))
    rows = FeaturedBatch.concat(shard_batches[1]).table
    featured = engine.with_features(rows, contracts.TERMINAL_FEATURES, terminals.update(rows))
    for part in _chunks(featured):
      yield FeaturedBatch(part)


# ----------------------------------------------------------------------------------------------- streaming

class _OrderedStateFn(beam.DoFn):
  """Buffers a shard's rows and processes them in event-time order once the watermark passes them.

  A timer at T only proves the watermark passed T, so the rows up to
  T - lateness are final and processed; the rest wait for the next timer,
  set for the latest of them.
  Subclasses implement ``new_engine()`` and ``ready(engine, table)`` (a
  generator of outputs), and pass ``_buffer`` what late rows become.
  """
  PENDING = BagStateSpec("pending", StateBatchCoder())
  ENGINE = ReadModifyWriteStateSpec("engine", PickleCoder())
  DONE_UP_TO = ReadModifyWriteStateSpec("done_up_to", VarIntCoder())
  NEXT_FIRE = ReadModifyWriteStateSpec("next_fire", VarIntCoder())
  FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

  def __init__(self, lateness_ms: int):
    self._lateness_ms = lateness_ms

  def _buffer(self, batch, pending, done, next_fire, flush, late):
    """Adds a batch's rows to the pending ones; yields what ``late(rows, done_up_to)`` makes of those behind."""
    table = batch.table
    done_up_to = done.read()
    times = table.column("event_time_ms").to_numpy()
    if done_up_to is not None and (times <= done_up_to).any():
      yield from late(table.filter(pa.array(times <= done_up_to)), done_up_to)
      table = table.filter(pa.array(times > done_up_to))
      times = times[times > done_up_to]
    if not table.num_rows:
      return
    pending.add(type(batch)(table))
    self._schedule(int(times.max()) + self._lateness_ms, next_fire, flush)

  @staticmethod
  def _schedule(fire_at: int, next_fire, flush):
    # One timer at a time, set for the latest pending row and never moved: a firing releases every row
    # the watermark has passed (by the lateness) since, however far behind it the rows are (a replay of
    # old traffic fires once, not once per distinct time), and rows still arriving cannot postpone it.
    if next_fire.read() is None:
      next_fire.write(fire_at)
      flush.set(Timestamp(micros=fire_at * 1000))

  @on_timer(FLUSH)
  def on_flush(self, fire=beam.DoFn.TimestampParam, pending=beam.DoFn.StateParam(PENDING),
               state=beam.DoFn.StateParam(ENGINE), done=beam.DoFn.StateParam(DONE_UP_TO),
               next_fire=beam.DoFn.StateParam(NEXT_FIRE), flush=beam.DoFn.TimerParam(FLUSH)):
    batches = list(pending.read())
    pending.clear()
    next_fire.clear()
    if not batches:
      return
    table = type(batches[0]).concat(batches).table
    horizon = fire.micros // 1000 - self._lateness_ms
    times = table.column("event_time_ms").to_numpy()
    ready = times <= horizon
    current = state.read() or self.new_engine()
    if ready.any():
      yield from self.ready(current, table.filter(pa.array(ready)))
      state.write(current)
      done.write(max(done.read() or 0, int(times[ready].max())))
    if not ready.all():
      waiting = table.filter(pa.array(~ready))
      pending.add(type(batches[0])(waiting))
      self._schedule(int(times[~ready].max()) + self._lateness_ms, next_fire, flush)


def _late_letters(table: pa.Table, done_up_to: int, what: str) -> DeadLetterBatch:
  own = engine.own_rows(table)
  times = own.column("event_time_ms").to_pylist()
  return DeadLetterBatch(dead_letters.table(
      own.column("source").to_pylist(), [None] * own.num_rows, contracts.FEATURES, contracts.LATE, "",
      [f"event at {t} after {what} processed to {done_up_to}" for t in times]))


def _timestamped(batch, table: pa.Table):
  return beam.window.TimestampedValue(batch, int(table.column("event_time_ms").to_numpy().min()) / 1000)


class _CustomerStreamFn(_OrderedStateFn):
  """(customer shard, TransactionBatch) -> (customer shard, ("c", FeaturedBatch with customer features))."""

  def __init__(self, lateness_ms: int, shards: int):
    super().__init__(lateness_ms)
    self._shards = shards

  def new_engine(self):
    return engine.CustomerEngine(self._lateness_ms)

  def _late(self, table, done_up_to):
    letters = _late_letters(table, done_up_to, "customer")
    counting.dead_letters(letters.table)
    if len(letters):
      yield beam.pvalue.TaggedOutput(DEAD, letters)

  def process(self, keyed, pending=beam.DoFn.StateParam(_OrderedStateFn.PENDING),
              done=beam.DoFn.StateParam(_OrderedStateFn.DONE_UP_TO),
              next_fire=beam.DoFn.StateParam(_OrderedStateFn.NEXT_FIRE),
              flush=beam.DoFn.TimerParam(_OrderedStateFn.FLUSH)):
    yield from self._buffer(keyed[1], pending, done, next_fire, flush, self._late)

  def ready(self, customers, tx):
    featured, duplicates, dead = counted(engine.outcomes(tx, customers.update(tx)))
    if duplicates.num_rows:
      yield beam.pvalue.TaggedOutput(FILTERED, TransactionBatch(duplicates))
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))
    for shard, part in split_by(featured, shard_of(featured.column("customer_id").to_numpy(), self._shards)):
      yield _timestamped((shard, ("c", FeaturedBatch(part))), part)


class _TerminalState:
  """A terminal shard's engine and the repeats it has seen (the same first occurrence the customers keep)."""
  def __init__(self, delay_days: int, lateness_ms: int):
    self.terminals = engine.TerminalEngine(delay_days, lateness_ms)
    self.repeats = engine.Repeats(engine.LONGEST_MS + lateness_ms)


class _TerminalStreamFn(_OrderedStateFn):
  """(terminal shard, TransactionBatch | LabelBatch) -> (customer shard, ("t", FeaturedBatch of terminal parts)).

  Labels join the engine when they arrive (a label counts only for
  transactions at or after its label time); one behind the processed time is
  a ``late`` dead letter. A transaction arriving behind the processed time
  still gets its terminal part, from the history as it stands and without
  joining it: lateness is judged once, by the customer stage.
  """

  def __init__(self, lateness_ms: int, delay_days: int, shards: int):
    super().__init__(lateness_ms)
    self._delay_days = delay_days
    self._shards = shards

  def new_engine(self):
    return _TerminalState(self._delay_days, self._lateness_ms)

  def process(self, keyed, pending=beam.DoFn.StateParam(_OrderedStateFn.PENDING),
              state=beam.DoFn.StateParam(_OrderedStateFn.ENGINE),
              done=beam.DoFn.StateParam(_OrderedStateFn.DONE_UP_TO),
              next_fire=beam.DoFn.StateParam(_OrderedStateFn.NEXT_FIRE),
              flush=beam.DoFn.TimerParam(_OrderedStateFn.FLUSH)):
    batch = keyed[1]
    if isinstance(batch, LabelBatch):
      yield from self._labels(batch.table, state, done)
      return
    yield from self._buffer(batch, pending, done, next_fire, flush,
                            lambda table, done_up_to: self._late(table, state))

  def _labels(self, labels: pa.Table, state, done):
    done_up_to = done.read()
    if done_up_to is not None:
      late = labels.column("label_time_ms").to_numpy() <= done_up_to
      if late.any():
        behind = engine.own_rows(labels.filter(pa.array(late)))
        letters = dead_letters.table(
            [f"label:{i}" for i in behind.column("transaction_id").to_pylist()], [None] * behind.num_rows,
            contracts.FEATURES, contracts.LATE, "",
            [f"label at {t} after terminal processed to {done_up_to}"
             for t in behind.column("label_time_ms").to_pylist()])
        counting.dead_letters(letters, "label_dead_letter")
        if letters.num_rows:
          yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(letters))
        labels = labels.filter(pa.array(~late))
    current = state.read() or self.new_engine()
    current.terminals.add_labels(labels)
    state.write(current)

  def _late(self, table, state):
    current = state.read() or self.new_engine()
    first = current.repeats.check(table, remember=False) == engine.KEPT
    yield from self._parts(table.filter(pa.array(first)), current.terminals.update(
        table.filter(pa.array(first)), record=False))

  def ready(self, current, tx):
    first = tx.filter(pa.array(current.repeats.check(tx) == engine.KEPT))
    yield from self._parts(first, current.terminals.update(first))

  def _parts(self, tx: pa.Table, columns):
    if not tx.num_rows:
      return
    parts = engine.with_features(engine.featured(tx), contracts.TERMINAL_FEATURES, columns)
    for shard, part in split_by(parts, shard_of(parts.column("customer_id").to_numpy(), self._shards)):
      yield _timestamped((shard, ("t", FeaturedBatch(part))), part)


class _JoinFn(beam.DoFn):
  """(customer shard, ("c" | "t", FeaturedBatch)) -> complete FeaturedBatches once both parts of a row are in.

  Parts are kept as they come and matched on the watermark (a timer at the
  part's earliest time, which the watermark has already passed), so matching
  costs once per watermark advance, not once per part. Independent of arrival
  order. A terminal part whose customer part never comes (the customer stage
  dropped the row as a repeat seen by another terminal shard) is let go once
  it is a whole window behind the newest row held.
  """
  PARTS = BagStateSpec("parts", PickleCoder())
  MATCH = TimerSpec("match", TimeDomain.WATERMARK)

  def process(self, keyed, timestamp=beam.DoFn.TimestampParam, parts=beam.DoFn.StateParam(PARTS),
              match=beam.DoFn.TimerParam(MATCH)):
    kind, batch = keyed[1]
    parts.add((kind, batch.table))
    match.set(timestamp)

  @on_timer(MATCH)
  def on_match(self, parts=beam.DoFn.StateParam(PARTS)):
    held = list(parts.read())
    parts.clear()
    customer = _concat([t for kind, t in held if kind == "c"])
    terminal = _concat([t for kind, t in held if kind == "t"])
    if not customer.num_rows or not terminal.num_rows:
      for kind, table in (("c", customer), ("t", terminal)):
        if table.num_rows:
          parts.add((kind, table))
      return
    keys = ["transaction_id", "source"]
    t_index = {k: i for i, k in enumerate(zip(*(terminal.column(c).to_pylist() for c in keys)))}
    match = np.array([t_index.get(k, -1) for k in zip(*(customer.column(c).to_pylist() for c in keys))],
                     dtype=np.int64)
    matched = match >= 0
    if matched.any():
      found = terminal.take(pa.array(match[matched]))
      complete = engine.with_features(customer.filter(pa.array(matched)), contracts.TERMINAL_FEATURES,
                                      [found.column(n.lower()).to_numpy() for n in contracts.TERMINAL_FEATURES])
      yield _timestamped(FeaturedBatch(complete), complete)
    if not matched.all():
      parts.add(("c", customer.filter(pa.array(~matched))))
    used = np.zeros(terminal.num_rows, bool)
    used[match[matched]] = True
    rest = terminal.filter(pa.array(~used))
    newest = int(customer.column("event_time_ms").to_numpy().max())
    rest = rest.filter(pa.array(rest.column("event_time_ms").to_numpy() > newest - engine.LONGEST_MS))
    if rest.num_rows:
      parts.add(("t", rest))


def _concat(tables) -> pa.Table:
  tables = [t for t in tables if t.num_rows]
  if not tables:
    return contracts.empty(contracts.FEATURED)
  return pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0]


class ComputeFeatures(beam.PTransform[beam.PCollection[TransactionBatch], FeaturesResult]):
  """Enriched TransactionBatches (+ LabelBatches) -> (FeaturedBatches, duplicates, DeadLetterBatches).

  Deterministic: features are a pure function of the events and labels with
  event time <= the transaction's own (ties by transaction_id).
  ``bounded=True`` is for batch execution only (every runner's batch mode
  groups a shard's whole input): one sorted pass per shard. Streaming graphs
  (and TestStream) must leave it False.
  """
  def __init__(self, labels=None, allowed_lateness_s: int = 0, terminal_delay_days: int = 7,
               bounded: bool = False, shards: int = SHARDS):
    super().__init__()
    if allowed_lateness_s < 0:
      raise ValueError("allowed_lateness_s must be >= 0")
    if terminal_delay_days < 0:
      raise ValueError("terminal_delay_days must be >= 0")
    if shards < 1:
      raise ValueError("shards must be >= 1")
    self._labels = labels
    self._lateness_ms = allowed_lateness_s * 1000
    self._delay_days = terminal_delay_days
    self._bounded = bounded
    self._shards = shards

  def expand(self, transactions):
    labels = self._labels
    if labels is None:
      labels = transactions.pipeline | "NoLabels" >> beam.Create([]).with_output_types(LabelBatch)
    if self._bounded:
      return self._expand_bounded(transactions, labels)
    return self._expand_streaming(transactions, labels)

  def _expand_bounded(self, transactions, labels):
    shards = self._shards
    customer = (
        transactions
        | "ByCustomerShard" >> beam.ParDo(_ShardSplitFn("customer_id", shards)).with_output_types(
            Tuple[int, TransactionBatch])
        | "CollectCustomers" >> beam.GroupByKey()
        | "Customer" >> beam.ParDo(_CustomerShardFn(shards)).with_output_types(
            Tuple[int, FeaturedBatch], **{DEAD: DeadLetterBatch, FILTERED: TransactionBatch}).with_outputs(
                DEAD, FILTERED, main="featured"))
    terminal = (
        customer.featured
        | "CollectTerminals" >> beam.GroupByKey()
        | "Terminal" >> beam.ParDo(_TerminalShardFn(self._delay_days, shards), beam.pvalue.AsIter(labels))
        .with_output_types(FeaturedBatch))
    return FeaturesResult(terminal, customer[FILTERED], customer[DEAD])

  def _expand_streaming(self, transactions, labels):
    shards = self._shards
    customer = (
        transactions
        | "ByCustomerShard" >> beam.FlatMap(_by_shard, "customer_id", shards).with_output_types(
            Tuple[int, TransactionBatch])
        | "Customer" >> beam.ParDo(_CustomerStreamFn(self._lateness_ms, shards)).with_output_types(
            Tuple[int, Tuple[str, FeaturedBatch]], **{DEAD: DeadLetterBatch, FILTERED: TransactionBatch}).with_outputs(
            DEAD, FILTERED, main="featured"))
    terminal = (
        (transactions | "ByTerminalShard" >> beam.FlatMap(_by_shard, "terminal_id", shards).with_output_types(
            Tuple[int, Batch]),
         labels | "LabelsByTerminalShard" >> beam.FlatMap(_by_shard, "terminal_id", shards).with_output_types(
             Tuple[int, Batch]))
        | "MergeLabels" >> beam.Flatten()
        | "Terminal" >> beam.ParDo(_TerminalStreamFn(self._lateness_ms, self._delay_days, shards)).with_output_types(
            Tuple[int, Tuple[str, FeaturedBatch]], **{DEAD: DeadLetterBatch}).with_outputs(
            DEAD, main="parts"))
    featured = (
        (customer.featured, terminal.parts)
        | "Parts" >> beam.Flatten()
        | "Join" >> beam.ParDo(_JoinFn()).with_output_types(FeaturedBatch))
    dead = (customer[DEAD], terminal[DEAD]) | "DeadLetters" >> beam.Flatten()
    return FeaturesResult(featured, customer[FILTERED], dead)
