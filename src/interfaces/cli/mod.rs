//! The command line (docs/commands.md). Parsing and dispatch only: every command calls the
//! library function that the bot and HTTP call too.

mod ask;
mod budgets;
mod commands;
mod controls;
mod keys;
mod setup;
mod show;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::domain::error::OpsError;

#[derive(Debug, Parser)]
#[command(
    name = "opsloop",
    version,
    about = "Proposals, approvals and leased workers on PostgreSQL, with a Telegram bot in front"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: heartbeat, worker, notifier, Telegram bot (if a token is set), HTTP.
    Run {
        /// Policy file applied at start (also OPSLOOP_POLICY).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Step worker only, for extra hosts.
    Worker {
        #[arg(long)]
        concurrency: Option<u32>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Run one heartbeat tick, print its summary, exit.
    Tick,
    /// Check, apply or show the policy file.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Propose running TEMPLATE with key=value params.
    Propose {
        template: String,
        /// Params as key=value.
        params: Vec<String>,
        /// Who proposes (default cli:$USER).
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        /// Override the template's priority (-100..=100; higher is claimed first).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Approve proposal ID.
    Approve {
        id: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Reject proposal ID.
    Reject {
        id: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel mission MISSION_ID: queued steps are cancelled, a running step is killed.
    Cancel {
        mission_id: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// From inside a running shell step: ask people QUESTION, wait, print the answer.
    Ask {
        question: String,
        /// An allowed answer (repeat for each); without any, the answer is free text.
        #[arg(long = "choice", value_name = "C")]
        choices: Vec<String>,
        /// Free text must match this regex (whole).
        #[arg(long, value_name = "RE")]
        pattern: Option<String>,
        /// Give up after this long (e.g. 30m): the default is the answer, else exit 3.
        #[arg(long, value_name = "D")]
        timeout: Option<String>,
        #[arg(long, value_name = "V")]
        default: Option<String>,
    },
    /// Open questions, oldest first.
    Questions {
        #[arg(long)]
        json: bool,
    },
    /// Answer question QUESTION_ID with VALUE.
    Answer {
        question_id: String,
        value: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// Run failed or cancelled mission MISSION_ID again from the step that stopped it.
    Retry {
        mission_id: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Kill switch: pause, and cancel every running mission at once (processes killed).
    Kill {
        /// Why (kept in the `system.killed` event and told to admins).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every budget: this period's spent, limit and status (ok, warning, exhausted).
    Budgets {
        #[arg(long)]
        json: bool,
    },
    /// Change a budget: `budget raise NAME AMOUNT`.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Counts by status, pending approvals, running missions, dead letters, workers, paused?
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Recent missions, newest first.
    Missions {
        /// Only missions with this status (running, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One mission with its steps.
    Mission {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The event stream; live with --follow.
    Events {
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
        /// How many recent events to show first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Emit an event of your own KIND.
    Emit {
        kind: String,
        /// A JSON object.
        #[arg(long)]
        payload: Option<String>,
    },
    /// Stop triggers, reactions and step claims (running steps finish).
    Pause {
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// Resume after `pause`; with TEMPLATE, lift that template's pause after failures.
    Resume {
        template: Option<String>,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
    },
    /// Agent keys for /api/*: each agent its own key, limited to its scopes.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Telegram users and their roles.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Check the database, policy, Telegram token and API, clock, HTTP address.
    Doctor {
        /// Also check this policy file (default OPSLOOP_POLICY).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Warn about transactions open longer than this (they hold back vacuum).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        max_transaction_age: std::time::Duration,
    },
    /// Write a commented .env and a starter policy.toml here (never overwrites).
    Init,
    /// Print shell completions: `opsloop completions bash > /etc/bash_completion.d/opsloop`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `opsloop manpage | man -l -`.
    Manpage {
        /// Instead, write opsloop.1 and a page per command (opsloop-run.1, ...) into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Built-in benchmarks: one JSON line per case (in a scratch database, dropped after).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Noop steps through the full lifecycle: steps/s and queue wait.
    Worker {
        #[arg(long, default_value_t = 20_000)]
        steps: u32,
        /// Concurrent step slots.
        #[arg(long, default_value_t = 16)]
        workers: u32,
        #[arg(long, default_value_t = 1)]
        steps_per_mission: u32,
        /// What each step runs: noop, or shell (`true`; the machine's spawn rate is
        /// measured in the same run).
        #[arg(long, default_value = "noop")]
        kind: String,
        #[command(flatten)]
        preload: BenchPreload,
    },
    /// The floor: the rows `bench worker` writes per step, by plain batched SQL with
    /// none of opsloop's logic, at the same N and concurrency.
    Floor {
        #[arg(long, default_value_t = 20_000)]
        steps: u32,
        /// Concurrent connections.
        #[arg(long, default_value_t = 16)]
        workers: u32,
        /// Steps claimed and ended per statement by each connection.
        #[arg(long, default_value_t = 64)]
        batch: u32,
    },
    /// On an idle daemon: propose → first step started, and step ready → started.
    Latency {
        #[arg(long, default_value_t = 300)]
        samples: u32,
        #[command(flatten)]
        preload: BenchPreload,
    },
    /// One mission notification to many subscribed chats through a fake Bot API: the
    /// delivery rate against the configured global rate, and time to the last chat.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        chats: u32,
        /// The global rate configured (`telegram.messages_per_second`).
        #[arg(long, default_value_t = 100)]
        rate: u32,
    },
    /// Against a fake Bot API on loopback: tap → answered, tap → first step started,
    /// question asked → sent, tap → answer seen by the asking step.
    Chat {
        #[arg(long, default_value_t = 100)]
        samples: u32,
    },
    /// A flood of wrong keys from one client: `/healthz` p95 idle and during it, and
    /// the pace the flood was held to.
    Keys {
        #[arg(long, default_value_t = 10_000)]
        requests: u32,
        /// Wrong-key requests in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
    },
    /// Events processed by reactions: events/s.
    Tick {
        #[arg(long, default_value_t = 20_000)]
        events: u32,
        #[arg(long, default_value_t = 100)]
        rules: u32,
    },
    /// A realistic mix for N minutes: RSS, connections, table sizes and latencies per
    /// minute, first and last side by side.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u32,
    },
}

/// Work already in the tables while a bench runs (cost growth).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BenchPreload {
    /// Finished steps (with their events) already in the tables.
    #[arg(long, alias = "finished", default_value_t = 0)]
    pub history: u32,
    /// Missions waiting on an open question (an `asking` step) meanwhile.
    #[arg(long, default_value_t = 0)]
    pub open_questions: u32,
    /// Steps waiting behind a step that runs elsewhere (100 per mission).
    #[arg(long, default_value_t = 0)]
    pub waiting: u32,
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Raise budget NAME's limit for this period by AMOUNT (a positive decimal).
    Raise {
        name: String,
        amount: String,
        #[arg(long = "as", value_name = "NAME")]
        actor: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate FILE and print every problem with its location.
    Check { file: PathBuf },
    /// Validate FILE and store it (daemons on every host pick it up).
    Apply { file: PathBuf },
    /// Print the applied policy.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create agent NAME's key and print it (once; only its SHA-256 is kept).
    Create {
        name: String,
        /// Templates it may propose (`*` wildcards; repeat for more).
        #[arg(long, value_name = "PATTERN")]
        propose: Vec<String>,
        /// Event kinds it may emit (`*` wildcards; repeat for more).
        #[arg(long, value_name = "PATTERN")]
        emit: Vec<String>,
        /// It may ask questions and answer them.
        #[arg(long)]
        answer: bool,
        /// It may read (GET) missions and questions.
        #[arg(long)]
        read: bool,
    },
    /// Every key: name, scopes, last use (never a key).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke NAME's key: its next request is refused, on every host.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List the known users with their roles.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Give TELEGRAM_ID a ROLE (viewer, operator, approver, admin).
    Grant { telegram_id: String, role: String },
    /// Take away TELEGRAM_ID's role.
    Revoke { telegram_id: String },
}

/// Parse the command line, run it, and return the process exit code.
/// Commands that read and print, and may be cut short by their reader
/// (`opsloop events | head`).
fn prints_a_report(command: &Command) -> bool {
    matches!(
        command,
        Command::Questions { .. }
            | Command::Budgets { .. }
            | Command::Status { .. }
            | Command::Missions { .. }
            | Command::Mission { .. }
            | Command::Events { .. }
            | Command::Keys { .. }
            | Command::Users { .. }
            | Command::Policy { .. }
            | Command::Completions { .. }
            | Command::Manpage { .. }
    )
}

/// Rust ignores SIGPIPE, so printing to a pipe whose reader has gone panics. For a
/// command that only reports, a closed pipe means the reader has seen enough: end as
/// `cat` does. Never for the daemons, the bench or `ask`: their sockets' peers may go
/// too, and that must be an error they handle, not the end of the process.
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = err.print();
                return if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                };
            }
            // One clear line, as every other error.
            let text = err.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("bad usage")
                .trim_start_matches("error: ");
            eprintln!("opsloop: {first} (see `opsloop --help`)");
            return 2;
        }
    };
    if prints_a_report(&cli.command) {
        die_quietly_on_a_closed_pipe();
    }
    if let Some(code) = setup::run(&cli.command) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("opsloop: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("opsloop: {}", one_line(&err));
            err.exit_code()
        }
    }
}

fn one_line(err: &OpsError) -> String {
    // Policy problems are a list on purpose; everything else is one line.
    match err {
        OpsError::BadInput(msg) if msg.contains('\n') => msg.clone(),
        other => other.to_string().replace('\n', " "),
    }
}
