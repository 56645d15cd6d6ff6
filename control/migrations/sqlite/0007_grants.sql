-- Grants (SPEC §4.3): budget and request credits held for one data plane
-- until a deadline. Calls admitted from one are ordinary reservations whose
-- admit event names it; `used_micro` is what they took.
CREATE TABLE grants (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL,
    data_plane     TEXT NOT NULL,
    budget_micro   BIGINT NOT NULL CHECK (budget_micro > 0),
    used_micro     BIGINT NOT NULL DEFAULT 0 CHECK (used_micro >= 0 AND used_micro <= budget_micro),
    requests       BIGINT CHECK (requests IS NULL OR requests >= 0),
    requests_used  BIGINT NOT NULL DEFAULT 0 CHECK (requests_used >= 0),
    created_at_ms  BIGINT NOT NULL,
    deadline_ms    BIGINT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('open', 'returned', 'expired')),
    charged_micro  BIGINT NOT NULL DEFAULT 0 CHECK (charged_micro >= 0),
    ended_at_ms    BIGINT
);

CREATE INDEX grants_open_by_agent ON grants (agent_id) WHERE state = 'open';
CREATE INDEX grants_open_by_deadline ON grants (deadline_ms) WHERE state = 'open';
