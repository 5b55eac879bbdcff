"""DecideLive without a broker: history replay, labels, dead letters, offset commits, model swaps."""
import os
import time

import apache_beam as beam
import numpy as np
import pytest
import xgboost
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from txstream.core.contracts import FEATURE_NAMES
from txstream.models import artifacts
from txstream.pipelines import generate
from txstream.transforms.live import DecideLive, parse_source


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("g"))
  generate.generate(out, customers=5, terminals=20, days=1, start=generate.datetime.date(2018, 4, 1), seed=2)
  return f"{out}/reference"


def _raw(offset, value, topic="tx", partition=0):
  """One record as the reader batches it (a batch holds consecutive offsets of one partition)."""
  return h.raw_batch([(f"{topic}/{partition}@{offset}", value)])


def test_parse_source():
  assert parse_source("a/b.c/7@42") == ("a/b.c", 7, 42)


def test_history_builds_state_without_decisions_then_decisions_use_it(reference):
  # Customer 1 at terminal 10: offsets 0-2 are history (below the committed 3),
  # a fraud label for tx 0 arrives on the labels topic, then 3 and 4 are decided.
  records = [_raw(i, h.message(h.tx_record(i, h.T0 + i * h.HOUR_MS))) for i in range(3)]
  records.append(_raw(0, h.label_message("tx-00000", h.T0 + 2 * h.HOUR_MS, h.T0, 1, 10), topic="lb"))
  records += [_raw(3, h.message(h.tx_record(3, h.T0 + 3 * h.HOUR_MS))), _raw(4, b"\x07junk")]
  with TestPipeline() as p:
    out = (p | beam.Create(records)
           | DecideLive(None, "tx", "lb", {("tx", 0): 3, ("lb", 0): 0}, reference))
    assert_that(h.flat(out.decisions, "Features", "transaction_id", "customer_id_nb_tx_1day_window",
                       "terminal_id_known_frauds_30day"), equal_to([("tx-00003", 4.0, 1.0)]), label="decided")
    assert_that(h.flat(out.dead_letters, "Dead", "source", "reason"), equal_to([("tx/0@4", "bad_magic_byte")]),
                label="dead")


def test_bad_history_is_not_dead_lettered_again(reference):
  # Below the committed offset a bad record was dead-lettered by the run that read it first.
  with TestPipeline() as p:
    out = p | beam.Create([_raw(0, None), _raw(1, None)]) | DecideLive(None, "tx", None, {("tx", 0): 1}, reference)
    assert_that(h.flat(out.dead_letters, "Dead", "source", "reason"), equal_to([("tx/0@1", "null_value")]))


class _Finalizer:
  def __init__(self):
    self.callbacks = []

  def register(self, callback):
    self.callbacks.append(callback)


class _Committer:
  def __init__(self):
    self.commits = []

  def commit(self, offsets, asynchronous):
    assert asynchronous is False
    self.commits.append(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))

  def close(self):
    pass


def test_bundle_finalizer_commits_what_the_bundle_decided_never_replayed_offsets(reference):
  fn = DecideLive(None, "tx", None, {("tx", 0): 2, ("tx", 1): 0}, reference)._fn
  fn.setup()
  fn._committer = committer = _Committer()  # pylint: disable=protected-access
  for records in ([_raw(0, h.message(h.tx_record(0, h.T0)))],  # replayed history only
                  [_raw(1, h.message(h.tx_record(1, h.T0 + 1))), _raw(2, h.message(h.tx_record(2, h.T0 + 2))),
                   _raw(7, h.message(h.tx_record(7, h.T0 + 3)), partition=1)]):
    finalizer = _Finalizer()
    fn.start_bundle()
    for raw in records:
      list(fn.process(raw, finalizer))
    list(fn.finish_bundle())
    assert len(finalizer.callbacks) == 1  # one per bundle, called by the runner after the sinks
    finalizer.callbacks[0]()
  fn.teardown()
  # The first bundle replayed offset 0 (committed position 2): nothing to commit.
  assert committer.commits == [[("tx", 0, 3), ("tx", 1, 8)]]


def test_a_new_model_matching_the_watch_pattern_replaces_the_current_one(reference, tmp_path):
  rng = np.random.default_rng(1)
  x = rng.random((200, len(FEATURE_NAMES)), dtype=np.float32) * 100
  model = xgboost.XGBClassifier(n_estimators=3, max_depth=2, n_jobs=1).fit(x, x[:, 0] > 50)
  model.save_model(str(tmp_path / "m.json"))
  fn = DecideLive(None, "tx", None, {}, reference,
                  model_watch_pattern=str(tmp_path / "models" / "*" / "model.json"), model_check_s=0)._fn
  fn.setup()
  bundled = fn._model.version  # pylint: disable=protected-access

  def decide(i):
    fn.start_bundle()
    out = list(fn.process(_raw(i, h.message(h.tx_record(i, h.T0 + i))), _Finalizer()))
    out += [w.value for w in fn.finish_bundle()]
    return h.rows(out[0], "model_version")[0][0]

  assert decide(0) == bundled  # nothing matches yet
  (tmp_path / "models" / "broken").mkdir(parents=True)
  (tmp_path / "models" / "broken" / "model.json").write_text("{}")  # no metadata: refused, scoring goes on
  assert decide(1) == bundled
  meta = artifacts.write_artifact(str(tmp_path / "models" / "v2"), (tmp_path / "m.json").read_bytes(),
                                  {"feature_names": list(FEATURE_NAMES)})
  os.utime(tmp_path / "models" / "v2" / "model.json", (time.time() + 5, time.time() + 5))  # the newest
  decide(2)  # the switch happens between bundles
  assert decide(3) == meta["version"] != bundled
  fn.teardown()
