//! How the CLI prints things for people. Scripts use `--json`.

use crate::engine::missions::{MissionSummary, MissionView};
use crate::engine::proposals::{ProposalStatus, Proposed};
use crate::engine::status::Status;
use crate::store::users::User;

pub fn proposed(p: &Proposed) {
    match p.status {
        ProposalStatus::Approved => match p.mission_id {
            Some(m) => println!(
                "proposal #{} approved: mission #{m} started ({})",
                p.id, p.template
            ),
            None => println!("proposal #{} approved", p.id),
        },
        ProposalStatus::Pending => println!(
            "proposal #{} ({}) is pending: {} risk, needs {} approval{}; approve with `opsloop approve {}`",
            p.id,
            p.template,
            p.risk.as_str(),
            p.approvals_needed,
            if p.approvals_needed == 1 { "" } else { "s" },
            p.id
        ),
        ProposalStatus::Rejected => eprintln!(
            "opsloop: proposal #{} refused: {}",
            p.id,
            p.reason.as_deref().unwrap_or("no reason given")
        ),
        ProposalStatus::Expired => println!("proposal #{} expired", p.id),
    }
}

pub fn status(s: &Status) {
    println!("paused: {}", if s.paused { "yes" } else { "no" });
    if !s.paused_templates.is_empty() {
        println!("paused templates: {}", s.paused_templates.join(", "));
    }
    match s.policy_version {
        Some(v) => println!("policy: version {v}"),
        None => println!("policy: none applied (opsloop policy apply FILE)"),
    }
    let line = |name: &str, counts: &std::collections::BTreeMap<String, i64>| {
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "{name}: {}",
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        );
    };
    line("proposals", &s.proposals);
    line("missions", &s.missions);
    line("steps", &s.steps);
    println!("dead letters: {}", s.dead_letters);
    println!("open questions: {}", s.open_questions);
    println!("workers: {}", s.workers.len());
    for w in &s.workers {
        println!(
            "  {} on {} (pid {}, concurrency {})",
            w.id, w.host, w.pid, w.concurrency
        );
    }
    println!("pending approvals: {}", s.pending_approvals.len());
    for p in &s.pending_approvals {
        println!(
            "  proposal #{} {} {} by {} ({}/{} approvals)",
            p.id, p.template, p.params, p.proposed_by, p.approvals, p.approvals_needed
        );
    }
    println!("running missions: {}", s.running_missions.len());
    for m in &s.running_missions {
        println!(
            "  mission #{} {} ({}/{} steps)",
            m.id, m.template, m.steps_done, m.steps_total
        );
    }
}

pub fn missions(list: &[MissionSummary]) {
    if list.is_empty() {
        println!("no missions");
    }
    for m in list {
        println!(
            "mission #{:<5} {:<10} {:<16} {}/{} steps  {}{}",
            m.id,
            m.status,
            m.template,
            m.steps_done,
            m.steps_total,
            m.created_at.format("%Y-%m-%d %H:%M:%S"),
            m.error
                .as_deref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        );
    }
}

pub fn mission(v: &MissionView) {
    let m = &v.mission;
    println!(
        "mission #{} {} ({}) from proposal #{}",
        m.id, m.template, m.status, m.proposal_id
    );
    println!("params: {}", v.params);
    if let Some(e) = &m.error {
        println!("error: {e}");
    }
    for s in &v.steps {
        println!(
            "  {}. {:<16} {:<6} {:<10} attempt {}/{}{}",
            s.seq,
            s.name,
            s.kind,
            s.status,
            s.attempts,
            s.max_attempts,
            s.error
                .as_deref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        );
        if let Some(p) = &s.progress {
            println!(
                "     progress {}% {}",
                p.get("percent").unwrap_or(&serde_json::Value::Null),
                p.get("text").and_then(|t| t.as_str()).unwrap_or("")
            );
        }
        if let Some(o) = s
            .output
            .as_ref()
            .filter(|o| o.as_object().is_some_and(|m| !m.is_empty()))
        {
            let text = o.to_string();
            let shown: String = text.chars().take(300).collect();
            let more = if shown.len() < text.len() { " …" } else { "" };
            println!("     output {shown}{more}");
        }
    }
}

pub fn questions(list: &[crate::engine::questions::Question]) {
    if list.is_empty() {
        println!("no open questions");
    }
    for q in list {
        let allowed = match (q.choice_list(), &q.pattern) {
            (c, _) if !c.is_empty() => c.join(" | "),
            (_, Some(p)) => format!("text matching {p}"),
            _ => "any text".to_string(),
        };
        let mission = q
            .mission_id
            .map(|m| format!(" (mission #{m})"))
            .unwrap_or_default();
        println!("question #{}{mission}: {}", q.id, q.question);
        println!(
            "   answers: {allowed}; answer with `opsloop answer {} VALUE`",
            q.id
        );
    }
}

pub fn users(list: &[User]) {
    if list.is_empty() {
        println!("no users (grant one with `opsloop users grant TELEGRAM_ID ROLE`)");
    }
    for u in list {
        println!(
            "{:<14} {:<9} {}{}{}",
            u.telegram_id,
            u.role,
            u.name.as_deref().unwrap_or("-"),
            if u.subscribed { "  subscribed" } else { "" },
            if u.started {
                ""
            } else {
                "  (has not started the bot)"
            }
        );
    }
}
