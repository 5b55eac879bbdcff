-- txstream warm tier, schema version 0001.
--
-- decisions is partitioned by event day (UTC); the sink creates a day's
-- partition, decisions_pYYYYMMDD, before it first writes to it. Its primary
-- key has to contain the partition key, so it is (event_date, transaction_id);
-- decision_keys, unpartitioned, keeps transaction_id unique across all days
-- and the foreign key ties every decision to its one (transaction_id,
-- event_date). A transaction's event time never changes, so an upsert on
-- (event_date, transaction_id) is idempotent.

CREATE TABLE decision_keys (
  transaction_id text PRIMARY KEY,
  event_date date NOT NULL,
  first_written_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (transaction_id, event_date)
);
COMMENT ON TABLE decision_keys IS
  'One row per transaction_id ever written to decisions: keeps transaction_id unique across day partitions.';

CREATE TABLE decisions (
  event_date date NOT NULL,
  transaction_id text NOT NULL,
  event_time timestamptz NOT NULL,
  customer_id bigint NOT NULL,
  terminal_id bigint NOT NULL,
  card_token text NOT NULL,
  amount_minor bigint NOT NULL,
  currency text NOT NULL,
  entry_mode text,
  merchant_category integer,
  customer_segment text,
  home_distance double precision,
  score double precision NOT NULL,
  decision text NOT NULL CHECK (decision IN ('approve', 'review', 'decline')),
  reason_codes text[] NOT NULL,
  features double precision[] NOT NULL,
  model_version text NOT NULL,
  reference_version text,
  pipeline_version text NOT NULL,
  schema_id integer NOT NULL,
  source text NOT NULL,
  decided_at timestamptz NOT NULL,
  written_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (event_date, transaction_id),
  FOREIGN KEY (transaction_id, event_date) REFERENCES decision_keys (transaction_id, event_date),
  CHECK (event_date = (event_time AT TIME ZONE 'UTC')::date)
) PARTITION BY RANGE (event_date);
COMMENT ON COLUMN decisions.features IS
  'Feature vector in txstream.transforms.features.FEATURE_NAMES order of the row''s pipeline_version.';
COMMENT ON COLUMN decisions.card_token IS 'Keyed card token; never a card number.';
CREATE INDEX decisions_customer_time ON decisions (customer_id, event_time DESC);
CREATE INDEX decisions_review_queue ON decisions (score DESC, event_time) WHERE decision = 'review';

CREATE TABLE dead_letters (
  source text NOT NULL,
  stage text NOT NULL,
  reason text NOT NULL,
  error_class text NOT NULL,
  message text NOT NULL,
  pipeline_version text NOT NULL,
  raw bytea,
  first_seen_at timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (source, stage)
);
CREATE INDEX dead_letters_stage_reason ON dead_letters (stage, reason);

CREATE TABLE runs (
  run_id text PRIMARY KEY,
  started_at timestamptz NOT NULL,
  finished_at timestamptz,
  pipeline_version text NOT NULL,
  code_version text,
  model_version text,
  reference_version text,
  schema_ids integer[] NOT NULL DEFAULT '{}',
  summary jsonb NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE runs IS
  'One row per pipeline run: what code, model, reference data and schemas produced its output.';
