"""``txstream stream``: the graph live from Kafka, until Ctrl-C or ``--duration_s``.

On the DirectRunner (the default, this machine) it runs the live hot path:
``ReadPartitionsLive | DecideLive`` and the shuffle-free sinks (Redis, the
decisions and dead-letter topics) fused into one stage on the FnApiRunner,
which runs an unbounded splittable DoFn and what is fused with it
continuously, but nothing behind a shuffle (README, "Live mode"). Offsets
are committed by each bundle's finalizer, after its sinks. Live features
depend on arrival order, so the warm and analytics tiers, which hold
deterministic results, are left to bounded runs.

On Flink, Dataflow or Prism (``--runner``) it runs the whole graph from
``build_graph`` in streaming mode: Beam's state and timers hold the features
there, and the cold tier and dead-letter files, which group rows per
partition, are left to the bounded reruns (``txstream run --topic``); dead
letters go to the dead-letter topic.
"""
import logging
import os
import signal
import threading
import time
import uuid
from typing import Dict, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from txstream.config.options import FeatureOptions, LiveOptions, ScoreOptions, SourceOptions, TierOptions
from txstream.io import kafka
from txstream.io.kafka_config import KafkaConfig, KafkaOptions
from txstream.io.kafka_offsets import committed_offsets, resolve_ranges
from txstream.io.kafka_read import ReadPartitionsLive
from txstream.metrics import MetricsOptions, latency_summary
from txstream.pipelines.run import ConfigError, check_quality, check_reference
from txstream.runners.profiles import runner_for
from txstream.transforms.live import DecideLive
from txstream.transforms.tiers import (TierConfig, WriteDeadLettersToKafka, WriteDecisionsToKafka, WriteTiers)

_LOGGER = logging.getLogger(__name__)


def is_direct(options) -> bool:
  return (options.view_as(StandardOptions).runner or "DirectRunner") in ("DirectRunner", "direct")


def topics(options) -> Tuple[str, Optional[str], str, str]:
  """(transactions, labels, decisions, dead letters) topic names."""
  flags = options.view_as(KafkaOptions)
  return (flags.topic, flags.labels_topic, flags.decisions_topic or f"{flags.topic}.decisions",
          flags.dead_letter_topic or f"{flags.topic}.dead_letters")


def check_config(options) -> KafkaConfig:
  flags = options.view_as(KafkaOptions)
  src = options.view_as(SourceOptions)
  live = options.view_as(LiveOptions)
  if src.input:
    raise ConfigError("`txstream stream` reads Kafka (--topic); --input files are for `txstream run`")
  if not flags.topic:
    raise ConfigError("--topic T (and --bootstrap_servers H:P) is required")
  if not src.reference_dir or ("://" not in src.reference_dir and not os.path.isdir(src.reference_dir)):
    raise ConfigError("--reference_dir DIR (customers.avro, terminals.avro) is required")
  if flags.kafka_stop_at or flags.kafka_stop_time_ms:
    raise ConfigError("--kafka_stop_at/--kafka_stop_time_ms make a bounded run: use `txstream run`")
  if live.duration_s is not None and live.duration_s <= 0:
    raise ConfigError("--duration_s must be positive")
  if live.live_batch_size < 1 or live.progress_interval_s <= 0 or live.live_checkpoint_ms < 1:
    raise ConfigError("--live_batch_size and --live_checkpoint_ms must be >= 1 and "
                      "--progress_interval_s positive")
  if is_direct(options):
    if flags.kafka_io != "native":
      raise ConfigError("--kafka_io=xlang needs Flink or Dataflow (--runner); the DirectRunner reads natively")
    tiers = options.view_as(TierOptions)
    if tiers.postgres_dsn or tiers.clickhouse_url:
      raise ConfigError("the live hot path writes Redis and the decisions topic only: the warm and analytics "
                        "tiers hold deterministic results, filled by bounded runs (`txstream run --topic T "
                        "--group_id G`) or by the full graph on a streaming runner")
    if (options.view_as(DirectOptions).direct_num_workers or 1) > 1:
      raise ConfigError("the live hot path keeps feature state in one worker: --direct_num_workers must be 1")
  elif options.view_as(MetricsOptions).metrics_port is not None:
    raise ConfigError("--metrics_port serves the live hot path's metrics (DirectRunner); on Flink or Dataflow "
                      "scrape the runner's own metrics")
  port = options.view_as(MetricsOptions).metrics_port
  if port is not None and not 0 < port < 65536:
    raise ConfigError(f"--metrics_port {port}: not a TCP port (1-65535)")
  check_reference(options, src.reference_dir)  # empty, duplicated or malformed: one line, before any read
  check_quality(options)
  try:
    return KafkaConfig.from_options(options)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def live_tiers(options) -> WriteTiers:
  """The server tiers of a live run (the cold tier groups rows per partition: bounded runs write it)."""
  tiers = options.view_as(TierOptions)
  return WriteTiers(TierConfig(None, None, tiers.redis_url, tiers.postgres_dsn, tiers.clickhouse_url))


def offsets(config: KafkaConfig, topic: str, start: str, warmup: str) -> Tuple[Dict, Dict]:
  """({(topic, p): first offset to read}, {(topic, p): first offset to decide}) for one topic."""
  decide = {(topic, p): a for p, (a, _) in resolve_ranges(config, topic, start=start).items()}
  if warmup == "none":
    return dict(decide), decide
  earliest = resolve_ranges(config, topic, start="earliest")
  return {(topic, p): min(a, decide[(topic, p)]) for p, (a, _) in earliest.items()}, decide


def _quality_settings(options):
  """The live run's data-quality settings, None with --no_dq (the thresholds are checked before the run)."""
  from txstream.config.options import QualityOptions, dq_docs_dir
  from txstream.quality.live import LiveQualitySettings
  flags = options.view_as(QualityOptions)
  if flags.no_dq:
    return None
  return LiveQualitySettings(flags.dq_config, options.view_as(TierOptions).postgres_dsn, dq_docs_dir(options),
                             f"stream-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}")


def build_hot_path(pipeline: beam.Pipeline, options, config: KafkaConfig, write_tiers: WriteTiers):
  """The live hot path; returns (DecideLive, read starts, decide-from offsets)."""
  transactions, labels, decisions_topic, dead_topic = topics(options)
  flags = options.view_as(KafkaOptions)
  live = options.view_as(LiveOptions)
  starts, decide_from = offsets(config, transactions, flags.kafka_start, live.warmup)
  if labels:
    label_starts, label_from = offsets(config, labels, flags.kafka_start, live.warmup)
    starts.update(label_starts)
    decide_from.update(label_from)
  src = options.view_as(SourceOptions)
  score = options.view_as(ScoreOptions)
  decide = DecideLive(config, transactions, labels, decide_from, src.reference_dir, score.model_dir, score.rules,
                      src.schema_registry_url, options.view_as(FeatureOptions).terminal_delay_days,
                      live.progress_interval_s, read_from=starts, model_watch_pattern=score.model_watch_pattern,
                      metrics_port=options.view_as(MetricsOptions).metrics_port, with_metrics=True,
                      quality=_quality_settings(options))
  out = (pipeline
         | "ReadKafka" >> ReadPartitionsLive(config, starts, batch_size=live.live_batch_size,
                                             checkpoint_interval_s=live.live_checkpoint_ms / 1000)
         | "DecideLive" >> decide)
  # No Flatten: a Flatten with an input from another stage (WriteTiers' empty
  # "no rejects" Create) would put what follows behind a stage boundary,
  # which the runner holds until the unbounded read ends.
  dead = [out.dead_letters]
  if write_tiers.tiers:
    dead.append((out.decisions | "WriteTiers" >> write_tiers).dead_letters)
  out.decisions | "DecisionsToKafka" >> WriteDecisionsToKafka(config, decisions_topic)
  for i, letters in enumerate(dead):
    letters | f"DeadLettersToKafka{i}" >> WriteDeadLettersToKafka(config, dead_topic)
  return decide, starts, decide_from


def build_streaming_graph(pipeline: beam.Pipeline, options, write_tiers: WriteTiers):
  """The full graph, streaming, for Flink/Dataflow/Prism; decisions and dead letters also to Kafka."""
  from txstream.pipelines.graph import build_graph
  _, _, decisions_topic, dead_topic = topics(options)
  flags = options.view_as(KafkaOptions)
  flags.decisions_topic, flags.dead_letter_topic = decisions_topic, dead_topic
  return build_graph(pipeline, options, write_tiers=write_tiers)


def _stop_after(seconds: float) -> threading.Timer:
  """Delivers SIGINT to this process after ``seconds``: the same clean stop as Ctrl-C."""
  timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
  timer.daemon = True
  timer.start()
  return timer


def stream(options: PipelineOptions) -> dict:
  """Runs until Ctrl-C (or ``--duration_s``); returns what was committed per partition."""
  config = check_config(options)
  _, labels, decisions_topic, dead_topic = topics(options)
  options.view_as(TierOptions).no_cold = True
  options.view_as(TierOptions).dead_letter_path = None
  write_tiers = live_tiers(options)
  from txstream.io.sinks import SinkConfigError
  try:
    write_tiers.preflight()
    for topic in (decisions_topic, dead_topic):
      kafka.ensure_topic(config, topic, num_partitions=3)
    if labels:
      kafka.partitions(config, labels)
  except (SinkConfigError, ValueError) as e:
    raise ConfigError(str(e)) from e
  began = time.monotonic()
  live_metrics = None
  if is_direct(options):
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    pipeline = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=options)
    decide, starts, decide_from = build_hot_path(pipeline, options, config, write_tiers)
    live_metrics = _serve_metrics(decide, options)
    _LOGGER.info("live hot path: reading %s from %s, deciding from %s; decisions to %s, dead letters to %s",
                    ", ".join(sorted({t for t, _ in starts})), _fmt(starts), _fmt(decide_from), decisions_topic,
                    dead_topic)
  else:
    options.view_as(StandardOptions).streaming = True
    pipeline = beam.Pipeline(runner=runner_for(options), options=options)
    build_streaming_graph(pipeline, options, write_tiers)
  duration = options.view_as(LiveOptions).duration_s
  timer = _stop_after(duration) if duration else None
  stopped_by = "end of input"
  try:
    result = pipeline.run()
    result.wait_until_finish()
  except KeyboardInterrupt:
    stopped_by = "duration" if timer is not None and not timer.is_alive() else "Ctrl-C"
  finally:
    if timer is not None:
      timer.cancel()
    if live_metrics is not None:
      live_metrics.stop()
  summary = {"stopped_by": stopped_by, "wall_seconds": round(time.monotonic() - began, 3),
             "committed": {}}
  if live_metrics is not None:
    summary["in_process_latency"] = latency_summary(live_metrics.in_process)
    if live_metrics.live_quality is not None:
      summary["data_quality"] = live_metrics.live_quality.summary()
  for topic in filter(None, (options.view_as(KafkaOptions).topic, labels)):
    summary["committed"][topic] = {str(p): o for p, o in sorted(committed_offsets(config, topic).items())}
  return summary


def _serve_metrics(decide: DecideLive, options):
  """The hot path's metrics, serving on ``--metrics_port`` if given, started before the run.

  The FnApiRunner runs the DoFn in this process, so it records into this very
  object; the summary reads its in-process latency histogram at the end.
  """
  port = options.view_as(MetricsOptions).metrics_port
  try:
    return decide.live_metrics()
  except OSError as e:
    raise ConfigError(f"--metrics_port {port}: cannot serve metrics there: {e.strerror or e}") from None


def _fmt(offsets: Dict) -> str:
  return " ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(offsets.items()))
