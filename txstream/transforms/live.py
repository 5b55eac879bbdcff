"""DecideLive: the live hot path, from Kafka records to decisions in one fused stage.

``txstream stream`` on this machine's DirectRunner runs
``ReadPartitionsLive | DecideLive | sinks`` with no shuffle anywhere, because
the Python runners hold every stage behind a shuffle until an unbounded
source ends (see README, "Live mode"). Everything the graph's stages do
between the read and the tiers happens here, per record, with the same code:
``validate.to_transaction`` / ``to_label``, ``enrich.enrich``, the
``feature_state`` histories, ``features.assemble``, the RunInference model
handler and the rules. The feature state lives in this worker's memory, so
the hot path is for one worker process reading every partition (the
DirectRunner with one worker); distributed runners run the full graph, whose
state is Beam's.

Records of the transactions topic are decided as they arrive; those of the
labels topic update the terminals' known frauds. Records below
``decide_from`` (the group's committed offsets) are history: they rebuild the
feature state after a restart and are not decided again.

Offsets: each bundle registers a bundle finalizer that commits, per
partition, the offset after the last record it handled. The runner calls it
only once the whole fused stage, every sink included, has finished the
bundle, so a committed offset never runs ahead of what the tiers hold. A
crash replays from the last commit: decisions are at least once, and the
tiers, keyed on the transaction id, absorb the repeats.
"""
import functools
import logging
import os
import time
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import txstream
from txstream.io import schema_registry, wire
from txstream.io.kafka_read import parse_source
from txstream.models import artifacts
from txstream.models.handler import fraud_model_handler
from txstream.records import DeadLetter, Decision, RawRecord, dead_letter
from txstream.transforms import enrich as enrich_lib
from txstream.transforms import rules as rules_lib
from txstream.transforms import validate
from txstream.transforms.feature_state import CustomerHistory, TerminalHistory
from txstream.transforms.features import FEATURE_NAMES, assemble, fingerprint

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD = "dead_letters"
DUPLICATE = "duplicate"  # an exact repeat of a transaction already seen: filtered, counted


class LiveResult(NamedTuple):
  decisions: beam.PCollection
  dead_letters: beam.PCollection


class _Progress:
  """Decisions per second and produce-to-decision latency, logged every ``interval_s``."""
  def __init__(self, interval_s: float):
    self._interval_s = interval_s
    self._latencies = []
    self._decided = 0
    self._replayed = 0
    self._since = time.monotonic()

  def replayed(self):
    self._replayed += 1

  def decided(self, latency_ms: int):
    self._decided += 1
    self._latencies.append(latency_ms)

  def tick(self):
    """Logs the last interval once it is over (called per decision batch and per bundle, so idle shows too)."""
    now = time.monotonic()
    if now - self._since < self._interval_s:
      return
    if self._latencies:
      p50, p99 = np.percentile(self._latencies, [50, 99])
      latency = f"produce-to-decision p50 {p50:.0f} ms p99 {p99:.0f} ms"
    else:
      latency = "no traffic"
    _LOGGER.info("live: %d decisions in %.0f s (%.0f/s), %s; %d history records replayed", self._decided,
                 now - self._since, self._decided / (now - self._since), latency, self._replayed)
    self._latencies, self._decided, self._replayed, self._since = [], 0, 0, now


class _DecideLiveFn(beam.DoFn):
  def __init__(self, config, transactions_topic: str, labels_topic: Optional[str],
               decide_from: Mapping[Tuple[str, int], int], reference_dir: str, model_dir: Optional[str],
               rules_path: Optional[str], registry_url: Optional[str], delay_days: int, batch_size: int,
               progress_interval_s: float, read_from: Optional[Mapping[Tuple[str, int], int]] = None,
               max_delay_ms: int = 20, model_watch_pattern: Optional[str] = None, model_check_s: float = 10.0):
    self._config = config
    self._model_watch_pattern = model_watch_pattern
    self._model_check_s = model_check_s
    self._max_delay_s = max_delay_ms / 1000.0
    # Partitions with history to replay before their first decision.
    self._replay = {tp for tp, start in (read_from or {}).items() if start < decide_from.get(tp, 0)}
    self._transactions_topic = transactions_topic
    self._labels_topic = labels_topic
    self._decide_from = dict(decide_from)
    self._reference_dir = reference_dir
    self._model_dir = model_dir
    self._rules_path = rules_path
    self._registry_url = registry_url
    self._delay_days = delay_days
    self._batch_size = batch_size
    self._progress_interval_s = progress_interval_s
    self._events_in = Metrics.counter(NAMESPACE, "events_in")
    self._labels_in = Metrics.counter(NAMESPACE, "labels_in")
    self._replayed = Metrics.counter(NAMESPACE, "live.replayed")
    self._scored = Metrics.counter(NAMESPACE, "scored")
    self._by_decision = {a: Metrics.counter(NAMESPACE, f"decision.{a}") for a in rules_lib.ACTIONS}
    self._latency = Metrics.distribution(NAMESPACE, "produce_to_decision_ms")
    self._committed = Metrics.counter(NAMESPACE, "live.offset_commits")

  def setup(self):
    from confluent_kafka import Consumer
    self._transactions = validate.decoder(self._registry_url)
    self._labels = validate.decoder(self._registry_url, schema_registry.LABEL_SUBJECT)
    self._customers_ref, self._terminals_ref = enrich_lib.load_reference(self._reference_dir)
    self._reference_version = enrich_lib.reference_version(self._reference_dir)
    self._load_model(artifacts.load_metadata(self._model_dir, FEATURE_NAMES))
    self._model_checked = time.monotonic()
    self._refused_models = set()
    self._rules = rules_lib.load_rules(self._rules_path, FEATURE_NAMES)
    self._customers: Dict[int, CustomerHistory] = {}
    self._terminals: Dict[int, TerminalHistory] = {}
    # No config: nothing to commit to (tests that feed records without a broker).
    self._committer = Consumer(self._config.consumer_config()) if self._config is not None else None
    self._progress = _Progress(self._progress_interval_s)
    self._counters = {}
    self._replaying = set(self._replay)
    self._replay_began = time.monotonic()
    if not self._replaying:
      _LOGGER.info("live: no feature history to replay; deciding")

  def _load_model(self, meta: dict) -> None:
    self._model_version = meta["version"]
    self._model_path = meta["model_path"]
    self._handler = fraud_model_handler(meta["model_path"], self._batch_size, FEATURE_NAMES)
    self._model = self._handler.load_model()

  def _watch_model(self) -> None:
    """Switches to the newest ``model.json`` matching the watch pattern, once it checks out.

    The artifact is verified first (content hash, feature order); one that
    fails is logged once and skipped, and scoring goes on with the current
    model. Checked between bundles, every ``model_check_s``.
    """
    if not self._model_watch_pattern or time.monotonic() - self._model_checked < self._model_check_s:
      return
    self._model_checked = time.monotonic()
    from apache_beam.io.filesystems import FileSystems
    matches = FileSystems.match([self._model_watch_pattern])[0].metadata_list
    if not matches:
      return
    newest = max(matches, key=lambda m: (m.last_updated_in_seconds, m.path))
    if newest.path == self._model_path or newest.path in self._refused_models:
      return
    try:
      meta = artifacts.load_metadata(os.path.dirname(newest.path), FEATURE_NAMES)
    except artifacts.ModelError as e:
      self._refused_models.add(newest.path)
      _LOGGER.warning("live: not switching to %s: %s", newest.path, e)
      return
    previous = self._model_version
    self._load_model(meta)
    _LOGGER.info("live: model %s loaded from %s (was %s)", self._model_version, newest.path, previous)

  def teardown(self):
    committer, self._committer = getattr(self, "_committer", None), None
    if committer is not None:
      committer.close()

  def start_bundle(self):
    self._pending = []
    self._offsets: Dict[Tuple[str, int], int] = {}
    self._finalizer_registered = False

  def _count(self, name: str) -> None:
    counter = self._counters.get(name)
    if counter is None:
      counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
    counter.inc()

  def process(self, raw: RawRecord, produced=beam.DoFn.TimestampParam,
              finalizer=beam.DoFn.BundleFinalizerParam):
    topic, partition, offset = parse_source(raw.source)
    if not self._finalizer_registered:
      finalizer.register(functools.partial(self._commit, self._offsets))
      self._finalizer_registered = True
    decide_from = self._decide_from.get((topic, partition), 0)
    is_label = topic == self._labels_topic
    outcomes = self._label(raw) if is_label else self._transaction(raw)
    if offset < decide_from:
      # History: it only updates the feature state; the run that read it first
      # decided it, counted it and wrote its dead letter.
      for _ in outcomes:
        pass
      self._replayed.inc()
      self._progress.replayed()
      if offset + 1 == decide_from and (topic, partition) in self._replaying:
        self._replaying.discard((topic, partition))
        if not self._replaying:
          _LOGGER.info("live: feature history replayed in %.1f s; deciding", time.monotonic() - self._replay_began)
      return
    self._offsets[(topic, partition)] = offset + 1  # never a replayed one: it would move the group back
    (self._labels_in if is_label else self._events_in).inc()
    for outcome in outcomes:
      if isinstance(outcome, DeadLetter):
        self._count(f"{'label_' if is_label else ''}dead_letter.{outcome.stage}.{outcome.reason}")
        yield beam.pvalue.TaggedOutput(DEAD, outcome)
      elif outcome is DUPLICATE:
        self._count("filtered.duplicate")
      else:
        yield from self._enqueue(outcome, produced.micros // 1000)

  def _transaction(self, raw: RawRecord):
    """Decodes, enriches and adds one transaction to the feature state: yields its Featured, its
    DeadLetter or ``DUPLICATE``."""
    try:
      tx = validate.to_transaction(self._transactions, raw)
    except (wire.WireFormatError, validate.InvalidRecord) as e:
      yield dead_letter(raw.source, raw.value, "decode", e.reason, e)
      return
    tx = enrich_lib.enrich(tx, self._customers_ref, self._terminals_ref, self._reference_version)
    if tx is None:
      yield dead_letter(raw.source, raw.value, "enrich", "unknown_customer", message="customer is not on file")
      return
    customer = self._customers.get(tx.customer_id)
    if customer is None:
      customer = self._customers[tx.customer_id] = CustomerHistory()
    repeat = customer.is_duplicate(tx.transaction_id, tx.event_time_ms, fingerprint(tx))
    if repeat == "duplicate":
      yield DUPLICATE
      return
    if repeat is not None:
      yield dead_letter(raw.source, raw.value, "features", repeat,
                        message=f"transaction_id {tx.transaction_id} reused with other content")
      return
    terminal = self._terminal(tx.terminal_id)
    yield assemble(tx, customer.add(tx.event_time_ms, tx.amount_minor), terminal.add(tx.event_time_ms))

  def _label(self, raw: RawRecord):
    """Decodes one label and adds a fraud to its terminal's state; yields its DeadLetter if it is bad."""
    try:
      label = validate.to_label(self._labels, raw)
    except (wire.WireFormatError, validate.InvalidRecord) as e:
      yield dead_letter(raw.source, raw.value, "decode_label", e.reason, e)
      return
    if label.is_fraud:
      self._terminal(label.terminal_id).add_label(label.transaction_id, label.tx_time_ms)

  def _enqueue(self, featured, produced_ms: int):
    now = time.monotonic()
    if not self._pending:
      self._oldest = now
    self._pending.append((featured, produced_ms))
    # Score in batches, but never hold a transaction longer than max_delay: a
    # bundle can last the reader's whole checkpoint interval.
    if len(self._pending) >= self._batch_size or now - self._oldest >= self._max_delay_s:
      yield from self._decide()

  def _terminal(self, terminal_id: int) -> TerminalHistory:
    terminal = self._terminals.get(terminal_id)
    if terminal is None:
      terminal = self._terminals[terminal_id] = TerminalHistory(self._delay_days)
    return terminal

  def _decide(self):
    batch, self._pending = self._pending, []
    if not batch:
      return []
    examples = [(i, np.asarray(f.features, dtype=np.float32).reshape(1, -1)) for i, (f, _) in enumerate(batch)]
    predictions = self._handler.run_inference(examples, self._model)
    now_ms = int(time.time() * 1000)
    out = []
    for (featured, produced_ms), (_, prediction) in zip(batch, predictions):
      score = round(prediction.inference, 6)
      action, codes = self._rules.decide(featured.features, score)
      self._scored.inc()
      self._by_decision[action].inc()
      latency = max(0, now_ms - produced_ms)
      self._latency.update(latency)
      self._progress.decided(latency)
      out.append(Decision(featured.transaction, featured.features, score,
                          prediction.model_id or self._model_version, codes, action, txstream.__version__, now_ms))
    self._progress.tick()
    return out

  def finish_bundle(self):
    self._progress.tick()
    self._watch_model()
    for decision in self._decide():
      yield WindowedValue(decision, Timestamp(micros=decision.transaction.event_time_ms * 1000), [GlobalWindow()])

  def _commit(self, offsets: Mapping[Tuple[str, int], int]) -> None:
    """Bundle finalizer: every sink of the stage has written this bundle; commit what it read."""
    from confluent_kafka import KafkaException, TopicPartition
    if not offsets or self._committer is None:
      return
    try:
      self._committer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())],
                             asynchronous=False)
      self._committed.inc()
    except KafkaException as e:
      # The next bundle commits further offsets; until then a restart only re-decides a little more.
      _LOGGER.warning("committing offsets %s failed: %s", dict(offsets), e)


class DecideLive(beam.PTransform):
  """RawRecords of the transactions (and labels) topics -> (Decisions, DeadLetters), no shuffle.

  ``config``: the KafkaConfig whose group gets the offsets (None: no commits).
  ``model_watch_pattern``: a glob of ``model.json`` files; every
  ``model_check_s`` the newest match replaces the model, once verified.
  ``decide_from``: ``{(topic, partition): offset}``; records below it only
  rebuild feature state. ``read_from``: where the read starts, so the replay's
  end can be logged ("feature history replayed"). Fails at construction on a missing or corrupt model,
  rules or reference file, like the graph's own stages.
  """
  def __init__(self, config, transactions_topic: str, labels_topic: Optional[str],
               decide_from: Mapping[Tuple[str, int], int], reference_dir: str, model_dir: Optional[str] = None,
               rules_path: Optional[str] = None, registry_url: Optional[str] = None, delay_days: int = 7,
               batch_size: int = 256, progress_interval_s: float = 10.0,
               read_from: Optional[Mapping[Tuple[str, int], int]] = None, max_delay_ms: int = 20,
               model_watch_pattern: Optional[str] = None, model_check_s: float = 10.0):
    super().__init__()
    self._meta = artifacts.load_metadata(model_dir, FEATURE_NAMES)
    rules_lib.load_rules(rules_path, FEATURE_NAMES)
    enrich_lib.reference_version(reference_dir)
    self._fn = _DecideLiveFn(config, transactions_topic, labels_topic, decide_from, reference_dir, model_dir,
                             rules_path, registry_url, delay_days, batch_size, progress_interval_s, read_from,
                             max_delay_ms, model_watch_pattern, model_check_s)

  @property
  def model_version(self) -> str:
    return self._meta["version"]

  def expand(self, records):
    out = records | "Decide" >> beam.ParDo(self._fn).with_outputs(DEAD, main="decisions")
    return LiveResult(out.decisions, out[DEAD])
