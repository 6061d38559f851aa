//! The agent's traffic proxy: it owns a service's public port and forwards to the blue
//! and green slots by weight — per request for HTTP (HTTP/1.1 keep-alive to clients,
//! pooled connections to the slots), per connection for TCP. The routing table is one
//! `ArcSwap<Routes>`, replaced whole, so a switch is atomic. Every request is counted
//! per slot: requests, 5xx responses, upstream failures and a latency histogram — and
//! only what the slot did counts: a request the client broke (a malformed or aborted
//! body, a missing `Host`) is answered 400 and counted nowhere, so clients cannot make a
//! good release look bad. Connections are capped and time out when idle ([`Limits`]).
//! A routing table may also name a slot that gets copies of some live requests (shadow
//! traffic); what is copied, and how the copy stays off the live path, is
//! [`crate::mirror`]'s.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use cutover_proto::listen::{self, Acceptor, Cap, Watched};
use http_body_util::{BodyExt, Either, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mirror::{self, Admission, LiveAnswer, Mirror};

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

/// Where a slot listens and its counters.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The slot process's private port on 127.0.0.1.
    pub port: u16,
    /// The slot's counters, which every request through this route adds to.
    pub metrics: Arc<SlotMetrics>,
}

/// One routing table: up to two weighted upstreams (blue, green), and the slot that
/// gets copies of live requests, if any.
#[derive(Debug, Default)]
pub struct Routes {
    /// Weight (percent) and upstream of each slot that is there.
    pub entries: Vec<(u32, Upstream)>,
    /// Requests routed by this table: picking by it spreads them by weight.
    counter: AtomicU64,
    /// Where copies of live requests go during a shadow phase.
    pub mirror: Option<Arc<Mirror>>,
}

impl Routes {
    pub fn new(entries: Vec<(u32, Upstream)>) -> Routes {
        Routes {
            entries: entries.into_iter().filter(|(w, _)| *w > 0).collect(),
            counter: AtomicU64::new(0),
            mirror: None,
        }
    }

    /// The same table, also copying live requests to `mirror`'s slot.
    pub fn mirrored(mut self, mirror: Option<Arc<Mirror>>) -> Routes {
        self.mirror = mirror;
        self
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

type Body = BoxBody<Bytes, hyper::Error>;
/// What goes to a slot: the client's body as it streams, or a body read whole so that
/// it could be copied too.
type UpBody = Either<Incoming, Full<Bytes>>;

fn text(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// State shared by a proxy's accept loop and its connections.
#[derive(Default)]
struct Shared {
    /// The routing table, replaced whole with one atomic store.
    routes: ArcSwap<Routes>,
    /// Client connections open now.
    connections: AtomicUsize,
    /// Set during a handover: every response asks its client to close the connection,
    /// so keep-alive clients reconnect, to the next agent, between two requests.
    draining: AtomicBool,
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
    /// Closes connections idle between two requests (late in a handover).
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
        let p = Proxy {
            addr,
            mode,
            limits,
            cap: Cap::new(limits.listen.max_connections),
            shared: Arc::default(),
            cancel: parent.child_token(),
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
        let (mode, cancel, tasks) = (self.mode, self.cancel.clone(), self.tasks.clone());
        let limits = self.limits;
        self.tasks.spawn(async move {
            match mode {
                Mode::Http => {
                    let idle = limits.listen.idle_timeout;
                    serve_http(listener, idle, shared, stop, close_idle, cancel, tasks).await
                }
                Mode::Tcp => {
                    let idle = limits.tcp_idle_timeout;
                    serve_tcp(listener, idle, shared, stop, cancel, tasks).await
                }
            }
        });
        Ok(())
    }

    /// Replaces the routing table in one atomic store.
    pub fn set_routes(&self, routes: Routes) {
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
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: Client<HttpConnector, UpBody> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .build(connector);
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let _ = conn.stream().set_nodelay(true);
        let peer = conn.peer();
        let open = count_connection(&shared);
        let shared = shared.clone();
        let client = client.clone();
        let (cancel, close_idle) = (cancel.clone(), close_idle.clone());
        tasks.spawn(async move {
            let _open = open;
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let client = client.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(forward(req, peer, &shared, &client).await)
                }
            });
            // The header-read timer also runs while a kept-alive connection waits for its
            // next request: it is the idle timeout too.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .header_read_timeout(idle_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(conn), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {},
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                }
                _ = close_idle.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                }
            }
        });
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded; nor are those that
/// `Connection` names.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "upgrade",
];

async fn forward(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    client: &Client<HttpConnector, UpBody>,
) -> Response<Body> {
    let mut resp = route(req, peer, shared, client).await;
    if shared.draining.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn route(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    client: &Client<HttpConnector, UpBody>,
) -> Response<Body> {
    if !one_host(&req) {
        return text(
            StatusCode::BAD_REQUEST,
            "exactly one Host header is required\n",
        );
    }
    let (upstream, mirror) = {
        let routes = shared.routes.load();
        let Some(upstream) = routes.pick().cloned() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no release is serving on this host\n",
            );
        };
        let mirror = routes.mirror.clone().filter(|m| m.port != upstream.port);
        (upstream, mirror)
    };
    let _in_flight = count_in_flight(&upstream.metrics);
    if aim(&mut req, upstream.port, peer).is_err() {
        return text(StatusCode::BAD_REQUEST, "bad request target\n");
    }
    let Ok((req, live)) = with_copy(req, mirror.as_deref()).await else {
        return text(
            StatusCode::BAD_REQUEST,
            "malformed or incomplete request body\n",
        );
    };
    let started = Instant::now();
    match client.request(req).await {
        Ok(mut resp) => {
            upstream
                .metrics
                .observe(started.elapsed(), Some(resp.status()));
            if let Some(live) = live {
                live.tell(Some(resp.status()));
            }
            strip_hop_by_hop(resp.headers_mut());
            resp.map(|b| b.boxed())
        }
        Err(e) => failed(&e, &upstream, started),
    }
}

/// The request to forward, and — when `mirror` copies it — the copy's hand-over of the
/// live answer. A copied request's body is read first (it is known small); its failure
/// is the client's (`Err`).
async fn with_copy(
    req: Request<Incoming>,
    mirror: Option<&Mirror>,
) -> Result<(Request<UpBody>, Option<LiveAnswer>), ()> {
    let Some(mirror) = mirror else {
        return Ok((req.map(Either::Left), None));
    };
    let Admission::Copy(place) = mirror.admit(req.method(), req.headers()) else {
        return Ok((req.map(Either::Left), None));
    };
    let (req, body) = mirror::buffer(req).await.map_err(|e| {
        tracing::debug!(error = e, "client request body failed");
    })?;
    let live = mirror.send(place, &req, body);
    Ok((req.map(Either::Right), live))
}

/// Points the request at the slot on `port`: its target, without hop-by-hop fields,
/// with the client in `X-Forwarded-For`. Fails when the target makes no URI.
fn aim<B>(
    req: &mut Request<B>,
    port: u16,
    peer: SocketAddr,
) -> Result<(), hyper::http::uri::InvalidUri> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = format!("http://127.0.0.1:{port}{pq}").parse()?;
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    Ok(())
}

/// The answer to a request the slot did not answer; only the slot's own failures count
/// against it.
fn failed(
    e: &hyper_util::client::legacy::Error,
    upstream: &Upstream,
    started: Instant,
) -> Response<Body> {
    match fault(e) {
        Fault::Slot => {
            upstream.metrics.observe(started.elapsed(), None);
            tracing::debug!(port = upstream.port, error = %e, "upstream request failed");
            text(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
        }
        Fault::Client => {
            tracing::debug!(port = upstream.port, error = %e, "client request body failed");
            text(
                StatusCode::BAD_REQUEST,
                "malformed or incomplete request body\n",
            )
        }
        Fault::Host => {
            tracing::debug!(port = upstream.port, error = %e, "no socket for the slot");
            text(StatusCode::SERVICE_UNAVAILABLE, "proxy out of resources\n")
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`; HTTP/1.0 may omit it.
fn one_host(req: &Request<Incoming>) -> bool {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => req.version() < Version::HTTP_11,
        (Some(_), None) => true,
        (Some(_), Some(_)) => false,
    }
}

/// Removes the hop-by-hop fields and those `Connection` names. Allocates only when
/// `Connection` names more than `close` or `keep-alive`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in h.get_all(header::CONNECTION) {
        for option in value.as_bytes().split(|b| *b == b',') {
            let option = option.trim_ascii();
            if option.is_empty()
                || option.eq_ignore_ascii_case(b"close")
                || option.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option) {
                named.push(name);
            }
        }
    }
    for name in named {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

/// Whose doing a failed forward is; only the slot's counts against it.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// The client's request body failed: malformed chunking, a body cut short, a client
    /// gone mid-upload.
    Client,
    /// This host had no socket to reach the slot with: out of file descriptors, memory
    /// or local ports.
    Host,
    /// The slot refused, reset or closed the connection, or did not answer in time.
    Slot,
}

/// Classifies a failed forward. The body forwarded is the client's own `Incoming`, so
/// hyper reports its failure as a user-body error caused by a `hyper::Error` of the
/// client's connection; the host's own shortages are the OS errors of `socket`/`connect`.
fn fault(e: &hyper_util::client::legacy::Error) -> Fault {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_user()
            && std::error::Error::source(h).is_some_and(|c| c.is::<hyper::Error>())
        {
            return Fault::Client;
        }
        if err.downcast_ref::<std::io::Error>().is_some_and(host_short) {
            return Fault::Host;
        }
        source = err.source();
    }
    Fault::Slot
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

async fn serve_tcp(
    mut listener: Acceptor,
    idle_timeout: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let mut inbound = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let _ = inbound.stream().set_nodelay(true);
        let Some(upstream) = shared.routes.load().pick().cloned() else {
            drop(inbound);
            continue;
        };
        let open = count_connection(&shared);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let _open = open;
            let _in_flight = count_in_flight(&upstream.metrics);
            let started = Instant::now();
            let out = tokio::time::timeout(
                Duration::from_secs(2),
                TcpStream::connect(("127.0.0.1", upstream.port)),
            )
            .await;
            let mut out = match out {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if host_short(&e) => return,
                _ => {
                    upstream.metrics.observe(started.elapsed(), None);
                    return;
                }
            };
            let _ = out.set_nodelay(true);
            upstream
                .metrics
                .observe(started.elapsed(), Some(StatusCode::OK));
            // Every byte either way passes through `inbound`: counting there is enough.
            let seen = AtomicU64::new(0);
            let mut watched = Watched {
                inner: &mut inbound,
                seen: &seen,
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut watched, &mut out) => {},
                _ = listen::until_idle(&seen, idle_timeout) => {},
                _ = cancel.cancelled() => {},
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(port: u16) -> Upstream {
        Upstream {
            port,
            metrics: Arc::default(),
        }
    }

    #[test]
    fn weights_are_exact_per_hundred() {
        for w in [0u32, 1, 10, 33, 50, 99, 100] {
            let r = Routes::new(vec![(100 - w, up(1)), (w, up(2))]);
            let mut green = 0;
            for _ in 0..1000 {
                if r.pick().unwrap().port == 2 {
                    green += 1;
                }
            }
            assert_eq!(green, w * 10, "weight {w}");
        }
    }

    #[test]
    fn one_percent_is_spread_not_bunched() {
        let r = Routes::new(vec![(50, up(1)), (50, up(2))]);
        let seq: Vec<u16> = (0..10).map(|_| r.pick().unwrap().port).collect();
        assert!(seq.windows(2).any(|w| w[0] != w[1]), "{seq:?}");
    }

    #[test]
    fn empty_table_picks_nothing() {
        assert!(Routes::new(vec![]).pick().is_none());
        assert!(Routes::new(vec![(0, up(1)), (0, up(2))]).pick().is_none());
    }

    /// What a test upstream does with each request head it reads.
    #[derive(Clone, Copy)]
    enum Reply {
        /// Writes these bytes.
        Raw(&'static [u8]),
        /// Closes the connection without answering.
        Close,
        /// Never answers.
        Hold,
    }

    const OK: Reply = Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");

    /// A minimal upstream: answers every request on a connection with `200 ok`.
    async fn upstream() -> u16 {
        upstream_with(OK).await.0
    }

    /// An upstream that does `reply` to every request head it reads; returns its port
    /// and the heads it read.
    async fn upstream_with(reply: Reply) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen_heads = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let heads = seen_heads.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut seen = Vec::new();
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = seen.drain(..end + 4).collect();
                            heads
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&head).into_owned());
                            match reply {
                                Reply::Raw(r) => {
                                    if s.write_all(r).await.is_err() {
                                        return;
                                    }
                                }
                                Reply::Close => return,
                                Reply::Hold => {}
                            }
                        }
                    }
                });
            }
        });
        (port, heads)
    }

    /// Sends `bytes`, optionally half-closes, and reads what comes back for a while.
    async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, wait: Duration) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return Vec::new();
        };
        let _ = s.write_all(bytes).await;
        if half_close {
            let _ = s.shutdown().await;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
        out
    }

    const GOOD: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

    #[tokio::test]
    async fn garbage_never_takes_the_proxy_down() {
        let port = upstream().await;
        let (free, _proxy, _) = proxy_to(port, Mode::Http, Limits::default());
        let ok = exchange(free, GOOD, false, Duration::from_secs(5)).await;
        assert!(
            ok.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&ok)
        );

        // A panic in a connection task would be caught by the runtime and go unseen:
        // count the ones raised on this test's thread.
        let me = std::thread::current().name().map(String::from);
        static PANICS: AtomicUsize = AtomicUsize::new(0);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().map(String::from) == me {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
            previous(info);
        }));
        for (i, c) in garbage().iter().enumerate() {
            let _ = exchange(free, c, i % 2 == 0, Duration::from_millis(50)).await;
        }
        assert_eq!(
            PANICS.load(Ordering::Relaxed),
            0,
            "panics while serving garbage"
        );

        let ok = exchange(free, GOOD, false, Duration::from_secs(5)).await;
        assert!(
            ok.starts_with(b"HTTP/1.1 200"),
            "still serving: {}",
            String::from_utf8_lossy(&ok)
        );
    }

    /// Malformed requests: hand-made ones, noise, and mutations of valid requests.
    fn garbage() -> Vec<Vec<u8>> {
        let mut cases: Vec<Vec<u8>> = vec![
            b"\r\n\r\n".to_vec(),
            b"GET".to_vec(),
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"BREW /pot HTCPCP/1.0\r\n\r\n".to_vec(),
            b"GET / HTTP/9.9\r\n\r\n".to_vec(),
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n".to_vec(),
            b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nab".to_vec(),
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            [
                b"GET / HTTP/1.1\r\nx: ".as_slice(),
                &vec![b'a'; 200_000],
                b"\r\n\r\n",
            ]
            .concat(),
            [
                b"GET /".as_slice(),
                &vec![b'a'; 100_000],
                b" HTTP/1.1\r\n\r\n",
            ]
            .concat(),
        ];
        // Deterministic noise: xorshift bytes of varying length.
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        for i in 0..200 {
            let len = (i * 37) % 3000;
            cases.push((0..len).map(|_| (rnd() & 0xff) as u8).collect());
        }
        cases.extend(mutations(rnd));
        cases
    }

    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Structure-aware mutations of valid requests: bytes flipped, inserted, removed,
    /// lines duplicated, cut short. CUTOVER_FUZZ_CASES sets how many (default 300); CI
    /// runs the default, longer campaigns set more.
    fn mutations(mut rnd: impl FnMut() -> u64) -> Vec<Vec<u8>> {
        let seeds: [&[u8]; 3] = [
            GOOD,
            b"POST /a?b=c HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
            b"PUT / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ];
        let n: usize = std::env::var("CUTOVER_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        (0..n)
            .map(|i| {
                let mut v = seeds[i % seeds.len()].to_vec();
                for _ in 0..=(rnd() % 4) {
                    let at = (rnd() as usize) % (v.len() + 1);
                    match rnd() % 5 {
                        0 if at < v.len() => v[at] = rnd() as u8,
                        1 => v.insert(at, rnd() as u8),
                        2 if at < v.len() => {
                            v.remove(at);
                        }
                        3 => {
                            let line = b"x-dup: 1\r\n".repeat((rnd() % 50) as usize);
                            let head = v.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
                            v.splice(head..head, line);
                        }
                        _ => v.truncate(at),
                    }
                }
                v
            })
            .collect()
    }

    /// A proxy on a free port sending everything to the upstream on `port`; returns its
    /// address, the proxy (serving until dropped) and the slot's counters.
    fn proxy_to(port: u16, mode: Mode, limits: Limits) -> (SocketAddr, Proxy, Arc<SlotMetrics>) {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = Proxy::bind(
            free,
            mode,
            limits,
            &CancellationToken::new(),
            &TaskTracker::new(),
        )
        .unwrap();
        let metrics = Arc::new(SlotMetrics::default());
        proxy.set_routes(Routes::new(vec![(
            100,
            Upstream {
                port,
                metrics: metrics.clone(),
            },
        )]));
        (free, proxy, metrics)
    }

    fn counted(m: &SlotMetrics) -> (u64, u64, u64) {
        let s = m.snapshot();
        (s.requests, s.responses_5xx, s.upstream_failures)
    }

    /// Sends `bytes` on a fresh connection and reads one response (head and
    /// content-length body), or whatever came before the connection closed.
    async fn one_response(addr: SocketAddr, bytes: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let complete = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= len
        };
        let read = async {
            while !complete(&got) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn what_clients_break_never_counts_against_the_slot() {
        // The slot reads and never answers: any failure can only be the client's.
        let (port, heads) = upstream_with(Reply::Hold).await;
        let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());

        // A chunked body that is not chunked.
        let r = one_response(
            addr,
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");

        // A body cut short: the client stops sending and closes its side.
        {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
                .await
                .unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest),
            )
            .await;
        }

        // No Host, or two: 400 from the proxy itself, and the slot never sees them.
        let r = one_response(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = one_response(addr, b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");

        wait_for(
            || heads.lock().unwrap().len() >= 2,
            "the two bodies to reach the slot",
        )
        .await;
        assert_eq!(
            heads.lock().unwrap().len(),
            2,
            "{:?}",
            heads.lock().unwrap()
        );
        // Both forwards ended with the client's failure, and neither counted.
        wait_for(|| metrics.in_flight() == 0, "the forwards to end").await;
        assert_eq!(counted(&metrics), (0, 0, 0));
    }

    #[tokio::test]
    async fn what_the_slot_does_counts_against_it() {
        // Refused: nothing listens on the slot's port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (addr, _proxy, metrics) = proxy_to(closed, Mode::Http, Limits::default());
        let r = one_response(addr, GOOD).await;
        assert!(r.starts_with("HTTP/1.1 502"), "{r}");
        assert_eq!(counted(&metrics), (1, 0, 1));

        // Closed without an answer.
        let (port, _) = upstream_with(Reply::Close).await;
        let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
        let r = one_response(addr, GOOD).await;
        assert!(r.starts_with("HTTP/1.1 502"), "{r}");
        assert_eq!(counted(&metrics), (1, 0, 1));

        // A 5xx answer, passed on as it is.
        let (port, _) = upstream_with(Reply::Raw(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
        let r = one_response(addr, GOOD).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(counted(&metrics), (1, 1, 0));

        // HTTP/1.0 may omit Host.
        let port = upstream().await;
        let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
        let r = one_response(addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        assert_eq!(counted(&metrics), (1, 0, 0));
    }

    #[tokio::test]
    async fn hop_by_hop_fields_stop_at_the_proxy_both_ways() {
        let (port, heads) = upstream_with(Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nx-kept: 1\r\n\r\nok",
        ))
        .await;
        let (addr, _proxy, _) = proxy_to(port, Mode::Http, Limits::default());
        let r = one_response(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\nConnection: keep-alive, X-Internal\r\nconnection: x-also\r\nX-Internal: 1\r\nx-also: 1\r\nte: trailers\r\nx-end-to-end: 1\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = r.to_ascii_lowercase();
        assert!(r.contains("x-kept: 1"), "{r}");
        for gone in ["x-secret", "keep-alive: timeout"] {
            assert!(!r.contains(gone), "{gone} reached the client: {r}");
        }
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.contains("x-end-to-end: 1"), "{head}");
        for gone in [
            "x-internal",
            "x-also",
            "te: trailers",
            "connection: keep-alive",
        ] {
            assert!(!head.contains(gone), "{gone} reached the slot: {head}");
        }
    }

    #[tokio::test]
    async fn tcp_connections_close_once_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // An echo server as the slot.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let limits = Limits {
            tcp_idle_timeout: Duration::from_millis(400),
            ..Limits::default()
        };
        let (addr, _proxy, _) = proxy_to(port, Mode::Tcp, limits);
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Busy for twice the idle timeout: the connection stays.
        let mut b = [0u8; 1];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(b"x").await.unwrap();
            s.read_exact(&mut b).await.unwrap();
        }
        // Then quiet: closed after the timeout, not before.
        let quiet = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("closed once idle")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            quiet.elapsed() >= Duration::from_millis(400),
            "{:?}",
            quiet.elapsed()
        );
    }

    #[test]
    fn only_the_hosts_own_shortages_spare_the_slot() {
        use nix::errno::Errno;
        for mine in [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::EADDRNOTAVAIL,
        ] {
            assert!(host_short(&std::io::Error::from_raw_os_error(mine as i32)));
        }
        for slots in [
            Errno::ECONNREFUSED,
            Errno::ECONNRESET,
            Errno::ETIMEDOUT,
            Errno::EPIPE,
        ] {
            assert!(!host_short(&std::io::Error::from_raw_os_error(
                slots as i32
            )));
        }
        assert!(!host_short(&std::io::Error::other("no code")));
    }

    /// Polls `cond` every 10 ms, for 5 s at most.
    async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A proxy to the live upstream on `live` that copies `methods` requests to the
    /// slot on `copies`; returns its address, the proxy, and the copies' counters.
    fn mirrored_proxy(
        live: u16,
        copies: u16,
        methods: Vec<hyper::Method>,
    ) -> (SocketAddr, Proxy, Arc<crate::mirror::ShadowMetrics>) {
        let (addr, proxy, metrics) = proxy_to(live, Mode::Http, Limits::default());
        let shadow = Arc::new(crate::mirror::ShadowMetrics::default());
        let rule = crate::mirror::Rule {
            share: 100,
            methods,
        };
        let mirror = Arc::new(Mirror::new(rule, copies, shadow.clone()));
        let routes = Routes::new(vec![(
            100,
            Upstream {
                port: live,
                metrics,
            },
        )]);
        proxy.set_routes(routes.mirrored(Some(mirror)));
        (addr, proxy, shadow)
    }

    #[tokio::test]
    async fn a_copy_target_that_never_answers_changes_nothing_for_clients() {
        let live = upstream().await;
        let (hanging, heads) = upstream_with(Reply::Hold).await;
        let (addr, _proxy, shadow) = mirrored_proxy(live, hanging, vec![hyper::Method::GET]);
        let n = crate::mirror::IN_FLIGHT + 20;
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let started = Instant::now();
            let r = one_response(addr, GOOD).await;
            slowest = slowest.max(started.elapsed());
            assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok"), "{r}");
        }
        assert!(slowest < Duration::from_secs(1), "slowest {slowest:?}");
        // Every copy in flight holds a place (for 5 s); the rest are dropped and
        // counted, and each request was either copied or dropped.
        let dropped = shadow.dropped.load(Ordering::Relaxed) as usize;
        assert!(dropped >= 1, "nothing dropped");
        wait_for(
            || heads.lock().unwrap().len() + dropped == n,
            "the copies to reach the slot",
        )
        .await;
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.contains("x-cutover-shadow: 1"), "{head}");
    }

    #[tokio::test]
    async fn copies_carry_the_body_and_their_status_is_compared_with_the_live_one() {
        let live = upstream().await;
        let (not_found, heads) = upstream_with(Reply::Raw(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let (addr, _proxy, shadow) = mirrored_proxy(live, not_found, vec![hyper::Method::POST]);
        let post = b"POST /orders?x=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
        for _ in 0..3 {
            let r = one_response(addr, post).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        }
        // GET is not listed: not copied.
        assert!(one_response(addr, GOOD).await.starts_with("HTTP/1.1 200"));
        wait_for(
            || shadow.compared.load(Ordering::Relaxed) == 3,
            "three comparisons",
        )
        .await;
        assert_eq!(shadow.matched.load(Ordering::Relaxed), 0, "404 is not 200");
        let m = shadow.snapshot().expect("counters");
        assert_eq!((m.requests, m.responses_5xx, m.status_compared), (3, 0, 3));
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3, "{heads:?}");
        assert!(
            heads[0].starts_with("POST /orders?x=1 HTTP/1.1"),
            "{heads:?}"
        );
    }

    #[test]
    fn histogram_buckets() {
        let m = SlotMetrics::default();
        m.observe(Duration::from_micros(400), Some(StatusCode::OK));
        m.observe(
            Duration::from_millis(3),
            Some(StatusCode::INTERNAL_SERVER_ERROR),
        );
        m.observe(Duration::from_secs(100), None);
        let s = m.snapshot();
        assert_eq!(
            (s.requests, s.responses_5xx, s.upstream_failures),
            (3, 1, 1)
        );
        assert_eq!(s.latency_counts[0], 1);
        assert_eq!(s.latency_counts[3], 1);
        assert_eq!(*s.latency_counts.last().unwrap(), 1);
    }
}
