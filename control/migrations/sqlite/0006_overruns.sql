-- Provider-reported usage beyond a reservation is no longer charged (spent
-- never passes budget); it is kept here, per reservation and per agent, and
-- as the amount of the chained `overrun` event.
ALTER TABLE agents ADD COLUMN overrun_micro BIGINT NOT NULL DEFAULT 0 CHECK (overrun_micro >= 0);
ALTER TABLE reservations ADD COLUMN overrun_micro BIGINT NOT NULL DEFAULT 0 CHECK (overrun_micro >= 0);
