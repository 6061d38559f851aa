//! The HTTP hot path: one request from a client to the slot the routing table picks,
//! and its response back. Requests go out on the slot's own pool of HTTP/1
//! connections ([`Pool`]) with their client's body streamed as it comes, and responses
//! stream back in a body that returns the connection to the pool once read to its end.
//! Hop-by-hop fields stop here both ways; an `Upgrade` (WebSocket and the like) goes
//! through, and after the slot's `101` both connections become one byte stream
//! ([`super::tunnel`]). Only the slot's own failures count against it ([`Fault`]).
//! During a shadow phase a request the mirror admits is read whole first and copied to
//! the slot being verified ([`crate::mirror`]); the live answer never waits on the copy.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};

use http_body_util::Either;
use hyper::client::conn::TrySendError;

use super::pool::{self, ConnectError, Link, Pool, UpBody};
use super::{Shared, Upstream, count_in_flight, tunnel};
use crate::mirror::{self, Admission, LiveAnswer, Mirror};

/// A response body: the slot's, streamed, or one the proxy wrote itself.
pub enum Body {
    /// The slot's body; the connection goes back to its pool once this was read to its
    /// end.
    Slot {
        body: Incoming,
        /// The connection it came on (driven as the body is read) and where it goes
        /// back to.
        back: Option<(Link, Arc<Pool>)>,
        /// Whether the body was read to its end.
        done: bool,
    },
    /// The proxy's own answer.
    Local(Option<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Slot { body, back, done } => {
                if let Some((link, _)) = back {
                    link.drive(cx);
                }
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    *done = true;
                }
                frame
            }
            Body::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Slot { body, done, .. } => *done || body.is_end_stream(),
            Body::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Slot { body, .. } => body.size_hint(),
            Body::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Only a connection whose response was read to its end can carry another one;
        // any other is dropped, which closes it.
        if let Body::Slot { body, back, done } = self
            && (*done || body.is_end_stream())
            && let Some((link, pool)) = back.take()
            && link.alive()
        {
            pool.put(link);
        }
    }
}

/// A plain-text answer of the proxy itself.
pub fn text(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Local(Some(Bytes::from_static(msg.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// What one client connection knows while it forwards its requests.
pub struct Client {
    pub shared: Arc<Shared>,
    /// The client, for `X-Forwarded-For`.
    pub peer: SocketAddr,
    /// The client's address as a field value, made once per connection.
    pub peer_value: Option<HeaderValue>,
}

/// Forwards one request and answers it; during a handover the answer asks the client
/// to close its connection.
pub async fn forward(req: Request<Incoming>, client: &Client) -> Response<Body> {
    let mut resp = route(req, client).await;
    if client.shared.draining.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn route(mut req: Request<Incoming>, client: &Client) -> Response<Body> {
    if !one_host(&req) {
        return text(
            StatusCode::BAD_REQUEST,
            "exactly one Host header is required\n",
        );
    }
    let (picked, timeout, mirror) = {
        let routes = client.shared.routes.load();
        (
            routes.pick().cloned(),
            routes.upstream_timeout,
            routes.mirror.clone(),
        )
    };
    let Some(mut upstream) = picked else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no release is serving on this host\n",
        );
    };
    let mirror = mirror.filter(|m| m.port != upstream.port);
    let mut in_flight = count_in_flight(&upstream.metrics);
    let upgrade = upgrade_of(&mut req);
    if aim(&mut req, upstream.port, client).is_err() {
        return text(StatusCode::BAD_REQUEST, "bad request target\n");
    }
    if let Some((protocol, _)) = &upgrade {
        let h = req.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, protocol.clone());
    }
    let upgrading = upgrade.is_some();
    let copied = match upgrading {
        true => None,
        false => mirror.as_deref(),
    };
    let Ok((req, live)) = with_copy(req, copied).await else {
        return text(
            StatusCode::BAD_REQUEST,
            "malformed or incomplete request body\n",
        );
    };
    let mut started = Instant::now();
    let mut sent = tokio::time::timeout(timeout, send(&upstream.pool, req, upgrading)).await;
    if let Ok(Err(unsent)) = &mut sent
        && let Failure::Connect(e) = &unsent.failure
        && pool::refused(e)
        && let Some(req) = unsent.request.take()
    {
        // The slot's process is gone and the agent has not seen it yet: nothing of the
        // request reached it, so the other slot in the routes answers; the refusal
        // still counts against the gone one.
        upstream.metrics.observe(started.elapsed(), None);
        let other = client
            .shared
            .routes
            .load()
            .other_than(upstream.port)
            .cloned();
        let Some(other) = other else {
            tracing::debug!(port = upstream.port, "slot refused the connection");
            return text(StatusCode::BAD_GATEWAY, "upstream unavailable\n");
        };
        tracing::debug!(
            port = upstream.port,
            "slot refused the connection; trying the other slot"
        );
        upstream = other;
        in_flight = count_in_flight(&upstream.metrics);
        started = Instant::now();
        sent = tokio::time::timeout(timeout, send(&upstream.pool, req, upgrading)).await;
    }
    let (mut resp, link) = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(unsent)) => return failed(unsent.failure, &upstream, started),
        Err(_) => return failed(Failure::TimedOut, &upstream, started),
    };
    upstream
        .metrics
        .observe(started.elapsed(), Some(resp.status()));
    if let Some(live) = live {
        live.tell(Some(resp.status()));
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some((_, from_client)) = upgrade
    {
        let protocol = resp.headers().get(header::UPGRADE).cloned();
        let slot = hyper::upgrade::on(&mut resp);
        strip_hop_by_hop(resp.headers_mut());
        if let Some(p) = protocol {
            let h = resp.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, p);
        }
        tunnel::upgraded(
            &client.shared,
            from_client,
            slot,
            upstream.clone(),
            in_flight,
        );
        return resp.map(|_| Body::Local(None));
    }
    drop(in_flight);
    strip_hop_by_hop(resp.headers_mut());
    resp.map(|body| Body::Slot {
        body,
        back: link.map(|l| (l, upstream.pool.clone())),
        done: false,
    })
}

/// The request to forward, and — when `mirror` copies it — the copy's hand-over of the
/// live answer. A copied request's body is read first (it is known small); its failure
/// is the client's (`Err`).
async fn with_copy(
    req: Request<Incoming>,
    mirror: Option<&Mirror>,
) -> Result<(Request<UpBody>, Option<LiveAnswer>), ()> {
    let Some(mirror) = mirror else {
        return Ok((req.map(Either::Left), None));
    };
    let Admission::Copy(place) = mirror.admit(req.method(), req.headers()) else {
        return Ok((req.map(Either::Left), None));
    };
    let (req, body) = mirror::buffer(req).await.map_err(|e| {
        tracing::debug!(error = e, "client request body failed");
    })?;
    let live = mirror.send(place, &req, body);
    Ok((req.map(Either::Right), live))
}

/// Why a request got no answer from the slot.
pub enum Failure {
    Connect(ConnectError),
    Send(hyper::Error),
    /// No response head within the service's upstream timeout.
    TimedOut,
}

/// Why [`send`] got no answer, and the request when no connection to the slot could
/// be had, so that none of it was sent.
struct Unsent {
    failure: Failure,
    request: Option<Request<UpBody>>,
}

impl Unsent {
    fn connect(e: ConnectError, req: Request<UpBody>) -> Unsent {
        Unsent {
            failure: Failure::Connect(e),
            request: Some(req),
        }
    }

    fn send(e: hyper::Error) -> Unsent {
        Unsent {
            failure: Failure::Send(e),
            request: None,
        }
    }
}

/// Sends `req` on a pooled connection and returns the response head with the
/// connection, whose body is still to come on it; a request that a closing idle
/// connection could not even start to send goes again on a new one. An upgrade goes on
/// a connection of its own, which is never pooled.
async fn send(
    pool: &Pool,
    req: Request<UpBody>,
    upgrade: bool,
) -> Result<(Response<Incoming>, Option<Link>), Unsent> {
    if upgrade {
        let mut sender = match pool.upgradable().await {
            Ok(s) => s,
            Err(e) => return Err(Unsent::connect(e, req)),
        };
        return match sender.send_request(req).await {
            Ok(resp) => Ok((resp, None)),
            Err(e) => Err(Unsent::send(e)),
        };
    }
    let mut link = match pool.checkout().await {
        Ok(l) => l,
        Err(e) => return Err(Unsent::connect(e, req)),
    };
    let req = match exchange(&mut link, req).await {
        Ok(resp) => return Ok((resp, Some(link))),
        Err(mut e) => match e.take_message() {
            Some(req) => req,
            None => return Err(Unsent::send(e.into_error())),
        },
    };
    let mut link = match pool.connect().await {
        Ok(l) => l,
        Err(e) => return Err(Unsent::connect(e, req)),
    };
    match exchange(&mut link, req).await {
        Ok(resp) => Ok((resp, Some(link))),
        Err(e) => Err(Unsent::send(e.into_error())),
    }
}

/// Sends `req` on `link`, driving the connection until the response head is in.
async fn exchange(
    link: &mut Link,
    req: Request<UpBody>,
) -> Result<Response<Incoming>, TrySendError<Request<UpBody>>> {
    let mut response = std::pin::pin!(link.sender.try_send_request(req));
    std::future::poll_fn(|cx| {
        link.drive(cx);
        response.as_mut().poll(cx)
    })
    .await
}

/// For a request that asks for a protocol upgrade: the protocol it asks for, and where
/// the client's side of the upgraded connection will come from.
fn upgrade_of(req: &mut Request<Incoming>) -> Option<(HeaderValue, hyper::upgrade::OnUpgrade)> {
    let asks = req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|o| o.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    let protocol = req.headers().get(header::UPGRADE)?.clone();
    if !asks || req.version() != Version::HTTP_11 {
        return None;
    }
    Some((protocol, hyper::upgrade::on(req)))
}

/// Points the request at the slot: its target in origin form, without hop-by-hop
/// fields, with the client in `X-Forwarded-For`. Fails when the target makes no URI.
fn aim(
    req: &mut Request<Incoming>,
    port: u16,
    client: &Client,
) -> Result<(), hyper::http::uri::InvalidUri> {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = pq.parse()?;
    }
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    if !h.contains_key(header::HOST) {
        // HTTP/1.0 without Host: the slot is told where it was reached.
        if let Ok(v) = HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
            h.insert(header::HOST, v);
        }
    }
    let xff = match h.get(X_FORWARDED_FOR).map(HeaderValue::to_str) {
        None => client.peer_value.clone(),
        Some(Ok(prev)) => HeaderValue::from_str(&format!("{prev}, {}", client.peer.ip())).ok(),
        Some(Err(_)) => None,
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    Ok(())
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The answer to a request the slot did not answer; only the slot's own failures count
/// against it.
fn failed(f: Failure, upstream: &Upstream, started: Instant) -> Response<Body> {
    let port = upstream.port;
    match fault(&f) {
        Fault::Slot => {
            upstream.metrics.observe(started.elapsed(), None);
            match f {
                Failure::TimedOut => {
                    tracing::debug!(port, "slot did not answer in time");
                    text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
                }
                Failure::Connect(e) => {
                    tracing::debug!(port, error = %e, "upstream request failed");
                    text(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
                }
                Failure::Send(e) => {
                    tracing::debug!(port, error = %e, "upstream request failed");
                    text(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
                }
            }
        }
        Fault::Client => {
            tracing::debug!(port, "client request body failed");
            text(
                StatusCode::BAD_REQUEST,
                "malformed or incomplete request body\n",
            )
        }
        Fault::Host => {
            tracing::debug!(port, "no socket for the slot");
            text(StatusCode::SERVICE_UNAVAILABLE, "proxy out of resources\n")
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`; HTTP/1.0 may omit it.
fn one_host(req: &Request<Incoming>) -> bool {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => req.version() < Version::HTTP_11,
        (Some(_), None) => true,
        (Some(_), Some(_)) => false,
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded; nor are those that
/// `Connection` names.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields and those `Connection` names. Allocates only when
/// `Connection` names more than `close` or `keep-alive`; a map without any (most
/// requests) is only looked over.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for value in h.get_all(header::CONNECTION) {
        for option in value.as_bytes().split(|b| *b == b',') {
            let option = option.trim_ascii();
            if option.is_empty()
                || option.eq_ignore_ascii_case(b"close")
                || option.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option) {
                named.push(name);
            }
        }
    }
    for name in named {
        h.remove(name);
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}

/// Whose doing a failed forward is; only the slot's counts against it.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// The client's request body failed: malformed chunking, a body cut short, a client
    /// gone mid-upload.
    Client,
    /// This host had no socket to reach the slot with: out of file descriptors, memory
    /// or local ports.
    Host,
    /// The slot refused, reset or closed the connection, or did not answer in time.
    Slot,
}

/// Classifies a failed forward. The body forwarded is the client's own `Incoming`, so
/// hyper reports its failure as a user-body error caused by a `hyper::Error` of the
/// client's connection; the host's own shortages are the OS errors of `socket`/`connect`.
fn fault(f: &Failure) -> Fault {
    match f {
        Failure::TimedOut | Failure::Connect(ConnectError::TimedOut) => Fault::Slot,
        Failure::Connect(ConnectError::Io(e)) if super::host_short(e) => Fault::Host,
        Failure::Connect(_) => Fault::Slot,
        Failure::Send(e)
            if e.is_user()
                && std::error::Error::source(e).is_some_and(|c| c.is::<hyper::Error>()) =>
        {
            Fault::Client
        }
        Failure::Send(_) => Fault::Slot,
    }
}
