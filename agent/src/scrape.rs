//! Scraping a service's slots' own metrics for `source = "slot"` analysis: one task per
//! service, off the slots' request path, scrapes both running slots at the same moment
//! every `every_ms` (GET `metrics_path` on the slot's private port, bounded by a timeout
//! and a body size limit), parses the Prometheus text strictly
//! ([`cutover_shared::exposition`]) and keeps, per slot, the raw cumulative values of the
//! series the coordinator asked for — or why the scrape failed — for the next report.
//! [`fetch`] is also how `--http` relays a slot's metrics to a Prometheus server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cutover_proto::v1::{ScrapeSeries, ScrapeSpec, SeriesValue, SlotScrape};
use cutover_shared::exposition::{self, Exposition};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest exposition read from a slot: a bigger one fails the scrape.
pub const MAX_BODY: usize = 8 << 20;

/// An HTTP client for slots' metrics endpoints, on 127.0.0.1.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A client whose connections time out after `timeout`.
pub fn client(timeout: Duration) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(timeout));
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(conn)
}

/// GETs `path` on 127.0.0.1:`port` within `timeout`: the body of a 200 answer of at
/// most [`MAX_BODY`] bytes, or why not, in one line.
pub async fn fetch(
    client: &HttpClient,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<Bytes, String> {
    let uri: http::Uri = format!("http://127.0.0.1:{port}{path}")
        .parse()
        .map_err(|e| format!("GET {path}: {e}"))?;
    let get = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| format!("GET {path}: {}", error_chain(&e)))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("GET {path}: HTTP {}", resp.status().as_u16()));
        }
        Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("GET {path}: {e} (at most {MAX_BODY} bytes)"))
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| format!("GET {path}: no answer within {timeout:?}"))?
}

/// An error and its sources, in one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The values of `series` in an exposition: a sum of the matching samples, or a
/// histogram's cumulative buckets.
pub fn values(expo: &Exposition, series: &[ScrapeSeries]) -> Vec<SeriesValue> {
    series
        .iter()
        .map(|s| {
            let selector: BTreeMap<String, String> = s.labels.clone().into_iter().collect();
            let mut v = SeriesValue {
                key: s.key.clone(),
                ..SeriesValue::default()
            };
            if s.histogram {
                if let Some(buckets) = expo.histogram(&s.name, &selector) {
                    v.found = true;
                    (v.bucket_le, v.bucket_counts) = buckets.into_iter().unzip();
                }
            } else if let Some(sum) = expo.sum(&s.name, &selector) {
                v.found = true;
                v.sum = sum;
            }
            v
        })
        .collect()
}

/// One scrape of one slot, as the report carries it (with `seq` unset).
async fn scrape_once(client: &HttpClient, port: u16, path: &str, spec: &ScrapeSpec) -> SlotScrape {
    let timeout = Duration::from_millis(spec.timeout_ms.max(1));
    let parsed = fetch(client, port, path, timeout).await.and_then(|body| {
        let text = std::str::from_utf8(&body)
            .map_err(|_| format!("GET {path}: the body is not UTF-8 text"))?;
        exposition::parse(text).map_err(|e| format!("GET {path}: not Prometheus text: {e}"))
    });
    match parsed {
        Ok(expo) => SlotScrape {
            values: values(&expo, &spec.series),
            ..SlotScrape::default()
        },
        Err(error) => SlotScrape {
            error,
            ..SlotScrape::default()
        },
    }
}

/// A service's scraping task, as the service holds it.
pub struct Scraper {
    /// What it scrapes: a new desired spec replaces the task.
    pub spec: ScrapeSpec,
    /// Where on each slot's port.
    pub path: String,
    /// The private ports of the slots to scrape now (blue, green), from the routes.
    ports: watch::Sender<[Option<u16>; 2]>,
    /// Each slot's last scrape, for the report.
    results: Arc<Mutex<[Option<SlotScrape>; 2]>>,
    /// Stops the task.
    cancel: CancellationToken,
}

impl Scraper {
    /// Starts scraping `service`'s slots; `changed` is told after each round.
    pub fn start(
        service: &str,
        path: &str,
        spec: ScrapeSpec,
        changed: Arc<Notify>,
        parent: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Scraper {
        let (ports, rx) = watch::channel([None, None]);
        let results = Arc::new(Mutex::new([None, None]));
        let cancel = parent.child_token();
        let task = Task {
            service: service.to_string(),
            path: path.to_string(),
            spec: spec.clone(),
            ports: rx,
            results: results.clone(),
            changed,
        };
        tasks.spawn(task.run(cancel.clone()));
        Scraper {
            spec,
            path: path.to_string(),
            ports,
            results,
            cancel,
        }
    }

    /// The slots' ports to scrape from now on (`None`: a slot not running).
    pub fn set_ports(&self, ports: [Option<u16>; 2]) {
        self.ports.send_if_modified(|p| {
            let changed = *p != ports;
            *p = ports;
            changed
        });
    }

    /// Slot `index`'s last scrape, if it was scraped.
    pub fn report(&self, index: usize) -> Option<SlotScrape> {
        self.results.lock().unwrap_or_else(|p| p.into_inner())[index].clone()
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// The scraping loop's own state.
struct Task {
    service: String,
    path: String,
    spec: ScrapeSpec,
    ports: watch::Receiver<[Option<u16>; 2]>,
    results: Arc<Mutex<[Option<SlotScrape>; 2]>>,
    changed: Arc<Notify>,
}

impl Task {
    async fn run(self, cancel: CancellationToken) {
        let every = Duration::from_millis(self.spec.every_ms.max(100));
        let client = client(Duration::from_millis(self.spec.timeout_ms.max(1)));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = [0u64; 2];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ports = *self.ports.borrow();
            // Both slots at the same moment, so new and old cover the same span.
            let (client, path, spec) = (&client, self.path.as_str(), &self.spec);
            let scrape = |p: Option<u16>| async move {
                match p {
                    Some(port) => Some(scrape_once(client, port, path, spec).await),
                    None => None,
                }
            };
            let (blue, green) = tokio::join!(scrape(ports[0]), scrape(ports[1]));
            let mut out = self.results.lock().unwrap_or_else(|p| p.into_inner());
            for (i, s) in [blue, green].into_iter().enumerate() {
                out[i] = s.map(|mut s| {
                    seq[i] += 1;
                    s.seq = seq[i];
                    if !s.error.is_empty() {
                        tracing::debug!(service = self.service, error = s.error, "scrape failed");
                    }
                    s
                });
            }
            drop(out);
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_summed_per_selector_and_histograms_keep_their_buckets() {
        let text = "# TYPE payments_total counter\npayments_total{method=\"card\"} 10\npayments_total{method=\"cash\"} 5\n# TYPE t histogram\nt_bucket{le=\"0.1\"} 3\nt_bucket{le=\"+Inf\"} 4\nt_sum 1\nt_count 4\n";
        let expo = exposition::parse(text).unwrap();
        let series = |key: &str, name: &str, labels: &[(&str, &str)], histogram| ScrapeSeries {
            key: key.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            histogram,
        };
        let v = values(
            &expo,
            &[
                series("all", "payments_total", &[], false),
                series("card", "payments_total", &[("method", "card")], false),
                series("none", "refunds_total", &[], false),
                series("t", "t", &[], true),
            ],
        );
        assert_eq!((v[0].found, v[0].sum), (true, 15.0));
        assert_eq!((v[1].found, v[1].sum), (true, 10.0));
        assert!(!v[2].found);
        assert_eq!(v[3].bucket_le, [0.1, f64::INFINITY]);
        assert_eq!(v[3].bucket_counts, [3.0, 4.0]);
    }

    /// A slot answering slowly, too much, or not Prometheus text fails the scrape with
    /// the reason, never with values.
    #[tokio::test]
    async fn bounded_scrapes_fail_with_the_reason() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let body: Vec<u8> = if req.starts_with("GET /slow") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        b"x 1\n".to_vec()
                    } else if req.starts_with("GET /huge") {
                        vec![b'#'; MAX_BODY + 10]
                    } else if req.starts_with("GET /garbage") {
                        b"payments_total{ 1\n".to_vec()
                    } else {
                        b"payments_total 3\n".to_vec()
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        let spec = ScrapeSpec {
            every_ms: 100,
            timeout_ms: 300,
            series: vec![ScrapeSeries {
                key: "p".into(),
                name: "payments_total".into(),
                labels: Default::default(),
                histogram: false,
            }],
        };
        let c = client(Duration::from_millis(300));
        let ok = scrape_once(&c, port, "/metrics", &spec).await;
        assert_eq!((ok.error.as_str(), ok.values[0].sum), ("", 3.0));
        let slow = scrape_once(&c, port, "/slow", &spec).await;
        assert!(slow.error.contains("no answer within"), "{}", slow.error);
        let huge = scrape_once(&c, port, "/huge", &spec).await;
        assert!(huge.error.contains("at most"), "{}", huge.error);
        assert!(huge.values.is_empty());
        let garbage = scrape_once(&c, port, "/garbage", &spec).await;
        assert!(
            garbage.error.contains("not Prometheus text: line 1"),
            "{}",
            garbage.error
        );
        let closed = scrape_once(&c, 1, "/metrics", &spec).await;
        assert!(
            closed.error.starts_with("GET /metrics: "),
            "{}",
            closed.error
        );
    }
}
