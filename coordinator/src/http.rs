//! The coordinator's plain-HTTP side (`--http`): `/healthz` and `/metrics` in Prometheus
//! text format.

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::model::State;
use crate::store::Store;

pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    cancel: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on --http");
                    continue;
                }
            },
        };
        let (store, fleet) = (store.clone(), fleet.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (store, fleet) = (store.clone(), fleet.clone());
                async move { Ok::<_, std::convert::Infallible>(route(&req, &store, &fleet)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, store: &Store, fleet: &Fleet) -> Response<Full<Bytes>> {
    let text = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match req.uri().path() {
        "/healthz" => text(200, "ok\n".into()),
        "/metrics" => match metrics(store, fleet) {
            Ok(body) => text(200, body),
            Err(e) => text(500, format!("metrics unavailable: {e}\n")),
        },
        _ => text(404, "not found\n".into()),
    }
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
