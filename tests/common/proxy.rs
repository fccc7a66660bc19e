//! A TCP forwarder owned by one test, put between `packmeter serve` and a
//! server (PostgreSQL) to make the server unreachable for those nodes only,
//! without touching the server itself (other tests use it).
//!
//! - [`Mode::Forward`]: every connection is forwarded to the upstream.
//! - [`Mode::Blackhole`]: a dead network path. Switching to it cuts every
//!   forwarded connection (reset), and new connections are accepted and
//!   then never answered, so the peer waits for its own timeouts.
//! - [`Mode::Refuse`]: a server that is down. Switching to it cuts every
//!   forwarded connection, and new connections are reset as soon as they
//!   are accepted.
//!
//! Held connections are closed when the proxy forwards again.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Blackhole,
    Refuse,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    cut: AtomicU64,
    turned_away: AtomicU64,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (mode, watching) = watch::channel(Mode::Forward);
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn({
            let counts = counts.clone();
            async move {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let mut watching = watching.clone();
                    let now = *watching.borrow_and_update();
                    match now {
                        Mode::Forward => {
                            counts.forwarded.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(forward(conn, upstream, watching, counts.clone()));
                        }
                        Mode::Blackhole => {
                            counts.turned_away.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(hold(conn, watching));
                        }
                        Mode::Refuse => {
                            counts.turned_away.fetch_add(1, Ordering::Relaxed);
                            reset(conn);
                        }
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            counts,
            task,
        }
    }

    /// Switches the mode; leaving `Forward` cuts every forwarded connection.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.counts.forwarded.load(Ordering::Relaxed)
    }

    /// Forwarded connections cut by leaving `Forward`.
    pub fn cut(&self) -> u64 {
        self.counts.cut.load(Ordering::Relaxed)
    }

    /// Connections attempted while not forwarding.
    pub fn turned_away(&self) -> u64 {
        self.counts.turned_away.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Cuts whatever is still forwarded or held.
        self.mode.send_replace(Mode::Refuse);
    }
}

/// Closes with a reset rather than an orderly FIN: what a peer sees when
/// the path or the server goes away.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

async fn forward(
    mut conn: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counts: Arc<Counts>,
) {
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        reset(conn);
        return;
    };
    let _ = conn.set_nodelay(true);
    let _ = up.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
        _ = mode.wait_for(|m| *m != Mode::Forward) => {
            counts.cut.fetch_add(1, Ordering::Relaxed);
            reset(conn);
            reset(up);
        }
    }
}

/// Accepted and never answered, until the proxy forwards again (or goes).
async fn hold(mut conn: TcpStream, mut mode: watch::Receiver<Mode>) {
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            r = conn.read(&mut sink) => {
                if matches!(r, Ok(0) | Err(_)) {
                    return;
                }
            }
            _ = mode.wait_for(|m| *m != Mode::Blackhole) => {
                reset(conn);
                return;
            }
        }
    }
}
