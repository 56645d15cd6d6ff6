-- Agents. Money is integer micro-USD. There is deliberately no
-- CHECK (spent_micro <= budget_micro): a provider that reports more than was
-- reserved must still be charged (and flagged), never dropped.
CREATE TABLE agents (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    token_sha256        TEXT NOT NULL UNIQUE,
    token_prefix        TEXT NOT NULL,
    token_expires_at_ms BIGINT,
    token_ttl_seconds   BIGINT NOT NULL DEFAULT 0,
    budget_micro        BIGINT NOT NULL CHECK (budget_micro >= 0),
    spent_micro         BIGINT NOT NULL DEFAULT 0 CHECK (spent_micro >= 0),
    reserved_micro      BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micro >= 0),
    rpm                 BIGINT NOT NULL CHECK (rpm >= 0),
    tpm                 BIGINT NOT NULL DEFAULT 0 CHECK (tpm >= 0),
    max_concurrent      BIGINT NOT NULL DEFAULT 0 CHECK (max_concurrent >= 0),
    allowed_models      TEXT NOT NULL DEFAULT '[]',
    cap_streaming       BOOLEAN NOT NULL,
    cap_tools           BOOLEAN NOT NULL,
    cap_function_calling BOOLEAN NOT NULL,
    cap_vision          BOOLEAN NOT NULL,
    scope               TEXT NOT NULL,
    state               TEXT NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    updated_at_ms       BIGINT NOT NULL,
    last_activity_at_ms BIGINT,
    deleted_at_ms       BIGINT
);

-- Names are unique among live agents; a deleted agent's name can be reused
-- while its tombstone keeps the history.
CREATE UNIQUE INDEX agents_live_name ON agents (name) WHERE deleted_at_ms IS NULL;

-- The append-only, hash-chained event log. seq is assigned by the writer,
-- contiguous from 1, so a deleted row leaves a gap that audit names.
CREATE TABLE events (
    seq            BIGINT PRIMARY KEY,
    ts_ms          BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    agent_id       TEXT NOT NULL DEFAULT '',
    agent_name     TEXT NOT NULL DEFAULT '',
    reservation_id TEXT NOT NULL DEFAULT '',
    amount_micro   BIGINT NOT NULL DEFAULT 0,
    reason         TEXT NOT NULL DEFAULT '',
    details        TEXT NOT NULL DEFAULT '{}',
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);

CREATE INDEX events_by_agent ON events (agent_id, seq);
CREATE INDEX events_by_time ON events (ts_ms);
