"""``txstream rerun``: decide a historical event-time window again, into its own namespace.

The window is ``[--from, --to)`` in event time, UTC (a date means its
midnight; a time with an offset is converted). Every transaction of the input
(the production cold tier's raw archive, ``io.raw_archive``, unless
``--input DIR`` is given) is read; those before ``--from`` are feature state only and those from
``--to`` on are dropped (``transforms.validate.EventWindow``), so each
transaction in the window gets the features the original run gave it.

``--of RUN_ID`` names the original run: its manifest
(``<cold_path>/manifests/RUN_ID.json``) supplies the model, rules and
reference data (and the input directory when there is no archive), and the rerun refuses to start if any of them
changed since (their hashes are in the manifest) unless given explicitly, in
which case the manifest records what differed.

Output goes to the rerun's namespace, never to production, unless
``--promote``: the cold table under ``<cold_path>/reruns/<rerun_id>/``, dead
letters under ``<dead_letter_path>/reruns/<rerun_id>/``, PostgreSQL schema
``rerun_<rerun_id>`` (its own ``decisions``, ``dead_letters``, ...), no hot or
analytics tier. The rerun's manifest goes beside its cold table and into the
production ``runs`` table (kind ``rerun``). With ``--promote`` the rerun
writes the production tiers as a run does: the cold table MERGEs it as a new
version (the one before stays readable by time travel), the other tiers
upsert it.
"""
import datetime
import re
import time
from typing import Optional, Tuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.config.options import ScoreOptions, SourceOptions, TierOptions
from txstream.core import contracts
from txstream.io.kafka_config import KafkaOptions
from txstream.pipelines import manifest as manifest_lib
from txstream.pipelines.graph import Sources
from txstream.pipelines.run import (ConfigError, check_config, check_reference, check_scoring_and_runner,
                                   execute)

RERUNS = "reruns"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


class RerunOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--from", dest="window_from", default=None, metavar="TIME",
                        help="Start of the event-time window, inclusive: YYYY-MM-DD or ISO-8601 time (UTC unless "
                             "it has an offset).")
    parser.add_argument("--to", dest="window_to", default=None, metavar="TIME",
                        help="End of the event-time window, exclusive (same formats).")
    parser.add_argument("--of", dest="rerun_of", default=None, metavar="RUN_ID",
                        help="The original run: its manifest supplies the model, rules and reference data (each "
                             "checked unchanged), and the input directory when there is no raw archive.")
    parser.add_argument("--rerun_id", default=None,
                        help="Name of the rerun's namespace (letters, digits, - and _; default rerun-<time>).")
    parser.add_argument("--promote", action="store_true", default=False,
                        help="Write the production tiers instead of the rerun's namespace.")


def parse_time(text: str, flag: str) -> int:
  """UTC epoch milliseconds of a date (its midnight, UTC) or an ISO-8601 time."""
  try:
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
  except ValueError as e:
    raise ConfigError(f"{flag} {text!r}: not a date or ISO-8601 time") from e
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return int(moment.timestamp() * 1000)


def namespace_dsn(dsn: str, schema: str) -> str:
  """The DSN with ``search_path`` set to ``schema`` (created if need be): the rerun's own tables."""
  import psycopg2.extensions
  from txstream.io.postgres_sink import connect
  conn = connect(dsn)
  try:
    with conn, conn.cursor() as cur:
      cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
  finally:
    conn.close()
  return psycopg2.extensions.make_dsn(dsn, options=f"-csearch_path={schema}")


def _defaults_from(original: dict, options) -> dict:
  """Fills model, rules and reference data from the original's manifest; returns what was overridden."""
  src, score = options.view_as(SourceOptions), options.view_as(ScoreOptions)
  overridden = {}
  if score.model_dir is None:
    score.model_dir = None if original["model"]["dir"] == "bundled" else original["model"]["dir"]
  else:
    overridden["model"] = score.model_dir
  if score.rules is None:
    score.rules = None if original["rules"]["path"] == "bundled" else original["rules"]["path"]
  else:
    overridden["rules"] = score.rules
  if src.reference_dir is None:
    src.reference_dir = original["reference"]["dir"]
  else:
    overridden["reference"] = src.reference_dir
  return overridden


def _check_unchanged(original: dict, options, overridden: dict) -> None:
  """Refuses a rerun whose model, rules or reference data silently differ from the original's."""
  from txstream.core.rules import load_rules
  from txstream.models.artifacts import load_metadata
  from txstream.transforms.enrich import load_reference
  src, score = options.view_as(SourceOptions), options.view_as(ScoreOptions)
  now = {"model": load_metadata(score.model_dir, contracts.FEATURE_NAMES)["version"],
         "rules": load_rules(score.rules).version,
         "reference": load_reference(src.reference_dir).version}
  flag = {"model": "--model_dir", "rules": "--rules", "reference": "--reference_dir"}
  for part, version in now.items():
    if part not in overridden and version != original[part]["version"]:
      raise ConfigError(f"the {part} of run {original['run_id']} was {original[part]['version']}, now {version}: "
                        f"restore it or give {flag[part]} explicitly")


def _namespace(options, rerun_id: str) -> Tuple[dict, Optional[str]]:
  """Points the tiers at the rerun's namespace; returns it and the DSN of the production ``runs`` table."""
  tiers = options.view_as(TierOptions)
  runs_dsn = tiers.postgres_dsn
  space = {}
  if tiers.cold_path and not tiers.no_cold:
    tiers.cold_path = space["cold_path"] = FileSystems.join(tiers.cold_path, RERUNS, rerun_id)
  if tiers.dead_letter_path:
    tiers.dead_letter_path = space["dead_letter_path"] = FileSystems.join(tiers.dead_letter_path, RERUNS, rerun_id)
  if tiers.postgres_dsn:
    space["postgres_schema"] = schema = "rerun_" + rerun_id.lower().replace("-", "_")
    tiers.postgres_dsn = namespace_dsn(tiers.postgres_dsn, schema)
  tiers.redis_url = tiers.clickhouse_url = None  # serving tiers hold production decisions only
  return space, runs_dsn


def rerun(options: PipelineOptions) -> dict:
  """Runs the window again and returns its summary (``run_id`` is the rerun id; ``namespace`` says where)."""
  flags = options.view_as(RerunOptions)
  if not flags.window_from or not flags.window_to:
    raise ConfigError("--from and --to are required (event time, UTC; the window is [from, to))")
  window = (parse_time(flags.window_from, "--from"), parse_time(flags.window_to, "--to"))
  if window[0] >= window[1]:
    raise ConfigError(f"--to {flags.window_to} must be after --from {flags.window_from}")
  if options.view_as(KafkaOptions).topic:
    raise ConfigError("a rerun reads files (--input DIR, or the original run's input with --of); not --topic")
  rerun_id = flags.rerun_id or time.strftime("rerun-%Y%m%dT%H%M%SZ", time.gmtime())
  if not _ID.match(rerun_id):
    raise ConfigError(f"--rerun_id {rerun_id!r}: use 1-48 letters, digits, - and _")
  tiers = options.view_as(TierOptions)
  original, overridden = None, {}
  if flags.rerun_of:
    try:
      original = manifest_lib.read(tiers.cold_path, flags.rerun_of)
    except FileNotFoundError as e:
      raise ConfigError(str(e)) from e
    overridden = _defaults_from(original, options)
  sources = _source(options, window, original)
  if original is not None:
    _check_unchanged(original, options, overridden)
  space, runs_dsn = ({}, None) if flags.promote else _namespace(options, rerun_id)
  extra = {"rerun_of": flags.rerun_of, "promoted": flags.promote, "namespace": space or "production",
           "overridden": overridden}
  if sources.archive is not None:
    extra["archive"] = {"root": sources.archive[0], "versions": _archive_versions(sources.archive[0], options)}
  return execute(options, rerun_id, kind="rerun", window=window, manifest_extra=extra, runs_dsn=runs_dsn,
                 sources=sources)


def _source(options, window: Tuple[int, int], original: Optional[dict]) -> Sources:
  """``--input DIR`` when given; else the production raw archive; else the original's input directory."""
  src, tiers = options.view_as(SourceOptions), options.view_as(TierOptions)
  if not src.input:
    if _archive_versions(tiers.cold_path, options):
      if not src.reference_dir:
        raise ConfigError("a rerun from the raw archive needs --reference_dir DIR (or --of RUN_ID)")
      check_scoring_and_runner(options)
      check_reference(options, src.reference_dir)
      return Sources(archive=(tiers.cold_path, window[1]))
    src.input = ((original or {}).get("source") or {}).get("input")
    if not src.input:
      raise ConfigError(f"no raw archive under {tiers.cold_path} and no input directory: give --input DIR")
  check_config(options)
  return Sources()


def _archive_versions(root: str, options) -> dict:
  """{table: version} of the raw archive under the cold root; empty when there is none."""
  from deltalake import DeltaTable
  from txstream.io import cold_table, raw_archive
  storage = cold_table.storage_options(options)
  out = {}
  for table in (raw_archive.TRANSACTIONS, raw_archive.LABELS):
    uri = FileSystems.join(root, table)
    if DeltaTable.is_deltatable(uri, storage_options=storage):
      out[table] = DeltaTable(uri, storage_options=storage).version()
  return out
