"""The dashboard of ``txstream serve``: the fraud-operations view, a builder, and saved dashboards.

``install(app, config)`` adds these routes to the serve app:

  GET  /, /dashboard            the fraud-operations view
  GET  /builder                 build a dashboard (``?id=...`` edits a saved one)
  GET  /d/{dashboard_id}        a saved dashboard; the URL is how it is shared
  GET  /static/plotly.min.js    plotly.js from the installed ``plotly`` package (no CDN, no network)
  GET  /static/dashboard/...    the pages' own JS and CSS
  GET  /api/queries             the saved-query catalogue and the operations view's layout
  GET  /api/dashboards          saved dashboards, most recently updated first
  POST /api/dashboards          save a new one -> 201 with its ``dashboard_id``
  GET  /api/dashboards/{id}     one (404 if unknown)
  PUT  /api/dashboards/{id}     replace its title and panels (404 if unknown)

Pages are static HTML and JS; the browser fetches every panel's rows through
the serve API's read-only ``POST /sql`` and draws them with Plotly, so a page
shows nothing the SQL endpoint would not answer to the same user. The SQL of
the saved queries lives server side in ``queries/catalogue.yaml``; the
operations view is itself a dashboard in that file, drawn by the same code as
a saved one, its per-minute panels reading the ``decisions_per_minute``
pre-aggregate.

Saved dashboards are rows of the warm tier's ``dashboards`` table (migration
0004), written only by this module with the serve process's PostgreSQL DSN
(the first request applies pending migrations, which is idempotent). PUT is
idempotent; POST is not (each call saves a new dashboard under a new id). A body
that is not a valid dashboard is refused with 400 and one line naming the
field (``panels[1].chart must be one of line, bar, table, number; got 'pie'``).
When serve has an API key, the ``/api/`` routes need it as the SQL endpoint
does (``Authorization: Bearer <key>`` or ``X-API-Key``); the pages keep the
key the user typed in the browser's local storage.
"""
import hmac
import importlib.resources
import json
import logging
import pathlib
import re
import threading
import uuid
from typing import Any, Dict, List, Optional

import yaml

_LOGGER = logging.getLogger(__name__)

CHARTS = ("line", "bar", "table", "number")
MAX_PANELS = 40
MAX_SQL_CHARS = 20_000
MAX_TITLE_CHARS = 200
WIDTHS = range(1, 13)  # grid columns out of 12
_PANEL_KEYS = {"title", "query", "sql", "chart", "width", "x", "y", "series", "key", "limit", "engine"}
_NAME_KEYS = ("x", "series", "key", "engine")
_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
ENGINES = ("clickhouse", "cold", "postgres")  # as POST /sql's ``engine`` takes them

_HERE = pathlib.Path(__file__).resolve().parent
STATIC_DIR = _HERE / "static"
CATALOGUE_PATH = _HERE / "queries" / "catalogue.yaml"


class DashboardError(ValueError):
  """A dashboard body or catalogue entry that is not valid; the message is one line."""


# ----------------------------------------------------------------------------------------------- validation

def _text(value: Any, where: str, limit: int) -> str:
  if not isinstance(value, str) or not value.strip():
    raise DashboardError(f"{where} must be a non-empty string")
  if len(value) > limit:
    raise DashboardError(f"{where} must be at most {limit} characters; got {len(value)}")
  return value.strip()


def validate_panel(panel: Any, where: str, queries: Dict[str, dict]) -> dict:
  """One panel, normalised: ``chart``, ``width`` and exactly one of ``query`` (a catalogue id) or ``sql``."""
  if not isinstance(panel, dict):
    raise DashboardError(f"{where} must be an object; got {type(panel).__name__}")
  unknown = sorted(set(panel) - _PANEL_KEYS)
  if unknown:
    raise DashboardError(f"{where} has unknown field {unknown[0]!r} (known: {', '.join(sorted(_PANEL_KEYS))})")
  out = {}
  chart = panel.get("chart")
  if chart not in CHARTS:
    raise DashboardError(f"{where}.chart must be one of {', '.join(CHARTS)}; got {chart!r}")
  out["chart"] = chart
  query, sql = panel.get("query"), panel.get("sql")
  if (query is None) == (sql is None):
    raise DashboardError(f"{where} needs exactly one of query (a saved query's id) or sql")
  if query is not None:
    if query not in queries:
      raise DashboardError(f"{where}.query {query!r} is not a saved query (see GET /api/queries)")
    out["query"] = query
  else:
    out["sql"] = _text(sql, f"{where}.sql", MAX_SQL_CHARS)
  width = panel.get("width", 6)
  if isinstance(width, bool) or not isinstance(width, int) or width not in WIDTHS:
    raise DashboardError(f"{where}.width must be an integer from 1 to 12 (grid columns); got {width!r}")
  out["width"] = width
  if panel.get("title") is not None:
    out["title"] = _text(panel["title"], f"{where}.title", MAX_TITLE_CHARS)
  for name in _NAME_KEYS:
    if panel.get(name) is not None:
      out[name] = _text(panel[name], f"{where}.{name}", MAX_TITLE_CHARS)
  if "key" in out and not _KEY.match(out["key"]):
    raise DashboardError(f"{where}.key must be lowercase letters, digits and '-' (it names the panel in the page); "
                         f"got {out['key']!r}")
  if "engine" in out and out["engine"] not in ENGINES:
    raise DashboardError(f"{where}.engine must be one of {', '.join(ENGINES)}; got {out['engine']!r}")
  y = panel.get("y")
  if y is not None:
    ys = [y] if isinstance(y, str) else y
    if not isinstance(ys, list) or not ys or not all(isinstance(v, str) and v.strip() for v in ys):
      raise DashboardError(f"{where}.y must be a column name or a non-empty list of column names")
    out["y"] = [v.strip() for v in ys]
  limit = panel.get("limit")
  if limit is not None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
      raise DashboardError(f"{where}.limit must be an integer from 1 to 100000; got {limit!r}")
    out["limit"] = limit
  return out


def validate_dashboard(body: Any, queries: Dict[str, dict]) -> dict:
  """``{"title", "panels"}`` normalised, or ``DashboardError`` naming the first wrong field."""
  if not isinstance(body, dict):
    raise DashboardError("the body must be a JSON object with title and panels")
  unknown = sorted(set(body) - {"title", "panels", "dashboard_id", "created_at", "updated_at"})
  if unknown:
    raise DashboardError(f"unknown field {unknown[0]!r} (a dashboard has title and panels)")
  title = _text(body.get("title"), "title", MAX_TITLE_CHARS)
  panels = body.get("panels")
  if not isinstance(panels, list):
    raise DashboardError(f"panels must be a list; got {type(panels).__name__ if panels is not None else 'nothing'}")
  if not panels:
    raise DashboardError("panels must hold at least one panel")
  if len(panels) > MAX_PANELS:
    raise DashboardError(f"panels must hold at most {MAX_PANELS} panels; got {len(panels)}")
  return {"title": title, "panels": [validate_panel(p, f"panels[{i}]", queries) for i, p in enumerate(panels)]}


# ----------------------------------------------------------------------------------------------- catalogue

def load_catalogue(path: Optional[pathlib.Path] = None) -> dict:
  """The saved queries (by id, in file order) and the operations view; ``DashboardError`` if malformed."""
  text = (path or CATALOGUE_PATH).read_text(encoding="utf-8")
  data = yaml.safe_load(text) or {}
  queries = {}
  for i, entry in enumerate(data.get("queries") or []):
    where = f"catalogue queries[{i}]"
    if not isinstance(entry, dict):
      raise DashboardError(f"{where} must be a mapping")
    qid = _text(entry.get("id"), f"{where}.id", 100)
    if qid in queries:
      raise DashboardError(f"{where}: id {qid!r} appears twice")
    chart = entry.get("chart", "table")
    if chart not in CHARTS:
      raise DashboardError(f"{where}.chart must be one of {', '.join(CHARTS)}; got {chart!r}")
    query = {"id": qid, "title": _text(entry.get("title"), f"{where}.title", MAX_TITLE_CHARS),
             "description": (entry.get("description") or "").strip(), "chart": chart,
             "sql": _text(entry.get("sql"), f"{where}.sql", MAX_SQL_CHARS)}
    for name in ("x", "y", "series", "engine"):
      if entry.get(name) is not None:
        query[name] = entry[name]
    queries[qid] = query
  operations = validate_dashboard(data.get("operations"), queries)
  return {"queries": queries, "operations": operations}


# ----------------------------------------------------------------------------------------------- storage

class DashboardStore:
  """The ``dashboards`` table behind one DSN; a connection per call (dashboard writes are rare)."""

  def __init__(self, dsn: Optional[str]):
    self._dsn = dsn
    self._migrated = False
    self._lock = threading.Lock()

  def _connect(self):
    import psycopg2
    from txstream.io import migrations
    if not self._dsn:
      raise DashboardError("no PostgreSQL DSN configured: saved dashboards need the warm tier")
    conn = psycopg2.connect(self._dsn, connect_timeout=5)
    try:
      with self._lock:
        if not self._migrated:
          migrations.apply(conn)
          self._migrated = True
    except Exception:
      conn.close()
      raise
    return conn

  def _one(self, sql: str, params) -> Optional[dict]:
    import psycopg2.extras
    conn = self._connect()
    try:
      with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
        return _jsonable(dict(row)) if row else None
    finally:
      conn.close()

  def list_all(self) -> List[dict]:
    """Every dashboard without its panels (their count instead), most recently updated first."""
    import psycopg2.extras
    conn = self._connect()
    try:
      with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SELECT dashboard_id, title, jsonb_array_length(panels) AS panels, created_at, updated_at "
                    "FROM dashboards ORDER BY updated_at DESC, dashboard_id")
        return [_jsonable(dict(r)) for r in cur.fetchall()]
    finally:
      conn.close()

  def get(self, dashboard_id: str) -> Optional[dict]:
    return self._one("SELECT dashboard_id, title, panels, created_at, updated_at FROM dashboards "
                     "WHERE dashboard_id = %s", (dashboard_id,))

  def create(self, dashboard: dict) -> dict:
    return self._one("INSERT INTO dashboards (dashboard_id, title, panels) VALUES (%s, %s, %s) "
                     "RETURNING dashboard_id, title, panels, created_at, updated_at",
                     (uuid.uuid4().hex[:12], dashboard["title"], json.dumps(dashboard["panels"])))

  def update(self, dashboard_id: str, dashboard: dict) -> Optional[dict]:
    return self._one("UPDATE dashboards SET title = %s, panels = %s, updated_at = now() WHERE dashboard_id = %s "
                     "RETURNING dashboard_id, title, panels, created_at, updated_at",
                     (dashboard["title"], json.dumps(dashboard["panels"]), dashboard_id))


def _jsonable(row: dict) -> dict:
  return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}


# ----------------------------------------------------------------------------------------------- routes

def plotly_js_path() -> pathlib.Path:
  """plotly.min.js inside the installed ``plotly`` package (the one ``plotly.offline`` inlines)."""
  return pathlib.Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))


class _Refused(Exception):
  """An API answer other than success: its HTTP status and one line, sent as ``{"error": ...}`` like /sql's."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _key_check(api_key: Optional[str]):
  """The API-key dependency, for an app that does not bring its own (``app.state.require_key``)."""
  from fastapi import Request

  def require_key(request: Request) -> None:
    if not api_key:
      return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
      raise _Refused(401, "an API key is required: Authorization: Bearer <key> or X-API-Key")
  return require_key


def _stored(call, *args):
  """Runs a store call; a missing DSN or any database failure becomes a 503 with one line."""
  try:
    return call(*args)
  except DashboardError as e:
    raise _Refused(503, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  # any database failure: one line, not a traceback
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _LOGGER.warning("dashboards: %s: %s", type(e).__name__, first)
    raise _Refused(503, f"dashboards: PostgreSQL failed: {first}") from None


def install(app, config) -> None:
  """Adds the dashboard pages and the dashboards API to ``app`` (see the module docstring).

  ``config.postgres_dsn`` is where dashboards are saved; without one the pages
  still work and the dashboards API answers 503. The API uses the app's own
  key check (``app.state.require_key``) when it has one. Raises
  ``DashboardError`` (one line) when the catalogue is malformed, before the
  app serves anything.
  """
  from fastapi import Depends, Request
  from fastapi.concurrency import run_in_threadpool
  from fastapi.responses import FileResponse, JSONResponse
  from fastapi.staticfiles import StaticFiles

  catalogue = load_catalogue()
  queries = catalogue["queries"]
  store = DashboardStore(getattr(config, "postgres_dsn", None))
  plotly_js = plotly_js_path()
  if not plotly_js.exists():
    raise DashboardError(f"plotly.js not found at {plotly_js}; reinstall the plotly package")
  require_key = getattr(app.state, "require_key", None) or _key_check(getattr(config, "api_key", None))
  keyed = [Depends(require_key)]

  async def refused(_request, error: _Refused):
    return JSONResponse({"error": str(error)}, status_code=error.status)

  app.add_exception_handler(_Refused, refused)

  def page(name):
    return lambda: FileResponse(STATIC_DIR / name, media_type="text/html")

  for path, name in (("/", "operations.html"), ("/dashboard", "operations.html"), ("/builder", "builder.html"),
                     ("/d/{dashboard_id}", "view.html")):
    app.add_api_route(path, page(name), methods=["GET"], include_in_schema=False)
  app.add_api_route("/static/plotly.min.js",
                    lambda: FileResponse(plotly_js, media_type="text/javascript",
                                         headers={"Cache-Control": "public, max-age=86400"}),
                    methods=["GET"], include_in_schema=False)
  app.mount("/static/dashboard", StaticFiles(directory=STATIC_DIR), name="dashboard-static")

  async def body_of(request: Request) -> dict:
    try:
      body = await request.json()
    except ValueError:
      raise _Refused(400, "the body is not valid JSON") from None
    try:
      return validate_dashboard(body, queries)
    except DashboardError as e:
      raise _Refused(400, str(e)) from None

  def list_queries():
    return {"queries": list(queries.values()), "operations": catalogue["operations"], "charts": list(CHARTS)}

  def list_dashboards():
    return {"dashboards": _stored(store.list_all)}

  async def create_dashboard(request: Request):
    dashboard = await body_of(request)
    return JSONResponse(await run_in_threadpool(_stored, store.create, dashboard), status_code=201)

  def get_dashboard(dashboard_id: str):
    found = _stored(store.get, dashboard_id)
    if found is None:
      raise _Refused(404, f"no dashboard {dashboard_id!r}")
    return found

  async def update_dashboard(dashboard_id: str, request: Request):
    dashboard = await body_of(request)
    found = await run_in_threadpool(_stored, store.update, dashboard_id, dashboard)
    if found is None:
      raise _Refused(404, f"no dashboard {dashboard_id!r}")
    return found

  route = {"dependencies": keyed, "tags": ["dashboard"]}
  app.add_api_route("/api/queries", list_queries, methods=["GET"], summary="The saved-query catalogue", **route)
  app.add_api_route("/api/dashboards", list_dashboards, methods=["GET"], summary="Saved dashboards", **route)
  app.add_api_route("/api/dashboards", create_dashboard, methods=["POST"], status_code=201,
                    summary="Save a new dashboard", **route)
  app.add_api_route("/api/dashboards/{dashboard_id}", get_dashboard, methods=["GET"], summary="One dashboard",
                    **route)
  app.add_api_route("/api/dashboards/{dashboard_id}", update_dashboard, methods=["PUT"],
                    summary="Replace a dashboard's title and panels", **route)
