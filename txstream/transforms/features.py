"""ComputeFeatures: per-customer and per-terminal behavioural features over event time.

Two stateful stages, chained so no join is needed: transactions keyed by
customer get their spending features, then, keyed by terminal and merged with
the label stream, their terminal risk features. Each stage buffers its input
and, when the watermark passes, processes it in (event time, kind, id) order,
so a transaction's features depend only on events and labels at or before its
own time: never on arrival order or bundle boundaries. In batch the watermark
jumps to the end once and each key is processed in one sorted pass.

An event that arrives after its key has already been processed past its time
by more than nothing (it would have changed features already emitted) is a
dead letter with reason ``late``. ``allowed_lateness_s`` delays processing by
that much so reasonably out-of-order streams lose nothing.
"""
import itertools
import logging
import zlib
from typing import Any, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from txstream.records import DeadLetter, Featured, Label, Transaction, dead_letter
from txstream.transforms.feature_state import WINDOWS_DAYS, CustomerHistory, TerminalHistory, time_flags

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD = "dead_letters"
FILTERED = "filtered"
STAGE = "features"

# Order = CustomerHistory.add and TerminalHistory.add outputs (see feature_state).
FEATURE_NAMES = (
    ["TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT"]
    + [f"CUSTOMER_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "AVG_AMOUNT")]
    + ["CUSTOMER_ID_AMOUNT_RATIO_7DAY_WINDOW", "CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW",
       "CUSTOMER_ID_AMOUNT_ZSCORE_30DAY_WINDOW"]
    + [f"TERMINAL_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "RISK")]
    + ["TERMINAL_ID_KNOWN_FRAUDS_7DAY", "TERMINAL_ID_KNOWN_RISK_7DAY", "TERMINAL_ID_KNOWN_FRAUDS_30DAY",
       "TERMINAL_ID_KNOWN_RISK_30DAY", "TERMINAL_ID_DAYS_SINCE_KNOWN_FRAUD"]
    + ["HOME_DISTANCE"])

_TX, _LABEL = 1, 0  # at equal times a label is known before the transaction is decided
BATCH_SHARDS = 32  # bounded runs group keys into this many shards before the shuffle


class FeaturesResult(NamedTuple):
  featured: beam.PCollection
  filtered: beam.PCollection
  dead_letters: beam.PCollection


def fingerprint(tx: Transaction) -> int:
  # crc32, not hash(): str hashes differ between worker processes.
  return zlib.crc32(repr((tx.event_time_ms, tx.customer_id, tx.terminal_id, tx.card_token, tx.amount_minor,
                          tx.currency)).encode())


class _OrderedFn(beam.DoFn):
  """Buffers a key's elements and processes them in event-time order on the watermark.

  Subclasses implement ``sort_key(element)``, ``new_state()`` and
  ``apply(state, element)`` (a generator of outputs).
  """
  PENDING = BagStateSpec("pending", PickleCoder())
  STATE = ReadModifyWriteStateSpec("state", PickleCoder())
  DONE_UP_TO = ReadModifyWriteStateSpec("done_up_to", VarIntCoder())
  NEXT_FIRE = ReadModifyWriteStateSpec("next_fire", VarIntCoder())
  FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

  def __init__(self, lateness_ms: int):
    super().__init__()
    self._lateness_ms = lateness_ms
    self._late = Metrics.counter(NAMESPACE, f"dead_letter.{STAGE}.late")
    self._late_labels = Metrics.counter(NAMESPACE, f"label_dead_letter.{STAGE}.late")

  def time_of(self, element) -> int:
    raise NotImplementedError

  def on_late(self, element, done_up_to):
    """What a late element becomes (a dead letter by default); None: buffer it after all."""
    return beam.pvalue.TaggedOutput(DEAD, self.late_letter(element, done_up_to))

  def process(self, keyed, pending=beam.DoFn.StateParam(PENDING), done=beam.DoFn.StateParam(DONE_UP_TO),
              next_fire=beam.DoFn.StateParam(NEXT_FIRE), flush=beam.DoFn.TimerParam(FLUSH)):
    element = keyed[1]
    t = self.time_of(element)
    done_up_to = done.read()
    if done_up_to is not None and t <= done_up_to:
      late = self.on_late(element, done_up_to)
      if late is not None:
        (self._late_labels if isinstance(element, Label) else self._late).inc()
        yield late
        return
    pending.add(element)
    fire_at = t + self._lateness_ms
    scheduled = next_fire.read()
    if scheduled is None or fire_at < scheduled:
      next_fire.write(fire_at)
      flush.set(Timestamp(micros=fire_at * 1000))

  @on_timer(FLUSH)
  def on_flush(self, fire=beam.DoFn.TimestampParam, pending=beam.DoFn.StateParam(PENDING),
               state=beam.DoFn.StateParam(STATE), done=beam.DoFn.StateParam(DONE_UP_TO),
               next_fire=beam.DoFn.StateParam(NEXT_FIRE), flush=beam.DoFn.TimerParam(FLUSH)):
    fire_ms = fire.micros // 1000
    # A timer at T only proves the watermark passed T, so only elements up to
    # T - lateness are final.
    horizon = fire_ms - self._lateness_ms
    ready, waiting = [], []
    for element in pending.read():
      (ready if self.time_of(element) <= horizon else waiting).append(element)
    pending.clear()
    if not ready and not waiting:
      next_fire.clear()
      return
    current = state.read() or self.new_state()
    ready.sort(key=self.sort_key)
    for element in ready:
      yield from self.apply(current, element)
    state.write(current)
    if ready:
      done.write(max(done.read() or 0, self.time_of(ready[-1])))
    if waiting:
      for element in waiting:
        pending.add(element)
      fire_at = min(self.time_of(e) for e in waiting) + self._lateness_ms
      next_fire.write(fire_at)
      flush.set(Timestamp(micros=fire_at * 1000))
    else:
      next_fire.clear()


class _ShardFn(beam.DoFn):
  """Batch: (shard, lists of elements) -> one pass per key in event-time order.

  Only valid when the shard holds every element of its keys (bounded input,
  global window): the result equals the stateful path's, at a fraction of its
  cost. Elements cross the shuffle as a few lists per bundle and shard
  instead of one by one, and no per-element state or timer is involved.
  """
  def process(self, shard_lists):
    by_key = {}
    for element in self.elements(shard_lists[1]):
      by_key.setdefault(self.key_of(element), []).append(element)
    outputs = {}
    for key in sorted(by_key):
      state = self.new_state()
      for element in sorted(by_key[key], key=self.sort_key):
        for out in self.apply(state, element):
          if isinstance(out, beam.pvalue.TaggedOutput):
            yield out
          else:
            yield from self.collect(outputs, out)
    yield from self.flush(outputs)

  @staticmethod
  def elements(lists):
    return itertools.chain.from_iterable(lists)

  def collect(self, outputs, out):
    yield out

  def flush(self, outputs):
    return ()


class _CustomerLogic:
  """(customer_id, Transaction) -> (terminal_id, (Transaction, customer features))."""
  _filtered = None

  def time_of(self, tx):
    return tx.event_time_ms

  @staticmethod
  def sort_key(tx):
    return tx.event_time_ms, tx.transaction_id

  @staticmethod
  def new_state():
    return CustomerHistory()

  def late_letter(self, tx, done_up_to):
    return dead_letter(tx.source, None, STAGE, "late",
                       message=f"event at {tx.event_time_ms} after customer processed to {done_up_to}")

  def apply(self, history: CustomerHistory, tx: Transaction):
    repeat = history.is_duplicate(tx.transaction_id, tx.event_time_ms, fingerprint(tx))
    if repeat == "duplicate":
      Metrics.counter(NAMESPACE, "filtered.duplicate").inc()
      yield beam.pvalue.TaggedOutput(FILTERED, (repeat, tx))
      return
    if repeat is not None:
      Metrics.counter(NAMESPACE, f"dead_letter.{STAGE}.{repeat}").inc()
      yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
          tx.source, None, STAGE, repeat, message=f"transaction_id {tx.transaction_id} reused with other content"))
      return
    yield tx.terminal_id, (tx, history.add(tx.event_time_ms, tx.amount_minor))


class _TerminalLogic:
  """(terminal_id, (Transaction, customer features) | Label) -> Featured."""
  _delay_days = 7

  def time_of(self, element):
    return element.label_time_ms if isinstance(element, Label) else element[0].event_time_ms

  @staticmethod
  def sort_key(element):
    if isinstance(element, Label):
      return element.label_time_ms, _LABEL, element.transaction_id
    return element[0].event_time_ms, _TX, element[0].transaction_id

  def new_state(self):
    return TerminalHistory(self._delay_days)

  def late_letter(self, element, done_up_to):
    if isinstance(element, Label):
      return dead_letter(f"label:{element.transaction_id}", None, STAGE, "late",
                         message=f"label at {element.label_time_ms} after terminal processed to {done_up_to}")
    return dead_letter(element[0].source, None, STAGE, "late",
                       message=f"event at {element[0].event_time_ms} after terminal processed to {done_up_to}")

  def apply(self, history: TerminalHistory, element):
    if isinstance(element, Label):
      if element.is_fraud:
        history.add_label(element.transaction_id, element.tx_time_ms)
      return
    tx, customer_features = element
    yield beam.window.TimestampedValue(assemble(tx, customer_features, history.add(tx.event_time_ms)),
                                       tx.event_time_ms / 1000)


def assemble(tx: Transaction, customer_features: tuple, terminal_features: tuple) -> Featured:
  """The feature vector in ``FEATURE_NAMES`` order."""
  weekend, night = time_flags(tx.event_time_ms)
  return Featured(tx, ((tx.amount_minor / 100.0, weekend, night) + customer_features + terminal_features
                       + (tx.home_distance if tx.home_distance is not None else -1.0,)))


class _TerminalStreamState:
  """A terminal's history plus the transaction ids it has counted (exact repeats count once)."""
  __slots__ = ("history", "seen")

  def __init__(self, delay_days: int):
    self.history = TerminalHistory(delay_days)
    self.seen = {}


class _TerminalStreamFn(_TerminalLogic, _OrderedFn):
  """Streaming: (terminal_id, (Transaction, None) | Label) -> (transaction_id, terminal features).

  Fed by the source-rooted transactions rather than by the customer stage:
  Python runners hold no watermark for pending timers, so a stage fed by
  another stage's timers can find elements behind its own horizon after a
  watermark jump. Both stages read the source and ``_JoinFn`` pairs them.
  """
  def __init__(self, lateness_ms: int, delay_days: int):
    super().__init__(lateness_ms)
    self._delay_days = delay_days

  def new_state(self):
    return _TerminalStreamState(self._delay_days)

  def on_late(self, element, done_up_to):
    # Lateness of a transaction is judged once, by the customer stage; here a
    # late one still gets its terminal part (else it could never be joined),
    # computed from the history as it stands and not added to it.
    return super().on_late(element, done_up_to) if isinstance(element, Label) else None

  def apply(self, state, element):
    if isinstance(element, Label):
      yield from super().apply(state.history, element)
      return
    tx = element[0]
    if tx.transaction_id in state.seen:
      return
    state.seen[tx.transaction_id] = tx.event_time_ms
    if state.history.times and tx.event_time_ms < state.history.times[-1]:
      yield beam.window.TimestampedValue(
          (tx.transaction_id, ("t", tx, state.history.peek(tx.event_time_ms))), tx.event_time_ms / 1000)
      return
    if len(state.seen) > 4096:
      horizon = tx.event_time_ms - 60 * 86_400_000
      state.seen = {k: t for k, t in state.seen.items() if t > horizon}
    yield beam.window.TimestampedValue(
        (tx.transaction_id, ("t", tx, state.history.add(tx.event_time_ms))), tx.event_time_ms / 1000)


class _JoinFn(beam.DoFn):
  """(transaction_id, customer part | terminal part) -> Featured once both parts are in.

  Independent of arrival order and of the watermark; each part arrives once
  (both stages drop exact repeats), so each transaction is emitted once.
  """
  PART = ReadModifyWriteStateSpec("part", PickleCoder())

  def process(self, keyed, part_state=beam.DoFn.StateParam(PART)):
    part = keyed[1]
    other = part_state.read()
    if other is None:
      part_state.write(part)
      return
    part_state.clear()
    (_, tx, customer_features), (_, _, terminal_features) = sorted((part, other), key=lambda p: p[0])
    yield beam.window.TimestampedValue(assemble(tx, customer_features, terminal_features), tx.event_time_ms / 1000)


class _CustomerFeaturesFn(_CustomerLogic, _OrderedFn):
  def apply(self, history, tx):
    for out in super().apply(history, tx):
      yield out if isinstance(out, beam.pvalue.TaggedOutput) else beam.window.TimestampedValue(
          out, tx.event_time_ms / 1000)


class _CustomerBatchFn(_CustomerLogic, _ShardFn):
  """Customer shard -> lists of (terminal_id, (tx, features)) per terminal shard."""
  def __init__(self, shards: int):
    super().__init__()
    self._shards = shards

  @staticmethod
  def elements(txs):
    return map(Transaction._make, txs)

  @staticmethod
  def key_of(tx):
    return tx.customer_id

  def collect(self, outputs, out):
    terminal_id, (tx, features) = out
    outputs.setdefault(terminal_id % self._shards, []).append((tuple(tx), features))
    return ()

  def flush(self, outputs):
    return sorted(outputs.items())


class _TerminalBatchFn(_TerminalLogic, _ShardFn):
  def __init__(self, delay_days: int):
    super().__init__()
    self._delay_days = delay_days

  @staticmethod
  def elements(lists):
    for chunk in lists:
      for e in chunk:
        yield e if isinstance(e, Label) else (Transaction._make(e[0]), e[1])

  @staticmethod
  def key_of(element):
    return element.terminal_id if isinstance(element, Label) else element[0].terminal_id


class ComputeFeatures(beam.PTransform):
  """Enriched Transactions (+ Labels side stream) -> (Featured, filtered duplicates, DeadLetters).

  Deterministic: features are a pure function of the events and labels with
  event time <= the transaction's own (ties by transaction_id).

  ``bounded=True`` is for batch execution only (every runner's batch mode
  fires a key's timers once, after all its input): each key is then processed
  in one sorted pass instead of one pass per lateness horizon. Streaming
  graphs (and TestStream) must leave it False.
  """
  def __init__(self, labels=None, allowed_lateness_s: int = 0, terminal_delay_days: int = 7,
               bounded: bool = False):
    super().__init__()
    if allowed_lateness_s < 0:
      raise ValueError("allowed_lateness_s must be >= 0")
    if terminal_delay_days < 0:
      raise ValueError("terminal_delay_days must be >= 0")
    self._labels = labels
    self._lateness_ms = allowed_lateness_s * 1000
    self._delay_days = terminal_delay_days
    self._bounded = bounded
    self._shards = BATCH_SHARDS

  def expand(self, transactions):
    labels = self._labels
    if labels is None:
      # An empty, source-rooted label stream keeps the terminal stage's
      # inputs uniform (and, measured on the FnApiRunner, its timers firing).
      labels = transactions.pipeline | "NoLabels" >> beam.Create([]).with_output_types(Label)
    if self._bounded:
      return self._expand_bounded(transactions, labels)
    keyed_txs = (
        transactions
        | "Timestamp" >> beam.Map(lambda tx: beam.window.TimestampedValue(tx, tx.event_time_ms / 1000))
        | "ByCustomer" >> beam.Map(lambda tx: (tx.customer_id, tx)).with_output_types(Tuple[int, Transaction]))
    customer = keyed_txs | "Customer" >> beam.ParDo(_CustomerFeaturesFn(self._lateness_ms)).with_outputs(
        DEAD, FILTERED, main="featured")
    keyed_labels = (
        labels
        | "LabelTimestamp" >> beam.Map(lambda lb: beam.window.TimestampedValue(lb, lb.label_time_ms / 1000))
        | "LabelByTerminal" >> beam.Map(lambda lb: (lb.terminal_id, lb)).with_output_types(Tuple[int, Any]))
    txs_by_terminal = keyed_txs | "ByTerminal" >> beam.Map(
        lambda kv: (kv[1].terminal_id, (kv[1], None))).with_output_types(Tuple[int, Any])
    terminal = (
        (txs_by_terminal, keyed_labels)
        | "MergeLabels" >> beam.Flatten().with_output_types(Tuple[int, Any])
        | "Terminal" >> beam.ParDo(_TerminalStreamFn(self._lateness_ms, self._delay_days)).with_outputs(
            DEAD, main="featured"))
    customer_parts = customer.featured | "CustomerPart" >> beam.Map(
        lambda kv: (kv[1][0].transaction_id, ("c", kv[1][0], kv[1][1]))).with_output_types(Tuple[str, Any])
    featured = (
        (customer_parts, terminal.featured)
        | "Parts" >> beam.Flatten().with_output_types(Tuple[str, Any])
        | "Join" >> beam.ParDo(_JoinFn()))
    dead = (customer[DEAD], terminal[DEAD]) | "DeadLetters" >> beam.Flatten()
    return FeaturesResult(featured, customer[FILTERED], dead)

  def _expand_bounded(self, transactions, labels):
    shards = self._shards
    customer = (
        transactions
        # Plain tuples cross the shuffle: pickling a NamedTuple costs a Python
        # call per record each way, a tuple none.
        | "ByCustomerShard" >> beam.Map(lambda tx: (tx.customer_id % shards, tuple(tx)))
        | "CollectCustomers" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
        | "Customer" >> beam.ParDo(_CustomerBatchFn(shards)).with_outputs(DEAD, FILTERED, main="featured"))
    terminal = (
        (customer.featured, labels | "LabelByTerminalShard" >> beam.Map(lambda lb: (lb.terminal_id % shards, [lb])))
        | "MergeLabels" >> beam.Flatten()
        | "CollectTerminals" >> beam.GroupByKey()
        | "Terminal" >> beam.ParDo(_TerminalBatchFn(self._delay_days)).with_outputs(DEAD, main="featured"))
    dead = (customer[DEAD], terminal[DEAD]) | "DeadLetters" >> beam.Flatten()
    return FeaturesResult(terminal.featured, customer[FILTERED], dead)
