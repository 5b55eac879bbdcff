"""The dashboards API of ``txstream serve`` (``txstream.serve.dashboard``) against the real PostgreSQL.

Through FastAPI's TestClient on ``create_app``: save, get, update, list, the
400s a malformed dashboard gets (one line naming the field, nothing stored),
404s, the API key, the saved-query catalogue (every query is one the SQL
router accepts) and the pages with plotly.js served from the package.
"""
import json

import psycopg2
import pytest
from fastapi.testclient import TestClient

from txstream.io import postgres_sink
from txstream.serve import dashboard, router
from txstream.serve.app import create_app
from txstream.serve.config import ServeConfig

PANELS = [{"query": "decisions_per_minute", "chart": "line", "width": 8},
          {"sql": "SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason", "chart": "bar",
           "title": "Dead letters", "x": "reason", "y": "n"}]


@pytest.fixture(scope="module")
def dsn(fresh_postgres):
  dsn = fresh_postgres("txstream_dash_api")
  postgres_sink.preflight(dsn)  # the warm tier's schema, as a run would leave it
  return dsn


@pytest.fixture(scope="module")
def client(dsn):
  with TestClient(create_app(ServeConfig(postgres_dsn=dsn))) as c:
    yield c


def _stored(dsn, dashboard_id):
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT title, panels FROM dashboards WHERE dashboard_id = %s", (dashboard_id,))
    rows = cur.fetchall()
  conn.close()
  return rows


def _count(dsn):
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM dashboards")
    n = cur.fetchone()[0]
  conn.close()
  return n


def test_save_get_update_and_list_a_dashboard(client, dsn):
  created = client.post("/api/dashboards", json={"title": "Night shift", "panels": PANELS})
  assert created.status_code == 201, created.text
  saved = created.json()
  dashboard_id = saved["dashboard_id"]
  expected = [{"query": "decisions_per_minute", "chart": "line", "width": 8},
              {"sql": PANELS[1]["sql"], "chart": "bar", "title": "Dead letters", "x": "reason", "y": ["n"],
               "width": 6}]
  assert saved["title"] == "Night shift" and saved["panels"] == expected
  assert _stored(dsn, dashboard_id) == [("Night shift", expected)]

  got = client.get(f"/api/dashboards/{dashboard_id}")
  assert got.status_code == 200 and got.json() == saved

  changed = client.put(f"/api/dashboards/{dashboard_id}",
                       json={"title": "Night shift v2", "panels": [expected[1], expected[0]]})
  assert changed.status_code == 200, changed.text
  assert changed.json()["panels"] == [expected[1], expected[0]]
  assert changed.json()["created_at"] == saved["created_at"]
  assert changed.json()["updated_at"] > saved["updated_at"]
  assert _stored(dsn, dashboard_id) == [("Night shift v2", [expected[1], expected[0]])]

  other = client.post("/api/dashboards", json={"title": "Other", "panels": [PANELS[0]]}).json()
  listed = client.get("/api/dashboards").json()["dashboards"]
  by_id = {d["dashboard_id"]: d for d in listed}
  assert by_id[dashboard_id]["title"] == "Night shift v2" and by_id[dashboard_id]["panels"] == 2
  assert by_id[other["dashboard_id"]]["panels"] == 1
  assert [d["dashboard_id"] for d in listed][:2] == [other["dashboard_id"], dashboard_id]  # newest update first


@pytest.mark.parametrize("body, detail", [
    ({"title": "x", "panels": "nope"}, "panels must be a list; got str"),
    ({"title": "x", "panels": []}, "panels must hold at least one panel"),
    ({"panels": [PANELS[0]]}, "title must be a non-empty string"),
    ({"title": "x", "panels": [PANELS[0], {"query": "ops_totals", "chart": "pie"}]},
     "panels[1].chart must be one of line, bar, table, number; got 'pie'"),
    ({"title": "x", "panels": [{"query": "no_such_query", "chart": "line"}]},
     "panels[0].query 'no_such_query' is not a saved query (see GET /api/queries)"),
    ({"title": "x", "panels": [{"query": "ops_totals", "sql": "SELECT 1", "chart": "number"}]},
     "panels[0] needs exactly one of query (a saved query's id) or sql"),
    ({"title": "x", "panels": [{"chart": "table"}]},
     "panels[0] needs exactly one of query (a saved query's id) or sql"),
    ({"title": "x", "panels": [{"query": "ops_totals", "chart": "number", "width": 13}]},
     "panels[0].width must be an integer from 1 to 12 (grid columns); got 13"),
    ({"title": "x", "panels": [{"query": "ops_totals", "chart": "number", "colour": "red"}]},
     "panels[0] has unknown field 'colour'"),
    ({"title": "x", "panels": ["ops_totals"]}, "panels[0] must be an object; got str"),
    ({"title": "x", "panels": [{"query": "ops_totals", "chart": "number", "engine": "mysql"}]},
     "panels[0].engine must be one of clickhouse, cold, postgres; got 'mysql'"),
    ({"title": "x", "panels": [{"sql": "SELECT 1", "chart": "number", "key": "a b"}]},
     "panels[0].key must be lowercase letters, digits and '-'"),
    ({"title": "x", "panels": [{"sql": "SELECT 1", "chart": "number", "y": []}]},
     "panels[0].y must be a column name or a non-empty list of column names"),
    ([1, 2], "the body must be a JSON object with title and panels"),
])
def test_an_invalid_dashboard_is_refused_with_one_line_and_nothing_stored(client, dsn, body, detail):
  before = _count(dsn)
  answer = client.post("/api/dashboards", json=body)
  assert answer.status_code == 400
  assert answer.json()["error"].startswith(detail), answer.json()
  assert "\n" not in answer.json()["error"]
  assert _count(dsn) == before


def test_invalid_json_and_invalid_update_are_400_unknown_ids_404(client, dsn):
  answer = client.post("/api/dashboards", content=b"{not json", headers={"Content-Type": "application/json"})
  assert (answer.status_code, answer.json()["error"]) == (400, "the body is not valid JSON")
  saved = client.post("/api/dashboards", json={"title": "Keep", "panels": [PANELS[0]]}).json()
  refused = client.put(f"/api/dashboards/{saved['dashboard_id']}", json={"title": "Keep", "panels": []})
  assert refused.status_code == 400
  assert _stored(dsn, saved["dashboard_id"])[0][1] == [{"query": "decisions_per_minute", "chart": "line",
                                                        "width": 8}]
  assert client.get("/api/dashboards/nope").status_code == 404
  missing = client.put("/api/dashboards/nope", json={"title": "x", "panels": [PANELS[0]]})
  assert (missing.status_code, missing.json()["error"]) == (404, "no dashboard 'nope'")


def test_the_catalogue_lists_queries_the_router_accepts(client):
  answer = client.get("/api/queries").json()
  ids = [q["id"] for q in answer["queries"]]
  assert {"ops_totals", "decisions_per_minute", "fraud_rate_per_hour", "top_terminals_by_flagged_amount",
          "decision_latency", "dead_letters_by_reason", "data_quality_latest"} <= set(ids)
  assert answer["charts"] == ["line", "bar", "table", "number"]
  assert {p["query"] for p in answer["operations"]["panels"]} <= set(ids)
  per_minute = [p for p in answer["operations"]["panels"] if p["query"].endswith("per_minute")]
  assert per_minute and all("FROM decisions_per_minute" in answer["queries"][ids.index(p["query"])]["sql"]
                            for p in per_minute)
  available = router.Available(postgres=True, clickhouse=True, cold=True)
  for query in answer["queries"]:
    plan = router.plan(query["sql"], available, retention_days=90, limit=100)
    # Live panels bound the event time, so ClickHouse (not a cold-tier scan) answers the decisions queries.
    expected = "postgres" if set(plan.tables) & set(router.OPERATIONAL) else "clickhouse"
    assert plan.engine == expected, (query["id"], plan.reason)


def test_pages_and_plotly_are_served_without_a_network(client):
  for path in ("/", "/dashboard", "/builder", "/d/anything"):
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
    assert '<script src="/static/plotly.min.js"></script>' in page.text
    assert "https://" not in page.text and "http://" not in page.text
  plotly_js = client.get("/static/plotly.min.js")
  assert plotly_js.status_code == 200
  assert plotly_js.content == dashboard.plotly_js_path().read_bytes()
  assert client.get("/static/dashboard/dashboard.js").status_code == 200
  assert client.get("/static/dashboard/builder.js").status_code == 200


def test_with_an_api_key_the_dashboards_api_needs_it(dsn):
  with TestClient(create_app(ServeConfig(postgres_dsn=dsn, api_key="s3cret"))) as c:
    assert c.get("/api/dashboards").status_code == 401
    assert c.post("/api/dashboards", json={"title": "x", "panels": [PANELS[0]]}).status_code == 401
    assert c.get("/api/dashboards", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.get("/api/dashboards", headers={"X-API-Key": "s3cret"}).status_code == 200
    made = c.post("/api/dashboards", json={"title": "x", "panels": [PANELS[0]]},
                  headers={"Authorization": "Bearer s3cret"})
    assert made.status_code == 201
    assert c.get("/").status_code == 200  # the page itself is public; its data calls carry the key


def test_without_postgres_the_dashboards_api_says_so_in_one_line():
  with TestClient(create_app(ServeConfig(postgres_dsn=None, cold_path="/nonexistent"))) as c:
    answer = c.get("/api/dashboards")
  assert answer.status_code == 503
  assert answer.json()["error"] == "no PostgreSQL DSN configured: saved dashboards need the warm tier"


def test_catalogue_errors_are_one_line(tmp_path):
  bad = tmp_path / "catalogue.yaml"
  bad.write_text(json.dumps({"queries": [{"id": "a", "title": "A", "sql": "SELECT 1", "chart": "pie"}],
                             "operations": {"title": "Ops", "panels": [{"query": "a", "chart": "table"}]}}))
  with pytest.raises(dashboard.DashboardError, match=r"^catalogue queries\[0\]\.chart must be one of"):
    dashboard.load_catalogue(bad)
