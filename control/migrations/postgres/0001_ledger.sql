-- The ledger on PostgreSQL: the same tables, columns and constraints as the
-- SQLite schema after its migrations 0001-0006, in one step. Money is
-- integer micro-USD. There is deliberately no CHECK (spent_micro <=
-- budget_micro): see the SQLite schema.
CREATE TABLE agents (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    token_sha256         TEXT NOT NULL UNIQUE,
    token_prefix         TEXT NOT NULL,
    token_expires_at_ms  BIGINT,
    token_ttl_seconds    BIGINT NOT NULL DEFAULT 0,
    budget_micro         BIGINT NOT NULL CHECK (budget_micro >= 0),
    spent_micro          BIGINT NOT NULL DEFAULT 0 CHECK (spent_micro >= 0),
    reserved_micro       BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micro >= 0),
    overrun_micro        BIGINT NOT NULL DEFAULT 0 CHECK (overrun_micro >= 0),
    rpm                  BIGINT NOT NULL CHECK (rpm >= 0),
    tpm                  BIGINT NOT NULL DEFAULT 0 CHECK (tpm >= 0),
    max_concurrent       BIGINT NOT NULL DEFAULT 0 CHECK (max_concurrent >= 0),
    allowed_models       TEXT NOT NULL DEFAULT '[]',
    cap_streaming        BOOLEAN NOT NULL,
    cap_tools            BOOLEAN NOT NULL,
    cap_function_calling BOOLEAN NOT NULL,
    cap_vision           BOOLEAN NOT NULL,
    scope                TEXT NOT NULL,
    state                TEXT NOT NULL,
    created_at_ms        BIGINT NOT NULL,
    updated_at_ms        BIGINT NOT NULL,
    last_activity_at_ms  BIGINT,
    deleted_at_ms        BIGINT
);

-- Names are unique among live agents; a tombstone keeps its name.
CREATE UNIQUE INDEX agents_live_name ON agents (name) WHERE deleted_at_ms IS NULL;

-- The append-only, hash-chained event log; seq is assigned by the writer
-- holding the chain's lock, contiguous from 1.
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

CREATE TABLE reservations (
    id                    TEXT PRIMARY KEY,
    request_id            TEXT NOT NULL UNIQUE,
    agent_id              TEXT NOT NULL,
    model                 TEXT NOT NULL,
    amount_micro          BIGINT NOT NULL CHECK (amount_micro >= 0),
    input_pico_per_token  BIGINT NOT NULL,
    output_pico_per_token BIGINT NOT NULL,
    input_tokens_bound    BIGINT NOT NULL,
    output_tokens_cap     BIGINT NOT NULL,
    state                 TEXT NOT NULL,
    created_at_ms         BIGINT NOT NULL,
    expires_at_ms         BIGINT NOT NULL,
    settled_at_ms         BIGINT,
    charged_micro         BIGINT,
    outcome               TEXT,
    prompt_tokens         BIGINT,
    completion_tokens     BIGINT,
    overrun_micro         BIGINT NOT NULL DEFAULT 0 CHECK (overrun_micro >= 0)
);

CREATE INDEX reservations_open ON reservations (state, expires_at_ms);

CREATE TABLE counters (
    agent_id TEXT NOT NULL,
    name     TEXT NOT NULL,
    value    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, name)
);

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
    kill_reason   TEXT
);

CREATE INDEX processes_running ON processes (state, agent_id);
