// The dashboard builder: pick saved queries or write SQL, choose charts and widths, order the panels, preview,
// save (POST /api/dashboards, or PUT when editing ?id=...), and share /d/<id>.
"use strict";

(() => {
  const WIDTHS = [[3, "quarter"], [4, "third"], [6, "half"], [8, "two thirds"], [12, "full"]];
  const $ = (id) => document.getElementById(id);
  const state = {id: new URLSearchParams(window.location.search).get("id"), panels: [], board: null, cat: null};

  function option(value, text, selected) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    o.selected = selected;
    return o;
  }

  function select(className, options, value) {
    const s = document.createElement("select");
    s.className = className;
    for (const [v, text] of options) s.appendChild(option(String(v), text, String(v) === String(value)));
    return s;
  }

  function button(className, text, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = text;
    b.addEventListener("click", onClick);
    return b;
  }

  function labelled(text, element) {
    const label = document.createElement("label");
    label.append(`${text} `, element);
    return label;
  }

  // One editor row per panel; every change goes to state.panels, structural changes redraw the rows.
  function renderEditors() {
    const container = $("panel-editors");
    container.replaceChildren(...state.panels.map((panel, i) => editor(panel, i)));
  }

  function editor(panel, i) {
    const div = document.createElement("div");
    div.className = "panel-editor";
    div.dataset.index = String(i);
    const queries = [["", "Custom SQL"], ...state.cat.queries.map((q) => [q.id, `${q.title} (${q.id})`])];
    const query = select("query", queries, panel.query || "");
    const chart = select("chart", state.cat.charts.map((c) => [c, c]), panel.chart);
    const width = select("width", WIDTHS.map(([w, name]) => [w, `${name} (${w}/12)`]), panel.width);
    const title = Object.assign(document.createElement("input"), {type: "text", className: "panel-title",
                                                                  placeholder: "title (optional)", size: 30,
                                                                  value: panel.title || ""});
    const sql = Object.assign(document.createElement("textarea"), {className: "sql", value: panel.sql || "",
                                                                   placeholder: "SELECT ... FROM decisions ..."});
    sql.hidden = Boolean(panel.query);
    query.addEventListener("change", () => {
      if (query.value) {
        panel.query = query.value;
        delete panel.sql;
        panel.chart = state.cat.byId[query.value].chart;
        chart.value = panel.chart;
      } else {
        delete panel.query;
        panel.sql = sql.value;
      }
      sql.hidden = Boolean(panel.query);
    });
    chart.addEventListener("change", () => { panel.chart = chart.value; });
    width.addEventListener("change", () => { panel.width = Number(width.value); });
    title.addEventListener("input", () => { if (title.value) panel.title = title.value; else delete panel.title; });
    sql.addEventListener("input", () => { panel.sql = sql.value; });
    const row = document.createElement("div");
    row.className = "row";
    row.append(`#${i + 1}`, labelled("Query", query), labelled("Chart", chart), labelled("Width", width),
               labelled("Title", title),
               button("move-up", "↑ up", () => move(i, -1)), button("move-down", "↓ down", () => move(i, 1)),
               button("remove", "remove", () => { state.panels.splice(i, 1); renderEditors(); }));
    div.append(row, sql);
    return div;
  }

  function move(i, by) {
    const j = i + by;
    if (j < 0 || j >= state.panels.length) return;
    [state.panels[i], state.panels[j]] = [state.panels[j], state.panels[i]];
    renderEditors();
  }

  function addPanel() {
    const first = state.cat.queries[0];
    state.panels.push({query: first.id, chart: first.chart, width: 6});
    renderEditors();
  }

  // What is sent: only the fields a panel has (the server validates and answers 400 with one line).
  function body() {
    return {title: $("dashboard-title").value, panels: state.panels.map((p) => ({...p}))};
  }

  async function preview() {
    $("error").hidden = true;
    if (state.board) state.board.stop();
    state.board = new TX.Board($("board"), body().panels, {every: 0});
    window.txBoard = state.board;
    try { await state.board.start(); } catch (e) { TX.showError($("error"), e); }
  }

  async function save() {
    $("error").hidden = true;
    try {
      const saved = state.id ? await TX.api("PUT", `/api/dashboards/${encodeURIComponent(state.id)}`, body())
                             : await TX.api("POST", "/api/dashboards", body());
      state.id = saved.dashboard_id;
      window.history.replaceState(null, "", `/builder?id=${encodeURIComponent(state.id)}`);
      const link = $("share-link");
      link.href = `/d/${encodeURIComponent(state.id)}`;
      link.textContent = new URL(link.href, window.location.href).href;
      link.dataset.dashboardId = state.id;
      $("saved-ok").hidden = false;
      await listSaved();
    } catch (e) {
      TX.showError($("error"), e);
    }
  }

  async function listSaved() {
    try {
      const {dashboards} = await TX.api("GET", "/api/dashboards");
      $("saved").replaceChildren(...dashboards.map((d) => {
        const li = document.createElement("li");
        const a = Object.assign(document.createElement("a"), {href: `/d/${encodeURIComponent(d.dashboard_id)}`,
                                                              textContent: d.title});
        li.append(a, ` · ${d.panels} panels · updated ${d.updated_at}`);
        return li;
      }));
    } catch (e) {
      $("saved").replaceChildren(Object.assign(document.createElement("li"), {textContent: e.message}));
    }
  }

  async function start() {
    try {
      state.cat = await TX.catalogue();
      if (state.id) {
        const d = await TX.api("GET", `/api/dashboards/${encodeURIComponent(state.id)}`);
        $("dashboard-title").value = d.title;
        state.panels = d.panels;
      }
      renderEditors();
      $("add-panel").addEventListener("click", addPanel);
      $("preview").addEventListener("click", preview);
      $("save").addEventListener("click", save);
      document.body.dataset.ready = "true";
      if (state.panels.length) await preview();
    } catch (e) {
      TX.showError($("error"), e);
    }
    await listSaved();
  }

  start();
})();
