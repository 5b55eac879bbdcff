"""PostgreSQL schema migrations for the warm tier: numbered SQL files applied in order.

Each ``NNNN_name.sql`` file next to this module is one migration, version
``NNNN``. ``apply(conn)`` runs the pending ones in version order, each in its
own transaction together with its row in ``schema_migrations(version,
applied_at)``, so a migration is either fully applied and recorded or not at
all. A transaction-scoped advisory lock serialises concurrent callers (every
worker runs ``apply`` when it connects), which makes ``apply`` idempotent and
safe to call from anywhere. Never edit an applied file; add the next number.
"""
import importlib.resources
import logging
import re
from typing import List, NamedTuple

_LOGGER = logging.getLogger(__name__)

# Arbitrary, fixed: the advisory lock every txstream migration takes.
LOCK_KEY = 0x7478_0001
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
  version text PRIMARY KEY,
  name text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)"""


class Migration(NamedTuple):
  version: str
  name: str
  sql: str


def available() -> List[Migration]:
  """Every migration shipped with the package, in version order."""
  found = []
  for entry in importlib.resources.files(__name__).iterdir():
    match = _FILE.match(entry.name)
    if match:
      found.append(Migration(match.group(1), entry.name[:-4], entry.read_text(encoding="utf-8")))
  found.sort()
  versions = [m.version for m in found]
  if len(set(versions)) != len(versions):
    raise RuntimeError(f"two migrations share a version: {versions}")
  return found


def applied(conn) -> List[str]:
  """Versions recorded in ``schema_migrations`` (empty if the table does not exist yet)."""
  with conn, conn.cursor() as cur:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not cur.fetchone()[0]:
      return []
    cur.execute("SELECT version FROM schema_migrations ORDER BY version")
    return [row[0] for row in cur.fetchall()]


def apply(conn) -> List[str]:
  """Applies pending migrations on ``conn`` (a psycopg2 connection, not autocommit).

  Returns the versions applied by this call; ``[]`` when the schema is current.
  """
  # Unlocked fast path: a worker reconnecting to a current schema takes no lock.
  current = set(applied(conn))
  pending = [m for m in available() if m.version not in current]
  done = []
  for migration in pending:
    with conn, conn.cursor() as cur:
      cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
      cur.execute(_CREATE_TABLE)
      cur.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,))
      if cur.fetchone():
        continue
      _LOGGER.info("applying migration %s", migration.name)
      cur.execute(migration.sql)
      cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                  (migration.version, migration.name))
      done.append(migration.version)
  return done
