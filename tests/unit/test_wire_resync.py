"""Framing damage in a framed file: one dead letter per damaged stretch, with its bytes, and every frame after it.

Each case damages a file of 3,000 generated messages the way a flipped bit or
a bad copy would, then checks the frames read back, the damages (index, bytes,
reason) and the record numbering, whole and through a stream that hands out a
few hundred bytes per read (so every refill path runs).
"""
import hashlib
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from txstream.io.schema_registry import FileSchemaRegistry
from txstream.io import wire
from txstream.pipelines import generate, manifest, run
from txstream.transforms.read import ReadTransactions
from txstream.transforms.validate import DecodeAndValidate

IDS = [e["id"] for e in h.REGISTRY.entries()]
N = 3000
K = 1234  # the frame the damage hits


class _Trickle(io.RawIOBase):
  """A stream that returns at most ``step`` bytes per read, as a network file system may."""
  def __init__(self, data: bytes, step: int = 331):
    super().__init__()
    self._data, self._pos, self._step = data, 0, step

  def readable(self):
    return True

  def read(self, n=-1):
    n = self._step if n is None or n < 0 else min(n, self._step)
    out = self._data[self._pos:self._pos + n]
    self._pos += len(out)
    return out


@pytest.fixture(scope="module")
def messages():
  return [h.message(h.tx_record(i, h.T0 + i * 1000, customer=i % 50, terminal=i % 20, amount=100 + 7 * i),
                    schema_id=1 if i % 11 == 0 else 2) for i in range(N)]


def _file(messages) -> bytes:
  buf = io.BytesIO()
  wire.write_frames(buf, messages)
  return buf.getvalue()


def _offsets(messages) -> list:
  """File offset of each frame's length prefix, and the end of the file last."""
  return np.cumsum([len(wire.FILE_MAGIC)] + [4 + len(m) for m in messages]).tolist()


def _read(data: bytes, max_records: int = 500):
  """({index: message}, [Damage]) of a file, checked to read the same whole and trickled."""
  results = []
  for stream in (io.BytesIO(data), _Trickle(data)):
    frames, damages = {}, []
    for item in wire.read_frame_segments(stream, IDS, max_records):
      if isinstance(item, wire.Damage):
        damages.append(item)
      else:
        frames.update(zip(range(item.first_index, item.first_index + len(item.values)), item.values.to_pylist()))
    assert not set(frames) & {d.index for d in damages}
    results.append((frames, damages))
  assert results[0] == results[1]
  return results[0]


def _expect(frames, damages, messages, before, damaged, after, first_after):
  """Frames 0..before-1 as written, then the damages, then ``after`` (messages) from index ``first_after``."""
  assert [frames[i] for i in range(before)] == messages[:before]
  assert [(d.index, d.raw) for d in damages] == damaged
  assert [frames[first_after + i] for i in range(len(after))] == after
  assert len(frames) + len(damages) == first_after + len(after)


def _record_count(tmp_path, data: bytes) -> dict:
  path = tmp_path / "x.wire"
  path.write_bytes(data)
  scanned = manifest._scan(str(path), [e["id"] for e in FileSchemaRegistry().entries()])
  assert scanned["bytes"] == len(data) and scanned["sha256"] == hashlib.sha256(data).hexdigest()
  return {k: v for k, v in scanned.items() if k in ("records", "damaged")}


def test_a_clean_file_reads_as_before(messages):
  data = _file(messages)
  frames, damages = _read(data)
  assert not damages
  assert [frames[i] for i in range(N)] == messages
  assert list(wire.read_frames(io.BytesIO(data))) == list(enumerate(messages))
  batches = list(wire.read_frame_segments(io.BytesIO(data), IDS, 1000))
  assert [(b.first_index, len(b.values)) for b in batches] == [(0, 1000), (1000, 1000), (2000, 1000)]
  empty = wire.FILE_MAGIC
  assert list(wire.read_frame_segments(io.BytesIO(empty), IDS)) == []


def test_an_oversized_length_is_one_damage_and_reading_resumes(messages, tmp_path):
  off = _offsets(messages)
  data = bytearray(_file(messages))
  data[off[K]] ^= 0x80  # a flipped bit in the length's top byte
  frames, damages = _read(bytes(data))
  _expect(frames, damages, messages, K, [(K, bytes(data[off[K]:off[K + 1]]))], messages[K + 1:], K + 1)
  assert (damages[0].reason, damages[0].offset) == ("oversized_frame", off[K])
  assert f"from offset {off[K]} to offset {off[K + 1]}" in damages[0].message
  assert _record_count(tmp_path, bytes(data)) == {
      "records": [0, N], "damaged": [{"index": K, "offset": off[K], "reason": "oversized_frame"}]}


def test_a_shortened_length_leaves_its_tail_as_the_damage(messages):
  # The frame reads as its first bytes (decoding rejects it); the 3 bytes it left behind are the damage.
  off = _offsets(messages)
  data = bytearray(_file(messages))
  data[off[K]:off[K] + 4] = wire.FRAME.pack(len(messages[K]) - 3)
  frames, damages = _read(bytes(data))
  assert frames[K] == messages[K][:-3]
  _expect(frames, damages, messages, K, [(K + 1, messages[K][-3:])], messages[K + 1:], K + 2)


def test_a_length_past_the_end_of_the_file_is_one_damage(messages):
  off = _offsets(messages)
  data = bytearray(_file(messages))
  data[off[K]:off[K] + 4] = wire.FRAME.pack(len(data) - off[K])
  frames, damages = _read(bytes(data))
  _expect(frames, damages, messages, K, [(K, bytes(data[off[K]:off[K + 1]]))], messages[K + 1:], K + 1)
  assert damages[0].reason == "truncated_frame"


def test_a_length_that_runs_into_the_next_frame_is_the_damage(messages):
  # Enlarged within the file: the frame overlaps its successor, which is read back whole.
  off = _offsets(messages)
  data = bytearray(_file(messages))
  data[off[K]:off[K] + 4] = wire.FRAME.pack(len(messages[K]) + 40)
  frames, damages = _read(bytes(data))
  _expect(frames, damages, messages, K, [(K, bytes(data[off[K]:off[K + 1]]))], messages[K + 1:], K + 1)
  assert "runs over the frame found" in damages[0].message


@pytest.mark.parametrize("size", [1, 3, 37, 5000])
def test_garbage_between_frames_is_one_damage(messages, size):
  off = _offsets(messages)
  clean = _file(messages)
  garbage = bytes([0xA5]) + np.random.default_rng(size).bytes(size - 1)
  data = clean[:off[K]] + garbage + clean[off[K]:]
  frames, damages = _read(data)
  _expect(frames, damages, messages, K, [(K, garbage)], messages[K:], K + 1)


def test_two_damages_in_one_file_are_two_records(messages, tmp_path):
  off = _offsets(messages)
  clean = bytearray(_file(messages))
  clean[off[2500]] ^= 0x40
  data = bytes(clean[:off[K]]) + b"\xff" * 9 + bytes(clean[off[K]:])
  frames, damages = _read(data)
  assert [(d.index, d.raw) for d in damages] == [(K, b"\xff" * 9), (2501, bytes(clean[off[2500]:off[2501]]))]
  assert [frames[i] for i in range(K)] + [frames[i] for i in range(K + 1, 2501)] == messages[:2500]
  assert [frames[i] for i in range(2502, N + 1)] == messages[2501:]
  assert _record_count(tmp_path, data)["records"] == [0, N + 1]


def test_damage_in_the_last_frame_runs_to_the_end_of_the_file(messages):
  off = _offsets(messages)
  clean = _file(messages)
  flipped = bytearray(clean)
  flipped[off[N - 1]] = 0x7F
  cut = clean[:off[N - 1] + 4 + len(messages[-1]) // 2]
  short_prefix = clean[:off[N - 1] + 2]
  cases = ((bytes(flipped), "oversized_frame"), (cut, "truncated_frame"), (short_prefix, "truncated_frame"))
  for data, reason in cases:
    frames, damages = _read(data)
    _expect(frames, damages, messages, N - 1, [(N - 1, data[off[N - 1]:])], [], N)
    assert damages[0].reason == reason
    assert damages[0].message.endswith("to the end of the file are dead")


def test_random_bytes_never_make_frames():
  # 3 MiB: also more than a read and more than the bytes a damage keeps.
  noise = np.random.default_rng(13).bytes(3 << 20)
  frames, damages = _read(wire.FILE_MAGIC + noise, max_records=100)
  assert frames == {}
  assert [(d.index, d.offset, d.raw) for d in damages] == [(0, len(wire.FILE_MAGIC), noise[:wire.MAX_DAMAGE_BYTES])]
  assert f"{len(noise)} bytes from offset" in damages[0].message
  assert damages[0].message.endswith(f"(first {wire.MAX_DAMAGE_BYTES} bytes kept)")


def test_random_bytes_between_frames_are_one_damage(messages):
  # A stretch of noise 64 KiB long: resynchronisation waits for a chain of frames, not a lucky header.
  off = _offsets(messages)
  clean = _file(messages)
  noise = np.random.default_rng(5).bytes(64 << 10)
  frames, damages = _read(clean[:off[K]] + noise + clean[off[K]:])
  _expect(frames, damages, messages, K, [(K, noise)], messages[K:], K + 1)


def test_not_a_frame_file_keeps_its_first_bytes():
  data = b"PAR1" + bytes(range(256)) * 10
  (damage,) = list(wire.read_frame_segments(io.BytesIO(data), IDS))
  assert (damage.index, damage.offset, damage.raw, damage.reason) == (0, 0, data, "not_a_frame_file")
  (damage,) = list(wire.read_frame_segments(io.BytesIO(b"x" * (wire.MAX_DAMAGE_BYTES + 1)), IDS))
  assert damage.raw == b"x" * wire.MAX_DAMAGE_BYTES
  assert damage.message.endswith(f"(first {wire.MAX_DAMAGE_BYTES} bytes kept)")


def test_strict_readers_still_raise_at_the_first_damage(messages):
  off = _offsets(messages)
  data = bytearray(_file(messages))
  data[off[K]] ^= 0x80
  with pytest.raises(wire.WireFormatError) as e:
    for _ in wire.read_frame_batches(io.BytesIO(bytes(data)), 500):
      pass
  assert (e.value.reason, e.value.index) == ("oversized_frame", K)
  with pytest.raises(wire.WireFormatError) as e:
    list(wire.read_frames(io.BytesIO(bytes(data))))
  assert e.value.index == K


def test_every_frame_and_damage_is_counted_once_through_decoding(messages, tmp_path):
  off = _offsets(messages)
  damaged = bytearray(_file(messages))
  damaged[off[K]] ^= 0x80
  damaged[off[2000]:off[2000] + 4] = wire.FRAME.pack(len(messages[2000]) - 3)
  (tmp_path / "transactions").mkdir()
  (tmp_path / "transactions" / "a.wire").write_bytes(_file(messages[:10]))
  (tmp_path / "transactions" / "b.wire").write_bytes(bytes(damaged))
  (tmp_path / "transactions" / "c.wire").write_bytes(b"not framed")
  p = TestPipeline()
  read = p | ReadTransactions(str(tmp_path), batch_records=700)
  decoded = read.records | DecodeAndValidate()
  assert_that(h.flat(read.dead_letters, "Letters", "source", "stage", "reason", "raw"),
              equal_to([(f"b.wire#{K}", "read", "oversized_frame", bytes(damaged[off[K]:off[K + 1]])),
                        ("b.wire#2001", "read", "oversized_frame", messages[2000][-3:]),
                        ("c.wire#0", "read", "not_a_frame_file", b"not framed")]), label="read_dead")
  assert_that(h.flat(decoded.dead_letters, "Decoded", "source", "raw"),
              equal_to([("b.wire#2000", messages[2000][:-3])]), label="decode_dead")
  assert_that(h.flat(decoded.valid, "Valid", "source") | beam.combiners.Count.Globally(),
              equal_to([10 + N - 2]), label="valid")
  result = p.run()
  result.wait_until_finish()
  counters = run.counters(result)
  summary = run.summarize(counters, 1.0, "m")
  assert summary["events_in"] == 10 + N + 2
  assert summary["dead_letter"] == {"avro_decode_error": 1, "not_a_frame_file": 1, "oversized_frame": 2}
  assert counters["decode_valid"] + summary["dead_letter_total"] == summary["events_in"]


def test_messages_damaged_inside_intact_framing_stay_frames(messages):
  # What `generate --corrupt_fraction` does, neighbours included: decoding's dead letters, never framing damage.
  rng = np.random.default_rng(3)
  damaged = list(messages)
  for i in sorted(set(rng.choice(N, 150, replace=False).tolist()) | {0, 700, 701, 702, N - 1}):
    damaged[i] = generate._damage(messages[i], generate.DAMAGE[i % len(generate.DAMAGE)], rng)
  frames, damages = _read(_file(damaged))
  assert not damages
  assert [frames[i] for i in range(N)] == damaged


def test_any_damage_reads_back_as_the_file_it_came_from(messages):
  # Frames and damages tile the file: whatever the damage, no byte is lost or read twice.
  rng = np.random.default_rng(11)
  clean = _file(messages[:300])
  for trial in range(120):
    data = bytearray(clean)
    for _ in range(int(rng.integers(1, 4))):
      at = int(rng.integers(len(wire.FILE_MAGIC), len(data)))
      if trial % 3 == 0:
        data[at] ^= 1 << int(rng.integers(8))
      elif trial % 3 == 1:
        data[at:at] = rng.bytes(int(rng.integers(1, 50)))
      else:
        del data[at:at + int(rng.integers(1, 50))]
    frames, damages = _read(bytes(data), max_records=int(rng.integers(1, 300)))
    pieces = {i: wire.FRAME.pack(len(v)) + v for i, v in frames.items()}
    pieces.update((d.index, d.raw) for d in damages)
    assert wire.FILE_MAGIC + b"".join(pieces[i] for i in range(len(pieces))) == bytes(data), trial
