//! The proxy's own threads: one single-threaded tokio runtime per core, started once
//! per process. Each public listener's accept loop hands its connections to them in
//! turn (so they share the load evenly, whichever thread the kernel wakes), and a
//! connection is served, start to end, by its worker — its requests, its slot
//! connections (each thread keeps its own idle ones, [`super::pool`]) and its timers —
//! so a request never crosses threads and no thread wakes another for it (the
//! thread-per-core shape of nginx's workers and pingora). Should a thread or runtime
//! fail to start, the proxy serves on the agent's own runtime instead.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use cutover_proto::listen::Conn;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

thread_local! {
    /// Which worker this thread is, from 1; 0 on any other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The runtimes of the workers, started on first use.
pub fn handles() -> &'static [Handle] {
    static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();
    WORKERS.get_or_init(start)
}

/// Serves `conn` with `serve` on the next worker in turn, the connection moved to that
/// worker's runtime; on the current runtime when there are no workers.
pub fn serve<F, Fut>(tasks: &TaskTracker, conn: Conn, serve: F)
where
    F: FnOnce(Conn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let workers = handles();
    if workers.is_empty() {
        tasks.spawn(serve(conn));
        return;
    }
    let worker = &workers[NEXT.fetch_add(1, Ordering::Relaxed) % workers.len()];
    let moving = match conn.detach() {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "accepted connection lost on its way to a worker");
            return;
        }
    };
    tasks.spawn_on(
        async move {
            match moving.attach() {
                Ok(conn) => serve(conn).await,
                Err(e) => {
                    tracing::debug!(error = %e, "accepted connection lost on its way to a worker")
                }
            }
        },
        worker,
    );
}

/// How many slots a per-thread table needs: one per worker and one for other threads.
pub fn slots() -> usize {
    handles().len() + 1
}

/// This thread's place in a per-thread table (see [`slots`]).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

fn start() -> Vec<Handle> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::with_capacity(n);
    for i in 1..=n {
        match worker(i) {
            Ok(h) => handles.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "proxy worker thread did not start; serving on the agent's runtime");
                break;
            }
        }
    }
    handles
}

fn worker(i: usize) -> std::io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("proxy-{i}"))
        .spawn(move || {
            INDEX.with(|c| c.set(i));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(std::future::pending::<()>());
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("proxy worker thread ended at start"))?
}
