//! Private ports of slot processes on 127.0.0.1: the range they come from
//! (`cutover-agent run --slot-ports FIRST-LAST`) and picking a free one. A slot picks its
//! port right before each start, and another one after a failed start, so a port taken
//! meanwhile by another program (or another agent on the same machine) costs one retry,
//! never the host.

use std::fmt;
use std::str::FromStr;

/// Where the default range starts; it ends below the kernel's ephemeral range.
const DEFAULT_FIRST: u16 = 10_000;
/// Random probes before the whole range is walked.
const PROBES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no free port in the slot port range {0} (--slot-ports)")]
    Exhausted(PortRange),
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// The lowest port a slot may get.
    pub first: u16,
    /// The highest port a slot may get.
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `FIRST-LAST`, e.g. `20000-29999`; a single port is `20000-20000`. Errors say what
    /// is wrong without repeating the value (clap's message quotes it).
    fn from_str(s: &str) -> Result<PortRange, String> {
        let Some((a, b)) = s.trim().split_once('-') else {
            return Err("expected FIRST-LAST, e.g. 20000-29999".to_string());
        };
        let port = |t: &str| match t.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("{} is not a port (1 to 65535)", t.trim())),
        };
        let (first, last) = (port(a)?, port(b)?);
        if first > last {
            return Err("the first port is above the last".to_string());
        }
        Ok(PortRange { first, last })
    }
}

impl PortRange {
    /// 10000 up to just below the kernel's ephemeral range, where outgoing connections
    /// and other programs' port-0 listeners take theirs (10000-32767 when that range
    /// starts too low to leave room).
    pub fn default_for_host() -> PortRange {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768);
        let last = if ephemeral_low > DEFAULT_FIRST + 1000 {
            ephemeral_low - 1
        } else {
            32_767
        };
        PortRange {
            first: DEFAULT_FIRST,
            last,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// A port of the range that can be bound on 127.0.0.1 now, other than `avoid` (the
    /// port of a start that just failed) unless it is the only free one.
    pub fn pick(&self, avoid: Option<u16>) -> Result<u16, Error> {
        self.pick_where(avoid, |p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        })
    }

    /// [`PortRange::pick`] with `free` telling which ports are free.
    fn pick_where(&self, avoid: Option<u16>, free: impl Fn(u16) -> bool) -> Result<u16, Error> {
        // Random probes first, so agents sharing a machine rarely race for one port.
        for _ in 0..PROBES.min(self.len()) {
            let p = rand::random_range(self.first..=self.last);
            if Some(p) != avoid && free(p) {
                return Ok(p);
            }
        }
        // Then every port once, from a random place, so a nearly full range still works.
        let start = rand::random_range(0..self.len());
        let ports = (0..self.len()).map(|i| {
            let offset = (start + i) % self.len();
            // `offset` is below the range's length, which fits a port number.
            self.first + u16::try_from(offset).unwrap_or(0)
        });
        let mut avoided_but_free = false;
        for p in ports {
            if Some(p) == avoid {
                avoided_but_free = free(p);
            } else if free(p) {
                return Ok(p);
            }
        }
        match avoid {
            Some(p) if avoided_but_free => Ok(p),
            _ => Err(Error::Exhausted(*self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_rejects_bad_ones_clearly() {
        assert_eq!(
            "20000-29999".parse::<PortRange>(),
            Ok(PortRange {
                first: 20000,
                last: 29999
            })
        );
        assert_eq!(
            "20000-20000".parse::<PortRange>().map(|r| r.to_string()),
            Ok("20000-20000".to_string())
        );
        let err = |s: &str| s.parse::<PortRange>().unwrap_err();
        assert_eq!(err("20000"), "expected FIRST-LAST, e.g. 20000-29999");
        assert_eq!(err("3-1"), "the first port is above the last");
        assert_eq!(err("0-10"), "0 is not a port (1 to 65535)");
        assert_eq!(err("20000-70000"), "70000 is not a port (1 to 65535)");
        assert_eq!(err("a-b"), "a is not a port (1 to 65535)");
    }

    #[test]
    fn the_default_range_stays_below_the_ephemeral_ports() {
        let r = PortRange::default_for_host();
        assert_eq!(r.first, 10_000);
        assert!(r.last > r.first);
    }

    const TWO: PortRange = PortRange {
        first: 20_000,
        last: 20_001,
    };

    #[test]
    fn a_held_port_is_never_picked() {
        // The first port is held by another program: every pick is the second one, even
        // when asked to avoid it (the only free port beats none).
        let second_only = |p: u16| p == TWO.last;
        for _ in 0..100 {
            assert_eq!(TWO.pick_where(None, second_only).unwrap(), TWO.last);
            assert_eq!(
                TWO.pick_where(Some(TWO.first), second_only).unwrap(),
                TWO.last
            );
            assert_eq!(
                TWO.pick_where(Some(TWO.last), second_only).unwrap(),
                TWO.last
            );
        }
        // In a big range with one free port, the walk after the probes finds it.
        let wide = PortRange {
            first: 20_000,
            last: 29_999,
        };
        assert_eq!(wide.pick_where(None, |p| p == 25_000).unwrap(), 25_000);
        assert_eq!(
            TWO.pick_where(None, |_| false).unwrap_err().to_string(),
            "no free port in the slot port range 20000-20001 (--slot-ports)"
        );
    }

    #[test]
    fn a_port_bound_by_another_socket_is_not_free() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = held.local_addr().unwrap().port();
        let range = PortRange { first: p, last: p };
        assert!(matches!(range.pick(None), Err(Error::Exhausted(_))));
    }

    #[test]
    fn a_retry_gets_another_port() {
        for _ in 0..100 {
            assert_eq!(TWO.pick_where(Some(TWO.first), |_| true).unwrap(), TWO.last);
            assert_eq!(TWO.pick_where(Some(TWO.last), |_| true).unwrap(), TWO.first);
        }
    }
}
