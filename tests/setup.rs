//! The commands that need neither a database nor the environment: `completions`,
//! `manpage` (both generated from the clap definitions and shipped in the .deb) and
//! `init`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::{opsloop_cmd, stderr, stdout};

fn run(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    opsloop_cmd(None)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run opsloop")
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("opsloop-setup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn bash_completions_pass_bash_n_and_name_every_command() {
    let dir = scratch("completions");
    let out = run(&["completions", "bash"], &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = dir.join("opsloop.bash");
    std::fs::write(&script, &out.stdout).expect("write");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash -n");
    assert!(check.status.success(), "bash -n: {}", stderr(&check));
    let text = stdout(&out);
    for word in [
        "complete -F",
        "propose",
        "approve",
        "doctor",
        "completions",
        "init",
    ] {
        assert!(text.contains(word), "{word} missing from the completions");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell], &dir);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = run(&["completions", "tcsh"], &dir);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is bad input");
    assert!(stderr(&out).starts_with("opsloop: "), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn the_man_page_is_roff_naming_every_command() {
    let dir = scratch("manpage");
    let out = run(&["manpage"], &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(
        page.starts_with(".ie"),
        "roff preamble: {}",
        &page[..40.min(page.len())]
    );
    assert!(page.contains(".TH opsloop 1"), "{page}");
    for command in [
        "run", "worker", "propose", "approve", "doctor", "init", "manpage",
    ] {
        assert!(page.contains(&format!("opsloop\\-{command}")) || page.contains(command));
    }
    // groff renders it when it is installed (deploy/check.sh installs it and renders the
    // packaged page with `man -l`).
    if let Ok(render) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg("/dev/stdin")
        .stdin(std::fs::File::open(write(&dir, "opsloop.1", &out.stdout)).expect("open"))
        .output()
    {
        assert!(render.status.success(), "groff: {}", stderr(&render));
        assert!(
            render.stderr.is_empty(),
            "groff warnings: {}",
            stderr(&render)
        );
    }
}

#[test]
fn manpage_dir_writes_a_page_per_command() {
    let dir = scratch("manpages");
    let out = run(&["manpage", "--dir", "."], &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "opsloop.1",
        "opsloop-run.1",
        "opsloop-propose.1",
        "opsloop-policy-check.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).expect(page);
        assert!(text.contains(".TH "), "{page}");
    }
    assert!(
        !dir.join("opsloop-help.1").exists(),
        "clap's help command has no page"
    );
    let out = run(&["manpage", "--dir", "no-such-dir"], &dir);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

#[test]
fn init_writes_a_private_env_and_a_valid_policy_then_refuses_to_overwrite() {
    let dir = scratch("init");
    let out = run(&["init"], &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    for step in [
        "@BotFather",
        "TELEGRAM_BOT_TOKEN",
        "OPSLOOP_ADMINS",
        "opsloop doctor",
    ] {
        assert!(said.contains(step), "{step} missing from: {said}");
    }
    let env = std::fs::read_to_string(dir.join(".env")).expect(".env");
    let mode = std::fs::metadata(dir.join(".env"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the .env holds secrets");
    assert!(
        env.lines().any(|l| l == "OPSLOOP_POLICY=policy.toml"),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "TELEGRAM_BOT_TOKEN="), "{env}");
    let check = run(&["policy", "check", "policy.toml"], &dir);
    assert!(check.status.success(), "{}", stderr(&check));

    std::fs::write(dir.join("policy.toml"), "# mine\n").expect("edit");
    let again = run(&["init"], &dir);
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("policy.toml")).expect("policy"),
        "# mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(".env")).expect(".env"),
        env
    );

    // Only one of the two present: still nothing written.
    let half = scratch("init-half");
    std::fs::write(half.join(".env"), "X=1\n").expect("env");
    assert_eq!(run(&["init"], &half).status.code(), Some(3));
    assert!(!half.join("policy.toml").exists());
}
