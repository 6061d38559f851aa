//! The proxy against small hand-written upstreams: weights, what counts against a
//! slot, hop-by-hop fields, malformed input, idle TCP connections.
use super::*;
use std::time::Instant;
use tokio::net::TcpStream;

fn up(port: u16) -> Upstream {
    Upstream::new(port, Arc::default())
}

#[test]
fn weights_are_exact_per_hundred() {
    for w in [0u32, 1, 10, 33, 50, 99, 100] {
        let r = Routes::new(vec![(100 - w, up(1)), (w, up(2))], DEFAULT_UPSTREAM_TIMEOUT);
        let mut green = 0;
        for _ in 0..1000 {
            if r.pick().unwrap().port == 2 {
                green += 1;
            }
        }
        assert_eq!(green, w * 10, "weight {w}");
    }
}

#[test]
fn one_percent_is_spread_not_bunched() {
    let r = Routes::new(vec![(50, up(1)), (50, up(2))], DEFAULT_UPSTREAM_TIMEOUT);
    let seq: Vec<u16> = (0..10).map(|_| r.pick().unwrap().port).collect();
    assert!(seq.windows(2).any(|w| w[0] != w[1]), "{seq:?}");
}

#[test]
fn empty_table_picks_nothing() {
    assert!(
        Routes::new(vec![], DEFAULT_UPSTREAM_TIMEOUT)
            .pick()
            .is_none()
    );
    assert!(
        Routes::new(vec![(0, up(1)), (0, up(2))], DEFAULT_UPSTREAM_TIMEOUT)
            .pick()
            .is_none()
    );
}

/// What a test upstream does with each request head it reads.
#[derive(Clone, Copy)]
enum Reply {
    /// Writes these bytes.
    Raw(&'static [u8]),
    /// Closes the connection without answering.
    Close,
    /// Never answers.
    Hold,
}

const OK: Reply = Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");

/// A minimal upstream: answers every request on a connection with `200 ok`.
async fn upstream() -> u16 {
    upstream_with(OK).await.0
}

/// An upstream that does `reply` to every request head it reads; returns its port
/// and the heads it read.
async fn upstream_with(reply: Reply) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_heads = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let heads = seen_heads.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = seen.drain(..end + 4).collect();
                        heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        match reply {
                            Reply::Raw(r) => {
                                if s.write_all(r).await.is_err() {
                                    return;
                                }
                            }
                            Reply::Close => return,
                            Reply::Hold => {}
                        }
                    }
                }
            });
        }
    });
    (port, heads)
}

/// Sends `bytes`, optionally half-closes, and reads what comes back for a while.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, wait: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    out
}

const GOOD: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn garbage_never_takes_the_proxy_down() {
    let port = upstream().await;
    let (free, _proxy, _) = proxy_to(port, Mode::Http, Limits::default());
    let ok = exchange(free, GOOD, false, Duration::from_secs(5)).await;
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );

    // A panic in a connection task would be caught by the runtime and go unseen:
    // count the ones raised on this test's thread.
    let me = std::thread::current().name().map(String::from);
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().map(String::from) == me {
            PANICS.fetch_add(1, Ordering::Relaxed);
        }
        previous(info);
    }));
    for (i, c) in garbage().iter().enumerate() {
        let _ = exchange(free, c, i % 2 == 0, Duration::from_millis(50)).await;
    }
    assert_eq!(
        PANICS.load(Ordering::Relaxed),
        0,
        "panics while serving garbage"
    );

    let ok = exchange(free, GOOD, false, Duration::from_secs(5)).await;
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "still serving: {}",
        String::from_utf8_lossy(&ok)
    );
}

/// Malformed requests: hand-made ones, noise, and mutations of valid requests.
fn garbage() -> Vec<Vec<u8>> {
    let mut cases: Vec<Vec<u8>> = vec![
        b"\r\n\r\n".to_vec(),
        b"GET".to_vec(),
        b"GET / HTTP/1.1\r\n".to_vec(),
        b"BREW /pot HTCPCP/1.0\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nab".to_vec(),
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        [
            b"GET / HTTP/1.1\r\nx: ".as_slice(),
            &vec![b'a'; 200_000],
            b"\r\n\r\n",
        ]
        .concat(),
        [
            b"GET /".as_slice(),
            &vec![b'a'; 100_000],
            b" HTTP/1.1\r\n\r\n",
        ]
        .concat(),
    ];
    // Deterministic noise: xorshift bytes of varying length.
    let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
    for i in 0..200 {
        let len = (i * 37) % 3000;
        cases.push((0..len).map(|_| (rnd() & 0xff) as u8).collect());
    }
    cases.extend(mutations(rnd));
    cases
}

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Structure-aware mutations of valid requests: bytes flipped, inserted, removed,
/// lines duplicated, cut short. CUTOVER_FUZZ_CASES sets how many (default 300); CI
/// runs the default, longer campaigns set more.
fn mutations(mut rnd: impl FnMut() -> u64) -> Vec<Vec<u8>> {
    let seeds: [&[u8]; 3] = [
        GOOD,
        b"POST /a?b=c HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
        b"PUT / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    let n: usize = std::env::var("CUTOVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    (0..n)
        .map(|i| {
            let mut v = seeds[i % seeds.len()].to_vec();
            for _ in 0..=(rnd() % 4) {
                let at = (rnd() as usize) % (v.len() + 1);
                match rnd() % 5 {
                    0 if at < v.len() => v[at] = rnd() as u8,
                    1 => v.insert(at, rnd() as u8),
                    2 if at < v.len() => {
                        v.remove(at);
                    }
                    3 => {
                        let line = b"x-dup: 1\r\n".repeat((rnd() % 50) as usize);
                        let head = v.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
                        v.splice(head..head, line);
                    }
                    _ => v.truncate(at),
                }
            }
            v
        })
        .collect()
}

/// A proxy on a free port sending everything to the upstream on `port`; returns its
/// address, the proxy (serving until dropped) and the slot's counters.
fn proxy_to(port: u16, mode: Mode, limits: Limits) -> (SocketAddr, Proxy, Arc<SlotMetrics>) {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::bind(
        free,
        mode,
        limits,
        &CancellationToken::new(),
        &TaskTracker::new(),
    )
    .unwrap();
    let metrics = Arc::new(SlotMetrics::default());
    proxy.set_routes(Routes::new(
        vec![(100, Upstream::new(port, metrics.clone()))],
        DEFAULT_UPSTREAM_TIMEOUT,
    ));
    (free, proxy, metrics)
}

fn counted(m: &SlotMetrics) -> (u64, u64, u64) {
    let s = m.snapshot();
    (s.requests, s.responses_5xx, s.upstream_failures)
}

/// Sends `bytes` on a fresh connection and reads one response (head and
/// content-length body), or whatever came before the connection closed.
async fn one_response(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= len
    };
    let read = async {
        while !complete(&got) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn what_clients_break_never_counts_against_the_slot() {
    // The slot reads and never answers: any failure can only be the client's.
    let (port, heads) = upstream_with(Reply::Hold).await;
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());

    // A chunked body that is not chunked.
    let r = one_response(
        addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");

    // A body cut short: the client stops sending and closes its side. The body is
    // announced too large to be held back whole, so it streams to the slot.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nabc")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest),
        )
        .await;
    }

    // No Host, or two: 400 from the proxy itself, and the slot never sees them.
    let r = one_response(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = one_response(addr, b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    wait_for(
        || heads.lock().unwrap().len() >= 2,
        "the two bodies to reach the slot",
    )
    .await;
    assert_eq!(
        heads.lock().unwrap().len(),
        2,
        "{:?}",
        heads.lock().unwrap()
    );
    // Both forwards ended with the client's failure, and neither counted.
    wait_for(|| metrics.in_flight() == 0, "the forwards to end").await;
    assert_eq!(counted(&metrics), (0, 0, 0));
}

#[tokio::test]
async fn what_the_slot_does_counts_against_it() {
    // Refused: nothing listens on the slot's port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (addr, _proxy, metrics) = proxy_to(closed, Mode::Http, Limits::default());
    let r = one_response(addr, GOOD).await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert_eq!(counted(&metrics), (1, 0, 1));

    // Closed without an answer.
    let (port, _) = upstream_with(Reply::Close).await;
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
    let r = one_response(addr, GOOD).await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert_eq!(counted(&metrics), (1, 0, 1));

    // A 5xx answer, passed on as it is.
    let (port, _) = upstream_with(Reply::Raw(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
    ))
    .await;
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
    let r = one_response(addr, GOOD).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert_eq!(counted(&metrics), (1, 1, 0));

    // HTTP/1.0 may omit Host.
    let port = upstream().await;
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
    let r = one_response(addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.0 200"), "{r}");
    assert_eq!(counted(&metrics), (1, 0, 0));
}

#[tokio::test]
async fn a_slot_that_never_answers_gets_504_and_the_blame() {
    let (port, heads) = upstream_with(Reply::Hold).await;
    let (addr, proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
    proxy.set_routes(Routes::new(
        vec![(100, Upstream::new(port, metrics.clone()))],
        Duration::from_millis(300),
    ));
    let r = one_response(addr, GOOD).await;
    assert!(r.starts_with("HTTP/1.1 504"), "{r}");
    assert_eq!(heads.lock().unwrap().len(), 1);
    assert_eq!(counted(&metrics), (1, 0, 1));
    wait_for(|| metrics.in_flight() == 0, "the forward to end").await;
}

#[tokio::test]
async fn an_upgraded_connection_is_one_request_held_until_the_slot_is_drained() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The slot switches protocols on the first request, then echoes bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, Limits::default());
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_ne!(c.read(&mut b).await.unwrap(), 0, "{got:?}");
        got.push(b[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    // The slot was asked for the upgrade, with the hop-by-hop fields it needs.
    let asked = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(
        asked.contains("upgrade: echo") && asked.contains("connection: upgrade"),
        "{asked}"
    );

    // Bytes both ways, on one request that stays in flight.
    c.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    c.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    assert_eq!(counted(&metrics), (1, 0, 0));
    assert_eq!(metrics.in_flight(), 1);

    // The slot's drain is over: the stream ends and the slot is free.
    metrics.drained.cancel();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut echo))
        .await
        .expect("closed at the drain deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    wait_for(|| metrics.in_flight() == 0, "the stream to end").await;
}

#[tokio::test]
async fn hop_by_hop_fields_stop_at_the_proxy_both_ways() {
    let (port, heads) = upstream_with(Reply::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nx-kept: 1\r\n\r\nok",
    ))
    .await;
    let (addr, _proxy, _) = proxy_to(port, Mode::Http, Limits::default());
    let r = one_response(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nConnection: keep-alive, X-Internal\r\nconnection: x-also\r\nX-Internal: 1\r\nx-also: 1\r\nte: trailers\r\nx-end-to-end: 1\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = r.to_ascii_lowercase();
    assert!(r.contains("x-kept: 1"), "{r}");
    for gone in ["x-secret", "keep-alive: timeout"] {
        assert!(!r.contains(gone), "{gone} reached the client: {r}");
    }
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("x-end-to-end: 1"), "{head}");
    for gone in [
        "x-internal",
        "x-also",
        "te: trailers",
        "connection: keep-alive",
    ] {
        assert!(!head.contains(gone), "{gone} reached the slot: {head}");
    }
}

#[tokio::test]
async fn tcp_connections_close_once_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo server as the slot.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let limits = Limits {
        tcp_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let (addr, _proxy, _) = proxy_to(port, Mode::Tcp, limits);
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Busy for twice the idle timeout: the connection stays.
    let mut b = [0u8; 1];
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
    }
    // Then quiet: closed after the timeout, not before.
    let quiet = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("closed once idle")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        quiet.elapsed() >= Duration::from_millis(400),
        "{:?}",
        quiet.elapsed()
    );
}

#[test]
fn only_the_hosts_own_shortages_spare_the_slot() {
    use nix::errno::Errno;
    for mine in [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::EADDRNOTAVAIL,
    ] {
        assert!(host_short(&std::io::Error::from_raw_os_error(mine as i32)));
    }
    for slots in [
        Errno::ECONNREFUSED,
        Errno::ECONNRESET,
        Errno::ETIMEDOUT,
        Errno::EPIPE,
    ] {
        assert!(!host_short(&std::io::Error::from_raw_os_error(
            slots as i32
        )));
    }
    assert!(!host_short(&std::io::Error::other("no code")));
}

/// Polls `cond` every 10 ms, for 5 s at most.
async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn histogram_buckets() {
    let m = SlotMetrics::default();
    m.observe(Duration::from_micros(400), Some(StatusCode::OK));
    m.observe(
        Duration::from_millis(3),
        Some(StatusCode::INTERNAL_SERVER_ERROR),
    );
    m.observe(Duration::from_secs(100), None);
    let s = m.snapshot();
    assert_eq!(
        (s.requests, s.responses_5xx, s.upstream_failures),
        (3, 1, 1)
    );
    assert_eq!(s.latency_counts[0], 1);
    assert_eq!(s.latency_counts[3], 1);
    assert_eq!(*s.latency_counts.last().unwrap(), 1);
}

/// A proxy to the live upstream on `live` that copies `methods` requests to the
/// slot on `copies`; returns its address, the proxy, and the copies' counters.
fn mirrored_proxy(
    live: u16,
    copies: u16,
    methods: Vec<hyper::Method>,
) -> (SocketAddr, Proxy, Arc<crate::mirror::ShadowMetrics>) {
    let (addr, proxy, metrics) = proxy_to(live, Mode::Http, Limits::default());
    let shadow = Arc::new(crate::mirror::ShadowMetrics::default());
    let rule = crate::mirror::Rule {
        share: 100,
        methods,
    };
    let mirror = Arc::new(Mirror::new(rule, copies, shadow.clone()));
    let routes = Routes::new(
        vec![(100, Upstream::new(live, metrics))],
        DEFAULT_UPSTREAM_TIMEOUT,
    );
    proxy.set_routes(routes.mirrored(Some(mirror)));
    (addr, proxy, shadow)
}

#[tokio::test]
async fn a_copy_target_that_never_answers_changes_nothing_for_clients() {
    let live = upstream().await;
    let (hanging, heads) = upstream_with(Reply::Hold).await;
    let (addr, _proxy, shadow) = mirrored_proxy(live, hanging, vec![hyper::Method::GET]);
    let n = crate::mirror::IN_FLIGHT + 20;
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        let r = one_response(addr, GOOD).await;
        slowest = slowest.max(started.elapsed());
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok"), "{r}");
    }
    assert!(slowest < Duration::from_secs(1), "slowest {slowest:?}");
    // Every copy in flight holds a place (for 5 s); the rest are dropped and
    // counted, and each request was either copied or dropped.
    let dropped = shadow.dropped.load(Ordering::Relaxed) as usize;
    assert!(dropped >= 1, "nothing dropped");
    wait_for(
        || heads.lock().unwrap().len() + dropped == n,
        "the copies to reach the slot",
    )
    .await;
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("x-cutover-shadow: 1"), "{head}");
}

#[tokio::test]
async fn copies_carry_the_body_and_their_status_is_compared_with_the_live_one() {
    let live = upstream().await;
    let (not_found, heads) = upstream_with(Reply::Raw(
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ))
    .await;
    let (addr, _proxy, shadow) = mirrored_proxy(live, not_found, vec![hyper::Method::POST]);
    let post = b"POST /orders?x=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
    for _ in 0..3 {
        let r = one_response(addr, post).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    // GET is not listed: not copied.
    assert!(one_response(addr, GOOD).await.starts_with("HTTP/1.1 200"));
    wait_for(
        || shadow.compared.load(Ordering::Relaxed) == 3,
        "three comparisons",
    )
    .await;
    assert_eq!(shadow.matched.load(Ordering::Relaxed), 0, "404 is not 200");
    let m = shadow.snapshot().expect("counters");
    assert_eq!((m.requests, m.responses_5xx, m.status_compared), (3, 0, 3));
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(
        heads[0].starts_with("POST /orders?x=1 HTTP/1.1"),
        "{heads:?}"
    );
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = upstream().await;
    let limits = Limits {
        listen: listen::Limits {
            idle_timeout: Duration::from_millis(500),
            ..listen::Limits::default()
        },
        ..Limits::default()
    };
    let (addr, _proxy, metrics) = proxy_to(port, Mode::Http, limits);
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Each byte comes well within the timeout; the whole head would take 10 s.
    let trickle = tokio::spawn(async move {
        let head = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-slow: {}\r\n\r\n",
            "a".repeat(80)
        );
        for byte in head.as_bytes() {
            if wr.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await;
    trickle.abort();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open: {closed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(counted(&metrics), (0, 0, 0));
}

#[tokio::test]
async fn a_request_a_gone_slot_refuses_is_answered_by_the_other_slot() {
    // The green slot's process is gone (its port refuses); the agent has not noticed
    // yet, so the routes still give it half the requests.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let live = upstream().await;
    let (addr, proxy, metrics) = proxy_to(live, Mode::Http, Limits::default());
    let gone_metrics = Arc::new(SlotMetrics::default());
    proxy.set_routes(Routes::new(
        vec![
            (50, Upstream::new(live, metrics.clone())),
            (50, Upstream::new(gone, gone_metrics.clone())),
        ],
        DEFAULT_UPSTREAM_TIMEOUT,
    ));
    // Plain requests (the proxy's own path), and HTTP/1.0 ones (hyper's).
    for _ in 0..10 {
        let r = one_response(addr, GOOD).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = one_response(addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
    }
    // Each refusal counts against the gone slot; the live one answered all twenty.
    let (refused, _, failed) = counted(&gone_metrics);
    assert!(refused > 0 && failed == refused, "{refused} {failed}");
    assert_eq!(counted(&metrics), (20, 0, 0));
}
