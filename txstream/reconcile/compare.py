"""Reconciliation's columnar core (Beam-free): what to compare, each side's rows made comparable, a shard compared.

``make_plan`` decides, once and on the driver, from the two sides' schemas:
the key, the compared columns, each side's renames (``--map``), conversions
and casts, and the window. ``prepare`` applies a side's part of the plan to
one batch as it is read; ``shard_of`` places its rows by key; ``compare``
compares one shard's left rows with its right rows; ``merge`` adds up shards.

Semantics callers rely on:
- Every count is of keys, except ``left_rows``/``right_rows`` (rows read).
  A key on both sides is ``matched``; a matched key whose rows differ in any
  compared column is one ``mismatched_rows`` and one per differing column in
  ``mismatches_by_column``.
- A key with several rows on a side counts once in that side's
  ``duplicates``. Its copies must be identical to one another (exactly): a
  column in which they vary is a mismatch of the key whatever the other side
  holds. Otherwise the key compares like any other.
- Rows with a null key are counted (``null_keys_*``) and not matched.
- Null equals null, NaN equals NaN, null never equals a value. Lists compare
  element by element, in order. ``tolerances`` are absolute, for numbers.
- Times are compared as int64 UTC epoch milliseconds on both sides.
- A value a conversion or a cast cannot parse is a mismatch; the sample shows
  its raw text.
"""
import dataclasses
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import polars as pl
import pyarrow as pa

SIDES = ("left", "right")
WINDOWS_MS = {"hour": 3_600_000, "day": 86_400_000}
_SHARD_SEED = 0x7c5  # fixed: every worker must place a key in the same shard (stable within a polars version)
_BAD = "__bad__"
_WINDOW = "__window"
_MINOR = re.compile(r"^minor_units(?:\((\d)\))?$")
_VALUES = re.compile(r"^values\((.*)\)$")
_INTEGERS = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


@dataclasses.dataclass(frozen=True)
class Conversion:
  """How a legacy column's text becomes ours: ``minor_units``, ``epoch_ms`` or a ``values`` map."""
  kind: str
  digits: int = 2
  values: Tuple[Tuple[str, str], ...] = ()

  @classmethod
  def parse(cls, text: str) -> "Conversion":
    minor = _MINOR.match(text)
    if minor:
      return cls("minor_units", digits=int(minor.group(1) or 2))
    if text == "epoch_ms":
      return cls("epoch_ms")
    values = _VALUES.match(text)
    if values:
      pairs = tuple(tuple(p.split("=", 1)) for p in values.group(1).split(",") if p)
      if pairs and all(len(p) == 2 and p[0] for p in pairs):
        return cls("values", values=pairs)
    raise ValueError(f"unknown conversion {text!r} (minor_units, epoch_ms or values(THEIRS=ours,...))")

  @property
  def dtype(self) -> pl.DataType:
    return pl.String() if self.kind == "values" else pl.Int64()

  def expr(self, name: str) -> pl.Expr:
    """The converted column; null where the text does not parse (``prepare`` keeps that text as bad)."""
    text = pl.col(name).cast(pl.String).str.strip_chars()
    if self.kind == "epoch_ms":
      return text.str.to_datetime("%+", strict=False, time_unit="ms", time_zone="UTC").dt.epoch("ms")
    if self.kind == "values":
      old, new = zip(*self.values)
      return text.replace_strict(list(old), list(new), default=None, return_dtype=pl.String)
    # Exact decimal text to integer minor units: the whole and the fraction as integers, never a float.
    parts = text.str.extract_groups(rf"^([+-]?)(\d+)(?:\.(\d{{0,{self.digits}}}))?$")
    fraction = parts.struct.field("3").fill_null("").str.pad_end(self.digits, "0")
    fraction = fraction.cast(pl.Int64, strict=False) if self.digits else pl.lit(0, pl.Int64)
    magnitude = parts.struct.field("2").cast(pl.Int64, strict=False) * 10 ** self.digits + fraction
    return pl.when(parts.struct.field("1") == "-").then(-magnitude).otherwise(magnitude)


@dataclasses.dataclass(frozen=True)
class ColumnMap:
  """``--map their=our[:conversion]``: a side that has ``their`` and not ``our`` reads ``their`` as ``our``."""
  their: str
  our: str
  conversion: Optional[Conversion] = None

  @classmethod
  def parse(cls, text: str) -> "ColumnMap":
    names, _, conversion = text.partition(":")
    their, eq, our = names.partition("=")
    if not (their and eq and our):
      raise ValueError(f"--map {text!r}: expected their_col=our_col[:conversion]")
    return cls(their.strip(), our.strip(), Conversion.parse(conversion.strip()) if conversion else None)


def parse_tolerance(text: str) -> Tuple[str, float]:
  column, eq, value = text.partition("=")
  try:
    tolerance = float(value)
  except ValueError:
    tolerance = -1.0
  if not (column and eq) or not tolerance >= 0:
    raise ValueError(f"--tolerance {text!r}: expected column=non-negative number")
  return column, tolerance


@dataclasses.dataclass(frozen=True)
class SidePlan:
  """One side's part of the plan: what to read and how to make it comparable."""
  read: Tuple[str, ...]                     # source columns to read (projection)
  renames: Tuple[Tuple[str, str], ...]      # source name -> our name
  conversions: Tuple[Tuple[str, Conversion], ...]  # our name -> conversion of the raw text
  casts: Tuple[Tuple[str, pl.DataType], ...]       # our name -> the type both sides compare in


@dataclasses.dataclass(frozen=True)
class Plan:
  key: Tuple[str, ...]
  columns: Tuple[str, ...]
  tolerances: Tuple[Tuple[str, float], ...]
  time_column: Optional[str]
  window_ms: Optional[int]
  shards: int
  samples: int
  left: SidePlan
  right: SidePlan
  columns_only_left: Tuple[str, ...]
  columns_only_right: Tuple[str, ...]
  since_ms: Optional[int] = None  # compare only the rows with a time in [since_ms, until_ms)
  until_ms: Optional[int] = None

  def side(self, name: str) -> SidePlan:
    return self.left if name == "left" else self.right


def _normal(dtype: pl.DataType) -> pl.DataType:
  """The type a column compares in before the sides are aligned: times as epoch ms, one width per kind."""
  if isinstance(dtype, pl.Datetime):
    return pl.Int64()
  if isinstance(dtype, _INTEGERS):
    return pl.Int64()
  if isinstance(dtype, (pl.Float32, pl.Float64)):
    return pl.Float64()
  if isinstance(dtype, pl.Decimal):
    return pl.Float64() if dtype.scale else pl.Int64()
  if isinstance(dtype, (pl.Categorical, pl.Enum)):
    return pl.String()
  if isinstance(dtype, (pl.List, pl.Array)):
    return pl.List(_normal(dtype.inner))
  return dtype


def _normal_expr(name: str, dtype: pl.DataType) -> pl.Expr:
  if isinstance(dtype, pl.Datetime):
    return pl.col(name).dt.epoch("ms")
  target = _normal(dtype)
  return pl.col(name) if target == dtype else pl.col(name).cast(target)


def _common(name: str, left: pl.DataType, right: pl.DataType) -> pl.DataType:
  """The type a column compares in: the sides' own when equal, the wider number, else the typed side's."""
  numeric = (pl.Int64(), pl.Float64())
  if left == right:
    return left
  if left in numeric and right in numeric:
    return pl.Float64()
  if left == pl.String() and not isinstance(right, pl.List):
    return right
  if right == pl.String() and not isinstance(left, pl.List):
    return left
  if pl.Null() in (left, right):
    return right if left == pl.Null() else left
  raise ValueError(f"column {name}: cannot compare {left} with {right}; convert it with --map or leave it out "
                   "with --columns")


def _renamed(schema: Mapping[str, pl.DataType], mappings: Sequence[ColumnMap], other: Set[str]):
  """(renames, conversions, our-name -> type) of a side; implicit: a timestamp ``x`` reads as ``x_ms``."""
  renames, conversions = {}, {}
  for m in mappings:
    if m.their in schema and m.our not in schema:
      renames[m.their] = m.our
      if m.conversion:
        conversions[m.our] = m.conversion
  for name, dtype in schema.items():
    ms = f"{name}_ms"
    if isinstance(dtype, pl.Datetime) and name not in renames and ms not in schema and ms in other:
      renames[name] = ms
  types = {}
  for name, dtype in schema.items():
    our = renames.get(name, name)
    types[our] = conversions[our].dtype if our in conversions else _normal(dtype)
  return renames, conversions, types


def make_plan(left: pa.Schema, right: pa.Schema, *, key: Sequence[str] = ("transaction_id",),
              mappings: Sequence[ColumnMap] = (), tolerances: Optional[Mapping[str, float]] = None,
              columns: Optional[Sequence[str]] = None, by: Optional[str] = None,
              time_column: str = "event_time_ms", shards: int = 16, samples: int = 10,
              since_ms: Optional[int] = None, until_ms: Optional[int] = None) -> Plan:
  """The plan for two sides' Arrow schemas; ``ValueError`` (one line) for anything that cannot be compared."""
  tolerances = dict(tolerances or {})
  if shards < 1 or samples < 0:
    raise ValueError("--shards must be at least 1 and --samples not negative")
  if by is not None and by not in WINDOWS_MS:
    raise ValueError(f"--by {by!r}: expected one of {', '.join(WINDOWS_MS)}")
  raw = [dict(pl.DataFrame(s.empty_table()).schema) for s in (left, right)]
  unused = [m for m in mappings if not any(m.their in r and m.our not in r for r in raw)]
  if unused:
    raise ValueError(f"--map {unused[0].their}={unused[0].our}: no side has {unused[0].their!r} "
                     f"without {unused[0].our!r}")
  # What each side is called once mapped: a timestamp x is read as x_ms when the other side maps to x_ms.
  mapped = [set(r) | {m.our for m in mappings if m.their in r and m.our not in r} for r in raw]
  l_renames, l_conv, l_types = _renamed(raw[0], mappings, mapped[1])
  r_renames, r_conv, r_types = _renamed(raw[1], mappings, mapped[0])
  for side, types in zip(SIDES, (l_types, r_types)):
    missing = [k for k in key if k not in types]
    if missing:
      raise ValueError(f"{side}: no key column {missing[0]!r} (columns: {', '.join(sorted(types))})")
  common = [c for c in l_types if c in r_types and c not in key]
  if columns is None:
    compared = common
  else:
    unknown = [c for c in columns if c not in common]
    if unknown:
      raise ValueError(f"--columns: {unknown[0]!r} is not a column of both sides (outside the key)")
    compared = list(columns)
  unknown = [c for c in tolerances if c not in compared]
  if unknown:
    raise ValueError(f"--tolerance: {unknown[0]!r} is not a compared column")
  timed = bool(by) or since_ms is not None or until_ms is not None
  bare = time_column[:-3] if time_column.endswith("_ms") else time_column
  if timed and time_column not in l_types and time_column not in r_types and bare in l_types and bare in r_types:
    time_column = bare  # two cold tables: event_time on both sides, a timestamp read as epoch ms
  if timed and (time_column not in l_types or time_column not in r_types):
    raise ValueError(f"--by and --from/--to need the time column {time_column!r} on both sides (--time_column)")
  if since_ms is not None and until_ms is not None and since_ms >= until_ms:
    raise ValueError("--to must be after --from")
  targets = {c: _common(c, l_types[c], r_types[c]) for c in list(key) + compared}
  for c, t in tolerances.items():
    if targets[c] not in (pl.Int64(), pl.Float64()):
      raise ValueError(f"--tolerance {c}: the column is {targets[c]}, not a number")
  if timed:
    targets.setdefault(time_column, pl.Int64())
  sides = []
  for schema, renames, conv, types in ((raw[0], l_renames, l_conv, l_types), (raw[1], r_renames, r_conv, r_types)):
    ours = {renames.get(n, n): n for n in schema}
    needed = list(dict.fromkeys(list(key) + compared + ([time_column] if timed else [])))
    sides.append(SidePlan(read=tuple(ours[c] for c in needed),
                          renames=tuple((t, o) for t, o in renames.items() if o in needed),
                          conversions=tuple((c, v) for c, v in conv.items() if c in needed),
                          casts=tuple((c, targets[c]) for c in needed if targets[c] != types[c])))
  return Plan(key=tuple(key), columns=tuple(compared), tolerances=tuple(sorted(tolerances.items())),
              time_column=time_column if timed else None, window_ms=WINDOWS_MS.get(by), shards=shards,
              samples=samples, left=sides[0], right=sides[1], since_ms=since_ms, until_ms=until_ms,
              columns_only_left=tuple(sorted(c for c in l_types if c not in r_types)),
              columns_only_right=tuple(sorted(c for c in r_types if c not in l_types)))


def _cast(value: pl.Expr, source: pl.DataType, target: pl.DataType) -> pl.Expr:
  """``value`` (of type ``source``) in type ``target``; null where it does not parse."""
  if source != pl.String():
    return value.cast(target, strict=False)
  text = value.str.strip_chars()
  if target == pl.Boolean():
    return text.str.to_lowercase().replace_strict(["true", "t", "1", "false", "f", "0"],
                                                  [True, True, True, False, False, False],
                                                  default=None, return_dtype=pl.Boolean)
  if target == pl.Date():
    return text.str.to_date(strict=False)
  return text.cast(target, strict=False)


def prepare(batch, side: SidePlan, plan: Plan) -> pl.DataFrame:
  """One batch of a side as compared: our names, converted, in the common types.

  ``__bad__<column>`` keeps the raw text of values that did not parse (a
  conversion's or a text column cast to the other side's type), and
  ``__window`` the window's start (epoch ms) when windows are asked for.
  """
  df = batch if isinstance(batch, pl.DataFrame) else pl.DataFrame(batch)
  df = df.rename(dict(side.renames))
  conversions, casts = dict(side.conversions), dict(side.casts)
  parsed, bad = [], []
  for name, dtype in df.schema.items():
    parses = name in conversions
    if parses:
      value, source = conversions[name].expr(name), conversions[name].dtype
    else:
      value, source = _normal_expr(name, dtype), _normal(dtype)
    if name in casts:
      parses = parses or source == pl.String()
      value = _cast(value, source, casts[name])
    parsed.append(value.alias(name))
    if parses:
      bad.append(pl.when(pl.col(name).is_not_null() & value.is_null()).then(pl.col(name).cast(pl.String))
                 .alias(_BAD + name))
  out = df.select(parsed + bad)
  if plan.since_ms is not None:
    out = out.filter(pl.col(plan.time_column) >= plan.since_ms)
  if plan.until_ms is not None:
    out = out.filter(pl.col(plan.time_column) < plan.until_ms)
  if plan.window_ms:
    out = out.with_columns((pl.col(plan.time_column) // plan.window_ms * plan.window_ms).alias(_WINDOW))
  keep = list(plan.key) + list(plan.columns) + [_BAD + c for c in plan.columns if _BAD + c in out.columns]
  return out.select(list(dict.fromkeys(keep + ([_WINDOW] if plan.window_ms else []))))


def shard_of(df: pl.DataFrame, plan: Plan) -> pl.Series:
  """Each row's shard: a seeded hash of the key, the same on every worker and for both sides."""
  key = pl.col(plan.key[0]) if len(plan.key) == 1 else pl.struct(list(plan.key))
  return df.select((key.hash(_SHARD_SEED) % plan.shards).cast(pl.Int64)).to_series()


def split_shards(df: pl.DataFrame, plan: Plan) -> Dict[int, pl.DataFrame]:
  """The rows of ``df`` by shard (shards without rows are absent)."""
  parts = df.with_columns(shard_of(df, plan).alias("__shard")).partition_by("__shard", as_dict=True)
  return {int(k[0]): part.drop("__shard") for k, part in parts.items()}


# -- one shard -----------------------------------------------------------------------------------------------------
_COUNTS = ("left_rows", "right_rows", "null_keys_left", "null_keys_right", "matched", "missing_in_left",
           "missing_in_right", "duplicates_left", "duplicates_right", "mismatched_rows")
_WINDOW_COUNTS = ("left_rows", "right_rows", "matched", "missing_in_left", "missing_in_right", "duplicates_left",
                  "duplicates_right", "mismatched_rows")


def empty(plan: Plan) -> dict:
  """The figures of no rows at all (what ``merge`` starts from)."""
  stats = {name: 0 for name in _COUNTS}
  stats.update(shards=0, mismatches_by_column={c: 0 for c in plan.columns}, windows={},
               samples={"missing_in_left": [], "missing_in_right": [], "duplicate": [],
                        "mismatches": {c: [] for c in plan.columns}})
  return stats


def _collapse(df: pl.DataFrame, plan: Plan, suffix: str) -> pl.DataFrame:
  """One row per key: the value of each column, ``__copies`` and, per column, whether the copies vary."""
  keys, columns = list(plan.key), list(plan.columns)
  bad = [c for c in df.columns if c.startswith(_BAD)]
  window = [_WINDOW] if plan.window_ms else []
  key = pl.col(keys[0]) if len(keys) == 1 else pl.struct(keys)
  df = df.with_columns(key.is_duplicated().alias("__dup"))
  unique = df.filter(~pl.col("__dup")).select(
      keys + columns + bad + window + [pl.lit(1, pl.UInt32).alias("__copies")]
      + [pl.lit(False).alias("__varies__" + c) for c in columns])
  copies = df.filter(pl.col("__dup")).group_by(keys).agg(
      [pl.col(c).first() for c in columns] + [pl.col(b).drop_nulls().first() for b in bad]
      + [pl.col(w).min() for w in window] + [pl.len().alias("__copies")]
      + [(pl.col(c).n_unique() > 1).alias("__varies__" + c) for c in columns])
  both = pl.concat([unique, copies.select(unique.columns)]) if copies.height else unique
  return both.rename({c: c + suffix for c in both.columns if c not in keys})


def _equal(plan: Plan, column: str) -> pl.Expr:
  left, right = pl.col(column + "__l"), pl.col(column + "__r")
  equal = left.eq_missing(right)
  tolerance = dict(plan.tolerances).get(column)
  if tolerance:
    equal = equal | ((left - right).abs() <= tolerance).fill_null(False)
  return equal


def _flag(name: str, frame: pl.DataFrame) -> pl.Expr:
  return pl.col(name).is_not_null() if name in frame.columns else pl.lit(False)


def compare(left: pl.DataFrame, right: pl.DataFrame, plan: Plan) -> dict:
  """The figures and samples of one shard: ``left`` and ``right`` are ``prepare``d rows of the same keys."""
  keys = list(plan.key)
  stats = empty(plan)
  stats.update(shards=1, left_rows=left.height, right_rows=right.height)
  valid = pl.all_horizontal([pl.col(k).is_not_null() for k in keys])
  stats["null_keys_left"] = left.height - left.filter(valid).height
  stats["null_keys_right"] = right.height - right.filter(valid).height
  joined = (_collapse(left.filter(valid), plan, "__l").with_columns(pl.lit(True).alias("__in__l"))
            .join(_collapse(right.filter(valid), plan, "__r").with_columns(pl.lit(True).alias("__in__r")),
                  on=keys, how="full", coalesce=True))
  in_left, in_right = pl.col("__in__l").fill_null(False), pl.col("__in__r").fill_null(False)
  flags = [in_left & in_right, ~in_left, ~in_right, pl.col("__copies__l").fill_null(0) > 1,
           pl.col("__copies__r").fill_null(0) > 1]
  names = ["matched", "missing_in_left", "missing_in_right", "duplicates_left", "duplicates_right"]
  for c in plan.columns:
    differs = (~_equal(plan, c) | pl.col("__varies__" + c + "__l").fill_null(False)
               | pl.col("__varies__" + c + "__r").fill_null(False)
               | _flag(_BAD + c + "__l", joined) | _flag(_BAD + c + "__r", joined))
    flags.append(in_left & in_right & differs)
    names.append("__mismatch__" + c)
  mismatch = [n for n in names if n.startswith("__mismatch__")]
  flagged = joined.with_columns([f.alias(n) for f, n in zip(flags, names)]).with_columns(
      pl.any_horizontal(mismatch).alias("mismatched_rows") if mismatch else pl.lit(False).alias("mismatched_rows"))
  counts = flagged.select(pl.col(names + ["mismatched_rows"]).sum()).row(0, named=True)
  for name in names[:5] + ["mismatched_rows"]:
    stats[name] = int(counts[name])
  stats["mismatches_by_column"] = {c: int(counts["__mismatch__" + c]) for c in plan.columns}
  if plan.window_ms:
    stats["windows"] = _windows(left, right, flagged)
  stats["samples"] = _samples(flagged, plan)
  return stats


def _windows(left: pl.DataFrame, right: pl.DataFrame, flagged: pl.DataFrame) -> Dict[Optional[int], dict]:
  """Per window start: rows read by their own time, key figures by the left row's window (else the right's)."""
  window = pl.coalesce(pl.col(_WINDOW + "__l"), pl.col(_WINDOW + "__r")).alias(_WINDOW)
  by_key = flagged.group_by(window).agg(pl.col(list(_WINDOW_COUNTS[2:])).sum())
  rows = [side.group_by(_WINDOW).agg(pl.len().alias(name)) for side, name in ((left, "left_rows"),
                                                                             (right, "right_rows"))]
  table = by_key.join(rows[0], on=_WINDOW, how="full", coalesce=True).join(rows[1], on=_WINDOW, how="full",
                                                                             coalesce=True)
  out = {}
  for row in table.to_dicts():
    out[row.pop(_WINDOW)] = {name: int(row.get(name) or 0) for name in _WINDOW_COUNTS}
  return out


def _key(row: dict, plan: Plan) -> list:
  return [row[k] for k in plan.key]


def _samples(flagged: pl.DataFrame, plan: Plan) -> dict:
  """At most ``plan.samples`` examples of each kind, the smallest keys first (so merging shards is exact)."""
  n, keys = plan.samples, list(plan.key)

  def first(condition: pl.Expr, columns: List[str]) -> List[dict]:
    return flagged.filter(condition).sort(keys).head(n).select(keys + columns).to_dicts()

  out = {"missing_in_left": [{"key": _key(r, plan)} for r in first(pl.col("missing_in_left"), [])],
         "missing_in_right": [{"key": _key(r, plan)} for r in first(pl.col("missing_in_right"), [])],
         "duplicate": [], "mismatches": {}}
  for side, suffix in (("left", "__l"), ("right", "__r")):
    for r in first(pl.col("duplicates_" + side), ["__copies" + suffix]):
      out["duplicate"].append({"key": _key(r, plan), "side": side, "copies": int(r["__copies" + suffix])})
  out["duplicate"] = sorted(out["duplicate"], key=_order)[:n]
  for c in plan.columns:
    shown = [c + "__l", c + "__r"] + [b for b in (_BAD + c + "__l", _BAD + c + "__r") if b in flagged.columns]
    rows = first(pl.col("__mismatch__" + c), shown)
    out["mismatches"][c] = [{"key": _key(r, plan), "left": _shown(r, c + "__l"), "right": _shown(r, c + "__r")}
                            for r in rows]
  return out


def _shown(row: dict, column: str):
  """A sample's value: the raw text when it did not parse, else the value (JSON-safe)."""
  bad = row.get(_BAD + column)
  return f"unparsed: {bad}" if bad is not None else _jsonable(row[column])


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, list):
    return [_jsonable(v) for v in value]
  return value


def _order(sample: dict):
  return tuple(sample["key"]), sample.get("side", "")


def merge(a: dict, b: dict, samples: int) -> dict:
  """``a`` and ``b`` added up (in place into ``a``); samples keep the ``samples`` smallest keys of each kind."""
  for name in _COUNTS + ("shards",):
    a[name] += b[name]
  for c, n in b["mismatches_by_column"].items():
    a["mismatches_by_column"][c] = a["mismatches_by_column"].get(c, 0) + n
  for w, figures in b["windows"].items():
    mine = a["windows"].setdefault(w, dict.fromkeys(_WINDOW_COUNTS, 0))
    for name, n in figures.items():
      mine[name] += n
  for kind in ("missing_in_left", "missing_in_right", "duplicate"):
    a["samples"][kind] = sorted(a["samples"][kind] + b["samples"][kind], key=_order)[:samples]
  for c, rows in b["samples"]["mismatches"].items():
    a["samples"]["mismatches"][c] = sorted(a["samples"]["mismatches"].get(c, []) + rows, key=_order)[:samples]
  return a


def parity(stats: dict) -> bool:
  """True when the sides hold the same keys, once each, with equal values (within tolerances)."""
  return not any(stats[name] for name in ("null_keys_left", "null_keys_right", "missing_in_left",
                                          "missing_in_right", "duplicates_left", "duplicates_right",
                                          "mismatched_rows"))
