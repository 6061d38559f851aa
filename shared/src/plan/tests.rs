use super::*;
use crate::duration::Duration;

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn spec_example() -> String {
    format!(
        r#"service = "web"

[release]
version = "1.4.2"
artifact = "https://artifacts.example/web-1.4.2.tar.gz"
sha256 = "{SHA}"

[targets]
labels = {{ env = "prod", role = "web" }}

[run]
command = ["./bin/web", "--port", "${{PORT}}"]
env = {{ RUST_LOG = "info" }}
listen = 8080
protocol = "http"
stop_timeout = "30s"
drain = "5s"

[health]
http = "/healthz"
interval = "1s"
timeout = "2s"
healthy_after = 2
unhealthy_after = 3
start_timeout = "60s"

[strategy]
max_parallel = "25%"
max_failed_hosts = 0
keep_previous = "1h"
bake = "5m"
steps = [
  {{ traffic = 1,   hold = "2m" }},
  {{ traffic = 10,  hold = "5m", hosts = "50%", pause = true }},
  {{ traffic = 100, hold = "0s" }},
]

[analysis]
interval = "10s"
failure_limit = 2
min_requests = 50

[[analysis.metric]]
name = "error_rate"
max = 0.01

[[analysis.metric]]
name = "latency_p99"
max = 500
max_vs_baseline = 1.5
"#
    )
}

fn err(text: &str) -> PlanError {
    Plan::parse(text, "plan.toml").expect_err("plan should be refused")
}

#[test]
fn spec_example_parses_every_key() {
    let p = Plan::parse(&spec_example(), "plan.toml").unwrap();
    assert_eq!(p.service, "web");
    assert_eq!(p.release.version, "1.4.2");
    assert_eq!(
        p.targets.labels.get("role").map(String::as_str),
        Some("web")
    );
    assert_eq!(p.run.command, ["./bin/web", "--port", "${PORT}"]);
    assert_eq!(p.run.listen, 8080);
    assert_eq!(p.run.protocol, Protocol::Http);
    assert_eq!(p.run.drain, Duration::from_secs(5));
    assert_eq!(p.health.check(), Some(Check::Http("/healthz".into())));
    assert_eq!(p.health.start_timeout, Duration::from_secs(60));
    assert_eq!(p.strategy.max_parallel, Count::Percent(25));
    assert_eq!(p.strategy.bake, Duration::from_secs(300));
    assert_eq!(p.strategy.steps.len(), 3);
    assert_eq!(p.strategy.steps[1].hosts, Some(Count::Percent(50)));
    assert!(p.strategy.steps[1].pause);
    let a = p.analysis.unwrap();
    assert_eq!(a.metric.len(), 2);
    assert_eq!(a.metric[1].proxy_name(), Some(MetricName::LatencyP99));
    assert_eq!(a.metric[1].max_vs_baseline, Some(1.5));
}

#[test]
fn minimal_plan_gets_defaults() {
    let text = format!(
        "service = \"api\"\n[release]\nversion = \"1\"\nartifact = \"file:///tmp/a.tar.gz\"\nsha256 = \"{SHA}\"\n[run]\ncommand = [\"./api\"]\nlisten = 9000\nprotocol = \"tcp\"\n[health]\ntcp = true\n"
    );
    let p = Plan::parse(&text, "p.toml").unwrap();
    assert_eq!(p.strategy.steps.len(), 1);
    assert_eq!(p.strategy.steps[0].traffic, 100);
    assert_eq!(p.health.check(), Some(Check::Tcp));
    assert_eq!(p.run.stop_timeout, Duration::from_secs(30));
    assert_eq!(p.strategy.on_host_lost, OnHostLost::Pause);
    assert!(p.analysis.is_none());
}

#[test]
fn typo_in_section_suggests_nearest_key_with_location() {
    let text = spec_example().replace("[health]", "[heath]");
    let e = err(&text);
    assert!(e.message.contains("did you mean `health`"), "{e}");
    assert_eq!(e.file, "plan.toml");
    let line = text.lines().position(|l| l == "[heath]").unwrap() + 1;
    assert_eq!(e.line, line, "{e}");
}

#[test]
fn typo_in_nested_key_is_located() {
    let text = spec_example().replace("healthy_after = 2", "healty_after = 2");
    let e = err(&text);
    assert!(e.message.contains("did you mean `healthy_after`"), "{e}");
    let line = text
        .lines()
        .position(|l| l.starts_with("healty_after"))
        .unwrap()
        + 1;
    assert_eq!((e.line, e.column), (line, 1), "{e}");
}

#[test]
fn wrong_type_is_located() {
    let text = spec_example().replace("listen = 8080", "listen = \"8080\"");
    let e = err(&text);
    let line = text.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
    assert_eq!(e.line, line, "{e}");
}

#[test]
fn traffic_over_100_names_the_step() {
    let text = spec_example().replace("traffic = 100,", "traffic = 101,");
    let e = err(&text);
    assert!(e.message.contains("strategy.steps[2].traffic"), "{e}");
    let line = text
        .lines()
        .position(|l| l.contains("traffic = 101"))
        .unwrap()
        + 1;
    assert_eq!(e.line, line, "{e}");
    assert!(
        e.to_string().starts_with(&format!("plan.toml:{line}:")),
        "{e}"
    );
}

#[test]
fn refusals() {
    let cases: &[(&str, &str, &str)] = &[
        ("traffic = 10, ", "traffic = 0, ", "not a percentage"),
        ("{ traffic = 10, ", "{ traffic = 0, ", "not a percentage"),
        ("traffic = 1,   hold", "traffic = 50,   hold", "goes down"),
        (
            "traffic = 100, hold = \"0s\"",
            "traffic = 90, hold = \"0s\"",
            "must end at 100",
        ),
        ("http = \"/healthz\"", "", "no health check"),
        (
            "http = \"/healthz\"",
            "http = \"healthz\"",
            "starting with '/'",
        ),
        (
            "http = \"/healthz\"",
            "http = \"/h\"\ntcp = true",
            "only one",
        ),
        ("listen = 8080", "listen = 80", "below 1024"),
        ("listen = 8080", "listen = 70000", ""),
        ("sha256 = \"", "sha256 = \"abc", "SHA-256"),
        (
            "https://artifacts.example",
            "ftp://artifacts.example",
            "file:///",
        ),
        (
            "service = \"web\"",
            "service = \"Web Site\"",
            "service name",
        ),
        (
            "interval = \"1s\"",
            "interval = \"1 second\"",
            "invalid duration",
        ),
        ("interval = \"1s\"", "interval = 5", "needs a unit"),
        (
            "protocol = \"http\"",
            "protocol = \"htp\"",
            "did you mean \"http\"",
        ),
        (
            "name = \"error_rate\"",
            "name = \"eror_rate\"",
            "did you mean \"error_rate\"",
        ),
        ("max = 0.01", "max = 2.0", "fraction"),
        ("max_parallel = \"25%\"", "max_parallel = \"0%\"", "share"),
        ("max_parallel = \"25%\"", "max_parallel = 0", "at least 1"),
        ("failure_limit = 2", "failure_limit = 0", "at least 1"),
        ("healthy_after = 2", "healthy_after = -1", ""),
        (
            "command = [\"./bin/web\", \"--port\", \"${PORT}\"]",
            "command = []",
            "program",
        ),
        ("hosts = \"50%\"", "hosts = \"150%\"", "share"),
        (
            "role = \"web\"",
            "role = \"web server\"",
            "targets.labels: label role: value \"web server\"",
        ),
        (
            "env = \"prod\"",
            "\"my env\" = \"prod\"",
            "targets.labels: label key \"my env\"",
        ),
        (
            "role = \"web\"",
            "role = \"\"",
            "label role: value \"\" is empty",
        ),
    ];
    for (from, to, want) in cases {
        let base = spec_example();
        assert!(base.contains(from), "test case does not apply: {from}");
        let text = base.replacen(from, to, 1);
        let e = err(&text);
        assert!(e.message.contains(want), "{from} -> {to}: got {e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
}

#[test]
fn empty_steps_and_missing_sections() {
    let text = spec_example();
    let start = text.find("steps = [").unwrap();
    let end = text[start..].find("]\n").unwrap() + start + 2;
    let mut t = text.clone();
    t.replace_range(start..end, "steps = []\n");
    assert!(err(&t).message.contains("no steps"));

    let start = text.find("[health]").unwrap();
    let end = text.find("[strategy]").unwrap();
    let mut t = text.clone();
    t.replace_range(start..end, "");
    assert!(err(&t).message.contains("[health]"), "{}", err(&t));
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        "\0",
        "[[[",
        "service = ",
        "a = 1\n[a]",
        "service = 1",
        "\u{feff}x=1",
    ] {
        let _ = Plan::parse(text, "p.toml");
    }
}

#[test]
fn count_of_hosts() {
    assert_eq!(Count::Percent(25).of(3), 1);
    assert_eq!(Count::Percent(50).of(3), 2);
    assert_eq!(Count::Percent(100).of(3), 3);
    assert_eq!(Count::Hosts(5).of(3), 3);
    assert_eq!(Count::Hosts(1).of(0), 0);
}

#[test]
fn nearest_word() {
    assert_eq!(nearest("heath", &["health", "run"]), Some("health"));
    assert_eq!(nearest("zzzzzz", &["health", "run"]), None);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn check(text: &str) -> Result<(), TestCaseError> {
        match Plan::parse(text, "p.toml") {
            Ok(_) => {}
            Err(e) => {
                let line = e.to_string();
                prop_assert!(!line.contains('\n'), "one line: {line:?}");
                prop_assert!(line.starts_with("p.toml:"), "names the file: {line:?}");
                prop_assert!(e.line >= 1 && e.column >= 1);
                prop_assert!(
                    e.line <= text.lines().count().max(1) + 1,
                    "line in range: {line:?}"
                );
            }
        }
        Ok(())
    }

    proptest! {
        // CUTOVER_FUZZ_CASES sets the number of cases (default 2000) for long campaigns.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("CUTOVER_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
            ..ProptestConfig::default()
        })]

        /// Arbitrary text never panics and errors are one located line.
        #[test]
        fn arbitrary_text(text in "\\PC{0,400}") {
            check(&text)?;
        }

        /// The SPEC example with one slice cut out, or one byte changed.
        #[test]
        fn mutated_spec_plan(cut_at in 0usize..2000, cut_len in 0usize..40, byte in any::<u8>(), at in 0usize..2000) {
            let base = spec_example();
            let mut bytes = base.clone().into_bytes();
            let start = cut_at.min(bytes.len());
            let end = (start + cut_len).min(bytes.len());
            bytes.drain(start..end);
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] = byte;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            check(&text)?;
        }
    }
}

/// Every value of the SPEC example, given a value of another type: the error names the
/// key and says what it takes in the plan's words, never in Rust's.
#[test]
fn a_wrong_type_anywhere_is_said_in_the_plans_words() {
    let text = spec_example();
    let root = toml::de::DeTable::parse(&text).unwrap();
    let mut values = Vec::new();
    for (k, v) in root.get_ref().iter() {
        values_under(&text, k.get_ref().to_string(), v, &mut values);
    }
    assert!(values.len() > 40, "{} values", values.len());
    for (path, span, other) in values {
        let mutated = format!("{}{other}{}", &text[..span.start], &text[span.end..]);
        let e = err(&mutated);
        // An element of a list, or of a table of the user's keys, is described by its key.
        let mut key = path.as_str();
        while key.ends_with(']') {
            key = key.rsplit_once('[').map_or(key, |(k, _)| k);
        }
        let key = key
            .replace(".labels.env", ".labels")
            .replace(".labels.role", ".labels")
            .replace(".env.RUST_LOG", ".env");
        assert!(
            e.message.starts_with(&format!("{key} must be "))
                || e.message.starts_with(&format!("{key}: ")),
            "{path} = {other}: {e}"
        );
        for rust in [
            "u16",
            "u32",
            "u64",
            "f64",
            "sequence",
            "a map",
            "struct",
            "invalid type",
            "invalid value",
            "wanted",
            "expected",
        ] {
            assert!(!e.message.contains(rust), "{path} = {other}: {e}");
        }
        let line = mutated[..span.start].matches('\n').count() + 1;
        assert_eq!(e.line, line, "{path}: {e}");
    }
}

/// Every value written inline under `path` (not sections), each with a value of another
/// type to put in its place.
fn values_under(
    text: &str,
    path: String,
    v: &toml::Spanned<toml::de::DeValue<'_>>,
    out: &mut Vec<(String, std::ops::Range<usize>, &'static str)>,
) {
    use toml::de::DeValue;
    let written = &text[v.span()];
    let other = match v.get_ref() {
        DeValue::String(_) => "true",
        DeValue::Boolean(_) => "\"yes\"",
        DeValue::Integer(_) | DeValue::Float(_) => "\"some text\"",
        DeValue::Array(_) | DeValue::Table(_) | DeValue::Datetime(_) => "7",
    };
    // Sections and arrays of sections are headers, not values.
    let header = written.starts_with("[[")
        || matches!(v.get_ref(), DeValue::Table(_)) && written.starts_with('[');
    if !header {
        out.push((path.clone(), v.span(), other));
    }
    match v.get_ref() {
        DeValue::Table(t) => {
            for (k, child) in t.iter() {
                values_under(text, format!("{path}.{}", k.get_ref()), child, out);
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                values_under(text, format!("{path}[{i}]"), item, out);
            }
        }
        _ => {}
    }
}

#[test]
fn type_errors_name_the_key_and_show_an_example() {
    let e = err(&spec_example().replace("listen = 8080", "listen = 80800"));
    assert_eq!(
        e.message,
        "run.listen must be a port number 1–65535 (found 80800)"
    );
    let e = err(&spec_example().replace(
        "command = [\"./bin/web\", \"--port\", \"${PORT}\"]",
        "command = \"./bin/web --port ${PORT}\"",
    ));
    assert_eq!(
        e.message,
        "run.command must be a list of strings like [\"./bin/web\", \"--port\", \"${PORT}\"] \
         (found \"./bin/web --port ${PORT}\")"
    );
    let e = err(&spec_example().replace("protocol = \"http\"", "protocol = 1"));
    assert_eq!(
        e.message,
        "run.protocol must be \"http\" or \"tcp\" (found 1)"
    );
    let e = err(&spec_example().replace(
        "[[analysis.metric]]\nname = \"error_rate\"",
        "[[analysis.metric]]\nname = 2",
    ));
    assert!(
        e.message.starts_with(
            "analysis.metric[0].name must be a metric name in quotes, like \"error_rate\""
        ),
        "{e}"
    );
    let text = spec_example()
        .replace("service = \"web\"", "service = \"web\"\ntargets = 1")
        .replace("[targets]\nlabels = { env = \"prod\", role = \"web\" }", "");
    assert_eq!(
        err(&text).message,
        "targets must be a [targets] section (found 1)"
    );
}

#[test]
fn unknown_placeholders_are_refused_where_they_are() {
    let text = spec_example().replace("\"${PORT}\"]", "\"${PROT}\"]");
    let e = err(&text);
    assert_eq!(
        e.message,
        "run.command[2]: unknown variable ${PROT}: did you mean ${PORT}?"
    );
    let line = text.lines().position(|l| l.contains("${PROT}")).unwrap() + 1;
    let column = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"${PROT}")
        .unwrap()
        + 1;
    assert_eq!((e.line, e.column), (line, column), "{e}");

    let e = err(&spec_example().replace("RUST_LOG = \"info\"", "RUST_LOG = \"${PORTT}\""));
    assert_eq!(
        e.message,
        "run.env.RUST_LOG: unknown variable ${PORTT}: did you mean ${PORT}?"
    );
    let ok = spec_example().replace("RUST_LOG = \"info\"", "ADDR = \"127.0.0.1:${PORT}\"");
    assert!(Plan::parse(&ok, "plan.toml").is_ok());
}

#[test]
fn a_plan_over_the_size_limit_is_refused_before_parsing() {
    let mut text = spec_example();
    let room = MAX_PLAN_BYTES - text.len();
    text.push_str(&"#".repeat(room));
    assert!(
        Plan::parse(&text, "plan.toml").is_ok(),
        "exactly at the limit"
    );
    text.push('#');
    let e = err(&text);
    assert_eq!((e.line, e.column), (1, 1));
    assert_eq!(
        e.message,
        "the plan is 1.0 MiB; a plan may be at most 1 MiB"
    );
    let e = err(&"#".repeat(10 * 1024 * 1024));
    assert_eq!(
        e.message,
        "the plan is 10.0 MiB; a plan may be at most 1 MiB"
    );
}

/// The SPEC's `[database]` section, appended to the SPEC's example plan.
fn with_database(section: &str) -> String {
    format!("{}\n[database]\n{section}", spec_example())
}

const DATABASE: &str = r#"schema = "app_${RELEASE}"
expand   = ["psql", "-v", "ON_ERROR_STOP=1", "-f", "db/expand.sql"]
contract = ["psql", "-v", "ON_ERROR_STOP=1", "-f", "db/contract.sql"]
abort    = ["psql", "-v", "ON_ERROR_STOP=1", "-f", "db/abort.sql"]
timeout = "10m"
run_on = { role = "db" }
contract_after = "retire"
"#;

#[test]
fn the_database_section_parses_and_names_each_release_schema() {
    let p = Plan::parse(&with_database(DATABASE), "plan.toml").unwrap();
    let db = p.database.expect("[database]");
    assert_eq!(db.schema_name(&p.release.version), "app_1_4_2");
    assert_eq!(db.schema_name("2.0.0-rc.1+b7"), "app_2_0_0_rc_1_b7");
    assert_eq!(db.expand[4], "db/expand.sql");
    assert_eq!(db.timeout, Duration::from_secs(600));
    assert_eq!(db.run_on.get("role").map(String::as_str), Some("db"));
    assert_eq!(db.contract_after, ContractAfter::Retire);
    // Defaults: ten minutes, any target host, contract at retirement.
    let short = "schema = \"s\"\nexpand = [\"e\"]\ncontract = [\"c\"]\nabort = [\"a\"]\n";
    let db = Plan::parse(&with_database(short), "p.toml")
        .unwrap()
        .database
        .unwrap();
    assert_eq!(
        (db.timeout, db.run_on.len(), db.contract_after),
        (Duration::from_secs(600), 0, ContractAfter::Retire)
    );
    // A plan without the section has no schema change, and writes none back.
    let p = Plan::parse(&spec_example(), "plan.toml").unwrap();
    assert!(p.database.is_none());
    assert!(!toml::to_string(&p).unwrap().contains("database"));
}

#[test]
fn bad_database_sections_are_refused_where_they_are() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "schema = \"app_${RELEASE}\"",
            "schema = \"${RELEASE}\"",
            "database.schema: \"${RELEASE}\" gives \"1_4_2\" for release 1.4.2, which is not a schema name (a letter or _ first, then letters, digits and _)",
        ),
        (
            "schema = \"app_${RELEASE}\"",
            "schema = \"app-${RELEASE}\"",
            "database.schema: \"app-${RELEASE}\" gives \"app-1_4_2\" for release 1.4.2, which is not a schema name (a letter or _ first, then letters, digits and _)",
        ),
        (
            "schema = \"app_${RELEASE}\"",
            "schema = \"app_${VERSION}\"",
            "database.schema: unknown variable ${VERSION}; the only variable here is ${RELEASE}",
        ),
        (
            "schema = \"app_${RELEASE}\"",
            "schema = \"pg_${RELEASE}\"",
            "database.schema: \"pg_${RELEASE}\" gives \"pg_1_4_2\" for release 1.4.2, which starts with pg_, which PostgreSQL keeps for its own schemas",
        ),
        (
            "expand   = [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/expand.sql\"]",
            "expand = []",
            "database.expand: must name the program to run, e.g. [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/expand.sql\"]",
        ),
        (
            "abort    = [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/abort.sql\"]",
            "abort = [\" \"]",
            "database.abort: must name the program to run, e.g. [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/expand.sql\"]",
        ),
        (
            "timeout = \"10m\"",
            "timeout = \"0s\"",
            "database.timeout: must be more than 0s",
        ),
        (
            "run_on = { role = \"db\" }",
            "run_on = { role = \"db primary\" }",
            "database.run_on: label role: value \"db primary\" may only hold A-Z, a-z, 0-9, '.', '_' and '-', and must start with a letter or digit (separate labels with commas: k=v,k2=v2)",
        ),
    ];
    for (from, to, message) in cases {
        let text = with_database(&DATABASE.replace(from, to));
        assert_ne!(text, with_database(DATABASE), "{from} not in the section");
        let e = err(&text);
        assert_eq!(e.message, *message);
        let line = text.lines().position(|l| l.starts_with(to)).unwrap() + 1;
        assert_eq!(e.line, line, "{e}");
    }
    let long = format!("schema = \"{}_${{RELEASE}}\"", "a".repeat(60));
    let e = err(&with_database(
        &DATABASE.replace("schema = \"app_${RELEASE}\"", &long),
    ));
    assert!(
        e.message.ends_with("which is longer than 63 characters"),
        "{e}"
    );
    // A typo in `contract_after` gets the word it was meant to be.
    let e = err(&with_database(
        &DATABASE.replace("\"retire\"", "\"retired\""),
    ));
    assert_eq!(
        e.message,
        "database.contract_after: unknown value \"retired\": did you mean \"retire\"?"
    );
    let e = err(&with_database(&DATABASE.replace("run_on", "run_in")));
    assert!(e.message.contains("did you mean `run_on`"), "{e}");
    let e = err(&with_database(&DATABASE.replace(
        "abort    = [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/abort.sql\"]\n",
        "",
    )));
    assert!(e.message.contains("abort"), "{e}");
}
