-- Operator controls (design §12): priorities, and retry's bookkeeping.

-- Priorities: a proposal's (the template's unless overridden), copied to its mission
-- and to each step, so the claim orders by the step's own column.
ALTER TABLE ops_mission_proposals ADD COLUMN priority integer NOT NULL DEFAULT 0
    CHECK (priority BETWEEN -100 AND 100);
ALTER TABLE ops_missions ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE ops_mission_steps ADD COLUMN priority integer NOT NULL DEFAULT 0;

-- The ready queue in claim order (highest priority, then the time it became ready,
-- then id): the claim walks this index and stops after its batch, never sorting the queue.
DROP INDEX ops_mission_steps_ready;
CREATE INDEX ops_mission_steps_ready ON ops_mission_steps (priority DESC, run_after, id)
    WHERE status = 'queued';

-- Retry: a dead letter stays, marked retried (by whom, when). A retried step that fails
-- for good again is dead-lettered again, so the key is the step and its attempt count.
ALTER TABLE ops_step_dead_letters ADD COLUMN retried_at timestamptz;
ALTER TABLE ops_step_dead_letters ADD COLUMN retried_by text;
ALTER TABLE ops_step_dead_letters DROP CONSTRAINT ops_step_dead_letters_step_id_key;
ALTER TABLE ops_step_dead_letters ADD CONSTRAINT ops_step_dead_letters_step_attempts
    UNIQUE (step_id, attempts);

-- The kill switch tells admins, whatever `notify.events` says (as a template paused
-- after failures does). A trigger of its own, so the outbox trigger stays as it is;
-- admins who already get the event as subscribers are not told twice.
CREATE FUNCTION ops_enqueue_kill_notice() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    patterns text[];
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_events WHERE kind = 'system.killed') THEN
        RETURN NULL;
    END IF;
    patterns := coalesce(ARRAY(SELECT jsonb_array_elements_text(value->'like')
                               FROM ops_policy WHERE key = 'notify'), '{}');
    INSERT INTO ops_notifications (chat_id, subject, action, event_id)
    SELECT u.telegram_id, 'event:' || e.id, 'send', e.id
    FROM new_events e
    CROSS JOIN ops_users u
    WHERE e.kind = 'system.killed' AND u.started AND u.role = 'admin'
      AND NOT (u.subscribed AND EXISTS (SELECT 1 FROM unnest(patterns) p WHERE e.kind LIKE p));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('ops_outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER ops_agent_events_kill_notice AFTER INSERT ON ops_agent_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION ops_enqueue_kill_notice();
