//! One agent's session, from the moment its stream is accepted: the host's whole desired
//! state goes first, then whatever the engine queues through the [`Fleet`]. What the
//! agent reports (observed state, heartbeats) goes into the fleet. The session ends when
//! the agent's stream ends or it is silent for [`link::SILENCE_LIMIT`], when a newer
//! session of the same host or the host's removal ends it, or when the coordinator stops.

use std::sync::Arc;

use cutover_proto::link;
use cutover_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, agent_message, coordinator_message,
};
use cutover_shared::clock::now_ms;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::fleet::{Fleet, Outbound};

/// How many messages may wait for a slow agent; a full queue closes the session (see
/// [`Fleet::send_desired`]) and the agent gets everything again on reconnect.
const QUEUE: usize = 256;

/// A running session.
struct Session {
    /// The host the agent speaks for, from its certificate.
    host: String,
    /// This session's id in the fleet: a newer session of the same host has another.
    id: u64,
    /// What the agent sends.
    inbound: Streaming<AgentMessage>,
    /// The queue to the agent; the fleet holds a clone to send desired state.
    tx: mpsc::Sender<Outbound>,
    /// Cancelled by the fleet when this session must end (replaced, host removed).
    end: CancellationToken,
    /// Where observed state and liveness go.
    fleet: Arc<Fleet>,
    /// The coordinator's shutdown.
    shutdown: CancellationToken,
}

/// Whether the session goes on after an event.
enum Flow {
    /// Keep reading and beating.
    Continue,
    /// Detach from the fleet and stop.
    End,
}

/// Opens `host`'s session: queues `desired` (the host's whole desired state) as the
/// first message, registers the session in the fleet and runs it in a task. The
/// returned stream is what the agent receives.
pub fn open(
    host: String,
    inbound: Streaming<AgentMessage>,
    desired: Vec<pb::DesiredService>,
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
) -> Result<ReceiverStream<Outbound>, String> {
    let (tx, rx) = mpsc::channel::<Outbound>(QUEUE);
    let first = Box::new(CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Desired(pb::DesiredState {
            services: desired,
        })),
    });
    tx.try_send(first)
        .map_err(|e| format!("queue the host's desired state: {e}"))?;
    let (id, end) = fleet.attach(&host, tx.clone(), now_ms());
    tracing::info!(host, session = id, "agent connected");
    let session = Session {
        host,
        id,
        inbound,
        tx,
        end,
        fleet,
        shutdown,
    };
    tokio::spawn(session.run());
    Ok(ReceiverStream::new(rx))
}

impl Session {
    async fn run(mut self) {
        let mut beat = tokio::time::interval(link::HEARTBEAT);
        let mut last_heard = Instant::now();
        loop {
            let flow = tokio::select! {
                _ = self.shutdown.cancelled() => Flow::End,
                _ = self.end.cancelled() => Flow::End,
                _ = self.tx.closed() => Flow::End,
                _ = beat.tick() => self.beat(last_heard),
                msg = self.inbound.message() => match msg {
                    Ok(Some(m)) => {
                        last_heard = Instant::now();
                        self.heard(m);
                        Flow::Continue
                    }
                    Ok(None) => Flow::End,
                    Err(e) => {
                        tracing::info!(host = self.host, error = %e, "agent stream ended");
                        Flow::End
                    }
                },
            };
            if let Flow::End = flow {
                break;
            }
        }
        self.fleet.detach(&self.host, self.id);
        tracing::info!(host = self.host, session = self.id, "agent disconnected");
    }

    /// Every [`link::HEARTBEAT`]: drop an agent silent too long, else send a heartbeat.
    fn beat(&self, last_heard: Instant) -> Flow {
        if last_heard.elapsed() > link::SILENCE_LIMIT {
            tracing::warn!(host = self.host, "agent silent; dropping its session");
            return Flow::End;
        }
        let hb = Box::new(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Heartbeat(pb::Heartbeat {
                unix_ms: now_ms(),
            })),
        });
        // A full queue is the fleet's to handle; only a closed one ends the session.
        if self.tx.try_send(hb).is_err() && self.tx.is_closed() {
            return Flow::End;
        }
        Flow::Continue
    }

    /// A message from the agent: its observed state, or a heartbeat.
    fn heard(&self, m: AgentMessage) {
        match m.msg {
            Some(agent_message::Msg::Observed(o)) => {
                self.fleet.observe(&self.host, o.services, now_ms())
            }
            Some(agent_message::Msg::Heartbeat(_)) => self.fleet.seen(&self.host, now_ms()),
            Some(agent_message::Msg::LogChunk(c)) => {
                self.fleet.seen(&self.host, now_ms());
                self.fleet.log_chunk(&self.host, c);
            }
            None => {}
        }
    }
}
