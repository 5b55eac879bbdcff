"""The reconciliation's report: ``report.json`` (every figure, the inputs and options) and ``report.html``.

The page is one self-contained file: its charts are rendered to inline SVG
(Altair specs through vl-convert, no JavaScript), so it opens offline and can
be attached to a ticket as it is.
"""
import datetime
import html
import json
from typing import List, Mapping

import altair as alt
import vl_convert
from apache_beam.io.filesystems import FileSystems

from txstream.reconcile import compare

_KINDS = ("missing_in_left", "missing_in_right", "duplicates_left", "duplicates_right", "mismatched_rows")


def _window_name(start: str, window_ms: int) -> str:
  if start == "null":
    return "no time"
  when = datetime.datetime.fromtimestamp(int(start) / 1000, tz=datetime.timezone.utc)
  return when.strftime("%Y-%m-%d" if window_ms >= compare.WINDOWS_MS["day"] else "%Y-%m-%dT%H:00Z")


def build(stats: dict, plan: compare.Plan, inputs: Mapping[str, object], options: Mapping[str, object],
          wall_s: float) -> dict:
  """The report's content: the figures with windows named by their UTC start, and ``parity``."""
  figures = {k: v for k, v in stats.items() if k not in ("windows", "samples")}
  windows = []
  if plan.window_ms:
    order = sorted(stats["windows"], key=lambda w: (w == "null", int(w) if w != "null" else 0))
    windows = [dict(window=_window_name(w, plan.window_ms), **stats["windows"][w]) for w in order]
  return dict(figures, parity=compare.parity(stats), windows=windows, samples=stats["samples"],
              columns_compared=list(plan.columns), columns_only_left=list(plan.columns_only_left),
              columns_only_right=list(plan.columns_only_right), key=list(plan.key), inputs=dict(inputs),
              options=dict(options), wall_s=round(wall_s, 3))


def _svg(chart: alt.Chart) -> str:
  return vl_convert.vegalite_to_svg(chart.to_dict())


def _charts(report: dict) -> List[str]:
  charts = []
  if report["windows"]:
    rows = [{"window": w["window"], "kind": k, "count": w[k]} for w in report["windows"] for k in _KINDS]
    charts.append(_svg(alt.Chart(alt.Data(values=rows), title="Differences per window").mark_bar().encode(
        x=alt.X("window:O", sort=None, title=None), y=alt.Y("count:Q", title="keys"),
        color=alt.Color("kind:N", title=None)).properties(width=720, height=240)))
  rows = [{"column": c, "count": n} for c, n in sorted(report["mismatches_by_column"].items())]
  if rows:
    charts.append(_svg(alt.Chart(alt.Data(values=rows), title="Mismatched keys per column").mark_bar().encode(
        y=alt.Y("column:N", sort="-x", title=None), x=alt.X("count:Q", title="keys"))
        .properties(width=560, height=alt.Step(14))))
  return charts


def _table(headers: List[str], rows: List[List[object]]) -> str:
  if not rows:
    return "<p class=none>none</p>"
  head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _text(value) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def _samples(report: dict) -> str:
  samples, parts = report["samples"], []
  for kind in ("missing_in_left", "missing_in_right"):
    parts.append(f"<h3>{kind}</h3>" + _table(["key"], [[s["key"]] for s in samples[kind]]))
  parts.append("<h3>duplicates</h3>" + _table(["key", "side", "copies"],
                                             [[s["key"], s["side"], s["copies"]] for s in samples["duplicate"]]))
  for column, rows in sorted(samples["mismatches"].items()):
    if rows:
      parts.append(f"<h3>mismatches: {html.escape(column)}</h3>"
                   + _table(["key", "left", "right"], [[s["key"], s["left"], s["right"]] for s in rows]))
  return "".join(parts)


def html_page(report: dict) -> str:
  figures = [[k, report[k]] for k in ("left_rows", "right_rows", "matched", "missing_in_left", "missing_in_right",
                                      "duplicates_left", "duplicates_right", "mismatched_rows", "null_keys_left",
                                      "null_keys_right")]
  verdict = "parity" if report["parity"] else "differences"
  inputs = [[k, v] for k, v in report["inputs"].items()] + [[k, v] for k, v in report["options"].items()]
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>txstream reconcile: {verdict}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-family: ui-monospace, monospace; }}
.verdict {{ font-size: 1.4em; padding: .3em .6em; color: white; display: inline-block;
  background: {"#2a7a2a" if report["parity"] else "#b03030"}; }}
.none {{ color: #888; }}
</style></head><body>
<h1>txstream reconcile</h1>
<p class=verdict>{verdict}</p>
<h2>Figures</h2>{_table(["figure", "count"], figures)}
{"".join(f"<div>{svg}</div>" for svg in _charts(report))}
<h2>Columns</h2>{_table(["compared", "only left", "only right"],
                        [[report["columns_compared"], report["columns_only_left"], report["columns_only_right"]]])}
<h2>Samples</h2>{_samples(report)}
<h2>Inputs and options</h2>{_table(["name", "value"], inputs + [["wall_s", report["wall_s"]]])}
</body></html>
"""


def write(report_dir: str, report: dict) -> None:
  """Writes ``report.json`` and ``report.html`` into ``report_dir`` (any Beam filesystem), replacing them."""
  for name, text in (("report.json", json.dumps(report, indent=2, sort_keys=True)),
                     ("report.html", html_page(report))):
    with FileSystems.create(FileSystems.join(report_dir, name)) as f:
      f.write(text.encode("utf-8"))
