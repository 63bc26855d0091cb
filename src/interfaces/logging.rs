//! Logs: pretty on a terminal, JSON for journald and log shippers (`OPSLOOP_LOG`).
//! One-shot commands log warnings only, so their stdout stays the answer.

use tracing_subscriber::EnvFilter;

use crate::domain::config::LogFormat;

pub fn init(format: LogFormat, daemon: bool) {
    let default = if daemon { "info,sqlx=warn" } else { "warn" };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
