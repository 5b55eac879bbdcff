"""DecideLive: the live hot path, from Kafka record batches to decisions in one fused stage.

``txstream stream`` on this machine's DirectRunner runs
``ReadPartitionsLive | DecideLive | sinks`` with no shuffle anywhere, because
the Python runners hold every stage behind a shuffle until an unbounded
source ends (see README, "Live mode"). It calls the very functions the
graph's stages call (``core.decode``, ``core.enrich``, the
``core.features.FeatureEngine``, ``core.decide``), so a record gets the same
dead letter, the same features (fed in event-time order) and the same
decision on either path; only the shuffles are missing. The feature state
lives in this worker's memory, so the hot path is for one worker process
reading every partition; distributed runners run the full graph, whose state
is Beam's.

Records of the transactions topic are decided as they arrive; those of the
labels topic join the terminals' state. Records below ``decide_from`` (the
group's committed offsets) are history: they rebuild the feature state after
a restart and are not decided again.

Offsets: each bundle registers a bundle finalizer that commits, per
partition, the offset after the last record it handled. The runner calls it
only once the whole fused stage, every sink included, has finished the
bundle, so a committed offset never runs ahead of what the tiers hold. A
crash replays from the last commit: decisions are at least once, and the
tiers, keyed on the transaction id, absorb the repeats.

Metrics: besides Beam's counters, the stage records into a
``txstream.metrics.LiveMetrics`` shared per process (``apache_beam.utils.shared``),
which ``txstream stream --metrics_port`` serves to Prometheus while it runs:
records in, decisions, dead letters, produce -> decision latency, consumer
lag (asked of the broker every ``LAG_INTERVAL_S``, between bundles) and the
model deciding now.
"""
import functools
import logging
import os
import time
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from txstream.core import contracts, decide, decode, enrich
from txstream.core import features as engine
from txstream.core import rules as rules_lib
from txstream.core.batch import DeadLetterBatch, DecisionBatch, FeaturedBatch, RawBatch
from txstream.io.kafka_read import parse_source
from txstream.metrics import LiveMetrics
from txstream.models import artifacts
from txstream.transforms import counting
from txstream.transforms.enrich import load_reference
from txstream.transforms.features import count_repeats
from txstream.transforms.validate import decoder

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"
LAG_INTERVAL_S = 5.0  # how often the consumer lag gauge asks the broker for end offsets


class LiveResult(NamedTuple):
  decisions: beam.PCollection     # DecisionBatch
  dead_letters: beam.PCollection  # DeadLetterBatch


class LatencyHistogram:
  """Millisecond latencies counted in 1 ms buckets (the last bucket holds everything longer)."""
  def __init__(self, max_ms: int = 60_000):
    self.counts = np.zeros(max_ms + 1, dtype=np.int64)

  def add(self, latencies_ms: np.ndarray) -> None:
    self.counts += np.bincount(np.clip(latencies_ms.astype(np.int64), 0, len(self.counts) - 1),
                               minlength=len(self.counts))

  def percentiles(self, *ps: float) -> List[int]:
    total = int(self.counts.sum())
    cumulative = np.cumsum(self.counts)
    return [int(np.searchsorted(cumulative, max(1, np.ceil(p / 100 * total)))) for p in ps]

  def __len__(self) -> int:
    return int(self.counts.sum())


class _Progress:
  """Decisions per second and latencies, logged every ``interval_s``; the whole run's at the end.

  Two latencies: produce-to-decision (from the record's broker timestamp, so
  it includes the producer's linger and the broker) and in-process (from the
  moment the record's batch reached this stage to the decision).
  """
  def __init__(self, interval_s: float, in_process: LatencyHistogram):
    self._interval_s = interval_s
    self._latencies: List[np.ndarray] = []
    self._decided = 0
    self._replayed = 0
    self._since = time.monotonic()
    self.in_process = in_process

  def replayed(self, n: int):
    self._replayed += n

  def decided(self, latencies_ms: np.ndarray, in_process_ms: np.ndarray):
    self._decided += len(latencies_ms)
    self._latencies.append(latencies_ms)
    self.in_process.add(in_process_ms)

  def tick(self):
    """Logs the last interval once it is over (called per decision batch and per bundle, so idle shows too)."""
    now = time.monotonic()
    if now - self._since < self._interval_s:
      return
    if self._decided:
      p50, p99 = np.percentile(np.concatenate(self._latencies), [50, 99])
      run_p50, run_p99 = self.in_process.percentiles(50, 99)
      latency = (f"produce-to-decision p50 {p50:.0f} ms p99 {p99:.0f} ms; in-process (fetched -> decided) over "
                 f"the run p50 {run_p50} ms p99 {run_p99} ms")
    else:
      latency = "no traffic"
    _LOGGER.info("live: %d decisions in %.0f s (%.0f/s), %s; %d history records replayed", self._decided,
                 now - self._since, self._decided / (now - self._since), latency, self._replayed)
    self._latencies, self._decided, self._replayed, self._since = [], 0, 0, now

  def final(self) -> None:
    if len(self.in_process):
      p50, p99, top = self.in_process.percentiles(50, 99, 100)
      _LOGGER.info("live: in-process latency (record fetched -> decision produced) over the run: p50 %d ms "
                   "p99 %d ms max %d ms (%d decisions)", p50, p99, top, len(self.in_process))


class _Pending:
  """Featured rows waiting for the model, with their produce times."""
  def __init__(self):
    self.tables: List[pa.Table] = []
    self.produced: List[np.ndarray] = []
    self.fetched: List[np.ndarray] = []
    self.rows = 0

  def add(self, table: pa.Table, produced_ms: np.ndarray, fetched_ms: float) -> None:
    self.tables.append(table)
    self.produced.append(produced_ms)
    self.fetched.append(np.full(table.num_rows, fetched_ms))
    self.rows += table.num_rows

  def take(self) -> Tuple[pa.Table, np.ndarray, np.ndarray]:
    table = FeaturedBatch.concat([FeaturedBatch(t) for t in self.tables]).table
    produced, fetched = np.concatenate(self.produced), np.concatenate(self.fetched)
    self.tables, self.produced, self.fetched, self.rows = [], [], [], 0
    return table, produced, fetched


class _DecideLiveFn(beam.DoFn):
  def __init__(self, config, transactions_topic: str, labels_topic: Optional[str],
               decide_from: Mapping[Tuple[str, int], int], reference_dir: str, model_dir: Optional[str],
               rules_path: Optional[str], registry_url: Optional[str], delay_days: int,
               progress_interval_s: float, read_from: Optional[Mapping[Tuple[str, int], int]] = None,
               model_watch_pattern: Optional[str] = None, model_check_s: float = 10.0,
               metrics: Optional[shared.Shared] = None, metrics_port: Optional[int] = None, quality=None):
    self._config = config
    self._quality_settings = quality
    self._metrics_handle = metrics
    self._metrics_port = metrics_port
    self._read_from = dict(read_from or decide_from)
    self._model_watch_pattern = model_watch_pattern
    self._model_check_s = model_check_s
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
    self._progress_interval_s = progress_interval_s
    self._latency = Metrics.distribution(contracts.NAMESPACE, "produce_to_decision_ms")
    self._committed = Metrics.counter(contracts.NAMESPACE, "live.offset_commits")

  def setup(self):
    from confluent_kafka import Consumer
    from txstream.io import schema_registry
    self._transactions = decoder(self._registry_url)
    self._labels = decoder(self._registry_url, schema_registry.LABEL_SUBJECT)
    self._reference = load_reference(self._reference_dir)
    self._model = artifacts.load_model(self._model_dir)
    self._model_path = artifacts.load_metadata(self._model_dir, contracts.FEATURE_NAMES)["model_path"]
    self._model_checked = time.monotonic()
    self._refused_models = set()
    self._rules = rules_lib.load_rules(self._rules_path)
    self._features = engine.FeatureEngine(self._delay_days)
    # No config: nothing to commit to (tests that feed records without a broker).
    self._committer = Consumer(self._config.consumer_config()) if self._config is not None else None
    # Without a handle the metrics are this instance's own, recorded and never served.
    self._metrics = (self._metrics_handle.acquire(functools.partial(serve_metrics, self._metrics_port))
                     if self._metrics_handle is not None else serve_metrics(None))
    self._metrics.model(self._model.version, self._rules.version)
    self._quality = None
    if self._quality_settings is not None:
      from txstream.quality.live import LiveQuality
      self._quality = LiveQuality(self._quality_settings, self._rules.review_score, self._rules.decline_score,
                                  self._metrics)
      self._metrics.live_quality = self._quality
    self._progress = _Progress(self._progress_interval_s, self._metrics.in_process)
    self._positions = dict(self._read_from)  # (topic, partition) -> next offset to handle
    self._lag_checked = 0.0
    self._replaying = set(self._replay)
    self._replay_began = time.monotonic()
    if not self._replaying:
      _LOGGER.info("live: no feature history to replay; deciding")

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
      model = artifacts.load_model(os.path.dirname(newest.path))
    except artifacts.ModelError as e:
      self._refused_models.add(newest.path)
      _LOGGER.warning("live: not switching to %s: %s", newest.path, e)
      return
    previous, self._model, self._model_path = self._model.version, model, newest.path
    self._metrics.model(model.version, self._rules.version)
    _LOGGER.info("live: model %s loaded from %s (was %s)", model.version, newest.path, previous)

  def teardown(self):
    quality = getattr(self, "_quality", None)
    if quality is not None:
      quality.close()
    progress = getattr(self, "_progress", None)
    if progress is not None:
      progress.final()
    committer, self._committer = getattr(self, "_committer", None), None
    if committer is not None:
      committer.close()

  def start_bundle(self):
    self._pending = _Pending()
    self._offsets: Dict[Tuple[str, int], int] = {}
    self._finalizer_registered = False

  def process(self, batch: RawBatch, finalizer=beam.DoFn.BundleFinalizerParam):
    fetched_ms = time.time() * 1000  # fused with the reader: the batch was fetched just now
    if not self._finalizer_registered:
      finalizer.register(functools.partial(self._commit, self._offsets))
      self._finalizer_registered = True
    table = batch.table
    if not table.num_rows:
      return
    topic, partition, last = parse_source(table.column("source")[-1].as_py())
    first = last - table.num_rows + 1  # a batch holds consecutive offsets of one partition
    decide_from = self._decide_from.get((topic, partition), 0)
    history = np.arange(first, last + 1) < decide_from
    table = table.set_column(table.schema.get_field_index("history"), "history", pa.array(history))
    replayed = int(history.sum())
    self._positions[(topic, partition)] = last + 1
    if replayed:
      self._progress.replayed(replayed)
      self._metrics.history.inc(replayed)
      if last + 1 >= decide_from and (topic, partition) in self._replaying:
        self._replaying.discard((topic, partition))
        if not self._replaying:
          _LOGGER.info("live: feature history replayed in %.1f s; deciding", time.monotonic() - self._replay_began)
    if replayed < table.num_rows:
      self._offsets[(topic, partition)] = last + 1  # never a replayed one: it would move the group back
    is_label = topic == self._labels_topic
    counting.inc("labels_in" if is_label else "events_in", table.num_rows - replayed)
    (self._metrics.labels_in if is_label else self._metrics.events_in).inc(table.num_rows - replayed)
    dead = self._labels_batch(table) if is_label else self._transactions_batch(table, fetched_ms)
    if dead.num_rows:
      self._metrics.count_dead_letters(dead, labels=is_label)
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))
    # Decided at once: a fetch is already a batch (a few records at a trickle, thousands under load), and
    # waiting for more would add the reader's next poll to every decision's latency.
    yield from self._decide()

  def _transactions_batch(self, raw: pa.Table, fetched_ms: float) -> pa.Table:
    """Decodes, enriches and features a batch; queues its own rows for the model; returns its dead letters."""
    tx, decode_dead = decode.decode_transactions(raw, self._transactions)
    counting.inc("decode_valid", tx.num_rows)
    self._metrics.decode_valid.inc(tx.num_rows)
    tx, enrich_dead = enrich.enrich(tx, self._reference)
    counting.dead_letters(decode_dead)
    counting.dead_letters(enrich_dead)
    features = self._features.update(tx)
    duplicates, conflicts = engine.repeats(tx, features.outcome)
    count_repeats(duplicates, conflicts)
    self._metrics.filtered.labels(contracts.DUPLICATE).inc(duplicates.num_rows)
    dead = pa.concat_tables([decode_dead, enrich_dead, conflicts])
    featured = features.featured
    own = featured.filter(pa.compute.invert(featured.column("history")))
    if own.num_rows:
      self._pending.add(own, _produced_ms(raw, own.column("source")), fetched_ms)
    return dead

  def _labels_batch(self, raw: pa.Table) -> pa.Table:
    labels, dead = decode.decode_labels(raw, self._labels)
    counting.dead_letters(dead, "label_dead_letter")
    self._features.add_labels(labels)
    return dead

  def _decide(self):
    if not self._pending.rows:
      self._progress.tick()
      if self._quality is not None:
        self._quality.tick()
      return
    featured, produced, fetched = self._pending.take()
    decisions = decide.decide(featured, self._model.predict(decide.feature_matrix(featured)), self._model.version,
                              self._rules)
    counting.inc("scored", decisions.num_rows)
    counting.values(decisions, "decision", "decision")
    decided_at = decisions.column("decided_at_ms").to_numpy()
    latencies = np.maximum(0, decided_at - produced)
    for latency in latencies.tolist():
      self._latency.update(latency)
    self._metrics.count_decisions(decisions, latencies)
    if self._quality is not None:
      self._quality.add(decisions)
    self._progress.decided(latencies, np.maximum(0, decided_at - fetched))
    self._progress.tick()
    yield DecisionBatch(decisions)

  def finish_bundle(self):
    self._watch_model()
    self._update_lag()
    for batch in self._decide():
      times = batch.table.column("event_time_ms").to_numpy()
      yield WindowedValue(batch, Timestamp(micros=int(times.min()) * 1000), [GlobalWindow()])

  def _commit(self, offsets: Mapping[Tuple[str, int], int]) -> None:
    """Bundle finalizer: every sink of the stage has written this bundle; commit what it read."""
    from confluent_kafka import KafkaException, TopicPartition
    if not offsets or self._committer is None:
      return
    try:
      self._committer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())],
                             asynchronous=False)
      self._committed.inc()
      self._metrics.offset_commits.inc()
    except KafkaException as e:
      # The next bundle commits further offsets; until then a restart only re-decides a little more.
      _LOGGER.warning("committing offsets %s failed: %s", dict(offsets), e)

  def _update_lag(self) -> None:
    """Consumer lag per partition (end offset - next offset handled), every ``LAG_INTERVAL_S`` at most."""
    # Unshared metrics are never read: no broker round trips for them.
    if (self._metrics_handle is None or self._committer is None
        or time.monotonic() - self._lag_checked < LAG_INTERVAL_S):
      return
    from confluent_kafka import KafkaException, TopicPartition
    self._lag_checked = time.monotonic()
    for (topic, partition), position in sorted(self._positions.items()):
      try:
        _, end = self._committer.get_watermark_offsets(TopicPartition(topic, partition), timeout=1.0)
      except KafkaException as e:
        # A gap in the gauge, not a failed bundle: the next check asks again.
        _LOGGER.debug("end offset of %s/%d: %s", topic, partition, e)
        continue
      self._metrics.set_lag(topic, partition, end - position)


def serve_metrics(port: Optional[int]) -> LiveMetrics:
  """This process's live metrics, with the in-process latency histogram; served on ``port`` unless None."""
  live = LiveMetrics(in_process=LatencyHistogram()).install()  # the fused stage's sinks report to it
  return live.serve(port) if port is not None else live


def _produced_ms(raw: pa.Table, sources) -> np.ndarray:
  """The broker timestamp of each featured row's record (now when the record had none)."""
  times = raw.column("timestamp_ms")
  index = {s: i for i, s in enumerate(raw.column("source").to_pylist())}
  now = int(time.time() * 1000)
  produced = times.to_numpy(zero_copy_only=False) if times.null_count == 0 else np.array(
      [now if t is None else t for t in times.to_pylist()], dtype=np.int64)
  return produced[[index[s] for s in sources.to_pylist()]]


class DecideLive(beam.PTransform[beam.PCollection[RawBatch], LiveResult]):
  """RawBatches of the transactions (and labels) topics -> (DecisionBatches, DeadLetterBatches), no shuffle.

  ``config``: the KafkaConfig whose group gets the offsets (None: no commits).
  ``model_watch_pattern``: a glob of ``model.json`` files; every
  ``model_check_s`` the newest match replaces the model, once verified.
  ``decide_from``: ``{(topic, partition): offset}``; records below it only
  rebuild feature state. ``read_from``: where the read starts, so the replay's
  end can be logged ("feature history replayed"). Fails at construction on a
  missing or corrupt model, rules or reference file, like the graph's own stages.
  ``metrics_port``: serve Prometheus metrics (``txstream.metrics.LiveMetrics``)
  on this port from the worker process; ``with_metrics``: record them without
  serving (tests). ``quality``: a ``quality.live.LiveQualitySettings``; each
  fixed window's decisions are validated off the hot path (None: not at all).
  """
  def __init__(self, config, transactions_topic: str, labels_topic: Optional[str],
               decide_from: Mapping[Tuple[str, int], int], reference_dir: str, model_dir: Optional[str] = None,
               rules_path: Optional[str] = None, registry_url: Optional[str] = None, delay_days: int = 7,
               progress_interval_s: float = 10.0, read_from: Optional[Mapping[Tuple[str, int], int]] = None,
               model_watch_pattern: Optional[str] = None, model_check_s: float = 10.0,
               metrics_port: Optional[int] = None, with_metrics: bool = False, quality=None):
    super().__init__()
    if metrics_port is not None and not 0 < metrics_port < 65536:
      raise ValueError(f"metrics_port {metrics_port}: not a TCP port")
    self._metrics_port = metrics_port
    # One LiveMetrics per process, shared by the DoFn and by ``live_metrics()`` in the same process.
    self._metrics = shared.Shared() if with_metrics or metrics_port is not None else None
    self._meta = artifacts.load_metadata(model_dir, contracts.FEATURE_NAMES)
    rules_lib.load_rules(rules_path)
    load_reference(reference_dir)
    self._fn = _DecideLiveFn(config, transactions_topic, labels_topic, decide_from, reference_dir, model_dir,
                             rules_path, registry_url, delay_days, progress_interval_s, read_from,
                             model_watch_pattern, model_check_s, self._metrics, metrics_port, quality)

  @property
  def model_version(self) -> str:
    return self._meta["version"]

  def live_metrics(self) -> Optional[LiveMetrics]:
    """This process's ``LiveMetrics`` (started, and serving on ``metrics_port``, on first call); None without.

    The DoFn records into the same object when the runner runs it in this
    process, as the FnApiRunner does; hold the reference for the run (the
    object lives while someone does).
    """
    if self._metrics is None:
      return None
    return self._metrics.acquire(functools.partial(serve_metrics, self._metrics_port))

  def expand(self, batches):
    out = batches | "Decide" >> beam.ParDo(self._fn).with_output_types(
        DecisionBatch, **{DEAD: DeadLetterBatch}).with_outputs(DEAD, main="decisions")
    return LiveResult(out.decisions, out[DEAD])
