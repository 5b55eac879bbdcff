"""``txstream reconcile``: compare two tables of decisions by key and say where they differ.

For a parallel run against a legacy system, a rerun against the run it
repeats, or any two extracts. Exit status: 0 when the sides agree within the
tolerances, 1 when they differ, 2 for a usage or read error (one line).
"""
import argparse
import json
import logging
import os
import time

from apache_beam.options.pipeline_options import (DirectOptions, FlinkRunnerOptions, PipelineOptions, PortableOptions,
                                                  PrismRunnerOptions, S3Options, StandardOptions)

from txstream.reconcile import compare

_LOGGER = logging.getLogger(__name__)
_BEAM_OPTIONS = (StandardOptions, DirectOptions, PortableOptions, PrismRunnerOptions, FlinkRunnerOptions, S3Options)

_DESCRIPTION = """\
Compare two tables of decisions row by row, by key, as a Beam pipeline (key shards, columnar compare): missing
rows on either side, duplicated keys, and per-column differences beyond a tolerance. Writes report.json and a
self-contained report.html into --report. Exit 0: parity within tolerances; 1: differences; 2: usage or read error.

URIs:
  delta:PATH[@VERSION|@ISO-TIME]  a Delta table, or a cold root holding decisions/ (time travel by version or time)
  parquet:PATH                    a Parquet file or a directory of them (hive partitions read as columns)
  csv:PATH                        a CSV file or a directory of *.csv (values read as text, parsed to the other
                                  side's types; what does not parse is a mismatch shown with its raw text)
  postgres:DSN#TABLE              a PostgreSQL table (numeric and other types without an Arrow twin as text)
  clickhouse:URL#TABLE            a ClickHouse table, native protocol (URL e.g. clickhouse://127.0.0.1:9000/db)
  rerun:ID                        the cold table of a rerun: delta:<--cold_path>/reruns/ID/decisions

Comparing: columns present on both sides except the key (or --columns). Times are compared as UTC epoch
milliseconds (a timestamp column x on one side is read as x_ms when only the other side has x_ms). Null equals
null, NaN equals NaN, lists compare element by element in order. A key with several rows on a side counts once
in that side's duplicates; its copies must be identical, else the differing columns count as mismatches.
"""

_EPILOG = """\
--map THEIR=OUR[:CONVERSION] renames a column on whichever side has THEIR and not OUR, converting its text:
  minor_units      decimal text to integer minor units, exactly ("12.34" -> 1234; minor_units(3) for 3 digits)
  epoch_ms         ISO-8601 time with a UTC offset to epoch ms ("2018-04-01T02:13:05+02:00" -> 1522541585000)
  values(A=a,...)  words mapped to ours; a word not in the map is a mismatch

example, the legacy extract of `txstream generate --legacy_extract` against the cold tier, per day:
  txstream reconcile --left delta:out/cold --right csv:DIR/legacy/decisions.csv \\
    --map TXN_REF=transaction_id --map TXN_TS_LOCAL=event_time_ms:epoch_ms \\
    --map AMT=amount_minor:minor_units --map CUST_NO=customer_id --map TERM_NO=terminal_id --map CCY=currency \\
    --map "DECISION=decision:values(APPROVED=approve,REFERRED=review,DECLINED=decline)" \\
    --by day --report out/reconcile-legacy

example, a rerun against the original table as it was (version 3), on the rerun's window:
  txstream reconcile --left delta:out/cold@3 --right rerun:apr15 --from 2018-04-15 --to 2018-04-18 \\
    --columns decision,score,reason_codes,model_version,rules_version --report out/reconcile-apr15
"""


def _beam_dests():
  parser = argparse.ArgumentParser(add_help=False)
  for cls in _BEAM_OPTIONS:
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return set(vars(parser.parse_args([])))


def add_parser(subparsers):
  p = subparsers.add_parser("reconcile", help="Compare two tables of decisions by key (parallel run, rerun).",
                            description=_DESCRIPTION, epilog=_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--left", required=True, metavar="URI", help="Our side (see URIs above).")
  p.add_argument("--right", required=True, metavar="URI", help="The other side.")
  p.add_argument("--report", required=True, metavar="DIR", help="Where to write report.json and report.html.")
  p.add_argument("--key", default="transaction_id", help="Key column(s), comma-separated (default transaction_id).")
  p.add_argument("--map", action="append", default=[], metavar="THEIR=OUR[:CONVERSION]",
                 help="Rename (and convert) a column of the side that has THEIR and not OUR; repeatable.")
  p.add_argument("--tolerance", action="append", default=[], metavar="COLUMN=ABS",
                 help="Absolute tolerance for a numeric column (default exact); repeatable.")
  p.add_argument("--columns", default=None, help="Compare only these columns, comma-separated.")
  p.add_argument("--by", choices=sorted(compare.WINDOWS_MS), default=None, help="Figures per UTC hour or day too.")
  p.add_argument("--time_column", default="event_time_ms",
                 help="The time of --by windows and --from/--to (default event_time_ms).")
  p.add_argument("--from", dest="since", default=None, metavar="TIME",
                 help="Compare only rows at or after this time (YYYY-MM-DD or ISO-8601, UTC unless offset).")
  p.add_argument("--to", dest="until", default=None, metavar="TIME",
                 help="Compare only rows before this time (e.g. a rerun's window on the full original table).")
  p.add_argument("--shards", type=int, default=16, help="Key shards compared in parallel (default 16).")
  p.add_argument("--samples", type=int, default=10, help="Example keys kept per kind of difference (default 10).")
  p.add_argument("--cold_path", default="out/cold", help="The cold root rerun:ID resolves under (default out/cold).")
  p.add_argument("--progress_interval_s", type=float, default=5.0, help="Seconds between progress lines.")
  for cls in _BEAM_OPTIONS:
    cls._add_argparse_args(p.add_argument_group(f"Beam {cls.__name__}"))  # pylint: disable=protected-access
  return p


def _time(text, flag: str):
  if text is None:
    return None
  from txstream.pipelines.rerun import parse_time
  return parse_time(text, flag)


def _names(text: str):
  return [n.strip() for n in text.split(",") if n.strip()]


def run(args) -> int:
  """Runs a parsed ``reconcile`` command: 0 parity, 1 differences (``UsageError`` for a usage or read error)."""
  from txstream.cli import UsageError
  from txstream.io import cold_table
  from txstream.reconcile import pipeline, report, sources  # Beam graph, Altair: only when reconciling
  logging.getLogger("txstream.reconcile").setLevel(logging.INFO)
  start = time.monotonic()
  dests = _beam_dests()
  options = PipelineOptions(flags=[], **{k: v for k, v in vars(args).items() if k in dests and v is not None})
  storage = cold_table.storage_options(options)
  try:
    left = sources.parse(args.left, cold_path=args.cold_path, storage=storage)
    right = sources.parse(args.right, cold_path=args.cold_path, storage=storage)
    plan = compare.make_plan(left.schema(), right.schema(), key=_names(args.key),
                             mappings=[compare.ColumnMap.parse(m) for m in args.map],
                             tolerances=dict(compare.parse_tolerance(t) for t in args.tolerance),
                             columns=_names(args.columns) if args.columns is not None else None, by=args.by,
                             time_column=args.time_column, shards=args.shards, samples=args.samples,
                             since_ms=_time(args.since, "--from"), until_ms=_time(args.until, "--to"))
    if args.progress_interval_s <= 0:
      raise ValueError("--progress_interval_s must be positive")
    if "://" not in args.report:
      os.makedirs(args.report, exist_ok=True)
  except (ValueError, OSError) as e:
    raise UsageError(str(e)) from e
  _LOGGER.info("reconcile: %s against %s, %d columns in %d shards", args.left, args.right, len(plan.columns),
               plan.shards)
  stats = pipeline.run({"left": left, "right": right}, plan, options, args.report, args.progress_interval_s)
  inputs = {"left": args.left, "right": args.right}
  inputs.update({f"{side}_delta_version": s.version for side, s in (("left", left), ("right", right))
                 if isinstance(s, sources.Delta)})
  chosen = {"key": args.key, "map": args.map, "tolerance": args.tolerance, "columns": args.columns, "by": args.by,
            "from": args.since, "to": args.until,
            "time_column": args.time_column, "shards": args.shards, "samples": args.samples,
            "runner": options.view_as(StandardOptions).runner or "DirectRunner"}
  content = report.build(stats, plan, inputs, chosen, time.monotonic() - start)
  report.write(args.report, content)
  summary = {k: content[k] for k in ("parity", "left_rows", "right_rows", "matched", "missing_in_left",
                                     "missing_in_right", "duplicates_left", "duplicates_right", "mismatched_rows",
                                     "wall_s")}
  summary["report"] = os.path.join(args.report, "report.json")
  print(json.dumps(summary, sort_keys=True))
  return 0 if content["parity"] else 1
