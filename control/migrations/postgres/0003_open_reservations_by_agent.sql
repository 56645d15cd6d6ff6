-- An agent's open reservations, counted by every reservation of an agent
-- with a concurrency limit (under the chain lock, so the limit holds across
-- control planes). Partial: a closed reservation leaves it.
CREATE INDEX reservations_open_by_agent ON reservations (agent_id) WHERE state = 'open';
