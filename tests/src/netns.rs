//! Real network partitions: each host in its own network namespace with its own address,
//! linked to the root namespace (where the coordinator and the test run) by a veth pair
//! on a bridge. Taking a host's veth down cuts it off without a word to either side —
//! no FIN, no RST — as a failed switch or cable would. Needs root (`ip netns`).

use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e} (these tests need iproute2)"));
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A bridge `10.248.<id>.1/24` in the root namespace and one namespace per host.
pub struct Fabric {
    /// Tells this fabric's bridge, links, namespaces and subnet from other tests'.
    id: u8,
    /// How many namespaces exist, so that drop removes exactly those.
    hosts: usize,
}

impl Fabric {
    /// Creates the bridge and `hosts` namespaces; host i gets `10.248.<id>.<i + 2>`.
    pub fn new(id: u8, hosts: usize) -> Fabric {
        let f = Fabric { id, hosts: 0 };
        f.clean();
        let br = f.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        let mut f = f;
        ip(&["addr", "add", &format!("{}/24", f.gateway()), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for i in 0..hosts {
            let ns = f.namespace(i);
            let (h, n) = (f.host_end(i), f.ns_end(i));
            ip(&["netns", "add", &ns]);
            f.hosts = i + 1;
            ip(&["link", "add", &h, "type", "veth", "peer", "name", &n]);
            ip(&["link", "set", &n, "netns", &ns]);
            ip(&["link", "set", &h, "master", &br, "up"]);
            let addr = format!("{}/24", f.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &n]);
            ip(&["-n", &ns, "link", "set", &n, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        f
    }

    fn bridge(&self) -> String {
        format!("cutbr{}", self.id)
    }

    fn host_end(&self, i: usize) -> String {
        format!("cv{}h{i}", self.id)
    }

    fn ns_end(&self, i: usize) -> String {
        format!("cv{}n{i}", self.id)
    }

    /// The root namespace's address on the bridge (the coordinator listens here).
    pub fn gateway(&self) -> String {
        format!("10.248.{}.1", self.id)
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("cut{}-{i}", self.id)
    }

    /// Host i's address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.248.{}.{}", self.id, i + 2)
    }

    /// Cuts host i off: its link goes down, silently for both ends.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.host_end(i), "down"]);
    }

    /// Restores host i's link.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.host_end(i), "up"]);
    }

    /// An HTTP GET from inside host i's namespace (so it works while the host is cut
    /// off): the body, or the error.
    pub fn get_inside(&self, i: usize, url: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespace(i),
                "curl",
                "-sS",
                "-m",
                "2",
                "-f",
                url,
            ])
            .output()
            .map_err(|e| format!("run curl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Removes namespaces 0..`hosts`, their links and the bridge, ignoring what is not
    /// there.
    fn remove(&self, hosts: usize) {
        for i in 0..hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_end(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }

    /// Removes what an earlier, interrupted run with this id left.
    fn clean(&self) {
        self.remove(8);
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.remove(self.hosts);
    }
}
