//! A TCP proxy for network faults between opsloop and PostgreSQL (or any server):
//! it passes bytes through until told to reset every open connection (RST), stall all
//! traffic for a while (bytes are held, then delivered), or blackhole the connections
//! open now for good (they stay open, nothing more passes; new ones work) — what a
//! firewall or NAT that forgot a connection does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct State {
    /// No byte passes while set.
    stalled: bool,
    /// Connections numbered below this pass nothing, ever.
    blackholed_below: u64,
    next_id: u64,
    /// Cancelled to reset the connections open when it was.
    reset: CancellationToken,
    accepted: u64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Listen on a loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        tokio::spawn({
            let (state, changed, stop) = (state.clone(), changed.clone(), stop.clone());
            async move {
                loop {
                    let client = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok((client, _)) => client,
                            Err(_) => continue,
                        },
                    };
                    let (id, reset) = {
                        let mut st = lock(&state);
                        st.next_id += 1;
                        st.accepted += 1;
                        (st.next_id, st.reset.clone())
                    };
                    let (state, changed) = (state.clone(), changed.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        connection(id, client, server, state, changed, reset).await;
                    });
                }
            }
        });
        Proxy {
            addr,
            state,
            changed,
            stop,
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("URL");
        format!(
            "postgres://{}@{}/{}",
            opts.get_username(),
            self.addr,
            opts.get_database().unwrap_or("postgres")
        )
    }

    /// Reset (RST) every connection open now.
    pub fn reset_all(&self) {
        let mut st = lock(&self.state);
        st.reset.cancel();
        st.reset = CancellationToken::new();
    }

    /// Hold every byte, on every connection, until `resume`.
    pub fn stall(&self) {
        lock(&self.state).stalled = true;
    }

    pub fn resume(&self) {
        lock(&self.state).stalled = false;
        self.changed.notify_waiters();
    }

    /// The connections open now pass nothing more, ever; they are not closed.
    pub fn blackhole_open_connections(&self) {
        let mut st = lock(&self.state);
        st.blackholed_below = st.next_id + 1;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        lock(&self.state).accepted
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.reset_all();
    }
}

async fn connection(
    id: u64,
    client: TcpStream,
    server: TcpStream,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    reset: CancellationToken,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = pump(id, &mut client_read, &mut server_write, &state, &changed);
    let down = pump(id, &mut server_read, &mut client_write, &state, &changed);
    let reset_now = tokio::select! {
        _ = reset.cancelled() => true,
        _ = async { tokio::join!(up, down) } => false,
    };
    if reset_now {
        // An abortive close: RST to both sides. (SO_LINGER's blocking drop is for a
        // non-zero linger; with zero the drop returns at once.)
        #[allow(deprecated)]
        if let (Ok(c), Ok(s)) = (
            client_read.reunite(client_write),
            server_read.reunite(server_write),
        ) {
            let _ = c.set_linger(Some(std::time::Duration::ZERO));
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

async fn pump(
    id: u64,
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    state: &Mutex<State>,
    changed: &Notify,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (stalled, blackholed) = {
                let st = lock(state);
                (st.stalled, id < st.blackholed_below)
            };
            if blackholed {
                // Held open, silent, until the connection is reset or the test ends.
                std::future::pending::<()>().await;
            }
            if !stalled {
                break;
            }
            notified.await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
