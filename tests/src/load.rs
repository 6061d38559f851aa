//! Client load: keep-alive HTTP clients against the hosts' public ports, as a real
//! client pool would send, counting what was served (by the release that answered), what
//! failed and why, and the slowest request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;

/// How many failures [`LoadReport`] keeps the text of: enough to see what went wrong.
const ERRORS_KEPT: usize = 20;

/// How many request latencies [`LoadReport`] keeps for its percentiles (the first ones).
const LATENCIES_KEPT: usize = 2_000_000;

/// Requests sent on one connection before a client opens another, like a pool recycling
/// its connections.
const REQUESTS_PER_CONNECTION: usize = 200;

/// Client load: keep-alive HTTP requests against every address, counting outcomes.
pub struct Load {
    /// Set to end every client.
    stop: Arc<AtomicBool>,
    /// The thread running the clients' runtime, joined on stop.
    thread: Option<std::thread::JoinHandle<()>>,
    /// What the clients saw so far; readable while the load runs.
    pub report: Arc<LoadReport>,
}

/// What the clients of a [`Load`] saw.
#[derive(Default)]
pub struct LoadReport {
    /// Requests answered with a 2xx and a whole body.
    ok: AtomicU64,
    /// Requests that failed: no connection, an error status, a broken answer.
    failed: AtomicU64,
    /// Served requests by body (`release X`): which release answered how often.
    versions: Mutex<BTreeMap<String, u64>>,
    /// The first failures' descriptions, to say what failed.
    errors: Mutex<Vec<String>>,
    /// The slowest request seen, in microseconds.
    max_latency_us: AtomicU64,
    /// Each request's latency in microseconds, for percentiles.
    latencies_us: Mutex<Vec<u32>>,
}

impl LoadReport {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.versions.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.max_latency_us.load(Ordering::Relaxed))
    }

    /// The `q` quantile (nearest rank) of the requests' latencies so far.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut v = self
            .latencies_us
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort_unstable();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Duration::from_micros(u64::from(v[rank]))
    }

    /// What the first failures were.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The test's claim that no client request failed: panics with how many did and
    /// what the first of them were.
    #[track_caller]
    pub fn assert_none_failed(&self) {
        let failed = self.failed();
        assert!(
            failed == 0,
            "{failed} client requests failed, the first: {:?}",
            self.errors()
        );
    }

    fn fail(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = self.errors.lock()
            && v.len() < ERRORS_KEPT
        {
            v.push(error);
        }
    }

    fn served(&self, body: &[u8]) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let v = String::from_utf8_lossy(body).trim().to_string();
        if let Ok(mut m) = self.versions.lock() {
            *m.entry(v).or_default() += 1;
        }
    }

    fn took(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.max_latency_us.fetch_max(us, Ordering::Relaxed);
        if let Ok(mut v) = self.latencies_us.lock()
            && v.len() < LATENCIES_KEPT
        {
            v.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
}

impl Load {
    /// `per_addr` concurrent keep-alive clients per address.
    pub fn start(addrs: Vec<SocketAddr>, per_addr: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(LoadReport::default());
        let (s, r) = (stop.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for addr in addrs {
                    for _ in 0..per_addr {
                        tasks.push(tokio::spawn(client(addr, s.clone(), r.clone())));
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            stop,
            thread: Some(thread),
            report,
        }
    }

    /// Stops every client and returns what they saw.
    pub fn stop(mut self) -> Arc<LoadReport> {
        self.end();
        self.report.clone()
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.end();
    }
}

/// One keep-alive client: connects, sends requests one after another on the connection,
/// and connects again when the connection ends, until `stop`.
async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, report: Arc<LoadReport>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(mut sender) = connect(addr, &report).await else {
            continue;
        };
        for _ in 0..REQUESTS_PER_CONNECTION {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if !request(&mut sender, addr, &report).await {
                break;
            }
        }
    }
}

/// An HTTP/1.1 connection to `addr`, or `None` (counted as a failure).
async fn connect(
    addr: SocketAddr,
    report: &LoadReport,
) -> Option<SendRequest<Empty<bytes::Bytes>>> {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            report.fail(format!("connect {addr}: {e}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            return None;
        }
    };
    let Ok((sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        report.fail(format!("handshake {addr}"));
        return None;
    };
    tokio::spawn(conn);
    Some(sender)
}

/// One `GET /` on the connection, counted; false when the connection is done with.
async fn request(
    sender: &mut SendRequest<Empty<bytes::Bytes>>,
    addr: SocketAddr,
    report: &LoadReport,
) -> bool {
    let req = hyper::Request::get("/")
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let started = Instant::now();
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(e) => {
            report.fail(format!("{addr}: {e}"));
            return false;
        }
    };
    let status = resp.status();
    // A server that says `Connection: close` gets no further request on this
    // connection (RFC 9112, 9.6): reconnect, like any HTTP client.
    let close = resp
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    report.took(started.elapsed());
    match body {
        Ok(b) if status.is_success() => report.served(&b),
        Ok(_) => report.fail(format!("{addr}: HTTP {status}")),
        Err(e) => report.fail(format!("{addr}: body: {e}")),
    }
    !close
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "1 client requests failed, the first: [\"127.0.0.1:1: HTTP 502")]
    fn a_failed_request_fails_the_claim_and_says_what_it_was() {
        let report = LoadReport::default();
        report.served(b"release 1.0.0");
        report.fail("127.0.0.1:1: HTTP 502 Bad Gateway".into());
        report.assert_none_failed();
    }

    #[test]
    fn served_requests_are_counted_by_release() {
        let report = LoadReport::default();
        report.served(b"release 1.0.0\n");
        report.served(b"release 2.0.0");
        report.served(b"release 2.0.0");
        report.assert_none_failed();
        assert_eq!(report.ok(), 3);
        let versions: Vec<(String, u64)> = report.versions().into_iter().collect();
        assert_eq!(
            versions,
            [("release 1.0.0".into(), 1), ("release 2.0.0".into(), 2)]
        );
    }
}
