//! What the agent asks the kernel about processes, written once: a process's line in
//! `/proc/PID/stat` (state, process group, start time), whether a recorded process still
//! runs, the members of a process group, and signals to a whole group.
//!
//! A process is known by its pid *and* its start time: a pid alone may have been handed
//! to another process since it was recorded.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Exited but not reaped yet (state `Z`): it runs no more, whatever its pid says.
    pub zombie: bool,
    /// Its process group, to find what is left of a group after its leader exits.
    pub pgrp: i32,
    /// Clock ticks since boot when it started (field 22), which tells a recycled pid
    /// from the process that was recorded.
    pub start_ticks: u64,
}

impl Stat {
    /// Parses one `/proc/PID/stat` line. The command name (field 2) is in parentheses
    /// and may hold spaces and parentheses itself, so fields are counted after the last
    /// `)`.
    pub fn parse(line: &str) -> Option<Stat> {
        let after = line.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After the name: state (3), ppid (4), pgrp (5), ... starttime (22).
        Some(Stat {
            zombie: *fields.first()? == "Z",
            pgrp: fields.get(2)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }

    /// The process's line now; `None` once it is gone (or unreadable).
    pub fn of(pid: i32) -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// Start time of a process in clock ticks since boot.
pub fn start_ticks(pid: i32) -> Option<u64> {
    Stat::of(pid).map(|s| s.start_ticks)
}

/// True while the recorded process runs: same pid, same start time, not a zombie.
pub fn alive(pid: i32, start_ticks: u64) -> bool {
    Stat::of(pid).is_some_and(|s| !s.zombie && s.start_ticks == start_ticks)
}

/// The live (not zombie) processes of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| Stat::of(*pid).is_some_and(|s| !s.zombie && s.pgrp == pgid))
        .collect()
}

/// Sends `signal` to every process of group `pgid`. A group that is already gone is
/// not an error worth telling: the caller wanted it stopped.
pub fn signal_group(pgid: i32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid), signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "4242 (we (ird) name) S 1 4240 4240 0 -1 4194560 103 0 0 0 \
                    0 0 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                zombie: false,
                pgrp: 4240,
                start_ticks: 987_654
            })
        );
        let zombie = line.replace(") S 1", ") Z 1");
        assert!(Stat::parse(&zombie).is_some_and(|s| s.zombie));
        assert_eq!(Stat::parse("4242 (cut) S 1 2"), None);
        assert_eq!(Stat::parse("no name here"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let ticks = start_ticks(me).expect("own start time");
        assert!(alive(me, ticks));
        assert!(
            !alive(me, ticks + 1),
            "a recycled pid is not the recorded process"
        );
        assert!(!alive(i32::MAX - 1, ticks));
    }
}
