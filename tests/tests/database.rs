//! Database changes that ride the rollout, against a real PostgreSQL: each release ships
//! its own migrations (psql scripts) and reads through its own schema version with
//! psql; the expand runs before anything of the new release starts, the abort after a
//! rollback, the contract once the previous release is retired — each exactly once,
//! across a coordinator killed hard, and paused (not run elsewhere) when the host
//! running it is lost. Every script writes a row to a ledger table as it starts, so
//! the tests count runs where they happen: in the database.

use std::time::{Duration, Instant};

use tests::{Cluster, Load, PlanBuilder, Postgres, Value, processes_under, wait_until};

/// Where every migration script writes that it ran: deployment and phase.
const LEDGER: &str = "create table cutover_ledger (deployment text not null, phase text not null, at timestamptz not null default now())";

/// Each script's first lines: its variables from cutover's environment, and its row in
/// the ledger.
const PREAMBLE: &str = r#"\getenv schema CUTOVER_DB_SCHEMA
\getenv previous CUTOVER_PREVIOUS_DB_SCHEMA
\getenv deployment CUTOVER_DEPLOYMENT
\getenv phase CUTOVER_DB_PHASE
insert into cutover_ledger (deployment, phase) values (:'deployment', :'phase');
"#;

/// Release 1's schema: the table, and a version of it without `email`.
const V1_EXPAND: &str = r#"create table if not exists users_data (id int primary key, name text not null);
insert into users_data values (1, 'ada') on conflict do nothing;
create schema if not exists :"schema";
create or replace view :"schema".users as select id, name from users_data;
"#;

/// What release 1 reads, through its own version.
const V1_QUERY: &str = "select name from users where id = 1";
/// What release 2 reads: the column its expand adds, through its own version.
const V2_QUERY: &str = "select name || ' <' || email || '>' from users where id = 1";

/// Release 2's expand: a nullable column, filled, and a version that shows it.
const V2_EXPAND: &str = r#"alter table users_data add column if not exists email text;
update users_data set email = name || '@example.com' where email is null;
create schema if not exists :"schema";
create or replace view :"schema".users as select id, name, email from users_data;
"#;

/// Release 2's contract: the previous version goes, and the column becomes required.
const V2_CONTRACT: &str = r#"drop schema if exists :"previous" cascade;
alter table users_data alter column email set not null;
"#;

/// Any release's abort: its version goes, and the column it added.
const ABORT: &str = r#"drop schema if exists :"schema" cascade;
alter table users_data drop column if exists email;
"#;

/// The `[database]` section every test plan has.
const DATABASE: &str = r#"schema = "app_${RELEASE}"
expand = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/expand.sql"]
contract = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/contract.sql"]
abort = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/abort.sql"]
timeout = "2m""#;

/// A plan for the sample at `version` that reads `query` from `pg` and ships these
/// migrations (the preamble is added to each).
fn release(
    c: &Cluster,
    pg: &Postgres,
    version: &str,
    query: &str,
    expand: &str,
    contract: &str,
) -> PlanBuilder {
    let mut b = c
        .plan(version)
        .behaviour(&[&format!("db_query={query}")])
        .database(DATABASE)
        .file("db/expand.sql", &format!("{PREAMBLE}{expand}"))
        .file("db/contract.sql", &format!("{PREAMBLE}{contract}"))
        .file("db/abort.sql", &format!("{PREAMBLE}{ABORT}"));
    for (k, v) in pg.env() {
        b = b.env(&k, &v);
    }
    b
}

/// Release 1 over an empty database, deployed and its contract run: returns its id.
fn v1_live(c: &Cluster, pg: &Postgres) -> String {
    pg.sql(LEDGER);
    let v1 = release(c, pg, "1.0.0", V1_QUERY, V1_EXPAND, "")
        .keep_previous("1s")
        .write("v1");
    let (code, id, err) = c.deploy_wait(&v1);
    assert_eq!(code, 0, "deploy 1.0.0: {err}");
    wait_until(Duration::from_secs(30), "release 1's contract", || {
        database(c, &id)["phase"] == "contracted"
    });
    id
}

fn database(c: &Cluster, id: &str) -> Value {
    c.status(id)["database"].clone()
}

fn show(c: &Cluster, id: &str) -> Value {
    serde_json::from_str(&c.cli_ok(&["show", id, "--output", "json"])).expect("show json")
}

/// How often each phase of deployment `id` ran, from the ledger: `expand=1 abort=1`.
fn ledger(pg: &Postgres, id: &str) -> String {
    pg.sql(&format!(
        "select string_agg(phase || '=' || n, ' ' order by first) from (select phase, count(*) as n, min(at) as first from cutover_ledger where deployment = '{id}' group by phase) p"
    ))
}

/// Analysis for releases whose every request runs psql (a few dozen requests a second
/// at most): a 2 s interval of at least 8 requests on the new release fails above 5 %
/// errors.
const ANALYSIS: &str = r#"[analysis]
interval = "2s"
failure_limit = 1
min_requests = 8

[[analysis.metric]]
name = "error_rate"
max = 0.05
"#;

/// The body each release answers with, reading through its own schema version.
const V1_BODY: &str = "release 1.0.0: ada";
const V2_BODY: &str = "release 2.0.0: ada <ada@example.com>";

#[test]
fn both_releases_serve_from_their_own_schema_version_and_the_contract_follows_retirement() {
    let pg = Postgres::start();
    let c = Cluster::start(90, 2);
    let id1 = v1_live(&c, &pg);
    assert!(pg.has_schema("app_1_0_0"));
    let v2 = release(&c, &pg, "2.0.0", V2_QUERY, V2_EXPAND, V2_CONTRACT)
        .steps(r#"[{ traffic = 30, hold = "1h" }, { traffic = 100 }]"#)
        .keep_previous("1s")
        .write("v2");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(20), "release 1 serving", || {
        load.report.versions().get(V1_BODY).is_some_and(|n| *n > 20)
    });

    // At 30 %, both releases answer, each from its own version of the same table.
    let id2 = c.deploy_until_holding(&v2);
    wait_until(Duration::from_secs(30), "both releases answering", || {
        let v = load.report.versions();
        v.get(V2_BODY).is_some_and(|n| *n > 20) && v.get(V1_BODY).is_some_and(|n| *n > 50)
    });
    let db = database(&c, &id2);
    assert_eq!(db["phase"], "expanded", "{db}");
    assert_eq!(db["schema"], "app_2_0_0");
    assert_eq!(db["previous_schema"], "app_1_0_0");
    assert_eq!(
        (&db["expand"]["exit"], &db["expand"]["host"]),
        (&Value::from(0), &Value::from("web-1"))
    );
    assert!(
        db["expand"]["duration_s"].as_f64().is_some_and(|s| s > 0.0),
        "{db}"
    );
    assert!(pg.has_schema("app_1_0_0") && pg.has_schema("app_2_0_0"));

    c.cli_ok(&["promote", &id2]);
    wait_until(Duration::from_secs(30), "2.0.0 live", || {
        c.status(&id2)["state"] == "succeeded"
    });
    let report = load.stop();
    report.assert_none_failed();
    let bodies: Vec<String> = report.versions().keys().cloned().collect();
    assert_eq!(bodies, [V1_BODY, V2_BODY], "nothing else was answered");

    // keep_previous passes: release 1 retires, then its schema version goes.
    wait_until(Duration::from_secs(30), "the contract", || {
        database(&c, &id2)["phase"] == "contracted"
    });
    assert!(!pg.has_schema("app_1_0_0") && pg.has_schema("app_2_0_0"));
    assert_eq!(
        pg.sql("select is_nullable from information_schema.columns where table_name = 'users_data' and column_name = 'email'"),
        "NO"
    );
    assert!(c.all_answering(V2_BODY), "{:?}", c.versions());

    // Release 1 would read a schema that no longer exists: no rollback.
    let out = c.cli(&["rollback", "web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("the database was contracted by {id2} at"))
            && err.contains("deploy a fix forward"),
        "{err}"
    );
    assert_eq!(ledger(&pg, &id1), "expand=1 contract=1");
    assert_eq!(ledger(&pg, &id2), "expand=1 contract=1");
    let history = c.cli_ok(&["history"]);
    assert!(
        history
            .lines()
            .next()
            .is_some_and(|h| h.contains("DATABASE")),
        "{history}"
    );
    assert!(history.contains("contracted"), "{history}");
}

#[test]
fn an_expand_that_fails_halfway_is_aborted_before_anything_of_its_release_starts() {
    let pg = Postgres::start();
    let c = Cluster::start(91, 2);
    v1_live(&c, &pg);

    // Bad input is refused before anything runs.
    let bad = release(&c, &pg, "2.0.0", V2_QUERY, V2_EXPAND, V2_CONTRACT)
        .database(&DATABASE.replace("app_${RELEASE}", "${RELEASE}"))
        .write("bad-schema");
    let out = c.cli(&["plan", "validate", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("database.schema: \"${RELEASE}\" gives \"2_0_0\" for release 2.0.0, which is not a schema name"),
        "{err}"
    );
    let nowhere = release(&c, &pg, "2.0.0", V2_QUERY, V2_EXPAND, V2_CONTRACT)
        .database(&format!("{DATABASE}\nrun_on = {{ role = \"db\" }}"))
        .write("nowhere");
    let out = c.cli(&["deploy", nowhere.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "[database] run_on (role=db) matches none of the 2 target host(s) (web-1, web-2)"
        ),
        "{err}"
    );

    // The expand does half its work, then fails.
    let broken = format!("{V2_EXPAND}select 1 / 0;\n");
    let v2 = release(&c, &pg, "2.0.0", V2_QUERY, &broken, V2_CONTRACT).write("v2");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(20), "load", || load.report.ok() > 20);
    let (code, id2, err) = c.deploy_wait(&v2);
    assert_eq!(code, 3, "{err}");
    let report = load.stop();
    report.assert_none_failed();
    assert_eq!(
        report.versions().keys().cloned().collect::<Vec<_>>(),
        [V1_BODY]
    );

    let s = c.status(&id2);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("database expand failed on web-1 (exit status: 3): ")
            && reason.contains("division by zero"),
        "{reason}"
    );
    let db = &s["database"];
    assert_eq!(db["phase"], "aborted", "{db}");
    assert_eq!(
        (&db["expand"]["exit"], &db["abort"]["exit"]),
        (&Value::from(3), &Value::from(0))
    );
    assert_eq!(ledger(&pg, &id2), "expand=1 abort=1");
    assert!(
        !pg.has_schema("app_2_0_0"),
        "the abort undid the half-done expand"
    );
    assert_eq!(
        pg.sql("select count(*) from information_schema.columns where table_name = 'users_data' and column_name = 'email'"),
        "0"
    );
    // Nothing of 2.0.0 started anywhere.
    for a in &c.agents {
        let log = std::fs::read_to_string(&a.proc.log).unwrap_or_default();
        assert!(
            !log.lines()
                .any(|l| l.contains("slot process started") && l.contains("2.0.0")),
            "{}: a slot of 2.0.0 started",
            a.name
        );
    }
    // `show` says where the expand's whole output is.
    let text = c.cli_ok(&["show", &id2]);
    assert!(
        text.contains(&format!(
            "output in web-1:{}",
            c.agents[0]
                .data_dir
                .join(format!("logs/deployments/{id2}/expand.log"))
                .display()
        )),
        "{text}"
    );
    let log = std::fs::read_to_string(
        c.agents[0]
            .data_dir
            .join(format!("logs/deployments/{id2}/expand.log")),
    )
    .unwrap();
    assert!(log.contains("division by zero"), "{log}");
    let stats: Value = serde_json::from_str(&c.cli_ok(&["stats", "--output", "json"])).unwrap();
    assert_eq!(stats["failures_by_phase"]["database expand"], 1, "{stats}");
}

#[test]
fn a_release_rolled_back_by_analysis_after_a_good_expand_is_aborted_once_traffic_left_it() {
    let pg = Postgres::start();
    let c = Cluster::start(92, 2);
    v1_live(&c, &pg);
    let v2 = release(&c, &pg, "2.0.0", V2_QUERY, V2_EXPAND, V2_CONTRACT)
        .behaviour(&["error_rate=0.3", &format!("db_query={V2_QUERY}")])
        .steps(r#"[{ traffic = 30, hold = "30s" }, { traffic = 100 }]"#)
        .analysis(ANALYSIS)
        .write("v2");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(20), "load", || load.report.ok() > 20);
    let (code, id2, err) = c.deploy_wait(&v2);
    load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id2);
    assert!(
        s["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("analysis failed")),
        "{s}"
    );
    let db = &s["database"];
    assert_eq!(
        (&db["phase"], &db["expand"]["exit"], &db["abort"]["exit"]),
        (&Value::from("aborted"), &Value::from(0), &Value::from(0)),
        "{db}"
    );
    assert_eq!(ledger(&pg, &id2), "expand=1 abort=1");
    assert!(!pg.has_schema("app_2_0_0") && pg.has_schema("app_1_0_0"));

    // The abort began only once every host had confirmed the old weights.
    let timeline = show(&c, &id2)["timeline"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let at = |pred: &dyn Fn(&Value) -> bool| {
        timeline
            .iter()
            .find(|e| pred(e))
            .and_then(|e| e["at_unix_ms"].as_u64())
    };
    let done = at(&|e| e["event"] == "rollback_done").expect("rollback done");
    let abort = at(&|e| e["event"] == "database_started" && e["phase"] == "abort").expect("abort");
    let decided = s["rollback"]["decided_at"].as_str().map(String::from);
    assert!(
        abort >= done,
        "abort at {abort}, rollback confirmed at {done}"
    );
    let decided_ms = at(&|e| e["event"] == "rollback_started").expect("rollback started");
    eprintln!(
        "rollback decided ({decided:?}) to abort started: {} ms (hosts confirmed after {} ms)",
        abort - decided_ms,
        done - decided_ms
    );
    wait_until(Duration::from_secs(10), "1.0.0 serving", || {
        c.all_answering(V1_BODY)
    });
}

#[test]
fn a_coordinator_killed_during_a_slow_expand_resumes_it_and_it_runs_once() {
    let pg = Postgres::start();
    let mut c = Cluster::start(93, 2);
    v1_live(&c, &pg);
    let slow = format!("select pg_sleep(4);\n{V2_EXPAND}");
    let v2 = release(&c, &pg, "2.0.0", V2_QUERY, &slow, V2_CONTRACT).write("v2");
    let id2 = c.deploy(&v2);
    wait_until(Duration::from_secs(30), "the expand running", || {
        ledger(&pg, &id2) == "expand=1"
    });
    if let Some(mut coord) = c.coordinator.take() {
        coord.kill();
    }
    c.start_coordinator();
    wait_until(Duration::from_secs(60), "2.0.0 live", || {
        c.status(&id2)["state"] == "succeeded"
    });
    assert_eq!(ledger(&pg, &id2), "expand=1", "the expand ran once");
    let db = database(&c, &id2);
    assert_eq!(
        (&db["expand"]["task"], &db["expand"]["attempt"]),
        (&Value::from(format!("{id2}/expand")), &Value::from(1)),
        "{db}"
    );
    assert!(c.all_answering(V2_BODY), "{:?}", c.versions());
}

#[test]
fn the_host_running_the_expand_lost_pauses_the_deployment_and_resume_runs_it_elsewhere() {
    let pg = Postgres::start();
    let mut c = Cluster::start(94, 2);
    v1_live(&c, &pg);
    // The first attempt hangs; a second one goes through.
    let hangs_once = format!(
        "select pg_sleep(case when count(*) = 1 then 60 else 0 end) from cutover_ledger where deployment = :'deployment' and phase = 'expand';\n{V2_EXPAND}"
    );
    let v2 = release(&c, &pg, "2.0.0", V2_QUERY, &hangs_once, V2_CONTRACT)
        .host_lost_after("2s")
        .on_host_lost("continue")
        .write("v2");
    let id2 = c.deploy(&v2);
    wait_until(Duration::from_secs(30), "the expand running", || {
        ledger(&pg, &id2) == "expand=1"
    });
    // web-1 goes down hard, with everything it ran.
    let lost = Instant::now();
    c.agents[0].proc.kill();
    for pid in processes_under(&c.agents[0].data_dir) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    wait_until(Duration::from_secs(30), "the deployment paused", || {
        c.status(&id2)["state"] == "paused"
    });
    eprintln!("runner lost to pause: {:?}", lost.elapsed());
    let s = c.status(&id2);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(
            "paused: database expand: host web-1 unreachable for more than 2s while the command ran"
        ),
        "{reason}"
    );
    // Paused, it is not run anywhere else by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ledger(&pg, &id2), "expand=1");
    assert_eq!(c.status(&id2)["state"], "paused");

    c.cli_ok(&["resume", &id2]);
    wait_until(
        Duration::from_secs(60),
        "2.0.0 live where it can be",
        || c.status(&id2)["state"] == "succeeded",
    );
    let db = database(&c, &id2);
    assert_eq!(
        (
            &db["expand"]["host"],
            &db["expand"]["task"],
            &db["expand"]["exit"]
        ),
        (
            &Value::from("web-2"),
            &Value::from(format!("{id2}/expand#2")),
            &Value::from(0)
        ),
        "{db}"
    );
    assert_eq!(ledger(&pg, &id2), "expand=2");
}
