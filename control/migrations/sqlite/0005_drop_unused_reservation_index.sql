-- No query reads reservations by (agent_id, state); every open-reservation
-- query uses reservations_open. The index cost each reservation one more
-- B-tree page per commit, and each settlement a delete and an insert.
DROP INDEX IF EXISTS reservations_by_agent;
