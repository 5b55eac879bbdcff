"""Pre-aggregated dashboard tables in ClickHouse, kept by materialised views on ``decisions``.

Two aggregates, each an ``AggregatingMergeTree`` table (``*_agg``) that a
materialised view (``*_mv``) fills from every insert into ``decisions``, and a
plain VIEW that merges the states into ordinary columns:

  ``decisions_per_minute`` (VIEW): ``minute DateTime('UTC')``, ``decision String``,
  ``currency String``, ``decisions UInt64`` (distinct transactions),
  ``amount_minor Int64``, ``flagged_amount_minor Int64`` (review + decline; 0 on
  approve rows), ``score_sum Float64`` (mean score = score_sum / decisions).
  Keyed by (minute of ``event_time``, decision, currency): amounts never mix
  currencies, and ``SELECT minute, sum(decisions) FROM decisions_per_minute
  GROUP BY minute`` adds up exactly, as every transaction has one currency.

  ``flagged_per_hour_terminal`` (VIEW): ``hour DateTime('UTC')``,
  ``terminal_id Int64``, ``currency String``, ``decision String``,
  ``flagged UInt64``, ``flagged_amount_minor Int64``: review and decline
  decisions only, for "top terminals by flagged amount" without a scan of
  ``decisions``. Kept by measurement (100M decisions, warm p50): over a day
  ``decisions FINAL`` answers in 80 ms and the aggregate in 8 ms, over a
  week 381 against 59 ms, over a month 1,415 against 296 ms.

Why states and not counters: ``decisions`` is a ReplacingMergeTree, so the sink
may insert a transaction again (retry, restart, rerun) and a materialised view
sees every insert. ``count()`` and ``sum()`` would count a re-insert twice; the
tables keep ``uniqExactState(transaction_id)`` for the counts and
``groupUniqArrayState((sipHash64(transaction_id), amount_minor[, score]))`` for
the sums, so an identical re-insert adds nothing once the states merge (at
query time through the VIEW, and in background merges). Exact but for a 64-bit
hash collision between two transactions of the same cell with the same amount
and score. The cost is state that grows with the transactions (about 16 + 24
bytes each before compression) rather than with the minutes: on 100M
generated decisions over two years (``benchmarks/bench_queries.py``),
``decisions`` took 12.4 GiB, ``decisions_per_minute_agg`` 3.6 GiB (7.2M
rows), ``flagged_per_hour_terminal_agg`` 0.17 GiB (5.0M rows).

Caveat: a transaction re-decided *differently* (another decision, amount or
score on a later insert, e.g. a rerun under a new model) stays in the cell of
its first decision too: the aggregate then counts it in both decisions (and the
sums hold both scores). ``decisions FINAL`` has only the latest; a rebuild
(drop the ``*_agg`` table's partitions and run ``backfill``) brings the
aggregate back to it.

Creation and backfill (``ensure_aggregates``): the table and the materialised
view first, then the history already in ``decisions`` is copied in (``INSERT
... SELECT ... FROM decisions FINAL``, one month partition at a time to bound
memory), and the VIEW last. A materialised view only sees inserts made after it
exists, so the VIEW's presence is the marker that the backfill finished: a
start that finds the VIEW missing backfills again. Because the states
de-duplicate, rows inserted while a backfill runs (seen by both the view and
the backfill) and a backfill repeated after a crash or by two workers at once
are counted once.

Reading: through the VIEWs, with a time filter. ClickHouse 18.16 (Debian's)
does not push a WHERE into a view unless ``enable_optimize_predicate_expression
= 1`` (the default on current releases); without it a query on the VIEW
merges the whole aggregate first and filters after. Measured with
``benchmarks/bench_queries.py``: on 1M decisions the last hour's per-minute
counts read all 1,000,000 aggregate rows in 420-770 ms, against 538 rows in
2 ms with the setting; on 100M every VIEW query without it exceeds the 4 GB
query memory limit, and with it the operations view's queries (last hour,
last day, today's rates, flagged rate per hour) take 5-21 ms warm. So on
18.16 run VIEW queries with that setting (``SETTINGS ... = 1`` on the query,
or in the client's settings: a ``readonly=1`` session cannot change it), or
use the helpers in ``txstream.io.clickhouse_queries``, which filter the
``*_agg`` tables directly. The DDL works on 18.16 and current releases.
"""
import logging
from typing import Callable, NamedTuple

_LOGGER = logging.getLogger(__name__)

# Runs one statement on the server, returns its result as text (TSV; "" for DDL).
Run = Callable[[str], str]


class Aggregate(NamedTuple):
  view: str  # the plain VIEW callers query
  table: str  # the AggregatingMergeTree
  mv: str  # the materialised view from decisions into ``table``
  columns: str
  order_by: str
  select: str  # the MV's and the backfill's SELECT, from {source}
  view_select: str


_PER_MINUTE = Aggregate(
    view="decisions_per_minute", table="decisions_per_minute_agg", mv="decisions_per_minute_mv",
    columns="""minute DateTime('UTC'),
  decision String,
  currency String,
  transactions AggregateFunction(uniqExact, String),
  amounts_scores AggregateFunction(groupUniqArray, Tuple(UInt64, Int64, Float64))""",
    order_by="minute, decision, currency",
    select="""SELECT toStartOfMinute(event_time) AS minute, toString(decision) AS decision, currency,
  uniqExactState(transaction_id) AS transactions,
  groupUniqArrayState((sipHash64(transaction_id), amount_minor, score)) AS amounts_scores
FROM {source}
GROUP BY minute, decision, currency""",
    # One level, no subquery: a WHERE on the VIEW is pushed into it (when the server pushes predicates).
    view_select="""SELECT minute, decision, currency, uniqExactMerge(transactions) AS decisions,
  arraySum(arrayMap(t -> tupleElement(t, 2), groupUniqArrayMerge(amounts_scores))) AS amount_minor,
  if(decision = 'approve', toInt64(0), amount_minor) AS flagged_amount_minor,
  arraySum(arrayMap(t -> tupleElement(t, 3), groupUniqArrayMerge(amounts_scores))) AS score_sum
FROM {table}
GROUP BY minute, decision, currency""")

_FLAGGED_PER_HOUR_TERMINAL = Aggregate(
    view="flagged_per_hour_terminal", table="flagged_per_hour_terminal_agg", mv="flagged_per_hour_terminal_mv",
    columns="""hour DateTime('UTC'),
  terminal_id Int64,
  currency String,
  decision String,
  transactions AggregateFunction(uniqExact, String),
  amounts AggregateFunction(groupUniqArray, Tuple(UInt64, Int64))""",
    order_by="hour, terminal_id, currency, decision",
    select="""SELECT toStartOfHour(event_time) AS hour, terminal_id, currency, toString(decision) AS decision,
  uniqExactState(transaction_id) AS transactions,
  groupUniqArrayState((sipHash64(transaction_id), amount_minor)) AS amounts
FROM {source} WHERE decision != 'approve'
GROUP BY hour, terminal_id, currency, decision""",
    view_select="""SELECT hour, terminal_id, currency, decision, uniqExactMerge(transactions) AS flagged,
  arraySum(arrayMap(t -> tupleElement(t, 2), groupUniqArrayMerge(amounts))) AS flagged_amount_minor
FROM {table}
GROUP BY hour, terminal_id, currency, decision""")

AGGREGATES = (_PER_MINUTE, _FLAGGED_PER_HOUR_TERMINAL)
_SOURCE_COLUMNS = "transaction_id, event_time, terminal_id, currency, amount_minor, score, decision"


def _select(aggregate: Aggregate, source: str) -> str:
  return aggregate.select.format(source=source)


def table_ddl(database: str, aggregate: Aggregate) -> str:
  time_column = aggregate.order_by.split(",")[0]
  return f"""CREATE TABLE IF NOT EXISTS {database}.{aggregate.table} (
  {aggregate.columns}
) ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM({time_column})
ORDER BY ({aggregate.order_by})"""


def mv_ddl(database: str, aggregate: Aggregate) -> str:
  return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{aggregate.mv} TO {database}.{aggregate.table} AS\n"
          + _select(aggregate, f"{database}.decisions"))


def view_ddl(database: str, aggregate: Aggregate) -> str:
  return (f"CREATE VIEW IF NOT EXISTS {database}.{aggregate.view} AS\n"
          + aggregate.view_select.format(table=f"{database}.{aggregate.table}"))


def backfill(database: str, aggregate: Aggregate, run: Run) -> int:
  """Copies the decisions already stored into ``aggregate``'s table, one month partition at a time.

  Idempotent (the states de-duplicate), so safe to repeat. Reads through
  ``FINAL``: the history goes in with the latest decision of each
  transaction. Returns the number of partitions copied.
  """
  partitions = run(f"SELECT DISTINCT partition FROM system.parts WHERE database = '{database}' "
                   "AND table = 'decisions' AND active ORDER BY partition").split()
  for partition in partitions:
    # FINAL in a subquery: a WHERE beside FINAL (the flagged aggregate's) could run as PREWHERE, before
    # FINAL picks the latest version, and keep a flagged version of a transaction since approved.
    source = (f"(SELECT {_SOURCE_COLUMNS} FROM {database}.decisions FINAL "
              f"WHERE toYYYYMM(event_date) = {int(partition)})")
    run(f"INSERT INTO {database}.{aggregate.table}\n" + _select(aggregate, source))
  return len(partitions)


def ensure_aggregates(database: str, run: Run) -> None:
  """Creates the aggregate tables, their materialised views and VIEWs if missing; backfills a new one.

  ``decisions`` must exist. See the module docstring for the order and why
  it is safe to run concurrently and again after a crash.
  """
  for aggregate in AGGREGATES:
    run(table_ddl(database, aggregate))
    run(mv_ddl(database, aggregate))
    if run(f"EXISTS TABLE {database}.{aggregate.view}").strip() != "1":
      copied = backfill(database, aggregate, run)
      if copied:
        _LOGGER.warning("ClickHouse %s.%s: backfilled from %d partitions of decisions",
                        database, aggregate.table, copied)
      run(view_ddl(database, aggregate))
