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
