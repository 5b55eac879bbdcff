"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright against ``txstream serve``.

The tiers (PostgreSQL, ClickHouse with its ``decisions_per_minute``
pre-aggregate) are filled with a known set of decisions, dead letters and
data-quality results through the project's own writers; ``create_app`` serves
them from uvicorn in a thread. The numbers the pages show are checked against
SQL run directly on the servers (and against ``txstream.io.clickhouse_queries``,
whose definitions the operations view shares), never against the page's own
API. Chromium comes from ``txstream.services.install_chromium`` (apt-get on a
machine without it), not from Playwright's download. A screenshot of each view
goes to ``out/test-artifacts/screenshots/``.
"""
import datetime
import pathlib
import threading
import time
import uuid

import psycopg2
import pytest
import uvicorn
from clickhouse_driver import Client

from tests.integration import sink_fixtures as fx
from tests.integration.conftest import fresh_postgres, services  # pylint: disable=unused-import  # fixtures
from txstream import services as local_services
from txstream.io import clickhouse_queries
from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.io.postgres_sink import WriteDeadLettersToPostgres, WriteToPostgres
from txstream.serve.app import create_app
from txstream.serve.config import ServeConfig

SCREENSHOTS = pathlib.Path(__file__).resolve().parents[2] / "out" / "test-artifacts" / "screenshots"
N = 240  # decisions, one a second over four minutes
LATE = 30  # decisions added while the operations view is open
TIMEOUT_MS = 20_000
DEAD_LETTERS = [("decode", "bad_magic_byte")] * 5 + [("decode", "truncated")] * 3 + [("validate", "bad_amount")] * 2


def _decisions(start_ms: int, n: int, prefix: str):
  """``n`` decisions from ``start_ms``, one a second; outcomes uneven over minutes, latency 40-339 ms."""
  table = fx.decision_table(n, prefix=prefix, customers=12, days=1, start_ms=start_ms)
  decision = ["decline" if i % 10 == 0 or 130 <= i < 150 else "review" if i % 10 in (1, 2) else "approve"
              for i in range(n)]
  decided = [start_ms + i * 1000 + 40 + (i * 37) % 300 for i in range(n)]
  return fx.with_columns(fx.batches_of(table), decision=decision, decided_at_ms=decided)


@pytest.fixture(scope="module")
def chromium():
  try:
    return local_services.install_chromium(print)
  except local_services.ServiceError as e:
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def tiers(services, fresh_postgres):
  """A fresh PostgreSQL database and ClickHouse database holding the known decisions; dropped after."""
  servers = services.require("postgres", "clickhouse")
  ch = servers["clickhouse"]
  database = f"txstream_dash_{uuid.uuid4().hex[:8]}"
  dsn = fresh_postgres("txstream_dash")
  url = f"clickhouse://{ch.host}:{ch.port}/{database}"
  # Within the last hour, whole minutes: every panel's window (last 60 minutes, last 24 hours) holds all of it.
  start_ms = (int(time.time()) // 60 - 20) * 60_000
  batches = _decisions(start_ms, N, "dash")
  fx.run_write(WriteToPostgres(dsn), batches, expect_written=N)
  fx.run_write(WriteToClickHouse(url), batches, expect_written=N)
  letters = [{"source": f"transactions/0@{i}", "raw": bytes([i]), "stage": stage, "reason": reason,
              "error_class": "ValueError", "message": f"record {i}: {reason}", "pipeline_version": "0.1.0"}
             for i, (stage, reason) in enumerate(DEAD_LETTERS)]
  fx.run_write(WriteDeadLettersToPostgres(dsn), [fx.dead_letter_batch(letters)], expect_written=len(letters))
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:  # as txstream.quality.report.record writes them
    for run_id, suite, success in (("run-1", "decisions", True), ("run-1", "transactions", True),
                                   ("run-2", "decisions", False)):  # the latest "decisions" result fails
      cur.execute("INSERT INTO dq_results (run_id, suite, scope, success, evaluated, failed_count, failed, "
                  "validated_at) VALUES (%s, %s, 'run', %s, 7, %s, '[]', now() + %s * INTERVAL '1 s')",
                  (run_id, suite, success, 0 if success else 1, int(run_id[-1])))
  conn.close()
  client = Client(host=ch.host, port=ch.port)
  yield {"dsn": dsn, "url": url, "database": database, "client": client, "start_ms": start_ms}
  client.execute(f"DROP DATABASE IF EXISTS {database}")
  client.disconnect()


@pytest.fixture(scope="module")
def serve(tiers):
  """``txstream serve``'s app over the tiers, on a free local port; its base URL."""
  app = create_app(ServeConfig(postgres_dsn=tiers["dsn"], clickhouse_url=tiers["url"]))
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=fx.free_port(), log_level="warning"))
  thread = threading.Thread(target=server.run, name="serve", daemon=True)
  thread.start()
  deadline = time.monotonic() + 20
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      pytest.fail("txstream serve did not start", pytrace=False)
    time.sleep(0.05)
  yield f"http://127.0.0.1:{server.config.port}"
  server.should_exit = True
  thread.join(10)


@pytest.fixture(scope="module")
def browser(chromium):
  from playwright.sync_api import sync_playwright
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=chromium, headless=True)
    yield browser
    browser.close()


@pytest.fixture
def page(browser):
  context = browser.new_context(viewport={"width": 1400, "height": 1100})
  page = context.new_page()
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
  yield page
  context.close()
  assert not errors, f"browser errors: {errors}"


def _screenshot(page, name: str):
  SCREENSHOTS.mkdir(parents=True, exist_ok=True)
  path = SCREENSHOTS / f"{name}.png"
  page.screenshot(path=str(path), full_page=True)
  print(f"screenshot: {path}")


def _wait_refreshed(page, at_least: int = 1, timeout_ms: int = TIMEOUT_MS):
  page.wait_for_function(f"Number(document.getElementById('updated-at').dataset.refreshes) >= {at_least}",
                         timeout=timeout_ms)
  states = page.eval_on_selector_all(".panel", "els => els.map(e => [e.id, e.dataset.state, "
                                               "(e.querySelector('.error') || {}).textContent || ''])")
  assert states and all(state == "ok" for _, state, _ in states), states
  return [panel_id for panel_id, _, _ in states]


def _number(page, key: str) -> str:
  return page.get_attribute(f"#panel-{key} .number", "data-value")


def _traces(page, key: str):
  """The Plotly traces drawn in a panel: [{name, x, y}]."""
  return page.evaluate("key => Array.from(document.querySelector(`#panel-${key} .plot`).data)"
                       ".map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))", key)


def _utc(moment) -> datetime.datetime:
  """A time from the page (ISO text) or a driver (datetime, aware or UTC-naive) as a naive UTC datetime."""
  moment = datetime.datetime.fromisoformat(moment) if isinstance(moment, str) else moment
  return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def _scalar(client, sql: str):
  return client.execute(sql)[0][0]


def test_operations_view_shows_what_the_tiers_hold_and_refreshes_live(page, serve, tiers):
  client, db = tiers["client"], tiers["database"]
  page.goto(serve + "/")
  panels = _wait_refreshed(page)
  assert panels == ["panel-total-decisions", "panel-declined", "panel-decline-rate", "panel-review-rate",
                    "panel-per-minute", "panel-rates-per-minute", "panel-fraud-rate-per-hour", "panel-top-terminals",
                    "panel-latency", "panel-dead-letters", "panel-data-quality"]
  assert page.text_content("#updated-at").startswith("updated at ")

  # Key numbers, against the analytics tier read directly (FINAL: one row per transaction).
  total = _scalar(client, f"SELECT count() FROM {db}.decisions FINAL")
  declined = _scalar(client, f"SELECT countIf(decision = 'decline') FROM {db}.decisions FINAL")
  reviewed = _scalar(client, f"SELECT countIf(decision = 'review') FROM {db}.decisions FINAL")
  assert total == N
  assert int(_number(page, "total-decisions")) == total
  assert int(_number(page, "declined")) == declined
  assert float(_number(page, "decline-rate")) == pytest.approx(declined / total)
  assert float(_number(page, "review-rate")) == pytest.approx(reviewed / total)
  assert page.text_content("#panel-decline-rate .number") == f"{declined / total * 100:.2f} %"

  # Decisions per minute (drawn from the pre-aggregate) equal the base table's counts per minute and outcome.
  expected = {(_utc(m), d): n for m, d, n in client.execute(
      f"SELECT toStartOfMinute(event_time) AS m, toString(decision) AS d, count() FROM {db}.decisions FINAL "
      "GROUP BY m, d")}
  drawn = {(_utc(x), t["name"]): y for t in _traces(page, "per-minute") for x, y in zip(t["x"], t["y"])}
  assert drawn == expected
  assert len({m for m, _ in drawn}) == 4

  # Fraud rate per hour and top terminals: the definitions of txstream.io.clickhouse_queries.
  hours = clickhouse_queries.fraud_rate_per_hour(client, database=db)
  flagged_rate = next(t for t in _traces(page, "fraud-rate-per-hour") if t["name"] == "flagged_rate")
  assert flagged_rate["y"] == pytest.approx([h["flagged_rate"] for h in hours])
  top = clickhouse_queries.top_terminals_by_flagged_amount(client, limit=10, database=db)
  bars = {(int(x), t["name"]): y for t in _traces(page, "top-terminals") for x, y in zip(t["x"], t["y"])}
  assert bars == {(r["terminal_id"], r["currency"]): r["flagged_amount_minor"] for r in top}

  # Latency percentiles: event time to decision, as ClickHouse computes them on the base table.
  p50, worst = client.execute(f"SELECT quantile(0.5)(decided_at_ms - event_time_ms), "
                              f"max(decided_at_ms - event_time_ms) FROM {db}.decisions FINAL")[0]
  latency = dict(zip(*[_traces(page, "latency")[0][k] for k in ("x", "y")]))
  assert latency["p50_ms"] == pytest.approx(p50) and latency["max_ms"] == worst == 339

  # Dead letters and data quality: the warm tier.
  with psycopg2.connect(tiers["dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT stage, reason, count(*) FROM dead_letters GROUP BY stage, reason")
    letters = {(stage, reason): n for stage, reason, n in cur.fetchall()}
  conn.close()
  drawn_letters = {(t["name"], x): y for t in _traces(page, "dead-letters") for x, y in zip(t["x"], t["y"])}
  assert drawn_letters == letters == {("decode", "bad_magic_byte"): 5, ("decode", "truncated"): 3,
                                      ("validate", "bad_amount"): 2}
  quality = page.eval_on_selector_all("#panel-data-quality tbody tr",
                                      "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])")
  assert quality == [["decisions", "fail"], ["transactions", "pass"]]
  _screenshot(page, "operations")

  # Live: decisions written now show up at the next refresh, with no reload.
  before = int(page.get_attribute("#updated-at", "data-refreshes"))
  fx.run_write(WriteToClickHouse(tiers["url"]), _decisions(tiers["start_ms"] + N * 1000, LATE, "late"),
               expect_written=LATE)
  page.wait_for_function(f"Number(document.getElementById('updated-at').dataset.refreshes) > {before} && "
                         f"document.querySelector('#panel-total-decisions .number').dataset.value === '{N + LATE}'",
                         timeout=TIMEOUT_MS)
  assert _scalar(client, f"SELECT count() FROM {db}.decisions FINAL") == N + LATE


def test_builder_saves_a_dashboard_whose_url_renders_it_anywhere(page, browser, serve, tiers):
  page.goto(serve + "/builder")
  page.wait_for_selector("body[data-ready='true']", timeout=TIMEOUT_MS)
  page.fill("#dashboard-title", "Shift overview")
  for _ in range(3):
    page.click("#add-panel")
  editors = page.locator(".panel-editor")
  assert editors.count() == 3
  # Panel 1: a saved query as a line chart, half width.
  editors.nth(0).locator("select.query").select_option("fraud_rate_per_hour")
  editors.nth(0).locator("select.width").select_option("6")
  # Panel 2: to be removed. Panel 3: custom SQL as a bar chart, full width, then moved to the top.
  editors.nth(1).locator("select.query").select_option("ops_totals")
  sql = ("SELECT decision, count(*) AS decisions FROM decisions WHERE event_time >= now() - INTERVAL '1 day' "
         "GROUP BY decision ORDER BY decision")
  editors.nth(2).locator("select.query").select_option("")
  editors.nth(2).locator("textarea.sql").fill(sql)
  editors.nth(2).locator("select.chart").select_option("bar")
  editors.nth(2).locator("select.width").select_option("12")
  editors.nth(2).locator("input.panel-title").fill("By outcome")
  editors.nth(1).locator("button.remove").click()
  assert editors.count() == 2
  editors.nth(1).locator("button.move-up").click()
  page.click("#preview")
  _wait_refreshed(page)
  page.click("#save")
  page.wait_for_selector("#saved-ok:not([hidden])", timeout=TIMEOUT_MS)
  dashboard_id = page.get_attribute("#share-link", "data-dashboard-id")
  share = page.get_attribute("#share-link", "href")
  assert share == f"/d/{dashboard_id}"
  _screenshot(page, "builder")

  expected_panels = [{"sql": sql, "chart": "bar", "width": 12, "title": "By outcome"},
                     {"query": "fraud_rate_per_hour", "chart": "line", "width": 6}]
  with psycopg2.connect(tiers["dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT title, panels FROM dashboards WHERE dashboard_id = %s", (dashboard_id,))
    assert cur.fetchall() == [("Shift overview", expected_panels)]
  conn.close()

  # Its URL renders the saved panels, here and in a fresh browser context (nothing shared but the URL).
  expected = {d: n for d, n in tiers["client"].execute(
      f"SELECT toString(decision) AS d, count() FROM {tiers['database']}.decisions FINAL GROUP BY d")}
  for name, context in (("dashboard", None), ("shared", browser.new_context(viewport={"width": 1200,
                                                                                      "height": 900}))):
    view = context.new_page() if context else page
    view.goto(serve + share)
    assert _wait_refreshed(view) == ["panel-0", "panel-1"]
    assert view.text_content("#title") == "Shift overview"
    assert view.eval_on_selector_all(".panel h2", "hs => hs.map(h => h.textContent)") == [
        "By outcome", "Fraud rate per hour"]
    assert view.get_attribute("#panel-0", "data-chart") == "bar"
    assert view.get_attribute("#panel-1", "data-chart") == "line"
    bars = _traces(view, "0")
    assert dict(zip(bars[0]["x"], bars[0]["y"])) == expected
    assert view.get_attribute("#edit-link", "href") == f"/builder?id={dashboard_id}"
    _screenshot(view, name)
    if context:
      context.close()

  # Its Edit link reopens it in the builder; saving there replaces it under the same id.
  page.click("#edit-link")
  page.wait_for_selector("body[data-ready='true']", timeout=TIMEOUT_MS)
  assert page.input_value("#dashboard-title") == "Shift overview"
  assert page.locator(".panel-editor").count() == 2
  page.locator(".panel-editor").nth(1).locator("select.width").select_option("12")
  page.fill("#dashboard-title", "Shift overview (wide)")
  page.click("#save")
  page.wait_for_selector("#saved-ok:not([hidden])", timeout=TIMEOUT_MS)
  assert page.get_attribute("#share-link", "data-dashboard-id") == dashboard_id
  with psycopg2.connect(tiers["dsn"]) as conn, conn.cursor() as cur:
    cur.execute("SELECT title, panels FROM dashboards")
    assert cur.fetchall() == [("Shift overview (wide)", [expected_panels[0], {**expected_panels[1], "width": 12}])]
  conn.close()
