//! Questions from the command line: `questions`, `answer`, and `opsloop ask`.
//!
//! `opsloop ask`, run by a shell step, reaches the worker running that step through
//! the socket and secret in its environment (`engine::worker`'s ask server), prints the
//! answer and exits 0; on a timeout without default, a cancel, outside a step, or with
//! credentials that are not the running attempt's, it exits 3 and creates nothing.

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::commands::whoami;
use super::show;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input::parse_id;
use crate::domain::vocab::{QuestionStatus, Source};
use crate::engine::executors::{ENV_ASK_SOCKET, ENV_ASK_TOKEN};
use crate::engine::questions;
use crate::engine::worker::{AskReply, AskRequest};

pub async fn ask(
    question: String,
    choices: Vec<String>,
    pattern: Option<String>,
    timeout: Option<String>,
    default: Option<String>,
) -> OpsResult<i32> {
    let (Some(socket), Some(token)) = (
        std::env::var_os(ENV_ASK_SOCKET),
        std::env::var(ENV_ASK_TOKEN).ok(),
    ) else {
        return Err(OpsError::refused(
            "opsloop ask works only inside a running shell step (its worker gives it the credentials)",
        ));
    };
    let stream = UnixStream::connect(&socket).await.map_err(|e| {
        OpsError::refused(format!(
            "cannot reach the worker running this step ({e}); is the step still running?"
        ))
    })?;
    let request = AskRequest {
        token,
        question,
        choices,
        pattern,
        timeout,
        default,
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(&request).map_err(|e| OpsError::Other(e.into()))?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| OpsError::refused(format!("cannot ask the worker: {e}")))?;
    let mut lines = BufReader::new(read).lines();
    loop {
        let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| OpsError::refused(format!("lost the worker: {e}")))?
        else {
            return Err(OpsError::refused(
                "the worker stopped waiting (the step was cancelled or its lease lost)",
            ));
        };
        let reply: AskReply = serde_json::from_str(&line)
            .map_err(|e| OpsError::Other(anyhow::anyhow!("unreadable answer: {e}")))?;
        if let Some(error) = reply.error {
            return Err(match reply.code {
                Some(2) => OpsError::bad_input(error),
                Some(3) => OpsError::refused(error),
                _ => OpsError::Other(anyhow::anyhow!(error)),
            });
        }
        match reply.status {
            Some(QuestionStatus::Open) => {
                if let Some(id) = reply.id {
                    eprintln!("question #{id} asked; waiting for an answer");
                }
            }
            Some(QuestionStatus::Answered) => {
                println!("{}", reply.answer.unwrap_or_default());
                return Ok(0);
            }
            Some(QuestionStatus::Expired) => {
                return Err(OpsError::refused(format!(
                    "question #{} expired without an answer",
                    reply.id.unwrap_or(0)
                )));
            }
            Some(QuestionStatus::Cancelled) | None => {
                return Err(OpsError::refused(format!(
                    "question #{} was cancelled",
                    reply.id.unwrap_or(0)
                )));
            }
        }
    }
}

pub(super) async fn questions_list(pool: &PgPool, json: bool) -> OpsResult<i32> {
    let open = questions::open(pool).await?;
    if json {
        let list: Vec<Value> = open
            .iter()
            .map(|q| {
                json!({
                    "id": q.id, "question": q.question, "choices": q.choices,
                    "pattern": q.pattern, "mission_id": q.mission_id, "step_id": q.step_id,
                    "status": q.status, "to": q.audience, "expires_at": q.expires_at,
                    "asked_by": q.asked_by,
                })
            })
            .collect();
        println!("{}", json!(list));
    } else {
        show::questions(&open);
    }
    Ok(0)
}

pub(super) async fn answer(
    pool: &PgPool,
    id: &str,
    value: &str,
    actor: Option<String>,
) -> OpsResult<i32> {
    let id = parse_id(id, "question")?;
    let by = whoami(actor)?;
    let answered = questions::answer(pool, id, value, &by, Source::Cli).await?;
    println!("question #{} answered: {}", answered.id, answered.answer);
    Ok(0)
}
