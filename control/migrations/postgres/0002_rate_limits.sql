-- Requests-per-minute limiters shared by every control plane: one GCRA
-- arrival time (µs) per key, moved by one atomic statement per request.
CREATE TABLE rate_limits (
    key    TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
);
