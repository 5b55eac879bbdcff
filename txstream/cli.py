"""The ``txstream`` command: generate, run, train, services.

Configuration mistakes (a bad flag, a missing input, an invalid rules or model
file, an unreachable server) print one line, ``txstream: error: ...``, and
exit with status 2; no traceback. A run whose data-quality suites fail exits
with status 3 (its decisions are written; ``--dq_fail_ok`` exits 0). ``run`` accepts every standard Beam flag
(``--runner``, ``--direct_num_workers``, ...) alongside its own.
"""
import argparse
import datetime
import json
import logging
import sys
import textwrap

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from txstream import services
from txstream.reconcile import command as reconcile

_LOGGER = logging.getLogger(__name__)


class UsageError(ValueError):
  """A mistake in how the command was called; reported as one line."""


class _StrictBeamParser(_BeamArgumentParser):
  def error(self, message):
    raise UsageError(message)


def _all_option_classes():
  # Importing registers txstream's own option classes with Beam.
  import txstream.config.options  # pylint: disable=unused-import
  import txstream.io.kafka_config  # pylint: disable=unused-import
  import txstream.pipelines.rerun  # pylint: disable=unused-import
  import txstream.metrics  # pylint: disable=unused-import
  import txstream.lineage  # pylint: disable=unused-import
  seen, stack = {}, list(PipelineOptions.__subclasses__())
  while stack:
    cls = stack.pop()
    seen.setdefault(str(cls), cls)
    stack.extend(cls.__subclasses__())
  return seen.values()


def pipeline_options(argv) -> PipelineOptions:
  """PipelineOptions from argv, rejecting flags no option class knows and bad values."""
  parser = _StrictBeamParser(allow_abbrev=False)
  for cls in _all_option_classes():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(argv)
  flags = [a for a in unknown if a.startswith("-")]
  if flags:
    raise UsageError(f"unrecognized flag {flags[0].split('=')[0]} (see `txstream run --help`)")
  if unknown:
    raise UsageError(f"unexpected argument {unknown[0]!r}")
  return PipelineOptions(argv)


def _date(text: str) -> datetime.date:
  try:
    return datetime.date.fromisoformat(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from e


def _redact(text: str) -> str:
  from txstream.io.sinks import redact
  return redact(text)


class _Redacting(logging.Filter):
  """Keeps passwords in URLs and DSNs out of every log line, whoever logs them (a driver echoing its DSN)."""
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    safe = _redact(message)
    if safe != message:
      record.msg, record.args = safe, None
    return True


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def _generate_parser(sub):
  p = sub.add_parser("generate", help="Write seeded, realistic card transactions (handbook simulator design).",
                     description="Simulate customers and terminals on a 100x100 grid with the three fraud "
                                 "scenarios; write wire-format files, labels and reference data.")
  p.add_argument("--out", required=True, help="Output directory.")
  p.add_argument("--customers", type=int, default=5000, help="Number of customers (default 5000).")
  p.add_argument("--terminals", type=int, default=10000, help="Number of terminals (default 10000).")
  p.add_argument("--days", type=int, default=30, help="Number of days (default 30).")
  p.add_argument("--start", type=_date, default=datetime.date(2018, 4, 1), help="First day (default 2018-04-01).")
  p.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
  p.add_argument("--schema_version", type=int, default=2, choices=(1, 2), help="Transaction schema version.")
  p.add_argument("--corrupt_fraction", type=float, default=0.0,
                 help="Share of messages to damage on purpose (lists them in corrupted.json).")
  p.add_argument("--legacy_extract", action="store_true",
                 help="Also write legacy/decisions.csv: what a legacy batch system decided for the transactions "
                      "`txstream run` accepts (its own columns and formats: local Europe/Paris time with offset, "
                      "decimal amounts, APPROVED/REFERRED/DECLINED from a fixed rule table), to reconcile against.")
  p.add_argument("--bootstrap_servers", default=None,
                 help="Also produce the written transactions to Kafka at host:port (needs --topic).")
  p.add_argument("--topic", default=None, help="Kafka topic for the transactions.")
  p.add_argument("--labels_topic", default=None, help="Kafka topic for the fraud labels (optional).")
  p.add_argument("--partitions", type=int, default=3, help="Partitions when the topic is created (default 3).")
  p.add_argument("--rate", type=float, default=None,
                 help="Produce at this many messages/s (default: as fast as possible).")


def _run_parser(sub):
  p = sub.add_parser("run", help="Run the graph bounded over generated files (DirectRunner by default).",
                     add_help=False, description="All standard Beam flags pass through.")
  p.add_argument("-h", "--help", action="store_true")


def _rerun_parser(sub):
  p = sub.add_parser("rerun", help="Decide a historical event-time window again, into its own namespace.",
                     add_help=False, description="All standard Beam flags pass through.")
  p.add_argument("-h", "--help", action="store_true")


def _stream_parser(sub):
  p = sub.add_parser("stream", help="Run the graph live from Kafka until Ctrl-C (or --duration_s).",
                     add_help=False, description="All standard Beam flags pass through.")
  p.add_argument("-h", "--help", action="store_true")


def _train_parser(sub):
  p = sub.add_parser("train", help="Compute features with the pipeline and train the XGBoost model.",
                     description="Features are computed once by the pipeline's own transforms, then split by day. "
                                 "--protocol handbook runs the Fraud Detection Handbook's evaluation (baseline "
                                 "split, 4 prequential test folds, 4 validation folds) beside its published figures; "
                                 "it needs data from 2018-04-01 to 2018-09-04 (`txstream generate --days 157`).")
  p.add_argument("--input", required=True, help="Directory written by `txstream generate`.")
  p.add_argument("--model_dir", required=True, help="Where to write model.json + metadata.json.")
  p.add_argument("--metrics_json", default=None, help="Also write the metrics here.")
  p.add_argument("--protocol", choices=("split", "handbook"), default="split",
                 help="split: one train/delay/test split over the input (default); handbook: the book's protocol.")
  p.add_argument("--train_days", type=int, default=None,
                 help="split: days used for training (default: all but the delay and test weeks).")
  p.add_argument("--test_days", type=int, default=7, help="split: days held out for testing (default 7).")
  p.add_argument("--delay_days", type=int, default=7, help="split: gap between train and test (default 7).")
  p.add_argument("--seed", type=int, default=0, help="Training seed (default 0).")
  p.add_argument("--params", default=None,
                 help='XGBoost parameters overriding the defaults, as JSON: \'{"max_depth": 6}\'.')
  p.add_argument("--feature_sets", default="all",
                 help="handbook: comma-separated feature sets to evaluate: all, no_early_labels, handbook "
                      "(default all; only 'all' is written as a model).")
  p.add_argument("--select", action="store_true",
                 help="handbook: choose max_depth/n_estimators/learning_rate from the book's grid on its "
                      "validation folds (best average precision) before testing.")


_RUN_EXAMPLES = """\
examples:
  # generated files, cold tier only (out/cold), in this process
  txstream run --input data/sample
  # a bounded read of Kafka, from the committed offsets to the end
  txstream run --bootstrap_servers=127.0.0.1:9092 --topic=transactions --labels_topic=labels \\
    --reference_dir=data/k/reference
  # all four tiers, the cold one on S3
  txstream run --input data/sample --redis_url=redis://127.0.0.1:6379/0 \\
    --postgres_dsn='host=127.0.0.1 dbname=txstream user=postgres' \\
    --clickhouse_url=clickhouse://127.0.0.1:9000/txstream \\
    --cold_path=s3://decisions/cold --s3_endpoint_url=http://127.0.0.1:9000
  # on Prism, Beam's local portable runner (`txstream services up prism`)
  txstream run --input data/sample --runner=PrismRunner
  # data quality with your own thresholds; a failed suite exits 3 unless --dq_fail_ok
  txstream run --input data/sample --dq_config my-quality.yaml --dq_docs_dir out/data_docs"""

_RERUN_EXAMPLES = """\
examples:
  txstream rerun --of RUN_ID --from 2018-04-15 --to 2018-04-18 --rerun_id april15
  txstream reconcile --left delta:out/cold/decisions --right rerun:april15 --report out/report
  txstream rerun --of RUN_ID --from 2018-04-15T00:00:00+02:00 --to 2018-04-16 --rules new.yaml --promote"""

_STREAM_EXAMPLES = """\
examples:
  # the live hot path in this process, hot tier in Redis, for ten minutes
  txstream stream --bootstrap_servers=127.0.0.1:9092 --topic=transactions --labels_topic=labels \\
    --reference_dir=data/k/reference --redis_url=redis://127.0.0.1:6379/0 --duration_s=600
  # the full streaming graph on a Flink cluster
  txstream stream --runner=FlinkRunner --flink_master=flink-jm:8081 --bootstrap_servers=kafka:9092 \\
    --topic=transactions --labels_topic=labels --reference_dir=gs://bucket/reference"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the examples' line breaks; appends a flag's default where it says something."""
  def _get_help_string(self, action):
    text = action.help or ""
    if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
      return text
    return text + " (default: %(default)s)"


def _beam_runner_flags(group) -> None:
  """The Beam flags a txstream user reaches for first; Beam defines and parses them, this only lists them."""
  group.add_argument("--runner", default="DirectRunner",
                     help="DirectRunner (in this process), PrismRunner, FlinkRunner, PortableRunner, DataflowRunner.")
  group.add_argument("--direct_num_workers", type=int, default=1,
                     help="DirectRunner: parallel workers (0: one per CPU).")
  group.add_argument("--direct_running_mode", default="in_memory",
                     choices=("in_memory", "multi_threading", "multi_processing"),
                     help="DirectRunner: workers as threads sharing this process's memory, or as processes.")
  group.add_argument("--job_endpoint", default=None,
                     help="PortableRunner: job server host:port, or 'embed' to start one here.")
  group.add_argument("--environment_type", default=None,
                     help="Where portable runners run the Python workers: DOCKER, PROCESS, EXTERNAL or LOOPBACK "
                          "(local runners default to LOOPBACK here).")
  group.add_argument("--flink_master", default="[auto]",
                     help="FlinkRunner: JobManager host:port, or [local] for an embedded cluster.")
  group.add_argument("--s3_endpoint_url", default=None,
                     help="S3-compatible endpoint for s3:// paths, e.g. http://127.0.0.1:9000.")
  group.add_argument("--s3_access_key_id", default=None, help="S3 access key.")
  group.add_argument("--s3_secret_access_key", default=None, help="S3 secret key.")
  group.add_argument("--s3_region_name", default=None, help="S3 region.")


def _run_help(command: str = "run"):
  """Help for the Beam-style commands, by concern; their flags are parsed by Beam, not by this parser."""
  import txstream.config.options as o
  from txstream.io.kafka_config import KafkaOptions
  from txstream.lineage import LineageOptions
  from txstream.metrics import MetricsOptions
  from txstream.pipelines.rerun import RerunOptions

  def kafka(group):
    group.add_argument("--bootstrap_servers", default=None,
                       help="Kafka brokers host:port[,...] (with --topic instead of --input).")
    KafkaOptions._add_argparse_args(group)  # pylint: disable=protected-access

  def run_flags(group):
    o.RunOptions._add_argparse_args(group)  # pylint: disable=protected-access
    o.add_progress_flag(group)

  # pylint: disable=protected-access
  groups = {"Source": o.SourceOptions._add_argparse_args, "Kafka": kafka,
            "Features": o.FeatureOptions._add_argparse_args, "Scoring": o.ScoreOptions._add_argparse_args,
            "Tiers": o.TierOptions._add_argparse_args, "Run": run_flags,
            "Rerun": RerunOptions._add_argparse_args, "Live": o.LiveOptions._add_argparse_args,
            "Metrics": MetricsOptions._add_argparse_args, "Lineage": LineageOptions._add_argparse_args,
            "Data quality": o.QualityOptions._add_argparse_args}
  if command == "rerun":
    description = ("Decide the event-time window [--from, --to) again: every transaction before --from is read "
                   "as feature state only, so each one in the window gets the features the original run gave it. "
                   "Reads the cold tier's raw archive (or --input DIR); with --of RUN_ID the model, rules and "
                   "reference data default to the original's, checked unchanged. Writes to the rerun's namespace "
                   "(<cold_path>/reruns/<id>/, PostgreSQL schema rerun_<id>; no hot or analytics tier) unless "
                   "--promote. Progress goes to stderr, the summary JSON to stdout.")
    titles, epilog = (("Rerun", "Source", "Features", "Scoring", "Tiers", "Run", "Data quality", "Metrics", "Lineage"),
                      _RERUN_EXAMPLES)
  elif command == "stream":
    description = ("Run the graph live from Kafka: on the DirectRunner the live hot path (one fused stage, "
                   "feature state in the worker, offsets committed after the tiers), on --runner FlinkRunner/"
                   "DataflowRunner/PrismRunner the full streaming graph. Stops cleanly on Ctrl-C.")
    titles, epilog = ("Source", "Kafka", "Features", "Scoring", "Tiers", "Live", "Data quality", "Metrics"), _STREAM_EXAMPLES
  else:
    description = ("Run the whole graph bounded: read, decode and validate, enrich, features, score, write tiers. "
                   "Progress (events read, decisions, events/s, time left) goes to stderr, the summary JSON to "
                   "stdout.")
    titles, epilog = (("Source", "Kafka", "Features", "Scoring", "Tiers", "Run", "Data quality", "Metrics", "Lineage"),
                      _RUN_EXAMPLES)
  parser = argparse.ArgumentParser(prog=f"txstream {command}", usage="%(prog)s [FLAG ...] [BEAM FLAG ...]",
                                   description=textwrap.fill(description, 100), epilog=epilog,
                                   formatter_class=_HelpFormatter)
  for title in titles:
    groups[title](parser.add_argument_group(title))
  _beam_runner_flags(parser.add_argument_group("Beam runner", textwrap.fill(
      "Standard Apache Beam flags; every other Beam flag (--streaming, --temp_location, --project, "
      "--sdk_worker_parallelism, ...) passes through to the runner as well.", 100)))
  parser.print_help()


def version() -> str:
  """``txstream 0.1.0 (git <commit>), Apache Beam 2.x, Python 3.x``: what a bug report needs to name."""
  import platform
  import apache_beam
  import txstream
  from txstream.pipelines.manifest import code_version
  return (f"txstream {txstream.__version__} (git {code_version() or 'unknown'}), "
          f"Apache Beam {apache_beam.__version__}, Python {platform.python_version()}")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _Redacting) for f in handler.filters):
      handler.addFilter(_Redacting())
  parser = _Parser(prog="txstream", description="Real-time card transaction pipeline on Apache Beam.")
  parser.add_argument("--version", action="store_true", help="Print the txstream, git, Beam and Python versions.")
  sub = parser.add_subparsers(dest="command", metavar="{generate,run,rerun,stream,train,services,reconcile,serve}")
  _generate_parser(sub)
  _run_parser(sub)
  _rerun_parser(sub)
  _stream_parser(sub)
  _train_parser(sub)
  services.add_parser(sub)
  reconcile.add_parser(sub)
  _serve_parser(sub)
  try:
    if not argv or argv[0] in ("-h", "--help"):
      parser.print_help()
      return 0
    if argv[0] == "--version":
      print(version())
      return 0
    if argv[0] == "run":
      if "-h" in argv[1:] or "--help" in argv[1:]:
        _run_help()
        return 0
      return _run(argv[1:])
    if argv[0] == "rerun":
      if "-h" in argv[1:] or "--help" in argv[1:]:
        _run_help("rerun")
        return 0
      return _rerun(argv[1:])
    if argv[0] == "stream":
      if "-h" in argv[1:] or "--help" in argv[1:]:
        _run_help("stream")
        return 0
      return _stream(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
      return _generate(args)
    if args.command == "train":
      return _train(args)
    if args.command == "services":
      return services.run(args)
    if args.command == "reconcile":
      return reconcile.run(args)
    if args.command == "serve":
      return _serve(args)
    raise UsageError(f"unknown command {argv[0]!r}")
  except UsageError as e:
    print(f"txstream: error: {_redact(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("txstream: interrupted", file=sys.stderr)
    return 130


def _config_errors():
  from txstream.models.artifacts import ModelError
  from txstream.pipelines.run import ConfigError
  from txstream.io.sinks import SinkConfigError
  from txstream.core.rules import RulesError
  from txstream.io.kafka_config import KafkaConfigError
  from txstream.runners.profiles import RunnerError
  return (ConfigError, ModelError, RulesError, SinkConfigError, KafkaConfigError, RunnerError)


def _pipeline_command(argv, execute) -> int:
  """Parses Beam-style flags, runs ``execute(options)`` and prints its summary.

  Config mistakes are one line (exit 2). A run that fails once started (a
  store down past its retry deadline, a worker crash) is one line too, with
  the root cause's first line and the path of a file holding the full
  traceback (exit 1): nothing of it was committed (cold table version, Kafka
  offsets), so the same command can simply be run again.
  """
  options = pipeline_options(argv)
  try:
    summary = execute(options)
  except _config_errors() as e:
    raise UsageError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    print(f"txstream: error: the run failed: {_redact(_root_cause(e))} (full traceback: {_save_traceback()}); "
          "nothing was committed: run the same command again once the cause is fixed", file=sys.stderr)
    return 1
  print(json.dumps(summary, indent=2, sort_keys=True))
  return _quality_status(summary, options)


def _quality_status(summary: dict, options) -> int:
  """3 when the run's data-quality validation failed (its decisions are written all the same), else 0."""
  from txstream.config.options import QualityOptions
  quality = summary.get("data_quality") or {}
  if quality.get("success", True) or options.view_as(QualityOptions).dq_fail_ok:
    return 0
  failed = [f"{s['suite']}: {f.get('column') or f['expectation']}" for s in quality.get("suites", [])
            for f in s["failed"]]
  what = quality.get("error") or (", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else ""))
  if "windows_failed" in quality:  # a live run: its windows
    what = f"{quality['windows_failed']} of {quality['windows_validated']} live windows failed"
  print(f"txstream: error: data quality failed ({_redact(what)}); the decisions are written; "
        f"see {quality.get('docs') or 'the summary'} (--dq_fail_ok to exit 0)", file=sys.stderr)
  return 3


def _root_cause(error: BaseException) -> str:
  """The first line of the innermost error's message (Beam wraps a worker's error in its own)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip()
  # A runner's error holds the worker's traceback as text: its last line names the original error.
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  last = next((line for line in reversed(lines) if ": " in line and not line.startswith("File ")), None)
  return (last or (lines[0] if lines else type(error).__name__))[:500]


def _save_traceback() -> str:
  import tempfile
  import traceback
  with tempfile.NamedTemporaryFile("w", prefix="txstream-failure-", suffix=".log", delete=False,
                                   encoding="utf-8") as f:
    f.write(_redact(traceback.format_exc()))
  return f.name


def _run(argv) -> int:
  from txstream.pipelines import run as run_lib
  return _pipeline_command(argv, lambda options: run_lib.run(options=options))


def _rerun(argv) -> int:
  from txstream.pipelines import rerun as rerun_lib
  return _pipeline_command(argv, rerun_lib.rerun)


def _stream(argv) -> int:
  from txstream.pipelines import stream as stream_lib
  logging.getLogger("txstream").setLevel(logging.INFO)
  return _pipeline_command(argv, stream_lib.stream)


def _generate(args) -> int:
  from txstream.pipelines import generate as gen
  try:
    manifest = gen.generate(args.out, args.customers, args.terminals, args.days, args.start, args.seed,
                            args.schema_version, args.corrupt_fraction, args.legacy_extract)
  except ValueError as e:
    raise UsageError(str(e)) from e
  except OSError as e:
    raise UsageError(f"cannot write {args.out}: {e.strerror}") from e
  if args.bootstrap_servers or args.topic:
    if not (args.bootstrap_servers and args.topic):
      raise UsageError("producing to Kafka needs both --bootstrap_servers and --topic")
    try:
      manifest["produced"] = gen.produce_to_kafka(args.out, args.bootstrap_servers, args.topic, args.labels_topic,
                                                  args.partitions, args.rate)
    except ValueError as e:
      raise UsageError(str(e)) from e
  print(json.dumps(manifest, indent=2, sort_keys=True))
  return 0


def _train(args) -> int:
  from txstream.models import train as train_lib
  if args.protocol == "split" and (args.select or args.feature_sets != "all"):
    raise UsageError("--select and --feature_sets apply to --protocol handbook only")
  if args.protocol == "handbook" and (args.train_days is not None or args.test_days != 7 or args.delay_days != 7):
    raise UsageError("--protocol handbook uses the book's weeks; --train_days/--test_days/--delay_days do not apply")
  try:
    params = json.loads(args.params) if args.params else None
  except ValueError as e:
    raise UsageError(f"--params: not JSON: {args.params!r}") from e
  if params is not None and not isinstance(params, dict):
    raise UsageError(f"--params: not a JSON object: {args.params!r}")
  try:
    if args.protocol == "handbook":
      metrics = train_lib.train_handbook(args.input, args.model_dir, seed=args.seed, params=params,
                                         feature_sets=[s for s in args.feature_sets.split(",") if s],
                                         select=args.select)
    else:
      metrics = train_lib.train(args.input, args.model_dir, train_days=args.train_days, test_days=args.test_days,
                                delay_days=args.delay_days, seed=args.seed, params=params)
  except _config_errors() + (ValueError,) as e:
    raise UsageError(str(e)) from e
  text = json.dumps(metrics, indent=2, sort_keys=True)
  if args.metrics_json:
    try:
      with open(args.metrics_json, "w", encoding="utf-8") as f:
        f.write(text)
    except OSError as e:
      raise UsageError(f"cannot write {args.metrics_json}: {e.strerror}") from e
  print(text)
  return 0


# -- serve -------------------------------------------------------------------------------------------------------

_SERVE_EXAMPLES = """\
examples:
  # every tier, on this machine only
  txstream serve --port 8080 --postgres_dsn='host=127.0.0.1 dbname=txstream user=postgres' \\
    --clickhouse_url=clickhouse://127.0.0.1:9000/txstream --redis_url=redis://127.0.0.1:6379/0 \\
    --cold_path=s3://decisions/cold --s3_endpoint_url=http://127.0.0.1:9000
  curl -s localhost:8080/sql -H 'content-type: application/json' \\
    -d '{"sql": "SELECT decision, count(*) FROM decisions WHERE event_date >= current_date - 1 GROUP BY 1"}'
  # on the network, with an API key (read from the environment, never a flag)
  TXSTREAM_API_KEY=$(cat key) txstream serve --host 0.0.0.0 --auth --postgres_dsn=..."""


def _serve_parser(sub):
  import os
  from txstream.config.options import DEFAULT_OUT
  p = sub.add_parser("serve", help="Serve read-only SQL over every tier, decision lookups and the dashboard.",
                     description=textwrap.fill(
                         "A read-only SQL HTTP API over the logical tables decisions (ClickHouse for recent event "
                         "times, the cold Delta table for older ones), decisions_per_minute (ClickHouse) and the "
                         "operational tables dead_letters, runs, dq_results, dashboards (PostgreSQL); decision "
                         "lookups from Redis with PostgreSQL behind it; the dashboard. OpenAPI at /docs.", 100),
                     epilog=_SERVE_EXAMPLES, formatter_class=_HelpFormatter)
  server = p.add_argument_group("Server")
  server.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
  server.add_argument("--port", type=int, default=8080, help="Port to listen on.")
  server.add_argument("--auth", action="store_true",
                      help="Require the API key in env TXSTREAM_API_KEY (Authorization: Bearer <key> or X-API-Key).")
  tiers = p.add_argument_group("Tiers", "As `txstream run` takes them; a tier not given is off.")
  tiers.add_argument("--postgres_dsn", default=None, help="Warm tier and operational tables.")
  tiers.add_argument("--clickhouse_url", default=None,
                     help="Analytics tier, e.g. clickhouse://127.0.0.1:9000/txstream.")
  tiers.add_argument("--redis_url", default=None, help="Hot tier, e.g. redis://127.0.0.1:6379/0.")
  tiers.add_argument("--cold_path", default=os.path.join(DEFAULT_OUT, "cold"),
                     help="Cold tier root (local folder or s3://bucket/prefix); its Delta table is decisions/.")
  tiers.add_argument("--no_cold", action="store_true", help="Do not read the cold tier.")
  for flag, text in (("--s3_endpoint_url", "S3-compatible endpoint for an s3:// --cold_path."),
                     ("--s3_access_key_id", "S3 access key."), ("--s3_secret_access_key", "S3 secret key."),
                     ("--s3_region_name", "S3 region.")):
    tiers.add_argument(flag, default=None, help=text)
  queries = p.add_argument_group("Queries")
  queries.add_argument("--clickhouse_retention_days", type=int, default=90,
                       help="ClickHouse holds decisions this many days back; older history is read from the cold tier.")
  queries.add_argument("--row_limit", type=int, default=10_000, help="Most rows a query returns.")
  queries.add_argument("--query_timeout_s", type=float, default=30.0, help="Longest a query may run, in seconds.")


def _serve(args) -> int:
  import os
  from txstream.io import cold_table
  from txstream.io.sinks import SinkConfigError
  from txstream.serve.config import API_KEY_ENV, ServeConfig
  api_key = os.environ.get(API_KEY_ENV) if args.auth else None
  if args.auth and not (api_key or "").strip():
    raise UsageError(f"--auth needs the API key in the environment variable {API_KEY_ENV}")
  if not 0 < args.port < 65536:
    raise UsageError(f"--port {args.port}: not a port number")
  s3 = [f"--{k}={getattr(args, k)}" for k in ("s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key",
                                              "s3_region_name") if getattr(args, k)]
  try:
    config = ServeConfig(postgres_dsn=args.postgres_dsn, clickhouse_url=args.clickhouse_url,
                         redis_url=args.redis_url, cold_path=None if args.no_cold else args.cold_path,
                         storage_options=cold_table.storage_options(PipelineOptions(s3)) if s3 else {},
                         clickhouse_retention_days=args.clickhouse_retention_days, row_limit=args.row_limit,
                         query_timeout_s=args.query_timeout_s, api_key=api_key)
  except ValueError as e:
    raise UsageError(str(e)) from e
  logging.getLogger("txstream").setLevel(logging.INFO)
  from txstream.serve import app as app_lib
  warning = app_lib.listen_warning(args.host, args.auth)
  if warning:
    _LOGGER.warning("%s", warning)
  try:
    app = app_lib.create_app(config)
  except _config_errors() + (SinkConfigError,) as e:
    raise UsageError(str(e)) from e
  import uvicorn
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
  return 0


def console_main() -> int:
  """The ``txstream`` executable: ``main``, then the process ends even if a Beam thread was left running.

  ``txstream stream`` stops on SIGINT (Ctrl-C, or its own ``--duration_s``
  timer). When the interrupt lands inside Beam's bundle start, the state
  sampler's thread (not a daemon) can be left running after the summary is
  printed and the offsets committed, and the interpreter would wait for it
  forever. Once ``main`` has returned nothing is left to do: the process exits
  with its status whatever threads remain. Only the executable does this;
  ``main`` called from Python returns as usual.
  """
  import os
  import threading
  code = main()
  leftover = [t.name for t in threading.enumerate()
              if t is not threading.main_thread() and t.is_alive() and not t.daemon]
  if leftover:
    _LOGGER.debug("exiting with threads still running: %s", ", ".join(leftover))
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
  return code


if __name__ == "__main__":
  sys.exit(console_main())
