//! `Control.Logs`: `cutover logs`, a server stream. The request goes to each host it
//! names on that host's session ([`crate::fleet::Fleet::open_logs`]); the hosts' chunks
//! come back into one bounded queue per client, which a relay task forwards to the
//! client. When the client goes away (Ctrl-C), the coordinator stops, or every host
//! has answered, the relay ends and the hosts are told to stop. A client too slow to
//! keep up ends its own stream, never a session.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cutover_proto::v1 as pb;
use cutover_shared::names::check_label;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::Api;
use crate::fleet::{Fleet, LogPart};
use crate::queries;

/// What the client reads.
pub type LogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogsResponse, Status>> + Send>>;

/// Parts of the hosts' answers waiting for the relay; a full queue ends the answer that
/// found it full.
const CLIENT_QUEUE: usize = 64;
/// Responses waiting for the client to read them.
const OUT_QUEUE: usize = 4;
/// How often the relay looks whether an answer ended for a slow reader.
const LAG_CHECK: Duration = Duration::from_millis(500);

/// `cutover logs`.
pub async fn logs(
    api: &Api,
    req: Request<pb::LogsRequest>,
) -> Result<Response<LogsStream>, Status> {
    let s = &api.0;
    let r = req.into_inner();
    if r.service.is_empty() && r.deployment.is_empty() {
        return Err(Status::invalid_argument(
            "name a service, or a deployment with --deployment",
        ));
    }
    let labels: BTreeMap<String, String> = r.labels.clone().into_iter().collect();
    for (k, v) in &labels {
        check_label(k, v).map_err(|m| Status::invalid_argument(format!("--labels: {m}")))?;
    }
    let hosts = queries::log_hosts(&s.store, &r.service, &r.deployment, &r.host, &labels)?;
    let ask = pb::LogRequest {
        id: 0,
        service: r.service,
        slot: r.slot,
        release: r.release,
        lines: r.lines,
        follow: r.follow,
        since_unix_ms: r.since_unix_ms,
        deployment: r.deployment,
    };
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    let lagged = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    let mut unanswered = Vec::new();
    for h in hosts {
        match s
            .fleet
            .open_logs(&h, ask.clone(), tx.clone(), lagged.clone())
        {
            Ok(id) => ids.push(id),
            Err(error) => unanswered.push(LogPart {
                host: h,
                error,
                end: true,
                ..LogPart::default()
            }),
        }
    }
    drop(tx);
    let (out, client) = mpsc::channel(OUT_QUEUE);
    let relay = Relay {
        fleet: s.fleet.clone(),
        ids,
        rx,
        out,
        lagged,
    };
    tokio::spawn(relay.run(unanswered, s.cancel.clone()));
    Ok(Response::new(Box::pin(ReceiverStream::new(client))))
}

/// Forwards the hosts' answers to one client.
struct Relay {
    /// Where the requests are out.
    fleet: Arc<Fleet>,
    /// The requests, one per host asked.
    ids: Vec<u64>,
    /// The hosts' answers; closed once every answer ended.
    rx: mpsc::Receiver<LogPart>,
    /// What the client reads.
    out: mpsc::Sender<Result<pb::LogsResponse, Status>>,
    /// An answer ended because the client did not keep up.
    lagged: Arc<AtomicBool>,
}

impl Relay {
    async fn run(mut self, first: Vec<LogPart>, shutdown: CancellationToken) {
        for p in first {
            if self.out.send(Ok(response(p))).await.is_err() {
                return self.close();
            }
        }
        let mut check = tokio::time::interval(LAG_CHECK);
        loop {
            let part = tokio::select! {
                _ = self.out.closed() => break,
                _ = shutdown.cancelled() => break,
                _ = check.tick() => {
                    if self.lagged.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                part = self.rx.recv() => part,
            };
            let Some(part) = part else { break };
            if self.out.send(Ok(response(part))).await.is_err() {
                break;
            }
        }
        if self.lagged.load(Ordering::Relaxed) {
            let _ = self.out.try_send(Err(Status::resource_exhausted(
                "the log stream ended: lines came faster than this client read them",
            )));
        }
        self.close();
    }

    /// The hosts still answering are told to stop.
    fn close(self) {
        self.fleet.close_logs(&self.ids);
    }
}

fn response(p: LogPart) -> pb::LogsResponse {
    pb::LogsResponse {
        host: p.host,
        lines: p.lines,
        error: p.error,
    }
}
