//! The agent's optional plain-HTTP side (`--http ADDR`): `/healthz` and `/metrics` in
//! Prometheus text format, per service and slot, from the same counters the agent
//! reports to the coordinator; `/sd/prometheus`, Prometheus HTTP service discovery of
//! every running slot's own metrics and of the agent's, labelled `service`, `release`,
//! `slot`, `host`; and `/slots/SERVICE/SLOT/metrics`, which relays a slot's metrics
//! (slots listen on 127.0.0.1 only), bounded like the agent's own scrapes. Its
//! connections are capped and time out like every listener's
//! ([`cutover_proto::listen`]).

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use cutover_proto::Slot;
use cutover_proto::listen::{Acceptor, Cap, Limits};
use cutover_proto::v1::{ObservedService, SlotPhase, SlotStatus};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::scrape;
use crate::service::Services;

/// How long a relayed scrape of a slot may take.
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Who this agent is, for service discovery.
#[derive(Clone)]
pub struct Site {
    /// The host's name (the `host` label).
    pub host: String,
    /// The `--http` address; when it is a wildcard, targets use the address the
    /// discovery request came to.
    pub addr: std::net::SocketAddr,
}

pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    services: Arc<Services>,
    site: Site,
    cancel: CancellationToken,
) {
    let mut listener = Acceptor::new(listener, Cap::new(limits.max_connections), "--http");
    let relay = scrape::client(RELAY_TIMEOUT);
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let (services, site, relay) = (services.clone(), site.clone(), relay.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (services, site, relay) = (services.clone(), site.clone(), relay.clone());
                async move {
                    let (status, kind, body) = answer(&req, &services, &site, &relay).await;
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", kind)
                            .body(Full::new(body))
                            .unwrap_or_default(),
                    )
                }
            });
            // The header-read timer also runs while a kept-alive connection waits for its
            // next request: it is the idle timeout too.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.idle_timeout)
                .serve_connection(TokioIo::new(conn), svc)
                .await;
        });
    }
}

const TEXT: &str = "text/plain; version=0.0.4";

/// (status, content type, body) for one request.
async fn answer(
    req: &Request<Incoming>,
    services: &Services,
    site: &Site,
    relay: &scrape::HttpClient,
) -> (u16, &'static str, Bytes) {
    let text = |status, body: String| (status, TEXT, Bytes::from(body));
    match req.uri().path() {
        "/healthz" if !services.store_writable() => text(
            503,
            "unhealthy: the agent's store cannot be written (see its log)\n".into(),
        ),
        "/healthz" => text(200, "ok\n".into()),
        "/metrics" => text(200, render(&services.observe().await)),
        "/sd/prometheus" => {
            let at = target_addr(site, req);
            let body = discovery(&services.metrics_slots().await, &site.host, &at);
            (200, "application/json", Bytes::from(body))
        }
        path => match slot_path(path) {
            Some((service, slot)) => match services.metrics_target(service, slot).await {
                Ok((port, metrics_path)) => {
                    match scrape::fetch(relay, port, &metrics_path, RELAY_TIMEOUT).await {
                        Ok(body) => (200, TEXT, body),
                        Err(e) => text(502, format!("{e}\n")),
                    }
                }
                Err(e) => text(404, format!("{e}\n")),
            },
            None => text(404, "not found\n".into()),
        },
    }
}

/// `/slots/SERVICE/SLOT/metrics` → (service, slot).
fn slot_path(path: &str) -> Option<(&str, Slot)> {
    let rest = path.strip_prefix("/slots/")?.strip_suffix("/metrics")?;
    let (service, slot) = rest.split_once('/')?;
    let slot = Slot::BOTH.into_iter().find(|s| s.as_str() == slot)?;
    (!service.is_empty() && !service.contains('/')).then_some((service, slot))
}

/// The address Prometheus reaches this agent's `--http` at: the bound one, or for a
/// wildcard bind the `Host` the discovery request was sent to.
fn target_addr(site: &Site, req: &Request<Incoming>) -> String {
    if !site.addr.ip().is_unspecified() {
        return site.addr.to_string();
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', ' ']))
        .map_or_else(|| site.addr.to_string(), str::to_string)
}

/// Prometheus HTTP service discovery: a target group per running slot (its metrics
/// relayed at `/slots/SERVICE/SLOT/metrics`) and one for the agent's own `/metrics`.
pub fn discovery(slots: &[(String, Slot, String)], host: &str, addr: &str) -> String {
    let mut groups = vec![serde_json::json!({
        "targets": [addr],
        "labels": { "__metrics_path__": "/metrics", "host": host, "job": "cutover-agent" },
    })];
    for (service, slot, release) in slots {
        groups.push(serde_json::json!({
            "targets": [addr],
            "labels": {
                "__metrics_path__": format!("/slots/{service}/{slot}/metrics"),
                "service": service,
                "release": release,
                "slot": slot.as_str(),
                "host": host,
            },
        }));
    }
    serde_json::Value::Array(groups).to_string()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One slot of one service, as the metrics show it.
struct Row<'a> {
    /// `service="…",slot="…",release="…"`.
    labels: String,
    /// The share of traffic it gets now (percent).
    weight: u32,
    /// What the slot reports.
    status: &'a SlotStatus,
}

/// A family with one value per slot: name, type, help, and the value.
type PerSlot = (&'static str, &'static str, &'static str, fn(&Row) -> u64);

/// The families before the latency histogram, in their order on the page.
const COUNTERS: [PerSlot; 3] = [
    (
        "cutover_agent_requests_total",
        "counter",
        "Requests (or connections) proxied to the slot.",
        |r| r.status.metrics.as_ref().map_or(0, |m| m.requests),
    ),
    (
        "cutover_agent_responses_5xx_total",
        "counter",
        "5xx responses from the slot.",
        |r| r.status.metrics.as_ref().map_or(0, |m| m.responses_5xx),
    ),
    (
        "cutover_agent_upstream_failures_total",
        "counter",
        "Requests that could not reach the slot.",
        |r| r.status.metrics.as_ref().map_or(0, |m| m.upstream_failures),
    ),
];

/// The families after the latency histogram.
const SLOT_STATE: [PerSlot; 3] = [
    (
        "cutover_agent_slot_healthy",
        "gauge",
        "1 when the slot passes its health check.",
        |r| u64::from(r.status.phase == SlotPhase::Healthy as i32),
    ),
    (
        "cutover_agent_slot_restarts_total",
        "counter",
        "Restarts of the slot's process.",
        |r| u64::from(r.status.restarts),
    ),
    (
        "cutover_agent_slot_weight_percent",
        "gauge",
        "Share of the service's traffic the slot gets now.",
        |r| u64::from(r.weight),
    ),
];

const LATENCY: &str = "cutover_agent_request_duration_seconds";

/// Prometheus text for the observed services.
pub fn render(services: &[ObservedService]) -> String {
    let rows: Vec<Row> = services
        .iter()
        .flat_map(|s| {
            Slot::BOTH.into_iter().filter_map(|slot| {
                let status = s.slot(slot)?;
                Some(Row {
                    labels: format!(
                        "service=\"{}\",slot=\"{slot}\",release=\"{}\"",
                        escape(&s.service),
                        escape(&status.release)
                    ),
                    weight: s.weight(slot),
                    status,
                })
            })
        })
        .collect();
    let mut out = String::new();
    per_slot(&mut out, &COUNTERS, &rows);
    latency(&mut out, &rows);
    per_slot(&mut out, &SLOT_STATE, &rows);
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn per_slot(out: &mut String, families: &[PerSlot], rows: &[Row]) {
    for (name, kind, help, value) in families {
        header(out, name, kind, help);
        for r in rows {
            let _ = writeln!(out, "{name}{{{}}} {}", r.labels, value(r));
        }
    }
}

/// The latency histogram: cumulative buckets, sum and count, per slot.
fn latency(out: &mut String, rows: &[Row]) {
    header(
        out,
        LATENCY,
        "histogram",
        "Time to the slot's response headers.",
    );
    for r in rows {
        let Some(m) = &r.status.metrics else { continue };
        let l = &r.labels;
        let mut cumulative = 0u64;
        for (le, n) in m.latency_bucket_le_us.iter().zip(&m.latency_counts) {
            cumulative += n;
            let le = if *le == u64::MAX {
                "+Inf".to_string()
            } else {
                format!("{}", *le as f64 / 1e6)
            };
            let _ = writeln!(out, "{LATENCY}_bucket{{{l},le=\"{le}\"}} {cumulative}");
        }
        let sum = m.latency_sum_us as f64 / 1e6;
        let _ = writeln!(out, "{LATENCY}_sum{{{l}}} {sum}");
        let _ = writeln!(out, "{LATENCY}_count{{{l}}} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::SlotMetrics;

    #[test]
    fn discovery_lists_each_slot_and_the_agent() {
        let slots = [
            ("web".to_string(), Slot::Blue, "1.0".to_string()),
            ("web".to_string(), Slot::Green, "2.0".to_string()),
        ];
        let v: serde_json::Value =
            serde_json::from_str(&discovery(&slots, "web-1", "127.0.0.2:9100")).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 3);
        assert_eq!(v[0]["labels"]["__metrics_path__"], "/metrics");
        assert_eq!(v[2]["targets"][0], "127.0.0.2:9100");
        assert_eq!(
            v[2]["labels"],
            serde_json::json!({
                "__metrics_path__": "/slots/web/green/metrics",
                "service": "web", "release": "2.0", "slot": "green", "host": "web-1",
            })
        );
        assert_eq!(
            slot_path("/slots/web/blue/metrics"),
            Some(("web", Slot::Blue))
        );
        assert_eq!(slot_path("/slots/web/red/metrics"), None);
        assert_eq!(slot_path("/slots/a/b/blue/metrics"), None);
        assert_eq!(slot_path("/slots//blue/metrics"), None);
    }

    #[test]
    fn renders_prometheus_text() {
        let s = ObservedService {
            service: "web".into(),
            blue: Some(SlotStatus {
                release: "1.0".into(),
                phase: SlotPhase::Healthy as i32,
                restarts: 2,
                metrics: Some(SlotMetrics {
                    requests: 10,
                    responses_5xx: 1,
                    upstream_failures: 0,
                    latency_bucket_le_us: vec![1000, u64::MAX],
                    latency_counts: vec![7, 3],
                    latency_sum_us: 50_000,
                }),
                ..Default::default()
            }),
            blue_weight: 100,
            ..Default::default()
        };
        let text = render(&[s]);
        assert!(
            text.contains(
                "cutover_agent_requests_total{service=\"web\",slot=\"blue\",release=\"1.0\"} 10"
            ),
            "{text}"
        );
        assert!(text.contains("le=\"0.001\"} 7"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 10"), "{text}");
        assert!(text.contains(
            "cutover_agent_slot_healthy{service=\"web\",slot=\"blue\",release=\"1.0\"} 1"
        ));
        assert!(text.contains(
            "cutover_agent_slot_weight_percent{service=\"web\",slot=\"blue\",release=\"1.0\"} 100"
        ));
        assert!(text.contains("# TYPE cutover_agent_request_duration_seconds histogram"));
    }
}
