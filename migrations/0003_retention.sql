-- Indexes for retention's deletes (bounded batches by age) and its guards.
CREATE INDEX ops_mission_proposals_decided ON ops_mission_proposals (decided_at) WHERE status <> 'pending';
CREATE INDEX ops_agent_reactions_created ON ops_agent_reactions (created_at);
CREATE INDEX ops_notifications_done ON ops_notifications (created_at) WHERE status <> 'pending';
CREATE INDEX ops_notifications_event_pending ON ops_notifications (event_id) WHERE status = 'pending';
