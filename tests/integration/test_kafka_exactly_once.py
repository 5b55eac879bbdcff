"""Exactly-once effect from Kafka across SIGKILLs: nothing lost, nothing twice, bad input dead-lettered once."""
from tests import crash_driver


def test_three_kills_lose_and_duplicate_nothing(services, tmp_path):
  broker = services.require("kafka")
  pg = services.require("postgres")
  outcome = crash_driver.crash_and_recover(
      str(tmp_path), f"{broker.host}:{broker.port}", {"host": pg.host, "port": pg.port, "user": "postgres"},
      customers=60, days=4, kills=3, seed=11, kill_window_s=(4.0, 7.0), corrupt_fraction=0.02)
  assert outcome.expected > 250 and outcome.dead_expected > 0
  assert (outcome.lost, outcome.duplicated) == (0, 0), outcome
  assert (outcome.dead_lost, outcome.dead_duplicated) == (0, 0), outcome
  assert outcome.killed == 3, outcome
