//! The connected fleet, in memory: one session per host (its outgoing message queue),
//! the latest state each host reported, a change signal for the engine, and where the
//! hosts' answers to `cutover logs` requests go (one bounded queue per client: a full
//! one ends that host's answer, so a slow reader never holds up a session).
//!
//! The engine is woken only by a change a decision reads: a host attached, detached or
//! heard from again after going stale, or a report that differs from the last one in
//! more than its counters. Such hosts are collected ([`Fleet::take_changed`]) so the
//! engine decides only the deployments they belong to; counters alone are read by the
//! engine's own clock (analysis intervals), from the latest report kept here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cutover_proto::link;
use cutover_proto::v1::{
    CoordinatorMessage, DesiredService, DesiredState, LogCancel, LogChunk, LogLine, LogRequest,
    ObservedService, SlotMetrics, SlotScrape, coordinator_message,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// A message on a session's queue to its agent. Boxed: the queue allocates its slots 32
/// at a time, one block per session from the start, and a message inline (the largest
/// variant, a log request, sized every slot) made that block several KiB for each
/// connected host.
pub type Outbound = Box<CoordinatorMessage>;

/// A host's open session, as the fleet sees it.
struct Session {
    /// Tells this session from a newer one of the same host (see [`Fleet::detach`]).
    id: u64,
    /// The queue to the agent: desired state goes out on it.
    tx: mpsc::Sender<Outbound>,
    /// Ends the session's task (host removed, or replaced by a newer session).
    end: CancellationToken,
}

/// Part of a host's answer to a `cutover logs` request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogPart {
    /// The host answering.
    pub host: String,
    /// Its lines.
    pub lines: Vec<LogLine>,
    /// Why its answer ended early, if it did.
    pub error: String,
    /// Its answer is complete.
    pub end: bool,
}

/// Where one host's answer to one log request goes.
struct LogSink {
    /// The host asked: only its agent may answer.
    host: String,
    /// The client's queue (shared by the hosts it asked).
    tx: mpsc::Sender<LogPart>,
    /// Set when the client's queue was full and an answer had to end: the client's
    /// stream ends saying so.
    lagged: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    /// The id of the last session attached.
    next_id: u64,
    /// The open session of each connected host.
    sessions: HashMap<String, Session>,
    /// What each host last reported, per service; kept across reconnects. A report is
    /// the host's whole observed state: a service it leaves out is gone from the host.
    observed: HashMap<String, BTreeMap<String, Arc<ObservedService>>>,
    /// When each host last reported its observed state (unix ms), so that a service's
    /// absence is read only from a report made after it was removed.
    last_report: HashMap<String, u64>,
    /// When each host was last heard from (unix ms): a stream open but silent is not
    /// counted on.
    last_seen: HashMap<String, u64>,
    /// Hosts whose state changed in a way decisions read since the engine last took
    /// them.
    changed: HashSet<String>,
    /// Sessions that replaced an earlier one, for `/metrics`.
    reconnects: u64,
    /// Log requests out on the hosts, by request id.
    log_sinks: HashMap<u64, LogSink>,
    /// The id of the last log request.
    next_log: u64,
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
        tx: mpsc::Sender<Outbound>,
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
        g.changed.insert(host.to_string());
        drop(g);
        self.changed.notify_one();
        (id, end)
    }

    /// Ends `host`'s session if it is still `session`; its log requests end with it.
    pub fn detach(&self, host: &str, session: u64) {
        let mut g = self.lock();
        if g.sessions.get(host).is_some_and(|s| s.id == session) {
            g.sessions.remove(host);
            end_logs(&mut g, host, "the host disconnected");
        }
        g.changed.insert(host.to_string());
        drop(g);
        self.changed.notify_one();
    }

    /// Drops a host entirely (it was removed).
    pub fn forget(&self, host: &str) {
        let mut g = self.lock();
        if let Some(s) = g.sessions.remove(host) {
            s.end.cancel();
        }
        end_logs(&mut g, host, "the host was removed");
        g.observed.remove(host);
        g.last_report.remove(host);
        g.changed.insert(host.to_string());
        drop(g);
        self.changed.notify_one();
    }

    /// Records `host`'s whole observed state. The engine is woken only when it differs
    /// from the last report in more than counters, or the host comes back from silence.
    pub fn observe(&self, host: &str, services: Vec<ObservedService>, now_ms: u64) {
        let mut g = self.lock();
        let stale = is_stale(&g, host, now_ms);
        let mut before = g.observed.remove(host).unwrap_or_default();
        let mut differs = before.len() != services.len();
        let mut all = BTreeMap::new();
        for mut s in services {
            differs |= before
                .remove(&s.service)
                .is_none_or(|b| !same_but_counters(b, &mut s));
            all.insert(s.service.clone(), Arc::new(s));
        }
        g.observed.insert(host.to_string(), all);
        g.last_report.insert(host.to_string(), now_ms);
        g.last_seen.insert(host.to_string(), now_ms);
        if differs || stale {
            g.changed.insert(host.to_string());
            drop(g);
            self.changed.notify_one();
        }
    }

    /// `host` was heard from (a heartbeat or a log chunk). Coming back from silence is
    /// a change decisions read (see [`Fleet::reachable`]).
    pub fn seen(&self, host: &str, now_ms: u64) {
        let mut g = self.lock();
        let stale = is_stale(&g, host, now_ms);
        g.last_seen.insert(host.to_string(), now_ms);
        if stale {
            g.changed.insert(host.to_string());
            drop(g);
            self.changed.notify_one();
        }
    }

    /// The hosts whose state changed in a way decisions read since the last call.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(&mut self.lock().changed)
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
        reachable(&self.lock(), host, now)
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

    pub fn observed(&self, host: &str, service: &str) -> Option<Arc<ObservedService>> {
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
            .map(|m| m.values().map(|o| o.as_ref().clone()).collect())
            .unwrap_or_default()
    }

    /// What a decision reads of each of `hosts` about `service` at `now`, under one
    /// lock: reachable (see [`Fleet::reachable`]), when last heard from, the latest
    /// report.
    pub fn views<'h>(
        &self,
        hosts: impl Iterator<Item = &'h String>,
        service: &str,
        now: u64,
    ) -> Vec<HostState> {
        let g = self.lock();
        hosts
            .map(|h| HostState {
                reachable: reachable(&g, h, now),
                last_seen: g.last_seen.get(h).copied(),
                observed: g.observed.get(h).and_then(|m| m.get(service)).cloned(),
            })
            .collect()
    }

    /// Queues desired state for `host` if it is connected. A full queue means the host
    /// is not reading: the session is closed and the host gets everything on reconnect.
    pub fn send_desired(&self, host: &str, services: Vec<DesiredService>) {
        let mut g = self.lock();
        let full = g.sessions.get(host).is_some_and(|s| {
            let msg = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Desired(DesiredState { services })),
            };
            s.tx.try_send(Box::new(msg)).is_err()
        });
        if full {
            // Closing the session makes the agent reconnect and receive its whole state.
            if let Some(s) = g.sessions.remove(host) {
                s.end.cancel();
            }
            tracing::warn!(host, "session queue full; closing it so the agent resyncs");
        }
    }

    /// Asks `host` for log lines (`req`, its id set here); its answer goes to `tx`. The
    /// request's id, or why the host cannot be asked.
    pub fn open_logs(
        &self,
        host: &str,
        mut req: LogRequest,
        tx: mpsc::Sender<LogPart>,
        lagged: Arc<AtomicBool>,
    ) -> Result<u64, String> {
        let mut g = self.lock();
        g.next_log += 1;
        let id = g.next_log;
        req.id = id;
        let Some(s) = g.sessions.get(host).filter(|s| !s.tx.is_closed()) else {
            return Err("not connected".into());
        };
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::LogRequest(req)),
        };
        if s.tx.try_send(Box::new(msg)).is_err() {
            return Err("its session is busy; try again".into());
        }
        let sink = LogSink {
            host: host.to_string(),
            tx,
            lagged,
        };
        g.log_sinks.insert(id, sink);
        Ok(id)
    }

    /// Hands a chunk of `host`'s answer to its client. A full client queue ends that
    /// answer (the agent is told to stop); a chunk nobody waits for stops its request.
    pub fn log_chunk(&self, host: &str, chunk: LogChunk) {
        let mut g = self.lock();
        let id = chunk.id;
        let Some(sink) = g.log_sinks.get(&id).filter(|s| s.host == host) else {
            cancel_log(&g, host, id);
            return;
        };
        let part = LogPart {
            host: host.to_string(),
            lines: chunk.lines,
            error: chunk.error,
            end: chunk.end,
        };
        match sink.tx.try_send(part) {
            Ok(()) if !chunk.end => return,
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                sink.lagged.store(true, Ordering::Relaxed);
                tracing::warn!(host, id, "log reader too slow; its stream ends");
                cancel_log(&g, host, id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => cancel_log(&g, host, id),
        }
        g.log_sinks.remove(&id);
    }

    /// The client of log requests `ids` went away: the hosts are told to stop.
    pub fn close_logs(&self, ids: &[u64]) {
        let mut g = self.lock();
        for id in ids {
            if let Some(sink) = g.log_sinks.remove(id) {
                cancel_log(&g, &sink.host, *id);
            }
        }
    }

    /// Log requests out on the hosts, for `/metrics`.
    pub fn log_streams(&self) -> usize {
        self.lock().log_sinks.len()
    }

    /// Resolves when something changed (a report, a connect or a disconnect).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// What a decision reads of one host (see [`Fleet::views`]).
pub struct HostState {
    pub reachable: bool,
    pub last_seen: Option<u64>,
    pub observed: Option<Arc<ObservedService>>,
}

/// See [`Fleet::reachable`].
fn reachable(g: &Inner, host: &str, now: u64) -> bool {
    let open = g.sessions.get(host).is_some_and(|s| !s.tx.is_closed());
    open && !is_stale(g, host, now)
}

/// `host` was not heard from within [`link::STALE_AFTER`] of `now`.
fn is_stale(g: &Inner, host: &str, now: u64) -> bool {
    g.last_seen
        .get(host)
        .is_none_or(|t| now.saturating_sub(*t) >= link::STALE_AFTER.as_millis() as u64)
}

/// Whether `new` says what `old` said, counters and scrapes aside (those are read when
/// an analysis interval ends, not on arrival). `new`'s are taken out for the comparison
/// and put back; `old` is the report `new` replaces.
fn same_but_counters(old: Arc<ObservedService>, new: &mut ObservedService) -> bool {
    let mut old = Arc::unwrap_or_clone(old);
    take_counters(&mut old);
    let taken = take_counters(new);
    let same = old == *new;
    for (st, (metrics, scrape)) in [new.blue.as_mut(), new.green.as_mut()]
        .into_iter()
        .zip(taken)
    {
        if let Some(st) = st {
            st.metrics = metrics;
            st.scrape = scrape;
        }
    }
    same
}

/// Takes the counters and scrapes out of both slots of `o` (blue, green).
fn take_counters(o: &mut ObservedService) -> [(Option<SlotMetrics>, Option<SlotScrape>); 2] {
    [o.blue.as_mut(), o.green.as_mut()].map(|st| match st {
        Some(st) => (st.metrics.take(), st.scrape.take()),
        None => (None, None),
    })
}

/// Tells `host` to stop answering log request `id`, if it can be told.
fn cancel_log(g: &Inner, host: &str, id: u64) {
    if let Some(s) = g.sessions.get(host) {
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::LogCancel(LogCancel { id })),
        };
        // A full queue drops the cancel: the host's chunks for an unknown id are
        // answered with another one.
        let _ = s.tx.try_send(Box::new(msg));
    }
}

/// Ends every log request of `host`, telling each client `why`.
fn end_logs(g: &mut Inner, host: &str, why: &str) {
    let ids: Vec<u64> = g
        .log_sinks
        .iter()
        .filter(|(_, s)| s.host == host)
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        if let Some(sink) = g.log_sinks.remove(&id) {
            let _ = sink.tx.try_send(LogPart {
                host: host.to_string(),
                error: why.to_string(),
                end: true,
                ..LogPart::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: u64, line: &str, end: bool) -> LogChunk {
        LogChunk {
            id,
            lines: vec![LogLine {
                line: line.into(),
                ..Default::default()
            }],
            end,
            error: String::new(),
        }
    }

    /// What the session queue of a host holds: the log requests and cancels.
    fn sent(rx: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m.msg {
                Some(coordinator_message::Msg::LogRequest(r)) => {
                    out.push(format!("request {}", r.id))
                }
                Some(coordinator_message::Msg::LogCancel(c)) => {
                    out.push(format!("cancel {}", c.id))
                }
                _ => {}
            }
        }
        out
    }

    fn report(requests: u64, phase: cutover_proto::v1::SlotPhase) -> ObservedService {
        ObservedService {
            service: "s".into(),
            generation: 1,
            blue: Some(cutover_proto::v1::SlotStatus {
                phase: phase as i32,
                metrics: Some(SlotMetrics {
                    requests,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            blue_weight: 100,
            ..Default::default()
        }
    }

    #[test]
    fn only_what_decisions_read_wakes_the_engine_and_counters_stay_fresh() {
        use cutover_proto::v1::SlotPhase::{Healthy, Unhealthy};
        let fleet = Fleet::default();
        let (stx, _srx) = mpsc::channel(8);
        fleet.attach("a", stx, 1_000);
        let changed = |f: &Fleet| f.take_changed().into_iter().collect::<Vec<_>>();
        assert_eq!(changed(&fleet), ["a"], "a host attached");
        assert!(changed(&fleet).is_empty(), "taken");
        fleet.observe("a", vec![report(1, Healthy)], 1_100);
        assert_eq!(changed(&fleet), ["a"], "its first report");
        fleet.observe("a", vec![report(5, Healthy)], 1_200);
        assert!(changed(&fleet).is_empty(), "counters alone");
        let kept = fleet.observed("a", "s").unwrap();
        assert_eq!(
            kept.blue
                .as_ref()
                .unwrap()
                .metrics
                .as_ref()
                .unwrap()
                .requests,
            5
        );
        fleet.observe("a", vec![report(6, Unhealthy)], 1_300);
        assert_eq!(changed(&fleet), ["a"], "a slot turned unhealthy");
        fleet.observe("a", vec![report(6, Unhealthy)], 1_400);
        assert!(changed(&fleet).is_empty(), "the same again");
        fleet.seen("a", 3_000);
        assert!(changed(&fleet).is_empty(), "a heartbeat in time");
        assert!(!fleet.reachable("a", 6_500), "silent for 3.5 s");
        fleet.seen("a", 6_500);
        assert_eq!(changed(&fleet), ["a"], "heard from again after silence");
        assert!(fleet.reachable("a", 6_600));
        fleet.observe("a", vec![], 6_700);
        assert_eq!(changed(&fleet), ["a"], "the service is gone");
    }

    #[test]
    fn a_log_answer_goes_to_its_client_and_ends_with_it() {
        let fleet = Fleet::default();
        let (stx, mut srx) = mpsc::channel(8);
        fleet.attach("a", stx, 1);
        let (tx, mut rx) = mpsc::channel(8);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = fleet
            .open_logs("a", LogRequest::default(), tx, lagged.clone())
            .unwrap();
        assert_eq!(sent(&mut srx), [format!("request {id}")]);
        assert_eq!(fleet.log_streams(), 1);
        fleet.log_chunk("b", chunk(id, "forged", false));
        fleet.log_chunk("a", chunk(id, "one", false));
        fleet.log_chunk("a", chunk(id, "two", true));
        let lines: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|p| p.lines)
            .map(|l| l.line)
            .collect();
        assert_eq!(lines, ["one", "two"], "only host a answers its request");
        assert_eq!(fleet.log_streams(), 0, "ended");
        fleet.log_chunk("a", chunk(id, "late", false));
        assert_eq!(
            sent(&mut srx),
            [format!("cancel {id}")],
            "a stray chunk stops its request"
        );
        assert!(!lagged.load(Ordering::Relaxed));
        assert!(
            fleet
                .open_logs("z", LogRequest::default(), mpsc::channel(1).0, lagged)
                .is_err(),
            "not connected"
        );
    }

    #[test]
    fn a_slow_reader_ends_its_own_answer_and_a_gone_host_ends_its_answers() {
        let fleet = Fleet::default();
        let (stx, mut srx) = mpsc::channel(8);
        fleet.attach("a", stx, 1);
        let (tx, _rx) = mpsc::channel(1);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = fleet
            .open_logs("a", LogRequest::default(), tx, lagged.clone())
            .unwrap();
        fleet.log_chunk("a", chunk(id, "one", false));
        fleet.log_chunk("a", chunk(id, "two", false));
        assert!(
            lagged.load(Ordering::Relaxed),
            "the client's queue was full"
        );
        assert_eq!(fleet.log_streams(), 0);
        assert_eq!(
            sent(&mut srx),
            [format!("request {id}"), format!("cancel {id}")]
        );

        let (tx, mut rx) = mpsc::channel(4);
        let (stx, _srx) = mpsc::channel(8);
        let (session, _) = fleet.attach("b", stx, 2);
        fleet
            .open_logs("b", LogRequest::default(), tx, Arc::default())
            .unwrap();
        fleet.detach("b", session);
        let last = rx.try_recv().unwrap();
        assert_eq!(
            (last.end, last.error.as_str()),
            (true, "the host disconnected")
        );
        assert_eq!(fleet.log_streams(), 0);
    }
}
