"""A TCP proxy for fault tests: forwards a local port to a real server and can cut it off.

``interrupt(outage_s)`` closes the listening socket and resets every open
connection, so clients see dropped connections and then "connection
refused" for ``outage_s`` seconds, after which the proxy listens again on the
same port. ``interrupt_after_bytes(n, outage_s)`` does the same the moment
the clients have sent ``n`` bytes in total, which lands the outage in the
middle of a write instead of between runs. ``stall_after_bytes(n, stall_s)``
instead stops passing bytes either way for ``stall_s`` seconds, connections
left open: a server that hangs without closing anything. The shared servers behind it are
never touched.
"""
import socket
import struct
import threading
import time
from typing import List, Optional, Tuple


class TcpProxy:
  def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
    self._target = (target_host, target_port)
    self._listen_host = listen_host
    self._lock = threading.Lock()
    self._listener: Optional[socket.socket] = None
    self._pairs: List[Tuple[socket.socket, socket.socket]] = []
    self._trigger: Optional[Tuple[int, float]] = None
    self._stall: Optional[Tuple[int, float]] = None
    self._stalled_until = 0.0
    self._closed = False
    self.port = 0
    self.bytes_up = 0
    self.connections = 0
    self.interruptions = 0
    self.outage_ended = threading.Event()

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def url_host_port(self) -> str:
    return f"{self._listen_host}:{self.port}"

  def start(self) -> "TcpProxy":
    self._listen()
    return self

  def interrupt(self, outage_s: float) -> None:
    """Drops every connection and refuses new ones for ``outage_s`` seconds."""
    with self._lock:
      self.interruptions += 1
      self.outage_ended.clear()
      listener, self._listener = self._listener, None
      pairs, self._pairs = self._pairs, []
    if listener is not None:
      _close(listener)
    for a, b in pairs:
      _reset(a)
      _reset(b)
    timer = threading.Timer(outage_s, self._reopen)
    timer.daemon = True
    timer.start()

  def interrupt_after_bytes(self, nbytes: int, outage_s: float) -> None:
    """Arms a single ``interrupt(outage_s)`` once clients have sent ``nbytes`` more bytes."""
    with self._lock:
      self._trigger = (self.bytes_up + nbytes, outage_s)

  def stall_after_bytes(self, nbytes: int, stall_s: float) -> None:
    with self._lock:
      self._stall = (self.bytes_up + nbytes, stall_s)

  def close(self) -> None:
    with self._lock:
      self._closed = True
      listener, self._listener = self._listener, None
      pairs, self._pairs = self._pairs, []
    if listener is not None:
      _close(listener)
    for a, b in pairs:
      _close(a)
      _close(b)

  # -- internals -----------------------------------------------------------
  def _listen(self) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((self._listen_host, self.port))
    listener.listen(64)
    self.port = listener.getsockname()[1]
    with self._lock:
      self._listener = listener
    threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

  def _reopen(self) -> None:
    with self._lock:
      if self._closed:
        return
    for _ in range(50):
      try:
        self._listen()
        break
      except OSError:
        time.sleep(0.05)
    self.outage_ended.set()

  def _accept_loop(self, listener: socket.socket) -> None:
    while True:
      try:
        client, _ = listener.accept()
      except OSError:
        return
      try:
        upstream = socket.create_connection(self._target, timeout=5)
        upstream.settimeout(None)
      except OSError:
        _reset(client)
        continue
      for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      with self._lock:
        if self._listener is not listener:
          _reset(client)
          _reset(upstream)
          return
        self._pairs.append((client, upstream))
        self.connections += 1
      threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
      threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

  def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
    while True:
      try:
        data = src.recv(65536)
      except OSError:
        break
      if not data:
        break
      if upstream and self._count_up(len(data)):
        return  # the interruption has reset both sockets; this chunk is lost, as on a real failure
      while time.monotonic() < self._stalled_until:
        time.sleep(0.05)
      try:
        dst.sendall(data)
      except OSError:
        break
    _close_pair(src, dst)

  def _count_up(self, n: int) -> bool:
    with self._lock:
      self.bytes_up += n
      trigger = self._trigger
      fire = trigger is not None and self.bytes_up >= trigger[0]
      if fire:
        self._trigger = None
      if self._stall is not None and self.bytes_up >= self._stall[0]:
        self._stalled_until, self._stall = time.monotonic() + self._stall[1], None
    if fire:
      self.interrupt(trigger[1])
    return fire


def _reset(s: socket.socket) -> None:
  # SO_LINGER 0: close sends RST, as a crashed server or a cut network would.
  try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
  except OSError:
    pass
  _close(s)


def _close(s: socket.socket) -> None:
  try:
    s.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
  s.close()


def _close_pair(a: socket.socket, b: socket.socket) -> None:
  _close(a)
  _close(b)
