//! The simulated hosts' links to the coordinator: each host dials from its own source
//! address with its own certificate over mutual TLS and runs the real `AgentLink.Session`
//! stream as `cutover-agent` does — its whole observed state first, a report on every
//! change (gathered for 20 ms; counters at most every second, everything at least every
//! `link::REFRESH`), heartbeats both ways, the silence limit, and reconnects after the
//! agent's `link::reconnect_delay`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use cutover_proto::link;
use cutover_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Observed, ObservedService,
    agent_link_client::AgentLinkClient, agent_message, coordinator_message,
};
use cutover_shared::clock::now_ms;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::host::{Ack, Behaviour, Faults, SimHost, unit};

/// How long a burst of changes is gathered into one report (the agent's).
const COALESCE: Duration = Duration::from_millis(20);
/// Messages queued for the coordinator before the session is given up as stuck.
const OUTGOING: usize = 64;

/// What every simulated host shares.
pub struct Shared {
    /// The coordinator's gRPC address.
    pub coordinator: SocketAddr,
    pub behaviour: Behaviour,
    /// Faults the scenarios inject, read on every report.
    pub faults: ArcSwap<Faults>,
    /// Hosts whose session is open (their first desired state arrived).
    pub connected: AtomicUsize,
    /// Why sessions ended or could not open, with how often, by kind.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Sessions that ended or could not open, in all.
    pub failures: AtomicU64,
    /// The most messages any host had waiting to go out: the coordinator (or the
    /// simulator itself) falling behind shows here first.
    pub max_queued: AtomicUsize,
    /// Stops every host.
    pub cancel: CancellationToken,
}

impl Shared {
    pub fn new(coordinator: SocketAddr, behaviour: Behaviour) -> Shared {
        Shared {
            coordinator,
            behaviour,
            faults: ArcSwap::from_pointee(Faults::default()),
            connected: AtomicUsize::new(0),
            errors: Mutex::new(BTreeMap::new()),
            failures: AtomicU64::new(0),
            max_queued: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
        }
    }

    /// Why sessions ended or failed so far, most frequent first.
    pub fn errors(&self) -> Vec<(String, u64)> {
        let g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, u64)> = g.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Counts one failure, with numbers (ports, addresses, durations) masked so that
    /// failures of one kind count together.
    fn failed(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut kind = String::with_capacity(error.len());
        let mut in_number = false;
        for c in error.chars() {
            if c.is_ascii_digit() {
                if !in_number {
                    kind.push('N');
                }
                in_number = true;
            } else {
                in_number = false;
                kind.push(c);
            }
        }
        let mut g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *g.entry(kind).or_default() += 1;
    }
}

/// One simulated host and what the scenarios read of it.
pub struct Host {
    pub name: String,
    /// The address its connections come from.
    pub source: IpAddr,
    /// Its certificate and key, trusting only the coordinator's CA.
    tls: Arc<ClientConfig>,
    state: Mutex<SimHost>,
    /// Sessions opened so far (each counted when its first desired state arrived).
    pub sessions: AtomicU64,
    /// Its session is open now.
    pub connected: AtomicBool,
    /// The coordinator revoked its certificate: it stopped for good.
    pub revoked: AtomicBool,
}

impl Host {
    pub fn new(
        name: String,
        index: usize,
        source: IpAddr,
        tls: ClientConfig,
        b: Behaviour,
    ) -> Host {
        Host {
            state: Mutex::new(SimHost::new(name.clone(), index, b, now_ms())),
            name,
            source,
            tls: Arc::new(tls),
            sessions: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, SimHost> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change of generation or weights this host reported.
    pub fn acks(&self) -> Vec<Ack> {
        self.state().acks().to_vec()
    }

    fn observe(&self, shared: &Shared) -> Vec<ObservedService> {
        self.state().observe(&shared.faults.load(), now_ms())
    }
}

/// How a session ended.
enum Ended {
    /// The coordinator revoked this host's certificate.
    Revoked(String),
    Failed(String),
}

impl From<tonic::Status> for Ended {
    fn from(s: tonic::Status) -> Ended {
        if s.metadata().get(cutover_proto::REVOKED_METADATA).is_some() {
            Ended::Revoked(s.message().to_string())
        } else {
            Ended::Failed(format!("{}: {}", s.code(), s.message()))
        }
    }
}

/// Runs `host`'s link until the fleet is cancelled or its certificate is revoked,
/// reconnecting as the agent does (`link::reconnect_delay`), the doubling started again
/// after a session that lasted 10 s.
pub async fn run(host: Arc<Host>, shared: Arc<Shared>) {
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match session(&host, &shared).await {
            Ok(()) => {}
            Err(Ended::Revoked(why)) => {
                tracing::warn!(host = host.name, why, "certificate revoked; host stopped");
                host.revoked.store(true, Ordering::Relaxed);
                shared.failed(&format!("revoked: {why}"));
                return;
            }
            Err(Ended::Failed(e)) => {
                tracing::debug!(host = host.name, error = e, "coordinator stream");
                shared.failed(&e);
            }
        }
        if host.connected.swap(false, Ordering::Relaxed) {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if shared.cancel.is_cancelled() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        let jitter = unit(&format!("{}/{attempt}/{}", host.name, now_ms()));
        let wait = link::reconnect_delay(attempt, jitter);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One connection, until it ends or the fleet is cancelled.
async fn session(host: &Host, shared: &Shared) -> Result<(), Ended> {
    let channel = connect(shared.coordinator, host.source, host.tls.clone())
        .await
        .map_err(|e| Ended::Failed(cutover_shared::errors::chain(&e)))?;
    let mut client = AgentLinkClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(OUTGOING);
    let mut sent = Sent::default();
    sent.report(shared, &tx, host.observe(shared))?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let mut report = tokio::time::interval(link::REPORT_EVERY);
    let mut beat = tokio::time::interval(link::HEARTBEAT);
    let mut last_heard = Instant::now();
    let mut due: Option<Instant> = None;
    loop {
        let next_change = host.state().next_change(now_ms()).map(at);
        // Unlike the agent's loop, what has arrived is read before the silence check:
        // thousands of hosts share this process's threads, and a host the simulator
        // itself was late to poll must not blame the coordinator for its silence.
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return Ok(()),
            msg = inbound.message() => match msg? {
                Some(m) => {
                    last_heard = Instant::now();
                    opened(host, shared);
                    apply(host, shared, m);
                    due = due.or(Some(Instant::now() + COALESCE));
                }
                None => return Ok(()),
            },
            _ = beat.tick() => heartbeat(&tx, last_heard)?,
            _ = report.tick() => sent.report(shared, &tx, host.observe(shared))?,
            _ = sleep_until(due), if due.is_some() => {
                due = None;
                sent.report(shared, &tx, host.observe(shared))?;
            }
            _ = sleep_until(next_change), if next_change.is_some() => {
                due = due.or(Some(Instant::now() + COALESCE));
            }
        }
    }
}

/// Counts the session as open when its first message arrives.
fn opened(host: &Host, shared: &Shared) {
    if !host.connected.swap(true, Ordering::Relaxed) {
        host.sessions.fetch_add(1, Ordering::Relaxed);
        shared.connected.fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies what the coordinator sent.
fn apply(host: &Host, shared: &Shared, m: CoordinatorMessage) {
    if let Some(coordinator_message::Msg::Desired(d)) = m.msg {
        let faults = shared.faults.load();
        let now = now_ms();
        let mut state = host.state();
        for s in d.services {
            state.apply(s, &faults, now);
        }
        state.applied();
    }
}

/// The tokio instant of unix time `ms`.
fn at(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms()))
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The observed state last sent, and when (as the agent keeps it): a report goes out
/// only when it says something new, or when the last one is `link::REFRESH` old.
#[derive(Default)]
struct Sent {
    state: Option<(Vec<ObservedService>, Instant)>,
}

impl Sent {
    fn report(
        &mut self,
        shared: &Shared,
        tx: &mpsc::Sender<AgentMessage>,
        now: Vec<ObservedService>,
    ) -> Result<(), Ended> {
        if let Some((last, at)) = &self.state
            && *last == now
            && at.elapsed() < link::REFRESH
        {
            return Ok(());
        }
        let m = AgentMessage {
            msg: Some(agent_message::Msg::Observed(Observed {
                services: now.clone(),
            })),
        };
        send(shared, tx, m)?;
        self.state = Some((now, Instant::now()));
        Ok(())
    }
}

/// Queues a message; a full queue means the coordinator stopped reading.
fn send(shared: &Shared, tx: &mpsc::Sender<AgentMessage>, m: AgentMessage) -> Result<(), Ended> {
    tx.try_send(m)
        .map_err(|_| Ended::Failed("outgoing queue full".into()))?;
    let queued = OUTGOING - tx.capacity();
    shared.max_queued.fetch_max(queued, Ordering::Relaxed);
    Ok(())
}

/// Sends a heartbeat, unless the coordinator has been silent too long.
fn heartbeat(tx: &mpsc::Sender<AgentMessage>, last_heard: Instant) -> Result<(), Ended> {
    if last_heard.elapsed() > link::SILENCE_LIMIT {
        return Err(Ended::Failed(format!(
            "no word from the coordinator for {}s",
            link::SILENCE_LIMIT.as_secs()
        )));
    }
    let hb = AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
            unix_ms: now_ms(),
        })),
    };
    let _ = tx.try_send(hb);
    Ok(())
}

/// Opens a gRPC channel to `coordinator` from `source` over mutual TLS, with the
/// agent's connect timeout and HTTP/2 keep-alive.
async fn connect(
    coordinator: SocketAddr,
    source: IpAddr,
    tls: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let server_name = ServerName::IpAddress(coordinator.ip().into());
    let service = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let socket = match source {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let tcp = socket.connect(coordinator).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{coordinator}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(service)
        .await
}
