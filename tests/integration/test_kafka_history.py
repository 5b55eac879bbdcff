"""Incremental bounded runs from Kafka (``--kafka_history earliest``, the default) equal one full run.

Traffic (with damaged records and labels) is produced in two halves, each
followed by a bounded run of the same consumer group; a second group reads
everything in one run. The cold tier of the incremental runs must hold every
transaction once, with exactly the full run's features and scores, and the
runs' summaries must each account for their own records only. The same two
increments without history must differ (the test can tell).
"""
import glob
import os
import uuid

import pyarrow.parquet as pq

from txstream.io import kafka
from txstream.pipelines import generate, run
from txstream.core.contracts import FEATURE_NAMES

COLUMNS = ["transaction_id", "score"] + [n.lower() for n in FEATURE_NAMES]


def _run(bootstrap, topic, group, cold, extra=()):
  reference = os.path.join(os.path.dirname(cold), "g", "reference")
  argv = [f"--bootstrap_servers={bootstrap}", f"--topic={topic}", f"--labels_topic={topic}.labels",
          f"--group_id={group}", f"--reference_dir={reference}", f"--cold_path={cold}",
          f"--dead_letter_path={cold}-dead"] + list(extra)
  summary = run.run(argv)
  assert summary["scored"] + summary["dead_letter_total"] + summary["filtered"] == summary["events_in"], summary
  return summary


def _cold(cold):
  rows = {}
  for path in glob.glob(os.path.join(cold, "decisions", "**", "*.parquet"), recursive=True):
    for row in pq.read_table(path, columns=COLUMNS).to_pylist():
      assert row["transaction_id"] not in rows, "a transaction written twice"
      rows[row["transaction_id"]] = row
  return rows


def test_incremental_runs_with_history_match_one_full_run(services, tmp_path):
  broker = services.require("kafka")
  bootstrap = f"{broker.host}:{broker.port}"
  data = str(tmp_path / "g")
  generate.generate(data, customers=120, terminals=200, days=10, start=generate.datetime.date(2018, 4, 1), seed=9,
                    corrupt_fraction=0.02)
  topic = f"it-history-{uuid.uuid4().hex[:8]}"
  config = kafka.KafkaConfig(bootstrap, topic=topic)
  kafka.ensure_topic(config, topic, 2)
  kafka.ensure_topic(config, f"{topic}.labels", 1)
  items = list(generate.timeline(data, topic, f"{topic}.labels"))
  half = len(items) // 2

  kafka.produce_messages(config, topic, items[:half])
  first = _run(bootstrap, topic, "inc", str(tmp_path / "inc"))  # --kafka_history earliest, the default
  plain_first = _run(bootstrap, topic, "plain", str(tmp_path / "plain"), ["--kafka_history=none"])
  kafka.produce_messages(config, topic, items[half:])
  second = _run(bootstrap, topic, "inc", str(tmp_path / "inc"))
  plain_second = _run(bootstrap, topic, "plain", str(tmp_path / "plain"), ["--kafka_history=none"])
  full = _run(bootstrap, topic, "full", str(tmp_path / "full"), ["--kafka_start=earliest"])

  for key in ("events_in", "scored", "dead_letter_total", "filtered"):
    assert first[key] + second[key] == full[key], key
  assert first["events_in"] > 500 and second["events_in"] > 500 and full["dead_letter_total"] > 0
  incremental, whole = _cold(str(tmp_path / "inc")), _cold(str(tmp_path / "full"))
  assert len(whole) == full["scored"]
  assert incremental == whole
  plain = _cold(str(tmp_path / "plain"))
  assert plain.keys() == whole.keys() and plain != whole  # without history the second run's features are short
  assert plain_first["scored"] + plain_second["scored"] == full["scored"]
