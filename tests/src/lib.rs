//! Harness for cutover's end-to-end tests: it runs the real `cutover` and `cutover-agent`
//! binaries as separate processes, each with its own data dir and log file, on
//! 127.0.0.x addresses; waits for conditions by polling with deadlines; stops processes
//! with SIGTERM then SIGKILL; and keeps the logs of a failed test.
//!
//! By concern: `procs` (binaries, processes, polling), `cluster` (a coordinator and its
//! agents, the CLI against them), `deploy` (deploying and what each host serves), `plan`
//! (the sample release and plans for it), `load` (client load and what it saw), `http`
//! (one GET), `disk` (small disks), `netns` (network partitions), `people` (personal
//! credentials and the CLI run with them), `postgres` (a real PostgreSQL server of the
//! test's own), `prometheus` (a real Prometheus server discovering the agents' slots),
//! `verify` (plans with hooks and a shadow phase), `fidelity` (the sample's answers of
//! every HTTP/1.1 framing, for the proxy fidelity test).
//! `fleetsim` is the fleet simulator behind `cutover-fleetsim`.

mod cluster;
mod deploy;
mod disk;
pub mod fidelity;
pub mod fleetsim;
mod http;
mod load;
pub mod netns;
mod people;
mod plan;
mod postgres;
mod procs;
mod prometheus;
mod verify;

pub use cluster::{Agent, Cluster};
pub use disk::Tmpfs;
pub use http::get;
pub use load::{Load, LoadReport};
pub use plan::{ANALYSIS_ERRORS, Artifact, PlanBuilder, SAMPLE_COMMAND};
pub use postgres::Postgres;
pub use procs::{Proc, bin_dir, free_port, processes_under, wait_until};
pub use prometheus::{AGENT_HTTP_PORT, Prometheus, fifteen_metrics};
pub use serde_json::Value;
pub use verify::process_runs;
