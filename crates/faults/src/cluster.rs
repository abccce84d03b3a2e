//! The processes under test: `chat serve` nodes on fixed loopback ports
//! (so a restarted node comes back at the same address, on the same data
//! dir) and, for the Kafka backend, a tansu broker. Every process is killed
//! when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::sync::Arc;

use anyhow::{bail, Context};
use eventlog::kafka::testing::Broker;

use crate::net::Net;

/// Which log the cluster runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One node with every role on the embedded log and store.
    #[default]
    Embedded,
    /// Two gateways with every role (each its own store), two projectors
    /// sharing a consumer group, on one broker.
    Kafka,
    /// As `Kafka`, on a durable broker (tansu on SQLite) that is killed too.
    KafkaDurable,
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(Backend::Embedded),
            "kafka" => Ok(Backend::Kafka),
            "kafka-durable" => Ok(Backend::KafkaDurable),
            other => Err(format!(
                "unknown backend {other:?} (embedded, kafka, kafka-durable)"
            )),
        }
    }
}

/// What a node does, which decides what the checker expects of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Clients connect to it; its history is complete.
    Gateway,
    /// Projects the partitions its group gives it; its history is a subset.
    Projector,
}

pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub port: u16,
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    chat_bin: PathBuf,
    /// Runs the node in a cgroup of its own, so it can be cut from the
    /// broker.
    net: Option<Arc<Net>>,
    /// `RUST_LOG` for the node: `CHAT_FAULTS_NODE_LOG` when set, else
    /// warnings, or everything at info when the run keeps its files for a
    /// look afterwards.
    log_filter: String,
}

/// The gateways' `--send-timeout-ms`: shorter than the longest stall.
pub const SEND_TIMEOUT_MS: &str = "1000";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the node and waits until it answers `/healthz`.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("server.log"))?;
        let mut command = match &self.net {
            Some(net) => net.wrap(&self.name, &self.chat_bin)?,
            None => Command::new(&self.chat_bin),
        };
        let child = command
            .arg("serve")
            .arg("--listen")
            .arg(self.addr())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", &self.log_filter)
            .env("NO_COLOR", "1")
            // The harness sends as fast as it can: no rate or count limits.
            .env("CHAT_SEND_RATE", "0")
            .env("CHAT_USER_SEND_RATE", "0")
            .env("CHAT_MAX_CONNECTIONS_PER_IP", "0")
            .env("CHAT_MAX_CONNECTIONS_PER_USER", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.chat_bin.display()))?;
        self.child = Some(child);
        let url = format!("http://{}/healthz", self.addr());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("{} exited at start with {status}", self.name);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not become healthy", self.name);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _killed = child.kill();
            let _reaped = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub backend: Backend,
    pub nodes: Vec<Node>,
    pub broker: Option<Broker>,
    /// The partition rules and cgroups; after `nodes`, so that it is
    /// dropped once they are killed.
    net: Option<Arc<Net>>,
    /// Where the nodes' data dirs and logs are; removed at the end unless
    /// the run was asked to keep them.
    pub root: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Builds and starts the cluster of `backend`, its files in a temporary
    /// directory or, when `keep` is given, there (left for inspection).
    /// `cuts`: run each node in a cgroup of its own so that it can be cut
    /// from the broker ([`Cluster::partition_one`]; needs a broker, root,
    /// nftables and cgroup v2).
    pub async fn start(
        backend: Backend,
        chat_bin: &Path,
        partitions: u32,
        keep: Option<&Path>,
        cuts: bool,
    ) -> anyhow::Result<Self> {
        let (dir, root) = match keep {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                (None, path.to_owned())
            }
            None => {
                let dir = tempfile::tempdir()?;
                let root = dir.path().to_owned();
                (Some(dir), root)
            }
        };
        let broker = match backend {
            Backend::Embedded => None,
            Backend::Kafka => Some(Broker::start(None)),
            Backend::KafkaDurable => {
                let bin = eventlog::kafka::testing::durable_tansu_bin().context(
                    "kafka-durable needs TANSU_DURABLE_BIN: a tansu built with --features libsql",
                )?;
                let db = root.join("broker.db");
                // tansu reads the path after `sqlite://` relative to its
                // working directory unless it starts with one more `/`: an
                // absolute path needs four slashes in all.
                Some(Broker::start_with(
                    bin,
                    free_port()?,
                    &format!("sqlite:///{}", db.display()),
                ))
            }
        };
        let net = match (&broker, cuts) {
            (Some(b), true) => Some(Arc::new(
                Net::new(b.port).context("setting up network partitions")?,
            )),
            (None, true) => bail!("network partitions need a broker to cut nodes from"),
            (_, false) => None,
        };
        let mut specs: Vec<(String, Kind, Vec<String>)> = Vec::new();
        // A short send timeout, so that stalls of the broker make gateways
        // answer `unavailable` with `pending` and clients retry into it.
        let common = ["--partitions", &partitions.to_string()]
            .into_iter()
            .chain(["--send-timeout-ms", SEND_TIMEOUT_MS])
            .map(String::from)
            .collect::<Vec<_>>();
        match &broker {
            None => specs.push(("node".into(), Kind::Gateway, common.clone())),
            Some(b) => {
                // One tansu broker: one replica, one in sync.
                let log = ["--log", &b.url(), "--log-replication-factor", "1"]
                    .into_iter()
                    .chain(["--log-min-insync-replicas", "1"])
                    .map(String::from)
                    .collect::<Vec<_>>();
                for g in ["gw-1", "gw-2"] {
                    let args =
                        [common.clone(), log.clone(), vec!["--node".into(), g.into()]].concat();
                    specs.push((g.into(), Kind::Gateway, args));
                }
                for p in ["proj-1", "proj-2"] {
                    let group =
                        ["--roles", "projector", "--group", "faults-projectors"].map(String::from);
                    let args = [common.clone(), log.clone(), group.to_vec()].concat();
                    specs.push((p.into(), Kind::Projector, args));
                }
            }
        }
        let mut nodes = Vec::new();
        for (name, kind, args) in specs {
            let data_dir = root.join(&name);
            std::fs::create_dir_all(&data_dir)?;
            let mut node = Node {
                name,
                kind,
                port: free_port()?,
                data_dir,
                args,
                child: None,
                chat_bin: chat_bin.to_owned(),
                net: net.clone(),
                log_filter: std::env::var("CHAT_FAULTS_NODE_LOG")
                    .unwrap_or_else(|_| if keep.is_some() { "info" } else { "warn" }.to_owned()),
            };
            node.start().await?;
            nodes.push(node);
        }
        Ok(Cluster {
            backend,
            nodes,
            broker,
            net,
            root,
            temp: dir,
        })
    }

    /// Addresses of the gateways, the ones clients may use.
    pub fn gateways(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.kind == Kind::Gateway)
            .map(Node::addr)
            .collect()
    }

    /// Starts every node that is down.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if !node.is_up() {
                node.start().await?;
            }
        }
        Ok(())
    }

    /// Whether the broker is one of the processes faults may kill.
    pub fn broker_killable(&self) -> bool {
        self.backend == Backend::KafkaDurable
    }

    /// SIGKILLs a random node (or a killable broker), waits `down`, starts
    /// it again; returns its name.
    pub async fn kill_one(
        &mut self,
        rng: &mut impl rand::Rng,
        down: Duration,
    ) -> anyhow::Result<String> {
        let victims = self.nodes.len() + usize::from(self.broker_killable());
        let victim = rng.random_range(0..victims);
        if victim == self.nodes.len() {
            let broker = self.broker.as_mut().expect("a killable broker");
            tracing::info!(node = "broker", "SIGKILL");
            broker.kill();
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| broker.restart());
            return Ok("broker".to_owned());
        }
        let node = &mut self.nodes[victim];
        tracing::info!(node = node.name, "SIGKILL");
        node.kill();
        tokio::time::sleep(down).await;
        node.start()
            .await
            .with_context(|| format!("restarting {}", node.name))?;
        Ok(node.name.clone())
    }

    /// Cuts a random node from the broker for `cut` (both ways, packets
    /// dropped), then heals; returns its name.
    pub async fn partition_one(
        &mut self,
        rng: &mut impl rand::Rng,
        cut: Duration,
    ) -> anyhow::Result<String> {
        let net = self
            .net
            .clone()
            .context("the cluster was started without partitions")?;
        let node = &self.nodes[rng.random_range(0..self.nodes.len())];
        tracing::info!(node = node.name, ?cut, "partitioned from the broker");
        net.cut(&node.name)?;
        tokio::time::sleep(cut).await;
        net.heal()?;
        tracing::info!(node = node.name, "partition healed");
        Ok(node.name.clone())
    }

    /// Stops a random node or the broker with SIGSTOP for `stopped`, then
    /// lets it go on with SIGCONT; returns its name. Nothing is lost from
    /// a stopped process, so the memory-only broker may be stalled too.
    pub async fn stall_one(
        &mut self,
        rng: &mut impl rand::Rng,
        stopped: Duration,
    ) -> anyhow::Result<String> {
        use nix::sys::signal::{kill, Signal};
        let victims = self.nodes.len() + usize::from(self.broker.is_some());
        let victim = rng.random_range(0..victims);
        let (name, pid) = match self.nodes.get(victim) {
            Some(node) => (node.name.clone(), node.pid()),
            None => ("broker".to_owned(), self.broker.as_ref().map(Broker::pid)),
        };
        let pid = pid.filter(|&p| p != 0).context("the victim runs")?;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        tracing::info!(node = name, "SIGSTOP");
        kill(pid, Signal::SIGSTOP).with_context(|| format!("stopping {name}"))?;
        tokio::time::sleep(stopped).await;
        tracing::info!(node = name, "SIGCONT");
        kill(pid, Signal::SIGCONT).with_context(|| format!("resuming {name}"))?;
        Ok(name)
    }

    /// Kills every node and the broker; what was left on disk is gone with
    /// the temporary directory, or stays in the kept one with the broker's
    /// log beside it.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if let Some(b) = &mut self.broker {
            b.kill();
            if self.temp.is_none() {
                let _copied = std::fs::copy(b.log_path(), self.root.join("broker.log"));
            }
        }
    }
}
