"""DecodeAndValidate: every input ends valid or as a dead letter with its reason."""
import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from txstream.transforms.validate import DecodeAndValidate


def test_good_and_bad_messages():
  good_v2 = h.message(h.tx_record(1, h.T0))
  good_v1 = h.message(h.tx_record(2, h.T0), schema_id=1)
  label = h.label_message("tx-1", h.T0, h.T0, 1, 10)
  inputs = [
      h.raw(0, good_v2),
      h.raw(1, good_v1),
      h.raw(2, b"\x07" + good_v2[1:]),
      h.raw(3, good_v2[:1] + (999).to_bytes(4, "big") + good_v2[5:]),
      h.raw(4, good_v2[:30]),
      h.raw(5, label),
      h.raw(6, None),
      h.raw(7, b"\x00\x00"),
      h.raw(8, h.message(h.tx_record(9, h.T0, amount=0))),
      h.raw(9, h.message(h.tx_record(10, h.T0, currency="XXX"))),
      h.raw(10, good_v2 + b"\x00\x01"),
      h.raw(11, good_v2 + b"\x00" * (64 << 10)),
  ]
  with TestPipeline() as p:
    out = p | beam.Create([h.raw_batch(inputs[:6]), h.raw_batch(inputs[6:])]) | DecodeAndValidate()
    assert_that(h.flat(out.valid, "Ids", "transaction_id", "schema_id", "entry_mode", "source"),
                equal_to([("tx-00001", 2, "chip", "test.wire#0"), ("tx-00002", 1, None, "test.wire#1")]),
                label="valid")
    assert_that(h.flat(out.dead_letters, "Reasons", "source", "stage", "reason"),
                equal_to([("test.wire#2", "decode", "bad_magic_byte"),
                          ("test.wire#3", "decode", "unknown_schema_id"),
                          ("test.wire#4", "decode", "avro_decode_error"),
                          ("test.wire#5", "decode", "wrong_schema"),
                          ("test.wire#6", "decode", "null_value"),
                          ("test.wire#7", "decode", "truncated_header"),
                          ("test.wire#8", "decode", "invalid_amount"),
                          ("test.wire#9", "decode", "invalid_currency"),
                          ("test.wire#10", "decode", "trailing_bytes"),
                          ("test.wire#11", "decode", "oversized_message")]),
                label="dead")
    assert_that(h.flat(out.dead_letters, "Raw", "raw", "reason") | "RawKept" >> beam.Map(
        lambda r: r[0] is not None or r[1] == "null_value"), equal_to([True] * 10), label="raw_kept")
