-- opsloop schema. Tables and status words are part of the contract (design §4).
-- Statuses are checked text so psql shows them plainly and scripts can match on them.

CREATE TABLE ops_policy (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ops_mission_proposals (
    id                bigserial PRIMARY KEY,
    template          text NOT NULL,
    params            jsonb NOT NULL DEFAULT '{}',
    risk              text NOT NULL CHECK (risk IN ('low', 'high', 'red')),
    proposed_by       text NOT NULL,
    source            text NOT NULL CHECK (source IN ('telegram', 'cli', 'http', 'reaction', 'trigger')),
    reason            text,
    status            text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    -- the steps to run, params already substituted: approvers approve exactly this
    plan              jsonb NOT NULL DEFAULT '[]',
    approvals_needed  integer NOT NULL DEFAULT 1,
    self_approval     boolean NOT NULL DEFAULT true,
    decided_by        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz,
    expires_at        timestamptz
);
CREATE INDEX ops_mission_proposals_pending ON ops_mission_proposals (expires_at) WHERE status = 'pending';
CREATE INDEX ops_mission_proposals_template ON ops_mission_proposals (template, created_at);

CREATE TABLE ops_proposal_approvals (
    id          bigserial PRIMARY KEY,
    proposal_id bigint NOT NULL REFERENCES ops_mission_proposals (id) ON DELETE CASCADE,
    actor       text NOT NULL,
    decision    text NOT NULL CHECK (decision IN ('approve', 'reject')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (proposal_id, actor)
);

CREATE TABLE ops_missions (
    id          bigserial PRIMARY KEY,
    proposal_id bigint NOT NULL UNIQUE REFERENCES ops_mission_proposals (id) ON DELETE CASCADE,
    template    text NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX ops_missions_running ON ops_missions (template) WHERE status = 'running';
CREATE INDEX ops_missions_template ON ops_missions (template, created_at);

CREATE TABLE ops_mission_steps (
    id               bigserial PRIMARY KEY,
    mission_id       bigint NOT NULL REFERENCES ops_missions (id) ON DELETE CASCADE,
    seq              integer NOT NULL,
    name             text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('shell', 'http', 'sleep', 'noop', 'emit')),
    spec             jsonb NOT NULL,
    status           text NOT NULL CHECK (status IN ('waiting', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    result           jsonb,
    error            text,
    UNIQUE (mission_id, seq)
);
-- The ready queue: only queued rows, so the claim's index stays small however much history there is.
CREATE INDEX ops_mission_steps_ready ON ops_mission_steps (run_after, id) WHERE status = 'queued';
CREATE INDEX ops_mission_steps_leases ON ops_mission_steps (lease_expires_at) WHERE status = 'running';
-- Queue tables change fast: refresh their statistics and clean them sooner than the
-- defaults (10-20% of the table), so plans follow a burst of work.
ALTER TABLE ops_mission_steps SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE ops_missions SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE ops_agent_events (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    source       text NOT NULL,
    proposal_id  bigint,
    mission_id   bigint,
    step_id      bigint,
    payload      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    -- the writing transaction: followers read by xid windows below the snapshot's xmin,
    -- so an event whose id was taken early but committed late is never skipped
    -- (bigint rather than xid8, which has no BRIN operator class)
    xid          bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint
);
-- Every step writes several events, so each index here costs the worker's hot path:
-- no query looks events up by mission or time. Retention walks the primary key (ids
-- grow with time); followers read xid windows, which BRIN serves at almost no cost
-- per insert.
CREATE INDEX ops_agent_events_unprocessed ON ops_agent_events (id) WHERE processed_at IS NULL;
CREATE INDEX ops_agent_events_xid ON ops_agent_events USING brin (xid) WITH (pages_per_range = 16);

-- An event is matched against the reaction rules in force when it is written: one no
-- rule can match (by kind) is processed at once, so it never enters the unprocessed
-- index nor needs the tick's update. `policy apply` keeps the 'reactions' key current:
--   {"like": ["deploy.%", ...]}   (the rules' `on` patterns as LIKE patterns)
CREATE FUNCTION ops_processed_at(kind text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN EXISTS (
        SELECT 1 FROM ops_policy p, jsonb_array_elements_text(p.value->'like') AS pattern
        WHERE p.key = 'reactions' AND kind LIKE pattern) THEN NULL ELSE now() END
$$;

CREATE TABLE ops_agent_reactions (
    id          bigserial PRIMARY KEY,
    event_id    bigint NOT NULL REFERENCES ops_agent_events (id) ON DELETE CASCADE,
    reaction    text NOT NULL,
    status      text NOT NULL CHECK (status IN ('queued', 'proposed', 'skipped')),
    proposal_id bigint REFERENCES ops_mission_proposals (id) ON DELETE SET NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, reaction)
);
CREATE INDEX ops_agent_reactions_cooldown ON ops_agent_reactions (reaction, created_at) WHERE status = 'proposed';

CREATE TABLE ops_action_runs (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('tick', 'step')),
    step_id     bigint,
    attempt     integer,
    worker      text,
    outcome     text NOT NULL,
    summary     jsonb NOT NULL DEFAULT '{}',
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
-- No index on started_at: retention walks the primary key, as ids grow with time.

CREATE TABLE ops_step_dead_letters (
    id          bigserial PRIMARY KEY,
    step_id     bigint NOT NULL UNIQUE REFERENCES ops_mission_steps (id) ON DELETE CASCADE,
    mission_id  bigint NOT NULL,
    template    text NOT NULL,
    name        text NOT NULL,
    spec        jsonb NOT NULL,
    attempts    integer NOT NULL,
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ops_users (
    telegram_id bigint PRIMARY KEY,
    name        text,
    role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'approver', 'admin')),
    subscribed  boolean NOT NULL DEFAULT false,
    started     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ops_workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    concurrency integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    stopped_at  timestamptz
);

-- Trigger bookkeeping: the last slot each cron trigger fired for, so a missed schedule fires once.
CREATE TABLE ops_trigger_state (
    name       text PRIMARY KEY,
    last_slot  timestamptz NOT NULL,
    fired_at   timestamptz NOT NULL DEFAULT now()
);

-- The Telegram outbox: written in the same transaction as the event it announces.
CREATE TABLE ops_notifications (
    id          bigserial PRIMARY KEY,
    chat_id     bigint NOT NULL,
    -- what the message is about, so edits find the message they update
    subject     text NOT NULL,
    action      text NOT NULL CHECK (action IN ('send', 'edit', 'answer')),
    body        jsonb NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    run_after   timestamptz NOT NULL DEFAULT now(),
    message_id  bigint,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX ops_notifications_ready ON ops_notifications (run_after, id) WHERE status = 'pending';
CREATE INDEX ops_notifications_subject ON ops_notifications (subject, chat_id);

-- Wake `events --follow`, the heartbeat and the notifier when events are written.
-- Statement-level with a constant payload: a batch insert costs one NOTIFY, and
-- Postgres folds repeats within a transaction. Listeners read by id, not payload.
CREATE FUNCTION ops_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ops_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER ops_agent_events_notify AFTER INSERT ON ops_agent_events
    FOR EACH STATEMENT EXECUTE FUNCTION ops_notify_events();

-- Wake workers when a step becomes ready (inserted or moved to queued).
CREATE FUNCTION ops_notify_steps_ready() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ops_steps_ready', '');
    RETURN NULL;
END $$;
CREATE TRIGGER ops_mission_steps_ready_insert AFTER INSERT ON ops_mission_steps
    FOR EACH STATEMENT EXECUTE FUNCTION ops_notify_steps_ready();
