//! How every cutover listener accepts connections — the agent's proxy and `--http`, the
//! coordinator's gRPC and `--http` ports: a cap on the connections open at once (beyond
//! it, new ones wait in the kernel's accept queue), and an accept loop that backs off
//! when `accept` fails — out of file descriptors above all — and says so at most once
//! per [`LOG_EVERY`]. Also the idle watch that closes raw TCP connections carrying
//! nothing (HTTP connections get theirs from hyper's header-read timer).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections a listener keeps open at once, unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long an HTTP connection may wait before its next request head is complete, unless
/// configured otherwise: longer than the 60 s idle timeout of common load balancers, so
/// one in front never reuses a connection this side is closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// At most one log line per this long about failing accepts.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// HTTP: a connection has this long, from being accepted or from the end of its
    /// previous response, to send a complete request head; it is closed otherwise. This
    /// is both the header-read and the keep-alive idle timeout: hyper measures both with
    /// one timer, started whenever a connection waits for a request.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The places under a listener's connection cap. Clones share them, so a listener whose
/// accept loop restarts (an agent handover that did not happen) keeps counting the
/// connections it already has.
#[derive(Clone, Debug)]
pub struct Cap(Arc<Semaphore>);

impl Cap {
    pub fn new(max_connections: usize) -> Cap {
        Cap(Arc::new(Semaphore::new(
            max_connections.clamp(1, Semaphore::MAX_PERMITS),
        )))
    }

    /// Places free now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// Accepts connections under a [`Cap`], backing off while `accept` fails.
pub struct Acceptor {
    listener: TcpListener,
    cap: Cap,
    /// Names the listener in log lines, e.g. `"--http"`.
    name: &'static str,
    log: Throttle,
}

impl Acceptor {
    pub fn new(listener: TcpListener, cap: Cap, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            cap,
            name,
            log: Throttle::default(),
        }
    }

    /// The next connection. Waits while the cap is reached: the kernel keeps queueing
    /// new connections meanwhile, and they are served as soon as a place frees up, where
    /// closing them would fail clients that a moment later could have been served.
    /// Never fails: an error from `accept` (too many open files above all, when retrying
    /// at once would spin) is retried after a pause that doubles up to 0.5 s.
    /// Cancel-safe.
    pub async fn accept(&mut self) -> Conn {
        let Ok(permit) = self.cap.0.clone().acquire_owned().await else {
            // The semaphore is never closed.
            return std::future::pending().await;
        };
        let mut pause = MIN_BACKOFF;
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if let Some(failed) = self.log.recovered(Instant::now()) {
                        tracing::info!(listener = self.name, failed, "accepting again");
                    }
                    return Conn {
                        stream,
                        peer,
                        _permit: permit,
                    };
                }
                Err(e) => {
                    if let Some(suppressed) = self.log.failed(Instant::now()) {
                        tracing::warn!(
                            listener = self.name,
                            error = %e,
                            suppressed,
                            "accept failed; backing off"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Rate limit of the accept-failure log: one line per [`LOG_EVERY`], counting the
/// failures that went unlogged in between.
#[derive(Default, Debug)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// A failure at `now`: `Some(failures unlogged before it)` when a line is due.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        if self.quiet_at(now) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// A success at `now`: `Some(failures unlogged)` when some are and a line is due.
    fn recovered(&mut self, now: Instant) -> Option<u64> {
        if self.suppressed == 0 || self.quiet_at(now) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    fn quiet_at(&self, now: Instant) -> bool {
        self.last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
    }
}

/// An accepted connection; it holds its place under the cap until dropped.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Takes the connection off this runtime's reactor, for [`Detached::attach`] on
    /// another runtime; it keeps its place under the cap.
    pub fn detach(self) -> io::Result<Detached> {
        Ok(Detached {
            stream: self.stream.into_std()?,
            peer: self.peer,
            permit: self._permit,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// An accepted connection between two runtimes ([`Conn::detach`]).
#[derive(Debug)]
pub struct Detached {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
}

impl Detached {
    /// The connection again, on the runtime this is called in.
    pub fn attach(self) -> io::Result<Conn> {
        Ok(Conn {
            stream: TcpStream::from_std(self.stream)?,
            peer: self.peer,
            _permit: self.permit,
        })
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// A stream that counts the bytes through it (both ways) in `seen`, for [`until_idle`].
pub struct Watched<'a, S> {
    pub inner: &'a mut S,
    pub seen: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.seen.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.seen.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Returns once `seen` has not moved for `timeout` (checked every quarter of it, so
/// between `timeout` and 1.25 × `timeout` after the last byte).
pub async fn until_idle(seen: &AtomicU64, timeout: Duration) {
    let step = (timeout / 4).max(Duration::from_millis(1));
    let mut last = seen.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    while quiet < timeout {
        tokio::time::sleep(step).await;
        let now = seen.load(Ordering::Relaxed);
        if now == last {
            quiet += step;
        } else {
            (last, quiet) = (now, Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_failures_log_once_per_window_with_a_count() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.failed(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(t.failed(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.recovered(t0 + Duration::from_secs(1)), None, "too soon");
        assert_eq!(t.failed(t0 + LOG_EVERY), Some(999));
        assert_eq!(t.failed(t0 + LOG_EVERY + Duration::from_secs(1)), None);
        assert_eq!(t.recovered(t0 + LOG_EVERY * 2), Some(1));
        assert_eq!(t.recovered(t0 + LOG_EVERY * 4), None, "nothing unlogged");
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn beyond_the_cap_connections_wait_until_a_place_frees_up() {
        let (l, addr) = listener().await;
        let cap = Cap::new(2);
        let mut acceptor = Acceptor::new(l, cap.clone(), "test");
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let a1 = acceptor.accept().await;
        let a2 = acceptor.accept().await;
        assert_eq!(cap.available(), 0);
        // The third connection is queued by the kernel, not accepted.
        let third = tokio::time::timeout(Duration::from_millis(300), acceptor.accept()).await;
        assert!(third.is_err(), "accepted beyond the cap");
        drop(a1);
        let mut a3 = tokio::time::timeout(Duration::from_secs(5), acceptor.accept())
            .await
            .expect("accepted once a place is free");
        // It is the queued connection, still working.
        c3.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        a3.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        assert_eq!(a3.peer(), c3.local_addr().unwrap());
        drop((a2, a3));
        assert_eq!(cap.available(), 2);
    }

    #[tokio::test]
    async fn idle_watch_waits_for_silence() {
        let seen = AtomicU64::new(0);
        let started = Instant::now();
        let busy = async {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                seen.fetch_add(1, Ordering::Relaxed);
            }
        };
        let ((), ()) = tokio::join!(busy, until_idle(&seen, Duration::from_millis(200)));
        let took = started.elapsed();
        // 300 ms of activity, then at least 200 ms of silence (a loaded machine may
        // oversleep, never undersleep).
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
}
