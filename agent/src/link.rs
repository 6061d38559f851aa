//! The agent's one long-lived stream to the coordinator: it sends the host's observed
//! state on change (at once when slots, weights or errors change; counters at most every
//! second while they grow; all of it at least every [`link::REFRESH`]), a heartbeat every
//! [`link::HEARTBEAT`], and applies the desired state it receives. It reconnects for
//! ever, waiting [`link::reconnect_delay`] (doubling up to a few seconds, jittered); a
//! reconnect resends both sides' whole state, so nothing is lost or doubled.
//! The one refusal it does not retry is a revoked certificate: the host was removed, or
//! enrolled again elsewhere, and only a new join can bring it back. `cutover logs`
//! requests come on the same stream and are answered by [`crate::logs`] on a queue of
//! their own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::link;
use cutover_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Observed, ObservedService,
    agent_link_client::AgentLinkClient, agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::identity::{self, Identity};
use crate::logs;
use crate::service::Services;

/// The coordinator revoked this host's certificate; its words say why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostRevoked(pub String);

/// How often the certificate's remaining lifetime is checked.
const RENEWAL_CHECK: Duration = Duration::from_secs(1);
/// How long a burst of changes is gathered into one report.
const COALESCE: Duration = Duration::from_millis(20);
/// Messages queued for the coordinator before the session is given up as stuck.
const OUTGOING: usize = 64;
/// Log chunks queued for the coordinator: a reader that is slower than this waits
/// alone (its request's task waits), never the observed state.
const LOG_QUEUE: usize = 16;

/// How a session ended.
enum Ended {
    /// The coordinator revoked this host's certificate: retrying cannot help.
    Revoked(String),
    Failed(String),
}

impl From<String> for Ended {
    fn from(e: String) -> Ended {
        Ended::Failed(e)
    }
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

/// Runs the link until `cancel`, or until the coordinator says this host's certificate
/// is revoked. The identity is read from `data_dir` before every connection, so a
/// renewed certificate is used from the next connection on.
pub async fn run(
    data_dir: PathBuf,
    services: Arc<Services>,
    cancel: CancellationToken,
) -> Result<(), HostRevoked> {
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match Identity::load(&data_dir) {
            Ok(identity) => match session(&data_dir, &identity, &services, &cancel).await {
                Ok(()) => tracing::info!("coordinator stream closed"),
                Err(Ended::Revoked(why)) => return Err(HostRevoked(why)),
                Err(Ended::Failed(e)) => {
                    tracing::warn!(coordinator = identity.coordinator, error = %e, "coordinator stream")
                }
            },
            Err(e) => tracing::error!(error = format!("{e:#}"), "read the agent's identity"),
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
        // A session that lasted starts the doubling again.
        if started.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        let wait = link::reconnect_delay(attempt, rand::random());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One connection to the coordinator, until it ends or `cancel`.
async fn session(
    data_dir: &Path,
    identity: &Identity,
    services: &Services,
    cancel: &CancellationToken,
) -> Result<(), Ended> {
    let Open {
        channel,
        tx,
        mut inbound,
        logs,
        mut sent,
    } = open(identity, services).await?;
    let mut report = tokio::time::interval(link::REPORT_EVERY);
    let mut renewal = tokio::time::interval(RENEWAL_CHECK);
    let mut renewed = false;
    let mut beat = tokio::time::interval(link::HEARTBEAT);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = services.changed.notified() => {
                // Coalesce bursts of changes into one report.
                tokio::time::sleep(COALESCE).await;
                sent.report(&tx, services.observe().await)?;
            }
            _ = report.tick() => {
                services.maintain().await;
                sent.report(&tx, services.observe().await)?;
            }
            _ = renewal.tick(), if !renewed && identity.renewal_due(cutover_shared::clock::now_ms()) => {
                renewed = renew(data_dir, identity, &channel).await;
            }
            _ = beat.tick() => heartbeat(&tx, last_heard)?,
            msg = inbound.message() => match msg? {
                Some(m) => {
                    last_heard = Instant::now();
                    apply(services, &logs, m).await;
                }
                None => return Ok(()),
            },
        }
    }
}

/// An open session.
struct Open {
    /// The connection, also used to renew the certificate.
    channel: tonic::transport::Channel,
    /// What the agent sends: observed state and heartbeats.
    tx: mpsc::Sender<AgentMessage>,
    /// What the coordinator sends: desired state, heartbeats and log requests.
    inbound: tonic::Streaming<CoordinatorMessage>,
    /// The session's log requests; they end with it.
    logs: logs::Requests,
    /// The observed state it opened with.
    sent: Sent,
}

/// Connects with the host's certificate and opens the stream, the whole observed state
/// first.
async fn open(identity: &Identity, services: &Services) -> Result<Open, Ended> {
    let cfg =
        cutover_proto::tls::client_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
            .map_err(|e| e.to_string())?;
    let channel = cutover_proto::tls::connect(&identity.coordinator, cfg)
        .await
        .map_err(|e| cutover_shared::errors::chain(&e))?;
    let mut client = AgentLinkClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<AgentMessage>(OUTGOING);
    let (log_tx, log_rx) = mpsc::channel::<AgentMessage>(LOG_QUEUE);
    let first = services.observe().await;
    tx.send(observed(first.clone()))
        .await
        .map_err(|e| e.to_string())?;
    // Two queues, taken in turn: log lines never hold up observed state.
    let outgoing = ReceiverStream::new(rx).merge(ReceiverStream::new(log_rx));
    let inbound = client.session(outgoing).await?.into_inner();
    tracing::info!(
        coordinator = identity.coordinator,
        host = identity.name,
        "connected to coordinator"
    );
    Ok(Open {
        channel,
        tx,
        inbound,
        logs: logs::Requests::new(log_tx, services.log_marks.clone()),
        sent: Sent::new(first),
    })
}

fn observed(services: Vec<ObservedService>) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Observed(Observed { services })),
    }
}

/// The observed state last sent, and when: a report goes out only when it says
/// something new, or when the last one is [`link::REFRESH`] old.
struct Sent {
    state: Vec<ObservedService>,
    at: Instant,
}

impl Sent {
    /// What the session opened with.
    fn new(state: Vec<ObservedService>) -> Sent {
        Sent {
            state,
            at: Instant::now(),
        }
    }

    /// Queues `now` if it differs from what was sent last, or that is old; a full
    /// queue means the coordinator stopped reading.
    fn report(
        &mut self,
        tx: &mpsc::Sender<AgentMessage>,
        now: Vec<ObservedService>,
    ) -> Result<(), Ended> {
        if now == self.state && self.at.elapsed() < link::REFRESH {
            return Ok(());
        }
        tx.try_send(observed(now.clone()))
            .map_err(|_| Ended::Failed("outgoing queue full".into()))?;
        *self = Sent::new(now);
        Ok(())
    }
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
            unix_ms: cutover_shared::clock::now_ms(),
        })),
    };
    let _ = tx.try_send(hb);
    Ok(())
}

/// Renews the certificate; true once it is renewed (the next connection uses it).
async fn renew(data_dir: &Path, identity: &Identity, channel: &tonic::transport::Channel) -> bool {
    match identity::renew(data_dir, identity, channel.clone()).await {
        Ok(()) => {
            tracing::info!("certificate renewed; the next connection uses it");
            true
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "certificate renewal failed; will retry"
            );
            false
        }
    }
}

/// Applies what the coordinator sent.
async fn apply(services: &Services, logs: &logs::Requests, m: CoordinatorMessage) {
    match m.msg {
        Some(coordinator_message::Msg::Desired(d)) => {
            for s in d.services {
                services.apply(s).await;
            }
        }
        Some(coordinator_message::Msg::LogRequest(r)) => {
            let sources = services.log_sources(&r).await;
            logs.start(r, sources);
        }
        Some(coordinator_message::Msg::LogCancel(c)) => logs.cancel(c.id),
        Some(coordinator_message::Msg::Heartbeat(_)) | None => {}
    }
}
