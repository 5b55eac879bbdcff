"""Kafka connection settings: ``KafkaConfig``, the ``KafkaOptions`` flags and ``KafkaConfigError``.

Every client logs through ``RDKAFKA_LOGGER``, at most once a minute per kind
of line, and fails on a refused login with one ``KafkaConfigError``
(``AuthenticationCheck``) instead of retrying it forever.

Secrets: ``sasl_password`` and ``ssl_key_password`` are masked in ``repr`` and
never logged. Left unset, they are read from ``TXSTREAM_KAFKA_SASL_PASSWORD``
/ ``TXSTREAM_KAFKA_SSL_KEY_PASSWORD`` where a client is created (on the
worker), so they stay out of the pickled pipeline; set explicitly, they travel
inside it, as the consumer config of every Beam Kafka connector does.
"""
import dataclasses
import logging
import os
import re
import threading
import time
from typing import Dict, Mapping, Optional, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

_LOGGER = logging.getLogger(__name__)

# librdkafka logs every refused connection and retry as an error; its lines go to this logger.
RDKAFKA_LOGGER = logging.getLogger("txstream.io.kafka.librdkafka")

PASSWORD_ENV = "TXSTREAM_KAFKA_SASL_PASSWORD"
SSL_KEY_PASSWORD_ENV = "TXSTREAM_KAFKA_SSL_KEY_PASSWORD"
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
_JAAS_MODULES = {"PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
                 "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
                 "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule"}
_MASK = "***"


class KafkaConfigError(ValueError):
  """A Kafka misconfiguration (bad setting, missing topic, no expansion service); the message is one line."""


# A failed SASL handshake or login, as librdkafka words it; ``AuthenticationCheck`` reports it as an error.
_AUTH_FAILURE = re.compile(r"\bSASL\b.*\b(handshake|authentication)\b.*\bfail", re.IGNORECASE)
_AFTER = re.compile(r"\s*\(after \d+ms in state \w+[^)]*\)")


class _RateLimitedLines(logging.Filter):
  """librdkafka's lines at most once a minute per shape (digits aside), with how many were held back.

  A client that cannot connect or authenticate retries many times a second
  and logs every attempt; hundreds of identical lines hide the one that
  matters. Authentication failures are dropped here: ``AuthenticationCheck``
  raises them as one ``KafkaConfigError``.
  """

  def __init__(self, interval_s: float = 60.0, clock=time.monotonic):
    super().__init__()
    self._interval_s = interval_s
    self._clock = clock
    self._lock = threading.Lock()
    self._seen = {}  # shape -> (last emitted at, lines held back since)

  def filter(self, record):
    text = record.getMessage()
    if _AUTH_FAILURE.search(text):
      return False
    shape = re.sub(r"\d+", "#", text)
    now = self._clock()
    with self._lock:
      last, held = self._seen.get(shape, (None, 0))
      if last is not None and now - last < self._interval_s:
        self._seen[shape] = (last, held + 1)
        return False
      self._seen[shape] = (now, 0)
    if held:
      record.msg, record.args = f"{text} ({held} more like it in the last {self._interval_s:g} s)", ()
    return True


RDKAFKA_LOGGER.addFilter(_RateLimitedLines())


class AuthenticationCheck:
  """A client's ``error_cb``: raises ``KafkaConfigError`` on the first failed authentication, once.

  librdkafka retries a refused login forever; the error surfaces from the
  call that serves the client's callbacks (``poll``, ``consume``, ``flush``,
  ``close``), so a caller waiting for the brokers stops at once. Other errors
  (brokers down, transport failures) are retried by librdkafka and logged
  by it; they stay with it.
  """

  def __init__(self):
    self._raised = False

  def __call__(self, error):
    from confluent_kafka import KafkaError
    if error.code() != KafkaError._AUTHENTICATION or self._raised:  # pylint: disable=protected-access
      return
    self._raised = True
    raise KafkaConfigError(f"Kafka authentication failed: {_AFTER.sub('', error.str())}")


def _is_secret(key: str) -> bool:
  return "password" in key or "secret" in key or key.endswith("jaas.config")


@dataclasses.dataclass(frozen=True)
class KafkaConfig:
  """Where the brokers are and how to authenticate; every client of this module is built from one.

  ``extra`` holds further librdkafka properties, as ``(name, value)`` pairs,
  applied to every client (e.g. ``(("ssl.endpoint.identification.algorithm",
  "none"),)``).
  """
  bootstrap_servers: str
  topic: Optional[str] = None
  group_id: str = "txstream"
  security_protocol: str = "PLAINTEXT"
  sasl_mechanism: Optional[str] = None
  sasl_username: Optional[str] = None
  sasl_password: Optional[str] = None
  ssl_ca_location: Optional[str] = None
  ssl_certificate_location: Optional[str] = None
  ssl_key_location: Optional[str] = None
  ssl_key_password: Optional[str] = None
  client_id: str = "txstream"
  extra: Tuple[Tuple[str, str], ...] = ()

  def __post_init__(self):
    if not self.bootstrap_servers or not self.bootstrap_servers.strip():
      raise KafkaConfigError("Kafka bootstrap servers are required (--bootstrap_servers host:port)")
    if not self.group_id:
      raise KafkaConfigError("a Kafka group id is required (--group_id)")
    protocol = self.security_protocol.upper()
    if protocol not in _SECURITY_PROTOCOLS:
      raise KafkaConfigError(f"Kafka security protocol must be one of {', '.join(_SECURITY_PROTOCOLS)}, "
                             f"got {self.security_protocol!r}")
    object.__setattr__(self, "security_protocol", protocol)
    if protocol.startswith("SASL_"):
      if not self.sasl_mechanism:
        raise KafkaConfigError(f"Kafka security protocol {protocol} needs a SASL mechanism "
                               f"({', '.join(_SASL_MECHANISMS)})")
      if self.sasl_mechanism.upper() not in _SASL_MECHANISMS:
        raise KafkaConfigError(f"Kafka SASL mechanism must be one of {', '.join(_SASL_MECHANISMS)}, "
                               f"got {self.sasl_mechanism!r}")
      object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())
      if self.sasl_mechanism in _JAAS_MODULES and not self.sasl_username:
        raise KafkaConfigError(f"Kafka SASL {self.sasl_mechanism} needs a user name (--kafka_sasl_username)")
    object.__setattr__(self, "extra", tuple((str(k), str(v)) for k, v in dict(self.extra).items()))

  def __repr__(self):
    fields = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in ("sasl_password", "ssl_key_password"):
        value = _MASK if value else None
      elif field.name == "extra":
        value = tuple((k, _MASK if _is_secret(k) else v) for k, v in value)
      fields.append(f"{field.name}={value!r}")
    return f"KafkaConfig({', '.join(fields)})"

  __str__ = __repr__

  @classmethod
  def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> "KafkaConfig":
    """From ``TXSTREAM_KAFKA_<FIELD>`` variables (e.g. ``TXSTREAM_KAFKA_BOOTSTRAP_SERVERS``); ``overrides`` win.

    The passwords are not copied: the clients read them from the environment where they are created.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(cls):
      if field.name in ("extra", "sasl_password", "ssl_key_password"):
        continue
      text = environ.get(f"TXSTREAM_KAFKA_{field.name.upper()}")
      if text:
        values[field.name] = text
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "bootstrap_servers" not in values:
      raise KafkaConfigError("Kafka bootstrap servers are required (--bootstrap_servers host:port or "
                             "TXSTREAM_KAFKA_BOOTSTRAP_SERVERS)")
    return cls(**values)

  @classmethod
  def from_options(cls, options: PipelineOptions, environ: Optional[Mapping[str, str]] = None) -> "KafkaConfig":
    """From the pipeline flags (``KafkaOptions`` and Beam's ``--bootstrap_servers``), else the environment."""
    flags = options.view_as(KafkaOptions)
    # --bootstrap_servers belongs to Beam's KafkaStreamsRunnerOptions (a second definition would clash);
    # its default, localhost:9092, counts as "not given" so the environment can still name the brokers.
    servers = options.get_all_options(retain_unknown_options=True).get("bootstrap_servers")
    environ = os.environ if environ is None else environ
    if servers == "localhost:9092" and environ.get("TXSTREAM_KAFKA_BOOTSTRAP_SERVERS"):
      servers = None
    return cls.from_env(environ, bootstrap_servers=servers, topic=flags.topic, group_id=flags.group_id,
                        security_protocol=flags.kafka_security_protocol,
                        sasl_mechanism=flags.kafka_sasl_mechanism, sasl_username=flags.kafka_sasl_username,
                        ssl_ca_location=flags.kafka_ssl_ca_location)

  # --------------------------------------------------------------------------------------- client configs

  def _password(self) -> Optional[str]:
    return self.sasl_password or os.environ.get(PASSWORD_ENV)

  def _ssl_key_password(self) -> Optional[str]:
    return self.ssl_key_password or os.environ.get(SSL_KEY_PASSWORD_ENV)

  def client_config(self) -> Dict[str, object]:
    """librdkafka properties shared by every client: brokers, security, logging and ``AuthenticationCheck``."""
    config = {"bootstrap.servers": self.bootstrap_servers, "client.id": self.client_id,
              "security.protocol": self.security_protocol, "logger": RDKAFKA_LOGGER,
              "error_cb": AuthenticationCheck()}
    optional = {}
    if self.security_protocol.startswith("SASL_"):
      optional.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username,
                       "sasl.password": self._password()})
    if self.security_protocol.endswith("SSL"):
      optional.update({"ssl.ca.location": self.ssl_ca_location,
                       "ssl.certificate.location": self.ssl_certificate_location,
                       "ssl.key.location": self.ssl_key_location, "ssl.key.password": self._ssl_key_password()})
    config.update({k: v for k, v in optional.items() if v})
    config.update(dict(self.extra))
    return config

  def consumer_config(self, **overrides) -> Dict[str, object]:
    """A consumer that never commits by itself and long-polls 100 ms (tansu takes a core at 5-20 ms)."""
    config = self.client_config()
    config.update({"group.id": self.group_id, "enable.auto.commit": False, "enable.auto.offset.store": False,
                   "auto.offset.reset": "error", "fetch.wait.max.ms": 100, "enable.partition.eof": False})
    config.update(overrides)
    return config

  def producer_config(self, **overrides) -> Dict[str, object]:
    """An idempotent producer (acks=all) that batches for up to 50 ms."""
    config = self.client_config()
    config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 50})
    config.update(overrides)
    return config

  def admin_config(self) -> Dict[str, object]:
    return self.client_config()

  def java_consumer_config(self, **overrides) -> Dict[str, str]:
    """The same settings as Java client properties, for the cross-language reader (strings only)."""
    config = {"bootstrap.servers": self.bootstrap_servers, "client.id": self.client_id,
              "security.protocol": self.security_protocol, "enable.auto.commit": "false"}
    if self.security_protocol.startswith("SASL_"):
      config["sasl.mechanism"] = self.sasl_mechanism
      module = _JAAS_MODULES.get(self.sasl_mechanism)
      if module:
        password = (self._password() or "").replace("\\", "\\\\").replace('"', '\\"')
        user = self.sasl_username.replace("\\", "\\\\").replace('"', '\\"')
        config["sasl.jaas.config"] = f'{module} required username="{user}" password="{password}";'
    if self.security_protocol.endswith("SSL") and self.ssl_ca_location:
      config.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": self.ssl_ca_location})
    if self.security_protocol.endswith("SSL") and self.ssl_certificate_location:
      # Java reads a PEM key store only from one file holding the key and the certificate chain.
      _LOGGER.warning("Kafka client certificates are not passed to the Java reader; set them with extra")
    config.update(dict(self.extra))
    config.update({k: str(v) for k, v in overrides.items()})
    return config


class KafkaOptions(PipelineOptions):
  """Kafka flags. The brokers are Beam's own ``--bootstrap_servers`` (defined by Beam's Kafka Streams
  runner options, so it cannot be defined twice); passwords come only from the environment."""
  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--topic", default=None, help="Kafka topic of the transactions.")
    parser.add_argument("--labels_topic", default=None,
                        help="Kafka topic of the fraud labels (chargebacks), for the terminal risk features.")
    parser.add_argument("--decisions_topic", default=None,
                        help="Write decisions (JSON, key = transaction id) here; `txstream stream` default: "
                             "TOPIC.decisions.")
    parser.add_argument("--dead_letter_topic", default=None,
                        help="Write dead letters (JSON, key = source position) here; `txstream stream` default: "
                             "TOPIC.dead_letters.")
    parser.add_argument("--group_id", default=None,
                        help="Kafka consumer group whose committed offsets a run starts from (default txstream).")
    parser.add_argument("--kafka_io", default="native", choices=("native", "xlang"),
                        help="native: Python splittable DoFn (every runner); xlang: Beam's Java KafkaIO "
                             "(Flink, Dataflow; needs Java and an expansion service).")
    parser.add_argument("--expansion_service", default=None,
                        help="host:port of a Java expansion service for --kafka_io=xlang.")
    parser.add_argument("--kafka_start", default="committed", choices=("committed", "earliest", "latest"),
                        help="Where each partition starts: the group's committed offset (else the earliest), "
                             "the earliest or the latest offset.")
    parser.add_argument("--kafka_stop_at", default=None, choices=("end",),
                        help="end: stop at the end offsets found when the read starts (a bounded run).")
    parser.add_argument("--kafka_history", default="earliest", choices=("earliest", "none"),
                        help="Bounded runs. earliest (default): also read each partition from its earliest offset "
                             "up to where the run starts, as feature history only (not decided or dead-lettered "
                             "again), so incremental runs compute the features of one run over everything; "
                             "none: only the run's own range (faster, features see a shorter history).")
    parser.add_argument("--kafka_start_time_ms", type=int, default=None,
                        help="Start at the first record with a timestamp at or after this (epoch ms).")
    parser.add_argument("--kafka_stop_time_ms", type=int, default=None,
                        help="Stop before the first record with a timestamp at or after this (epoch ms).")
    parser.add_argument("--kafka_security_protocol", default=None, choices=_SECURITY_PROTOCOLS,
                        help="Default PLAINTEXT (or TXSTREAM_KAFKA_SECURITY_PROTOCOL).")
    parser.add_argument("--kafka_sasl_mechanism", default=None, choices=_SASL_MECHANISMS,
                        help="SASL mechanism; the password comes from $" + PASSWORD_ENV + ".")
    parser.add_argument("--kafka_sasl_username", default=None, help="SASL user name.")
    parser.add_argument("--kafka_ssl_ca_location", default=None, help="CA certificate(s) (PEM) for SSL.")
