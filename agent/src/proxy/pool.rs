//! Idle HTTP/1 connections to one slot, reused request after request. Each slot's
//! upstream has its own pool (nothing is shared between slots, so there is no global
//! lock), and within it each proxy thread its own idle list, so a connection is used
//! by the thread whose runtime drives it: a checkout pops the thread's most recently
//! used idle connection, and a response whose body was read to its end puts its
//! connection back. A connection that was closed, or sat idle too long, is dropped
//! instead of used.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::workers;

/// The sending half of one connection to a slot.
pub type Sender = SendRequest<Incoming>;

/// Idle connections kept per slot; more are closed when their response ends.
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

/// The idle connections to one slot port.
#[derive(Debug)]
pub struct Pool {
    /// The slot's port on 127.0.0.1.
    port: u16,
    /// Per proxy thread ([`super::workers::index`]): idle connections, the most
    /// recently used last.
    idle: Box<[Mutex<VecDeque<(Sender, Instant)>>]>,
}

impl Pool {
    pub fn new(port: u16) -> Pool {
        Pool {
            port,
            idle: (0..workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
        }
    }

    /// A connection ready for one request: the most recently used idle one, or a new one.
    pub async fn checkout(&self) -> Result<Sender, ConnectError> {
        while let Some(mut sender) = self.pop() {
            // A connection put back as its response ended may still be finishing it;
            // one that closed meanwhile fails here and is dropped.
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect().await
    }

    /// A new connection to the slot, never taken from the idle ones.
    pub async fn connect(&self) -> Result<Sender, ConnectError> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)),
        )
        .await
        .map_err(|_| ConnectError::TimedOut)??;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        // The connection is driven by its own task; it ends when the slot closes it or
        // its sender is dropped. Upgrades hand the socket to a tunnel after a 101.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "slot connection ended");
            }
        });
        Ok(sender)
    }

    /// Takes back a connection whose response was read to its end.
    pub fn put(&self, sender: Sender) {
        let now = Instant::now();
        let mut idle = self.mine().lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_FOR)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((sender, now));
        }
    }

    /// This thread's idle list.
    fn mine(&self) -> &Mutex<VecDeque<(Sender, Instant)>> {
        &self.idle[workers::index().min(self.idle.len() - 1)]
    }

    fn pop(&self) -> Option<Sender> {
        let mut idle = self.mine().lock().unwrap_or_else(|p| p.into_inner());
        let (sender, since) = idle.pop_back()?;
        if since.elapsed() > IDLE_FOR {
            // Every older one is staler still.
            idle.clear();
            return None;
        }
        Some(sender)
    }
}
