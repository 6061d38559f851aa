//! Connections to one slot, reused request after request. Each slot's upstream has its
//! own pool (nothing is shared between slots, so there is no global lock), and within
//! it each proxy thread its own idle list: a checkout pops the thread's most recently
//! used idle connection, and a response whose body was read to its end puts its
//! connection back. A connection that was closed, or sat idle too long, is dropped
//! instead of used.
//!
//! A pooled connection has no task of its own: the request using it drives it
//! ([`Link::drive`]) while it waits for the response head and while the response body
//! is read, on the same thread and in the same task as the client's connection — no
//! channel hop and no wake-up of another task per request. An idle connection is driven
//! again by its next checkout, which finds it ready or closed. Requests that ask for an
//! upgrade get a connection of their own, driven by a task ([`Pool::upgradable`]).
//!
//! The proxy's own HTTP/1.1 path ([`super::plain`]) keeps plain sockets instead, in
//! idle lists of their own: it writes requests and reads answers on them itself.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::workers;

/// What goes to a slot: the client's body as it streams, or a body read whole so that
/// it could be copied too (shadow traffic).
pub type UpBody = Either<Incoming, Full<Bytes>>;

/// The sending half of one connection to a slot.
pub type Sender = SendRequest<UpBody>;

/// Idle connections kept per slot and thread; more are closed when their response ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused: the slot may
/// have given up on it.
const IDLE_FOR: Duration = Duration::from_secs(30);
/// How long connecting to a slot may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no connection to the slot could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect: timed out")]
    TimedOut,
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Whether the slot refused the connection: nothing listens on its port (its process is
/// gone), so nothing of a request was sent to it.
pub fn refused(e: &ConnectError) -> bool {
    matches!(e, ConnectError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// One HTTP/1 connection to a slot: the handle requests go in by, and the connection
/// itself, driven by whoever uses it.
pub struct Link {
    pub sender: Sender,
    /// `None` once the connection has ended. Boxed once per connection, so that a
    /// link moves as two words from pool to request to response body and back.
    conn: Option<Box<Connection<TokioIo<TcpStream>, UpBody>>>,
}

impl Link {
    /// Lets the connection do what it can (write the request, read the response, finish
    /// a message); false once it has ended.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = &mut self.conn else {
            return false;
        };
        match conn.poll_without_shutdown(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "slot connection ended");
                }
                self.conn = None;
                false
            }
        }
    }
}

impl Link {
    /// Whether the connection may carry another request.
    pub fn alive(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }
}

/// One thread's idle connections to a slot, each with the time it was put back.
type Idle<T> = Mutex<VecDeque<(T, Instant)>>;

/// The idle connections to one slot port.
pub struct Pool {
    /// The slot's port on 127.0.0.1.
    port: u16,
    /// Per proxy thread ([`super::workers::index`]): idle connections, the most
    /// recently used last.
    idle: Box<[Idle<Link>]>,
    /// The same for plain sockets.
    streams: Box<[Idle<TcpStream>]>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("port", &self.port).finish()
    }
}

impl Pool {
    pub fn new(port: u16) -> Pool {
        Pool {
            port,
            idle: (0..workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            streams: (0..workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
        }
    }

    /// A connection ready for one request: this thread's most recently used idle one,
    /// or a new one.
    pub async fn checkout(&self) -> Result<Link, ConnectError> {
        while let Some(mut link) = self.pop() {
            // A connection put back as its response ended finishes it here; one that
            // closed meanwhile fails and is dropped.
            let ready = std::future::poll_fn(|cx| {
                link.drive(cx);
                link.sender.poll_ready(cx)
            })
            .await;
            if ready.is_ok() {
                return Ok(link);
            }
        }
        self.connect().await
    }

    /// A new connection to the slot, never taken from the idle ones.
    pub async fn connect(&self) -> Result<Link, ConnectError> {
        let stream = self.open().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Link {
            sender,
            conn: Some(Box::new(conn)),
        })
    }

    /// A new connection driven by a task of its own, which after a `101` hands the
    /// socket over to the upgrade.
    pub async fn upgradable(&self) -> Result<Sender, ConnectError> {
        let stream = self.open().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "slot connection ended");
            }
        });
        Ok(sender)
    }

    /// A plain socket for one request: this thread's most recently used idle one that
    /// the slot has not closed, or a new one; and whether it was reused.
    pub async fn stream(&self) -> Result<(TcpStream, bool), ConnectError> {
        while let Some(stream) = pop(mine(&self.streams)) {
            // An idle socket has nothing to read unless the slot closed it (or broke
            // the protocol). The probe asks the kernel only when the reactor saw the
            // socket readable, which the answer's own read would have asked anyway.
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((stream, true)),
                _ => continue,
            }
        }
        Ok((self.open().await?, false))
    }

    /// Takes back a plain socket whose answer was read to its end.
    pub fn put_stream(&self, stream: TcpStream) {
        put(mine(&self.streams), stream);
    }

    /// A new socket connected to the slot.
    pub async fn open(&self) -> Result<TcpStream, ConnectError> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)),
        )
        .await
        .map_err(|_| ConnectError::TimedOut)??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Takes back a connection whose response was read to its end.
    pub fn put(&self, link: Link) {
        put(mine(&self.idle), link);
    }

    fn pop(&self) -> Option<Link> {
        pop(mine(&self.idle))
    }
}

/// This thread's idle list of `lists`.
fn mine<T>(lists: &[Idle<T>]) -> &Idle<T> {
    &lists[workers::index().min(lists.len() - 1)]
}

fn put<T>(idle: &Idle<T>, conn: T) {
    let now = Instant::now();
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    while idle
        .front()
        .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_FOR)
    {
        idle.pop_front();
    }
    if idle.len() < MAX_IDLE {
        idle.push_back((conn, now));
    }
}

fn pop<T>(idle: &Idle<T>) -> Option<T> {
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    let (conn, since) = idle.pop_back()?;
    if since.elapsed() > IDLE_FOR {
        // Every older one is staler still.
        idle.clear();
        return None;
    }
    Some(conn)
}
