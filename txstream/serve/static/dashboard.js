// txstream serve's dashboard: panels drawn from POST /sql answers with Plotly (served from the plotly package).
//
// A panel is {chart: line|bar|table|number, query: <saved query id> | sql: <SQL>, width: 1..12, title?, x?, y?,
// series?, key?, limit?}. A saved query brings its SQL and its default x, y and series; the panel's own win.
// Board draws a list of panels into a 12-column grid and refreshes them every `every` ms; panels sharing the
// same SQL share one request per refresh. What the browser tests read: each panel is
// <section id="panel-<key or index>" data-state="ok|error|loading" data-rows=N>, a number panel's value is
// .number[data-value], and the page's #updated-at carries data-refreshes (completed refreshes).
"use strict";

const TX = (() => {
  const API_KEY_STORE = "txstream.apiKey";

  function headers(json) {
    const h = json ? {"Content-Type": "application/json"} : {};
    const key = window.localStorage.getItem(API_KEY_STORE);
    if (key) h["X-API-Key"] = key;
    return h;
  }

  // JSON in, JSON out; a failed answer throws its one line (`error`, as every serve endpoint answers).
  async function api(method, url, body) {
    const response = await fetch(url, {method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body)});
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      let detail = data && (data.error ?? data.detail);
      if (detail === undefined || detail === null) detail = response.statusText;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      const error = new Error(`${response.status}: ${detail}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  let cataloguePromise = null;
  function catalogue() {
    if (!cataloguePromise) {
      cataloguePromise = api("GET", "/api/queries").then((data) => {
        data.byId = {};
        for (const q of data.queries) data.byId[q.id] = q;
        return data;
      });
    }
    return cataloguePromise;
  }

  // A panel with its saved query's SQL and defaults filled in.
  function resolve(panel, cat) {
    const saved = panel.query ? cat.byId[panel.query] : null;
    if (panel.query && !saved) throw new Error(`unknown saved query ${panel.query}`);
    const pick = (name) => (panel[name] !== undefined && panel[name] !== null ? panel[name]
                             : saved && saved[name] !== undefined ? saved[name] : null);
    let y = pick("y");
    if (typeof y === "string") y = [y];
    return {chart: panel.chart || (saved ? saved.chart : "table"), sql: saved ? saved.sql : panel.sql,
            title: panel.title || (saved ? saved.title : "SQL"), x: pick("x"), y, series: pick("series"),
            limit: panel.limit || null, engine: pick("engine"), width: panel.width || 6};
  }

  function sqlKey(spec) { return JSON.stringify([spec.sql, spec.limit, spec.engine]); }

  function runSql(spec) {
    const body = {sql: spec.sql};
    if (spec.limit) body.limit = spec.limit;
    if (spec.engine) body.engine = spec.engine;
    return api("POST", "/sql", body);
  }

  // ---------------------------------------------------------------------------------------------- drawing

  const NUMERIC = /int|float|double|decimal|numeric|real|number|bigint|smallint/i;

  function columnIndex(result, name) {
    const i = result.columns.findIndex((c) => c.name === name);
    if (i < 0) {
      throw new Error(`column ${name} is not in the result (columns: ${result.columns.map((c) => c.name).join(", ")})`);
    }
    return i;
  }

  function isNumericColumn(result, i) {
    if (NUMERIC.test(result.columns[i].type || "")) return true;
    return result.rows.length > 0 && result.rows.every((r) => r[i] === null || typeof r[i] === "number");
  }

  const ISO_TIME = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]00:00)?$/;

  // Times come as ISO 8601 (UTC): shown as "2026-12-01 09:13:00", and "UTC" only when the zone was given.
  function shortTime(text) {
    const m = ISO_TIME.exec(text);
    return m ? `${m[1]} ${m[2]}${m[4] ? " UTC" : ""}` : text;
  }

  function formatValue(value, name) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "string") return shortTime(value);
    if (typeof value === "number") {
      if (/rate|share|ratio/i.test(name || "") && Math.abs(value) <= 1) return `${(value * 100).toFixed(2)} %`;
      if (Number.isInteger(value)) return value.toLocaleString("en-US");
      return value.toLocaleString("en-US", {maximumFractionDigits: 3});
    }
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function drawNumber(body, spec, result) {
    const name = spec.y ? spec.y[0] : result.columns[0].name;
    const value = result.rows.length ? result.rows[0][columnIndex(result, name)] : null;
    const div = document.createElement("div");
    div.className = "number";
    div.dataset.column = name;
    div.dataset.value = value === null || value === undefined ? "" : String(value);
    div.textContent = formatValue(value, name);
    body.replaceChildren(div);
  }

  function drawTable(body, spec, result) {
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const c of result.columns) {
      const th = document.createElement("th");
      th.textContent = c.name;
      head.appendChild(th);
    }
    const rows = table.createTBody();
    for (const row of result.rows) {
      const tr = rows.insertRow();
      row.forEach((value, i) => {
        const td = tr.insertCell();
        td.textContent = formatValue(value, result.columns[i].name);
        if (value === "pass" || value === "fail") td.className = `status-${value}`;
      });
    }
    body.replaceChildren(table);
  }

  // Traces for a line or bar chart: x column, y columns, one trace per (series value, y column).
  function traces(spec, result) {
    const names = result.columns.map((c) => c.name);
    if (!spec.x && result.rows.length === 1 && !spec.series) {
      // One wide row (e.g. percentiles): its numeric columns become the categories.
      const ys = spec.y || names.filter((n, i) => isNumericColumn(result, i));
      return {traces: [{x: ys, y: ys.map((n) => result.rows[0][columnIndex(result, n)]), name: spec.title}],
              category: true};
    }
    const x = spec.x || names[0];
    const xi = columnIndex(result, x);
    const si = spec.series ? columnIndex(result, spec.series) : -1;
    const ys = spec.y || names.filter((n, i) => i !== xi && i !== si && isNumericColumn(result, i));
    const out = [];
    for (const y of ys) {
      const yi = columnIndex(result, y);
      const groups = new Map();
      for (const row of result.rows) {
        const key = si >= 0 ? String(row[si]) : y;
        if (!groups.has(key)) groups.set(key, {x: [], y: []});
        groups.get(key).x.push(row[xi]);
        groups.get(key).y.push(row[yi]);
      }
      for (const [key, g] of groups) {
        out.push({x: g.x, y: g.y, name: si >= 0 && ys.length > 1 ? `${key} ${y}` : key});
      }
    }
    const category = !isNumericColumn(result, xi) ? false : !/time|minute|hour|date|_ms$/i.test(x);
    return {traces: out, category};
  }

  function drawChart(body, spec, result) {
    let {traces: data, category} = traces(spec, result);
    // A line through one x (one hour, one minute) would get an axis a millisecond wide: draw it as bars.
    const single = new Set(data.flatMap((t) => t.x.map(String))).size <= 1;
    const kind = spec.chart === "line" && single ? "bar" : spec.chart;
    category = category || (single && spec.chart === "line");
    for (const t of data) {
      if (category) t.x = t.x.map((x) => (typeof x === "string" ? shortTime(x) : x));
      t.type = kind === "bar" ? "bar" : "scatter";
      if (kind === "line") t.mode = "lines+markers";
    }
    const rates = Boolean(spec.y && spec.y.length && spec.y.every((n) => /rate|share|ratio/i.test(n)));
    const layout = {margin: {l: 55, r: 10, t: 10, b: 40}, height: 260, showlegend: data.length > 1,
                    legend: {orientation: "h", y: -0.25}, barmode: "group",
                    xaxis: category ? {type: "category"} : {}, yaxis: rates ? {tickformat: ".0%"} : {},
                    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)"};
    let plot = body.querySelector(".plot");
    if (!plot) {
      plot = document.createElement("div");
      plot.className = "plot";
      body.replaceChildren(plot);
    }
    return window.Plotly.react(plot, data, layout, {displayModeBar: false, responsive: true});
  }

  async function draw(section, spec, result) {
    const body = section.querySelector(".body");
    section.dataset.rows = String(result.rows.length);
    section.dataset.engine = result.engine || "";
    if (spec.chart === "number") drawNumber(body, spec, result);
    else if (spec.chart === "table") drawTable(body, spec, result);
    else if (!result.rows.length) body.replaceChildren(Object.assign(document.createElement("p"),
                                                                       {className: "empty", textContent: "no rows"}));
    else await drawChart(body, spec, result);
    const meta = section.querySelector(".meta");
    meta.textContent = `${result.row_count} rows · ${result.engine} · ${result.elapsed_ms} ms` +
                       (result.truncated ? " · truncated" : "");
  }

  // ---------------------------------------------------------------------------------------------- the board

  class Board {
    // container: the grid element; panels: panel definitions; options.every: refresh period in ms (0: once).
    constructor(container, panels, options = {}) {
      this.container = container;
      this.panels = panels;
      this.every = options.every || 0;
      this.stamp = options.stamp || document.getElementById("updated-at");
      this.refreshes = 0;
      this.timer = null;
    }

    async start() {
      const cat = await catalogue();
      this.specs = this.panels.map((p) => resolve(p, cat));
      this.sections = this.specs.map((spec, i) => this.section(spec, this.panels[i], i));
      this.container.replaceChildren(...this.sections);
      await this.refresh();
      if (this.every) this.timer = window.setInterval(() => this.refresh(), this.every);
    }

    stop() { if (this.timer) window.clearInterval(this.timer); this.timer = null; }

    section(spec, panel, i) {
      const section = document.createElement("section");
      section.className = `panel w-${spec.width}`;
      section.id = `panel-${panel.key || i}`;
      section.dataset.chart = spec.chart;
      section.dataset.state = "loading";
      const h = document.createElement("h2");
      h.textContent = spec.title;
      const body = document.createElement("div");
      body.className = "body";
      const meta = document.createElement("div");
      meta.className = "meta";
      section.append(h, body, meta);
      return section;
    }

    async refresh() {
      if (this.running) return;  // a slow refresh is not stacked under the next tick
      this.running = true;
      try {
        const answers = new Map();
        for (const spec of this.specs) {
          const key = sqlKey(spec);
          if (!answers.has(key)) answers.set(key, runSql(spec).then((r) => ({r}), (e) => ({e})));
        }
        await Promise.all(this.specs.map(async (spec, i) => {
          const section = this.sections[i];
          const answer = await answers.get(sqlKey(spec));
          try {
            if (answer.e) throw answer.e;
            await draw(section, spec, answer.r);
            section.dataset.state = "ok";
            section.querySelector(".error")?.remove();
          } catch (e) {
            section.dataset.state = "error";
            let div = section.querySelector(".error");
            if (!div) {
              div = document.createElement("div");
              div.className = "error";
              section.insertBefore(div, section.querySelector(".meta"));
            }
            div.textContent = e.message;
          }
        }));
        this.refreshes += 1;
        if (this.stamp) {
          const now = new Date();
          this.stamp.textContent = `updated at ${now.toLocaleTimeString("en-GB", {hour12: false})}`;
          this.stamp.dateTime = now.toISOString();
          this.stamp.dataset.refreshes = String(this.refreshes);
        }
      } finally {
        this.running = false;
      }
    }
  }

  // The error's one line; a 401 (serve has an API key) also offers a field to enter the key.
  function showError(element, error) {
    element.textContent = error.message || String(error);
    element.hidden = false;
    if (error.status === 401) {
      const input = Object.assign(document.createElement("input"), {type: "password", id: "api-key",
                                                                    placeholder: "API key"});
      const use = Object.assign(document.createElement("button"), {type: "button", textContent: "Use key"});
      use.addEventListener("click", () => {
        window.localStorage.setItem(API_KEY_STORE, input.value);
        window.location.reload();
      });
      element.append(" ", input, use);
    }
  }

  // A page's one board: ``load()`` resolves to {title, panels}; drawn into #board, refreshed every 5 s, the
  // title into #title, an error into #error.
  async function showBoard(load) {
    try {
      const {title, panels} = await load();
      document.getElementById("title").textContent = title;
      const board = new Board(document.getElementById("board"), panels, {every: 5000});
      window.txBoard = board;
      await board.start();
    } catch (e) {
      showError(document.getElementById("error"), e);
    }
  }

  return {api, catalogue, resolve, Board, showError, showBoard, API_KEY_STORE};
})();
