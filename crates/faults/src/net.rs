//! Network partitions between a node and the broker, made with the
//! kernel's own tools and kept on loopback: every node runs in a cgroup (v2)
//! of its own, and a cut is a pair of nftables rules that drop the TCP
//! packets between that cgroup's sockets and the broker's port, both ways
//! (output hook for the node's packets, input hook for the broker's, which
//! the kernel matches to the node's socket). Packets are dropped, never
//! answered with a reset: TCP sees loss, connections survive a short cut,
//! and a long one ends as it would between two hosts. Healing flushes the
//! rules. Everything is made by the harness as root and removed when it is
//! dropped: the nftables table and the cgroups.
//!
//! A socket stays in the cgroup it was made in, so a node must be in its
//! cgroup before it opens any: [`Net::wrap`] starts it through a shell that
//! moves itself there, then execs the node.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct Net {
    /// The cgroup v2 hierarchy's mount point.
    root: PathBuf,
    /// This run's cgroup, under `root`; one child per node.
    group: PathBuf,
    /// The nftables table of this run (family `inet`).
    table: String,
    /// The broker's port.
    port: u16,
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid layout).
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .context("no cgroup v2 hierarchy is mounted")
}

fn nft(args: &str) -> anyhow::Result<()> {
    // nft joins its arguments into one command line: one is enough.
    let out = Command::new("nft")
        .arg(args)
        .output()
        .context("running nft (apt-get install nftables)")?;
    if !out.status.success() {
        bail!(
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// Sets up this run's cgroup and nftables table (no rule yet) for cuts
    /// from the broker on `port`. Needs root, nftables and cgroup v2.
    pub fn new(port: u16) -> anyhow::Result<Net> {
        let root = cgroup2_root()?;
        let name = format!("chat-faults-{}", std::process::id());
        let group = root.join(&name);
        std::fs::create_dir_all(&group)
            .with_context(|| format!("creating the cgroup {} (needs root)", group.display()))?;
        let table = name.replace('-', "_");
        let net = Net {
            root,
            group,
            table,
            port,
        };
        nft(&format!("add table inet {}", net.table))?;
        nft(&format!(
            "add chain inet {} out {{ type filter hook output priority 0 ; policy accept ; }}",
            net.table
        ))?;
        nft(&format!(
            "add chain inet {} in {{ type filter hook input priority 0 ; policy accept ; }}",
            net.table
        ))?;
        Ok(net)
    }

    fn cgroup(&self, node: &str) -> PathBuf {
        self.group.join(node)
    }

    /// A command that runs `program` in `node`'s cgroup (made if missing).
    pub fn wrap(&self, node: &str, program: &Path) -> anyhow::Result<Command> {
        let cgroup = self.cgroup(node);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating the cgroup {}", cgroup.display()))?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&cgroup)
            .arg(program);
        Ok(command)
    }

    /// Cuts `node` from the broker: its packets to the broker's port and
    /// the broker's to it are dropped until [`Net::heal`].
    pub fn cut(&self, node: &str) -> anyhow::Result<()> {
        let cgroup = self.cgroup(node);
        let below = cgroup
            .strip_prefix(&self.root)
            .context("the node's cgroup is in the hierarchy")?;
        let level = below.components().count();
        // nft names the cgroup by its path below /sys/fs/cgroup.
        let path = cgroup
            .strip_prefix("/sys/fs/cgroup")
            .context("cgroup v2 is mounted under /sys/fs/cgroup")?
            .display()
            .to_string();
        let matches = format!(r#"socket cgroupv2 level {level} "{path}""#);
        nft(&format!(
            "add rule inet {} out {matches} tcp dport {} drop",
            self.table, self.port
        ))?;
        nft(&format!(
            "add rule inet {} in {matches} tcp sport {} drop",
            self.table, self.port
        ))
    }

    /// Ends every cut.
    pub fn heal(&self) -> anyhow::Result<()> {
        nft(&format!("flush chain inet {} out", self.table))?;
        nft(&format!("flush chain inet {} in", self.table))
    }
}

impl Drop for Net {
    /// Removes the table and the cgroups (their processes, the nodes, are
    /// gone by now: the cluster kills them first).
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}", self.table)) {
            tracing::warn!(error = %e, "removing the partition rules");
        }
        if let Ok(children) = std::fs::read_dir(&self.group) {
            for child in children.flatten() {
                if child.path().is_dir() {
                    let _removed = std::fs::remove_dir(child.path());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.group) {
            tracing::warn!(error = %e, group = %self.group.display(), "removing the cgroup");
        }
    }
}
