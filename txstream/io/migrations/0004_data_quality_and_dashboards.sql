-- txstream warm tier, schema version 0004.
--
-- dq_results: one row per expectation-suite validation (txstream.quality):
-- a whole run's ("run" scope) or one window's ("window" scope: a bounded
-- run's event day, a live run's fixed processing-time window). `failed` holds
-- the failed expectations with their observed values, as in the run summary's
-- `data_quality`; `docs_path` is the run's HTML data-docs page.
--
-- dashboards: dashboards saved from `txstream serve`'s builder (panels as
-- JSON: query, chart, position), shared by id in the page's URL.

CREATE TABLE dq_results (
  id bigserial PRIMARY KEY,
  run_id text NOT NULL,
  suite text NOT NULL,
  scope text NOT NULL CHECK (scope IN ('run', 'window')),
  window_start timestamptz,
  window_end timestamptz,
  success boolean NOT NULL,
  evaluated integer NOT NULL,
  failed_count integer NOT NULL,
  failed jsonb NOT NULL DEFAULT '[]',
  docs_path text,
  validated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dq_results_run ON dq_results (run_id, suite);
CREATE INDEX dq_results_validated_at ON dq_results (validated_at DESC);
COMMENT ON TABLE dq_results IS
  'Great Expectations suite results per run and per window (txstream.quality).';

CREATE TABLE dashboards (
  dashboard_id text PRIMARY KEY,
  title text NOT NULL,
  panels jsonb NOT NULL DEFAULT '[]',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dashboards IS
  'Dashboards saved from txstream serve''s builder: panels (saved query, chart kind, position) as JSON.';
