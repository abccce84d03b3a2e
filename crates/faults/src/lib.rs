//! A Jepsen-style fault harness for the chat pipeline.
//!
//! A workload of clients sends messages with unique ids (some over HTTP
//! POSTs they give up on after a few milliseconds and retry over the
//! WebSocket) and records every ack and every message it receives;
//! meanwhile faults hit the processes at random moments, in turn: a SIGKILL
//! of a gateway or projector (restarted after a moment), a stall (SIGSTOP,
//! then SIGCONT) of a gateway, a projector or the broker, or a network
//! partition between a gateway or projector and the broker; clients
//! reconnect to any gateway and resume with `since`. At the end the checker
//! compares the history with what clients were acked and what they
//! received, and reports every broken promise of the pipeline
//! (docs/architecture.md, Contracts): acked-but-missing, duplicates (in
//! history, or delivered twice to one client), order violations within a
//! room, gaps in a client's stream after its join position, resumes
//! answered `recovered:true` that missed a message, requests that were
//! never answered, and messages in history that nobody sent.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod net;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

pub use checker::Report;
pub use cluster::Backend;

/// A kind of fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL a gateway or projector (or, on `kafka-durable`, the broker),
    /// restart it after `down_for`.
    Kill,
    /// SIGSTOP a gateway, a projector or the broker, SIGCONT it after
    /// `stall_for`: a paused VM, a long GC.
    Stall,
    /// Cut a gateway or projector from the broker (packets dropped both
    /// ways, [`net`]), heal after `partition_for`. Kafka backends only.
    Partition,
}

/// A harness run.
#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub chat_bin: PathBuf,
    /// How long clients send while faults are injected.
    pub duration: Duration,
    pub clients: usize,
    pub rooms: usize,
    /// Rooms each client is a member of.
    pub rooms_per_client: usize,
    /// Messages per second per client.
    pub rate: f64,
    /// Time between faults, drawn uniformly from this range.
    pub fault_every: (Duration, Duration),
    /// How long a killed process stays down, drawn uniformly.
    pub down_for: (Duration, Duration),
    /// The faults injected, taken in turn (so a short run has each).
    pub faults: Vec<Fault>,
    /// How long a stalled process stays stopped, drawn uniformly.
    pub stall_for: (Duration, Duration),
    /// How long a partition lasts, drawn uniformly.
    pub partition_for: (Duration, Duration),
    /// Every this many sends of a client goes as an HTTP POST that the
    /// client abandons after 1 to 50 ms and retries on its WebSocket with
    /// the same id; 0: none.
    pub post_every: u64,
    pub partitions: u32,
    pub seed: u64,
    /// Keep every node's data dir and `server.log` here instead of a
    /// temporary directory.
    pub keep: Option<PathBuf>,
}

impl Config {
    /// A short run, for CI.
    pub fn smoke(backend: Backend, chat_bin: PathBuf) -> Self {
        Config {
            backend,
            chat_bin,
            duration: Duration::from_secs(12),
            clients: 4,
            rooms: 4,
            rooms_per_client: 2,
            rate: 40.0,
            fault_every: (Duration::from_millis(1500), Duration::from_millis(3000)),
            down_for: (Duration::from_millis(100), Duration::from_millis(800)),
            faults: match backend {
                Backend::Embedded => vec![Fault::Kill, Fault::Stall],
                Backend::Kafka | Backend::KafkaDurable => {
                    vec![Fault::Kill, Fault::Stall, Fault::Partition]
                }
            },
            stall_for: (Duration::from_millis(500), Duration::from_millis(2500)),
            partition_for: (Duration::from_millis(1000), Duration::from_millis(8000)),
            post_every: 10,
            partitions: 4,
            seed: 7,
            keep: None,
        }
    }
}

/// Reads a node's whole history of `room` as (offset, id), oldest first,
/// walking pages back with `before` cursors.
async fn history(
    http: &reqwest::Client,
    addr: &str,
    room: &str,
) -> anyhow::Result<Vec<(i64, String)>> {
    let mut all = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut url = format!("http://{addr}/rooms/{room}/messages?limit=1000");
        if let Some(b) = before {
            url.push_str(&format!("&before={b}"));
        }
        let page: serde_json::Value = http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let messages = page["messages"].as_array().context("messages")?;
        let rows: Vec<(i64, String)> = messages
            .iter()
            .map(|m| {
                (
                    m["offset"].as_i64().unwrap_or(-1),
                    m["id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        all.splice(0..0, rows);
        match page["before"].as_i64() {
            Some(b) => before = Some(b),
            None => return Ok(all),
        }
    }
}

/// Every room's history on one node.
async fn histories(
    http: &reqwest::Client,
    addr: &str,
    rooms: &[String],
) -> anyhow::Result<BTreeMap<String, Vec<(i64, String)>>> {
    let mut out = BTreeMap::new();
    for room in rooms {
        out.insert(room.clone(), history(http, addr, room).await?);
    }
    Ok(out)
}

/// Runs the workload under faults and checks it.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let mut cluster = cluster::Cluster::start(
        config.backend,
        &config.chat_bin,
        config.partitions,
        config.keep.as_deref(),
        config.faults.contains(&Fault::Partition),
    )
    .await?;
    let rooms: Vec<String> = (0..config.rooms).map(|i| format!("room-{i}")).collect();
    let stop_sending = CancellationToken::new();
    let finish = CancellationToken::new();
    let mut clients = Vec::new();
    let progress = std::sync::Arc::new(client::Progress::default());
    for c in 0..config.clients {
        let member: Vec<String> = (0..config.rooms_per_client.min(config.rooms))
            .map(|k| rooms[(c + k) % rooms.len()].clone())
            .collect();
        let cfg = client::Config {
            progress: progress.clone(),
            user: format!("client-{c}"),
            rooms: member,
            gateways: cluster.gateways(),
            rate: config.rate,
            post_every: config.post_every,
        };
        clients.push(tokio::spawn(client::run(
            cfg,
            stop_sending.clone(),
            finish.clone(),
            Duration::from_secs(60),
        )));
    }

    // Faults, in turn: kill a random process and restart it after a
    // moment, or stop one and let it go on after a moment.
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut kills: BTreeMap<String, u64> = BTreeMap::new();
    let mut stalls: BTreeMap<String, u64> = BTreeMap::new();
    let mut cuts: BTreeMap<String, u64> = BTreeMap::new();
    let end = tokio::time::Instant::now() + config.duration;
    for turn in 0.. {
        let wait = rng.random_range(config.fault_every.0..=config.fault_every.1);
        if config.faults.is_empty() || tokio::time::Instant::now() + wait >= end {
            tokio::time::sleep_until(end).await;
            break;
        }
        tokio::time::sleep(wait).await;
        match config.faults[turn % config.faults.len()] {
            Fault::Kill => {
                let down = rng.random_range(config.down_for.0..=config.down_for.1);
                let name = cluster.kill_one(&mut rng, down).await?;
                *kills.entry(name).or_default() += 1;
            }
            Fault::Stall => {
                let stopped = rng.random_range(config.stall_for.0..=config.stall_for.1);
                let name = cluster.stall_one(&mut rng, stopped).await?;
                *stalls.entry(name).or_default() += 1;
            }
            Fault::Partition => {
                let cut = rng.random_range(config.partition_for.0..=config.partition_for.1);
                let name = cluster.partition_one(&mut rng, cut).await?;
                *cuts.entry(name).or_default() += 1;
            }
        }
    }
    cluster.heal().await?;
    stop_sending.cancel();

    // Let acks, deliveries and projection settle: every send acked, every
    // gateway's history holding at least what was acked, then no change.
    use std::sync::atomic::Ordering::Relaxed;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let gateways = cluster.gateways();
    let settle_deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while progress.pending.load(Relaxed) > 0 && tokio::time::Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last: Option<Vec<usize>> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut sizes = Vec::new();
        for g in &gateways {
            sizes.push(
                histories(&http, g, &rooms)
                    .await?
                    .values()
                    .map(Vec::len)
                    .sum::<usize>(),
            );
        }
        // Projectors sharing a group hold the history between them: their
        // stores together must reach what was acked too.
        let projectors: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.kind == cluster::Kind::Projector)
            .map(|n| n.addr())
            .collect();
        if !projectors.is_empty() {
            let mut union = HashSet::new();
            for p in &projectors {
                for rows in histories(&http, p, &rooms).await?.into_values() {
                    union.extend(rows.into_iter().map(|(_, id)| id));
                }
            }
            sizes.push(union.len());
        }
        let acked = progress.acked.load(Relaxed) as usize;
        let caught_up = sizes.iter().all(|&n| n >= acked);
        if (caught_up && last.as_ref() == Some(&sizes))
            || tokio::time::Instant::now() > settle_deadline
        {
            break;
        }
        last = Some(sizes);
    }
    finish.cancel();
    let mut records = Vec::new();
    for c in clients {
        records.push(c.await.context("client task")?);
    }

    // Read what every node holds, and check.
    let mut complete = BTreeMap::new();
    let mut partial = BTreeMap::new();
    for node in &cluster.nodes {
        let h = histories(&http, &node.addr(), &rooms).await?;
        match node.kind {
            cluster::Kind::Gateway => complete.insert(node.name.clone(), h),
            cluster::Kind::Projector => partial.insert(node.name.clone(), h),
        };
    }
    cluster.stop();
    let sent: HashSet<String> = records
        .iter()
        .flat_map(|r| r.sent.iter().map(|(id, _)| id.clone()))
        .collect();
    let mut report = checker::check(&records, &complete, &partial, &sent);
    report.backend = config.backend;
    report.kills = kills;
    report.stalls = stalls;
    report.partitions = cuts;
    report.duration_s = config.duration.as_secs_f64();
    Ok(report)
}
