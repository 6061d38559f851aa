//! The coordinator's plain-HTTP side (`--http`): `/healthz`, `/metrics` in Prometheus
//! text format, and the read-only dashboard (`/`) with the JSON it reads (`/api/…`).
//! Nothing here changes anything; bind it where only operators can reach it. Its
//! connections are capped and time out like every listener's ([`cutover_proto::listen`]).

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use cutover_proto::listen::{Acceptor, Cap, Limits};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::model::State;
use crate::report;
use crate::store::Store;

pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut listener = Acceptor::new(listener, Cap::new(limits.max_connections), "--http");
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let (store, fleet, metrics) = (store.clone(), fleet.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (store, fleet, metrics) = (store.clone(), fleet.clone(), metrics.clone());
                async move {
                    // Reports read the store; keep that off the async workers.
                    let resp =
                        tokio::task::spawn_blocking(move || route(&req, &store, &fleet, &metrics))
                            .await
                            .unwrap_or_else(|_| {
                                plain(500, "text/plain", "internal error\n".into())
                            });
                    Ok::<_, std::convert::Infallible>(resp)
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

/// The dashboard: one static page that reads the JSON below.
const DASHBOARD: &str = include_str!("dashboard.html");

fn plain(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn json_response(v: Result<serde_json::Value, String>) -> Response<Full<Bytes>> {
    match v {
        Ok(v) => plain(200, "application/json", v.to_string()),
        Err(e) => plain(
            500,
            "application/json",
            serde_json::json!({ "error": e }).to_string(),
        ),
    }
}

/// `?k=v&…` of a request, undecoded beyond `+` and `%XX`.
fn query(req: &Request<Incoming>) -> std::collections::BTreeMap<String, String> {
    let decode = |s: &str| {
        let b = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&b[i + 1..i + 3]), 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (decode(k), decode(v)))
        })
        .collect()
}

fn route(
    req: &Request<Incoming>,
    store: &Store,
    fleet: &Fleet,
    hist: &Metrics,
) -> Response<Full<Bytes>> {
    let q = query(req);
    let service = q
        .get("service")
        .filter(|s| !s.is_empty())
        .map(String::as_str);
    let path = req.uri().path();
    match path {
        "/healthz" if !store.writable() => plain(
            503,
            "text/plain",
            "unhealthy: the store cannot be written (see the coordinator's log)\n".into(),
        ),
        "/healthz" => plain(200, "text/plain", "ok\n".into()),
        "/metrics" => match metrics(store, fleet) {
            Ok(mut body) => {
                hist.render(&mut body);
                plain(200, "text/plain; version=0.0.4", body)
            }
            Err(e) => plain(500, "text/plain", format!("metrics unavailable: {e}\n")),
        },
        "/" | "/index.html" => plain(200, "text/html; charset=utf-8", DASHBOARD.into()),
        "/api/fleet" => json_response(
            crate::server::hosts_pb(store, fleet)
                .map(|h| crate::views::hosts(&h))
                .map_err(|s| s.message().to_string()),
        ),
        "/api/deployments" => json_response(
            store
                .deployments()
                .map(|records| {
                    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
                    report::history(&records, service, 0, limit)
                })
                .map_err(|e| e.to_string()),
        ),
        "/api/live" => json_response(live(store)),
        "/api/stats" => json_response((|| {
            let since = q.get("since").map_or("30d", String::as_str);
            let since = cutover_shared::duration::parse(since)?;
            let now = cutover_shared::clock::now_ms();
            let records = store.deployments().map_err(|e| e.to_string())?;
            let events = store.all_events().map_err(|e| e.to_string())?;
            let stats = report::stats(
                &records,
                &events,
                service,
                now.saturating_sub(since.as_millis()),
                now,
            );
            serde_json::to_value(stats).map_err(|e| e.to_string())
        })()),
        _ => match path.strip_prefix("/api/deployments/") {
            Some(id) if !id.is_empty() => match crate::server::show_json(store, id) {
                Ok(v) => plain(200, "application/json", v.to_string()),
                Err(s) if s.code() == tonic::Code::NotFound => plain(
                    404,
                    "application/json",
                    serde_json::json!({ "error": s.message() }).to_string(),
                ),
                Err(s) => json_response(Err(s.message().to_string())),
            },
            _ => plain(404, "text/plain", "not found\n".into()),
        },
    }
}

/// The deployments still running, each as `show` presents it.
fn live(store: &Store) -> Result<serde_json::Value, String> {
    let records = store.deployments().map_err(|e| e.to_string())?;
    let ids: Vec<String> = records
        .iter()
        .filter(|d| !d.state.is_final())
        .map(|d| d.id.clone())
        .collect();
    let mut out = Vec::new();
    for id in ids {
        out.push(crate::server::show_json(store, &id).map_err(|s| s.message().to_string())?);
    }
    Ok(serde_json::Value::Array(out))
}

fn metrics(store: &Store, fleet: &Fleet) -> Result<String, crate::store::Error> {
    let mut out = String::new();
    let deployments = store.deployments()?;
    let _ = writeln!(out, "# HELP cutover_deployments Deployments by state.");
    let _ = writeln!(out, "# TYPE cutover_deployments gauge");
    for st in [
        State::Pending,
        State::Preparing,
        State::Progressing,
        State::Paused,
        State::RollingBack,
        State::Succeeded,
        State::RolledBack,
        State::Failed,
        State::Aborted,
    ] {
        let n = deployments.iter().filter(|d| d.state == st).count();
        let _ = writeln!(out, "cutover_deployments{{state=\"{}\"}} {n}", st.as_str());
    }
    let _ = writeln!(
        out,
        "# HELP cutover_hosts_connected Hosts with a live agent stream."
    );
    let _ = writeln!(out, "# TYPE cutover_hosts_connected gauge");
    let _ = writeln!(out, "cutover_hosts_connected {}", fleet.connected_count());
    let _ = writeln!(out, "# HELP cutover_hosts_enrolled Hosts that have joined.");
    let _ = writeln!(out, "# TYPE cutover_hosts_enrolled gauge");
    let _ = writeln!(out, "cutover_hosts_enrolled {}", store.hosts()?.len());
    let _ = writeln!(
        out,
        "# HELP cutover_stream_reconnects_total Agent sessions that replaced an earlier one."
    );
    let _ = writeln!(out, "# TYPE cutover_stream_reconnects_total counter");
    let _ = writeln!(
        out,
        "cutover_stream_reconnects_total {}",
        fleet.reconnects()
    );
    Ok(out)
}
