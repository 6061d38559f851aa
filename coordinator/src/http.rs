//! The coordinator's plain-HTTP side (`--http`): `/healthz`, `/metrics` in Prometheus
//! text format, and the read-only dashboard (`/`) with the JSON it reads (`/api/…`).
//! Nothing here changes anything; bind it where only operators can reach it. Its
//! connections are capped and time out like every listener's ([`cutover_proto::listen`]).

use std::collections::BTreeMap;
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
use crate::queries;
use crate::store::Store;

/// What the HTTP side reads; cheap to clone.
#[derive(Clone)]
pub struct Sources {
    /// Deployments, hosts and their desired state.
    pub store: Arc<Store>,
    /// What the hosts last reported.
    pub fleet: Arc<Fleet>,
    /// The engine's duration histograms.
    pub metrics: Arc<Metrics>,
}

/// Serves `listener` until `cancel`, one task per connection.
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    sources: Sources,
    cancel: CancellationToken,
) {
    let mut listener = Acceptor::new(listener, Cap::new(limits.max_connections), "--http");
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let sources = sources.clone();
                async move {
                    // Reports read the store; keep that off the async workers.
                    let resp = tokio::task::spawn_blocking(move || route(&req, &sources))
                        .await
                        .unwrap_or_else(|_| plain(500, "text/plain", "internal error\n".into()));
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

/// A JSON answer: 200 with the document, 404 or 500 with `{"error": …}`.
fn json_response<T: serde::Serialize>(v: Result<T, Error>) -> Response<Full<Bytes>> {
    let (status, body) = match v {
        Ok(v) => (200, crate::views::to_value(&v)),
        Err(e) => (e.status(), serde_json::json!({ "error": e.to_string() })),
    };
    plain(status, "application/json", body.to_string())
}

/// Why an `/api` request has no answer.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// The query's own: not found (404) or the store (500).
    #[error(transparent)]
    Query(#[from] queries::Error),
    /// A query parameter that does not parse; the message names it.
    #[error("{0}")]
    Parameter(String),
}

impl Error {
    /// The HTTP status it answers with; a store failure is also logged here, once.
    fn status(&self) -> u16 {
        match self {
            Error::Query(queries::Error::NotFound(_)) => 404,
            Error::Query(queries::Error::Store(e)) => {
                tracing::error!(error = %e, "api request failed: the store cannot be read");
                500
            }
            Error::Parameter(_) => 500,
        }
    }
}

/// `?k=v&…` of a request, undecoded beyond `+` and `%XX`.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
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

/// The answer to one request.
fn route(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let (store, fleet) = (&*sources.store, &*sources.fleet);
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
                sources.metrics.render(&mut body);
                plain(200, "text/plain; version=0.0.4", body)
            }
            Err(e) => plain(500, "text/plain", format!("metrics unavailable: {e}\n")),
        },
        "/" | "/index.html" => plain(200, "text/html; charset=utf-8", DASHBOARD.into()),
        _ if path.starts_with("/api/") => api(path, &query(req), store, fleet),
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    plain(404, "text/plain", "not found\n".into())
}

/// The dashboard's JSON: `/api/fleet`, `/api/deployments[?service=&limit=]`,
/// `/api/deployments/ID`, `/api/live`, `/api/stats[?service=&since=]` and
/// `/api/locks`.
fn api(
    path: &str,
    q: &BTreeMap<String, String>,
    store: &Store,
    fleet: &Fleet,
) -> Response<Full<Bytes>> {
    let now = cutover_shared::clock::now_ms();
    let service = q
        .get("service")
        .filter(|s| !s.is_empty())
        .map(String::as_str);
    match path {
        "/api/fleet" => json_response(
            queries::hosts(store, fleet, now)
                .map(|h| crate::views::hosts(&h))
                .map_err(Error::from),
        ),
        "/api/deployments" => {
            let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
            json_response(queries::history(store, service, 0, limit).map_err(Error::from))
        }
        "/api/live" => json_response(queries::live(store, now).map_err(Error::from)),
        "/api/locks" => json_response(queries::locks(store).map_err(Error::from)),
        "/api/stats" => json_response(stats(store, service, q.get("since"), now)),
        _ => match path.strip_prefix("/api/deployments/") {
            Some(id) if !id.is_empty() => {
                json_response(queries::show(store, id, now).map_err(Error::from))
            }
            _ => not_found(),
        },
    }
}

/// `/api/stats`: over `since` (default 30 days) up to `now`.
fn stats(
    store: &Store,
    service: Option<&str>,
    since: Option<&String>,
    now: u64,
) -> Result<crate::report::Stats, Error> {
    let since = since.map_or("30d", String::as_str);
    let since = cutover_shared::duration::parse(since).map_err(Error::Parameter)?;
    Ok(queries::stats(
        store,
        service,
        now.saturating_sub(since.as_millis()),
        now,
    )?)
}

fn metrics(store: &Store, fleet: &Fleet) -> Result<String, crate::store::Error> {
    let mut out = String::new();
    let deployments = store.deployment_states()?;
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
        let n = deployments.get(&st).copied().unwrap_or(0);
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
    let _ = writeln!(out, "cutover_hosts_enrolled {}", store.host_count()?);
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
    let _ = writeln!(
        out,
        "# HELP cutover_log_streams Log requests out on the hosts for `cutover logs` clients."
    );
    let _ = writeln!(out, "# TYPE cutover_log_streams gauge");
    let _ = writeln!(out, "cutover_log_streams {}", fleet.log_streams());
    Ok(out)
}
