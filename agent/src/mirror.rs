//! Shadow traffic: copies of live requests sent to a slot that carries no traffic, so
//! a new release is measured on real requests before any client is served by it. The
//! proxy asks [`Mirror::admit`] about each request it routes; the live request is never
//! delayed or failed by its copy:
//!
//! - only requests whose method is listed are copied, `share` percent of them, spread
//!   evenly (request n of the listed ones is copied when (n × 37) mod 100 < share);
//! - only requests whose body is known small are copied: no body, or a
//!   `Content-Length` of at most [`BODY_LIMIT`]. That body is read once and both
//!   requests are sent from it; a body of unknown length (chunked) or a larger one is
//!   not copied (counted as skipped), and the live request streams as usual;
//! - a copy goes to its own task, under a semaphore of [`IN_FLIGHT`] permits: when they
//!   are all taken (the new slot is slow) the copy is dropped and counted, never queued,
//!   and the request is forwarded as if it were not copied (its body is not read first);
//! - a copy has [`COPY_TIMEOUT`] to be answered, body included; past it, it counts as
//!   the new slot's failure, as a live request the slot did not answer does;
//! - the copy's answer is read to its end and thrown away. Its status class is compared
//!   with the live answer's (which the live path hands over once it has it):
//!   `status_match` is the share of copies whose class was the live one's.
//!
//! The copy carries `x-cutover-shadow: 1`, so a service can tell a copy from a client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::proxy::SlotMetrics;

/// The largest request body that is copied; larger ones are skipped.
pub const BODY_LIMIT: u64 = 64 * 1024;
/// Copies in flight at most per service: more are dropped, never queued.
pub const IN_FLIGHT: usize = 128;
/// How long a copy's answer may take, body included; past it, the copy failed.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a finished copy waits for the live answer to compare with.
const LIVE_WAIT: Duration = Duration::from_secs(60);
/// The field that marks a copy.
pub const SHADOW_HEADER: &str = "x-cutover-shadow";

/// What a slot answered to copies of live requests, apart from its live counters.
#[derive(Default, Debug)]
pub struct ShadowMetrics {
    /// The slot's answers to the copies: requests, 5xx, failures, latency.
    pub answers: SlotMetrics,
    /// Copies whose answer and live answer were both known.
    pub compared: AtomicU64,
    /// Of those, copies answered with the live answer's status class.
    pub matched: AtomicU64,
    /// Copies not sent because [`IN_FLIGHT`] copies were under way.
    pub dropped: AtomicU64,
    /// Requests of a listed method not copied: a body too large or of unknown length.
    pub skipped: AtomicU64,
}

impl ShadowMetrics {
    /// The counters as a report carries them; none while nothing was copied.
    pub fn snapshot(&self) -> Option<cutover_proto::v1::SlotMetrics> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let m = cutover_proto::v1::SlotMetrics {
            status_compared: load(&self.compared),
            status_matched: load(&self.matched),
            mirror_dropped: load(&self.dropped),
            mirror_skipped: load(&self.skipped),
            ..self.answers.snapshot()
        };
        let any = m.requests + m.mirror_dropped + m.mirror_skipped > 0;
        any.then_some(m)
    }
}

/// Which requests are copied: the desired state's shadow instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Percent of the requests of a listed method that are copied.
    pub share: u32,
    /// The methods copied.
    pub methods: Vec<Method>,
}

impl Rule {
    /// The rule of a shadow instruction; methods that are not HTTP methods are left
    /// out (plan validation refused them already).
    pub fn of(spec: &cutover_proto::v1::ShadowSpec) -> Rule {
        Rule {
            share: spec.share.min(100),
            methods: spec
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
        }
    }
}

/// Whether one request is copied.
#[derive(Debug)]
pub enum Admission {
    /// Not a listed method, or not in the share: nothing to count.
    Pass,
    /// A listed method in the share, but its body may not be buffered: counted.
    Skip,
    /// In the share, but [`IN_FLIGHT`] copies are under way: counted.
    Dropped,
    /// Copied: its body (at most [`BODY_LIMIT`]) is read first. The copy's place among
    /// those in flight is taken.
    Copy(Place),
}

/// A copy's place among the [`IN_FLIGHT`], held until the slot answered it.
#[derive(Debug)]
pub struct Place(OwnedSemaphorePermit);

/// Copies of live requests to one slot, for as long as the routes name it.
pub struct Mirror {
    /// Which requests are copied.
    pub rule: Rule,
    /// The slot's private port, where copies go.
    pub port: u16,
    /// The slot's shadow counters.
    pub metrics: Arc<ShadowMetrics>,
    /// Requests of a listed method seen: spreads the share evenly.
    seen: AtomicU64,
    /// Copies in flight, at most [`IN_FLIGHT`].
    permits: Arc<Semaphore>,
    /// Its own connections to the slot, apart from the live path's.
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("rule", &self.rule)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    pub fn new(rule: Rule, port: u16, metrics: Arc<ShadowMetrics>) -> Mirror {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(IN_FLIGHT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Mirror {
            rule,
            port,
            metrics,
            seen: AtomicU64::new(0),
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            client,
        }
    }

    /// Whether a request with this method and these fields is copied. Only a listed
    /// method counts towards the share; a skipped or dropped one is counted.
    pub fn admit(&self, method: &Method, headers: &HeaderMap) -> Admission {
        if !self.rule.methods.contains(method) {
            return Admission::Pass;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n.wrapping_mul(37) % 100 >= u64::from(self.rule.share) {
            return Admission::Pass;
        }
        if !small_body(headers) {
            self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
            return Admission::Skip;
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::Copy(Place(permit)),
            Err(_) => {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                Admission::Dropped
            }
        }
    }

    /// Sends a copy of `req` (already aimed at the live slot, its body read into
    /// `body`) to this slot, in the `place` [`Mirror::admit`] gave it. The returned
    /// sender takes the live answer's status (none when the live slot did not answer)
    /// for the comparison; dropping it leaves the copy uncompared.
    pub fn send(
        &self,
        place: Place,
        req: &Request<Full<Bytes>>,
        body: Bytes,
    ) -> Option<LiveAnswer> {
        let Place(permit) = place;
        let copy = self.copy_of(req, body)?;
        let (tx, rx) = oneshot::channel();
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let answer = answer(&client, copy, &metrics).await;
            // The permit is held while the slot answers, not while the live side does.
            drop(permit);
            if let Ok(Ok(live)) = tokio::time::timeout(LIVE_WAIT, rx).await {
                compare(&metrics, answer, live);
            }
        });
        Some(LiveAnswer(tx))
    }

    /// The copy of `req` for this slot: the same method, target, fields and body, with
    /// [`SHADOW_HEADER`]; none when the target makes no URI (cannot happen for a
    /// request the live path could aim).
    fn copy_of(&self, req: &Request<Full<Bytes>>, body: Bytes) -> Option<Request<Full<Bytes>>> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri: hyper::Uri = format!("http://127.0.0.1:{}{pq}", self.port).parse().ok()?;
        let mut copy = Request::new(Full::new(body));
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = uri;
        *copy.headers_mut() = req.headers().clone();
        copy.headers_mut()
            .insert(SHADOW_HEADER, HeaderValue::from_static("1"));
        Some(copy)
    }
}

/// Hands the live answer's status to a copy, for the comparison.
pub struct LiveAnswer(oneshot::Sender<Option<StatusCode>>);

impl LiveAnswer {
    /// The live slot answered with `status` (none: it did not answer).
    pub fn tell(self, status: Option<StatusCode>) {
        let _ = self.0.send(status);
    }
}

/// Reads a request's body, known to be at most [`BODY_LIMIT`], so that it can be sent
/// twice. Fails when the client's body fails (the client's fault, as on the live path).
pub async fn buffer(req: Request<Incoming>) -> Result<(Request<Full<Bytes>>, Bytes), String> {
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(BODY_LIMIT).unwrap_or(usize::MAX);
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((Request::from_parts(parts, Full::new(bytes.clone())), bytes))
}

/// A body known small: none at all, or a `Content-Length` within [`BODY_LIMIT`].
fn small_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => true,
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n <= BODY_LIMIT),
        (Some(_), Some(_)) => false,
    }
}

/// Sends the copy and reads its answer to the end within [`COPY_TIMEOUT`]; counts it.
/// Returns its status (none: no answer in time).
async fn answer(
    client: &Client<HttpConnector, Full<Bytes>>,
    copy: Request<Full<Bytes>>,
    metrics: &ShadowMetrics,
) -> Option<StatusCode> {
    let started = Instant::now();
    let exchange = async {
        let resp = client.request(copy).await.ok()?;
        let status = resp.status();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    let status = tokio::time::timeout(COPY_TIMEOUT, exchange)
        .await
        .ok()
        .flatten();
    metrics.answers.observe(started.elapsed(), status);
    status
}

/// Counts the comparison of a copy's answer with the live one; nothing when the live
/// slot did not answer either (there is nothing to compare the copy with).
fn compare(metrics: &ShadowMetrics, copy: Option<StatusCode>, live: Option<StatusCode>) {
    let Some(live) = live else { return };
    metrics.compared.fetch_add(1, Ordering::Relaxed);
    if copy.is_some_and(|c| same_class(c, live)) {
        metrics.matched.fetch_add(1, Ordering::Relaxed);
    }
}

/// Both statuses are of one class: 2xx, 3xx, 4xx or 5xx.
fn same_class(a: StatusCode, b: StatusCode) -> bool {
    a.as_u16() / 100 == b.as_u16() / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(share: u32, methods: &[&str]) -> Mirror {
        let rule = Rule::of(&cutover_proto::v1::ShadowSpec {
            slot: "green".into(),
            share,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        });
        Mirror::new(rule, 1, Arc::default())
    }

    fn copied(a: Admission) -> bool {
        matches!(a, Admission::Copy(_))
    }

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_listed_methods_are_copied() {
        let m = mirror(100, &["GET", "HEAD"]);
        let none = HeaderMap::new();
        assert!(copied(m.admit(&Method::GET, &none)));
        assert!(copied(m.admit(&Method::HEAD, &none)));
        assert!(matches!(m.admit(&Method::POST, &none), Admission::Pass));
        assert!(matches!(m.admit(&Method::DELETE, &none), Admission::Pass));
        let posts = mirror(100, &["POST"]);
        assert!(copied(posts.admit(&Method::POST, &none)));
        assert!(matches!(posts.admit(&Method::GET, &none), Admission::Pass));
    }

    #[test]
    fn the_share_is_exact_and_spread_over_the_listed_requests() {
        for share in [1u32, 10, 33, 50, 100] {
            let m = mirror(share, &["GET"]);
            let none = HeaderMap::new();
            let mut copied = Vec::new();
            for i in 0..1000 {
                // Other methods in between do not move the share.
                assert!(matches!(m.admit(&Method::PUT, &none), Admission::Pass));
                if self::copied(m.admit(&Method::GET, &none)) {
                    copied.push(i);
                }
            }
            assert_eq!(copied.len() as u32, share * 10, "share {share}");
            if share == 50 {
                let runs = copied.windows(2).filter(|w| w[1] == w[0] + 1).count();
                assert!(runs < 400, "copies bunched: {runs} consecutive pairs");
            }
        }
    }

    #[test]
    fn only_bodies_known_small_are_copied_and_the_others_are_counted() {
        let m = mirror(100, &["POST"]);
        let small = headers(&[("content-length", "65536")]);
        assert!(copied(m.admit(&Method::POST, &small)));
        let skipped = |h: &HeaderMap| matches!(m.admit(&Method::POST, h), Admission::Skip);
        assert!(skipped(&headers(&[("content-length", "65537")])));
        assert!(skipped(&headers(&[("transfer-encoding", "chunked")])));
        assert!(skipped(&headers(&[("content-length", "ten")])));
        assert!(skipped(&headers(&[
            ("content-length", "5"),
            ("content-length", "5")
        ])));
        assert_eq!(m.metrics.skipped.load(Ordering::Relaxed), 4);
        assert_eq!(m.metrics.snapshot().map(|s| s.mirror_skipped), Some(4));
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_copy_and_counts_it() {
        // Nothing answers on the slot's port for the copies: accepted and held.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                open.push(s);
            }
        });
        let m = Mirror::new(
            Rule {
                share: 100,
                methods: vec![Method::GET],
            },
            port,
            Arc::default(),
        );
        let req = Request::get("http://127.0.0.1:1/a?b=c")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let none = HeaderMap::new();
        let mut sent = Vec::new();
        for _ in 0..IN_FLIGHT + 5 {
            match m.admit(&Method::GET, &none) {
                Admission::Copy(place) => sent.extend(m.send(place, &req, Bytes::new())),
                Admission::Dropped => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sent.len(), IN_FLIGHT);
        assert_eq!(m.metrics.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(m.metrics.snapshot().map(|s| s.mirror_dropped), Some(5));
        held.abort();
    }

    #[test]
    fn status_match_compares_status_classes_with_the_live_answer() {
        let m = ShadowMetrics::default();
        compare(&m, Some(StatusCode::OK), Some(StatusCode::NO_CONTENT));
        compare(&m, Some(StatusCode::NOT_FOUND), Some(StatusCode::OK));
        compare(&m, None, Some(StatusCode::OK));
        compare(
            &m,
            Some(StatusCode::BAD_GATEWAY),
            Some(StatusCode::SERVICE_UNAVAILABLE),
        );
        compare(&m, Some(StatusCode::OK), None);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!((load(&m.compared), load(&m.matched)), (4, 2));
    }
}
