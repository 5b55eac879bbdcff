"""Local runners as installed artifacts: Prism (Go), Beam's Flink job server and Java expansion service (Maven).

Each is fetched at exactly the Beam version of the Python SDK in use, into
the services directory (``txstream services up prism|flink|expansion``), and
found there by ``runners.profiles`` so that ``--runner=PrismRunner`` needs no
other flag. What a registry does not serve is one line naming the artifact,
the command and the registry's answer.
"""
import os
import pathlib
import re
import shutil
import subprocess
from typing import Callable, Optional

import apache_beam

from txstream.services import ServiceError, state_root

BEAM_VERSION = apache_beam.__version__
PRISM_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"
# The newest Flink this Beam release publishes a job server for (FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS).
FLINK_VERSION = "2.2"
FLINK_JOB_SERVER = f"org.apache.beam:beam-runners-flink-{FLINK_VERSION}-job-server:{BEAM_VERSION}"
EXPANSION_SERVICE = f"org.apache.beam:beam-sdks-java-io-expansion-service:{BEAM_VERSION}"


def prism_path() -> pathlib.Path:
  return state_root() / "prism" / "bin" / "prism"


def jar_path(service: str, artifact: str) -> pathlib.Path:
  _, name, version = artifact.split(":")
  return state_root() / service / f"{name}-{version}.jar"


def installed(path: pathlib.Path) -> Optional[str]:
  return str(path) if path.exists() and os.access(path, os.R_OK) else None


def _run(argv, log: pathlib.Path, env=None) -> int:
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "ab") as out:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                          check=False).returncode


def _last_error(log: pathlib.Path) -> str:
  text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors = [line for line in lines if "ERROR" in line or "error" in line or "not found" in line]
  return " ".join((errors or lines or ["no output"])[0].split())[:300]


def install_prism(say: Callable[[str], None]) -> str:
  """Builds Prism from the Go module proxy at the SDK's Beam version; returns the binary's path."""
  path = prism_path()
  if installed(path):
    return str(path)
  if not shutil.which("go"):
    raise ServiceError("prism: needs Go (the `go` command) to build Beam's Prism runner")
  command = ["go", "install", f"{PRISM_MODULE}@v{BEAM_VERSION}"]
  log = path.parent.parent / "install.log"
  say(f"building Prism {BEAM_VERSION} with `{' '.join(command)}` (a few minutes; log {log})")
  env = dict(os.environ, GOBIN=str(path.parent), GOFLAGS="-mod=mod")
  if _run(command, log, env) != 0 or not installed(path):
    raise ServiceError(f"prism: `{' '.join(command)}` failed: {_last_error(log)}")
  return str(path)


def install_jar(service: str, artifact: str, say: Callable[[str], None]) -> str:
  """Fetches a jar from Maven Central with ``mvn dependency:copy``; returns its path."""
  path = jar_path(service, artifact)
  if path.exists():
    return str(path)
  if not shutil.which("mvn"):
    raise ServiceError(f"{artifact}: needs Maven (the `mvn` command) to fetch it")
  command = ["mvn", "-B", "-q", "dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={path.parent}"]
  log = path.parent / "install.log"
  say(f"fetching {artifact} with `{' '.join(command)}` (log {log})")
  if _run(command, log) != 0 or not path.exists():
    raise ServiceError(f"{artifact} is not available: `{' '.join(command)}` failed: {_last_error(log)}")
  return str(path)


# The runners ``txstream services`` knows, how to install each, and where it lands. ``up`` without names
# installs DEFAULT (Flink's job server and the expansion service are fetched when named).
RUNNERS = {
    "prism": (install_prism, prism_path),
    "flink": (lambda say: install_jar("flink", FLINK_JOB_SERVER, say), lambda: jar_path("flink", FLINK_JOB_SERVER)),
    "expansion": (lambda say: install_jar("expansion", EXPANSION_SERVICE, say),
                  lambda: jar_path("expansion", EXPANSION_SERVICE)),
}
DEFAULT = ("prism",)


def up(names, say: Callable[[str], None]) -> None:
  """Installs each named runner that is not installed yet; ``ServiceError`` (one line) when one cannot be."""
  for name in names:
    install, where = RUNNERS[name]
    if installed(where()):
      say(f"{name}: installed, {where()}")
      continue
    say(f"{name}: installed, {install(lambda line, n=name: say(f'{n}: {line}'))}")


def status(names, say: Callable[[str], None]) -> bool:
  """One line per runner; True when every one is installed."""
  ok = True
  for name in names:
    path = RUNNERS[name][1]()
    ok = ok and bool(installed(path))
    say(f"{name}: {'installed' if installed(path) else 'not installed'}, {path} (Beam {BEAM_VERSION})")
  return ok
