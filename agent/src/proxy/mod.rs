//! The agent's traffic proxy: it owns a service's public port and forwards to the blue
//! and green slots by weight — per request for HTTP (HTTP/1.1 keep-alive to clients,
//! each slot's own pool of connections, [`pool`]; plain requests take the proxy's own
//! HTTP/1.1 path, [`plain`], and the rest hyper's, [`http`]), per
//! connection for TCP, and as a byte stream after an HTTP upgrade ([`tunnel`]). The
//! routing table is one `ArcSwap<Routes>`, replaced whole, so a switch is atomic. Every
//! request is counted per slot: requests, 5xx responses, upstream failures and a latency
//! histogram — and only what the slot did counts: a request the client broke (a
//! malformed or aborted body, a missing `Host`) is answered 400 and counted nowhere, so
//! clients cannot make a good release look bad. Connections are capped and time out when
//! idle ([`Limits`]); a slot that does not answer in its service's upstream timeout is
//! answered 504 and counted. A routing table may also name a slot that gets copies of
//! some live requests (shadow traffic); what is copied, and how the copy stays off the
//! live path, is [`crate::mirror`]'s.

mod http;
mod plain;
mod pool;
mod tunnel;
mod workers;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use cutover_proto::listen::{self, Acceptor, Cap};
use hyper::StatusCode;
use hyper::header::HeaderValue;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mirror::Mirror;
use pool::Pool;

/// Upper bounds of the latency histogram's buckets, in microseconds; the last bucket is
/// everything above.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    u64::MAX,
];

/// Counters for one slot process, shared by the proxy (writer) and reports (reader).
#[derive(Default, Debug)]
pub struct SlotMetrics {
    /// Requests (HTTP) or connections (TCP) sent to the slot.
    pub requests: AtomicU64,
    /// 5xx answers of the slot: analysis judges its error rate from them.
    pub responses_5xx: AtomicU64,
    /// Requests the slot did not answer (refused, reset, timed out): its fault too.
    pub upstream_failures: AtomicU64,
    /// Total time to response headers, for the latency histogram's sum.
    pub latency_sum_us: AtomicU64,
    /// Answers per bucket of [`LATENCY_BUCKETS_US`], for latency percentiles.
    pub latency: [AtomicU64; LATENCY_BUCKETS_US.len()],
    /// Requests under way, which a slot being emptied waits for (drain).
    pub in_flight: AtomicUsize,
    /// Cancelled when the slot's drain is over: the byte streams still open on it (TCP
    /// connections, upgraded HTTP connections) end then.
    pub drained: CancellationToken,
}

impl SlotMetrics {
    /// Counts one request: `None` for an upstream failure (no response).
    pub fn observe(&self, elapsed: Duration, status: Option<StatusCode>) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.requests.fetch_add(1, Ordering::Relaxed);
        match status {
            Some(s) if s.is_server_error() => {
                self.responses_5xx.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                self.upstream_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> cutover_proto::v1::SlotMetrics {
        cutover_proto::v1::SlotMetrics {
            requests: self.requests.load(Ordering::Relaxed),
            responses_5xx: self.responses_5xx.load(Ordering::Relaxed),
            upstream_failures: self.upstream_failures.load(Ordering::Relaxed),
            latency_bucket_le_us: LATENCY_BUCKETS_US.to_vec(),
            latency_counts: self
                .latency
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts something while it lasts: one up when made, one down when dropped (a
/// request or connection in flight on a slot, a client connection open on a proxy).
struct Counted<T: 'static> {
    /// What holds the counter.
    owner: Arc<T>,
    /// Which of its counters.
    count: fn(&T) -> &AtomicUsize,
}

impl<T> Counted<T> {
    fn new(owner: &Arc<T>, count: fn(&T) -> &AtomicUsize) -> Counted<T> {
        count(owner).fetch_add(1, Ordering::Relaxed);
        Counted {
            owner: owner.clone(),
            count,
        }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        (self.count)(&self.owner).fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request or connection in flight on a slot, which drain waits for.
fn count_in_flight(m: &Arc<SlotMetrics>) -> Counted<SlotMetrics> {
    Counted::new(m, |m| &m.in_flight)
}

/// Where a slot listens, its counters and its idle connections.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The slot process's private port on 127.0.0.1.
    pub port: u16,
    /// The slot's counters, which every request through this route adds to.
    pub metrics: Arc<SlotMetrics>,
    /// Connections to the slot, kept across routing tables while the port stays.
    pool: Arc<Pool>,
}

impl Upstream {
    pub fn new(port: u16, metrics: Arc<SlotMetrics>) -> Upstream {
        Upstream {
            port,
            metrics,
            pool: Arc::new(Pool::new(port)),
        }
    }
}

/// How long a slot may take to begin answering a request unless the plan says
/// otherwise (`[run] upstream_timeout`).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// One routing table: up to two weighted upstreams (blue, green), and the slot that
/// gets copies of live requests, if any.
#[derive(Debug)]
pub struct Routes {
    /// Weight (percent) and upstream of each slot that is there.
    pub entries: Vec<(u32, Upstream)>,
    /// Requests routed by this table: picking by it spreads them by weight.
    counter: AtomicU64,
    /// How long a slot may take to send a response head once it has the request.
    pub upstream_timeout: Duration,
    /// Where copies of live requests go during a shadow phase.
    pub mirror: Option<Arc<Mirror>>,
}

impl Default for Routes {
    fn default() -> Routes {
        Routes::new(Vec::new(), DEFAULT_UPSTREAM_TIMEOUT)
    }
}

impl Routes {
    pub fn new(entries: Vec<(u32, Upstream)>, upstream_timeout: Duration) -> Routes {
        Routes {
            entries: entries.into_iter().filter(|(w, _)| *w > 0).collect(),
            counter: AtomicU64::new(0),
            upstream_timeout,
            mirror: None,
        }
    }

    /// The same table, also copying live requests to `mirror`'s slot.
    pub fn mirrored(mut self, mirror: Option<Arc<Mirror>>) -> Routes {
        self.mirror = mirror;
        self
    }

    /// A slot in the table other than the one on `port`: where a request goes that
    /// `port` refused.
    pub fn other_than(&self, port: u16) -> Option<&Upstream> {
        self.entries
            .iter()
            .find(|(_, u)| u.port != port)
            .map(|(_, u)| u)
    }

    /// Picks an upstream in exact proportion to the weights: request n goes to position
    /// (n * 37) mod total, which walks every position once per `total` requests in an
    /// order that interleaves the slots.
    pub fn pick(&self) -> Option<&Upstream> {
        let total: u64 = self.entries.iter().map(|(w, _)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut pos = n.wrapping_mul(37) % total;
        for (w, u) in &self.entries {
            let w = u64::from(*w);
            if pos < w {
                return Some(u);
            }
            pos -= w;
        }
        self.entries.last().map(|(_, u)| u)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Http,
    Tcp,
}

/// Limits of a public listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The connection cap, and the HTTP header-read and keep-alive idle timeout.
    pub listen: listen::Limits,
    /// TCP mode: a connection that carries no byte either way for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            listen: listen::Limits::default(),
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }
}

/// How long a TCP-mode connection may carry nothing, unless configured otherwise.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// State shared by a proxy's accept loop and its connections.
struct Shared {
    /// The routing table, replaced whole with one atomic store.
    routes: ArcSwap<Routes>,
    /// Client connections open now (upgraded ones too).
    connections: AtomicUsize,
    /// Set during a handover: every response asks its client to close the connection,
    /// so keep-alive clients reconnect, to the next agent, between two requests.
    draining: AtomicBool,
    /// Byte streams (TCP mode, upgraded HTTP) close after this long without a byte.
    tcp_idle_timeout: Duration,
    /// Ends everything the proxy runs.
    cancel: CancellationToken,
    /// Where connection and stream tasks run, so shutdown waits for them.
    tasks: TaskTracker,
}

/// A client connection open on the proxy, which a handover waits for.
fn count_connection(s: &Arc<Shared>) -> Counted<Shared> {
    Counted::new(s, |s| &s.connections)
}

/// Tokens of the current accept loop: one stops accepting, one closes idle connections.
#[derive(Default)]
struct Phase {
    /// Stops the accept loop (a handover), leaving connections open.
    accepting: CancellationToken,
    /// Closes connections idle between two requests (late in a handover); a child of
    /// the proxy's token, so stopping the proxy closes them too.
    close_idle: CancellationToken,
}

/// A running listener for one service.
pub struct Proxy {
    /// The public address: a new desired one means a new listener.
    pub addr: SocketAddr,
    /// HTTP per request or TCP per connection; a change means a new listener.
    pub mode: Mode,
    /// Connection cap and idle timeouts, for every restart of the accept loop.
    limits: Limits,
    /// Places under the connection cap, kept across restarts of the accept loop.
    cap: Cap,
    /// Routes and connection state, shared with the accept loop and connections.
    shared: Arc<Shared>,
    /// Ends everything: accept loop and connections.
    cancel: CancellationToken,
    /// The current accept loop's tokens; a resumed loop gets new ones.
    phase: std::sync::Mutex<Phase>,
    /// The listening socket, kept apart from the accept loop so that it stays open (and
    /// keeps queueing connections) while it is handed to a re-executed agent.
    listener: OwnedFd,
    /// Where the accept loop and connection tasks run, so shutdown waits for them.
    tasks: TaskTracker,
}

impl Proxy {
    /// Binds `addr` and starts serving. Fails if the port cannot be bound.
    pub fn bind(
        addr: SocketAddr,
        mode: Mode,
        limits: Limits,
        parent: &CancellationToken,
        tasks: &TaskTracker,
    ) -> std::io::Result<Proxy> {
        if addr.is_ipv6() {
            return Err(std::io::Error::other(
                "IPv6 service addresses are not supported yet",
            ));
        }
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        Self::serve(OwnedFd::from(listener), addr, mode, limits, parent, tasks)
    }

    /// Serves on a listening socket inherited from the agent run before this one. The
    /// socket must be listening on `addr`.
    pub fn adopt(
        fd: OwnedFd,
        addr: SocketAddr,
        mode: Mode,
        limits: Limits,
        parent: &CancellationToken,
        tasks: &TaskTracker,
    ) -> std::io::Result<Proxy> {
        let l = std::net::TcpListener::from(fd);
        let at = l.local_addr()?;
        if at != addr {
            return Err(std::io::Error::other(format!(
                "inherited socket listens on {at}, not {addr}"
            )));
        }
        Self::serve(OwnedFd::from(l), addr, mode, limits, parent, tasks)
    }

    fn serve(
        listener: OwnedFd,
        addr: SocketAddr,
        mode: Mode,
        limits: Limits,
        parent: &CancellationToken,
        tasks: &TaskTracker,
    ) -> std::io::Result<Proxy> {
        let cancel = parent.child_token();
        let shared = Arc::new(Shared {
            routes: ArcSwap::default(),
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            tcp_idle_timeout: limits.tcp_idle_timeout,
            cancel: cancel.clone(),
            tasks: tasks.clone(),
        });
        let p = Proxy {
            addr,
            mode,
            limits,
            cap: Cap::new(limits.listen.max_connections),
            shared,
            cancel,
            phase: std::sync::Mutex::new(Phase::default()),
            listener,
            tasks: tasks.clone(),
        };
        p.start_accepting()?;
        Ok(p)
    }

    fn start_accepting(&self) -> std::io::Result<()> {
        let l = std::net::TcpListener::from(self.listener.try_clone()?);
        l.set_nonblocking(true)?;
        let listener = Acceptor::new(TcpListener::from_std(l)?, self.cap.clone(), "proxy");
        let phase = Phase {
            accepting: self.cancel.child_token(),
            close_idle: self.cancel.child_token(),
        };
        let (shared, stop, close_idle) = (
            self.shared.clone(),
            phase.accepting.clone(),
            phase.close_idle.clone(),
        );
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
        self.shared.draining.store(false, Ordering::Relaxed);
        let (mode, idle) = (self.mode, self.limits.listen.idle_timeout);
        self.tasks.spawn(async move {
            match mode {
                Mode::Http => serve_http(listener, idle, shared, stop, close_idle).await,
                Mode::Tcp => tunnel::serve_tcp(listener, shared, stop).await,
            }
        });
        Ok(())
    }

    /// Replaces the routing table in one atomic store. A slot still on the same port
    /// keeps its idle connections.
    pub fn set_routes(&self, mut routes: Routes) {
        let old = self.shared.routes.load();
        for (_, new) in &mut routes.entries {
            if let Some((_, kept)) = old
                .entries
                .iter()
                .find(|(_, u)| u.port == new.port && Arc::ptr_eq(&u.metrics, &new.metrics))
            {
                new.pool = kept.pool.clone();
            }
        }
        self.shared.routes.store(Arc::new(routes));
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Starts handing the port over: stops accepting (the socket stays open and the
    /// kernel queues new connections) and asks every client to close its connection
    /// after its next response.
    pub fn begin_handover(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.phase
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accepting
            .cancel();
    }

    /// Closes the connections that stay idle during a handover.
    pub fn close_idle(&self) {
        self.phase
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close_idle
            .cancel();
    }

    /// Serves again after a handover that did not happen.
    pub fn resume(&self) -> std::io::Result<()> {
        self.start_accepting()
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The listening socket, for a handover.
    pub fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve_http(
    mut listener: Acceptor,
    idle_timeout: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
    close_idle: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let _ = conn.stream().set_nodelay(true);
        let peer = conn.peer();
        let open = count_connection(&shared);
        let client = Arc::new(http::Client {
            shared: shared.clone(),
            peer,
            peer_value: HeaderValue::from_str(&peer.ip().to_string()).ok(),
        });
        let close_idle = close_idle.clone();
        workers::serve(&shared.tasks, conn, move |conn| async move {
            let _open = open;
            // Plain requests take the proxy's own path; the first that needs more hands
            // the connection to hyper for the rest of its life.
            if let Some(rest) = plain::serve(conn, &client, idle_timeout, &close_idle).await {
                serve_with_hyper(rest, client, idle_timeout, close_idle).await;
            }
        });
    }
}

/// Serves a client connection's requests with hyper's HTTP/1 server.
async fn serve_with_hyper(
    io: plain::Rewind,
    client: Arc<http::Client>,
    idle_timeout: Duration,
    close_idle: CancellationToken,
) {
    let svc = hyper::service::service_fn(move |req| {
        let client = client.clone();
        async move { Ok::<_, std::convert::Infallible>(http::forward(req, &client).await) }
    });
    // The header-read timer also runs while a kept-alive connection waits for its next
    // request: it is the idle timeout too.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    // `close_idle` is a child of the proxy's own token: stopping the proxy cancels it
    // too. One token is one check each time the task is woken.
    tokio::select! {
        biased;
        _ = conn.as_mut() => {},
        _ = close_idle.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        }
    }
}

/// Whether this host, not the slot, lacked what a connection to the slot needs.
fn host_short(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::ENOMEM,
            Errno::EADDRNOTAVAIL,
        ]
        .contains(&Errno::from_raw(code))
    })
}

#[cfg(test)]
mod tests;
