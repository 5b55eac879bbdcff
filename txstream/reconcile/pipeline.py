"""The reconciliation as a Beam pipeline: read both sides in splits, shard by key, compare shards, add up.

Elements that cross a shuffle are ``(shard, (side, Arrow IPC bytes))``: a
side's rows of one shard from one read batch, only the key, the compared
columns and the window, LZ4-compressed. Everything there has Beam's
deterministic primitive coders (no pickling of tables). A shard's left and
right rows meet in one ``GroupByKey`` and are compared with polars
(``compare.compare``); the shards' figures are added up by one
``CombineGlobally``. No side is ever collected whole: memory per worker
follows a shard. On the in-process FnApiRunner, which holds every shuffled
byte in memory, the pieces are spilled to files in a temporary directory and
only their names cross the shuffle (10M rows a side: 0.9 GiB peak instead
of 8.8 GiB, and twice as fast).
"""
import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Iterable, Mapping, Optional, Tuple

import apache_beam as beam
import polars as pl
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import PBegin, PCollection

from txstream.reconcile import compare
from txstream.runners.profiles import run_context, runner_for

_LOGGER = logging.getLogger(__name__)
Piece = Tuple[int, Tuple[str, bytes]]
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")  # measured: 3x faster to write than zstd, 30% larger
_SPILLED = b"spilled:"  # an IPC stream starts with 0xFFFFFFFF, never with this


def encode(df: pl.DataFrame, spill_dir: Optional[str] = None) -> bytes:
  """``df`` as IPC bytes; with ``spill_dir``, written to a file there and the bytes name the file."""
  table = df.to_arrow()
  path = os.path.join(spill_dir, f"{uuid.uuid4().hex}.arrow") if spill_dir else None
  sink = pa.OSFile(path, "wb") if path else pa.BufferOutputStream()
  with sink, pa.ipc.new_stream(sink, table.schema, options=_IPC) as writer:
    writer.write_table(table)
  return _SPILLED + path.encode() if path else sink.getvalue().to_pybytes()


def decode(data: bytes) -> pl.DataFrame:
  """The rows ``encode`` wrote (a spilled file stays until the run ends, so a retried bundle reads it again)."""
  if not data.startswith(_SPILLED):
    with pa.ipc.open_stream(data) as reader:
      return pl.DataFrame(reader.read_all())
  path = data[len(_SPILLED):].decode()
  with pa.OSFile(path) as f, pa.ipc.open_stream(f) as reader:
    return pl.DataFrame(reader.read_all())


class _Progress:
  """A line on the log every ``interval_s`` while a stage works (each worker speaks for itself)."""

  def __init__(self, interval_s: float, what: str):
    self._interval_s = interval_s
    self._what = what
    self._since = time.monotonic()
    self.counts = {}

  def add(self, name: str, n: int) -> None:
    self.counts[name] = self.counts.get(name, 0) + n
    now = time.monotonic()
    if now - self._since >= self._interval_s:
      self._since = now
      _LOGGER.info("reconcile: %s %s", self._what, ", ".join(f"{k} {v:,}" for k, v in sorted(self.counts.items())))


class _ReadShardsFn(beam.DoFn):
  """Reads one split of a side and emits its rows, prepared for comparing, as one piece per shard."""

  def __init__(self, sources, plan: compare.Plan, progress_interval_s: float, spill_dir: Optional[str]):
    self._sources = sources
    self._plan = plan
    self._progress_interval_s = progress_interval_s
    self._spill_dir = spill_dir
    self._progress = None

  def setup(self):
    self._progress = _Progress(self._progress_interval_s, "rows read:")

  def process(self, element: Tuple[str, object]) -> Iterable[Piece]:
    side, split = element
    plan = self._plan
    source, side_plan = self._sources[side], plan.side(side)
    for batch in source.read(split, side_plan.read):
      prepared = compare.prepare(batch, side_plan, plan)
      for shard, rows in compare.split_shards(prepared, plan).items():
        yield shard, (side, encode(rows, self._spill_dir))
      self._progress.add(side, batch.num_rows)


class _CompareShardFn(beam.DoFn):
  """Compares one shard's left and right rows; emits the shard's figures and samples."""

  def __init__(self, plan: compare.Plan, progress_interval_s: float):
    self._plan = plan
    self._progress_interval_s = progress_interval_s
    self._progress = None

  def setup(self):
    self._progress = _Progress(self._progress_interval_s, f"of {self._plan.shards} shards:")

  def process(self, element: Tuple[int, Iterable[Tuple[str, bytes]]]) -> Iterable[dict]:
    _, pieces = element
    frames = {side: [] for side in compare.SIDES}
    for side, data in pieces:
      frames[side].append(decode(data))
    left, right = (pl.concat(frames[s], how="vertical_relaxed") if frames[s] else None for s in compare.SIDES)
    left = left if left is not None else right.clear()
    right = right if right is not None else left.clear()
    yield compare.compare(_align(left, right), _align(right, left), self._plan)
    self._progress.add("compared", 1)


def _align(df: pl.DataFrame, other: pl.DataFrame) -> pl.DataFrame:
  """``df`` with the columns only ``other`` has (a side that never failed to parse has no ``__bad__``), as nulls."""
  missing = [pl.lit(None, dtype).alias(name) for name, dtype in other.schema.items() if name not in df.columns]
  return df.with_columns(missing) if missing else df


class _MergeStatsFn(beam.CombineFn):
  def __init__(self, plan: compare.Plan):
    self._plan = plan

  def create_accumulator(self):
    return compare.empty(self._plan)

  def add_input(self, mutable_accumulator, element):
    return compare.merge(mutable_accumulator, element, self._plan.samples)

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    out = next(accumulators)
    for a in accumulators:
      out = compare.merge(out, a, self._plan.samples)
    return out

  def extract_output(self, accumulator):
    return accumulator


class Reconcile(beam.PTransform[PBegin, PCollection[dict]]):
  """Both sides compared by key: one dict of figures and samples (``compare.empty``'s layout).

  ``sources`` maps ``left``/``right`` to a source of ``reconcile.sources``;
  its splits are listed when the graph is built. Batch only. ``spill_dir``:
  shuffled rows go to files there and only their names through the runner;
  for runners whose workers share this machine's disk (the in-process
  FnApiRunner, which would otherwise hold every shuffled byte in memory).
  """

  def __init__(self, sources, plan: compare.Plan, progress_interval_s: float = 5.0,
               spill_dir: Optional[str] = None):
    super().__init__()
    if set(sources) != set(compare.SIDES):
      raise ValueError("sources must be given for left and right")
    if progress_interval_s <= 0:
      raise ValueError("progress_interval_s must be positive")
    self._sources = dict(sources)
    self._plan = plan
    self._progress_interval_s = progress_interval_s
    self._spill_dir = spill_dir

  def expand(self, pbegin: PBegin) -> PCollection[dict]:
    splits = [(side, split) for side in compare.SIDES for split in self._sources[side].splits()]
    return (pbegin
            | "Splits" >> beam.Create(splits)
            | "ReadAndShard" >> beam.ParDo(_ReadShardsFn(self._sources, self._plan, self._progress_interval_s,
                                                               self._spill_dir))
            .with_output_types(Piece)
            | "GroupByShard" >> beam.GroupByKey()
            | "CompareShards" >> beam.ParDo(_CompareShardFn(self._plan, self._progress_interval_s))
            | "AddUp" >> beam.CombineGlobally(_MergeStatsFn(self._plan)))


def _to_json(stats: dict) -> str:
  return json.dumps(dict(stats, windows={"null" if w is None else str(w): v for w, v in stats["windows"].items()}))


def run(sources: Mapping[str, object], plan: compare.Plan, options: PipelineOptions, work_dir: str,
        progress_interval_s: float = 5.0) -> dict:
  """Runs ``Reconcile`` on the runner ``options`` name and returns its figures (window keys as text).

  The figures travel back through one small file under ``work_dir`` (any
  Beam filesystem the workers and the driver share), removed once read.
  """
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  path = FileSystems.join(work_dir, f".reconcile-{uuid.uuid4().hex}.json")
  runner = runner_for(options)
  local = isinstance(runner, fn_runner.FnApiRunner)
  with (tempfile.TemporaryDirectory(prefix="txstream-reconcile-") if local else contextlib.nullcontext()) as spill:
    pipeline = beam.Pipeline(runner=runner, options=options)
    _ = (pipeline
         | "Reconcile" >> Reconcile(sources, plan, progress_interval_s, spill)
         | "ToJson" >> beam.Map(_to_json)
         | "WriteFigures" >> beam.io.WriteToText(path, num_shards=1, shard_name_template=""))
    with run_context(runner):
      pipeline.run().wait_until_finish()
  with FileSystems.open(path) as f:
    stats = json.loads(f.read())
  FileSystems.delete([path])
  return stats
