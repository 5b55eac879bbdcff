"""Pipeline options, one ``PipelineOptions`` subclass per concern.

Standard Beam flags (``--runner``, ``--direct_num_workers``, ``--streaming``,
...) pass straight through; these add txstream's own. Read them with
``options.view_as(SourceOptions)`` and so on.
"""
import os

from apache_beam.options.pipeline_options import PipelineOptions

DEFAULT_OUT = "out"


class SourceOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--input", default=None,
                        help="Directory written by `txstream generate` (transactions/, labels/, reference/).")
    parser.add_argument("--schema_registry_url", default=None,
                        help="Confluent-compatible schema registry; default: the schemas bundled in the package.")
    parser.add_argument("--reference_dir", default=None,
                        help="Reference data directory (customers.avro, terminals.avro); default: INPUT/reference.")


class FeatureOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--allowed_lateness_s", type=int, default=3600,
                        help="Events later than this behind the watermark go to dead letters as 'late'.")
    parser.add_argument("--terminal_delay_days", type=int, default=7,
                        help="Delay d of the terminal risk windows (labels take time to become known).")


class ScoreOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--model_dir", default=None,
                        help="Model artifact directory (model.json + metadata.json); default: the bundled model.")
    parser.add_argument("--rules", default=None,
                        help="Rules YAML file; default: the bundled rules.")
    parser.add_argument("--model_watch_pattern", default=None,
                        help="`txstream stream` only: watch this glob (e.g. gs://models/*/model.json) and switch "
                             "to each new model artifact, once verified, without a restart.")


class TierOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    # s3:// paths use Beam's own S3 flags (--s3_endpoint_url, --s3_access_key_id, ...).
    parser.add_argument("--cold_path", default=os.path.join(DEFAULT_OUT, "cold"),
                        help="Cold tier root (local folder or s3://bucket/prefix); Parquet under decisions/.")
    parser.add_argument("--dead_letter_path", default=os.path.join(DEFAULT_OUT, "dead_letters"),
                        help="Folder for dead-letter JSON lines files.")
    parser.add_argument("--redis_url", default=None, help="Hot tier, e.g. redis://127.0.0.1:6379/0.")
    parser.add_argument("--postgres_dsn", default=None,
                        help="Warm tier, e.g. 'host=127.0.0.1 dbname=txstream user=postgres'.")
    parser.add_argument("--clickhouse_url", default=None,
                        help="Analytics tier, e.g. clickhouse://127.0.0.1:9000/txstream.")
    parser.add_argument("--no_cold", action="store_true", default=False,
                        help="Do not write the cold tier.")
    parser.add_argument("--no_raw_archive", action="store_true", default=False,
                        help="Do not archive the accepted input messages in the cold tier (raw/, raw_labels/); "
                             "a rerun then needs the original input.")


class QualityOptions(PipelineOptions):
  """Data quality (``txstream.quality``): the Great Expectations suites every run is validated with."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--dq_config", default=None,
                        help="Data-quality thresholds (YAML; default: the bundled txstream/config/quality.yaml).")
    parser.add_argument("--dq_fail_ok", action="store_true", default=False,
                        help="Exit 0 when a data-quality suite fails (default: exit 3; the decisions are written "
                             "either way).")
    parser.add_argument("--dq_docs_dir", default=None,
                        help="Folder of the data-docs pages: <run_id>.html per run (stream: per live run, "
                             "rewritten each window) and index.html (default: data_docs/ beside a local "
                             "--cold_path, else out/data_docs).")
    parser.add_argument("--no_dq", action="store_true", default=False,
                        help="Do not validate data quality (the summary's data_quality says so).")


def dq_docs_dir(options) -> str:
  """Where the data-docs pages go: ``--dq_docs_dir``, else beside a local cold tier, else ``out/data_docs``."""
  flag = options.view_as(QualityOptions).dq_docs_dir
  if flag:
    return flag
  tiers = options.view_as(TierOptions)
  if tiers.cold_path and not tiers.no_cold and "://" not in tiers.cold_path:
    return os.path.join(os.path.dirname(os.path.abspath(tiers.cold_path)), "data_docs")
  return os.path.join(DEFAULT_OUT, "data_docs")


class RunOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--summary_json", default=None, help="Write the run summary here (also printed).")


def add_progress_flag(parser) -> None:
  """``--progress_interval_s``, read by ``run``, ``rerun`` and ``stream`` through ``LiveOptions``.

  Beam parses every options class's flags with one parser, so a flag is
  defined by one class only; ``txstream run --help`` lists it under Run.
  """
  parser.add_argument("--progress_interval_s", type=float, default=10.0,
                      help="Seconds between progress lines on stderr. run/rerun: events read, decisions, "
                           "events/s and time left (0: none); stream: decisions/s and produce-to-decision "
                           "latency (must be positive).")


class LiveOptions(PipelineOptions):
  """``txstream stream`` only, except ``--progress_interval_s`` (see ``add_progress_flag``)."""
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--duration_s", type=float, default=None,
                        help="Stop after this many seconds, as Ctrl-C would (default: run until stopped).")
    parser.add_argument("--warmup", default="history", choices=("history", "none"),
                        help="history: rebuild the feature state from the topics' records below the committed "
                             "offsets before deciding (default); none: start with empty state.")
    add_progress_flag(parser)
    parser.add_argument("--live_batch_size", type=int, default=2000,
                        help="Fetch and decide at most this many records of a partition at a time (each fetch "
                             "is decided as soon as it arrives).")
    parser.add_argument("--live_checkpoint_ms", type=int, default=20,
                        help="The reader ends a bundle (sinks flush, offsets commit) at least this often "
                             "per partition.")
