//! ARCHITECTURE.md's rules, checked against the source: each table is changed only by
//! its owner in `src/store`, the interfaces write no state-changing SQL, the layers use
//! only the layers below them, and the loop's vocabulary is spelled once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each table and the one module whose statements may change it.
const OWNERS: &[(&str, &str)] = &[
    ("ops_policy", "src/store/policy.rs"),
    ("ops_mission_proposals", "src/store/proposals.rs"),
    ("ops_proposal_approvals", "src/store/approvals.rs"),
    ("ops_missions", "src/store/missions.rs"),
    ("ops_mission_steps", "src/store/steps.rs"),
    ("ops_agent_events", "src/store/events.rs"),
    ("ops_agent_reactions", "src/store/reactions.rs"),
    ("ops_action_runs", "src/store/runs.rs"),
    ("ops_step_dead_letters", "src/store/dead_letters.rs"),
    ("ops_users", "src/store/users.rs"),
    ("ops_telegram_contacts", "src/store/users.rs"),
    ("ops_workers", "src/store/workers.rs"),
    ("ops_trigger_state", "src/store/triggers.rs"),
    ("ops_notifications", "src/store/outbox.rs"),
    ("ops_questions", "src/store/questions.rs"),
    ("ops_budget_periods", "src/store/budgets.rs"),
    ("ops_api_keys", "src/store/keys.rs"),
];

/// Files allowed to write other tables, and why.
const EXCEPTIONS: &[(&str, &str)] = &[
    (
        "src/interfaces/bench/mod.rs",
        "seeds a scratch database it creates and drops with bulk history, measured, never a real one",
    ),
    (
        "src/interfaces/bench/preload.rs",
        "preloads the same scratch databases with finished, waiting and asking work",
    ),
    (
        "src/interfaces/bench/floor.rs",
        "the floor bench: opsloop's rows written by plain SQL in a scratch database, to compare with",
    ),
    (
        "src/interfaces/bench/fanout.rs",
        "seeds a scratch database with subscribers and one mission event to fan out",
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `src/**/*.rs`, as (path relative to the crate, text).
fn files() -> Vec<(String, String)> {
    all_files()
}

/// The same without test code (`tests.rs` files, and what follows `#[cfg(test)]`).
fn code_files() -> Vec<(String, String)> {
    all_files()
        .into_iter()
        .filter(|(file, _)| !file.ends_with("/tests.rs"))
        .map(|(file, text)| {
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
            (file, code)
        })
        .collect()
}

fn all_files() -> Vec<(String, String)> {
    let mut paths = Vec::new();
    sources(&root().join("src"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root())
                .expect("under the crate")
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read_to_string(&p).expect("read source"))
        })
        .collect()
}

/// `INSERT INTO t`, `UPDATE t`, `DELETE FROM t`, `TRUNCATE t` in a file's text: the tables
/// it changes, with the line of each.
fn writes(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let upper = line.to_ascii_uppercase();
        for verb in ["INSERT INTO ", "UPDATE ", "DELETE FROM ", "TRUNCATE "] {
            let mut from = 0;
            while let Some(i) = upper[from..].find(verb) {
                let start = from + i + verb.len();
                let table: String = line[start..]
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if table.starts_with("ops_") {
                    found.push((table, n + 1));
                }
                from = start;
            }
        }
    }
    found
}

#[test]
fn every_table_is_changed_only_by_its_owner() {
    let owners: BTreeMap<&str, &str> = OWNERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (file, text) in files() {
        if EXCEPTIONS.iter().any(|(f, _)| *f == file) {
            continue;
        }
        for (table, line) in writes(&text) {
            match owners.get(table.as_str()) {
                Some(owner) if *owner == file => {}
                Some(owner) => {
                    wrong.push(format!("{file}:{line} changes {table}, owned by {owner}"))
                }
                None => wrong.push(format!(
                    "{file}:{line} changes {table}, which has no owner here"
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "statements outside their table's owner:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_itself_sees_writes() {
    // A guard that cannot fail is worse than none: it must find these.
    let sql = "UPDATE ops_missions SET x = 1; insert into ops_agent_events (kind) VALUES ('a')";
    let found: Vec<String> = writes(sql).into_iter().map(|w| w.0).collect();
    assert_eq!(found, ["ops_agent_events", "ops_missions"]);
    assert!(writes("SELECT * FROM ops_missions WHERE updated_at > now()").is_empty());
}

#[test]
fn interfaces_send_no_notify_of_their_own() {
    for (file, text) in files() {
        if file.starts_with("src/interfaces/") {
            assert!(
                !text.contains("pg_notify"),
                "{file} sends NOTIFY; state changes (and their NOTIFY) belong to the engine and stores"
            );
        }
    }
}

/// What each layer may not name.
const LAYERS: &[(&str, &[&str])] = &[
    // The domain may say how its words are stored (sqlx `Type` impls), never run a statement.
    (
        "src/domain/",
        &[
            "crate::db",
            "crate::store",
            "crate::engine",
            "crate::interfaces",
            "sqlx::query",
            "PgPool",
            "PgConnection",
        ],
    ),
    (
        "src/db/",
        &["crate::store", "crate::engine", "crate::interfaces"],
    ),
    ("src/store/", &["crate::engine", "crate::interfaces"]),
    ("src/engine/", &["crate::interfaces"]),
];

#[test]
fn layers_use_only_the_layers_below() {
    let mut wrong = Vec::new();
    for (file, text) in files() {
        for (layer, forbidden) in LAYERS {
            if !file.starts_with(layer) {
                continue;
            }
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for name in *forbidden {
                    if code.contains(name) {
                        wrong.push(format!("{file}:{}: {name}", n + 1));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a layer reaches up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn channel_names_are_spelled_once() {
    for (file, text) in files() {
        if file == "src/db/mod.rs" {
            continue;
        }
        for channel in [
            "\"ops_steps_ready\"",
            "\"ops_events\"",
            "\"ops_cancel\"",
            "\"ops_outbox\"",
            "'ops_steps_ready'",
            "'ops_cancel'",
        ] {
            assert!(
                !text.contains(channel),
                "{file} spells the channel {channel}; use db::channels"
            );
        }
    }
}

#[test]
fn event_kinds_are_spelled_once() {
    // A kind of opsloop's own, written as a whole Rust string literal, outside the vocabulary.
    let kinds = [
        "proposal", "mission", "step", "question", "template", "system", "budget", "policy",
        "user", "key",
    ];
    let mut wrong = Vec::new();
    for (file, text) in code_files() {
        if file == "src/domain/vocab.rs" {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            for ns in kinds {
                let needle = format!("\"{ns}.");
                let mut from = 0;
                while let Some(i) = line[from..].find(&needle) {
                    let start = from + i + 1;
                    let word: String = line[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '.' || *c == '_')
                        .collect();
                    let closes = line[start + word.len()..].starts_with('"');
                    if closes && word.parse::<opsloop::domain::vocab::EventKind>().is_ok() {
                        wrong.push(format!("{file}:{}: \"{word}\"", n + 1));
                    }
                    from = start;
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "event kinds spelled outside domain::vocab (use EventKind):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn long_files_say_why() {
    for (file, text) in files() {
        let lines = text.lines().count();
        if lines > 520 {
            let head: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
            assert!(
                head.contains("Long because"),
                "{file} has {lines} lines: split it, or say at its top why not (\"Long because ...\")"
            );
        }
    }
}
