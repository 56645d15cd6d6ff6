-- Data-plane credentials scoped to the agents a data plane serves (SPEC §9,
-- `aex_core::credential`). The secret is shown once; its SHA-256 is kept.
-- `agents` is a JSON array of agent names (as text, like `allowed_models`).
CREATE TABLE credentials (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    secret_sha256  TEXT NOT NULL UNIQUE,
    secret_prefix  TEXT NOT NULL,
    agents         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);

-- One live credential per name; revoked ones stay, as history.
CREATE UNIQUE INDEX credentials_live_name ON credentials (name) WHERE revoked_at_ms IS NULL;
