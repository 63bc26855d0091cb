//! HTTP (docs/http.md): `/healthz`, `/metrics`, and the bearer-protected `/api/*` for
//! agents and scripts. The routes are one table ([`routes`]); `handlers` holds one
//! function per endpoint, calling the same library functions as the CLI and the bot,
//! and nothing here writes SQL. Every error, including a malformed request, is a JSON
//! `{"error": "..."}` with a 4xx status (`errors`); a 5xx only means the server or
//! database failed. `auth` says who calls (the operator or an agent, with its scopes),
//! `json` reads bodies strictly.

mod auth;
mod errors;
mod handlers;
mod json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::handler::Handler;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{self, MethodRouter};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use auth::Need;
pub use errors::ApiError;
pub use json::{BODY_LIMIT, StrictJson};

use crate::engine::keys::KeyFilter;
use crate::engine::questions::Waiters;
use crate::engine::telemetry;
use crate::store::policy::PolicyCache;

/// The `Server` header of every response; `opsloop doctor` recognises a running opsloop by it.
pub const SERVER: &str = concat!("opsloop/", env!("CARGO_PKG_VERSION"));

/// Agent-key lookups that may use the pool at once.
const KEY_LOOKUPS: usize = 4;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    policy: PolicyCache,
    ops_key: auth::ApiKey,
    metrics: PrometheusHandle,
    /// Long polls of questions share one listener, started on first use.
    waiters: Arc<std::sync::OnceLock<Waiters>>,
    /// Agent-key lookups at once: a flood of wrong keys queues here instead of taking
    /// the pool's connections from everything else (`/healthz`, the worker).
    key_lookups: Arc<tokio::sync::Semaphore>,
    /// Wrong keys per client address, to pace a flood of them.
    refusals: Arc<auth::Refusals>,
    /// The live keys' digests, started on first use.
    key_filter: Arc<std::sync::OnceLock<Arc<KeyFilter>>>,
}

impl AppState {
    /// `ops_key` is `OPS_KEY`; `None` (or blank) turns every `/api/*` call away.
    pub fn new(pool: PgPool, policy: PolicyCache, ops_key: Option<&str>) -> AppState {
        AppState {
            pool,
            policy,
            ops_key: auth::ApiKey::new(ops_key),
            metrics: telemetry::handle(),
            waiters: Arc::new(std::sync::OnceLock::new()),
            key_lookups: Arc::new(tokio::sync::Semaphore::new(KEY_LOOKUPS)),
            key_filter: Arc::new(std::sync::OnceLock::new()),
            refusals: Arc::new(auth::Refusals::new()),
        }
    }

    fn key_filter(&self) -> &KeyFilter {
        self.key_filter.get_or_init(|| KeyFilter::start(&self.pool))
    }

    fn waiters(&self) -> &Waiters {
        self.waiters.get_or_init(|| Waiters::start(&self.pool))
    }
}

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    /// A bearer key (`OPS_KEY`, or an agent key with this scope), checked before
    /// anything else.
    Key(Need),
}

/// Every route, once: the router, the key check, the 404's list of routes and the
/// request counter's `route` label all come from this table.
fn routes() -> [Route; 9] {
    use Access::{Key, Open};
    [
        Route::get("/healthz", Open, handlers::healthz),
        Route::get("/metrics", Open, handlers::metrics),
        Route::post(
            "/api/ops/heartbeat",
            Key(Need::Operator),
            handlers::heartbeat,
        ),
        Route::post("/api/events", Key(Need::Emit), handlers::emit_event),
        Route::post("/api/proposals", Key(Need::Propose), handlers::propose),
        Route::get("/api/missions/{id}", Key(Need::Read), handlers::mission),
        Route::post("/api/questions", Key(Need::Answer), handlers::ask),
        Route::get(
            "/api/questions/{id}",
            Key(Need::ReadAnswer),
            handlers::question,
        ),
        Route::post(
            "/api/questions/{id}/answer",
            Key(Need::Answer),
            handlers::answer,
        ),
    ]
}

/// One endpoint of [`routes`]. A path appears once (one method each).
struct Route {
    method: &'static str,
    path: &'static str,
    access: Access,
    endpoint: MethodRouter<AppState>,
}

impl Route {
    fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, access: Access, h: H) -> Route {
        Route {
            method: "GET",
            path,
            access,
            endpoint: routing::get(h),
        }
    }

    fn post<H: Handler<T, AppState>, T: 'static>(
        path: &'static str,
        access: Access,
        h: H,
    ) -> Route {
        Route {
            method: "POST",
            path,
            access,
            endpoint: routing::post(h),
        }
    }
}

/// "GET /healthz, GET /metrics, …": what the 404 offers instead.
fn listing(routes: &[Route]) -> String {
    routes
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bind `addr`, with one clear line when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: the address is already in use (another opsloop?); set OPSLOOP_HTTP_ADDR to a free address"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}; set OPSLOOP_HTTP_ADDR")
        }
    })
}

/// Serve `router(state)` on `listener` until `shutdown`; in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        // Histograms are drained into their buckets by upkeep; scrapes do it too.
        let handle = state.metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                }
            }
        })
    };
    // With each connection's address, so wrong keys are paced per client.
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    upkeep.abort();
    served
}

/// All routes, for `serve` and for tests (bind 127.0.0.1:0 and `axum::serve` it).
pub fn router(state: AppState) -> Router {
    let routes = routes();
    let listing: Arc<str> = listing(&routes).into();
    let mut router = Router::new();
    for route in routes {
        let mut endpoint = route.endpoint.fallback(errors::method_not_allowed);
        if let Access::Key(need) = route.access {
            // Around the 405 too: without a key a caller learns nothing about a route.
            endpoint = endpoint.layer(middleware::from_fn_with_state(
                (state.clone(), need),
                auth::require,
            ));
        }
        router = router.route(route.path, endpoint);
    }
    router
        .fallback(move || {
            let listing = listing.clone();
            async move { errors::not_found(&listing) }
        })
        .layer(middleware::from_fn(count_and_shape))
        .with_state(state)
}

/// Every response is counted by route and status, and an error that is not JSON yet
/// (a rejection from axum or hyper) becomes `{"error": ...}`. The `route` label is the
/// pattern the router matched, so the label set is the table's paths and `other`.
async fn count_and_shape(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", MatchedPath::as_str)
        .to_string();
    let response = errors::as_json(next.run(request).await).await;
    telemetry::http_request(route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_404_lists_every_route() {
        assert_eq!(
            listing(&routes()),
            "GET /healthz, GET /metrics, POST /api/ops/heartbeat, POST /api/events, POST /api/proposals, GET /api/missions/{id}, \
             POST /api/questions, GET /api/questions/{id}, POST /api/questions/{id}/answer"
        );
    }

    #[tokio::test]
    async fn the_table_builds_one_router() {
        // Overlapping or duplicated paths would panic here, not in a running daemon.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool parses its URL");
        let _ = router(AppState::new(pool, PolicyCache::default(), Some("key")));
    }
}
