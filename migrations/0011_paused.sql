-- The pause switch, read in one place: `ops_policy` key 'paused' ({"paused": true}),
-- off when the key is missing. One row: `SELECT paused FROM ops_paused()`. A table
-- function, so the planner inlines it where it is used (the worker's claim) and it
-- costs what the expression itself costs; a scalar SQL function would be planned again
-- on every call.
CREATE FUNCTION ops_paused() RETURNS TABLE (paused boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce((SELECT (value->>'paused')::boolean FROM ops_policy WHERE key = 'paused'), false)
$$;
