-- Cache-aware prices (SPEC §3, §4.1): a reservation settles cached input
-- and cache writes at their own prices. NULL prices (rows admitted before
-- this migration) read as the input price, as they were charged; NULL
-- token counts read as 0.
ALTER TABLE reservations ADD COLUMN cached_input_pico_per_token INTEGER;
ALTER TABLE reservations ADD COLUMN cache_write_pico_per_token INTEGER;
ALTER TABLE reservations ADD COLUMN cached_input_tokens INTEGER;
ALTER TABLE reservations ADD COLUMN cache_write_tokens INTEGER;
