//! `cutover-sample`: the small HTTP service that cutover's demo and end-to-end tests
//! deploy, and the tool that packs it into release artifacts.
//!
//! `cutover-sample serve --port P` answers `GET /` with `release <version>`, `GET
//! /healthz` with 200 and `GET /uid` with the user id it runs as. For tests of what a
//! service may see and do on its host: `GET /env` lists its environment (`NAME=value`
//! lines, sorted); `GET /state/write/NAME` writes `release <version>` to the file NAME in
//! `$CUTOVER_STATE_DIR` and `GET /state/read/NAME` reads it back; `GET /write/PATH` tries
//! to write to PATH, relative to its working directory, and answers 403 with the reason
//! when it may not; `GET /log/TEXT` writes TEXT as a line of its output (which the agent
//! keeps as the slot's log). Its behaviour comes from `behaviour.env` in its working
//! directory (the release), so a "bad release" is bad because of what it ships:
//! `error_rate=0.3` answers that share of requests with 500, `delay_ms=N` slows every
//! answer, `exit_on_start=1` exits at once, `crash_after_ms=N` exits after N ms,
//! `unhealthy=1` fails its health check, and `db_query=SQL` answers `GET /` with
//! `release <version>: <what psql prints for SQL>` — psql reads the database through
//! the schema version its environment (`PGOPTIONS`'s `search_path`) names, and a query
//! that fails is a 500.
//!
//! Every `GET /` is also a payment, by card or cash in turn, which `GET /metrics` counts
//! in Prometheus text: `payments_total{method}`, `payments_failed_total{method}`, the
//! histogram `payment_duration_seconds` and the gauge `payment_queue_depth`.
//! `payment_failure_rate=0.3` fails that share of payments while still answering 200
//! (a release that is bad for the business, not for HTTP), `queue_depth=N` sets the
//! gauge.
//!
//! `cutover-sample pack --out FILE --version V [--file SRC=DEST ...] [key=value ...]`
//! writes a `.tar.gz` holding this binary, a `behaviour.env` and each file SRC at DEST
//! (a release's own migrations, say), and prints its SHA-256.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

/// How this release behaves, from its `behaviour.env`.
struct Behaviour {
    /// What `GET /` answers with (`release <version>`).
    version: String,
    /// The share of `GET /` answered with 500.
    error_rate: f64,
    /// How long each answer to `GET /` waits.
    delay: Duration,
    /// Whether `/healthz` fails.
    unhealthy: bool,
    /// What `GET /` reads from the database with psql, if anything.
    db_query: Option<String>,
    /// Requests so far, to pick which ones fail evenly.
    counter: AtomicU64,
    /// The share of payments that fail (answered 200 all the same).
    payment_failure_rate: f64,
    /// What `payment_queue_depth` reads.
    queue_depth: u64,
    /// The payments counted so far.
    payments: Payments,
}

/// Upper bounds of `payment_duration_seconds`' buckets.
const PAYMENT_BUCKETS: [f64; 5] = [0.001, 0.005, 0.025, 0.1, 0.5];

/// Payment counters per method (card, cash): total, failed, and the duration histogram.
#[derive(Default)]
struct Payments {
    total: [AtomicU64; 2],
    failed: [AtomicU64; 2],
    /// Observations per bucket of [`PAYMENT_BUCKETS`], then above them.
    buckets: [AtomicU64; 6],
    /// Sum of durations in microseconds.
    sum_us: AtomicU64,
}

impl Payments {
    fn record(&self, n: u64, failed: bool, took: Duration) {
        let method = (n % 2) as usize;
        self.total[method].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed[method].fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let i = PAYMENT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(PAYMENT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The payments as Prometheus text.
    fn render(&self, queue_depth: u64) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, counts) in [
            ("payments_total", &self.total),
            ("payments_failed_total", &self.failed),
        ] {
            out.push_str(&format!("# TYPE {name} counter\n"));
            for (i, method) in ["card", "cash"].iter().enumerate() {
                out.push_str(&format!(
                    "{name}{{method=\"{method}\"}} {}\n",
                    get(&counts[i])
                ));
            }
        }
        out.push_str("# TYPE payment_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, le) in PAYMENT_BUCKETS
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()])
            .enumerate()
        {
            cumulative += get(&self.buckets[i]);
            out.push_str(&format!(
                "payment_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}\n"
            ));
        }
        let sum = get(&self.sum_us) as f64 / 1e6;
        out.push_str(&format!(
            "payment_duration_seconds_sum {sum}\npayment_duration_seconds_count {cumulative}\n"
        ));
        out.push_str(&format!(
            "# TYPE payment_queue_depth gauge\npayment_queue_depth {queue_depth}\n"
        ));
        out
    }
}

fn read_behaviour() -> HashMap<String, String> {
    std::fs::read_to_string("behaviour.env")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]),
        Some("pack") => pack(&args[2..]),
        _ => {
            eprintln!(
                "usage: cutover-sample serve --port P | pack --out FILE --version V [--file SRC=DEST ...] [key=value ...]"
            );
            2
        }
    };
    std::process::exit(code);
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn serve(args: &[String]) -> i32 {
    let Some(port) = flag(args, "--port")
        .map(str::to_string)
        .or_else(|| std::env::var("PORT").ok())
        .and_then(|p| p.parse::<u16>().ok())
    else {
        eprintln!("serve: --port or PORT is required");
        return 2;
    };
    let b = read_behaviour();
    let get = |k: &str| b.get(k).cloned().unwrap_or_default();
    if get("exit_on_start") == "1" {
        eprintln!("sample: exiting on start as this release is built to");
        return 1;
    }
    let behaviour = Arc::new(Behaviour {
        version: std::env::var("CUTOVER_RELEASE")
            .ok()
            .or_else(|| b.get("version").cloned())
            .unwrap_or_else(|| "unknown".into()),
        error_rate: get("error_rate").parse().unwrap_or(0.0),
        delay: Duration::from_millis(get("delay_ms").parse().unwrap_or(0)),
        unhealthy: get("unhealthy") == "1",
        db_query: b.get("db_query").cloned().filter(|q| !q.is_empty()),
        counter: AtomicU64::new(0),
        payment_failure_rate: get("payment_failure_rate").parse().unwrap_or(0.0),
        queue_depth: get("queue_depth").parse().unwrap_or(0),
        payments: Payments::default(),
    });
    let crash_after: Option<u64> = get("crash_after_ms").parse().ok();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return 1;
        }
    };
    rt.block_on(listen(port, behaviour, crash_after))
}

/// Serves on 127.0.0.1:`port` until SIGTERM (exit 0), or crashes after `crash_after`
/// ms (exit 3); a port it cannot bind is exit 1.
async fn listen(port: u16, behaviour: Arc<Behaviour>, crash_after: Option<u64>) -> i32 {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind 127.0.0.1:{port}: {e}");
            return 1;
        }
    };
    eprintln!("sample {} listening on 127.0.0.1:{port}", behaviour.version);
    if let Some(ms) = crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("sample: crashing as this release is built to");
            std::process::exit(3);
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                eprintln!("sample: SIGTERM, stopping");
                return 0;
            }
        };
        let Ok((stream, _)) = accepted else { continue };
        let b = behaviour.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, b.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    b: Arc<Behaviour>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: String| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .header("x-release", b.version.as_str())
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default())
    };
    if req.uri().path() == "/uid" {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        return reply(200, format!("{uid}\n"));
    }
    if let Some(r) = host_request(req.uri().path(), &b.version) {
        return reply(r.0, r.1);
    }
    if req.uri().path() == "/metrics" {
        return reply(200, b.payments.render(b.queue_depth));
    }
    if req.uri().path() == "/healthz" {
        return if b.unhealthy {
            reply(500, "unhealthy\n".into())
        } else {
            reply(200, "ok\n".into())
        };
    }
    let started = std::time::Instant::now();
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    let n = b.counter.fetch_add(1, Ordering::Relaxed);
    let payment_failed = spread(n, b.payment_failure_rate);
    b.payments.record(n, payment_failed, started.elapsed());
    // Deterministic error spreading: request n fails when its position in a 1000-cycle
    // falls below the error share.
    if spread(n, b.error_rate) {
        return reply(500, format!("release {} failed this request\n", b.version));
    }
    if let Some(query) = &b.db_query {
        return match read_database(query).await {
            Ok(row) => reply(200, format!("release {}: {row}\n", b.version)),
            Err(e) => reply(500, format!("release {}: {e}\n", b.version)),
        };
    }
    reply(200, format!("release {}\n", b.version))
}

/// Whether request `n` is among a `share` spread evenly over every 1000: its position
/// in a 1000-cycle falls below the share.
fn spread(n: u64, share: f64) -> bool {
    share > 0.0 && ((n * 617) % 1000) as f64 / 1000.0 < share
}

/// What `psql` prints for `query`, on one line, with the process's own environment
/// (`PGHOST`, `PGOPTIONS`...).
async fn read_database(query: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query])
        .output()
        .await
        .map_err(|e| format!("run psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .replace('\n', " | "))
}

/// The endpoints about the host: environment, state directory, writing files, its own
/// output.
fn host_request(path: &str, version: &str) -> Option<(u16, String)> {
    if let Some(text) = path.strip_prefix("/log/") {
        eprintln!("{text}");
        return Some((200, "logged\n".into()));
    }
    if path == "/env" {
        let mut vars: Vec<String> = std::env::vars_os()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect();
        vars.sort();
        return Some((200, vars.join("\n") + "\n"));
    }
    if let Some(name) = path.strip_prefix("/state/") {
        let (op, name) = name.split_once('/')?;
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        let Some(dir) = std::env::var_os("CUTOVER_STATE_DIR").filter(|_| plain) else {
            return Some((
                400,
                "no CUTOVER_STATE_DIR, or not a plain file name\n".into(),
            ));
        };
        let file = std::path::Path::new(&dir).join(name);
        return Some(match op {
            "write" => match std::fs::write(&file, format!("release {version}\n")) {
                Ok(()) => (200, "written\n".into()),
                Err(e) => (403, format!("{e}\n")),
            },
            "read" => match std::fs::read_to_string(&file) {
                Ok(text) => (200, text),
                Err(e) => (404, format!("{e}\n")),
            },
            _ => (404, "no such operation\n".into()),
        });
    }
    let target = path.strip_prefix("/write/")?;
    let rel = std::path::Path::new(target);
    if !rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Some((400, "only paths inside the working directory\n".into()));
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rel)
        .and_then(|mut f| f.write_all(b"written by the service\n"));
    Some(match written {
        Ok(()) => (200, "written\n".into()),
        Err(e) => (403, format!("{e}\n")),
    })
}

fn pack(args: &[String]) -> i32 {
    let (Some(out), Some(version)) = (flag(args, "--out"), flag(args, "--version")) else {
        eprintln!("pack: --out FILE and --version V are required");
        return 2;
    };
    let files: Vec<&str> = args
        .iter()
        .zip(args.iter().skip(1))
        .filter(|(flag, _)| *flag == "--file")
        .map(|(_, f)| f.as_str())
        .collect();
    let extra: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            a.contains('=') && !a.starts_with("--") && (*i == 0 || args[i - 1] != "--file")
        })
        .map(|(_, a)| a)
        .collect();
    match pack_to(out, version, &extra, &files) {
        Ok(sha) => {
            println!("{sha}");
            0
        }
        Err(e) => {
            eprintln!("pack: {e}");
            1
        }
    }
}

/// Writes the artifact, with each `SRC=DEST` of `files`, and returns its SHA-256.
pub fn pack_to(
    out: &str,
    version: &str,
    extra: &[&String],
    files: &[&str],
) -> std::io::Result<String> {
    use sha2::Digest;
    let exe = std::env::current_exe()?;
    let mut behaviour = format!("version={version}\n");
    for kv in extra {
        behaviour.push_str(kv);
        behaviour.push('\n');
    }
    let file = std::fs::File::create(out)?;
    let enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(enc);
    tar.append_path_with_name(&exe, "bin/cutover-sample")?;
    let mut h = tar::Header::new_gnu();
    h.set_size(behaviour.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "behaviour.env", behaviour.as_bytes())?;
    for f in files {
        let (src, dest) = f
            .split_once('=')
            .ok_or_else(|| std::io::Error::other(format!("--file {f}: write it as SRC=DEST")))?;
        tar.append_path_with_name(src, dest)?;
    }
    tar.into_inner()?.finish()?.flush()?;
    let data = std::fs::read(out)?;
    Ok(hex::encode(sha2::Sha256::digest(&data)))
}
