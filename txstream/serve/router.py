"""SQL routing for ``txstream serve``: refuse what is not a read, pick the engine, translate.

Users write standard SQL (PostgreSQL's dialect, as sqlglot reads it) over
LOGICAL tables; this module never runs anything (``engines`` does):

``decisions``             one row per transaction, ``DECISION_COLUMNS``. Answered by
                          ClickHouse when every ``decisions`` reference's WHERE bounds
                          the event time from below (``event_time``, ``event_date`` or
                          ``event_time_ms`` compared with a literal or ``now()``/
                          ``current_date`` +/- an interval, ANDed at the top of the
                          WHERE) at a point inside the retention window; otherwise, or
                          without ClickHouse, by the cold tier (the Delta table, in
                          DuckDB). ClickHouse reads through ``FINAL`` (one row per
                          ``transaction_id``, its latest ``decided_at_ms``); its times
                          are whole seconds (its ``DateTime``), ``event_time_ms``/
                          ``decided_at_ms`` are exact everywhere.
``decisions_per_minute``, ``flagged_per_hour_terminal``
                          ClickHouse's pre-aggregates, passed through.
``dead_letters``, ``runs``, ``dq_results``, ``dashboards``
                          PostgreSQL's operational tables.

ClickHouse de-duplication: the WHERE conjuncts of a ``decisions`` reference
that read only event columns (``IMMUTABLE_COLUMNS``: the same in every version
of a transaction) are copied into its subquery as ``PREWHERE`` before
``FINAL``: a transaction's versions then pass or fail together, so the latest
version is still the one kept, and ClickHouse merges only the rows the query
reads (a lookup by ``transaction_id`` or ``customer_id`` stops reading whole
partitions). Conjuncts on what a re-decision changes (``decision``, ``score``,
``decided_at``...) stay outside, after de-duplication. Chosen by measurement
(100M decisions, ``benchmarks/bench_queries.py``, warm): daily counts over a
month took 445 ms with the filter after ``FINAL``, 330 ms with ``PREWHERE``
before it, 2,800 ms with ``ORDER BY decided_at_ms DESC LIMIT 1 BY
transaction_id`` and 930 ms with ``argMax`` ... ``GROUP BY transaction_id``
(a month of transaction ids in a hash table); decline rate by merchant
category over a month 590 / 442 / - / 1,320 ms.

ClickHouse 18.16 lacks some standard forms; they are rewritten: positional
``GROUP BY 1``/``ORDER BY 1`` to the select's expressions, ``agg(x) FILTER
(WHERE c)`` to ``aggIf(x, c)`` (``count(*)`` to ``countIf(c)``),
``percentile_cont(p) WITHIN GROUP (ORDER BY x)`` to ``quantileExact(p)(x)``
(a value of x at that rank, not interpolated between two as PostgreSQL does);
other ``WITHIN GROUP`` and ``FILTER`` forms are refused with one line.

A query mixing ``decisions`` (or a pre-aggregate) with PostgreSQL
tables is refused: the two live on different servers, and a cross-server join
belongs in the client. ``engine`` forces a choice (``postgres`` answers
``decisions`` from the warm tier's table, features from its array).

Refused with one line (``QueryError``, HTTP 400): anything but one SELECT /
UNION / WITH query, locking reads, unknown or schema-qualified tables, table
functions (``read_parquet(...)``, ``file(...)``, ``generate_series(...)``) and
functions that reach outside the query (``set_config``, ``pg_read_file``,
``dblink``, ``*_to_xml``, ``nextval``...). Each engine is read-only on its own
as well (``engines``): this is the first fence, not the only one.
"""
import datetime
import re
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from txstream.core import contracts

POSTGRES, CLICKHOUSE, COLD = "postgres", "clickhouse", "cold"
ENGINES = (CLICKHOUSE, COLD, POSTGRES)
DECISIONS, PER_MINUTE = "decisions", "decisions_per_minute"
PER_HOUR_TERMINAL = "flagged_per_hour_terminal"
AGGREGATES = (PER_MINUTE, PER_HOUR_TERMINAL)  # ClickHouse only
OPERATIONAL = ("dead_letters", "runs", "dq_results", "dashboards")
LOGICAL = (DECISIONS,) + AGGREGATES + OPERATIONAL
TIME_COLUMNS = ("event_time", "event_date", "event_time_ms")
_DIALECT = {POSTGRES: "postgres", CLICKHOUSE: "clickhouse", COLD: "duckdb"}
_PLACEHOLDER = "__txstream_{}__"
WRAP_ALIAS = "_txstream_q"

# The logical decisions table, the same names and meaning on every engine.
PLAIN_COLUMNS = ("transaction_id", "event_time", "event_time_ms", "event_date", "customer_id", "terminal_id",
                 "card_token", "amount_minor", "currency", "entry_mode", "merchant_category", "customer_segment",
                 "score", "decision", "reason_codes", "model_version", "rules_version", "reference_version",
                 "pipeline_version", "schema_id", "source", "decided_at", "decided_at_ms")
FEATURE_COLUMNS = contracts.FEATURE_COLUMNS
DECISION_COLUMNS = PLAIN_COLUMNS + FEATURE_COLUMNS
# The event's own fields: every version of a transaction has the same values (a re-decision changes the rest).
IMMUTABLE_COLUMNS = frozenset(("transaction_id", "customer_id", "terminal_id", "card_token", "event_time",
                               "event_date", "event_time_ms", "amount_minor", "currency", "entry_mode",
                               "merchant_category"))

_CH_EXPRESSIONS = {"decision": "toString(decision)", "decided_at": "toDateTime(intDiv(decided_at_ms, 1000), 'UTC')",
                   "decided_at_ms": "toInt64(decided_at_ms)"}
_COLD_EXPRESSIONS = {"event_time_ms": "epoch_ms(event_time)", "decided_at_ms": "epoch_ms(decided_at)"}
_PG_EXPRESSIONS = {"event_time_ms": "(extract(epoch FROM event_time) * 1000)::bigint",
                   "decided_at_ms": "(extract(epoch FROM decided_at) * 1000)::bigint"}
_PG_EXPRESSIONS.update({name: f"features[{i + 1}]" for i, name in enumerate(FEATURE_COLUMNS)})

_REFUSED_FUNCTIONS = {"set_config", "nextval", "setval", "currval", "lastval", "dblink", "query_to_xml",
                      "query_to_xml_and_xmlschema", "query_to_xmlschema", "cursor_to_xml", "table_to_xml",
                      "table_to_xml_and_xmlschema", "schema_to_xml", "database_to_xml", "txid_current",
                      "current_setting", "getsetting", "url", "file", "remote", "s3"}
_REFUSED_PREFIXES = ("pg_", "lo_", "dblink", "sqlite_", "duckdb_")
_ALLOWED_PG_FUNCTIONS = {"pg_sleep", "pg_typeof"}
_STATEMENT_KINDS = (exp.Select, exp.Union, exp.Intersect, exp.Except)
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400,
          "year": 365 * 86400}


class QueryError(ValueError):
  """A query serve will not run, with the one line that says why; ``status`` is the HTTP status."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


class Plan(NamedTuple):
  engine: str                        # postgres | clickhouse | cold
  sql: str                           # the physical query, in the engine's dialect, limited to limit + 1 rows
  tables: Tuple[str, ...]            # the logical tables read
  since: Optional[datetime.datetime]  # the earliest event time a decisions query reads (None: unbounded)
  reason: str                        # why this engine, for logs and the response


class Available(NamedTuple):
  """Which engines are configured, and what the translation needs to know about them."""
  postgres: bool = False
  clickhouse: bool = False
  cold: bool = False
  clickhouse_database: str = "txstream"


def parse(sql: str) -> exp.Expression:
  """The one read-only query in ``sql``, or ``QueryError`` saying what is wrong with it."""
  if not isinstance(sql, str) or not sql.strip():
    raise QueryError("empty query: send one SELECT")
  try:
    statements = [s for s in sqlglot.parse(sql, read="postgres") if s is not None]
  except ParseError as error:
    raise QueryError(f"cannot parse the query: {_first_error(error)}") from None
  if len(statements) != 1:
    raise QueryError(f"one statement per request, got {len(statements)}")
  tree = statements[0]
  if not isinstance(tree, _STATEMENT_KINDS):
    kind = tree.key.upper() if not isinstance(tree, exp.Command) else str(tree.this).upper()
    raise QueryError(f"only SELECT queries are allowed (read-only API), got {kind}")
  for node in tree.walk():
    if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter,
                         exp.Command, exp.Set, exp.Copy)):
      raise QueryError(f"only SELECT queries are allowed (read-only API), got {node.key.upper()} inside it")
    if isinstance(node, exp.Select) and (node.args.get("locks") or node.args.get("into")):
      raise QueryError("SELECT ... FOR UPDATE/SHARE and SELECT INTO write or lock: not allowed")
    if isinstance(node, exp.Func):
      _check_function(node)
  return tree


def _first_error(error: ParseError) -> str:
  details = getattr(error, "errors", None) or []
  if details:
    first = details[0]
    return f"{first.get('description')} (line {first.get('line')}, column {first.get('col')})"
  return " ".join(str(error).split())[:300]


def _check_function(node: exp.Func) -> None:
  name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
  if name in _REFUSED_FUNCTIONS or (name.startswith(_REFUSED_PREFIXES) and name not in _ALLOWED_PG_FUNCTIONS):
    raise QueryError(f"function {name}() is not allowed (it reaches outside the query)")


def logical_tables(tree: exp.Expression) -> List[exp.Table]:
  """Every table reference that is not a CTE; ``QueryError`` for table functions and unknown names."""
  ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
  found = []
  for table in tree.find_all(exp.Table):
    if not isinstance(table.this, exp.Identifier):
      raise QueryError(f"table functions are not allowed: {table.this.sql('postgres')[:80]}")
    name = table.name.lower()
    if table.args.get("db") or table.args.get("catalog"):
      raise QueryError(f"unknown table {table.sql('postgres')}: use the logical tables {', '.join(LOGICAL)}")
    if name in ctes:
      continue
    if name not in LOGICAL:
      raise QueryError(f"unknown table {name}: the tables are {', '.join(LOGICAL)}")
    found.append(table)
  return found


# -- time bounds -------------------------------------------------------------------------------------------------

def earliest_event_time(tree: exp.Expression, now: datetime.datetime) -> Optional[datetime.datetime]:
  """The earliest event time any ``decisions`` reference may read, or None when one is unbounded below."""
  bounds = []
  for table in tree.find_all(exp.Table):
    if table.name.lower() != DECISIONS or table.args.get("db"):
      continue
    select = table.find_ancestor(exp.Select)
    bound = _lower_bound(select.args.get("where") if select else None, now)
    if bound is None:
      return None
    bounds.append(bound)
  return min(bounds) if bounds else None


def _conjuncts(node: exp.Expression) -> List[exp.Expression]:
  node = node.unnest() if isinstance(node, exp.Paren) else node
  if isinstance(node, exp.And):
    return _conjuncts(node.this) + _conjuncts(node.expression)
  return [node]


def _lower_bound(where: Optional[exp.Where], now: datetime.datetime) -> Optional[datetime.datetime]:
  if where is None:
    return None
  bounds = []
  for term in _conjuncts(where.this):
    if isinstance(term, exp.Between) and _is_time_column(term.this):
      bounds.append(_moment(term.args["low"], term.this.name.lower(), now))
    elif isinstance(term, (exp.GT, exp.GTE, exp.EQ)) and _is_time_column(term.this):
      bounds.append(_moment(term.expression, term.this.name.lower(), now))
    elif isinstance(term, (exp.LT, exp.LTE, exp.EQ)) and _is_time_column(term.expression):
      bounds.append(_moment(term.this, term.expression.name.lower(), now))
  bounds = [b for b in bounds if b is not None]
  return max(bounds) if bounds else None


def _is_time_column(node: exp.Expression) -> bool:
  return isinstance(node, exp.Column) and node.name.lower() in TIME_COLUMNS


def _moment(node: exp.Expression, column: str, now: datetime.datetime) -> Optional[datetime.datetime]:
  """The value of a constant time expression, or None when it is not one this understands."""
  node = node.unnest() if isinstance(node, exp.Paren) else node
  if isinstance(node, exp.Literal):
    if not node.is_string:
      if column != "event_time_ms":
        return None
      return datetime.datetime.fromtimestamp(float(node.this) / 1000, datetime.timezone.utc)
    return _parse_time(node.this)
  if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal) and node.this.is_string:
    return _parse_time(node.this.this)
  if isinstance(node, (exp.CurrentTimestamp, exp.CurrentDatetime)) or (
      isinstance(node, exp.Anonymous) and node.name.lower() == "now"):
    return now
  if isinstance(node, exp.CurrentDate) or (isinstance(node, exp.Anonymous) and node.name.lower() == "today"):
    return _midnight(now)
  if isinstance(node, (exp.Sub, exp.Add)):
    base = _moment(node.this, column, now)
    seconds = _seconds(node.expression, days_if_number=base is not None and base == _midnight(base))
    if base is None or seconds is None:
      return None
    delta = datetime.timedelta(seconds=seconds)
    return base - delta if isinstance(node, exp.Sub) else base + delta
  return None


def _midnight(moment: datetime.datetime) -> datetime.datetime:
  return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _parse_time(text: str) -> Optional[datetime.datetime]:
  try:
    moment = datetime.datetime.fromisoformat(text.strip().replace(" ", "T", 1) if "T" not in text else text.strip())
  except ValueError:
    return None
  return moment.replace(tzinfo=datetime.timezone.utc) if moment.tzinfo is None else moment


def _seconds(node: exp.Expression, days_if_number: bool) -> Optional[float]:
  """An interval's length in seconds (months as 30 days: only a bound for routing), or None."""
  if isinstance(node, exp.Literal) and not node.is_string and days_if_number:
    return float(node.this) * 86400  # date - integer: days
  if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal):
    return _interval_text(node.this.this)
  if isinstance(node, exp.Interval):
    unit = node.args.get("unit")
    text = f"{node.this.name if node.this else ''} {unit.name if unit else ''}"
    return _interval_text(text)
  return None


def _interval_text(text: str) -> Optional[float]:
  total, found = 0.0, False
  for number, unit in re.findall(r"(-?\d+(?:\.\d+)?)\s*([a-zA-Z]+)", text):
    unit = unit.lower().rstrip("s")
    unit = {"sec": "second", "min": "minute", "mon": "month", "yr": "year", "d": "day", "h": "hour"}.get(unit, unit)
    if unit not in _UNITS:
      return None
    total += float(number) * _UNITS[unit]
    found = True
  return total if found else None


# -- routing -----------------------------------------------------------------------------------------------------

def route(tree: exp.Expression, tables: Set[str], available: Available, retention_days: int,
          now: datetime.datetime, engine: Optional[str] = None) -> Tuple[str, Optional[datetime.datetime], str]:
  """(engine, earliest event time read, why) for a parsed query over ``tables``."""
  if engine is not None and engine not in ENGINES:
    raise QueryError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
  operational = sorted(tables & set(OPERATIONAL))
  analytic = sorted(tables - set(OPERATIONAL))
  if operational and analytic:
    raise QueryError(f"{', '.join(analytic)} and {', '.join(operational)} live on different servers: "
                     "query them separately")
  since = earliest_event_time(tree, now) if DECISIONS in tables else None
  if not tables:
    chosen = engine or next(e for e in (POSTGRES, CLICKHOUSE, COLD) if getattr(available, e)) \
        if (engine or available.postgres or available.clickhouse or available.cold) else POSTGRES
    reason = "no table"
  elif operational:
    if engine not in (None, POSTGRES):
      raise QueryError(f"{', '.join(operational)} are PostgreSQL tables: engine {engine} cannot answer them")
    chosen, reason = POSTGRES, "operational tables"
  elif tables & set(AGGREGATES):
    aggregate = sorted(tables & set(AGGREGATES))[0]
    if engine not in (None, CLICKHOUSE):
      raise QueryError(f"{aggregate} is a ClickHouse table: engine {engine} cannot answer it")
    chosen, reason = CLICKHOUSE, f"{aggregate} is in ClickHouse only"
  elif engine is not None:
    chosen, reason = engine, "engine chosen by the request"
  else:
    chosen, reason = _route_decisions(since, available, retention_days, now)
  _check_available(chosen, available, tables)
  return chosen, since, reason


def _route_decisions(since, available: Available, retention_days: int, now) -> Tuple[str, str]:
  if not available.clickhouse:
    return COLD, "ClickHouse is not configured"
  if since is None:
    return COLD, "no lower event-time bound in WHERE: the whole history is in the cold tier"
  horizon = now - datetime.timedelta(days=retention_days)
  if since >= horizon:
    return CLICKHOUSE, f"event time from {since:%Y-%m-%d %H:%M:%S} is within ClickHouse's {retention_days} days"
  return COLD, f"event time from {since:%Y-%m-%d %H:%M:%S} is older than ClickHouse's {retention_days} days"


def _check_available(engine: str, available: Available, tables: Set[str]) -> None:
  flag = {POSTGRES: "--postgres_dsn", CLICKHOUSE: "--clickhouse_url", COLD: "--cold_path"}[engine]
  if not getattr(available, engine):
    what = ", ".join(sorted(tables)) or "this query"
    raise QueryError(f"{what} needs the {engine} tier, which serve was not started with ({flag})", status=400)


# -- translation -------------------------------------------------------------------------------------------------

def decisions_source(engine: str, available: Available, since: Optional[datetime.datetime],
                     pushed: Tuple[str, ...] = ()) -> str:
  """The logical ``decisions`` table as a parenthesised subquery in ``engine``'s dialect.

  ``pushed``: ClickHouse conditions on ``IMMUTABLE_COLUMNS`` only, applied before ``FINAL`` (see the module).
  """
  if engine == CLICKHOUSE:
    columns = ", ".join(f"{_CH_EXPRESSIONS[c]} AS {c}" if c in _CH_EXPRESSIONS else c for c in DECISION_COLUMNS)
    # Event fields never change between versions of a row, so these filters before FINAL keep the right rows,
    # let ClickHouse skip whole partitions and leave FINAL fewer rows to merge.
    conditions = [f"event_date >= toDate('{since.astimezone(datetime.timezone.utc):%Y-%m-%d}')"] if since else []
    conditions += [f"({condition})" for condition in pushed]
    prewhere = f" PREWHERE {' AND '.join(conditions)}" if conditions else ""
    return f"(SELECT {columns} FROM {available.clickhouse_database}.decisions FINAL{prewhere})"
  if engine == COLD:
    columns = ", ".join(f"{_COLD_EXPRESSIONS[c]} AS {c}" if c in _COLD_EXPRESSIONS else c for c in DECISION_COLUMNS)
    return f"(SELECT {columns} FROM cold_decisions)"
  columns = ", ".join(f"{_PG_EXPRESSIONS[c]} AS {c}" if c in _PG_EXPRESSIONS else c for c in DECISION_COLUMNS)
  return f"(SELECT {columns} FROM public.decisions)"


def physical_names(engine: str, available: Available, since: Optional[datetime.datetime]) -> Dict[str, str]:
  names = {name: f"public.{name}" for name in OPERATIONAL}
  names[DECISIONS] = decisions_source(engine, available, since)
  names.update({name: f"{available.clickhouse_database}.{name}" for name in AGGREGATES})
  return names


def translate(tree: exp.Expression, engine: str, available: Available, since: Optional[datetime.datetime],
              limit: int) -> str:
  """The query in ``engine``'s dialect over the physical tables, returning at most ``limit + 1`` rows."""
  tree = tree.copy()
  if engine == CLICKHOUSE:
    tree = _clickhouse_compat(tree)
  sources = {}
  for table in list(tree.find_all(exp.Table)):
    name = table.name.lower()
    if name in LOGICAL and not table.args.get("db") and not _is_cte(table, tree):
      alias = table.alias or name
      placeholder = _PLACEHOLDER.format(name)
      if engine == CLICKHOUSE and name == DECISIONS:
        placeholder = _PLACEHOLDER.format(f"{name}_{len(sources)}")
        sources[placeholder] = decisions_source(engine, available, since, _pushable(table, alias))
      table.set("this", exp.to_identifier(placeholder))
      table.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
  tree = _limited(tree, limit + 1)
  sql = tree.sql(dialect=_DIALECT[engine])
  for placeholder, physical in sources.items():
    sql = sql.replace(placeholder, physical)
  for name, physical in physical_names(engine, available, since).items():
    sql = sql.replace(_PLACEHOLDER.format(name), physical)
  return sql


def _pushable(table: exp.Table, alias: str) -> Tuple[str, ...]:
  """The conjuncts of ``table``'s WHERE that read only its ``IMMUTABLE_COLUMNS``, in ClickHouse SQL.

  Only for a table that is its SELECT's one source (no join: a bare column could be another table's), and
  only plain conditions (no subquery, aggregate or window), written with the columns unqualified.
  """
  select = table.parent
  if not isinstance(select, exp.From) or not isinstance(select.parent, exp.Select):
    return ()
  select = select.parent
  where = select.args.get("where")
  if where is None or select.args.get("joins") or select.args.get("laterals"):
    return ()
  pushed = []
  for term in _conjuncts(where.this):
    if any(isinstance(node, (exp.Subquery, exp.Select, exp.AggFunc, exp.Window, exp.Placeholder, exp.Star))
           for node in term.walk()):
      continue
    columns = list(term.find_all(exp.Column))
    if not columns or any(c.name.lower() not in IMMUTABLE_COLUMNS or c.table not in ("", alias) for c in columns):
      continue
    term = term.copy()
    for column in term.find_all(exp.Column):
      column.set("table", None)
    pushed.append(term.sql(dialect=_DIALECT[CLICKHOUSE]))
  return tuple(pushed)


def _is_cte(table: exp.Table, tree: exp.Expression) -> bool:
  return table.name.lower() in {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}


def _limited(tree: exp.Expression, rows: int) -> exp.Expression:
  """At most ``rows`` rows: the query's own LIMIT lowered (order kept), or the query wrapped."""
  if isinstance(tree, exp.Select) and not tree.args.get("offset"):
    current = tree.args.get("limit")
    if current is None:
      return tree.limit(rows, copy=False)
    value = current.expression
    if isinstance(value, exp.Literal) and not value.is_string:
      return tree.limit(min(int(value.this), rows), copy=False)
  return exp.select("*").from_(exp.Subquery(this=tree, alias=exp.TableAlias(this=exp.to_identifier(WRAP_ALIAS)))) \
      .limit(rows)


def _clickhouse_compat(tree: exp.Expression) -> exp.Expression:
  """Rewrites what sqlglot writes for current ClickHouse but 18.16 (Debian's package) does not know."""

  def fix(node):
    if isinstance(node, exp.Select):
      _unpositional(node)
      return node
    if isinstance(node, exp.Filter):
      return _aggregate_if(node)
    if isinstance(node, exp.WithinGroup):
      return _quantile(node)
    if isinstance(node, exp.Join) and not any(node.args.get(k) for k in ("on", "using", "kind", "side", "method")):
      node.set("kind", "CROSS")  # 18.16 fails on a comma join ("unknown combination of JOIN")
      return node
    if isinstance(node, exp.CurrentTimestamp):
      return exp.Anonymous(this="now")
    if isinstance(node, exp.CurrentDate):
      return exp.Anonymous(this="today")
    if isinstance(node, exp.Interval):
      unit = node.args.get("unit")
      seconds = _seconds(node, days_if_number=False)
      if unit is not None and seconds is not None:
        return exp.Interval(this=exp.Literal.number(int(seconds)), unit=exp.var("SECOND"))
    if isinstance(node, (exp.DateTrunc, exp.TimestampTrunc)):
      unit = (node.args.get("unit").name if node.args.get("unit") is not None else "").lower()
      function = {"minute": "toStartOfMinute", "hour": "toStartOfHour", "day": "toStartOfDay",
                  "week": "toMonday", "month": "toStartOfMonth", "quarter": "toStartOfQuarter",
                  "year": "toStartOfYear"}.get(unit.strip("'"))
      if function:
        return exp.Anonymous(this=function, expressions=[node.this])
    if isinstance(node, (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.EQ, exp.NEQ)):
      for side, other in (("this", "expression"), ("expression", "this")):
        column, value = node.args.get(side), node.args.get(other)
        if (isinstance(column, exp.Column) and column.name.lower() in ("event_time", "decided_at")
            and isinstance(value, exp.Literal) and value.is_string):
          moment = _parse_time(value.this)
          if moment is not None:  # 18.16 parses only 'YYYY-MM-DD hh:mm:ss' as a DateTime
            text = moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            node.set(other, exp.Literal.string(text))
    return node

  return tree.transform(fix, copy=False)


_IF_AGGREGATES = {exp.Sum: "sumIf", exp.Avg: "avgIf", exp.Min: "minIf", exp.Max: "maxIf"}


def _unpositional(select: exp.Select) -> None:
  """``GROUP BY 1`` / ``ORDER BY 1`` to the select's first expression (18.16 reads 1 as the constant)."""
  projections = select.expressions
  for key in ("group", "order"):
    clause = select.args.get(key)
    for item in (clause.expressions if clause else []):
      target = item.this if isinstance(item, exp.Ordered) else item
      if not (isinstance(target, exp.Literal) and not target.is_string):
        continue
      position = int(target.this) if target.this.isdigit() else 0
      if any(isinstance(p, exp.Star) or (isinstance(p, exp.Column) and isinstance(p.this, exp.Star))
             for p in projections):
        raise QueryError(f"{key.upper()} BY {target.this} with SELECT *: name the column")
      if not 1 <= position <= len(projections):
        raise QueryError(f"{key.upper()} BY {target.this}: the select has {len(projections)} columns")
      chosen = projections[position - 1]
      target.replace(chosen.this.copy() if isinstance(chosen, exp.Alias) else chosen.copy())


def _aggregate_if(node: exp.Filter) -> exp.Expression:
  """``agg(x) FILTER (WHERE c)`` to ClickHouse's ``aggIf(x, c)``."""
  aggregate, condition = node.this, node.expression.this
  if isinstance(aggregate, exp.Count):
    argument = aggregate.this
    if isinstance(argument, exp.Star) or argument is None:
      return exp.Anonymous(this="countIf", expressions=[condition])
    if isinstance(argument, exp.Distinct):
      return exp.Anonymous(this="uniqExactIf", expressions=[*argument.expressions, condition])
    return exp.Anonymous(this="countIf", expressions=[argument, condition])
  name = _IF_AGGREGATES.get(type(aggregate))
  if name is None or isinstance(aggregate.this, exp.Distinct) or aggregate.expressions:
    raise QueryError(f"{aggregate.sql('postgres')[:60]} FILTER (WHERE ...) is not supported on ClickHouse: "
                     "use sum(CASE WHEN ... END)")
  return exp.Anonymous(this=name, expressions=[aggregate.this, condition])


def _quantile(node: exp.WithinGroup) -> exp.Expression:
  """``percentile_cont(p) WITHIN GROUP (ORDER BY x)`` to ``quantileExact(p)(x)``: the value at rank p of x."""
  ordered = node.expression.expressions if isinstance(node.expression, exp.Order) else []
  if not isinstance(node.this, exp.PercentileCont) or len(ordered) != 1 or ordered[0].args.get("desc"):
    raise QueryError(f"{node.this.sql('postgres')[:40]} WITHIN GROUP is not supported on ClickHouse: use "
                     "percentile_cont(p) WITHIN GROUP (ORDER BY x) or quantile(x, p)")
  return exp.ParameterizedAgg(this="quantileExact", expressions=[node.this.this], params=[ordered[0].this])


def plan(sql: str, available: Available, retention_days: int, limit: int, engine: Optional[str] = None,
         now: Optional[datetime.datetime] = None) -> Plan:
  """Parses, checks, routes and translates ``sql``; ``QueryError`` (one line) when it cannot be run."""
  now = now or datetime.datetime.now(datetime.timezone.utc)
  tree = parse(sql)
  tables = {t.name.lower() for t in logical_tables(tree)}
  chosen, since, reason = route(tree, tables, available, retention_days, now, engine)
  return Plan(chosen, translate(tree, chosen, available, since, limit), tuple(sorted(tables)), since, reason)
