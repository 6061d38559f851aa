//! The simulated fleet: N hosts in this process, each with its own identity, source
//! address and link task; what the scenarios ask of them (how many are connected, how
//! many opened a new session since a moment, what they acknowledged); and the file
//! limit raised so that thousands of connections fit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::enrol::Enrolled;
use super::host::{Ack, Behaviour};
use super::link::{self, Host, Shared};

/// Hosts per /16 of source addresses: 250 per /24, 256 of them.
pub const MAX_HOSTS: usize = 250 * 256;

/// The name of host `i` (0-based) of a fleet of `n`: `sim-00001`…
pub fn name(i: usize, n: usize) -> String {
    let width = n.to_string().len().max(5);
    format!("sim-{:0width$}", i + 1)
}

/// The source address of host `i`: its own address in 127.`net`.0.0/16.
pub fn source(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// The running fleet.
pub struct Fleet {
    pub shared: Arc<Shared>,
    pub hosts: Vec<Arc<Host>>,
    /// When the hosts' links started.
    pub started: Instant,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts every enrolled host's link at once, from 127.`net`.x.y.
    pub fn start(
        coordinator: SocketAddr,
        enrolled: &Enrolled,
        net: u8,
        behaviour: Behaviour,
    ) -> anyhow::Result<Fleet> {
        if enrolled.hosts.len() > MAX_HOSTS {
            bail!("at most {MAX_HOSTS} hosts fit in one /16 of source addresses");
        }
        let shared = Arc::new(Shared::new(coordinator, behaviour));
        let mut hosts = Vec::with_capacity(enrolled.hosts.len());
        for (i, (name, pem)) in enrolled.hosts.iter().enumerate() {
            let mut tls = cutover_proto::tls::client_config(&enrolled.ca_pem, pem, pem)
                .with_context(|| format!("the identity of {name}"))?;
            // The agent builds its TLS set-up anew for every connection: no resumption.
            tls.resumption = rustls::client::Resumption::disabled();
            let source = source(net, i);
            hosts.push(Arc::new(Host::new(name.clone(), i, source, tls, behaviour)));
        }
        let mut tasks = JoinSet::new();
        let started = Instant::now();
        for h in &hosts {
            tasks.spawn(link::run(h.clone(), shared.clone()));
        }
        Ok(Fleet {
            shared,
            hosts,
            started,
            tasks,
        })
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Hosts whose session is open now.
    pub fn connected(&self) -> usize {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Sessions each host opened so far, in host order.
    pub fn sessions(&self) -> Vec<u64> {
        self.hosts
            .iter()
            .map(|h| h.sessions.load(Ordering::Relaxed))
            .collect()
    }

    /// Hosts that opened a new session since `before` (from [`Fleet::sessions`]) and
    /// still have it open.
    pub fn reconnected_since(&self, before: &[u64]) -> usize {
        self.hosts
            .iter()
            .zip(before)
            .filter(|(h, b)| {
                h.sessions.load(Ordering::Relaxed) > **b && h.connected.load(Ordering::Relaxed)
            })
            .count()
    }

    /// Hosts whose certificate the coordinator revoked.
    pub fn revoked(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.revoked.load(Ordering::Relaxed))
            .count()
    }

    /// What each host acknowledged, by name.
    pub fn acks(&self) -> Vec<(String, Vec<Ack>)> {
        self.hosts
            .iter()
            .map(|h| (h.name.clone(), h.acks()))
            .collect()
    }

    /// Stops every host and waits for their links to end.
    pub async fn stop(mut self) {
        self.shared.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Raises this process's open-file limit to at least `want` (the hard limit too when
/// allowed), so that thousands of connections fit; children (the coordinator) inherit
/// it. Returns the soft limit now in force.
pub fn raise_file_limit(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("read the open-file limit")?;
    if soft >= want {
        return Ok(soft);
    }
    // Only a privileged process may raise the hard limit; otherwise stop at it.
    let hard = if hard < want && setrlimit(Resource::RLIMIT_NOFILE, hard, want).is_ok() {
        want
    } else {
        hard
    };
    let soft = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).context("raise the open-file limit")?;
    Ok(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_has_its_own_name_and_source_address() {
        assert_eq!(name(0, 200), "sim-00001");
        assert_eq!(name(99_999, 100_000), "sim-100000");
        assert_eq!(source(200, 0).to_string(), "127.200.0.1");
        assert_eq!(source(200, 249).to_string(), "127.200.0.250");
        assert_eq!(source(200, 250).to_string(), "127.200.1.1");
        assert_eq!(source(200, MAX_HOSTS - 1).to_string(), "127.200.255.250");
    }
}
