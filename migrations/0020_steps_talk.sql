-- Steps that talk (docs/policy.md "Outputs", "Questions"): a step's output, its latest
-- progress line, its condition; the `ask` kind and its `asking` state; `skipped`.
ALTER TABLE ops_mission_steps
    ADD COLUMN output     jsonb,
    ADD COLUMN progress   jsonb,
    -- `when`: {"steps.NAME.KEY": ["value", ...], ...}; every key must hold
    ADD COLUMN condition  jsonb;
ALTER TABLE ops_mission_steps DROP CONSTRAINT ops_mission_steps_kind_check;
ALTER TABLE ops_mission_steps ADD CONSTRAINT ops_mission_steps_kind_check
    CHECK (kind IN ('shell', 'http', 'sleep', 'noop', 'emit', 'ask'));
ALTER TABLE ops_mission_steps DROP CONSTRAINT ops_mission_steps_status_check;
ALTER TABLE ops_mission_steps ADD CONSTRAINT ops_mission_steps_status_check
    CHECK (status IN ('waiting', 'queued', 'running', 'asking', 'succeeded', 'failed', 'cancelled', 'skipped'));

-- A question put to people while a mission runs (or by an agent over HTTP).
--   open ──answer──▶ answered   (first valid answer; or the default at its timeout)
--   open ──expire──▶ expired    (its timeout, no default)
--   open ──cancel──▶ cancelled  (its mission cancelled, its asking attempt gone)
CREATE TABLE ops_questions (
    id           bigserial PRIMARY KEY,
    mission_id   bigint REFERENCES ops_missions (id) ON DELETE CASCADE,
    step_id      bigint REFERENCES ops_mission_steps (id) ON DELETE CASCADE,
    -- set for `opsloop ask` inside a shell step: the attempt that asked (it ends with it)
    attempt      integer,
    asked_by     text NOT NULL,
    question     text NOT NULL,
    choices      jsonb,            -- an array of strings, or NULL for free text
    pattern      text,             -- free text must match it (whole answer)
    help         text,
    audience     text NOT NULL CHECK (audience IN ('proposer', 'approvers', 'operators')),
    -- the Telegram user who proposed the mission, for audience 'proposer'
    proposer     bigint,
    default_answer text,
    expires_at   timestamptz,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'answered', 'expired', 'cancelled')),
    answer       text,
    answered_by  text,
    answered_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ops_questions_open ON ops_questions (expires_at, id) WHERE status = 'open';
CREATE INDEX ops_questions_mission ON ops_questions (mission_id) WHERE status = 'open';
CREATE INDEX ops_questions_step ON ops_questions (step_id);

-- The outbox learns questions: `question` rows show question N in a chat (sent once,
-- then edited to its outcome), like approval prompts.
ALTER TABLE ops_notifications DROP CONSTRAINT ops_notifications_action_check;
ALTER TABLE ops_notifications ADD CONSTRAINT ops_notifications_action_check
    CHECK (action IN ('prompt', 'mission', 'send', 'question'));

-- The events trigger (migrations/0002_outbox.sql) learns questions, in the same
-- function, so an insert that tells nobody still costs one early return.
CREATE OR REPLACE FUNCTION ops_enqueue_notifications() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cfg jsonb;
    chats bigint[];
    patterns text[];
    n bigint;
    total bigint := 0;
BEGIN
    SELECT value INTO cfg FROM ops_policy WHERE key = 'notify';
    chats := coalesce(ARRAY(SELECT jsonb_array_elements_text(cfg->'chats')::bigint), '{}');
    patterns := coalesce(ARRAY(SELECT jsonb_array_elements_text(cfg->'like')), '{}');
    -- Nobody to tell: keep the worker's hot path free of the work below.
    IF cardinality(chats) = 0 AND NOT EXISTS (SELECT 1 FROM ops_users WHERE started) THEN
        RETURN NULL;
    END IF;

    -- Approval prompts: approvers who started the bot, and the notify chats.
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT r.chat_id, 'proposal:' || e.proposal_id, 'prompt', e.id
    FROM new_events e
    CROSS JOIN LATERAL (
        SELECT u.telegram_id AS chat_id FROM ops_users u
        WHERE u.started AND u.role IN ('approver', 'admin')
        UNION SELECT unnest(chats)) r
    WHERE e.kind = 'proposal.created' AND (e.payload->>'awaits_approval')::boolean IS TRUE;
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;

    -- Outcomes: every prompt of the proposal is edited.
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT DISTINCT ON (n.chat_id, e.id) n.chat_id, n.subject, 'prompt', e.id
    FROM new_events e
    JOIN ops_notifications n ON n.subject = 'proposal:' || e.proposal_id AND n.action = 'prompt'
    WHERE e.kind IN ('proposal.approved', 'proposal.rejected', 'proposal.expired');
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;

    -- Mission cards: subscribers and notify chats, for mission events the policy asks
    -- for; step events edit the cards that exist.
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT r.chat_id, 'mission:' || e.mission_id, 'mission', e.id
    FROM new_events e
    CROSS JOIN LATERAL (
        SELECT u.telegram_id AS chat_id FROM ops_users u WHERE u.started AND u.subscribed
        UNION SELECT unnest(chats)) r
    WHERE e.mission_id IS NOT NULL AND e.kind LIKE 'mission.%'
      AND EXISTS (SELECT 1 FROM unnest(patterns) p WHERE e.kind LIKE p);
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT DISTINCT ON (n.chat_id, e.id) n.chat_id, n.subject, 'mission', e.id
    FROM new_events e
    JOIN ops_notifications n ON n.subject = 'mission:' || e.mission_id AND n.action = 'mission'
    WHERE e.mission_id IS NOT NULL AND e.kind LIKE 'step.%';
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;

    -- New messages: a failure (besides the card, so it rings), other kinds the policy
    -- asks for, and a template paused after failures (always to admins).
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT r.chat_id, 'event:' || e.id, 'send', e.id
    FROM new_events e
    CROSS JOIN LATERAL (
        SELECT u.telegram_id AS chat_id FROM ops_users u
        WHERE u.started AND (u.subscribed OR (e.kind = 'template.paused' AND u.role = 'admin'))
        UNION SELECT unnest(chats)) r
    WHERE (e.kind = 'template.paused'
           OR (e.kind NOT LIKE 'proposal.%' AND e.kind NOT LIKE 'step.%' AND e.kind <> 'mission.started'
               AND e.kind NOT IN ('mission.succeeded', 'mission.cancelled')
               AND EXISTS (SELECT 1 FROM unnest(patterns) p WHERE e.kind LIKE p)));
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;

    -- Questions: a new one goes to its audience's private chats (people who started the
    -- bot), and to the notify chats unless it is for its proposer alone.
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT DISTINCT r.chat_id, 'question:' || q.id, 'question', e.id
    FROM new_events e
    JOIN ops_questions q ON q.id = (e.payload->>'question')::bigint
    CROSS JOIN LATERAL (
        SELECT u.telegram_id AS chat_id FROM ops_users u
        WHERE u.started AND (
            (q.audience = 'proposer' AND q.proposer IS NOT NULL AND u.telegram_id = q.proposer)
            OR (q.audience = 'operators' AND u.role IN ('operator', 'approver', 'admin'))
            OR ((q.audience = 'approvers' OR (q.audience = 'proposer' AND q.proposer IS NULL))
                AND u.role IN ('approver', 'admin')))
        UNION SELECT unnest(chats) WHERE NOT (q.audience = 'proposer' AND q.proposer IS NOT NULL)) r
    WHERE e.kind = 'question.asked';
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;
    -- Its outcome: every copy of the question is edited.
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT DISTINCT ON (n.chat_id, e.id) n.chat_id, n.subject, 'question', e.id
    FROM new_events e
    JOIN ops_notifications n ON n.subject = 'question:' || (e.payload->>'question') AND n.action = 'question'
    WHERE e.kind IN ('question.answered', 'question.expired', 'question.cancelled');
    GET DIAGNOSTICS n = ROW_COUNT;
    total := total + n;

    IF total > 0 THEN
        PERFORM pg_notify('ops_outbox', '');
    END IF;
    RETURN NULL;
END $$;


-- `[approval] remind`: one reminder (a new message, which rings) per pending proposal
-- and per open question, after that long.
ALTER TABLE ops_mission_proposals ADD COLUMN reminded_at timestamptz;
ALTER TABLE ops_questions ADD COLUMN reminded_at timestamptz;
