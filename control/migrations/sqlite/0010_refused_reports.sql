-- Calls a data plane reported serving that the ledger refused
-- (`report.refused`), found by reservation so that a resent report logs
-- each once. Rare by design: the index holds only them.
CREATE INDEX events_report_refused ON events (reservation_id) WHERE kind = 'report.refused';
