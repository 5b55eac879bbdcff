"""Prometheus metrics: Beam counters -> metric names and labels, the textfile, latency, the live endpoint, and
that the dashboard and the alert rules ask only for metrics that exist."""
import json
import pathlib
import re
import socket
import urllib.request

import apache_beam as beam
import numpy as np
import pytest
import yaml
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers as h
from txstream import metrics
from txstream.pipelines import generate
from txstream.transforms.live import DecideLive, LatencyHistogram

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"

COUNTERS = {
    "events_in": 100, "labels_in": 7, "decode_valid": 96, "scored": 90,
    "dead_letter.decode.bad_magic_byte": 3, "dead_letter.sink.hot.rejected_by_store": 1,
    "label_dead_letter.decode.null_value": 2,
    "filtered.duplicate": 5, "filtered.before_window": 1,
    "decision.approve": 80, "decision.review": 8, "decision.decline": 2,
    "tier.hot": 90, "tier.warm": 89,
    "sink.hot.retried": 4, "sink.warm.failed": 1, "sink.warm.upserts": 89, "sink.warm.moved": 2,
    "kafka.tx.decisions.written": 90,
    "live.offset_commits": 6,
    "Not A Metric!": 1,
}
DISTRIBUTIONS = {
    "sink.hot.write_ms": {"count": 4, "sum": 2000, "min": 100, "max": 900},
    "sink.hot.batch_size": {"count": 4, "sum": 90, "min": 10, "max": 40},
    "inference_batch_latency_micro_secs": {"count": 2, "sum": 3000, "min": 1000, "max": 2000},
}
SUMMARY = {"wall_seconds": 12.5, "model_version": "m-abc", "rules_version": "r-123"}


@pytest.fixture(name="registry")
def _registry():
  return metrics.from_run(COUNTERS, DISTRIBUTIONS, SUMMARY)


@pytest.mark.parametrize("name,labels,value", [
    ("txstream_events_in_total", {}, 100),
    ("txstream_labels_in_total", {}, 7),
    ("txstream_scored_total", {}, 90),
    ("txstream_dead_letters_total", {"stage": "decode", "reason": "bad_magic_byte"}, 3),
    ("txstream_dead_letters_total", {"stage": "sink.hot", "reason": "rejected_by_store"}, 1),
    ("txstream_label_dead_letters_total", {"stage": "decode", "reason": "null_value"}, 2),
    ("txstream_filtered_total", {"reason": "duplicate"}, 5),
    ("txstream_decisions_total", {"decision": "review"}, 8),
    ("txstream_tier_rows_total", {"tier": "warm"}, 89),
    ("txstream_sink_retries_total", {"sink": "hot"}, 4),
    ("txstream_sink_failures_total", {"sink": "warm"}, 1),
    ("txstream_sink_upserts_total", {"sink": "warm"}, 89),
    ("txstream_sink_moved_total", {"sink": "warm"}, 2),
    ("txstream_kafka_records_written_total", {"topic": "tx.decisions"}, 90),
    ("txstream_offset_commits_total", {}, 6),
    ("txstream_sink_write_seconds_count", {"sink": "hot"}, 4),
    ("txstream_sink_write_seconds_sum", {"sink": "hot"}, 2.0),
    ("txstream_sink_write_max_seconds", {"sink": "hot"}, 0.9),
    ("txstream_sink_batch_rows_sum", {"sink": "hot"}, 90),
    ("txstream_inference_batch_seconds_sum", {}, 0.003),
    ("txstream_run_duration_seconds", {}, 12.5),
    ("txstream_model_info", {"model_version": "m-abc", "rules_version": "r-123"}, 1),
])
def test_a_run_s_counters_become_conventional_metrics(registry, name, labels, value):
  assert registry.get_sample_value(name, labels) == value


def test_names_stay_out_of_labels_and_unknown_counters_are_left_out(registry):
  names = {s.name for family in registry.collect() for s in family.samples}
  assert not any("dead_letter." in n or "sink." in n or "Not" in n for n in names)
  assert not any(n.endswith("_created") for n in names)
  families = {f.name for f in registry.collect()}
  assert families <= {n[:-len("_total")] if n.endswith("_total") else n for n in metrics.METRIC_NAMES}


def test_textfile_parses_back_with_the_same_values(registry, tmp_path):
  path = tmp_path / "txstream.prom"
  metrics.write_textfile(str(path), registry)
  parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}
  assert parsed[("txstream_events_in_total", ())] == 100
  assert parsed[("txstream_dead_letters_total", (("reason", "rejected_by_store"), ("stage", "sink.hot")))] == 1
  assert parsed[("txstream_decisions_total", (("decision", "approve"),))] == 80
  assert parsed[("txstream_sink_write_seconds_sum", (("sink", "hot"),))] == 2.0
  assert parsed[("txstream_model_info", (("model_version", "m-abc"), ("rules_version", "r-123")))] == 1
  assert "# TYPE txstream_dead_letters_total counter" in path.read_text()


def test_a_run_without_distributions_or_versions_has_no_such_metrics():
  registry = metrics.from_run({"events_in": 3}, {}, {})
  assert [f.name for f in registry.collect()] == ["txstream_events_in"]


class _CountFn(beam.DoFn):
  def process(self, x):
    Metrics.counter("txstream", "dead_letter.decode.null_value").inc()
    Metrics.distribution("txstream", "sink.hot.write_ms").update(x)
    Metrics.counter("other", "events_in").inc()  # another namespace: not ours
    yield x


def test_collect_reads_counters_and_distributions_of_a_finished_pipeline():
  p = TestPipeline(runner="DirectRunner")
  _ = p | beam.Create([10, 30, 20]) | beam.ParDo(_CountFn())
  result = p.run()
  result.wait_until_finish()
  counters, distributions = metrics.collect(result)
  assert counters == {"dead_letter.decode.null_value": 3}
  assert distributions == {"sink.hot.write_ms": {"count": 3, "sum": 60, "min": 10, "max": 30}}


def test_latency_summary_reads_percentiles_from_the_live_histogram():
  histogram = LatencyHistogram()
  assert metrics.latency_summary(histogram) == {"count": 0}
  histogram.add(np.arange(1, 101))  # 1..100 ms
  assert metrics.latency_summary(histogram) == {"count": 100, "p50_ms": 50, "p95_ms": 95, "p99_ms": 99,
                                                "max_ms": 100}


def test_metrics_options():
  flags = PipelineOptions(["--metrics_port", "9464", "--metrics_file", "/tmp/x.prom"]).view_as(metrics.MetricsOptions)
  assert (flags.metrics_port, flags.metrics_file) == (9464, "/tmp/x.prom")
  assert PipelineOptions([]).view_as(metrics.MetricsOptions).metrics_port is None


# ------------------------------------------------------------------------------------------------ live endpoint

@pytest.fixture(scope="module", name="reference")
def _reference(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("g"))
  generate.generate(out, customers=5, terminals=20, days=1, start=generate.datetime.date(2018, 4, 1), seed=2)
  return f"{out}/reference"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Finalizer:
  def register(self, callback):
    pass


class _Ends:
  """A committer that knows the partitions' end offsets (as the broker's watermarks)."""
  def __init__(self, ends):
    self.ends = ends

  def get_watermark_offsets(self, tp, timeout):
    return 0, self.ends[(tp.topic, tp.partition)]

  def close(self):
    pass


def _scrape(port: int) -> dict:
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
    text = response.read().decode()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def test_live_hot_path_serves_its_metrics(reference, tmp_path):
  from txstream.quality.live import LiveQualitySettings
  port = _free_port()
  quality = LiveQualitySettings(None, None, str(tmp_path / "docs"), "live-test")
  decide = DecideLive(None, "tx", "lb", {("tx", 0): 1, ("lb", 0): 0}, reference, metrics_port=port,
                      quality=quality)
  live = decide.live_metrics()  # the endpoint is up before the first record
  try:
    fn = decide._fn  # pylint: disable=protected-access
    fn.setup()
    fn._committer = _Ends({("tx", 0): 10, ("lb", 0): 1})  # pylint: disable=protected-access
    fn.start_bundle()
    records = [h.raw_batch([("tx/0@0", h.message(h.tx_record(0, h.T0)))]),  # history: replayed, not counted
               h.raw_batch([("tx/0@1", h.message(h.tx_record(1, h.T0 + 1))),
                            ("tx/0@2", h.message(h.tx_record(2, h.T0 + 2))), ("tx/0@3", b"\x07junk")]),
               h.raw_batch([("lb/0@0", None)])]
    out = []
    for batch in records:
      out += list(fn.process(batch, _Finalizer()))
    out += list(fn.finish_bundle())
    scraped = _scrape(port)
    assert scraped[("txstream_events_in_total", ())] == 3
    assert scraped[("txstream_labels_in_total", ())] == 1
    assert scraped[("txstream_history_replayed_total", ())] == 1
    assert scraped[("txstream_scored_total", ())] == 2
    assert scraped[("txstream_decode_valid_total", ())] == 3  # as the Beam counter: history is decoded too
    assert sum(v for (n, _), v in scraped.items() if n == "txstream_decisions_total") == 2
    assert scraped[("txstream_dead_letters_total", (("reason", "bad_magic_byte"), ("stage", "decode")))] == 1
    assert scraped[("txstream_label_dead_letters_total", (("reason", "null_value"), ("stage", "decode_label")))] == 1
    assert scraped[("txstream_decision_latency_seconds_count", ())] == 2
    assert ("txstream_decision_latency_seconds_bucket", (("le", "0.2"),)) in scraped
    assert scraped[("txstream_consumer_lag_records", (("partition", "0"), ("topic", "tx")))] == 6  # 10 - 4
    assert scraped[("txstream_consumer_lag_records", (("partition", "0"), ("topic", "lb")))] == 0
    model = [dict(labels) for (n, labels), v in scraped.items() if n == "txstream_model_info" and v == 1]
    rules_version = fn._rules.version  # pylint: disable=protected-access
    assert model == [{"model_version": decide.model_version, "rules_version": rules_version}]
    assert metrics.latency_summary(live.in_process)["count"] == 2
    fn.teardown()  # validates the last (here the only) data-quality window
    scraped = _scrape(port)
    assert scraped[("txstream_dq_success", (("scope", "window"), ("suite", "decisions")))] == 1
    assert scraped[("txstream_dq_evaluated_expectations", (("suite", "decisions"),))] == 10
    assert scraped[("txstream_dq_evaluated_expectations", (("suite", "feature_ranges"),))] == 30
    assert scraped[("txstream_dq_validations_total", (("result", "passed"), ("suite", "window_distribution")))] == 1
    assert live.live_quality.summary()["windows_validated"] == 1
    assert (tmp_path / "docs" / "live-test.html").exists()
  finally:
    live.stop()


def test_model_switch_leaves_one_model_info_series():
  live = metrics.LiveMetrics()
  live.model("m1", "r1")
  live.model("m2", "r1")
  assert live.registry.get_sample_value("txstream_model_info", {"model_version": "m1", "rules_version": "r1"}) is None
  assert live.registry.get_sample_value("txstream_model_info", {"model_version": "m2", "rules_version": "r1"}) == 1


def test_latency_histogram_has_the_alert_threshold_as_a_bucket():
  live = metrics.LiveMetrics()
  live.latency.observe(0.15)
  live.latency.observe(0.3)
  assert live.registry.get_sample_value("txstream_decision_latency_seconds_bucket", {"le": "0.2"}) == 1
  assert max(metrics.LATENCY_BUCKETS_S) >= 2


# ------------------------------------------------------------------------------------------------ deploy files

_SUFFIXES = ("_bucket", "_count", "_sum")


def _metric_names(expr: str) -> set:
  names = set()
  for name in re.findall(r"\btxstream_[a-z0-9_]+", expr):
    base = next((name[:-len(s)] for s in _SUFFIXES if name.endswith(s) and name[:-len(s)] in metrics.METRIC_NAMES),
                name)
    names.add(base)
  return names


def _panels(dashboard: dict):
  for panel in dashboard["panels"]:
    yield panel
    yield from panel.get("panels", [])


def test_dashboard_asks_only_for_metrics_that_exist():
  dashboard = json.loads((DEPLOY / "grafana" / "txstream.json").read_text())
  exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
  assert len(exprs) >= 6
  used = set().union(*map(_metric_names, exprs))
  assert used and used <= metrics.METRIC_NAMES, used - metrics.METRIC_NAMES
  for wanted in ("txstream_events_in_total", "txstream_decisions_total", "txstream_dead_letters_total",
                 "txstream_decision_latency_seconds", "txstream_consumer_lag_records", "txstream_sink_retries_total"):
    assert wanted in used


def test_alert_rules_ask_only_for_metrics_that_exist():
  rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
  exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
  used = set().union(*map(_metric_names, exprs))
  assert used <= metrics.METRIC_NAMES, used - metrics.METRIC_NAMES


@pytest.mark.parametrize("flags,error", [
    (["--runner=FlinkRunner", "--metrics_port=9464"], "--metrics_port serves the live hot path"),
    (["--metrics_port=70000"], "not a TCP port"),
])
def test_stream_refuses_a_metrics_port_it_cannot_serve(reference, flags, error):
  from txstream.pipelines import stream
  options = PipelineOptions(["--bootstrap_servers=127.0.0.1:1", "--topic=tx", f"--reference_dir={reference}"] + flags)
  with pytest.raises(stream.ConfigError, match=error):
    stream.check_config(options)


def test_bucket_counters_give_the_run_s_percentiles_and_a_prometheus_histogram():
  counters = {"events_in": 10}
  write_ms = [3, 4, 4, 40, 45, 48, 49, 150, 900, 70_000]
  for ms in write_ms:
    name = metrics.bucket_counter("sink.warm.write_ms", ms)
    counters[name] = counters.get(name, 0) + 1
  assert metrics.bucket_counter("sink.warm.write_ms", 5) == "sink.warm.write_ms.le_5"
  assert metrics.bucket_counter("sink.warm.write_ms", 70_000) == "sink.warm.write_ms.le_inf"
  distributions = {"sink.warm.write_ms": {"count": 10, "sum": sum(write_ms), "min": 3, "max": 70_000}}
  latency = metrics.run_latency(counters, distributions)
  assert latency == {"sink_write_ms": {"warm": {"count": 10, "p50_ms": 50, "p95_ms": 70_000, "p99_ms": 70_000,
                                                "max_ms": 70_000}}}
  registry = metrics.from_run(counters, distributions, {})
  assert registry.get_sample_value("txstream_sink_write_seconds_bucket", {"sink": "warm", "le": "0.005"}) == 3
  assert registry.get_sample_value("txstream_sink_write_seconds_bucket", {"sink": "warm", "le": "0.05"}) == 7
  assert registry.get_sample_value("txstream_sink_write_seconds_bucket", {"sink": "warm", "le": "+Inf"}) == 10
  assert registry.get_sample_value("txstream_sink_write_seconds_sum", {"sink": "warm"}) == sum(write_ms) / 1000


def test_a_percentile_never_exceeds_the_run_s_maximum():
  assert metrics.percentiles({5.0: 3}, max_ms=4) == {"count": 3, "p50_ms": 4, "p95_ms": 4, "p99_ms": 4, "max_ms": 4}
  assert metrics.percentiles({}) == {"count": 0}


def test_data_quality_results_become_gauges_in_the_textfile():
  quality = {"suites": [{"suite": "decisions", "scope": "run", "success": True, "evaluated": 40, "failed": []},
                        {"suite": "window_distribution", "scope": "window", "success": False, "evaluated": 4,
                         "failed": [{"column": "decline_rate"}]}]}
  registry = metrics.from_run({}, {}, {"data_quality": quality})
  assert registry.get_sample_value("txstream_dq_success", {"suite": "decisions", "scope": "run"}) == 1
  assert registry.get_sample_value("txstream_dq_success", {"suite": "window_distribution", "scope": "window"}) == 0
  assert registry.get_sample_value("txstream_dq_failed_expectations", {"suite": "window_distribution"}) == 1
  live = metrics.LiveMetrics()
  live.data_quality(quality)
  live.data_quality(quality)
  assert live.registry.get_sample_value("txstream_dq_validations_total",
                                        {"suite": "window_distribution", "result": "failed"}) == 2
  assert live.registry.get_sample_value("txstream_dq_success", {"suite": "decisions", "scope": "run"}) == 1
