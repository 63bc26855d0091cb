-- Budgets (design §11): what missions cost, and what each budget spent per period.

-- A mission's cost: the sum of the `cost` its steps reported (exact decimals, never
-- floats). Added by the ending that reports it, in that ending's transaction.
ALTER TABLE ops_missions ADD COLUMN cost numeric NOT NULL DEFAULT 0 CHECK (cost >= 0);

-- The start of the current period of kind `day` or `month`, in UTC. The one place the
-- period is computed: from the database's clock, so every host agrees on it.
CREATE FUNCTION ops_budget_period(kind text) RETURNS date
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT date_trunc(kind, now() AT TIME ZONE 'UTC')::date $$;

-- One row per budget and period, created by the first cost or raise of the period.
-- `spent` only grows (`spent = spent + x` under the row's lock, so workers finishing
-- missions at once never lose an update); `raised` is what raises added to the policy's
-- limit for this period; `raises` counts them (a Raise button names the count it saw,
-- so a second tap is told it was already raised). `warned` and `exhausted` say the
-- event was written this period; a raise clears both (re-armed).
CREATE TABLE ops_budget_periods (
    budget     text NOT NULL,
    period     text NOT NULL CHECK (period IN ('day', 'month')),
    starts     date NOT NULL,
    spent      numeric NOT NULL DEFAULT 0 CHECK (spent >= 0),
    raised     numeric NOT NULL DEFAULT 0 CHECK (raised >= 0),
    raises     integer NOT NULL DEFAULT 0,
    raised_by  text,
    raised_at  timestamptz,
    warned     boolean NOT NULL DEFAULT false,
    exhausted  boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (budget, period, starts)
);

-- A raise edits its period's exhaustion messages: find those events without a scan
-- (only `budget.exhausted` rows are in it, so the event insert path pays nothing else).
CREATE INDEX ops_agent_events_budget_exhausted ON ops_agent_events ((payload->>'budget'))
    WHERE kind = 'budget.exhausted';
