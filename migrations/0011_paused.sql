-- The pause switch, read in one place: `ops_policy` key 'paused' ({"paused": true}),
-- off when the key is missing. The worker's claim uses it (as `(SELECT ops_paused())`,
-- evaluated once per statement); the gates read it too.
CREATE FUNCTION ops_paused() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce((SELECT (value->>'paused')::boolean FROM ops_policy WHERE key = 'paused'), false)
$$;
