"""Prometheus metrics for txstream: a bounded run's textfile and a live run's scrape endpoint.

Both use the same names, each in a registry of its own (never the global one):

  ``txstream_events_in_total``, ``txstream_labels_in_total``, ``txstream_decode_valid_total``,
  ``txstream_scored_total``                          counters
  ``txstream_dead_letters_total{stage,reason}``      counter (``label_dead_letters`` for labels)
  ``txstream_filtered_total{reason}``                counter
  ``txstream_decisions_total{decision}``             counter
  ``txstream_tier_rows_total{tier}``                 counter
  ``txstream_sink_retries_total{sink}``, ``txstream_sink_failures_total{sink}``,
  ``txstream_sink_rejected_total{sink}``, ``txstream_sink_upserts_total{sink}``,
  ``txstream_sink_moved_total{sink}``                counters
  ``txstream_sink_write_seconds{sink}``              histogram, ``txstream_sink_write_max_seconds`` (bounded)
  ``txstream_sink_circuit_opened_total{sink}``       counter, ``txstream_sink_circuit_open{sink}`` gauge (live, 1/0)
  ``txstream_sink_batch_rows{sink}``                 summary (count, sum)
  ``txstream_inference_batches_total``, ``txstream_inference_batch_seconds``,
  ``txstream_model_load_seconds``                    RunInference's (counter, summaries), bounded runs
  ``txstream_run_duration_seconds``                  gauge, a bounded run's wall time
  ``txstream_model_info{model_version,rules_version}`` gauge, 1
  ``txstream_decision_latency_seconds``              histogram, live only: produce -> decision
  ``txstream_consumer_lag_records{topic,partition}`` gauge, live only: end offset - next offset handled
  ``txstream_dq_success{suite,scope}``               gauge, 1 if the data-quality suite passed, else 0
  ``txstream_dq_failed_expectations{suite}``,
  ``txstream_dq_evaluated_expectations{suite}``      gauges, of the last validation (``txstream.quality``)
  ``txstream_dq_validations_total{suite,result}``    counter, live only: windows validated, passed or failed

A bounded run (``from_run``) turns Beam's counters and distributions into
these, once, after the run; ``write_textfile`` writes them for node
exporter's textfile collector. A live run (``LiveMetrics``) updates them from
the hot path as it goes and serves them over HTTP (``--metrics_port``).
Beam distributions keep count, sum, min and max only; for percentiles a
timed step also bumps one counter per observation, named by the histogram
bucket it falls in (``bucket_counter``: ``sink.hot.write_ms.le_50``), which
every runner sums like any counter. ``run_latency`` turns those into the
summary's p50/p95/p99 (each the upper bound of the bucket it falls in) and
max; ``latency_summary`` reads percentiles from the live path's
``live.LatencyHistogram``.
"""
import logging
import re
import threading
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily

from txstream.core import contracts

_LOGGER = logging.getLogger(__name__)
PREFIX = "txstream_"
# Produce -> decision; the alert's 200 ms threshold is a bucket bound, so histogram_quantile is exact there.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0)
# Bounded runs' timing histograms (bucket counters), in ms: upper bounds, then +Inf.
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)
_BUCKET = ".le_"

# Beam counter name (first dotted part) -> (metric, label names) for names of the form
# ``<prefix>.<label values...>``; the last label takes what is left after the first ones.
_LABELLED = {
    "dead_letter": ("dead_letters", ("stage", "reason")),
    "label_dead_letter": ("label_dead_letters", ("stage", "reason")),
    "filtered": ("filtered", ("reason",)),
    "decision": ("decisions", ("decision",)),
    "tier": ("tier_rows", ("tier",)),
}
_SINK_COUNTERS = {"retried": "sink_retries", "failed": "sink_failures", "rejected": "sink_rejected",
                  "upserts": "sink_upserts", "moved": "sink_moved", "circuit_opened": "sink_circuit_opened"}
_KAFKA_COUNTERS = {"read": "kafka_records_read", "written": "kafka_records_written",
                   "failed": "kafka_records_failed"}
_PLAIN = {"live.offset_commits": "offset_commits", "enrich_unknown_terminal": "enrich_unknown_terminals",
          "num_inferences": "inference_batches"}  # RunInference's, in our namespace: batches sent to the model
_HELP = {
    "events_in": "Transaction records read (history replays excluded)",
    "labels_in": "Label records read",
    "decode_valid": "Transactions decoded and valid",
    "scored": "Transactions decided",
    "dead_letters": "Transaction dead letters by stage and reason",
    "label_dead_letters": "Label dead letters by stage and reason",
    "filtered": "Transactions left out on purpose (exact duplicates, outside the window)",
    "decisions": "Decisions by action",
    "tier_rows": "Rows written per storage tier",
    "sink_retries": "Sink write attempts retried",
    "sink_failures": "Sink batches given up on (the bundle failed)",
    "sink_rejected": "Records a store rejected (dead letters)",
    "sink_upserts": "Sink upsert statements",
    "sink_moved": "Rows moved to another event day",
    "sink_circuit_opened": "Times a sink's circuit breaker opened (writes wait out its cool-down)",
    "kafka_records_read": "Kafka records read per topic",
    "kafka_records_written": "Kafka records written per topic",
    "kafka_records_failed": "Kafka records that failed to be written per topic",
    "offset_commits": "Offset commits",
    "enrich_unknown_terminals": "Transactions at a terminal missing from the reference data",
    "inference_batches": "Batches sent to the model",
}

# Every metric this module defines, for the dashboard and alert checks. A bounded run also exports a Beam
# counter of a simple name it does not know (``txstream.foo`` -> ``txstream_foo_total``), as it is.
METRIC_NAMES = frozenset(
    [PREFIX + n for n in ("events_in_total", "labels_in_total", "decode_valid_total", "scored_total",
                          "history_replayed_total", "offset_commits_total", "enrich_unknown_terminals_total",
                          "run_duration_seconds", "model_info", "sink_write_seconds", "sink_write_max_seconds",
                          "sink_batch_rows", "decision_latency_seconds", "consumer_lag_records",
                          "inference_batches_total", "inference_batch_seconds", "model_load_seconds",
                          "sink_circuit_open", "dq_success", "dq_failed_expectations", "dq_evaluated_expectations",
                          "dq_validations_total")]
    + [PREFIX + m + "_total" for m, _ in _LABELLED.values()]
    + [PREFIX + m + "_total" for m in list(_SINK_COUNTERS.values()) + list(_KAFKA_COUNTERS.values())])


class MetricsOptions(PipelineOptions):
  """Where a run's Prometheus metrics go."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--metrics_port", type=int, default=None,
                        help="`txstream stream`: serve Prometheus metrics on this port (/metrics) while it runs.")
    parser.add_argument("--metrics_file", default=None,
                        help="`txstream run`: write the run's metrics to this file, in node exporter's textfile "
                             "format (a *.prom file in the collector's directory).")


# ------------------------------------------------------------------------------------------------ bounded runs

def collect(result) -> Tuple[Dict[str, int], Dict[str, dict]]:
  """(counters, distributions) of namespace ``txstream`` from a finished PipelineResult.

  Committed values where the runner has them, else attempted (as
  ``pipelines.run.counters``). A distribution is ``{count, sum, min, max}``.
  """
  query = result.metrics().query(MetricsFilter().with_namespace(contracts.NAMESPACE))
  counters: Dict[str, int] = {}
  for c in query["counters"]:
    name = c.key.metric.name
    counters[name] = counters.get(name, 0) + (c.committed if c.committed is not None else c.attempted)
  distributions: Dict[str, dict] = {}
  for d in query["distributions"]:
    value = d.committed if d.committed is not None else d.attempted
    if value is None or not value.count:
      continue
    distributions[d.key.metric.name] = _merge(distributions.get(d.key.metric.name),
                                              {"count": value.count, "sum": value.sum, "min": value.min,
                                               "max": value.max})
  return counters, distributions


def _merge(a: Optional[dict], b: dict) -> dict:
  """Two parts of one distribution (the same metric reported by two steps)."""
  if a is None:
    return b
  return {"count": a["count"] + b["count"], "sum": a["sum"] + b["sum"], "min": min(a["min"], b["min"]),
          "max": max(a["max"], b["max"])}


def bucket_counter(prefix: str, value_ms: float) -> str:
  """The counter to bump for one observation of ``prefix`` (ms): ``<prefix>.le_<bound>`` or ``.le_inf``."""
  for bound in BUCKETS_MS:
    if value_ms <= bound:
      return f"{prefix}{_BUCKET}{bound}"
  return f"{prefix}{_BUCKET}inf"


def histograms(counters: Mapping[str, int]) -> Dict[str, Dict[float, int]]:
  """``{prefix: {upper bound ms (inf last): count}}`` from the bucket counters among ``counters``."""
  out: Dict[str, Dict[float, int]] = {}
  for name, n in counters.items():
    prefix, found, bound = name.rpartition(_BUCKET)
    if found and n:
      out.setdefault(prefix, {})[float(bound)] = out.get(prefix, {}).get(float(bound), 0) + n
  return out


def percentiles(buckets: Mapping[float, int], max_ms: Optional[float] = None) -> dict:
  """count, p50/p95/p99 (the upper bound of the bucket each falls in, at most ``max_ms``) and max, in ms."""
  count = sum(buckets.values())
  out = {"count": count}
  if not count:
    return out
  bounds = sorted(buckets)
  cumulative = np.cumsum([buckets[b] for b in bounds])
  for p in (50, 95, 99):
    bound = bounds[int(np.searchsorted(cumulative, count * p / 100, side="left"))]
    value = max_ms if bound == float("inf") or (max_ms is not None and max_ms < bound) else bound
    out[f"p{p}_ms"] = value
  out["max_ms"] = max_ms
  return out


def run_latency(counters: Mapping[str, int], distributions: Mapping[str, dict]) -> dict:
  """The summary's ``latency``: per sink (``sink_write_ms``) and for the model (``inference_batch_ms``)."""
  out: Dict[str, dict] = {}
  for prefix, buckets in sorted(histograms(counters).items()):
    top = distributions.get(prefix, {}).get("max")
    if prefix.startswith("sink.") and prefix.endswith(".write_ms"):
      out.setdefault("sink_write_ms", {})[prefix[len("sink."):-len(".write_ms")]] = percentiles(buckets, top)
    elif prefix == "inference.batch_ms":
      out["inference_batch_ms"] = percentiles(buckets, top)
  return out


def _cumulative_buckets(buckets: Mapping[float, int], count: int) -> list:
  """Prometheus buckets (cumulative, in seconds, ``+Inf`` = ``count``) from bucket counts in ms."""
  out, total = [], 0
  for bound in sorted(b for b in buckets if b != float("inf")):
    total += buckets[bound]
    out.append((repr(bound / 1000), total))
  return out + [("+Inf", count)]


class _RunCollector:
  """The families of one finished run; a custom collector, so counters carry no ``_created`` sample."""

  def __init__(self, counters: Mapping[str, int], distributions: Mapping[str, dict], summary: dict):
    self._counters = dict(counters)
    self._distributions = dict(distributions)
    self._summary = dict(summary)

  def collect(self) -> Iterable:
    families: Dict[str, CounterMetricFamily] = {}

    def counter(metric: str, labels: Tuple[str, ...], values: Tuple[str, ...], n: int, doc: str):
      family = families.get(metric)
      if family is None:
        family = families[metric] = CounterMetricFamily(PREFIX + metric, doc, labels=list(labels))
      family.add_metric(list(values), n)

    for name, n in sorted(self._counters.items()):
      parsed = _counter_metric(name)
      if parsed is None:
        _LOGGER.debug("metrics: counter %s has no Prometheus name; not exported", name)
        continue
      counter(*parsed, n, _HELP.get(parsed[0][:-len("_total")], f"Beam counter txstream/{name}"))
    yield from families.values()
    yield from self._distribution_families()
    wall = self._summary.get("wall_seconds")
    if wall is not None:
      yield GaugeMetricFamily(PREFIX + "run_duration_seconds", "Wall time of the bounded run", value=wall)
    if self._summary.get("model_version") is not None:
      info = GaugeMetricFamily(PREFIX + "model_info", "Model and rules versions the run decided with",
                               labels=["model_version", "rules_version"])
      info.add_metric([str(self._summary["model_version"]), str(self._summary.get("rules_version") or "")], 1)
      yield info
    yield from dq_families(self._summary.get("data_quality"))

  def _distribution_families(self) -> Iterable:
    write = HistogramMetricFamily(PREFIX + "sink_write_seconds", "Sink batch write time, retries included",
                                  labels=["sink"])
    buckets = histograms(self._counters)
    write_max = GaugeMetricFamily(PREFIX + "sink_write_max_seconds", "Longest sink batch write of the run",
                                  labels=["sink"])
    rows = SummaryMetricFamily(PREFIX + "sink_batch_rows", "Rows per sink batch write", labels=["sink"])
    # RunInference's own distributions, in our namespace.
    timed = {"inference_batch_latency_micro_secs": ("inference_batch_seconds", "Model call time per batch", 1e6),
             "load_model_latency_milli_secs": ("model_load_seconds", "Model load time", 1e3)}
    for name, d in sorted(self._distributions.items()):
      if name.startswith("sink.") and name.endswith(".write_ms"):
        sink = name[len("sink."):-len(".write_ms")]
        write.add_metric([sink], _cumulative_buckets(buckets.get(name[:-len(".write_ms")] + ".write_ms", {}),
                                                     d["count"]), d["sum"] / 1000)
        write_max.add_metric([sink], d["max"] / 1000)
      elif name.startswith("sink.") and name.endswith(".batch_size"):
        rows.add_metric([name[len("sink."):-len(".batch_size")]], d["count"], d["sum"])
      elif name in timed:
        metric, doc, per_second = timed[name]
        yield SummaryMetricFamily(PREFIX + metric, doc, count_value=d["count"], sum_value=d["sum"] / per_second)
    for family in (write, write_max, rows):
      if family.samples:
        yield family


def _counter_metric(name: str) -> Optional[Tuple[str, Tuple[str, ...], Tuple[str, ...]]]:
  """(metric without prefix and ``_total``, label names, label values) for a Beam counter name; None if unknown.

  Stages and topics may hold dots (``sink.hot``): the last dotted part is the
  reason (or the action), the rest the stage (or the topic).
  """
  head, _, rest = name.partition(".")
  if head in _LABELLED and rest:
    metric, labels = _LABELLED[head]
    if len(labels) == 2:
      first, _, last = rest.rpartition(".")
      return (metric + "_total", labels, (first, last)) if first else None
    return metric + "_total", labels, (rest,)
  if head in ("sink", "kafka") and rest:
    target, _, what = rest.rpartition(".")
    table = _SINK_COUNTERS if head == "sink" else _KAFKA_COUNTERS
    if target and what in table:
      return table[what] + "_total", ("sink" if head == "sink" else "topic",), (target,)
    return None
  if name in _PLAIN:
    return _PLAIN[name] + "_total", (), ()
  if re.fullmatch(r"[a-z][a-z0-9_]*", name):
    return name + "_total", (), ()
  return None


def dq_families(data_quality: Optional[dict]) -> Iterable:
  """The data-quality gauges of a ``data_quality`` result (see ``txstream.quality``); none if there is none."""
  if not data_quality or "suites" not in data_quality:
    return
  success = GaugeMetricFamily(PREFIX + "dq_success", "1 if the data-quality suite passed, else 0",
                              labels=["suite", "scope"])
  failed = GaugeMetricFamily(PREFIX + "dq_failed_expectations", "Failed expectations of the suite's validation",
                             labels=["suite"])
  evaluated = GaugeMetricFamily(PREFIX + "dq_evaluated_expectations",
                                "Expectations evaluated by the suite's validation", labels=["suite"])
  for suite in data_quality["suites"]:
    success.add_metric([suite["suite"], suite["scope"]], 1 if suite["success"] else 0)
    failed.add_metric([suite["suite"]], len(suite["failed"]))
    evaluated.add_metric([suite["suite"]], suite["evaluated"])
  yield from (success, failed, evaluated)


def from_run(counters: Mapping[str, int], distributions: Mapping[str, dict], summary: dict) -> CollectorRegistry:
  """A registry holding a finished bounded run's metrics (see the module docstring for the names).

  ``counters`` and ``distributions`` as ``collect`` returns them; ``summary``
  is the run summary (``wall_seconds``, ``model_version``, ``rules_version``).
  Counter names that map to no metric are left out.
  """
  registry = CollectorRegistry(auto_describe=False)
  registry.register(_RunCollector(counters, distributions, summary))
  return registry


def write_textfile(path: str, registry: CollectorRegistry) -> None:
  """Writes ``registry`` for node exporter's textfile collector (atomically: a temporary file, then a rename)."""
  write_to_textfile(path, registry)


def latency_summary(histogram) -> dict:
  """p50/p95/p99/max in ms of a ``transforms.live.LatencyHistogram``, and how many decisions it holds.

  The live hot path fills it with in-process decision latency (the record's
  batch fetched from Kafka -> its decision produced), in 1 ms buckets, so a
  percentile is exact to the millisecond (latencies above 60 s count as 60 s).
  Produce -> decision latency (from the broker timestamp) is the
  ``txstream_decision_latency_seconds`` histogram. Empty: ``{"count": 0}``.
  """
  count = len(histogram)
  if not count:
    return {"count": 0}
  p50, p95, p99, top = histogram.percentiles(50, 95, 99, 100)
  return {"count": count, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": top}


# ------------------------------------------------------------------------------------------------ live runs

_CURRENT: Optional["LiveMetrics"] = None


def current_live() -> Optional["LiveMetrics"]:
  """The live metrics the sinks report to (``LiveMetrics.install``), None outside a live run."""
  return _CURRENT


class LiveMetrics:
  """The live hot path's metrics, in a registry of their own; one per worker process.

  Thread-safe (prometheus-client's metrics are). ``serve(port)`` starts the
  HTTP endpoint in a daemon thread; ``stop()`` shuts it. The hot path calls
  the recording methods as it goes (``transforms.live``). ``in_process``: the
  hot path's ``LatencyHistogram`` of in-process latency, for ``latency_summary``.
  """

  def __init__(self, in_process=None):
    self.in_process = in_process
    self.registry = CollectorRegistry(auto_describe=True)
    r = self.registry
    self.events_in = Counter(PREFIX + "events_in", "Transaction records decided on (history replays excluded)",
                             registry=r)
    self.labels_in = Counter(PREFIX + "labels_in", "Label records read", registry=r)
    self.decode_valid = Counter(PREFIX + "decode_valid", "Transactions decoded and valid (history included)",
                                registry=r)
    self.filtered = Counter(PREFIX + "filtered", "Transactions left out on purpose (exact duplicates)", ["reason"],
                            registry=r)
    self.history = Counter(PREFIX + "history_replayed", "Records read only to rebuild feature state", registry=r)
    self.scored = Counter(PREFIX + "scored", "Transactions decided", registry=r)
    self.decisions = Counter(PREFIX + "decisions", "Decisions by action", ["decision"], registry=r)
    self.dead_letters = Counter(PREFIX + "dead_letters", "Transaction dead letters", ["stage", "reason"],
                                registry=r)
    self.label_dead_letters = Counter(PREFIX + "label_dead_letters", "Label dead letters", ["stage", "reason"],
                                      registry=r)
    self.offset_commits = Counter(PREFIX + "offset_commits", "Offset commits after a bundle's sinks", registry=r)
    self.latency = Histogram(PREFIX + "decision_latency_seconds",
                             "Produce (broker timestamp) -> decision latency", buckets=LATENCY_BUCKETS_S,
                             registry=r)
    self.lag = Gauge(PREFIX + "consumer_lag_records", "Partition end offset - next offset handled",
                     ["topic", "partition"], registry=r)
    self.model_info = Gauge(PREFIX + "model_info", "Model and rules versions deciding now",
                            ["model_version", "rules_version"], registry=r)
    self.tier_rows = Counter(PREFIX + "tier_rows", "Rows written per storage tier", ["tier"], registry=r)
    self.sink_write = Histogram(PREFIX + "sink_write_seconds", "Sink batch write time, retries included",
                                ["sink"], buckets=tuple(b / 1000 for b in BUCKETS_MS), registry=r)
    self.sink_retries = Counter(PREFIX + "sink_retries", "Sink write attempts retried", ["sink"], registry=r)
    self.circuit_opened = Counter(PREFIX + "sink_circuit_opened", "Times a sink's circuit breaker opened",
                                  ["sink"], registry=r)
    self.circuit_open = Gauge(PREFIX + "sink_circuit_open", "1 while the sink's circuit breaker is open, else 0",
                              ["sink"], registry=r)
    self.dq_success = Gauge(PREFIX + "dq_success", "1 if the last window's data-quality suite passed, else 0",
                            ["suite", "scope"], registry=r)
    self.dq_failed = Gauge(PREFIX + "dq_failed_expectations", "Failed expectations of the last window's validation",
                           ["suite"], registry=r)
    self.dq_evaluated = Gauge(PREFIX + "dq_evaluated_expectations",
                              "Expectations evaluated by the last window's validation", ["suite"], registry=r)
    self.dq_validations = Counter(PREFIX + "dq_validations", "Data-quality validations of live windows",
                                  ["suite", "result"], registry=r)
    self.live_quality = None  # the hot path's quality.live.LiveQuality, when it validates data quality
    self._lock = threading.Lock()
    self._model: Optional[Tuple[str, str]] = None
    self._server = None

  def install(self) -> "LiveMetrics":
    """Makes this the process's live metrics: the sinks of the fused stage report to it (``current_live``)."""
    global _CURRENT  # pylint: disable=global-statement
    _CURRENT = self
    return self

  def uninstall(self) -> None:
    global _CURRENT  # pylint: disable=global-statement
    if _CURRENT is self:
      _CURRENT = None

  def sink_written(self, sink: str, seconds: float, rows: int) -> None:
    self.sink_write.labels(sink).observe(seconds)
    self.tier_rows.labels(sink).inc(rows)
    self.circuit_open.labels(sink)  # the series exists (0: closed) from the sink's first write on

  def sink_retried(self, sink: str) -> None:
    self.sink_retries.labels(sink).inc()

  def sink_circuit(self, sink: str, is_open: bool) -> None:
    if is_open:
      self.circuit_opened.labels(sink).inc()
    self.circuit_open.labels(sink).set(1 if is_open else 0)

  def data_quality(self, result: dict) -> None:
    """A live window's ``data_quality`` (``quality.validate.check``)."""
    for suite in result.get("suites", []):
      self.dq_success.labels(suite["suite"], suite["scope"]).set(1 if suite["success"] else 0)
      self.dq_failed.labels(suite["suite"]).set(len(suite["failed"]))
      self.dq_evaluated.labels(suite["suite"]).set(suite["evaluated"])
      self.dq_validations.labels(suite["suite"], "passed" if suite["success"] else "failed").inc()

  def serve(self, port: int) -> "LiveMetrics":
    """Serves ``/metrics`` on ``port`` (all interfaces); ``OSError`` if the port is taken."""
    self._server, _ = start_http_server(port, registry=self.registry)
    _LOGGER.info("metrics: serving Prometheus metrics on :%d/metrics", port)
    return self

  def stop(self) -> None:
    self.uninstall()
    server, self._server = self._server, None
    if server is not None:
      server.shutdown()
      server.server_close()

  def model(self, model_version: str, rules_version: str) -> None:
    """The versions deciding now: the previous pair's series goes (a model switch leaves one series at 1)."""
    with self._lock:
      if self._model is not None:
        self.model_info.remove(*self._model)
      self._model = (str(model_version), str(rules_version or ""))
      self.model_info.labels(*self._model).set(1)

  def count_dead_letters(self, table: pa.Table, labels: bool = False) -> None:
    """Counts a ``contracts.DEAD_LETTER`` table by (stage, reason)."""
    if not table.num_rows:
      return
    family = self.label_dead_letters if labels else self.dead_letters
    pairs = pa.table({"s": table.column("stage"), "r": table.column("reason")}).group_by(["s", "r"]).aggregate(
        [([], "count_all")])
    for stage, reason, n in zip(*(pairs.column(c).to_pylist() for c in ("s", "r", "count_all"))):
      family.labels(stage, reason).inc(n)

  def count_decisions(self, decisions: pa.Table, latencies_ms: np.ndarray) -> None:
    """Counts decided rows by action and observes their produce -> decision latencies."""
    self.scored.inc(decisions.num_rows)
    for pair in pa.compute.value_counts(decisions.column("decision")).to_pylist():
      self.decisions.labels(pair["values"]).inc(pair["counts"])
    for latency in (np.asarray(latencies_ms, dtype=np.float64) / 1000).tolist():
      self.latency.observe(latency)

  def set_lag(self, topic: str, partition: int, lag: int) -> None:
    self.lag.labels(topic, str(partition)).set(max(0, lag))
