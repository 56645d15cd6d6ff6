-- The events that commit to a token (`details.token_mac`), found by it so
-- that a 401 can say what became of a token no agent holds any more
-- (rotated, its agent deleted, a run's). Only those kinds are indexed:
-- `aex_core::presented::Retired::ISSUED_BY`, spelt the same in the query.
CREATE INDEX events_by_token_mac ON events (json_extract(details, '$.token_mac'))
    WHERE kind IN ('agent.created', 'agent.token_rotated', 'agent.baseline', 'process.started');
