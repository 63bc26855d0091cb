-- The Telegram outbox is filled in the same transaction as the event it announces, by
-- a trigger, so every writer of events (CLI, worker, heartbeat, HTTP) enqueues its
-- notifications without an extra round trip and none can forget to.
--
-- A row says what to render for one chat; the sender renders from the current state
-- when it sends, so several pending rows for one (chat, subject) become one message:
--   prompt   the approval prompt of proposal N (sent once, then edited to its outcome)
--   mission  the card of mission N (sent once, then edited as steps progress)
--   send     a new message: an event (event_id) or a text (body->>'text')

ALTER TABLE ops_notifications DROP CONSTRAINT ops_notifications_action_check;
ALTER TABLE ops_notifications ADD CONSTRAINT ops_notifications_action_check
    CHECK (action IN ('prompt', 'mission', 'send'));
ALTER TABLE ops_notifications ADD COLUMN event_id bigint;
ALTER TABLE ops_notifications ALTER COLUMN body SET DEFAULT '{}';
CREATE INDEX ops_notifications_chat_pending ON ops_notifications (chat_id, id) WHERE status = 'pending';

-- ops_policy key 'notify' (written by `policy apply`):
--   {"chats": [-100...], "like": ["proposal.%", "mission.%", "step.failed"]}
CREATE FUNCTION ops_enqueue_notifications() RETURNS trigger LANGUAGE plpgsql AS $$
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

    IF total > 0 THEN
        PERFORM pg_notify('ops_outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER ops_agent_events_outbox AFTER INSERT ON ops_agent_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION ops_enqueue_notifications();

-- Everyone who wrote to the bot in a private chat (strangers too), so a later grant
-- knows the bot may write to them.
CREATE TABLE ops_telegram_contacts (
    telegram_id bigint PRIMARY KEY,
    name        text,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);
