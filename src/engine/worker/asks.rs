//! `opsloop ask` from inside a shell step: the worker that runs the step serves it on a
//! Unix socket in a directory private to this process, and each attempt gets a secret
//! of its own (`OPSLOOP_ASK_TOKEN`), valid while that attempt runs here. Knowing a
//! step's ids is not enough to ask, and the step never sees a database URL, the bot's
//! token or `OPS_KEY`. The step keeps its lease while it waits: it is still running.
//!
//! Protocol: one JSON line in (`Request`), then one JSON line with the question's id
//! (`{"id": N}`) or an error, then one with how it ended (`{"status", "answer"}`).

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::domain::error::OpsError;
use crate::domain::vocab::QuestionStatus;
use crate::engine::executors::AskAccess;
use crate::engine::questions::{self, NewQuestion, Waiters};
use crate::store::steps;

/// What `opsloop ask` sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub token: String,
    pub question: String,
    #[serde(default)]
    pub choices: Vec<String>,
    #[serde(default)]
    pub pattern: Option<String>,
    /// A duration such as "10m".
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub default: Option<String>,
}

/// What the worker answers, line by line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<QuestionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
    /// A refusal: what was wrong, and the exit code `opsloop ask` should give (2, 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

impl Reply {
    fn refused(code: i32, error: impl Into<String>) -> Reply {
        Reply {
            id: None,
            status: None,
            answer: None,
            answered_by: None,
            error: Some(error.into()),
            code: Some(code),
        }
    }
}

/// The most a request line may hold.
const MAX_REQUEST: u64 = 64 * 1024;

/// An attempt allowed to ask.
#[derive(Clone)]
struct Grant {
    mission_id: i64,
    step_id: i64,
    attempt: i32,
    /// Fires when the attempt ends: its waiting questions are cancelled.
    ended: CancellationToken,
}

#[derive(Clone)]
pub struct AskServer {
    socket: PathBuf,
    dir: PathBuf,
    grants: Arc<Mutex<HashMap<String, Grant>>>,
}

impl AskServer {
    /// Listen in a fresh private directory; `owner` is this worker (the lease owner).
    pub fn start(
        pool: PgPool,
        owner: String,
        pause_after_failures: u32,
    ) -> std::io::Result<AskServer> {
        let dir = std::env::temp_dir().join(format!(
            "opsloop-ask-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let socket = dir.join("ask.sock");
        let listener = UnixListener::bind(&socket)?;
        let server = AskServer {
            socket,
            dir,
            grants: Arc::new(Mutex::new(HashMap::new())),
        };
        let waiters = Waiters::start(&pool);
        let grants = server.grants.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let serve = Serve {
                            pool: pool.clone(),
                            owner: owner.clone(),
                            grants: grants.clone(),
                            waiters: waiters.clone(),
                            pause_after_failures,
                        };
                        tokio::spawn(async move { serve.connection(stream).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "the ask socket failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(server)
    }

    /// Let this attempt ask: its access, to put in its environment.
    pub fn grant(&self, mission_id: i64, step_id: i64, attempt: i32) -> (AskAccess, AskTicket) {
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let ended = CancellationToken::new();
        let grant = Grant {
            mission_id,
            step_id,
            attempt,
            ended: ended.clone(),
        };
        self.lock().insert(token.clone(), grant);
        let access = AskAccess {
            socket: self.socket.clone(),
            token: token.clone(),
        };
        let ticket = AskTicket {
            server: self.clone(),
            token,
            ended,
        };
        (access, ticket)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AskServer {
    /// The worker stops: the socket and its directory go (a process killed outright
    /// leaves them in the temp directory, as it does its steps' working directories).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An attempt's right to ask; dropping it (the attempt ended) revokes it and cancels
/// what it still waits for.
pub struct AskTicket {
    server: AskServer,
    token: String,
    ended: CancellationToken,
}

impl Drop for AskTicket {
    fn drop(&mut self) {
        self.server.lock().remove(&self.token);
        self.ended.cancel();
    }
}

struct Serve {
    pool: PgPool,
    owner: String,
    grants: Arc<Mutex<HashMap<String, Grant>>>,
    waiters: Waiters,
    pause_after_failures: u32,
}

impl Serve {
    async fn connection(self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read.take(MAX_REQUEST));
        let mut line = String::new();
        let reply = match reader.read_line(&mut line).await {
            Ok(_) if !line.ends_with('\n') => {
                Err(Reply::refused(2, "the request is too long or incomplete"))
            }
            Ok(_) => self.ask(&line).await,
            Err(e) => Err(Reply::refused(2, format!("cannot read the request: {e}"))),
        };
        let (id, grant) = match reply {
            Ok(asked) => asked,
            Err(refusal) => {
                let _ = send(&mut write, &refusal).await;
                return;
            }
        };
        let first = Reply {
            id: Some(id),
            status: Some(QuestionStatus::Open),
            answer: None,
            answered_by: None,
            error: None,
            code: None,
        };
        if send(&mut write, &first).await.is_err() {
            self.abandon(&grant).await;
            return;
        }
        // Wait for the answer, the attempt's end, or the asker going away.
        let mut rest = reader.into_inner().into_inner();
        let mut probe = [0u8; 1];
        let outcome = loop {
            tokio::select! {
                q = self.waiters.wait(&self.pool, id, Duration::from_secs(5)) => match q {
                    Ok(q) if q.status != QuestionStatus::Open => break Some(q),
                    Ok(q) => {
                        if q.expires_at.is_some_and(|e| e <= chrono::Utc::now())
                            && let Err(e) = questions::expire_if_due(&self.pool, id, self.pause_after_failures).await
                        {
                            warn!(error = %e, question = id, "cannot expire a question");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, question = id, "cannot read a question; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                _ = grant.ended.cancelled() => break None,
                _ = rest.read(&mut probe) => break None,
            }
        };
        match outcome {
            Some(q) => {
                let end = Reply {
                    id: Some(id),
                    status: Some(q.status),
                    answer: q.answer,
                    answered_by: q.answered_by,
                    error: None,
                    code: None,
                };
                let _ = send(&mut write, &end).await;
            }
            None => self.abandon(&grant).await,
        }
    }

    /// Check and ask; the question's id and who asked.
    async fn ask(&self, line: &str) -> Result<(i64, Grant), Reply> {
        let req: Request = serde_json::from_str(line)
            .map_err(|e| Reply::refused(2, format!("not a request: {e}")))?;
        let grant = {
            let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            grants.get(&req.token).cloned()
        }
        .ok_or_else(|| {
            Reply::refused(
                3,
                "not allowed: these credentials are not those of a step running now",
            )
        })?;
        let timeout = match req.timeout.as_deref() {
            None => None,
            Some(t) => Some(
                humantime::parse_duration(t)
                    .map_err(|e| Reply::refused(2, format!("bad --timeout {t:?}: {e}")))?,
            ),
        };
        let question = NewQuestion {
            mission_id: Some(grant.mission_id),
            step_id: Some(grant.step_id),
            attempt: Some(grant.attempt),
            asked_by: format!("step:{}", grant.step_id),
            question: req.question,
            choices: req.choices,
            pattern: req.pattern,
            timeout,
            default: req.default,
            ..NewQuestion::default()
        };
        question
            .validate()
            .map_err(|e| Reply::refused(2, e.to_string()))?;
        let asked = async {
            let mut tx = self.pool.begin().await?;
            if !steps::lock_running(&mut tx, grant.step_id, &self.owner, grant.attempt).await? {
                return Err(OpsError::refused(
                    "not allowed: the step is no longer running here",
                ));
            }
            let id = questions::ask(&mut tx, &question).await?;
            tx.commit().await?;
            Ok::<i64, OpsError>(id)
        };
        match asked.await {
            Ok(id) => {
                debug!(question = id, step_id = grant.step_id, "a step asked");
                Ok((id, grant))
            }
            Err(OpsError::BadInput(m)) => Err(Reply::refused(2, m)),
            Err(OpsError::Refused(m)) => Err(Reply::refused(3, m)),
            Err(e) => {
                warn!(error = %e, "cannot store a step's question");
                Err(Reply::refused(1, "cannot store the question; try again"))
            }
        }
    }

    /// The asker went away or its attempt ended: its open questions are cancelled.
    async fn abandon(&self, grant: &Grant) {
        if let Err(e) =
            questions::cancel_of_attempt(&self.pool, grant.mission_id, grant.step_id, grant.attempt)
                .await
        {
            warn!(error = %e, "cannot cancel an ended attempt's questions");
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    write.write_all(line.as_bytes()).await
}
