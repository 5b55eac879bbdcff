-- txstream warm tier, schema version 0002.
--
-- decisions.rules_version: the version (content hash) of the rules file that
-- decided the row; NULL for rows written before it was recorded.
--
-- The foreign key from decisions to decision_keys is dropped: its per-row
-- trigger (an index probe and a row lock, ~10 us a row of server CPU) was the
-- largest single cost of a write.
-- transaction_id stays unique across day partitions by the writer's protocol,
-- in one transaction per batch: insert the batch's keys first (ON CONFLICT DO
-- NOTHING, or a COPY that fails on a stored key), write only the decisions
-- whose key holds their own event_date, and never update or delete a key.
-- The unique (transaction_id, event_date) existed only for the foreign key.

ALTER TABLE decisions ADD COLUMN rules_version text;
ALTER TABLE decisions DROP CONSTRAINT decisions_transaction_id_event_date_fkey;
ALTER TABLE decision_keys DROP CONSTRAINT decision_keys_transaction_id_event_date_key;
COMMENT ON TABLE decision_keys IS
  'One row per transaction_id ever written to decisions, with its event_date: keeps transaction_id unique across '
  'day partitions. Writers insert the key in the transaction that writes the decision; keys are never updated.';
