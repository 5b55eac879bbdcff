"""OpenLineage run events for ``txstream run`` and ``rerun``: which inputs made which outputs, with what versions.

A run's manifest (``pipelines.manifest``) already names everything that made
its output; this module restates it in OpenLineage's vocabulary so a lineage
server (Marquez, DataHub, ...) can join txstream runs with the jobs around
them. One event per state change: ``START`` after the first manifest record,
then ``COMPLETE`` (with row counts per output) or ``FAIL`` (with the error).

Events are built with the ``openlineage.client`` classes, whose validators
check what the spec requires (a UUID ``runId``, an ISO-8601 ``eventTime``),
and serialised with its ``Serde``. They go to ``--openlineage_file`` (one JSON
event per line, appended) and/or are posted to ``<--openlineage_url>/api/v1/lineage``.
Emitting is best effort: lineage must never fail or slow down a run, so a
failure logs one WARNING line.

No password reaches an event: every target is passed through ``sinks.redact``
and PostgreSQL DSNs are reduced to host, port and database.
"""
import json
import logging
import os
import urllib.parse
import urllib.request
import uuid
from typing import List, Optional

import attr
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.version import __version__ as beam_version
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (RunFacet, error_message_run, output_statistics_output_dataset,
                                         processing_engine_run, schema_dataset, source_code_location_job)
from openlineage.client.serde import Serde

import txstream
from txstream.io.sinks import redact

_LOGGER = logging.getLogger(__name__)

NAMESPACE = "txstream"
# URNs, not URLs: the project publishes no web page for them. Both are valid URIs, as the spec asks.
PRODUCER = f"urn:txstream:{txstream.__version__}"
_FACET_SCHEMA = "urn:txstream:facet:TxstreamRunFacet:1"
_API_PATH = "/api/v1/lineage"
_TIMEOUT_S = 10
# The API key is a secret: it comes from the environment only, never from a flag (flags land in manifests and ps).
API_KEY_ENV = "OPENLINEAGE_API_KEY"
# Stable namespace for uuid5 of run ids that are not UUIDs (reruns), so a rerun's events share one runId.
_RUN_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:txstream:run")


class LineageOptions(PipelineOptions):
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--openlineage_url", default=None,
                        help="Post OpenLineage run events to <url>/api/v1/lineage (API key from the "
                             f"{API_KEY_ENV} environment variable).")
    parser.add_argument("--openlineage_file", default=None,
                        help="Append OpenLineage run events to this file, one JSON event per line.")


@attr.define
class TxstreamVersionsRunFacet(RunFacet):
  """What a rerun must reuse to reproduce the run; ``originalRunId`` keeps an id the runId had to hash."""
  originalRunId: str  # pylint: disable=invalid-name
  kind: str
  packageVersion: Optional[str] = attr.field(default=None)  # pylint: disable=invalid-name
  gitCommit: Optional[str] = attr.field(default=None)  # pylint: disable=invalid-name
  model: Optional[dict] = attr.field(default=None)
  rules: Optional[dict] = attr.field(default=None)
  reference: Optional[dict] = attr.field(default=None)
  schemas: Optional[list] = attr.field(factory=list)
  window: Optional[dict] = attr.field(default=None)
  rerunOf: Optional[str] = attr.field(default=None)  # pylint: disable=invalid-name

  @staticmethod
  def _get_schema() -> str:
    return _FACET_SCHEMA + "#/$defs/TxstreamVersionsRunFacet"


def run_uuid(run_id: str) -> str:
  """``run_id`` if it is a UUID, else a uuid5 of it: the same id always maps to the same runId."""
  try:
    return str(uuid.UUID(run_id))
  except ValueError:
    return str(uuid.uuid5(_RUN_ID_NAMESPACE, run_id))


def _host_port(netloc: str, default_port: int) -> str:
  host = netloc.rsplit("@", 1)[-1]
  return host if ":" in host.rsplit("]", 1)[-1] else f"{host}:{default_port}"


def _path_dataset(path: str):
  """(namespace, name) of a local or object-store path, as OpenLineage names files."""
  parsed = urllib.parse.urlparse(path)
  if parsed.scheme and parsed.netloc:
    return f"{parsed.scheme}://{parsed.netloc}", parsed.path.lstrip("/")
  return "file", os.path.abspath(path)


def _postgres_dataset(dsn: str):
  from psycopg2.extensions import parse_dsn
  params = parse_dsn(dsn)
  host, port = params.get("host", "localhost"), params.get("port", "5432")
  return f"postgres://{host}:{port}", f"{params.get('dbname', params.get('user', 'postgres'))}.public.decisions"


def _url_dataset(url: str, default_port: int, table: str):
  parsed = urllib.parse.urlparse(redact(url))
  database = parsed.path.strip("/") or "default"
  return f"{parsed.scheme}://{_host_port(parsed.netloc, default_port)}", f"{database}.{table}" if table else database


def _avro_type(avro) -> str:
  if isinstance(avro, list):
    return "|".join(_avro_type(t) for t in avro)
  if isinstance(avro, dict):
    return avro.get("logicalType") or _avro_type(avro["type"])
  return str(avro)


def _schema_facets() -> dict:
  """{stream: SchemaDatasetFacet} of each stream's newest registered schema (the one readers resolve to)."""
  from txstream.io.schema_registry import FileSchemaRegistry
  registry = FileSchemaRegistry()
  newest = {}
  for entry in registry.entries():
    stream = (entry.get("subject") or "").removesuffix("-value")
    if entry.get("version", 0) >= newest.get(stream, {}).get("version", 0):
      newest[stream] = entry
  facets = {}
  for stream, entry in newest.items():
    fields = json.loads(registry.schema_json(entry["id"]))["fields"]
    facets[stream] = schema_dataset.SchemaDatasetFacet(
        fields=[schema_dataset.SchemaDatasetFacetFields(name=f["name"], type=_avro_type(f["type"]),
                                                        description=f.get("doc"), ordinal_position=i)
                for i, f in enumerate(fields, 1)],
        producer=PRODUCER)
  return facets


def _inputs(manifest: dict, bootstrap_servers: Optional[str]) -> List[InputDataset]:
  """One dataset per input file or Kafka topic; Kafka partitions of one topic are one dataset."""
  kafka_ns = "kafka://" + (bootstrap_servers or "unknown").split(",")[0].strip()
  schemas = _schema_facets()
  seen, out = set(), []
  for item in manifest.get("inputs") or []:
    key = (kafka_ns, item["topic"]) if "topic" in item else _path_dataset(item["path"])
    if key not in seen:
      seen.add(key)
      schema = schemas.get(item.get("stream"))
      out.append(InputDataset(namespace=key[0], name=key[1], facets={"schema": schema} if schema else {}))
  return out


def _outputs(manifest: dict, options: PipelineOptions, complete: bool) -> List[OutputDataset]:
  """The decision tables the options configure, with row counts from the summary on COMPLETE."""
  from txstream.config.options import TierOptions
  from txstream.io.cold_table import table_path
  tiers = options.view_as(TierOptions)
  targets = []
  if tiers.cold_path and not tiers.no_cold:
    targets.append(("cold", _path_dataset(redact(table_path(tiers.cold_path)))))
  if tiers.redis_url:
    targets.append(("hot", _url_dataset(tiers.redis_url, 6379, "")))
  if tiers.postgres_dsn:
    targets.append(("warm", _postgres_dataset(tiers.postgres_dsn)))
  if tiers.clickhouse_url:
    targets.append(("analytics", _url_dataset(tiers.clickhouse_url, 9000, "decisions")))
  counts = ((manifest.get("summary") or {}).get("tiers") or {}) if complete else {}
  out = []
  for tier, (namespace, name) in targets:
    facets = ({"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=counts[tier], producer=PRODUCER)} if tier in counts else {})
    out.append(OutputDataset(namespace=namespace, name=name, outputFacets=facets))
  return out


def _run_facets(manifest: dict, state: RunState) -> dict:
  code = manifest.get("code") or {}
  facets = {
      "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
          version=beam_version, name="Apache Beam", openlineageAdapterVersion=txstream.__version__,
          producer=PRODUCER),
      "txstream_versions": TxstreamVersionsRunFacet(
          originalRunId=manifest["run_id"], kind=manifest.get("kind", "run"),
          packageVersion=code.get("package_version"), gitCommit=code.get("git_commit"),
          model=manifest.get("model"), rules=manifest.get("rules"), reference=manifest.get("reference"),
          schemas=manifest.get("schemas") or [], window=manifest.get("window"),
          rerunOf=manifest.get("rerun_of"), producer=PRODUCER),
  }
  if state == RunState.FAIL:
    facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
        message=redact(manifest.get("error") or "unknown error"), programmingLanguage="python",
        producer=PRODUCER)
  return facets


def _job_facets(manifest: dict) -> dict:
  commit = (manifest.get("code") or {}).get("git_commit")
  if not commit:
    return {}
  return {"sourceCodeLocation": source_code_location_job.SourceCodeLocationJobFacet(
      type="git", url=PRODUCER, version=commit, producer=PRODUCER)}


def event(event_type: str, manifest: dict, options: PipelineOptions) -> dict:
  """A validated OpenLineage RunEvent (as a JSON-ready dict) for ``START``, ``COMPLETE`` or ``FAIL`` of a run.

  The event time is the manifest's ``started_at`` for START and ``finished_at``
  otherwise, so a replayed manifest yields the same event.
  """
  state = RunState(event_type)
  servers = options.get_all_options(retain_unknown_options=True).get("bootstrap_servers")
  when = manifest["started_at"] if state == RunState.START else manifest.get("finished_at") or manifest["started_at"]
  run_event = RunEvent(
      eventType=state, eventTime=when, producer=PRODUCER,
      run=Run(runId=run_uuid(manifest["run_id"]), facets=_run_facets(manifest, state)),
      job=Job(namespace=NAMESPACE, name=f"txstream.{manifest.get('kind', 'run')}", facets=_job_facets(manifest)),
      inputs=_inputs(manifest, servers),
      outputs=_outputs(manifest, options, state == RunState.COMPLETE))
  return Serde.to_dict(run_event)


def _post(url: str, body: bytes) -> None:
  headers = {"Content-Type": "application/json"}
  key = os.environ.get(API_KEY_ENV)
  if key:
    headers["Authorization"] = f"Bearer {key}"
  request = urllib.request.Request(url.rstrip("/") + _API_PATH, data=body, headers=headers, method="POST")
  with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
    response.read()


def emit(event_dict: dict, options: PipelineOptions) -> None:
  """Appends the event to ``--openlineage_file`` and posts it to ``--openlineage_url``; never raises.

  Not retried: a lost event leaves a gap in the lineage server, never in the
  run's output, and the manifest still holds everything the event said.
  """
  flags = options.view_as(LineageOptions)
  line = json.dumps(event_dict, sort_keys=True)
  if flags.openlineage_file:
    try:
      with open(flags.openlineage_file, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    except OSError as e:
      _LOGGER.warning("OpenLineage %s event not written to %s: %s", event_dict.get("eventType"),
                      flags.openlineage_file, e)
  if flags.openlineage_url:
    try:
      _post(flags.openlineage_url, line.encode())
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors; a bad URL is a ValueError.
      _LOGGER.warning("OpenLineage %s event not posted to %s: %s", event_dict.get("eventType"),
                      redact(flags.openlineage_url), " ".join(str(e).split()))


def emit_run_event(event_type: str, manifest: dict, options: PipelineOptions) -> None:
  """``event`` then ``emit``, if any lineage target is set; a manifest the client rejects logs a WARNING."""
  flags = options.view_as(LineageOptions)
  if not (flags.openlineage_file or flags.openlineage_url):
    return
  try:
    built = event(event_type, manifest, options)
  except (ValueError, KeyError, TypeError, OSError) as e:
    _LOGGER.warning("OpenLineage %s event not built for run %s: %s", event_type, manifest.get("run_id"), e)
    return
  emit(built, options)
