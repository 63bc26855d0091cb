//! One function per command. Input from the command line is validated here (ids,
//! key=value params, names) before anything touches the database.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::{BenchCommand, Command, PolicyCommand, UsersCommand, show};
use crate::db::{self, Database, channels};
use crate::domain::config::Settings;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input::{self, parse_id, parse_params, parse_telegram_id};
use crate::domain::policy;
use crate::domain::vocab::Source;
use crate::engine::approvals::{self, Decision};
use crate::engine::gates;
use crate::engine::missions::{self, MissionStatus};
use crate::engine::proposals::{self, NewProposal, ProposalStatus};
use crate::engine::status as summary;
use crate::interfaces::{bench, daemon, logging};
use crate::store::events;
use crate::store::policy as store;
use crate::store::users::{self, Role};

pub async fn run(command: Command) -> OpsResult<i32> {
    let _ = dotenvy::dotenv();
    let settings = Settings::from_env().map_err(|e| OpsError::bad_input(format!("{e:#}")))?;
    let daemonish = matches!(command, Command::Run { .. } | Command::Worker { .. });
    logging::init(settings.log_format, daemonish);

    // Commands that need no database.
    if let Command::Policy {
        command: PolicyCommand::Check { file },
    } = &command
    {
        return policy_check(file);
    }
    if let Command::Ask {
        question,
        choices,
        pattern,
        timeout,
        default,
    } = command
    {
        return super::ask::ask(question, choices, pattern, timeout, default).await;
    }
    match command {
        // Doctor reports an unreachable database instead of failing on it.
        Command::Doctor {
            policy,
            max_transaction_age,
        } => Ok(daemon::doctor(&settings, policy, max_transaction_age).await),
        Command::Run { policy } => {
            daemon::run(settings, policy).await?;
            Ok(0)
        }
        Command::Worker { concurrency } => {
            daemon::run_worker(settings, concurrency).await?;
            Ok(0)
        }
        command => {
            let db = Database::open(&settings, 4).await?;
            let result = with_db(&db, &settings, command).await;
            db.close().await;
            result
        }
    }
}

async fn with_db(db: &Database, settings: &Settings, command: Command) -> OpsResult<i32> {
    let pool = &db.pool;
    // Benches work in scratch databases of their own: the one they are pointed at (often
    // the server's `postgres`) is only where they create them, and is left as it is.
    if !matches!(command, Command::Bench { .. }) {
        db::migrate(pool).await?;
    }
    match command {
        Command::Migrate => {
            println!("migrations applied");
            Ok(0)
        }
        Command::Tick => tick(pool, settings).await,
        Command::Policy { command } => match command {
            PolicyCommand::Check { file } => policy_check(&file),
            PolicyCommand::Apply { file } => policy_apply(pool, &file).await,
            PolicyCommand::Show => policy_show(pool).await,
        },
        Command::Propose {
            template,
            params,
            actor,
            priority,
            json,
        } => propose(pool, template, &params, actor, priority, json).await,
        Command::Approve { id, actor, json } => {
            decide(pool, &id, actor, Decision::Approve, None, json).await
        }
        Command::Reject {
            id,
            actor,
            reason,
            json,
        } => decide(pool, &id, actor, Decision::Reject, reason, json).await,
        Command::Cancel { mission_id, actor } => cancel(pool, &mission_id, actor).await,
        Command::Questions { json } => super::ask::questions_list(pool, json).await,
        Command::Answer {
            question_id,
            value,
            actor,
        } => super::ask::answer(pool, &question_id, &value, actor).await,
        Command::Retry {
            mission_id,
            actor,
            json,
        } => super::controls::retry(pool, &mission_id, actor, json).await,
        Command::Kill {
            reason,
            actor,
            json,
        } => super::controls::kill(pool, reason, actor, json).await,
        Command::Budgets { json } => super::budgets::list(pool, json).await,
        Command::Budget {
            command:
                super::BudgetCommand::Raise {
                    name,
                    amount,
                    actor,
                    json,
                },
        } => super::budgets::raise(pool, &name, &amount, actor, json).await,
        Command::Status { json } => status(pool, json).await,
        Command::Missions {
            status,
            limit,
            json,
        } => missions(pool, status, limit, json).await,
        Command::Mission { id, json } => mission(pool, &id, json).await,
        Command::Events {
            follow,
            json,
            limit,
        } => events_command(pool, follow, json, limit.clamp(0, 10_000)).await,
        Command::Emit { kind, payload } => emit(pool, &kind, payload).await,
        Command::Pause { actor } => pause(pool, actor).await,
        Command::Resume { template, actor } => resume(pool, template, actor).await,
        Command::Keys { command } => super::keys::run(pool, command).await,
        Command::Users { command } => users_command(pool, command).await,
        Command::Bench { command } => bench(db, command).await,
        // Handled before: doctor and the daemons above, the setup commands in cli::setup,
        // ask (no database) at the top.
        Command::Doctor { .. }
        | Command::Run { .. }
        | Command::Worker { .. }
        | Command::Ask { .. }
        | Command::Init
        | Command::Completions { .. }
        | Command::Manpage { .. } => Ok(0),
    }
}

async fn tick(pool: &PgPool, settings: &Settings) -> OpsResult<i32> {
    let summary = daemon::tick_once(pool, settings).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    Ok(0)
}

async fn policy_apply(pool: &PgPool, file: &Path) -> OpsResult<i32> {
    let source = read_file(file)?;
    let version = store::apply(pool, &source, &whoami(None)?).await?;
    println!("policy {} applied as version {version}", file.display());
    Ok(0)
}

async fn policy_show(pool: &PgPool) -> OpsResult<i32> {
    let applied = store::require(pool).await?;
    println!("# policy version {}", applied.version);
    print!("{}", applied.source);
    Ok(0)
}

/// Exit 3 when a gate refused the proposal (it is recorded, with its reason).
async fn propose(
    pool: &PgPool,
    template: String,
    params: &[String],
    actor: Option<String>,
    priority: Option<i64>,
    json: bool,
) -> OpsResult<i32> {
    let priority = match priority.map(i32::try_from) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return Err(OpsError::bad_input(
                "--priority is out of range (-100..=100)",
            ));
        }
    };
    let applied = store::require(pool).await?;
    let request = NewProposal {
        template,
        params: parse_params(params)?,
        proposed_by: whoami(actor)?,
        source: Source::Cli,
        priority,
        // The operator's own machine: any priority in range.
        may_raise_priority: true,
    };
    let proposed = proposals::propose(pool, &applied.policy, request).await?;
    if json {
        println!("{}", json!(proposed));
    } else {
        show::proposed(&proposed);
    }
    Ok(if proposed.status == ProposalStatus::Rejected {
        3
    } else {
        0
    })
}

async fn cancel(pool: &PgPool, mission_id: &str, actor: Option<String>) -> OpsResult<i32> {
    let id = parse_id(mission_id, "mission")?;
    missions::cancel(pool, id, &whoami(actor)?, Source::Cli.as_str()).await?;
    println!("mission #{id} cancelled");
    Ok(0)
}

async fn status(pool: &PgPool, json: bool) -> OpsResult<i32> {
    let status = summary::status(pool).await?;
    if json {
        println!("{}", json!(status));
    } else {
        show::status(&status);
    }
    Ok(0)
}

async fn missions(pool: &PgPool, status: Option<String>, limit: i64, json: bool) -> OpsResult<i32> {
    let status = match status {
        None => None,
        Some(s) => Some(s.parse::<MissionStatus>().map_err(|_| {
            OpsError::bad_input(format!(
                "unknown mission status {s:?} (running, succeeded, failed, cancelled)"
            ))
        })?),
    };
    let list = missions::list(pool, status, limit.clamp(1, 1000)).await?;
    if json {
        println!("{}", json!(list));
    } else {
        show::missions(&list);
    }
    Ok(0)
}

async fn mission(pool: &PgPool, id: &str, json: bool) -> OpsResult<i32> {
    let mission = missions::get(pool, parse_id(id, "mission")?).await?;
    if json {
        println!("{}", json!(mission));
    } else {
        show::mission(&mission);
    }
    Ok(0)
}

async fn emit(pool: &PgPool, kind: &str, payload: Option<String>) -> OpsResult<i32> {
    let payload: Value = match payload {
        None => json!({}),
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| OpsError::bad_input(format!("--payload is not valid JSON: {e}")))?,
    };
    input::storable_json(&payload, "payload")?;
    let id = events::emit_user(pool, kind, Source::Cli.as_str(), payload).await?;
    println!("event #{id} {kind} emitted");
    Ok(0)
}

async fn pause(pool: &PgPool, actor: Option<String>) -> OpsResult<i32> {
    let mut conn = pool.acquire().await?;
    let changed = gates::set_paused(&mut conn, true, Source::Cli, &whoami(actor)?).await?;
    println!("{}", if changed { "paused" } else { "already paused" });
    Ok(0)
}

/// `resume`, or `resume TEMPLATE`: refused (exit 3) when that template is not paused.
async fn resume(pool: &PgPool, template: Option<String>, actor: Option<String>) -> OpsResult<i32> {
    let mut conn = pool.acquire().await?;
    let Some(name) = template else {
        let changed = gates::set_paused(&mut conn, false, Source::Cli, &whoami(actor)?).await?;
        println!("{}", if changed { "resumed" } else { "not paused" });
        return Ok(0);
    };
    if gates::resume_template(&mut conn, &name, Source::Cli, &whoami(actor)?).await? {
        println!("template {name} resumed");
        Ok(0)
    } else {
        Err(OpsError::refused(format!("template {name} is not paused")))
    }
}

async fn bench(db: &Database, command: BenchCommand) -> OpsResult<i32> {
    let figures = match command {
        BenchCommand::Worker {
            steps,
            workers,
            steps_per_mission,
            kind,
            preload,
        } => {
            bench::worker(
                db,
                bench::WorkerCase {
                    steps,
                    workers,
                    steps_per_mission,
                    kind,
                    history: preload.history,
                    open_questions: preload.open_questions,
                    waiting: preload.waiting,
                },
            )
            .await?
        }
        BenchCommand::Floor {
            steps,
            workers,
            batch,
        } => bench::floor(db, steps, workers, batch).await?,
        BenchCommand::Latency { samples, preload } => {
            bench::latency(
                db,
                samples,
                (preload.history, preload.open_questions, preload.waiting),
            )
            .await?
        }
        BenchCommand::Fanout { chats, rate } => bench::fanout(db, chats, rate).await?,
        BenchCommand::Chat { samples } => bench::chat(db, samples).await?,
        BenchCommand::Keys {
            requests,
            concurrency,
        } => bench::keys(db, requests, concurrency).await?,
        BenchCommand::Tick { events, rules } => bench::tick(db, events, rules).await?,
        BenchCommand::Soak { minutes } => bench::soak(db, minutes).await?,
    };
    println!("{figures}");
    Ok(0)
}

fn policy_check(file: &Path) -> OpsResult<i32> {
    let source = read_file(file)?;
    match policy::parse(&source) {
        Ok(policy) => {
            println!(
                "{}: ok ({} templates, {} reactions, {} triggers)",
                file.display(),
                policy.templates.len(),
                policy.reactions.len(),
                policy.triggers.len()
            );
            Ok(0)
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("{}", p.located(file));
            }
            eprintln!("{}: {} problem(s)", file.display(), problems.len());
            Ok(2)
        }
    }
}

fn read_file(file: &Path) -> OpsResult<String> {
    std::fs::read_to_string(file)
        .map_err(|e| OpsError::bad_input(format!("cannot read {}: {e}", file.display())))
}

async fn decide(
    pool: &PgPool,
    id: &str,
    actor: Option<String>,
    decision: Decision,
    reason: Option<String>,
    json: bool,
) -> OpsResult<i32> {
    let id = parse_id(id, "proposal")?;
    let reason = reason.map(|r| r.trim().chars().take(1000).collect::<String>());
    // The gates about missions are checked again when this approval would create one.
    let policy = match store::load(pool).await? {
        Some(applied) => applied.policy,
        None => Default::default(),
    };
    let decided = approvals::decide(
        pool,
        &policy,
        id,
        &whoami(actor)?,
        decision,
        reason.as_deref(),
        Source::Cli.as_str(),
    )
    .await?;
    if json {
        println!("{}", json!(decided));
    } else {
        println!("{}", decided.describe());
    }
    Ok(0)
}

async fn users_command(pool: &PgPool, command: UsersCommand) -> OpsResult<i32> {
    match command {
        UsersCommand::List { json } => {
            let list = users::list(pool).await?;
            if json {
                println!("{}", json!(list));
            } else {
                show::users(&list);
            }
        }
        UsersCommand::Grant { telegram_id, role } => {
            let id = parse_telegram_id(&telegram_id)?;
            let role: Role = role.parse()?;
            users::grant(pool, id, role, Source::Cli, &whoami(None)?).await?;
            println!("user {id} is now {role}");
        }
        UsersCommand::Revoke { telegram_id } => {
            let id = parse_telegram_id(&telegram_id)?;
            users::revoke(pool, id, Source::Cli, &whoami(None)?).await?;
            println!("user {id} revoked");
        }
    }
    Ok(0)
}

async fn events_command(pool: &PgPool, follow: bool, json: bool, limit: i64) -> OpsResult<i32> {
    // Listen before reading the backlog, so nothing written in between is missed.
    let mut listener = if follow {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(channels::EVENTS).await?;
        Some(l)
    } else {
        None
    };
    let (backlog, mut cursor) = events::recent(pool, limit).await?;
    let Some(listener) = listener.as_mut() else {
        if json {
            println!("{}", json!(backlog));
        } else {
            backlog
                .iter()
                .for_each(|e| println!("{}", events::describe(e)));
        }
        return Ok(0);
    };
    let print = |e: &events::Event| {
        if json {
            println!("{}", json!(e));
        } else {
            println!("{}", events::describe(e));
        }
    };
    backlog.iter().for_each(print);
    loop {
        // A notification, or a poll every second so this works behind PgBouncer too.
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = tokio::time::timeout(Duration::from_secs(1), listener.try_recv()) => {}
        }
        // A notification can arrive before the writer's snapshot horizon moves on;
        // look again shortly so nothing waits for the next poll.
        for _ in 0..3 {
            events::next(pool, &mut cursor)
                .await?
                .iter()
                .for_each(print);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `--as NAME`, or `cli:$USER`, normalized (`Alice` and ` alice` are one person).
/// Self-asserted: the CLI is the operator's own machine, with the database's password.
pub(super) fn whoami(actor: Option<String>) -> OpsResult<String> {
    match actor {
        Some(name) => input::identity(&name, "--as NAME"),
        None => input::identity(&format!("cli:{}", os_user()), "the user name ($USER)"),
    }
}

/// `$USER`, else the passwd entry of this process's user (services often have no `$USER`).
fn os_user() -> String {
    if let Ok(user) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME"))
        && !user.trim().is_empty()
    {
        return user;
    }
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy the name out at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return format!("uid{}", libc::geteuid());
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}
