//! Database tasks run for real: a release packed into an artifact, its script run by
//! [`Tasks`] in the unpacked directory, what the store records, and what a restart finds.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;

use cutover_proto::v1::Release;
use sha2::Digest;

use super::*;

/// A release whose `db/run.sh` is `script`, packed as a `.tar.gz` in `dir`.
fn release(dir: &Path, version: &str, script: &str) -> Release {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(enc);
    let body = format!("#!/bin/sh\n{script}\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    tar.append_data(&mut h, "db/run.sh", body.as_bytes())
        .unwrap();
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    let file = dir.join(format!("web-{version}.tar.gz"));
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    Release {
        version: version.into(),
        artifact: format!("file://{}", file.display()),
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        signature: String::new(),
    }
}

fn task(id: &str, release: Release, timeout_ms: u64) -> DatabaseTask {
    DatabaseTask {
        id: id.into(),
        phase: "expand".into(),
        command: vec!["./db/run.sh".into()],
        env: [("CUTOVER_DB_SCHEMA".to_string(), "app_2".to_string())].into(),
        release: Some(release),
        user: String::new(),
        timeout_ms,
        stop_timeout_ms: 200,
        deployment: "d-000002".into(),
    }
}

/// An agent's tasks over the data dir `data`, and what stops them.
struct Agent {
    tasks: Arc<Tasks>,
    store: Arc<Store>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Agent {
    /// Stops the agent as a shutdown does: running commands are stopped, nothing more is
    /// recorded, and the store is closed.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn tasks(data: &Path) -> Agent {
    std::fs::create_dir_all(data).unwrap();
    let store = Arc::new(Store::open(&data.join("agent.redb")).unwrap());
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let settings = Settings {
        data_dir: data.to_path_buf(),
        limits: Limits::default(),
        trusted_keys: Arc::new(TrustedKeys::default()),
        service_user: None,
    };
    let t = Tasks::new(
        settings,
        store.clone(),
        Arc::new(Notify::new()),
        cancel.clone(),
        tracker.clone(),
    );
    Agent {
        tasks: Arc::new(t),
        store,
        tracker,
        cancel,
    }
}

/// The state `tasks` reports for `id`, once it is no longer preparing or running.
async fn ended(tasks: &Tasks, id: &str) -> DatabaseTaskStatus {
    for _ in 0..500 {
        if let Some(s) = tasks.report("web").into_iter().find(|s| s.id == id)
            && !matches!(
                DatabaseTaskState::of(s.state),
                DatabaseTaskState::Preparing | DatabaseTaskState::Running
            )
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("task {id} did not end: {:?}", tasks.report("web"));
}

fn runs(ledger: &Path) -> usize {
    std::fs::read_to_string(ledger)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_task_runs_once_in_its_release_however_often_it_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = tmp.path().join("ledger");
    let script = format!(
        "echo \"$CUTOVER_DB_SCHEMA from $(pwd)\" >> {}\necho expanded",
        ledger.display()
    );
    let rel = release(tmp.path(), "2", &script);
    let data = tmp.path().join("data");
    let agent = tasks(&data);
    let t = &agent.tasks;
    let wanted = task("d-000002/expand", rel, 10_000);
    t.want("web", &wanted);
    t.want("web", &wanted);
    let s = ended(t, &wanted.id).await;
    assert_eq!(DatabaseTaskState::of(s.state), DatabaseTaskState::Succeeded);
    assert_eq!((s.exit_code, s.exit.as_str()), (Some(0), "exit status: 0"));
    assert_eq!(s.tail, ["expanded"]);
    // Asked again once it ended, and by an agent started afresh: never run again.
    t.want("web", &wanted);
    agent.stop().await;
    let again = tasks(&data);
    again.tasks.want("web", &wanted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs(&ledger), 1, "the command ran once");
    let line = std::fs::read_to_string(&ledger).unwrap();
    assert!(
        line.starts_with("app_2 from ") && line.contains("/releases/web/2-"),
        "ran with its environment in the unpacked release: {line}"
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert_eq!(log, "expanded\n", "the whole output is in {}", s.log);
    assert!(s.log.ends_with("logs/deployments/d-000002/expand.log"));
}

#[tokio::test]
async fn a_failing_a_timed_out_and_an_unstartable_task_each_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let agent = tasks(&data);
    let t = &agent.tasks;
    let failing = release(
        tmp.path(),
        "3",
        "echo 'ERROR:  column \"email\" already exists' >&2\nexit 3",
    );
    t.want("web", &task("d-000003/expand", failing, 10_000));
    let s = ended(t, "d-000003/expand").await;
    assert_eq!(DatabaseTaskState::of(s.state), DatabaseTaskState::Failed);
    assert_eq!(s.exit_code, Some(3));
    assert_eq!(s.tail, ["ERROR:  column \"email\" already exists"]);

    // The timeout stops the command's whole group, a child it left behind too.
    let pids = tmp.path().join("pids");
    let slow = release(
        tmp.path(),
        "4",
        &format!("sleep 60 & echo $! > {}\nwait", pids.display()),
    );
    t.want("web", &task("d-000004/expand", slow, 400));
    let s = ended(t, "d-000004/expand").await;
    assert_eq!(DatabaseTaskState::of(s.state), DatabaseTaskState::Failed);
    assert_eq!(
        (s.exit_code, s.exit.as_str()),
        (None, "timed out after 400ms")
    );
    let child: i32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        os::Stat::of(child).is_none_or(|st| st.zombie),
        "the command's child was stopped with it"
    );

    // A release that cannot be fetched: nothing ran, and the id is spent.
    let mut missing = release(tmp.path(), "5", "true");
    missing.artifact = format!("file://{}/nowhere.tar.gz", tmp.path().display());
    t.want("web", &task("d-000005/expand", missing, 10_000));
    let s = ended(t, "d-000005/expand").await;
    assert_eq!(DatabaseTaskState::of(s.state), DatabaseTaskState::Failed);
    assert!(s.exit.contains("nowhere.tar.gz"), "{}", s.exit);
    let newest: Vec<String> = t.report("web").into_iter().map(|s| s.id).collect();
    assert_eq!(
        newest,
        ["d-000005/expand", "d-000004/expand", "d-000003/expand"]
    );
}

#[tokio::test]
async fn a_task_running_when_the_agent_stopped_is_interrupted_and_never_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = tmp.path().join("ledger");
    let rel = release(
        tmp.path(),
        "2",
        &format!("echo run >> {}\nsleep 60", ledger.display()),
    );
    let data = tmp.path().join("data");
    let agent = tasks(&data);
    let wanted = task("d-000002/expand", rel, 60_000);
    agent.tasks.want("web", &wanted);
    let recorded = || agent.store.tasks().unwrap().first().cloned();
    for _ in 0..250 {
        if recorded().is_some_and(|r| r.pid > 0) && runs(&ledger) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let running = recorded().expect("recorded before it started");
    assert_eq!(running.state, TaskState::Running);
    assert!(running.pid > 0, "the running command's group is recorded");
    agent.stop().await;
    assert_eq!(
        Store::open(&data.join("agent.redb"))
            .unwrap()
            .tasks()
            .unwrap()[0]
            .state,
        TaskState::Running,
        "a stopping agent records nothing more"
    );

    // A hard kill leaves the command running: here, a process group of its own under
    // the recorded pid.
    let mut leftover = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = leftover.id() as i32;
    let store = Store::open(&data.join("agent.redb")).unwrap();
    let mut rec = running.clone();
    rec.pid = pid;
    rec.start_ticks = os::start_ticks(pid).unwrap();
    store.put_task(&rec).unwrap();
    assert_eq!(recover(&store, Duration::from_millis(300)).await, 1);
    assert!(
        !os::alive(rec.pid, rec.start_ticks),
        "what the interrupted command left running is stopped"
    );
    assert_eq!(recover(&store, Duration::from_millis(300)).await, 0, "once");
    let _ = leftover.wait();
    drop(store);

    let again = tasks(&data);
    again.tasks.want("web", &wanted);
    let s = ended(&again.tasks, &wanted.id).await;
    assert_eq!(
        DatabaseTaskState::of(s.state),
        DatabaseTaskState::Interrupted
    );
    assert!(s.exit.starts_with("interrupted"), "{}", s.exit);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runs(&ledger),
        1,
        "an interrupted task is never started again"
    );
}
