-- txstream warm tier, schema version 0003.
--
-- runs: the run's manifest (pipelines.manifest: code, schema fingerprints,
-- model, rules and reference-data versions, inputs, window, summary), its
-- status (running, succeeded, failed), its kind (run or rerun) and the rules
-- version, so "what decided this, with which model and rules" is a query.

ALTER TABLE runs ADD COLUMN kind text NOT NULL DEFAULT 'run';
ALTER TABLE runs ADD COLUMN status text;
ALTER TABLE runs ADD COLUMN rules_version text;
ALTER TABLE runs ADD COLUMN manifest jsonb;
COMMENT ON COLUMN runs.manifest IS
  'The run manifest, as written beside the cold tier (<cold root>/manifests/<run_id>.json).';
