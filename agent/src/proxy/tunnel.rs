//! Byte streams through the proxy: TCP-mode connections, and HTTP connections after an
//! upgrade (WebSocket and the like). Each holds one place in its slot's in-flight count
//! while it lasts, so a slot that loses its weight waits for it (its `drain`), and ends
//! at whichever comes first: either side closing, no byte either way for the idle
//! timeout, the slot's drain deadline, or the proxy stopping.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cutover_proto::listen::{self, Acceptor, Watched};
use hyper::StatusCode;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    Counted, Shared, SlotMetrics, Upstream, count_connection, count_in_flight, host_short, workers,
};

/// Carries bytes both ways between `client` and `slot` until one of the ends above.
async fn relay(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    slot: &mut (impl AsyncRead + AsyncWrite + Unpin),
    idle_timeout: Duration,
    drained: &CancellationToken,
    cancel: &CancellationToken,
) {
    // Every byte either way passes through `client`: counting there is enough.
    let seen = AtomicU64::new(0);
    let mut watched = Watched {
        inner: client,
        seen: &seen,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut watched, slot) => {},
        _ = listen::until_idle(&seen, idle_timeout) => {},
        _ = drained.cancelled() => {},
        _ = cancel.cancelled() => {},
    }
}

/// After the slot's `101`: the client's and the slot's connections, once both are
/// handed over by hyper, become one byte stream, counted as the one request it began as.
pub fn upgraded(
    shared: &Arc<Shared>,
    client: OnUpgrade,
    slot: OnUpgrade,
    upstream: Upstream,
    in_flight: Counted<SlotMetrics>,
) {
    let open = count_connection(shared);
    let (idle, cancel) = (shared.tcp_idle_timeout, shared.cancel.clone());
    shared.tasks.spawn(async move {
        let (_open, _in_flight) = (open, in_flight);
        let (client, slot) = match tokio::join!(client, slot) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(port = upstream.port, error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut slot) = (TokioIo::new(client), TokioIo::new(slot));
        relay(
            &mut client,
            &mut slot,
            idle,
            &upstream.metrics.drained,
            &cancel,
        )
        .await;
    });
}

/// TCP mode: every accepted connection goes, whole, to the slot the routing table picks.
pub async fn serve_tcp(mut listener: Acceptor, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let inbound = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let _ = inbound.stream().set_nodelay(true);
        let Some(upstream) = shared.routes.load().pick().cloned() else {
            drop(inbound);
            continue;
        };
        let open = count_connection(&shared);
        let (idle, cancel) = (shared.tcp_idle_timeout, shared.cancel.clone());
        workers::serve(&shared.tasks, inbound, move |mut inbound| async move {
            let _open = open;
            let _in_flight = count_in_flight(&upstream.metrics);
            let started = Instant::now();
            let out = tokio::time::timeout(
                Duration::from_secs(2),
                TcpStream::connect(("127.0.0.1", upstream.port)),
            )
            .await;
            let mut out = match out {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if host_short(&e) => return,
                _ => {
                    upstream.metrics.observe(started.elapsed(), None);
                    return;
                }
            };
            let _ = out.set_nodelay(true);
            upstream
                .metrics
                .observe(started.elapsed(), Some(StatusCode::OK));
            relay(
                &mut inbound,
                &mut out,
                idle,
                &upstream.metrics.drained,
                &cancel,
            )
            .await;
        });
    }
}
