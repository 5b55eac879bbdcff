"""Kafka offsets: where partitions end, what a group committed, what a time maps to, and topics.

Plain functions over a short-lived consumer (or admin client), for the run
driver and for resolving where a read starts and stops. A driver that wants
exactly-once reruns reads ``end_offsets`` (or ``ReadFromKafkaNative.offset_ranges()``),
runs the pipeline up to them and, once every tier has written,
``commit_offsets`` with them: never at read finalization.

What tansu (the local broker) does differently, and how this module copes
(tested in tests/integration/test_kafka_io.py):

* ListOffsets(latest), what ``get_watermark_offsets(cached=False)`` asks,
  answers the last record batch's base offset + 1, not the end. A fetch
  response's high watermark is right, so ``end_offsets`` fetches from that
  offset on a fresh consumer and reads the high watermark librdkafka cached
  from the response. ListOffsets is still a valid lower bound of the end,
  which is what the reader uses it for.
* ``offsets_for_times`` answers 0 for every time, past or future (DESIGN.md
  saw it for a future time only). A correct broker's answer is the first
  offset whose timestamp is at or after the time; tansu's is only a lower
  bound. ``offsets_at_time`` therefore reads from the broker's answer up to
  the first record at or after the time: one record on Kafka, a scan from the
  log start on tansu (~100k records/s).
* A fetch past the end returns nothing rather than OFFSET_OUT_OF_RANGE.
* Committed offsets are stored and returned per group (``commit`` without
  joining the group, then ``committed`` from a new consumer).
"""
import contextlib
import logging
import sys
import time
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

from txstream.io.kafka_config import KafkaConfig, KafkaConfigError

_LOGGER = logging.getLogger(__name__)

# The stop offset of an unbounded restriction.
UNBOUNDED = sys.maxsize
_SCAN_BATCH = 10_000
_METADATA_SLICE_S = 0.5


def _topic(config: KafkaConfig, topic: Optional[str]) -> str:
  topic = topic or config.topic
  if not topic:
    raise KafkaConfigError("a Kafka topic is required (--topic)")
  return topic


def _one_line(error) -> str:
  return " ".join(str(error).split())


@contextlib.contextmanager
def consumer(config: KafkaConfig, **overrides) -> Iterator["confluent_kafka.Consumer"]:
  """A consumer of ``config``'s group that never joins it (callers ``assign``), closed on exit."""
  from confluent_kafka import Consumer
  client = Consumer(config.consumer_config(**overrides))
  try:
    yield client
  finally:
    client.close()


def list_topics(client, topic: Optional[str], timeout_s: float):
  """``client.list_topics`` (a fresh, unassigned consumer or an admin client), waiting in short slices.

  Between slices the client serves its callbacks, so a failed login
  (``KafkaConfigError`` from ``AuthenticationCheck``) ends the wait within a
  slice instead of after ``timeout_s`` of silent retries. Raises
  ``KafkaConfigError`` when the brokers do not answer within ``timeout_s``.
  """
  from confluent_kafka import KafkaException
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return client.list_topics(topic, timeout=max(min(_METADATA_SLICE_S, deadline - time.monotonic()), 0.001))
    except KafkaException as e:
      client.poll(0)
      if time.monotonic() >= deadline:
        raise KafkaConfigError(f"Kafka brokers did not answer within {timeout_s:g} s: {_one_line(e)}") from e


def _partitions(client, topic: str, timeout_s: float) -> List[int]:
  metadata = list_topics(client, topic, timeout_s)
  described = metadata.topics.get(topic)
  if described is None or described.error is not None or not described.partitions:
    raise KafkaConfigError(f"Kafka topic {topic!r} does not exist"
                           + (f" ({described.error.str()})" if described is not None and described.error else ""))
  return sorted(described.partitions)


def partitions(config: KafkaConfig, topic: Optional[str] = None, timeout_s: float = 30.0) -> List[int]:
  """The partition numbers of ``topic`` (default ``config.topic``); ``KafkaConfigError`` if it does not exist."""
  with consumer(config) as client:
    return _partitions(client, _topic(config, topic), timeout_s)


def _listed(client, topic: str, parts: List[int], timeout_s: float) -> Dict[int, Tuple[int, int]]:
  """(log start, ListOffsets latest) per partition: exact on Kafka, the latter a lower bound on tansu."""
  from confluent_kafka import TopicPartition
  return {p: client.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s, cached=False) for p in parts}


def _fetch_ends(client, topic: str, listed: Mapping[int, Tuple[int, int]], timeout_s: float) -> Dict[int, int]:
  """The high watermark of a fetch response per partition.

  ``client`` must be fresh (never assigned before): librdkafka's cached high
  watermark of a partition is then set by nothing but a fetch response for it.
  Fetching from ListOffsets' answer returns at most the last batch.
  """
  from confluent_kafka import TopicPartition
  client.assign([TopicPartition(topic, p, high) for p, (_, high) in listed.items()])
  ends: Dict[int, int] = {}
  deadline = time.monotonic() + timeout_s
  try:
    while len(ends) < len(listed):
      client.consume(_SCAN_BATCH, 0.05)  # the records are not needed, only the responses' high watermarks
      for p, (_, high) in listed.items():
        cached = client.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1]
        if p not in ends and cached >= 0:
          ends[p] = max(cached, high)
      if time.monotonic() > deadline:
        missing = sorted(set(listed) - set(ends))
        raise KafkaConfigError(f"no fetch response for Kafka topic {topic!r} partition(s) {missing} "
                               f"within {timeout_s:g} s")
  finally:
    client.unassign()
  return ends


def end_offsets(config: KafkaConfig, topic: Optional[str] = None, timeout_s: float = 30.0) -> Dict[int, int]:
  """``{partition: offset after the last record}`` now (the fetch high watermark; see the module notes)."""
  topic = _topic(config, topic)
  with consumer(config) as client:
    parts = _partitions(client, topic, timeout_s)
    return _fetch_ends(client, topic, _listed(client, topic, parts, timeout_s), timeout_s)


def _committed(client, topic: str, parts: List[int], timeout_s: float) -> Dict[int, Optional[int]]:
  from confluent_kafka import KafkaException, TopicPartition
  try:
    answers = client.committed([TopicPartition(topic, p) for p in parts], timeout=timeout_s)
  except KafkaException as e:
    raise KafkaConfigError(f"cannot read the committed offsets of Kafka topic {topic!r}: {_one_line(e)}") from e
  result = {}
  for tp in answers:
    if tp.error is not None:
      raise KafkaConfigError(f"cannot read the committed offset of {topic}/{tp.partition}: {tp.error.str()}")
    result[tp.partition] = tp.offset if tp.offset >= 0 else None
  return result


def committed_offsets(config: KafkaConfig, topic: Optional[str] = None,
                      timeout_s: float = 30.0) -> Dict[int, Optional[int]]:
  """``{partition: next offset to read}`` committed by ``config.group_id``; ``None`` where nothing was committed."""
  topic = _topic(config, topic)
  with consumer(config) as client:
    return _committed(client, topic, _partitions(client, topic, timeout_s), timeout_s)


def commit_offsets(config: KafkaConfig, offsets: Mapping[int, int], topic: Optional[str] = None,
                   timeout_s: float = 30.0) -> None:
  """Commits ``{partition: next offset to read}`` for ``config.group_id``, synchronously.

  Call it only once everything read below those offsets has been written by
  every tier. Commits as a standalone consumer (no group join), which Kafka
  accepts while no member of the group is active. Raises ``KafkaConfigError``
  when the broker refuses any partition's commit.
  """
  from confluent_kafka import KafkaException, TopicPartition
  topic = _topic(config, topic)
  if not offsets:
    return
  bad = {p: o for p, o in offsets.items() if o is None or int(o) < 0}
  if bad:
    raise KafkaConfigError(f"cannot commit negative or missing offsets {bad} for Kafka topic {topic!r}")
  with consumer(config) as client:
    try:
      answers = client.commit(offsets=[TopicPartition(topic, int(p), int(o)) for p, o in sorted(offsets.items())],
                              asynchronous=False)
    except KafkaException as e:
      raise KafkaConfigError(f"committing offsets of Kafka topic {topic!r} for group {config.group_id!r} "
                             f"failed: {_one_line(e)}") from e
    failed = [tp for tp in answers or [] if tp.error is not None]
    if failed:
      raise KafkaConfigError(f"committing {topic}/{failed[0].partition} for group {config.group_id!r} failed: "
                             f"{failed[0].error.str()}")
  _LOGGER.info("committed %s for group %s: %s", topic, config.group_id, dict(sorted(offsets.items())))


def _raise_on_error(message) -> None:
  from confluent_kafka import KafkaException
  error = message.error()
  if error is not None and (error.fatal() or not error.retriable()):
    raise KafkaException(error)


def _offsets_at_time(client, topic: str, time_ms: int, floors: Mapping[int, int], ends: Mapping[int, int],
                     timeout_s: float) -> Dict[int, int]:
  """Per partition, the first offset in [floor, end) whose record timestamp is >= ``time_ms``; else end.

  The broker's ``offsets_for_times`` answer is taken as a lower bound and
  checked against the records from there on (see the module notes).
  """
  from confluent_kafka import KafkaException, TopicPartition
  try:
    answers = client.offsets_for_times([TopicPartition(topic, p, int(time_ms)) for p in sorted(ends)],
                                       timeout=timeout_s)
  except KafkaException as e:
    raise KafkaConfigError(f"Kafka offsets_for_times({time_ms}) on {topic!r} failed: {_one_line(e)}") from e
  result, pending = {}, {}
  for tp in answers:
    p, end = tp.partition, ends[tp.partition]
    floor = min(floors.get(p, 0), end)
    if tp.error is not None:
      raise KafkaConfigError(f"Kafka offsets_for_times({time_ms}) on {topic}/{p} failed: {tp.error.str()}")
    candidate = end if tp.offset < 0 else min(max(tp.offset, floor), end)  # < 0: no record at or after it
    if candidate >= end:
      result[p] = end
    else:
      pending[p] = candidate
  if not pending:
    return result
  client.assign([TopicPartition(topic, p, o) for p, o in pending.items()])
  paused = []
  try:
    last_progress = time.monotonic()
    while pending:
      messages = client.consume(_SCAN_BATCH, 0.2)
      for message in messages:
        _raise_on_error(message)
        p, offset = message.partition(), message.offset()
        if message.error() is not None or p not in pending or offset < pending[p]:
          continue
        last_progress = time.monotonic()
        if message.timestamp()[1] >= time_ms:
          result[p] = offset
        elif offset + 1 >= ends[p]:
          result[p] = ends[p]
        else:
          continue
        del pending[p]
        paused.append(TopicPartition(topic, p))
        client.pause(paused[-1:])
      if not messages and time.monotonic() - last_progress > timeout_s:
        raise KafkaConfigError(f"Kafka topic {topic!r} partition(s) {sorted(pending)}: no records for "
                               f"{timeout_s:g} s while looking for timestamp {time_ms}")
  finally:
    if paused:  # librdkafka keeps a partition paused across assignments
      client.resume(paused)
    client.unassign()
  return result


def offsets_at_time(config: KafkaConfig, time_ms: int, topic: Optional[str] = None,
                    timeout_s: float = 30.0) -> Dict[int, int]:
  """``{partition: first offset whose record timestamp >= time_ms}``, the end offset where there is none."""
  topic = _topic(config, topic)
  with consumer(config) as client:
    parts = _partitions(client, topic, timeout_s)
    listed = _listed(client, topic, parts, timeout_s)
    ends = _fetch_ends(client, topic, listed, timeout_s)
    return _offsets_at_time(client, topic, time_ms, {p: low for p, (low, _) in listed.items()}, ends, timeout_s)


Start = Union[str, Mapping[int, int]]
Stop = Union[None, str, Mapping[int, int]]


def _starts(client, topic: str, parts: List[int], lows: Mapping[int, int], ends: Mapping[int, int], start: Start,
            timeout_s: float) -> Dict[int, int]:
  if start == "earliest":
    return dict(lows)
  if start == "latest":
    return dict(ends)
  if start == "committed":
    committed = _committed(client, topic, parts, timeout_s)
    starts = {p: lows[p] if committed[p] is None else committed[p] for p in parts}
    source = "committed offset"
  else:
    starts = {p: int(start.get(p, lows[p])) for p in parts}
    source = "start offset"
  for p in parts:
    if starts[p] < lows[p]:
      raise KafkaConfigError(f"{source} {starts[p]} of {topic}/{p} is below the log start {lows[p]}: records were "
                             f"deleted before they were read; commit or pass a new start to go on")
  return starts


def resolve_ranges(config: KafkaConfig, topic: str, start: Start = "committed", stop_at: Stop = None,
                   start_time: Optional[int] = None, stop_time: Optional[int] = None,
                   timeout_s: float = 30.0) -> Dict[int, Tuple[int, int]]:
  """``{partition: (start offset, stop offset)}`` for a read, ``UNBOUNDED`` as the stop of an open-ended one.

  ``start``: "committed" (``config.group_id``'s committed offsets, the log
  start where none), "earliest", "latest", or ``{partition: offset}`` (the
  log start for partitions not named). ``start_time`` (epoch ms), when given,
  replaces ``start``: the first record at or after it. ``stop_at``: None
  (unbounded), "end" (the end offsets now) or ``{partition: offset}`` (the
  start for partitions not named: a partition the caller did not know is not
  read). ``stop_time``: before the first record at or after it, and at the
  end offsets now when no record is that late yet.
  """
  with consumer(config) as client:
    parts = _partitions(client, topic, timeout_s)
    listed = _listed(client, topic, parts, timeout_s)
    ends = _fetch_ends(client, topic, listed, timeout_s)
    lows = {p: low for p, (low, _) in listed.items()}
    if start_time is not None:
      starts = _offsets_at_time(client, topic, start_time, lows, ends, timeout_s)
    else:
      starts = _starts(client, topic, parts, lows, ends, start, timeout_s)
    if stop_time is not None:
      stops = _offsets_at_time(client, topic, stop_time, starts, ends, timeout_s)
    elif stop_at is None:
      stops = {p: UNBOUNDED for p in parts}
    elif stop_at == "end":
      stops = ends
    else:
      stops = {p: int(stop_at.get(p, starts[p])) for p in parts}
  ranges = {}
  for p in parts:
    if stops[p] < starts[p]:
      _LOGGER.warning("%s/%d starts at %d, after its stop %d: nothing to read there", topic, p, starts[p], stops[p])
    ranges[p] = (starts[p], max(starts[p], stops[p]))
  return ranges


def ensure_topic(config: KafkaConfig, topic: Optional[str] = None, num_partitions: int = 1,
                 timeout_s: float = 30.0) -> int:
  """Creates ``topic`` with ``num_partitions`` (broker-default replication) unless it exists; returns its
  partition count. An existing topic is left as it is, whatever its partition count."""
  from confluent_kafka import KafkaError, KafkaException
  from confluent_kafka.admin import AdminClient, NewTopic
  topic = _topic(config, topic)
  if num_partitions < 1:
    raise ValueError("num_partitions must be >= 1")
  admin = AdminClient(config.admin_config())
  existing = list_topics(admin, None, timeout_s).topics.get(topic)
  if existing is not None and existing.error is None:
    return len(existing.partitions)
  try:
    future = admin.create_topics([NewTopic(topic, num_partitions, -1)], operation_timeout=timeout_s)[topic]
    try:
      future.result(timeout=timeout_s)
    except KafkaException as e:
      if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
        raise
    _LOGGER.info("created Kafka topic %s with %d partition(s)", topic, num_partitions)
  except KafkaException as e:
    raise KafkaConfigError(f"cannot create Kafka topic {topic!r}: {_one_line(e)}") from e
  with consumer(config) as client:
    return len(_partitions(client, topic, timeout_s))
