-- Agent keys (design §11): one row per key, holding only the SHA-256 of the key text.
CREATE TABLE ops_api_keys (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}$'),
    -- hex SHA-256 of the whole key string; the key itself is shown once and never kept
    digest       text NOT NULL UNIQUE CHECK (digest ~ '^[0-9a-f]{64}$'),
    -- `*` patterns of templates it may propose and event kinds it may emit
    propose      text[] NOT NULL DEFAULT '{}',
    emit         text[] NOT NULL DEFAULT '{}',
    answer       boolean NOT NULL DEFAULT false,
    read         boolean NOT NULL DEFAULT false,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    revoked_by   text
);
-- A name is in use while its key is live; a revoked key's name may be given again.
CREATE UNIQUE INDEX ops_api_keys_live_name ON ops_api_keys (name) WHERE revoked_at IS NULL;

-- Per-agent gates count an agent's proposals (pending, and created today).
CREATE INDEX ops_mission_proposals_proposer ON ops_mission_proposals (proposed_by, created_at);
