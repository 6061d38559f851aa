//! The connected fleet, in memory: one session per host (its outgoing message queue),
//! the latest state each host reported, and a change signal for the engine.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use cutover_proto::link;
use cutover_proto::v1::{
    CoordinatorMessage, DesiredService, DesiredState, ObservedService, coordinator_message,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// A host's open session, as the fleet sees it.
struct Session {
    /// Tells this session from a newer one of the same host (see [`Fleet::detach`]).
    id: u64,
    /// The queue to the agent: desired state goes out on it.
    tx: mpsc::Sender<CoordinatorMessage>,
    /// Ends the session's task (host removed, or replaced by a newer session).
    end: CancellationToken,
}

#[derive(Default)]
struct Inner {
    /// The id of the last session attached.
    next_id: u64,
    /// The open session of each connected host.
    sessions: HashMap<String, Session>,
    /// What each host last reported, per service; kept across reconnects. A report is
    /// the host's whole observed state: a service it leaves out is gone from the host.
    observed: HashMap<String, BTreeMap<String, ObservedService>>,
    /// When each host last reported its observed state (unix ms), so that a service's
    /// absence is read only from a report made after it was removed.
    last_report: HashMap<String, u64>,
    /// When each host was last heard from (unix ms): a stream open but silent is not
    /// counted on.
    last_seen: HashMap<String, u64>,
    /// Sessions that replaced an earlier one, for `/metrics`.
    reconnects: u64,
}

#[derive(Default)]
pub struct Fleet {
    /// Everything above, under one lock: updates are small and never await.
    inner: Mutex<Inner>,
    /// Wakes the engine when something changed.
    changed: Notify,
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated in a way
        // that matters more than stopping would; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session for `host`, replacing (and so ending) any older one.
    /// Returns the session id and a token cancelled when the session must end.
    pub fn attach(
        &self,
        host: &str,
        tx: mpsc::Sender<CoordinatorMessage>,
        now_ms: u64,
    ) -> (u64, CancellationToken) {
        let mut g = self.lock();
        g.next_id += 1;
        let id = g.next_id;
        let end = CancellationToken::new();
        let session = Session {
            id,
            tx,
            end: end.clone(),
        };
        if let Some(old) = g.sessions.insert(host.to_string(), session) {
            old.end.cancel();
            g.reconnects += 1;
        }
        g.last_seen.insert(host.to_string(), now_ms);
        drop(g);
        self.changed.notify_one();
        (id, end)
    }

    /// Ends `host`'s session if it is still `session`.
    pub fn detach(&self, host: &str, session: u64) {
        let mut g = self.lock();
        if g.sessions.get(host).is_some_and(|s| s.id == session) {
            g.sessions.remove(host);
        }
        drop(g);
        self.changed.notify_one();
    }

    /// Drops a host entirely (it was removed).
    pub fn forget(&self, host: &str) {
        let mut g = self.lock();
        if let Some(s) = g.sessions.remove(host) {
            s.end.cancel();
        }
        g.observed.remove(host);
        g.last_report.remove(host);
        drop(g);
        self.changed.notify_one();
    }

    /// Records `host`'s whole observed state.
    pub fn observe(&self, host: &str, services: Vec<ObservedService>, now_ms: u64) {
        let mut g = self.lock();
        let all = services
            .into_iter()
            .map(|s| (s.service.clone(), s))
            .collect();
        g.observed.insert(host.to_string(), all);
        g.last_report.insert(host.to_string(), now_ms);
        g.last_seen.insert(host.to_string(), now_ms);
        drop(g);
        self.changed.notify_one();
    }

    pub fn seen(&self, host: &str, now_ms: u64) {
        self.lock().last_seen.insert(host.to_string(), now_ms);
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.lock()
            .sessions
            .get(host)
            .is_some_and(|s| !s.tx.is_closed())
    }

    /// True when `host` can be counted on at `now`: its stream is open and it was heard
    /// from within [`link::STALE_AFTER`] (a partition closes nothing, so an open stream
    /// alone proves little). Decisions and `hosts` both ask this.
    pub fn reachable(&self, host: &str, now: u64) -> bool {
        let g = self.lock();
        let open = g.sessions.get(host).is_some_and(|s| !s.tx.is_closed());
        let heard = g
            .last_seen
            .get(host)
            .is_some_and(|t| now.saturating_sub(*t) < link::STALE_AFTER.as_millis() as u64);
        open && heard
    }

    pub fn connected_count(&self) -> usize {
        self.lock()
            .sessions
            .values()
            .filter(|s| !s.tx.is_closed())
            .count()
    }

    pub fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// When `host` last reported its observed state.
    pub fn last_report(&self, host: &str) -> Option<u64> {
        self.lock().last_report.get(host).copied()
    }

    pub fn last_seen(&self, host: &str) -> Option<u64> {
        self.lock().last_seen.get(host).copied()
    }

    pub fn observed(&self, host: &str, service: &str) -> Option<ObservedService> {
        self.lock()
            .observed
            .get(host)
            .and_then(|m| m.get(service))
            .cloned()
    }

    pub fn observed_all(&self, host: &str) -> Vec<ObservedService> {
        self.lock()
            .observed
            .get(host)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Queues desired state for `host` if it is connected. A full queue means the host
    /// is not reading: the session is closed and the host gets everything on reconnect.
    pub fn send_desired(&self, host: &str, services: Vec<DesiredService>) {
        let mut g = self.lock();
        let full = g.sessions.get(host).is_some_and(|s| {
            let msg = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Desired(DesiredState { services })),
            };
            s.tx.try_send(msg).is_err()
        });
        if full {
            // Closing the session makes the agent reconnect and receive its whole state.
            if let Some(s) = g.sessions.remove(host) {
                s.end.cancel();
            }
            tracing::warn!(host, "session queue full; closing it so the agent resyncs");
        }
    }

    /// Resolves when something changed (a report, a connect or a disconnect).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
