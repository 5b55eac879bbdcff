"""Integration tests talk to the real local servers, started on demand by ``txstream.services``.

A test asks for what it needs: ``services.require("kafka")`` returns that server's
``Endpoint`` (several names return a dict by name). A server that already answers
is reused; a missing one is installed and started as ours and left running after
the session, so the next session reuses it. A server that cannot be started fails
the test that needed it, with the one-line reason; it is never skipped.
"""
import collections
import uuid

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from txstream import services as local_services

S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region_name": "us-east-1"}

S3Bucket = collections.namedtuple("S3Bucket", "endpoint_url bucket options")


class Services:
  """Starts servers once per session and remembers their endpoints."""

  def __init__(self):
    self._endpoints = {}

  def require(self, *names: str):
    missing = [n for n in names if n not in self._endpoints]
    if missing:
      try:
        self._endpoints.update(local_services.up(missing, quiet=True))
      except local_services.ServiceError as e:
        pytest.fail(str(e), pytrace=False)
    if len(names) == 1:
      return self._endpoints[names[0]]
    return {n: self._endpoints[n] for n in names}


@pytest.fixture(scope="session")
def services() -> Services:
  return Services()


def s3_pipeline_options(endpoint_url: str) -> PipelineOptions:
  """Beam's S3 flags for the local endpoint (moto accepts any credentials)."""
  return PipelineOptions([f"--s3_endpoint_url={endpoint_url}",
                          f"--s3_access_key_id={S3_CREDENTIALS['access_key_id']}",
                          f"--s3_secret_access_key={S3_CREDENTIALS['secret_access_key']}",
                          f"--s3_region_name={S3_CREDENTIALS['region_name']}"])


@pytest.fixture
def s3_bucket(services) -> S3Bucket:
  """A new, empty bucket on the local S3, with Beam's ``FileSystems`` pointed at it for the test."""
  import boto3
  endpoint_url = services.require("s3").url
  bucket = f"txstream-it-{uuid.uuid4().hex[:12]}"
  boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=S3_CREDENTIALS["access_key_id"],
               aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
               region_name=S3_CREDENTIALS["region_name"]).create_bucket(Bucket=bucket)
  options = s3_pipeline_options(endpoint_url)
  # FileSystems keeps its options in a class attribute; put back whatever the next test expects.
  previous = FileSystems._pipeline_options  # pylint: disable=protected-access
  FileSystems.set_options(options)
  try:
    yield S3Bucket(endpoint_url, bucket, options)
  finally:
    FileSystems.set_options(previous)


@pytest.fixture(scope="module")
def fresh_postgres(services):
  """A factory of new, empty PostgreSQL databases (DSNs), dropped after the module."""
  import psycopg2
  endpoint = services.require("postgres")
  admin = psycopg2.connect(host=endpoint.host, port=endpoint.port, user="postgres", dbname="postgres")
  admin.autocommit = True
  made = []

  def make(prefix: str = "txstream_it") -> str:
    made.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
    with admin.cursor() as cur:
      cur.execute(f"CREATE DATABASE {made[-1]}")
    return f"host={endpoint.host} port={endpoint.port} user=postgres dbname={made[-1]}"

  yield make
  with admin.cursor() as cur:
    for database in made:
      cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
  admin.close()
