-- Denials and refused reports by the request id their client received
-- (`x-aex-request-id`), for `aexctl events --request` (issue #33). Only
-- those kinds carry it in `details` and are indexed; a reservation's own
-- events are found through its row.
CREATE INDEX events_by_request ON events (((details::jsonb) ->> 'request_id'))
    WHERE kind IN ('deny', 'report.refused');
