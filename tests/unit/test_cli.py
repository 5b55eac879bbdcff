"""The `txstream` command: help for every subcommand, one-line errors, exit codes."""
import argparse
import io
import json
import logging
import os
import platform
import re
import subprocess
import sys

import apache_beam
import pytest

import txstream
from txstream import cli

TXSTREAM = [sys.executable, "-m", "txstream.cli"]


def _one_line_error(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("txstream: error: ")
  assert "\n" not in err and "Traceback" not in err
  return err


@pytest.mark.parametrize("command", [[], ["generate"], ["run"], ["stream"], ["train"]])
def test_help(command):
  done = subprocess.run(TXSTREAM + command + ["--help"], capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert "usage:" in done.stdout


def test_run_help_lists_own_flags(capsys):
  assert cli.main(["run", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--input", "--cold_path", "--redis_url", "--summary_json", "--model_dir"):
    assert flag in out


def test_unknown_flag(capsys):
  assert "--no_such_flag" in _one_line_error(capsys, ["run", "--input", "x", "--no_such_flag=1"])


def test_bad_value(capsys):
  assert "allowed_lateness_s" in _one_line_error(capsys, ["run", "--input", "x", "--allowed_lateness_s", "soon"])


def test_missing_input(capsys, tmp_path):
  assert "no such directory" in _one_line_error(capsys, ["run", "--input", str(tmp_path / "absent")])
  assert "--input" in _one_line_error(capsys, ["run"])


def test_not_generated_input(capsys, tmp_path):
  assert "missing transactions/" in _one_line_error(capsys, ["run", "--input", str(tmp_path)])


def test_corrupt_model(capsys, tmp_path):
  (tmp_path / "transactions").mkdir()
  (tmp_path / "labels").mkdir()
  (tmp_path / "reference").mkdir()
  model = tmp_path / "model"
  model.mkdir()
  (model / "metadata.json").write_text(json.dumps({"content_hash": "0" * 64}))
  (model / "model.json").write_text("{}")
  assert "content hash" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--model_dir", str(model)])
  assert "cannot read" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--model_dir",
                                                   str(tmp_path / "nomodel")])


def test_bad_rules(capsys, tmp_path):
  for sub in ("transactions", "labels", "reference"):
    (tmp_path / sub).mkdir()
  rules = tmp_path / "rules.yaml"
  rules.write_text("version: 1\nrules:\n  - code: X\n    feature: NOT_A_FEATURE\n    op: '>'\n    value: 1\n"
                   "    action: review\n")
  assert "NOT_A_FEATURE" in _one_line_error(capsys, ["run", "--input", str(tmp_path), "--rules", str(rules)])


def test_generate_errors(capsys, tmp_path):
  assert "not a date" in _one_line_error(capsys, ["generate", "--out", str(tmp_path), "--start", "April"])
  assert "corrupt_fraction" in _one_line_error(capsys, ["generate", "--out", str(tmp_path),
                                                        "--corrupt_fraction", "2"])


def test_unknown_command(capsys):
  assert "invalid choice" in _one_line_error(capsys, ["frobnicate"])


def test_console_script_error_has_no_traceback(tmp_path):
  done = subprocess.run(TXSTREAM + ["run", "--input", str(tmp_path / "absent")], capture_output=True, text=True,
                        timeout=120, check=False, env=dict(os.environ, PYTHONWARNINGS="ignore"))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [f"txstream: error: --input {tmp_path / 'absent'}: no such directory"]


def test_stream_help_lists_live_flags(capsys):
  assert cli.main(["stream", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--topic", "--labels_topic", "--decisions_topic", "--duration_s", "--warmup", "--redis_url"):
    assert flag in out


@pytest.mark.parametrize("argv,expected", [
    ([], "--topic"),
    (["--topic=t", "--reference_dir=/no/such/dir"], "--reference_dir"),
    (["--topic=t", "--input=x"], "--input"),
    (["--topic=t", "--reference_dir=.", "--kafka_stop_at=end"], "bounded"),
    (["--topic=t", "--reference_dir=.", "--kafka_io=xlang"], "xlang"),
    (["--topic=t", "--reference_dir=.", "--direct_num_workers=2"], "one worker"),
    (["--topic=t", "--reference_dir=.", "--duration_s=0"], "--duration_s"),
    (["--topic=t", "--reference_dir=.", "--postgres_dsn=host=x"], "deterministic"),
    (["--topic=t", "--reference_dir=.", "--clickhouse_url=clickhouse://x/db"], "deterministic"),
])
def test_stream_config_errors_are_one_line(capsys, argv, expected):
  assert expected in _one_line_error(capsys, ["stream"] + argv)


def test_streaming_graph_for_other_runners_builds_with_kafka_sources_and_sinks(tmp_path):
  """Flink/Dataflow get the full graph in streaming mode (built here, not run: no such runner on CI)."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import StandardOptions
  from txstream.pipelines import generate, stream
  data = str(tmp_path / "g")
  generate.generate(data, customers=5, terminals=10, days=1, start=generate.datetime.date(2018, 4, 1), seed=1)
  options = cli.pipeline_options(["--runner=FlinkRunner", "--topic=t", "--labels_topic=t.labels",
                                  f"--reference_dir={data}/reference", "--bootstrap_servers=127.0.0.1:1",
                                  "--no_cold", "--dead_letter_path="])
  options.view_as(StandardOptions).streaming = True
  pipeline = beam.Pipeline(options=options)
  with pytest.MonkeyPatch.context() as mp:  # no broker here: the read's partitions are resolved lazily
    from txstream.io import kafka_read
    mp.setattr(kafka_read, "resolve_ranges", lambda *a, **k: {0: (0, kafka_read.UNBOUNDED)})
    stream.build_streaming_graph(pipeline, options, stream.live_tiers(options))
  labels = {t.full_label for t in pipeline.transforms_stack[0].parts}
  assert {"ReadTransactions", "ReadLabels", "DecodeAndValidate", "Enrich", "ComputeFeatures", "Score",
          "DecisionsToKafka", "DeadLettersToKafka"} <= labels


def test_a_runner_that_is_not_installed_is_one_line(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("TXSTREAM_SERVICES_DIR", str(tmp_path / "services"))  # nothing installed there
  for sub in ("transactions", "labels", "reference"):
    (tmp_path / "in" / sub).mkdir(parents=True)
  for runner in ("FlinkRunner", "PrismRunner"):
    err = _one_line_error(capsys, ["run", f"--input={tmp_path / 'in'}", f"--runner={runner}", "--no_cold",
                                   "--dead_letter_path="])
    assert "is not installed: run `txstream services up" in err, err


def test_local_runners_get_what_the_services_step_installed(tmp_path, monkeypatch):
  from apache_beam.options.pipeline_options import PortableOptions, PrismRunnerOptions
  from txstream.runners import install, profiles
  monkeypatch.setenv("TXSTREAM_SERVICES_DIR", str(tmp_path))
  install.prism_path().parent.mkdir(parents=True)
  install.prism_path().write_text("")
  options = cli.pipeline_options(["--runner=PrismRunner"])
  assert profiles.runner_for(options) == "PrismRunner"
  assert options.view_as(PrismRunnerOptions).prism_location == str(install.prism_path())
  explicit = cli.pipeline_options(["--runner=PrismRunner", "--prism_location=/opt/prism"])
  profiles.runner_for(explicit)
  assert explicit.view_as(PrismRunnerOptions).prism_location == "/opt/prism"
  portable = cli.pipeline_options(["--runner=PortableRunner", "--job_endpoint=embed"])
  profiles.runner_for(portable)
  assert portable.view_as(PortableOptions).environment_type == "LOOPBACK"


@pytest.fixture(name="tiny_input", scope="module")
def _tiny_input(tmp_path_factory):
  from txstream.pipelines import generate
  data = str(tmp_path_factory.mktemp("tiny"))
  generate.generate(data, customers=20, terminals=40, days=2, start=generate.datetime.date(2018, 4, 1), seed=1)
  return data


@pytest.mark.parametrize("flag", [
    "--postgres_dsn=host=127.0.0.1 user=postgres password=S3cret-pw dbnme=x",
    "--redis_url=redis://:S3cret-pw@127.0.0.1:6379/x9",
    "--clickhouse_url=clickhouse://default:S3cret-pw@127.0.0.1:9000/bad-name",
])
def test_a_malformed_dsn_or_url_is_one_line_without_its_password(tiny_input, tmp_path, capsys, flag):
  assert cli.main(["run", f"--input={tiny_input}", f"--cold_path={tmp_path}/cold", flag]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("txstream: error: ") and "***" in err
  assert "S3cret-pw" not in err


def test_log_lines_never_carry_a_password():
  # The filter `txstream` puts on its log handlers, on a handler of its own here (pytest owns the root's).
  out = io.StringIO()
  handler = logging.StreamHandler(out)
  handler.addFilter(cli._Redacting())  # pylint: disable=protected-access
  logger = logging.getLogger("some.driver")
  logger.addHandler(handler)
  try:
    logger.warning("connecting to %s", "postgresql://app:S3cret-pw@db:5432/x")
    logger.warning("dsn host=db password='S3cret pw' dbname=x")
  finally:
    logger.removeHandler(handler)
  assert "S3cret" not in out.getvalue() and out.getvalue().count("***") == 2


def test_a_run_that_fails_once_started_is_one_line_with_the_cause(tiny_input, monkeypatch, tmp_path, capsys):
  from txstream.pipelines import run as run_lib

  def failing(options):
    try:
      raise ConnectionError("server closed the connection unexpectedly\nThis probably means...")
    except ConnectionError as cause:
      raise RuntimeError("Pipeline failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                         "psycopg2.OperationalError: could not connect password=S3cret") from cause

  monkeypatch.setattr(run_lib, "run", lambda options: failing(options))
  assert cli.main(["run", f"--input={tiny_input}", f"--cold_path={tmp_path}/cold"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("txstream: error: the run failed: server closed the connection")
  path = err.split("full traceback: ")[1].split(")")[0]
  with open(path, encoding="utf-8") as f:
    saved = f.read()
  os.remove(path)
  assert "RuntimeError: Pipeline failed" in saved and "S3cret" not in saved


def test_version(capsys):
  assert cli.main(["--version"]) == 0
  out = capsys.readouterr().out.strip()
  assert re.fullmatch(rf"txstream {re.escape(txstream.__version__)} \(git ([0-9a-f]{{40}}(\+dirty)?|unknown)\), "
                      rf"Apache Beam {re.escape(apache_beam.__version__)}, "
                      rf"Python {re.escape(platform.python_version())}", out), out


_GROUPS = {
    "run": ["Source", "Kafka", "Features", "Scoring", "Tiers", "Run", "Data quality", "Metrics", "Lineage",
            "Beam runner"],
    "rerun": ["Rerun", "Source", "Features", "Scoring", "Tiers", "Run", "Data quality", "Metrics", "Lineage",
              "Beam runner"],
    "stream": ["Source", "Kafka", "Features", "Scoring", "Tiers", "Live", "Data quality", "Metrics", "Beam runner"],
}


def _flags(*option_classes):
  parser = argparse.ArgumentParser(add_help=False)
  for cls in option_classes:
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return {s for a in parser._actions for s in a.option_strings}  # pylint: disable=protected-access


@pytest.mark.parametrize("command", sorted(_GROUPS))
def test_help_is_grouped_by_concern_and_lists_every_flag(capsys, command):
  from txstream.config import options as o
  from txstream.io.kafka_config import KafkaOptions
  from txstream.pipelines.rerun import RerunOptions
  assert cli.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  titles = re.findall(r"^(\w[\w ]*):$", out, flags=re.MULTILINE)
  assert titles == ["options"] + _GROUPS[command] + ["examples"]
  assert "Options" not in out  # no class names left as titles
  own = {"run": (o.SourceOptions, KafkaOptions, o.FeatureOptions, o.ScoreOptions, o.TierOptions, o.RunOptions,
                 o.QualityOptions),
         "rerun": (RerunOptions, o.SourceOptions, o.FeatureOptions, o.ScoreOptions, o.TierOptions, o.RunOptions,
                   o.QualityOptions),
         "stream": (o.SourceOptions, KafkaOptions, o.FeatureOptions, o.ScoreOptions, o.TierOptions,
                    o.LiveOptions, o.QualityOptions)}[command]
  beam = {"--runner", "--direct_num_workers", "--direct_running_mode", "--job_endpoint", "--environment_type",
          "--flink_master", "--s3_endpoint_url", "--s3_access_key_id", "--s3_secret_access_key", "--s3_region_name"}
  kafka = {"--bootstrap_servers"} if command != "rerun" else set()
  for flag in _flags(*own) | beam | kafka | {"--progress_interval_s", "--metrics_file", "--metrics_port"}:
    assert re.search(rf"^  {flag}\b", out, flags=re.MULTILINE), flag
  words = " ".join(out.split())  # a default may be wrapped onto the next line
  assert "every other Beam flag" in words
  assert "(default: DirectRunner)" in words and "(default: out/cold)" in words
  assert f"txstream {command} " in out.split("examples:")[1]


def test_the_executable_exits_even_if_a_non_daemon_thread_is_left_running():
  # What Beam's state sampler can leave behind when `stream` is interrupted inside a bundle's start.
  script = ("import sys, threading, time\n"
            "from txstream import cli\n"
            "def main():\n"
            "  threading.Thread(target=time.sleep, args=(3600,)).start()\n"
            "  print('summary', flush=True)\n"
            "  return 3\n"
            "cli.main = main\n"
            "sys.exit(cli.console_main())\n")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 3 and done.stdout == "summary\n"
