-- Processes supervised by `aexctl run`. Each has its own token (hash only),
-- valid while it is running.
CREATE TABLE processes (
    id            TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL,
    token_sha256  TEXT NOT NULL UNIQUE,
    pid           BIGINT NOT NULL,
    command       TEXT NOT NULL,
    host          TEXT NOT NULL,
    state         TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms   BIGINT,
    exit_code     BIGINT,
    reason        TEXT NOT NULL DEFAULT '',
    -- Set when a kill was ordered, so a supervisor that subscribes late
    -- still gets the order.
    kill_reason   TEXT
);

CREATE INDEX processes_running ON processes (state, agent_id);
