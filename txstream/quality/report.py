"""Where a data-quality result goes: PostgreSQL ``dq_results`` and a data-docs HTML page per run.

``record`` writes one row per suite validated over the run (scope ``run``)
and one per window of the window suite (scope ``window``, with its bounds),
each with its failed expectations and their observed values
(migration 0004). ``write_page`` writes ``<dir>/<run_id>.html``: a
self-contained page (no scripts, nothing fetched) with each suite's
expectations, what failed and what was observed, and the windows; ``index.html``
in the same folder links every run's page, newest first.
"""
import datetime
import html
import json
import os
from typing import Iterable, List, Optional, Tuple

from txstream.quality import validate

_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}.pass{color:#176b2c;font-weight:600}.fail{color:#a4161a;font-weight:600}
code{font-size:12px}"""


def _utc(ms: Optional[int]) -> Optional[datetime.datetime]:
  return None if ms is None else datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)


def rows(run_id: str, data_quality: dict, docs_path: Optional[str],
         window: Optional[Tuple[int, int]] = None) -> List[tuple]:
  """The ``dq_results`` rows of a result: (run_id, suite, scope, window_start, window_end, success,
  evaluated, failed_count, failed JSON, docs_path).

  Each suite has a ``run`` row (the window suite's sums up its windows), or
  with ``window`` (a live run's fixed window, ms) a ``window`` row with those
  bounds; each window of the window suite has a ``window`` row of its own.
  """
  out = []
  scope, start, end = ("window", _utc(window[0]), _utc(window[1])) if window else ("run", None, None)
  for suite in data_quality["suites"]:
    out.append((run_id, suite["suite"], scope, start, end, suite["success"], suite["evaluated"],
                len(suite["failed"]), json.dumps(suite["failed"]), docs_path))
    for window in suite.get("windows", []):
      out.append((run_id, suite["suite"], "window", _utc(window["window_start_ms"]), _utc(window["window_end_ms"]),
                  window["success"], window["evaluated"], len(window["failed"]), json.dumps(window["failed"]),
                  docs_path))
  return out


def record(dsn: str, run_id: str, data_quality: dict, docs_path: Optional[str],
           window: Optional[Tuple[int, int]] = None) -> int:
  """Inserts the result's rows (``rows``) into ``dq_results``, applying the migrations first; returns how many."""
  from psycopg2.extras import execute_values
  from txstream.io import migrations
  from txstream.io.postgres_sink import connect
  conn = connect(dsn)
  try:
    migrations.apply(conn)
    batch = rows(run_id, data_quality, docs_path, window)
    with conn, conn.cursor() as cur:
      execute_values(cur, "INSERT INTO dq_results (run_id, suite, scope, window_start, window_end, success, "
                          "evaluated, failed_count, failed, docs_path) VALUES %s", batch)
    return len(batch)
  finally:
    conn.close()


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, (dict, list)):
    return f"<code>{html.escape(json.dumps(value, default=str))}</code>"
  return html.escape("" if value is None else str(value))


def _status(success: bool) -> str:
  return '<span class="pass">passed</span>' if success else '<span class="fail">FAILED</span>'


def _expectations(name: str) -> Iterable[dict]:
  with open(os.path.join(validate.SUITES_DIR, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)["expectations"]


def page(run_id: str, data_quality: dict, title: str = "txstream data quality") -> str:
  """The run's data-docs page (HTML)."""
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: "
           f"{html.escape(run_id)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>Data quality of run <code>{html.escape(run_id)}</code></h1>",
           f"<p>{_status(data_quality['success'])}: {data_quality['evaluated']} expectations evaluated, "
           f"{data_quality['failed']} failed; thresholds from <code>{html.escape(str(data_quality['config']))}"
           f"</code>; validated in {data_quality['seconds']} s.</p>"]
  for suite in data_quality["suites"]:
    parts.append(f"<h2>{html.escape(suite['suite'])} ({html.escape(suite['scope'])}) {_status(suite['success'])}"
                 f"</h2><p>{suite['rows']} rows, {suite['evaluated']} expectations evaluated, "
                 f"{len(suite['failed'])} failed. {html.escape(suite.get('note', ''))}</p>")
    if suite["failed"]:
      parts.append("<table><tr><th>expectation</th><th>column</th><th>bounds</th><th>observed</th>"
                   "<th>unexpected</th></tr>")
      for f in suite["failed"]:
        parts.append(f"<tr><td>{_cell(f['expectation'])}</td><td>{_cell(f.get('column'))}</td>"
                     f"<td>{_cell(f.get('kwargs'))}</td><td>{_cell(f.get('observed'))}</td>"
                     f"<td>{_cell(f.get('unexpected_count'))}</td></tr>")
      parts.append("</table>")
    if suite.get("windows"):
      parts.append("<table><tr><th>window (UTC)</th><th>rows</th><th>status</th><th>failed: observed</th></tr>")
      for w in suite["windows"]:
        failed = "; ".join(f"{f['column']} = {_cell(f.get('observed'))}" for f in w["failed"])
        span = f"{_utc(w['window_start_ms']):%Y-%m-%d %H:%M} to {_utc(w['window_end_ms']):%Y-%m-%d %H:%M}"
        parts.append(f"<tr><td>{span}</td><td>{w['rows']}</td><td>{_status(w['success'])}</td><td>{failed}</td></tr>")
      parts.append("</table>")
    parts.append("<details><summary>The suite's expectations</summary><table><tr><th>expectation</th>"
                 "<th>arguments</th></tr>")
    for e in _expectations(suite["suite"]):
      parts.append(f"<tr><td>{_cell(e['type'])}</td><td>{_cell(e['kwargs'])}</td></tr>")
    parts.append("</table></details>")
  parts.append("</body></html>")
  return "\n".join(parts)


def write_page(folder: str, run_id: str, data_quality: dict) -> str:
  """Writes ``<folder>/<run_id>.html`` and refreshes ``<folder>/index.html``; returns the page's path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{run_id}.html")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page(run_id, data_quality))
  os.replace(tmp, path)
  pages = sorted((p for p in os.listdir(folder) if p.endswith(".html") and p != "index.html"),
                 key=lambda p: os.path.getmtime(os.path.join(folder, p)), reverse=True)
  links = "\n".join(f"<li><a href='{html.escape(p)}'>{html.escape(p[:-5])}</a></li>" for p in pages)
  with open(os.path.join(folder, "index.html.tmp"), "w", encoding="utf-8") as f:
    f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>txstream data quality</title>"
            f"<style>{_STYLE}</style></head><body><h1>Data quality, by run</h1><ul>{links}</ul></body></html>")
  os.replace(os.path.join(folder, "index.html.tmp"), os.path.join(folder, "index.html"))
  return path
