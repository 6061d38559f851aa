//! What `cutover-sample` serves under `/fidelity/`, for the proxy fidelity test: answers
//! of every framing HTTP/1.1 has, so that the same requests sent directly and through
//! cutover's proxy can be compared byte for byte.
//!
//! - `GET|HEAD /fidelity/length/N`: N bytes with `content-length`;
//! - `GET /fidelity/chunked/N`: N bytes in chunks of 1000, without a length;
//! - `GET /fidelity/status/S`: an empty answer with status S (204, 304 with an `etag`);
//! - `POST /fidelity/echo`: the request body streamed back, with its length and
//!   `expect` in `x-*` fields; with `Expect: 100-continue` the body is read first (hyper
//!   sends `100 Continue` then), and sent back whole;
//! - `GET /fidelity/ws`: a WebSocket that echoes each text or binary frame;
//! - `GET /fidelity/hang`: never answers.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A boxed response body.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The deterministic content of a body of `n` bytes.
pub fn content(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36])
        .collect()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn respond(status: u16, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut()
        .insert("x-fidelity", HeaderValue::from_static("1"));
    r
}

/// Answers a request under `/fidelity/`.
pub async fn handle(mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/fidelity/").unwrap_or_default();
    let number = |p: &str| rest.strip_prefix(p).and_then(|n| n.parse::<usize>().ok());
    if let Some(n) = number("length/") {
        let mut r = respond(200, full(content(n)));
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        return r;
    }
    if let Some(n) = number("chunked/") {
        let data = content(n);
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = data
            .chunks(1000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let stream = futures_util::stream::iter(frames);
        return respond(200, BodyExt::boxed(StreamBody::new(stream)));
    }
    if let Some(s) = number("status/") {
        let mut r = respond(s as u16, Empty::new().map_err(|e| match e {}).boxed());
        if s == 304 {
            r.headers_mut()
                .insert("etag", HeaderValue::from_static("\"v1\""));
        }
        return r;
    }
    match rest {
        "echo" => {
            let expect = req.headers().get("expect").cloned();
            let length = req.headers().get("content-length").cloned();
            // Asked to wait for `100 Continue`: read the body first (which makes hyper
            // send it), then answer; otherwise stream the body straight back.
            let body = if expect.is_some() {
                match req.into_body().collect().await {
                    Ok(b) => full(b.to_bytes()),
                    Err(_) => return respond(400, full("body failed\n")),
                }
            } else {
                req.into_body().boxed()
            };
            let mut r = respond(200, body);
            if let Some(v) = expect {
                r.headers_mut().insert("x-expect", v);
            }
            if let Some(v) = length {
                r.headers_mut().insert("x-length", v);
            }
            r
        }
        "ws" => websocket(&mut req),
        "hang" => {
            std::future::pending::<()>().await;
            respond(500, full(""))
        }
        _ => respond(404, full("no such fidelity endpoint\n")),
    }
}

/// The WebSocket handshake (RFC 6455 §4.2.2), then an echo of every data frame.
fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return respond(400, full("no sec-websocket-key\n"));
    };
    let mut accept_input = key.as_bytes().to_vec();
    accept_input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &accept_input);
    let accept = base64(digest.as_ref());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(io) = upgrade.await {
            echo_frames(TokioIo::new(io)).await;
        }
    });
    let mut r = respond(101, Empty::new().map_err(|e| match e {}).boxed());
    let h = r.headers_mut();
    h.insert("connection", HeaderValue::from_static("Upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("")),
    );
    r
}

/// Reads client frames (masked) and sends each data frame back unmasked; ends on close.
async fn echo_frames(mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) {
    loop {
        let mut head = [0u8; 2];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let opcode = head[0] & 0x0f;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            if io.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            if io.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 && io.read_exact(&mut mask).await.is_err() {
            return;
        }
        let mut payload = vec![0u8; len as usize];
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let _ = io.write_all(&frame(opcode, &payload, None)).await;
        if opcode == 0x8 {
            return;
        }
    }
}

/// One final WebSocket frame; masked with `mask` (clients must mask, servers must not).
pub fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(masked | n as u8),
        n if n <= 0xffff => {
            f.push(masked | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(masked | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
