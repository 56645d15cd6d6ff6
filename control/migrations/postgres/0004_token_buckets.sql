-- Tokens-per-minute limiters shared by every control plane: one token
-- bucket per key (the agent's TPM, a model's TPM), in thousandths of a
-- token, refilled and debited by one atomic statement per request.
CREATE TABLE token_buckets (
    key         TEXT PRIMARY KEY,
    level_milli BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL
);
