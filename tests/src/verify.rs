//! Verifying a release before it meets a customer, for the end-to-end tests: plans with
//! `[hooks]` and a `[strategy] shadow` phase, and the processes a hook left behind.

use crate::plan::{PlanBuilder, list, quoted};

impl PlanBuilder {
    /// `[hooks] NAME = { command = [...], timeout = "…" }`; NAME is `before_start`,
    /// `validate` or `before_stop`.
    pub fn hook(self, name: &str, command: &[&str], timeout: &str) -> Self {
        let command: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        let value = format!(
            "{{ command = {}, timeout = {} }}",
            list(&command),
            quoted(timeout)
        );
        self.section_line("hooks", name, &value)
    }

    /// `[strategy] shadow = { duration = "…", share = N, methods = [...] }`.
    pub fn shadow(self, duration: &str, share: u32, methods: &[&str]) -> Self {
        let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        let value = format!(
            "{{ duration = {}, share = {share}, methods = {} }}",
            quoted(duration),
            list(&methods)
        );
        self.strategy_line("shadow", &value)
    }
}

/// Whether process `pid` still runs (a zombie waiting for its parent does not).
pub fn process_runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}
