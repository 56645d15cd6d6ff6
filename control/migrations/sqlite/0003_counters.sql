-- One counter per (agent, event kind[:reason]), bumped in the same
-- transaction as the event it counts, so status never scans the log and
-- audit can check that the two agree.
CREATE TABLE counters (
    agent_id TEXT NOT NULL,
    name     TEXT NOT NULL,
    value    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, name)
);
