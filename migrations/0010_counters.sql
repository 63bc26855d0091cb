-- Cluster-wide counters for /metrics, kept by the database itself so that a proposal or a
-- decision made by any process (CLI, another host) is counted, and retention's deletes
-- never make a counter go down. Proposals and decisions are rare: one row update each.
CREATE TABLE ops_counters (
    name   text   NOT NULL,
    labels jsonb  NOT NULL,
    value  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (name, labels)
);

CREATE FUNCTION ops_count(counter text, counter_labels jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO ops_counters (name, labels, value) VALUES (counter, counter_labels, 1)
    ON CONFLICT (name, labels) DO UPDATE SET value = ops_counters.value + 1
$$;

-- At commit, so the outcome is the proposal's state when its transaction ends:
-- approved (auto), pending (awaits people) or rejected (by a gate).
CREATE FUNCTION ops_count_proposal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p ops_mission_proposals;
BEGIN
    SELECT * INTO p FROM ops_mission_proposals WHERE id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM ops_count('proposals', jsonb_build_object('source', p.source, 'outcome', p.status));
    IF p.status = 'rejected' AND p.decided_by LIKE 'gate:%' THEN
        PERFORM ops_count('gate_refusals', jsonb_build_object('gate', substr(p.decided_by, 6)));
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ops_count_proposal AFTER INSERT ON ops_mission_proposals
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ops_count_proposal();

CREATE FUNCTION ops_count_decision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ops_count('decisions', jsonb_build_object('decision', NEW.decision));
    RETURN NULL;
END $$;

CREATE TRIGGER ops_count_decision AFTER INSERT ON ops_proposal_approvals
    FOR EACH ROW EXECUTE FUNCTION ops_count_decision();
