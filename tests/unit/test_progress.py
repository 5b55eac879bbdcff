"""Progress of a bounded run: the lines, the time-left arithmetic, terminal and log formats, a real run."""
import datetime
import io
import json
import re

from txstream import cli, progress
from txstream.pipelines import generate


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _reporter(total=None, terminal=False, interval_s=10.0):
  tally, clock, stream = progress.Tally(), _Clock(), io.StringIO()
  reporter = progress.ProgressReporter(interval_s, total, stream=stream, tally=tally, clock=clock,
                                       terminal=terminal)
  return reporter, tally, clock, stream


def test_time_left_at_the_average_rate():
  assert progress.time_left(250, 1000, 10.0) == 30.0
  assert progress.time_left(1000, 1000, 10.0) == 0.0
  assert progress.time_left(1200, 1000, 10.0) == 0.0  # more than announced: never negative
  assert progress.time_left(0, 1000, 10.0) is None
  assert progress.time_left(250, None, 10.0) is None


def test_expected_events_counts_transactions_only():
  files = [{"stream": "transactions", "records": [0, 700]}, {"stream": "transactions", "records": [0, 300]},
           {"stream": "labels", "records": [0, 50]}]
  kafka = [{"stream": "transactions", "partition": 0, "offsets": [10, 60]},
           {"stream": "transactions", "partition": 1, "offsets": [0, 25]},
           {"stream": "labels", "partition": 0, "offsets": [0, 9]}]
  assert progress.expected_events(files) == 1000
  assert progress.expected_events(kafka) == 75
  assert progress.expected_events([]) is None


def test_lines_every_interval_off_a_terminal():
  reporter, tally, clock, stream = _reporter(total=1000)
  tally.add("events_in", 7)  # a previous run in this process: not this run's
  reporter.start()
  tally.add("events_in", 250)
  tally.add("scored", 200)
  clock.now += 10
  reporter.tick()
  tally.add("events_in", 250)
  tally.add("scored", 300)
  clock.now += 10
  reporter.tick()
  reporter.stop()
  reporter.finish(1000, 990)
  assert stream.getvalue().splitlines() == [
      "txstream: progress: 250 of 1,000 events read, 200 (20%) decisions, 25 events/s, 0:10 elapsed, "
      "about 0:40 left",
      "txstream: progress: 500 of 1,000 events read, 500 (50%) decisions, 25 events/s, 0:20 elapsed, "
      "about 0:20 left",
      "txstream: progress: 1,000 of 1,000 events read, 990 (99%) decisions, 50 events/s, 0:20 elapsed, done",
  ]


def test_one_redrawn_line_on_a_terminal():
  reporter, tally, clock, stream = _reporter(terminal=True)
  reporter.start()
  tally.add("events_in", 12_345)
  clock.now += 3723
  reporter.tick()
  tally.add("events_in", 5)
  reporter.tick()
  reporter.stop()
  reporter.finish(12_350, 12_000, elapsed=3723.0)
  text = stream.getvalue()
  first = "txstream: progress: 12,345 events read, 0 decisions, 3 events/s, 1:02:03 elapsed"
  second = first.replace("12,345", "12,350")
  assert text.startswith("\r" + first + "\r" + second + "\n")
  assert text.endswith("txstream: progress: 12,350 events read, 12,000 decisions, 3 events/s, 1:02:03 elapsed, "
                       "done\n")
  assert text.count("\n") == 2


def test_says_once_when_nothing_is_counted_here():
  reporter, _, clock, stream = _reporter(total=10)
  reporter.start()
  for _ in range(3):
    clock.now += 10
    reporter.tick()
  reporter.stop()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 1 and "not available" in lines[0]


def test_interval_zero_writes_nothing():
  reporter, tally, _, stream = _reporter(interval_s=0)
  reporter.start()
  tally.add("events_in", 10)
  reporter.stop()
  reporter.finish(10, 10)
  assert stream.getvalue() == ""


def test_a_real_run_reports_its_totals_on_stderr(tmp_path, capsys):
  data = str(tmp_path / "data")
  generate.generate(data, customers=50, terminals=100, days=3, start=datetime.date(2018, 4, 1), seed=1)
  assert cli.main(["run", f"--input={data}", f"--cold_path={tmp_path}/cold",
                   f"--dead_letter_path={tmp_path}/dead", "--progress_interval_s=0.2"]) == 0
  captured = capsys.readouterr()
  summary = json.loads(captured.out)  # stdout holds the summary alone
  lines = [line for line in captured.err.splitlines() if line.startswith(progress.PREFIX)]
  assert lines, captured.err
  final = re.match(r"txstream: progress: ([\d,]+) of ([\d,]+) events read, ([\d,]+) \(\d+%\) decisions, .* done$",
                   lines[-1])
  assert final, lines[-1]
  events, total, decisions = (int(g.replace(",", "")) for g in final.groups())
  assert events == total == summary["events_in"] > 0
  assert decisions == summary["scored"] > 0
