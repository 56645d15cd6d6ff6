-- One row per admitted request. `open` until settled exactly once
-- (compare-and-set on state), released, or expired by the control plane.
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
    completion_tokens     BIGINT
);

CREATE INDEX reservations_open ON reservations (state, expires_at_ms);
CREATE INDEX reservations_by_agent ON reservations (agent_id, state);
