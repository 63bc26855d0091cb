//! Commands that need neither the environment nor the database: shell completions and
//! the man page (generated from the clap definitions, so they never drift from
//! `--help`), and `init`, which starts a working directory.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, Command};
use crate::domain::error::{OpsError, OpsResult};

/// The exit code of a setup command, or `None` for every other command.
pub fn run(command: &Command) -> Option<i32> {
    let result = match command {
        Command::Completions { shell } => print(&completions(*shell)),
        Command::Manpage { dir: None } => manpage().and_then(|page| print(&page)),
        Command::Manpage { dir: Some(dir) } => manpages(dir),
        Command::Init => init(Path::new(".")),
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("opsloop: {err}");
            err.exit_code()
        }
    })
}

pub fn completions(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "opsloop", &mut out);
    out
}

pub fn manpage() -> OpsResult<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| OpsError::Other(e.into()))?;
    Ok(out)
}

/// `opsloop.1` and one page per command, named as the main page's SEE ALSO-style list
/// names them (`opsloop-run.1`, `opsloop-policy-check.1`).
fn manpages(dir: &Path) -> OpsResult<()> {
    if !dir.is_dir() {
        return Err(OpsError::bad_input(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    // Built, so that each command knows its full name (`opsloop-policy-check`); clap's
    // generated `help` commands are left out (`--help` is on every page).
    fn without_help(cmd: clap::Command) -> clap::Command {
        cmd.disable_help_subcommand(true)
            .mut_subcommands(without_help)
    }
    let mut cli = without_help(Cli::command());
    cli.build();
    let mut written = 0;
    write_pages(cli, dir, &mut written).map_err(|e| {
        OpsError::Other(anyhow::anyhow!(
            "writing man pages to {}: {e}",
            dir.display()
        ))
    })?;
    println!("{written} man pages written to {}", dir.display());
    Ok(())
}

fn write_pages(cmd: clap::Command, dir: &Path, written: &mut usize) -> io::Result<()> {
    for sub in cmd.get_subcommands() {
        write_pages(sub.clone(), dir, written)?;
    }
    clap_mangen::Man::new(cmd).generate_to(dir)?;
    *written += 1;
    Ok(())
}

/// Generated text is written in one go; a closed pipe (`| head`) is not an error.
fn print(bytes: &[u8]) -> OpsResult<()> {
    match io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(OpsError::Other(anyhow::anyhow!("writing to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

const ENV_FILE: &str = ".env";
const POLICY_FILE: &str = "policy.toml";

/// `.env` (mode 0600: it holds the generated API key, and will hold the bot token) and
/// a starter policy. Nothing is overwritten: if either exists, neither is written.
fn init(dir: &Path) -> OpsResult<()> {
    for name in [ENV_FILE, POLICY_FILE] {
        if dir.join(name).symlink_metadata().is_ok() {
            return Err(OpsError::refused(format!(
                "{name} already exists here; nothing written (edit it, or run init in an empty directory)"
            )));
        }
    }
    let key: [u8; 32] = rand::random();
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let env = ENV_TEMPLATE.replace("{OPS_KEY}", &key);
    let policy = format!("{POLICY_HEADER}{STARTER_POLICY}");
    create_new(&dir.join(ENV_FILE), &env, 0o600)?;
    if let Err(err) = create_new(&dir.join(POLICY_FILE), &policy, 0o644) {
        let _ = fs::remove_file(dir.join(ENV_FILE));
        return Err(err);
    }
    let here = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    println!(
        "wrote {ENV_FILE} and {POLICY_FILE} in {}\n\nNext:\n  \
         1. In Telegram, ask @BotFather for a bot (/newbot); put its token in .env: TELEGRAM_BOT_TOKEN=\n  \
         2. Start `opsloop run` here and send your bot anything: it answers with your Telegram id.\n     \
            Put it in .env: OPSLOOP_ADMINS= and restart `opsloop run`.\n  \
         3. Run `opsloop doctor` here: database, policy, token, Bot API, admins, one line each.\n\n\
         Then /start in the chat with your bot greets you as admin.",
        here.display()
    );
    Ok(())
}

fn create_new(path: &Path, text: &str, mode: u32) -> OpsResult<()> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => OpsError::refused(format!(
            "{} already exists; nothing overwritten",
            path.display()
        )),
        _ => OpsError::Other(anyhow::anyhow!("cannot write {}: {e}", path.display())),
    })
}

/// The deploy kit's example: every template in it runs on any Linux box.
const STARTER_POLICY: &str = include_str!("../../../deploy/opsloop.example.toml");

const POLICY_HEADER: &str = "# Starter policy written by `opsloop init`; `opsloop run` applies it at start\n\
# (OPSLOOP_POLICY in .env). Check your changes with `opsloop policy check policy.toml`.\n\n";

const ENV_TEMPLATE: &str = "\
# opsloop settings for this directory, written by `opsloop init`. opsloop reads .env
# from its working directory; variables already in the environment win.
# Plain KEY=VALUE lines, no quotes. An empty value means unset, i.e. the default.

# PostgreSQL URL, like postgres://opsloop:PASSWORD@127.0.0.1:5432/opsloop
# Empty: opsloop runs a private PostgreSQL cluster under OPSLOOP_DATA_DIR (it needs the
# server binaries: apt-get install postgresql).
DATABASE_URL=

# Where the private cluster lives. Empty: ./.opsloop
OPSLOOP_DATA_DIR=

# The policy `opsloop run` applies at start: the starter beside this file.
OPSLOOP_POLICY=policy.toml

# Step 1. The bot token from @BotFather (/newbot), like 123456789:AAE...
# Treat it like a password. Empty: the Telegram bot is off.
TELEGRAM_BOT_TOKEN=

# Step 2. Your Telegram user id (comma-separated for several), made admin at start.
# Send the bot anything: it answers strangers with \"not authorized, your id is N\".
OPSLOOP_ADMINS=

# Bearer key for the HTTP API (/api/*), generated for you. Keep it secret.
OPS_KEY={OPS_KEY}

# HTTP address for /healthz, /metrics and /api/*. Keep it on loopback.
OPSLOOP_HTTP_ADDR=127.0.0.1:8080

# Log format: pretty or json. Empty: pretty on a terminal, else json.
OPSLOOP_LOG=
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_both_files_once_and_refuses_after() {
        let dir = std::env::temp_dir().join(format!("opsloop-init-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        init(&dir).expect("first init");
        let env = fs::read_to_string(dir.join(ENV_FILE)).expect("env");
        assert!(env.contains("OPSLOOP_POLICY=policy.toml"));
        let key = env
            .lines()
            .find_map(|l| l.strip_prefix("OPS_KEY="))
            .expect("key line");
        assert_eq!(key.len(), 64);
        let policy = fs::read_to_string(dir.join(POLICY_FILE)).expect("policy");
        crate::domain::policy::parse(&policy).expect("the starter policy is valid");

        fs::write(dir.join(ENV_FILE), "edited").expect("edit");
        let err = init(&dir).expect_err("second init");
        assert_eq!(err.exit_code(), 3);
        assert_eq!(
            fs::read_to_string(dir.join(ENV_FILE)).expect("env"),
            "edited"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
