//! The proxy's own HTTP/1.1 path, for the requests nearly all traffic is made of: an
//! HTTP/1.1 request in origin form with one `Host`, whose whole body (by length or
//! chunked) is in hand within 64 KiB, asking for no upgrade and no `100-continue`, while
//! no shadow phase copies requests. Such a request is parsed once, in place
//! (`httparse`), and its head rewritten straight into the bytes sent to the slot
//! (hop-by-hop fields out, `X-Forwarded-For` in) on one of the slot's pooled
//! connections; the slot's answer goes back with its head rewritten the same way and its
//! body passed through unchanged as it comes, framed by length, by chunks or by the slot
//! closing. No task, header map, URI or body object is made per request: two reads and
//! two writes, and what they carry.
//!
//! Anything else — and anything the parser does not like — hands the connection, with
//! the bytes already read, to hyper's full implementation ([`super::http`]) for the rest
//! of its life. This path only has to be right for what it takes: hyper answers
//! malformed requests, upgrades, HTTP/1.0, large uploads, `100-continue` and shadow
//! copies. Counting, draining and timeouts are the same on both paths.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use cutover_proto::listen::Conn;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::Client;
use super::pool::{self, ConnectError, Pool};
use super::{Upstream, count_in_flight, host_short};

/// The most a request taken here (head and body) may be; hyper takes larger ones.
const MAX_MESSAGE: usize = 64 * 1024;
/// The most fields a request taken here may have; hyper takes requests with more.
const MAX_FIELDS: usize = 64;
/// The most a response head may be, and its most fields: hyper's client limits, so
/// that no answer the hyper path would pass on fails here.
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;
const MAX_RESPONSE_FIELDS: usize = 100;
/// What a read asks the kernel for at least.
const READ: usize = 16 * 1024;

/// Serves `io`'s requests until it closes; returns it, with what was read of it, when a
/// request needs hyper.
pub async fn serve(
    mut io: Conn,
    client: &Client,
    idle_timeout: Duration,
    close_idle: &CancellationToken,
) -> Option<Rewind> {
    let mut b = Buffers::default();
    let closing = close_idle.cancelled();
    tokio::pin!(closing);
    loop {
        // Waiting for a request's first byte is the keep-alive idle time; reading the
        // rest of its head, the header-read time: one limit for both together, as on
        // hyper's path.
        let deadline = tokio::time::Instant::now() + idle_timeout;
        let request = loop {
            let peer = client
                .peer_value
                .as_ref()
                .map_or(&b""[..], |v| v.as_bytes());
            match parse(&b.inb, peer, &mut b.req) {
                Parsed::Request(r) => break r,
                Parsed::Partial if b.inb.len() < MAX_MESSAGE => {}
                Parsed::Partial | Parsed::Other => return Some(Rewind::new(b.inb, io)),
            }
            b.inb.reserve(READ);
            let read = tokio::select! {
                biased;
                _ = &mut closing => return None,
                r = tokio::time::timeout_at(deadline, io.read_buf(&mut b.inb)) => r,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        };
        let (picked, timeout) = {
            let routes = client.shared.routes.load();
            if routes.mirror.is_some() {
                // A shadow phase copies requests: hyper's path does that.
                return Some(Rewind::new(b.inb, io));
            }
            (routes.pick().cloned(), routes.upstream_timeout)
        };
        b.inb.advance(request.len);
        let carry_on = match picked {
            None => {
                let msg = "no release is serving on this host\n";
                answer(&mut io, &mut b.resp, Local::new(503, msg), &request, client).await
            }
            Some(up) => forward(&mut io, &mut b, &up, timeout, &request, client, true).await,
        };
        if !carry_on {
            return None;
        }
    }
}

/// A client connection's buffers, kept from request to request.
struct Buffers {
    /// Read from the client, not yet forwarded.
    inb: BytesMut,
    /// The request as it goes to the slot.
    req: Vec<u8>,
    /// Read from the slot, not yet passed on.
    upb: BytesMut,
    /// What goes to the client next.
    resp: Vec<u8>,
}

impl Default for Buffers {
    fn default() -> Buffers {
        Buffers {
            inb: BytesMut::with_capacity(READ),
            req: Vec::with_capacity(1024),
            upb: BytesMut::with_capacity(READ),
            resp: Vec::with_capacity(1024),
        }
    }
}

/// One request taken here, already written out for the slot.
struct Request {
    /// Its bytes in the client's buffer, head and body.
    len: usize,
    /// A HEAD request: the answer has no body, whatever its fields say.
    head: bool,
    /// Safe to send again when a reused connection to the slot died under it
    /// (RFC 9110 §9.2.2).
    idempotent: bool,
    /// The client asked to close the connection after it.
    close: bool,
}

impl Request {
    /// Whether the client connection ends after this request's answer: the client
    /// asked, or a handover began (read as the answer's head is written, so that a
    /// request under way when it began is answered with `connection: close` too).
    fn closes(&self, client: &Client) -> bool {
        self.close || client.shared.draining.load(Ordering::Relaxed)
    }
}

enum Parsed {
    Request(Request),
    /// Not all there yet.
    Partial,
    /// For hyper.
    Other,
}

/// Reads one request at the start of `buf` and, if it is one this path takes, writes it
/// for the slot into `out`, adding the client's address `peer` to `X-Forwarded-For`.
fn parse(buf: &[u8], peer: &[u8], out: &mut Vec<u8>) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    if !target.starts_with('/') || method == "CONNECT" || head_len > MAX_MESSAGE {
        // Absolute form, authority form, `*`: hyper rewrites or refuses them. A
        // `CONNECT` makes a tunnel of the slot connection (RFC 9110 §9.3.6): hyper's
        // path never pools one.
        return Parsed::Other;
    }
    let (mut hosts, mut length, mut chunked, mut close) = (0, None, false, false);
    for f in req.headers.iter() {
        match field(f.name) {
            Field::Host => hosts += 1,
            Field::ContentLength if length.is_none() => match content_length(f.value) {
                Some(n) => length = Some(n),
                None => return Parsed::Other,
            },
            Field::TransferEncoding if !chunked && f.value.eq_ignore_ascii_case(b"chunked") => {
                chunked = true;
            }
            Field::Connection => {
                for option in options(f.value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !option.eq_ignore_ascii_case(b"keep-alive") {
                        return Parsed::Other;
                    }
                }
            }
            Field::ContentLength | Field::TransferEncoding | Field::Expect | Field::Upgrade => {
                return Parsed::Other;
            }
            Field::Forwarded | Field::Hop | Field::Other => {}
        }
    }
    if hosts != 1 || (chunked && length.is_some()) {
        return Parsed::Other;
    }
    let body_len = if chunked {
        let mut chunk = Chunk::START;
        match chunk.scan(&buf[head_len..]) {
            Ok((n, true)) => n,
            Ok((_, false)) => return Parsed::Partial,
            Err(BadChunk) => return Parsed::Other,
        }
    } else {
        let n = length.unwrap_or(0);
        if n > (MAX_MESSAGE - head_len) as u64 {
            return Parsed::Other;
        }
        let n = n as usize;
        if buf.len() < head_len + n {
            return Parsed::Partial;
        }
        n
    };

    out.clear();
    for part in [method, " ", target, " HTTP/1.1\r\n"] {
        out.extend_from_slice(part.as_bytes());
    }
    let mut forwarded = false;
    for f in req.headers.iter() {
        match field(f.name) {
            Field::Hop | Field::Connection | Field::Upgrade => {}
            Field::Forwarded => forwarded = true,
            _ => put_field(out, f.name, f.value),
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarded {
        for f in req
            .headers
            .iter()
            .filter(|f| field(f.name) == Field::Forwarded)
        {
            out.extend_from_slice(f.value);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(peer);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&buf[head_len..head_len + body_len]);
    Parsed::Request(Request {
        len: head_len + body_len,
        head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        close,
    })
}

/// Sends the request in `b.req` to `up` and passes its answer to the client; false when
/// the client connection cannot carry another request. When `up` refuses the
/// connection (its process is gone: a crash the agent has not seen yet) and `elsewhere`,
/// the request goes to the other slot in the routes: nothing of it reached `up`, whose
/// refusal still counts against it.
async fn forward(
    io: &mut Conn,
    b: &mut Buffers,
    up: &Upstream,
    timeout: Duration,
    req: &Request,
    client: &Client,
    elsewhere: bool,
) -> bool {
    let in_flight = count_in_flight(&up.metrics);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + timeout);
    let sent = tokio::time::timeout_at(deadline, exchange(&up.pool, b, req)).await;
    let (mut slot, mut head) = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(Failure::Connect(e))) if elsewhere && pool::refused(&e) => {
            up.metrics.observe(started.elapsed(), None);
            drop(in_flight);
            let other = client.shared.routes.load().other_than(up.port).cloned();
            tracing::debug!(
                port = up.port,
                "slot refused the connection; trying the other slot"
            );
            return match other {
                Some(other) => Box::pin(forward(io, b, &other, timeout, req, client, false)).await,
                None => {
                    let local = Local::new(502, "upstream unavailable\n");
                    answer(io, &mut b.resp, local, req, client).await
                }
            };
        }
        Ok(Err(f)) => return failed(io, b, up, f, started, req, client).await,
        Err(_) => return failed(io, b, up, Failure::TimedOut, started, req, client).await,
    };
    // Interim answers (`103 Early Hints`) go to the client as they come.
    while head.status < 200 {
        b.upb.advance(head.len);
        b.resp.extend_from_slice(b"\r\n");
        if write(io, &mut b.resp).await.is_err() {
            return false;
        }
        let next = tokio::time::timeout_at(deadline, read_head(&mut slot, b, req)).await;
        head = match next {
            Ok(Ok(h)) => h,
            Ok(Err(f)) => return failed(io, b, up, f, started, req, client).await,
            Err(_) => return failed(io, b, up, Failure::TimedOut, started, req, client).await,
        };
    }
    let close = head.until_close || req.closes(client);
    if close {
        b.resp.extend_from_slice(b"connection: close\r\n");
    }
    b.resp.extend_from_slice(b"\r\n");
    up.metrics.observe(
        started.elapsed(),
        Some(StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY)),
    );
    b.upb.advance(head.len);
    if relay_body(io, &mut slot, b, &mut head.framing)
        .await
        .is_err()
    {
        return false;
    }
    if head.reusable && b.upb.is_empty() {
        up.pool.put_stream(slot);
    }
    b.upb.clear();
    !close
}

/// Passes the response body from the slot to the client, unchanged, to its end; then
/// the client has it all.
async fn relay_body(
    io: &mut Conn,
    slot: &mut TcpStream,
    b: &mut Buffers,
    framing: &mut Framing,
) -> Result<(), ()> {
    loop {
        let (n, done) = framing.take(&b.upb).map_err(|BadChunk| {
            tracing::debug!("slot sent malformed chunked body");
        })?;
        if b.resp.len() + n <= 4 * READ {
            // Small enough to go with the head in one write.
            b.resp.extend_from_slice(&b.upb[..n]);
        } else {
            write(io, &mut b.resp).await?;
            io.write_all(&b.upb[..n]).await.map_err(drop)?;
        }
        b.upb.advance(n);
        if done {
            return write(io, &mut b.resp).await;
        }
        write(io, &mut b.resp).await?;
        b.upb.reserve(READ);
        match slot.read_buf(&mut b.upb).await {
            Ok(0) if *framing == Framing::UntilClose => {
                *framing = Framing::Empty;
            }
            Ok(0) | Err(_) => {
                tracing::debug!("slot connection ended within a response body");
                return Err(());
            }
            Ok(_) => {}
        }
    }
}

async fn write(io: &mut Conn, buf: &mut Vec<u8>) -> Result<(), ()> {
    if buf.is_empty() {
        return Ok(());
    }
    let r = io.write_all(buf).await.map_err(drop);
    buf.clear();
    r
}

/// Sends the request on a pooled connection to the slot and reads the answer's head; a
/// request a reused connection died under before any answer goes again on a new one if
/// it is idempotent.
async fn exchange(
    pool: &Pool,
    b: &mut Buffers,
    req: &Request,
) -> Result<(TcpStream, Head), Failure> {
    let (mut slot, reused) = pool.stream().await.map_err(Failure::Connect)?;
    match attempt(&mut slot, b, req).await {
        Ok(head) => return Ok((slot, head)),
        Err(Failure::Lost(_)) if reused && req.idempotent && b.upb.is_empty() => {}
        Err(f) => return Err(f),
    }
    let mut slot = pool.open().await.map_err(Failure::Connect)?;
    let head = attempt(&mut slot, b, req).await?;
    Ok((slot, head))
}

async fn attempt(slot: &mut TcpStream, b: &mut Buffers, req: &Request) -> Result<Head, Failure> {
    b.upb.clear();
    slot.write_all(&b.req).await.map_err(Failure::Lost)?;
    read_head(slot, b, req).await
}

/// Reads from the slot until a whole response head is in, and writes it for the client
/// into `b.resp`, all but the blank line that ends it.
async fn read_head(slot: &mut TcpStream, b: &mut Buffers, req: &Request) -> Result<Head, Failure> {
    loop {
        if !b.upb.is_empty() {
            match response(&b.upb, req.head, &mut b.resp)? {
                Some(head) => return Ok(head),
                None if b.upb.len() >= MAX_RESPONSE_HEAD => return Err(Failure::BadHead),
                None => {}
            }
        }
        b.upb.reserve(READ);
        match slot.read_buf(&mut b.upb).await {
            Ok(0) => {
                return Err(Failure::Lost(io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Lost(e)),
        }
    }
}

/// A response head, already written out for the client.
struct Head {
    status: u16,
    /// Its bytes in the slot's buffer.
    len: usize,
    /// Where its body ends.
    framing: Framing,
    /// The slot connection may carry another request after this answer.
    reusable: bool,
    /// The body ends when the slot closes: so must the client connection.
    until_close: bool,
}

/// Reads a response head at the start of `buf` and writes it for the client into `out`,
/// all but the blank line that ends it; `None` when not all there yet.
fn response(buf: &[u8], head_request: bool, out: &mut Vec<u8>) -> Result<Option<Head>, Failure> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::BadHead),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(Failure::BadHead);
    };
    if status == 101 || !(100..=999).contains(&status) {
        // Nothing asked for an upgrade on this path.
        return Err(Failure::BadHead);
    }
    let (mut length, mut chunked, mut coded) = (None, false, false);
    let (mut slot_close, mut slot_keep_alive) = (false, false);
    let mut named: Vec<&[u8]> = Vec::new();
    for f in resp.headers.iter() {
        match field(f.name) {
            Field::ContentLength => match content_length(f.value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return Err(Failure::BadHead),
            },
            Field::TransferEncoding => {
                // The last coding of the last field naming one says whether the body
                // is chunked; an empty field names none.
                if let Some(last) = options(f.value).last() {
                    coded = true;
                    chunked = last.eq_ignore_ascii_case(b"chunked");
                }
            }
            Field::Connection => {
                for option in options(f.value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        slot_close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        slot_keep_alive = true;
                    } else {
                        named.push(option);
                    }
                }
            }
            _ => {}
        }
    }
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if coded {
        match chunked {
            true => Framing::Chunked(Chunk::START),
            false => Framing::UntilClose,
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let until_close = framing == Framing::UntilClose;
    // An HTTP/1.0 message with a transfer coding ends its connection (RFC 9112 §6.1).
    let reusable = !slot_close
        && (version == 1 || slot_keep_alive)
        && !until_close
        && !(version == 0 && coded);

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&three_digits(status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in resp.headers.iter() {
        let skip = match field(f.name) {
            Field::Hop | Field::Connection | Field::Upgrade => true,
            // A chunked body's length is in its chunks (RFC 9112 §6.3).
            Field::ContentLength => coded,
            // The body goes through as it came: so does what frames it, whatever
            // `Connection` names.
            Field::TransferEncoding => false,
            _ => named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(f.name.as_bytes())),
        };
        if !skip {
            put_field(out, f.name, f.value);
        }
    }
    Ok(Some(Head {
        status,
        len,
        framing,
        reusable,
        until_close,
    }))
}

/// Why a request got no answer from the slot.
#[derive(Debug)]
enum Failure {
    Connect(ConnectError),
    /// The connection failed or closed before a whole response head.
    Lost(io::Error),
    /// What came back is not an HTTP/1 response head this proxy passes on.
    BadHead,
    /// No response head within the service's upstream timeout.
    TimedOut,
}

/// Answers a request the slot did not answer; only the slot's own failures count
/// against it, as on hyper's path.
async fn failed(
    io: &mut Conn,
    b: &mut Buffers,
    up: &Upstream,
    f: Failure,
    started: Instant,
    req: &Request,
    client: &Client,
) -> bool {
    if let Failure::Connect(ConnectError::Io(e)) = &f
        && host_short(e)
    {
        tracing::debug!(port = up.port, error = %e, "no socket for the slot");
        let local = Local::new(503, "proxy out of resources\n");
        return answer(io, &mut b.resp, local, req, client).await;
    }
    up.metrics.observe(started.elapsed(), None);
    b.upb.clear();
    let local = match f {
        Failure::TimedOut => {
            tracing::debug!(port = up.port, "slot did not answer in time");
            Local::new(504, "upstream timed out\n")
        }
        Failure::Lost(e) => {
            tracing::debug!(port = up.port, error = %e, "upstream request failed");
            Local::new(502, "upstream unavailable\n")
        }
        f => {
            tracing::debug!(port = up.port, failure = ?f, "upstream request failed");
            Local::new(502, "upstream unavailable\n")
        }
    };
    answer(io, &mut b.resp, local, req, client).await
}

/// An answer of the proxy itself.
struct Local {
    status: u16,
    text: &'static str,
}

impl Local {
    fn new(status: u16, text: &'static str) -> Local {
        Local { status, text }
    }
}

/// Writes a local answer; false when the client connection cannot carry on.
async fn answer(
    io: &mut Conn,
    out: &mut Vec<u8>,
    local: Local,
    req: &Request,
    client: &Client,
) -> bool {
    let close = req.closes(client);
    let reason = StatusCode::from_u16(local.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&three_digits(local.status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain\r\ncontent-length: ");
    out.extend_from_slice(local.text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !req.head {
        out.extend_from_slice(local.text.as_bytes());
    }
    write(io, out).await.is_ok() && !close
}

/// Where a response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// It has none (or none is left).
    Empty,
    /// This many bytes are left.
    Length(u64),
    /// Chunked, passed through as it is.
    Chunked(Chunk),
    /// At the slot's closing the connection.
    UntilClose,
}

impl Framing {
    /// How many bytes at the start of `buf` belong to the body, and whether it ends
    /// with them.
    fn take(&mut self, buf: &[u8]) -> Result<(usize, bool), BadChunk> {
        match self {
            Framing::Empty => Ok((0, true)),
            Framing::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                Ok((n as usize, *left == 0))
            }
            Framing::Chunked(c) => c.scan(buf),
            Framing::UntilClose => Ok((buf.len(), false)),
        }
    }
}

/// A chunked body that does not follow RFC 9112 §7.1.
#[derive(Debug)]
struct BadChunk;

/// Where a chunked body (RFC 9112 §7.1) is, as its bytes go by unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk's size, in hex: its value and digits so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size (BWS, §7.1.1): only more of it, an extension or the
    /// line's end may follow.
    SizeWs(u64),
    /// Chunk extensions, up to the end of the size line.
    Ext(u64),
    /// The size line's LF.
    SizeLf(u64),
    /// Chunk data: bytes left.
    Data(u64),
    /// The CR and LF after the data.
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the empty line that ends the body.
    Line,
    /// Within a trailer field, and its LF.
    Trailer,
    TrailerLf,
    /// The LF of the last line.
    EndLf,
}

impl Chunk {
    const START: Chunk = Chunk::Size { size: 0, digits: 0 };

    /// Goes over `buf`: how many of its bytes belong to the body, and whether the body
    /// ends with them.
    fn scan(&mut self, buf: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut i = 0;
        while i < buf.len() {
            if let Chunk::Data(left) = *self {
                let n = left.min((buf.len() - i) as u64);
                i += n as usize;
                *self = match left - n {
                    0 => Chunk::DataCr,
                    left => Chunk::Data(left),
                };
                continue;
            }
            let byte = buf[i];
            i += 1;
            *self = match (*self, byte) {
                (Chunk::Size { size, digits }, _) if digits < 16 && byte.is_ascii_hexdigit() => {
                    let d = (byte as char).to_digit(16).map_or(0, u64::from);
                    Chunk::Size {
                        size: size << 4 | d,
                        digits: digits + 1,
                    }
                }
                (Chunk::Size { size, digits }, b'\r') if digits > 0 => Chunk::SizeLf(size),
                (Chunk::Size { size, digits }, b';') if digits > 0 => Chunk::Ext(size),
                (Chunk::Size { size, digits }, b' ' | b'\t') if digits > 0 => Chunk::SizeWs(size),
                (Chunk::SizeWs(size), b' ' | b'\t') => Chunk::SizeWs(size),
                (Chunk::SizeWs(size), b';') => Chunk::Ext(size),
                (Chunk::SizeWs(size) | Chunk::Ext(size), b'\r') => Chunk::SizeLf(size),
                (Chunk::Ext(size), _) if text(byte) => Chunk::Ext(size),
                (Chunk::SizeLf(0), b'\n') => Chunk::Line,
                (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::START,
                (Chunk::Line, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::Line | Chunk::Trailer, _) if text(byte) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::Line,
                (Chunk::EndLf, b'\n') => return Ok((i, true)),
                _ => return Err(BadChunk),
            };
        }
        Ok((buf.len(), false))
    }
}

/// Whether `byte` may appear in a chunk extension or a trailer line: visible, space,
/// tab or obs-text, but no control character (so no bare CR or LF).
fn text(byte: u8) -> bool {
    byte == b'\t' || (byte >= b' ' && byte != 0x7f)
}

/// The fields this path looks at or drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Upgrade,
    /// `X-Forwarded-For`, which the proxy extends.
    Forwarded,
    /// Hop-by-hop (RFC 9110 §7.6.1), never forwarded.
    Hop,
    Other,
}

fn field(name: &str) -> Field {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => Field::Hop,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Expect,
        7 if is("upgrade") => Field::Upgrade,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::Hop,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::Forwarded,
        16 if is("proxy-connection") => Field::Hop,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        18 if is("proxy-authenticate") => Field::Hop,
        19 if is("proxy-authorization") => Field::Hop,
        _ => Field::Other,
    }
}

/// The comma-separated options of a field value, trimmed, empty ones left out.
fn options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|o| !o.is_empty())
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6).
fn content_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn three_digits(n: u16) -> [u8; 3] {
    [
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// A client connection handed to hyper: the bytes this path read of it come first.
pub struct Rewind {
    read: BytesMut,
    io: Conn,
}

impl Rewind {
    fn new(read: BytesMut, io: Conn) -> Rewind {
        Rewind { read, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut c = Chunk::START;
        c.scan(body)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_in_any_split() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(scan_all(body).map_err(drop), Ok((end, true)));
        for split in 0..body.len() {
            let mut c = Chunk::START;
            let (a, done) = c.scan(&body[..split]).map_err(drop).expect("first part");
            if done {
                assert_eq!(a, end);
                continue;
            }
            assert_eq!(a, split);
            let (b, done) = c.scan(&body[split..]).map_err(drop).expect("second part");
            assert!(done, "split at {split}");
            assert_eq!(split + b, end);
        }
    }

    fn taken(raw: &[u8]) -> Option<(usize, String)> {
        let mut out = Vec::new();
        match parse(raw, b"10.0.0.9", &mut out) {
            Parsed::Request(r) => Some((r.len, String::from_utf8_lossy(&out).into_owned())),
            Parsed::Partial | Parsed::Other => None,
        }
    }

    #[test]
    fn a_plain_request_is_rewritten_for_the_slot() {
        let raw = b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\
            Keep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\n\
            Content-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n";
        let (len, out) = taken(raw).expect("taken");
        assert_eq!(len, raw.len() - "GET / HTTP/1.1\r\n".len());
        assert_eq!(
            out,
            "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.9\r\n\r\nok"
        );
        let chunked = b"PUT / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        assert_eq!(taken(chunked).map(|t| t.0), Some(chunked.len()));
    }

    #[test]
    fn requests_this_path_does_not_take_go_to_hyper() {
        let mut huge = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
        huge.resize(MAX_MESSAGE + 100, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        for raw in [
            &b"CONNECT /rpc HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"GET http://x/ HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.0\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: x-hop\r\n\r\n",
            &huge,
        ] {
            let mut out = Vec::new();
            assert!(
                matches!(parse(raw, b"p", &mut out), Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(80)])
            );
        }
        let mut out = Vec::new();
        let part = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc";
        assert!(matches!(parse(part, b"p", &mut out), Parsed::Partial));
    }

    #[test]
    fn malformed_chunking_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiXX",
            b"\r\n",
            b"4\nWiki\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX\n",
            b"5 abc\r\nhello\r\n",
            b"5;a\x01b\r\nhello\r\n",
            b"0\r\nX-A: \x00\r\n\r\n",
        ] {
            assert!(scan_all(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(scan_all(b"0\r\n\r\n").map_err(drop), Ok((5, true)));
        assert_eq!(scan_all(b"0 \t;x=y\r\n\r\n").map_err(drop), Ok((11, true)));
    }

    #[test]
    fn a_response_head_is_rewritten_without_hop_by_hop_fields() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 Fine\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\
            Keep-Alive: timeout=5\r\nContent-Length: 2\r\nX-Kept: yes\r\n\r\nok";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-Kept: yes\r\n"
        );
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.reusable && !head.until_close);

        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.reusable && head.until_close);

        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(head.framing, Framing::Chunked(Chunk::START));
        assert!(!String::from_utf8_lossy(&out).contains("Content-Length"));

        // What frames the body stays, even when `Connection` names it.
        let raw = b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\n\
            Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(head.framing, Framing::Chunked(Chunk::START));
        assert!(String::from_utf8_lossy(&out).contains("Transfer-Encoding: chunked\r\n"));

        // An HTTP/1.0 answer with a transfer coding ends its connection; an empty
        // `Transfer-Encoding` names no coding.
        let raw = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\
            Transfer-Encoding: chunked\r\n\r\n";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert!(!head.reusable);
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n";
        let head = response(raw, false, &mut out)
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(head.framing, Framing::Chunked(Chunk::START));

        // Up to 100 fields, as hyper's client takes.
        let mut many = b"HTTP/1.1 204 No Content\r\n".to_vec();
        for i in 0..99 {
            many.extend_from_slice(format!("set-cookie: c{i}=1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(response(&many, false, &mut out), Ok(Some(_))));

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(response(bad, false, &mut out).is_err());
        }
    }

    #[test]
    fn head_and_bodiless_statuses_have_no_body_whatever_their_fields_say() {
        let mut out = Vec::new();
        for (raw, head_request) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false),
        ] {
            let head = response(raw, head_request, &mut out)
                .ok()
                .flatten()
                .expect("a head");
            assert_eq!(head.framing, Framing::Empty);
            assert!(head.reusable && !head.until_close);
        }
    }
}
