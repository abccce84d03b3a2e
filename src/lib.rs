//! Wires the roles of a chat node together: the log, the history store, the
//! projector, the fan-out and the gateway, in one process.
//!
//! The binary (`src/main.rs`) only parses the command line ([`cli`]), sets
//! up tracing, and calls [`cli::run`], which binds and calls [`serve`] (or,
//! for `chat replay` and `chat versions`, the control socket's client).
//!
//! The history is served from the current projection version
//! ([`history::versions::CurrentVersion`]); a replay builds another one
//! beside it and a switch moves reads and the projector over without a
//! restart. A serving process takes replay and version requests on a control
//! socket in its data dir ([`projector::control::SOCKET`]).
//!
//! Backends are cargo features of this crate, both on by default: `kafka`
//! (`--log kafka://...`) and `scylla` (`--store scylla://...`). A build
//! without one refuses its flag value with a message that names the feature.

pub mod cli;
pub mod doctor;
pub mod progress;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use eventlog::embedded::EmbeddedLog;
use eventlog::file::FileLog;
#[cfg(feature = "kafka")]
use eventlog::kafka::{KafkaConfig, KafkaLog};
use eventlog::EventLog;
use fanout::presence::{Presence, PresenceConfig, EPHEMERAL_TOPIC};
use fanout::{Fanout, FanoutConfig};
use history::embedded::{EmbeddedStore, EmbeddedVersions};
#[cfg(feature = "scylla")]
use history::scylla::{ScyllaStore, ScyllaUri, ScyllaVersions};
use history::versions::{CurrentVersion, Versions};
use history::HistoryStore;
use ingest::{Gateway, GatewayConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use projector::control;
use projector::{Projector, ProjectorConfig, DLQ_TOPIC};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use schemas::MESSAGES_TOPIC;
/// Projection version a new store starts with, and serves until a replay
/// builds another one and reads are switched to it.
pub const STORE_NAMESPACE: &str = "v1";
/// How often a server re-reads which projection version is current (a
/// switch made in the server itself applies at once).
pub const VERSION_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Every metric the chat records, per crate: (crate, name, kind, help).
/// Each crate names its metrics once, in its `metrics` module; this is the
/// catalogue of `docs/metrics.md` (a test keeps the two equal).
pub fn metric_catalogue() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    /// A crate's `metrics::CATALOGUE`: (name, kind, help).
    type Catalogue = &'static [(&'static str, &'static str, &'static str)];
    let crates: [(&str, Catalogue); 5] = [
        ("ingest", ingest::metrics::CATALOGUE),
        ("fanout", fanout::metrics::CATALOGUE),
        ("eventlog", eventlog::metrics::CATALOGUE),
        ("projector", projector::metrics::CATALOGUE),
        ("history", history::metrics::CATALOGUE),
    ];
    crates
        .into_iter()
        .flat_map(|(krate, metrics)| {
            metrics
                .iter()
                .map(move |&(name, kind, help)| (krate, name, kind, help))
        })
        .collect()
}

/// Bucket bounds, in seconds, of every `*_seconds` histogram: from a tenth
/// of a millisecond (an embedded ack) to ten seconds (the send timeout), so
/// Prometheus can take percentiles across nodes (`histogram_quantile`).
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often the recorder drains its histograms' samples into their
/// buckets: without it they pile up until `/metrics` is read.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder of a `chat serve` process: `*_seconds`
/// histograms with [`SECONDS_BUCKETS`], the others as summaries; `serve`
/// runs its upkeep.
pub fn metrics_recorder() -> anyhow::Result<PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &SECONDS_BUCKETS,
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Metrics recorded only with labels, a series per label value (`code`,
/// `partition`, …): on `/metrics` once a value is seen. Every other
/// catalogued metric is registered at zero when a server starts
/// ([`register_metrics`]), so it is there from the first scrape, and a rate
/// or an alert on it means something before it first moves. A test keeps
/// this list equal to the metrics the code records with labels.
pub const LABELLED_METRICS: &[&str] = &[
    "ingest_bad_frames_total",
    "ingest_upgrades_refused_total",
    "ingest_store_read_seconds",
    "fanout_catch_up_messages_total",
    "presence_notices_sent_total",
    "presence_notices_received_total",
    "log_read_gaps_total",
    "projector_dead_letters_total",
    "projector_position",
    "projector_lag_records",
    "projector_lag_seconds",
];

/// Registers every catalogued metric without labels at zero (a counter
/// incremented by 0, a gauge moved by 0, a histogram with no sample).
pub fn register_metrics() {
    for (_, name, kind, _) in metric_catalogue() {
        if LABELLED_METRICS.contains(&name) {
            continue;
        }
        match kind {
            "counter" => metrics::counter!(name).increment(0),
            "gauge" => metrics::gauge!(name).increment(0.0),
            _ => drop(metrics::histogram!(name)),
        }
    }
}

/// Gives the installed recorder the help text of every metric, so
/// `GET /metrics` describes each one (`# HELP`).
pub fn describe_metrics() {
    for (_, name, kind, help) in metric_catalogue() {
        match kind {
            "counter" => metrics::describe_counter!(name, help),
            "gauge" => metrics::describe_gauge!(name, help),
            _ => metrics::describe_histogram!(name, help),
        }
    }
}

/// Where the log lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSpec {
    /// The embedded log in the data dir: an append-only file
    /// (`eventlog::file`), or the redb log of a data dir made before it.
    Embedded,
    /// The embedded redb log (`eventlog::embedded`) even in a new data dir:
    /// the previous engine, kept for comparison and for old data dirs.
    EmbeddedRedb,
    /// A Kafka/Redpanda cluster: the comma-separated brokers.
    Kafka(String),
}

impl FromStr for LogSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(LogSpec::Embedded),
            "embedded-redb" => Ok(LogSpec::EmbeddedRedb),
            #[cfg(feature = "kafka")]
            url if url.starts_with("kafka://") => eventlog::kafka::parse_url(url)
                .map(LogSpec::Kafka)
                .map_err(|e| e.to_string()),
            #[cfg(not(feature = "kafka"))]
            url if url.starts_with("kafka://") => Err(format!(
                "{url:?}: this chat was built without the Kafka log (cargo feature `kafka`)"
            )),
            other => Err(format!(
                "expected `embedded`, `embedded-redb` or kafka://HOST:PORT[,HOST:PORT...], got {other:?}"
            )),
        }
    }
}

/// Settings of the Kafka log: its producer, and the topics it creates and
/// accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTuning {
    /// Bound of the producer queue, in KiB.
    pub queue_kbytes: u32,
    /// How long a send waits for room in a full producer queue before it is
    /// answered `unavailable`.
    pub enqueue_timeout: std::time::Duration,
    /// How long the brokers may hold a reader's fetch that finds nothing
    /// new (`fetch.wait.max.ms`).
    pub fetch_wait: std::time::Duration,
    /// Replication factor of the topics chat creates, and the fewest
    /// replicas an existing topic may have.
    pub replication: i32,
    /// `min.insync.replicas` of the topics chat creates.
    pub min_insync_replicas: i32,
    /// Use existing topics with finite retention or fewer replicas anyway.
    pub accept_topic_config: bool,
}

/// The producer defaults of the Kafka backend, and the topics of a cluster:
/// three replicas, two in sync for an ack.
#[cfg(feature = "kafka")]
impl Default for KafkaTuning {
    fn default() -> Self {
        let c = KafkaConfig::new("", "", 1);
        KafkaTuning {
            queue_kbytes: c.queue_kbytes,
            enqueue_timeout: c.enqueue_timeout,
            fetch_wait: c.fetch_wait,
            replication: 3,
            min_insync_replicas: 2,
            accept_topic_config: false,
        }
    }
}

#[cfg(feature = "kafka")]
impl KafkaTuning {
    /// The Kafka backend's config of `topic` with these settings.
    fn config(&self, brokers: &str, topic: &str, partitions: u32) -> KafkaConfig {
        KafkaConfig {
            queue_kbytes: self.queue_kbytes,
            enqueue_timeout: self.enqueue_timeout,
            fetch_wait: self.fetch_wait,
            replication: self.replication,
            min_insync_replicas: self.min_insync_replicas,
            accept_topic_config: self.accept_topic_config,
            ..KafkaConfig::new(brokers, topic, partitions)
        }
    }
}

/// Without the Kafka log the tuning is never used; the values are the Kafka
/// backend's defaults, so `--help` reads the same.
#[cfg(not(feature = "kafka"))]
impl Default for KafkaTuning {
    fn default() -> Self {
        KafkaTuning {
            queue_kbytes: 65_536,
            enqueue_timeout: std::time::Duration::from_millis(5_000),
            fetch_wait: std::time::Duration::from_millis(250),
            replication: 3,
            min_insync_replicas: 2,
            accept_topic_config: false,
        }
    }
}

/// Where the history lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded store in the data dir.
    Embedded,
    /// A ScyllaDB keyspace: `scylla://HOST:9042[,HOST...]/KEYSPACE`, checked
    /// when parsed, connected to when opened.
    #[cfg(feature = "scylla")]
    Scylla(ScyllaUri),
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(StoreSpec::Embedded),
            #[cfg(feature = "scylla")]
            uri if uri.starts_with("scylla://") => ScyllaUri::parse(uri)
                .map(StoreSpec::Scylla)
                .map_err(|e| e.to_string()),
            #[cfg(not(feature = "scylla"))]
            uri if uri.starts_with("scylla://") => Err(format!(
                "{uri:?}: this chat was built without the Scylla store (cargo feature `scylla`)"
            )),
            other => Err(format!(
                "expected `embedded` or scylla://HOST:9042[,HOST...]/KEYSPACE, got {other:?}"
            )),
        }
    }
}

/// How a message names the Scylla store of `target`.
#[cfg(feature = "scylla")]
fn scylla_name(target: &ScyllaUri) -> String {
    format!("scylla://{}/{}", target.hosts.join(","), target.keyspace)
}

/// A role a node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Accepts messages (WebSocket `send`, HTTP POST) and appends them.
    Ingest,
    /// Pushes the log's messages to the node's WebSocket clients.
    Fanout,
    /// Builds the history store from the log.
    Projector,
}

/// A set of roles, parsed from `ingest,fanout,projector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles(pub BTreeSet<Role>);

impl Roles {
    pub fn all() -> Self {
        Roles([Role::Ingest, Role::Fanout, Role::Projector].into())
    }

    pub fn has(&self, role: Role) -> bool {
        self.0.contains(&role)
    }
}

impl FromStr for Roles {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = BTreeSet::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            roles.insert(match name {
                "ingest" => Role::Ingest,
                "fanout" => Role::Fanout,
                "projector" => Role::Projector,
                other => {
                    return Err(format!(
                        "unknown role {other:?} (ingest, fanout, projector)"
                    ))
                }
            });
        }
        if roles.is_empty() {
            return Err("name at least one role".into());
        }
        Ok(Roles(roles))
    }
}

/// Settings of `chat serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub partitions: u32,
    pub log: LogSpec,
    pub kafka: KafkaTuning,
    pub store: StoreSpec,
    pub roles: Roles,
    /// Consumer group of the projector; defaults to one named after the store.
    pub group: Option<String>,
    pub gateway: GatewayConfig,
    /// Heartbeats and bounds of presence across nodes.
    pub presence: PresenceConfig,
    /// How the gateway identifies users.
    pub auth: ingest::auth::Auth,
}

/// Opens the log of `topic`, creating it when missing.
pub async fn open_log(
    spec: &LogSpec,
    data_dir: &std::path::Path,
    topic: &str,
    partitions: u32,
    tuning: &KafkaTuning,
) -> anyhow::Result<Arc<dyn EventLog>> {
    Ok(match spec {
        LogSpec::Embedded | LogSpec::EmbeddedRedb => {
            let dir = data_dir.join("log");
            let context = || format!("opening the log {topic} in {}", dir.display());
            // One engine per data dir: one made by the redb log keeps it.
            let redb = [MESSAGES_TOPIC, topic].map(|t| dir.join(format!("{t}.redb")));
            if *spec == LogSpec::EmbeddedRedb || redb.iter().any(|f| f.exists()) {
                Arc::new(EmbeddedLog::open(&dir, topic, partitions).with_context(context)?)
            } else {
                Arc::new(FileLog::open(&dir, topic, partitions).with_context(context)?)
            }
        }
        #[cfg(feature = "kafka")]
        LogSpec::Kafka(brokers) => {
            let config = tuning.config(brokers, topic, partitions);
            Arc::new(
                KafkaLog::connect(config)
                    .await
                    .with_context(|| format!("opening topic {topic} on {brokers}"))?,
            )
        }
        #[cfg(not(feature = "kafka"))]
        LogSpec::Kafka(brokers) => {
            let _ = (tuning, brokers);
            anyhow::bail!("this chat was built without the Kafka log (cargo feature `kafka`)")
        }
    })
}

/// How long the ephemeral topic keeps records: a notice is worth nothing
/// after a few heartbeats.
pub const EPHEMERAL_RETENTION: std::time::Duration = std::time::Duration::from_secs(60);

/// The logs of a node: the messages, their dead letters, and the
/// ephemeral channel between nodes (presence, typing), which only a
/// shared log has: on the embedded log this process is the only node.
pub struct Logs {
    pub messages: Arc<dyn EventLog>,
    pub dlq: Arc<dyn EventLog>,
    pub ephemeral: Option<Arc<dyn EventLog>>,
}

/// Opens the messages log, its dead-letter log and, on Kafka, the
/// ephemeral topic; on Kafka the others share the first one's clients, so
/// they add no connection to the brokers.
pub async fn open_logs(
    spec: &LogSpec,
    data_dir: &std::path::Path,
    partitions: u32,
    tuning: &KafkaTuning,
) -> anyhow::Result<Logs> {
    #[cfg(feature = "kafka")]
    if let LogSpec::Kafka(brokers) = spec {
        let log = KafkaLog::connect(tuning.config(brokers, MESSAGES_TOPIC, partitions))
            .await
            .with_context(|| format!("opening topic {MESSAGES_TOPIC} on {brokers}"))?;
        let dlq = log
            .sibling(DLQ_TOPIC, 1)
            .await
            .with_context(|| format!("opening topic {DLQ_TOPIC} on {brokers}"))?;
        let ephemeral = log
            .ephemeral_sibling(EPHEMERAL_TOPIC, 1, EPHEMERAL_RETENTION)
            .await
            .with_context(|| format!("opening topic {EPHEMERAL_TOPIC} on {brokers}"))?;
        return Ok(Logs {
            messages: Arc::new(log),
            dlq: Arc::new(dlq),
            ephemeral: Some(Arc::new(ephemeral)),
        });
    }
    let messages = open_log(spec, data_dir, MESSAGES_TOPIC, partitions, tuning).await?;
    let dlq = open_log(spec, data_dir, DLQ_TOPIC, 1, tuning).await?;
    Ok(Logs {
        messages,
        dlq,
        ephemeral: None,
    })
}

/// Opens the history store and names its projector group.
pub async fn open_store(
    spec: &StoreSpec,
    data_dir: &std::path::Path,
    namespace: &str,
) -> anyhow::Result<(Arc<dyn HistoryStore>, String)> {
    Ok(match spec {
        StoreSpec::Embedded => {
            let dir = data_dir.join("history");
            let store = EmbeddedStore::open(&dir, namespace)
                .with_context(|| format!("opening the history store in {}", dir.display()))?;
            let group = format!("chat-projector-embedded-{}", store.id());
            (Arc::new(store), group)
        }
        #[cfg(feature = "scylla")]
        StoreSpec::Scylla(target) => {
            let store = ScyllaStore::open(target, namespace)
                .await
                .with_context(|| format!("opening the history store {}", scylla_name(target)))?;
            let group = format!("chat-projector-{}", store.id());
            (Arc::new(store), group)
        }
    })
}

/// Opens the projection versions of the history store, and names the
/// projector group: for the embedded store, after its current version (the
/// store is one node's alone); for Scylla, after the keyspace
/// (`chat-projector-scylla-KEYSPACE`), so every projector writing the
/// keyspace shares one group, before and after a switch (they follow the
/// pointer).
///
/// Each store implements [`Versions`] (a version is a namespace of tables,
/// the pointer a row of its own); `chat replay`, `chat versions` and the
/// live switch work on any of them unchanged.
pub async fn open_versions(
    spec: &StoreSpec,
    data_dir: &std::path::Path,
) -> anyhow::Result<(Arc<dyn Versions>, String)> {
    Ok(match spec {
        StoreSpec::Embedded => {
            let dir = data_dir.join("history");
            let versions = EmbeddedVersions::open(&dir, STORE_NAMESPACE)
                .with_context(|| format!("opening the history store in {}", dir.display()))?;
            let current = versions.current().await?;
            let store = versions.store(&current)?;
            let group = format!("chat-projector-embedded-{}", store.id());
            (Arc::new(versions), group)
        }
        #[cfg(feature = "scylla")]
        StoreSpec::Scylla(target) => {
            let versions = ScyllaVersions::connect(target, STORE_NAMESPACE)
                .await
                .with_context(|| format!("opening the history store {}", scylla_name(target)))?;
            let group = format!("chat-projector-{}", versions.id());
            (Arc::new(versions), group)
        }
    })
}

/// How `--log` names `spec`.
pub fn log_name(spec: &LogSpec) -> String {
    match spec {
        LogSpec::Embedded => "embedded".to_owned(),
        LogSpec::EmbeddedRedb => "embedded-redb".to_owned(),
        LogSpec::Kafka(brokers) => format!("kafka://{brokers}"),
    }
}

/// The history this node's gateway reads, if it has one it can trust: a
/// store some projector keeps up to date. That is this node's own when it
/// projects, or a shared one (Scylla) that a projector group writes. An
/// embedded store on a node without the projector role is written by
/// nobody: its pages would be empty or stale while the log moves on, so the
/// gateway serves no history (`unavailable`) rather than untrue pages.
fn history_for_reads(
    config: &ServeConfig,
    current: CurrentVersion,
) -> Option<Arc<dyn HistoryStore>> {
    let written = config.roles.has(Role::Projector) || config.store != StoreSpec::Embedded;
    if !written && config.roles.has(Role::Ingest) {
        tracing::warn!(
            "no projector writes this node's embedded history store: history requests are answered unavailable; give a gateway the shared store (--store scylla://...) or the projector role"
        );
    }
    written.then(|| Arc::new(current) as Arc<dyn HistoryStore>)
}

/// Runs the configured roles until `shutdown` is cancelled, then drains and
/// stops each of them.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Logs {
        messages: log,
        dlq,
        ephemeral,
    } = open_logs(
        &config.log,
        &config.data_dir,
        config.partitions,
        &config.kafka,
    )
    .await?;
    let (versions, store_group) = open_versions(&config.store, &config.data_dir).await?;
    let current = CurrentVersion::open(versions)
        .await
        .context("opening the current projection version")?;
    tracing::info!(
        epoch = log.epoch(),
        partitions = log.partitions(),
        roles = ?config.roles.0,
        version = &*current.active().name,
        "log open"
    );

    let upkeep_stop = shutdown.child_token();
    let upkeep_task = metrics.clone().map(|handle| {
        let stop = upkeep_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        })
    });

    let projector_stop = CancellationToken::new();
    let mut projector_handle = None;
    let projector_task = if config.roles.has(Role::Projector) {
        // An embedded store is this node's alone: no group unless asked. A
        // Scylla keyspace is shared: its projectors split the partitions
        // through the group.
        let exclusive = config.group.is_none() && config.store == StoreSpec::Embedded;
        let group = config.group.clone().unwrap_or(store_group);
        tracing::info!(group, exclusive, "projector starts");
        let projector = Projector::following(
            log.clone(),
            current.subscribe(),
            Some(dlq.clone()),
            ProjectorConfig {
                exclusive,
                ..ProjectorConfig::new(&group)
            },
        );
        projector_handle = Some(projector.handle());
        Some(tokio::spawn(projector.run(projector_stop.clone())))
    } else {
        None
    };
    let follow_task = tokio::spawn(current.clone().follow(VERSION_POLL, projector_stop.clone()));
    let control = Arc::new(
        control::Control::new(log.clone(), dlq, current.clone(), log_name(&config.log))
            .with_projector(projector_handle.clone()),
    );
    // Nothing else may have created the data dir (a Kafka log, a Scylla store).
    let bound =
        std::fs::create_dir_all(&config.data_dir).and_then(|()| control::bind(&config.data_dir));
    let control_task = match bound {
        Ok((listener, path)) => {
            tracing::info!(path = %path.display(), "control socket (chat replay, chat versions)");
            let task = tokio::spawn(control::serve_control(
                listener,
                control,
                projector_stop.clone(),
            ));
            Some((task, path))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no control socket: chat replay and chat versions cannot reach this server");
            None
        }
    };
    let store = history_for_reads(&config, current);

    let fanout = config.roles.has(Role::Fanout).then(|| {
        let config = FanoutConfig {
            shared_reads: config.gateway.shared_reads.clone(),
            ..FanoutConfig::default()
        };
        Fanout::with_history(log.clone(), store.clone(), config)
    });
    let presence = fanout.clone().map(|fanout| {
        Presence::start(
            fanout,
            ephemeral,
            &config.gateway.node,
            config.presence.clone(),
        )
    });
    let gateway = Gateway {
        log,
        auth: config.auth,
        fanout: fanout.clone(),
        presence: presence.clone(),
        store,
        metrics,
        projected: projector_handle.map(|h| {
            let owned: ingest::Projected = Arc::new(move || h.owned());
            owned
        }),
        config: GatewayConfig {
            ingest: config.roles.has(Role::Ingest),
            ..config.gateway
        },
    };
    let served = ingest::serve(listener, gateway, shutdown).await;

    // After the drain: the goodbye tells the other nodes these users left.
    if let Some(presence) = presence {
        presence.shutdown().await;
    }
    if let Some(fanout) = fanout {
        fanout.shutdown().await;
    }
    projector_stop.cancel();
    if let Some(task) = projector_task {
        task.await.context("projector task")?;
    }
    follow_task.await.context("version follower task")?;
    if let Some((task, path)) = control_task {
        task.await.context("control socket task")?;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::debug!(error = %e, "removing the control socket");
        }
    }
    upkeep_stop.cancel();
    if let Some(task) = upkeep_task {
        task.await.context("metrics upkeep task")?;
    }
    served.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated part of `docs/metrics.md`: one row per metric.
    fn catalogue_table() -> String {
        let mut table = String::from("| metric | kind | crate | meaning |\n|---|---|---|---|\n");
        for (krate, name, kind, help) in metric_catalogue() {
            table.push_str(&format!("| `{name}` | {kind} | `{krate}` | {help} |\n"));
        }
        table
    }

    const CATALOGUE_MARK: &str = "<!-- generated from each crate's metrics.rs";

    /// `docs/metrics.md` lists exactly the metrics the crates declare. With
    /// `UPDATE_DOCS=1` the test rewrites the generated table instead.
    #[test]
    fn the_metrics_catalogue_matches_the_crates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
        let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
        let at = text
            .find(CATALOGUE_MARK)
            .expect("docs/metrics.md has the catalogue mark");
        let end = at + text[at..].find("-->\n").expect("the mark ends with -->") + 4;
        let (head, generated) = text.split_at(end);
        let expected = catalogue_table();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, format!("{head}{expected}")).unwrap();
            return;
        }
        assert_eq!(
            generated, expected,
            "docs/metrics.md is out of date: run `UPDATE_DOCS=1 cargo test -p chat the_metrics_catalogue`"
        );
        let mut names: Vec<_> = metric_catalogue().iter().map(|m| m.1).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a metric is declared twice");
    }

    /// Every metric `docs/operations.md` tells an operator to watch is one
    /// the crates declare.
    #[test]
    fn the_operations_guide_names_only_catalogued_metrics() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
        let text = std::fs::read_to_string(&path).expect("docs/operations.md");
        let catalogue: Vec<&str> = metric_catalogue().iter().map(|m| m.1).collect();
        let prefixes: Vec<String> = metric_catalogue()
            .iter()
            .filter_map(|m| m.1.split('_').next().map(|p| format!("{p}_")))
            .collect();
        let mut named = 0;
        for token in text.split('`').skip(1).step_by(2) {
            let name = token.split('{').next().unwrap_or(token);
            let metric_like = prefixes.iter().any(|p| name.starts_with(p.as_str()))
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            if metric_like {
                named += 1;
                assert!(
                    catalogue.contains(&name),
                    "docs/operations.md names {name}, which no crate declares"
                );
            }
        }
        assert!(named > 0, "the guide names metrics");
    }

    /// The code records metrics only by their catalogued constants (never a
    /// name written in place), and records every catalogued metric.
    #[test]
    fn the_code_records_exactly_the_catalogued_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sources = Vec::new();
        let mut dirs = vec![root.join("src"), root.join("crates")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() && !path.ends_with("target") {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    sources.push(path);
                }
            }
        }
        // `pub const IDENT: &str = "name";` of every metrics.rs.
        let mut idents = std::collections::HashMap::new();
        let mut recorded = std::collections::HashSet::new();
        let mut labelled = std::collections::BTreeSet::new();
        for path in &sources {
            let text = std::fs::read_to_string(path).unwrap();
            if path.ends_with("metrics.rs") {
                for line in text.lines() {
                    let decl = line.trim().strip_prefix("pub const ");
                    if let Some((ident, rest)) = decl.and_then(|d| d.split_once(": &str = \"")) {
                        let name = rest.trim_end_matches("\";");
                        idents.insert(name.to_owned(), ident.to_owned());
                    }
                }
            }
            for kind in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(kind) {
                    // `describe_counter!`, and this test's own strings.
                    if text[..at].ends_with("describe_") || text[..at].ends_with('"') {
                        continue;
                    }
                    let arg = text[at + kind.len()..]
                        .trim_start()
                        .split([',', ')'])
                        .next()
                        .unwrap_or_default()
                        .trim();
                    // `register_metrics` walks the catalogue itself.
                    if path.ends_with("src/lib.rs") && arg == "name" {
                        continue;
                    }
                    assert!(
                        arg.contains("metrics::"),
                        "{}: {kind} records {arg:?}, not a catalogued constant",
                        path.display()
                    );
                    let ident = arg.rsplit("::").next().unwrap().to_owned();
                    let call = &text[at..];
                    let call = &call[..call.find(';').unwrap_or(call.len())];
                    if call.contains("=>") {
                        labelled.insert(ident.clone());
                    }
                    recorded.insert(ident);
                }
            }
        }
        for (_, name, _, _) in metric_catalogue() {
            let ident = idents
                .get(name)
                .unwrap_or_else(|| panic!("{name} has no constant in a metrics.rs"));
            assert!(
                recorded.contains(ident),
                "{name} ({ident}) is catalogued but nothing records it"
            );
        }
        let mut want: Vec<&str> = LABELLED_METRICS.to_vec();
        want.sort_unstable();
        let by_name: std::collections::HashMap<&String, &String> =
            idents.iter().map(|(name, ident)| (ident, name)).collect();
        let mut found: Vec<&str> = labelled
            .iter()
            .filter_map(|ident| by_name.get(ident).map(|n| n.as_str()))
            .collect();
        found.sort_unstable();
        assert_eq!(
            found, want,
            "LABELLED_METRICS must list exactly the metrics recorded with labels"
        );
    }

    /// Every expression of the Grafana dashboard names only catalogued
    /// metrics (a histogram by its `_bucket`, `_sum` or `_count` series), and
    /// the dashboard shows what an operator needs first.
    #[test]
    fn the_dashboard_names_only_catalogued_metrics() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("k8s/grafana/chat-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
                .expect("the dashboard is JSON");
        let catalogue = metric_catalogue();
        let exprs: Vec<&str> = dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten())
            .map(|t| t["expr"].as_str().expect("a target has an expr"))
            .collect();
        assert!(!exprs.is_empty());
        // PromQL's own words, and the label names used.
        const PROMQL: [&str; 11] = [
            "sum",
            "by",
            "rate",
            "max",
            "histogram_quantile",
            "le",
            "code",
            "consumer",
            "partition",
            "op",
            "instance",
        ];
        let mut named = std::collections::BTreeSet::new();
        for expr in &exprs {
            let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'));
            for word in words.filter(|w| w.starts_with(|c: char| c.is_ascii_lowercase())) {
                if PROMQL.contains(&word) {
                    continue;
                }
                let known = catalogue.iter().any(|&(_, name, kind, _)| {
                    word == name
                        || (kind == "histogram"
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| word.strip_suffix(s) == Some(name)))
                });
                assert!(
                    known,
                    "the dashboard's {expr:?} names {word}, which no crate declares"
                );
                named.insert(word.trim_end_matches("_bucket").to_owned());
            }
        }
        for needed in [
            "ingest_messages_acked_total",
            "fanout_deliveries_total",
            "ingest_ack_seconds",
            "fanout_delivery_lag_seconds",
            "projector_lag_records",
            "fanout_slow_consumers_total",
            "ingest_bad_frames_total",
        ] {
            assert!(named.contains(needed), "the dashboard shows no {needed}");
        }
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn the_kafka_tuning_defaults_are_the_backends_producer_defaults() {
        let backend = KafkaConfig::new("", "", 1);
        let tuning = KafkaTuning::default();
        assert_eq!(tuning.queue_kbytes, backend.queue_kbytes);
        assert_eq!(tuning.enqueue_timeout, backend.enqueue_timeout);
        assert_eq!(tuning.fetch_wait, backend.fetch_wait);
        assert_eq!((tuning.replication, tuning.min_insync_replicas), (3, 2));
    }

    /// A new data dir gets the file log; one the redb log made keeps redb,
    /// for every topic (its records are read, not started afresh).
    #[tokio::test]
    async fn the_embedded_log_engine_follows_the_data_dir() {
        let tuning = KafkaTuning::default();
        let fresh = tempfile::tempdir().unwrap();
        let log = open_log(&LogSpec::Embedded, fresh.path(), MESSAGES_TOPIC, 2, &tuning)
            .await
            .unwrap();
        drop(log);
        assert!(fresh.path().join("log/chat.messages.log").exists());
        assert!(!fresh.path().join("log/chat.messages.redb").exists());

        let old = tempfile::tempdir().unwrap();
        let redb = EmbeddedLog::open(&old.path().join("log"), MESSAGES_TOPIC, 2).unwrap();
        let epoch = redb.epoch().to_owned();
        drop(redb);
        let log = open_log(&LogSpec::Embedded, old.path(), MESSAGES_TOPIC, 2, &tuning)
            .await
            .unwrap();
        assert_eq!(log.epoch(), epoch, "the redb log, not a new one");
        drop(log);
        let dlq = open_log(&LogSpec::Embedded, old.path(), DLQ_TOPIC, 1, &tuning)
            .await
            .unwrap();
        drop(dlq);
        assert!(old.path().join("log/chat.dlq.redb").exists());
        assert!(!old.path().join("log/chat.messages.log").exists());
        assert_eq!(
            "embedded-redb".parse::<LogSpec>().unwrap(),
            LogSpec::EmbeddedRedb
        );
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn specs_and_roles_parse() {
        assert_eq!("embedded".parse::<LogSpec>().unwrap(), LogSpec::Embedded);
        assert_eq!(
            "kafka://a:9092,b:9092".parse::<LogSpec>().unwrap(),
            LogSpec::Kafka("a:9092,b:9092".into())
        );
        assert!("kafka://".parse::<LogSpec>().is_err());
        assert!("nats://x:1".parse::<LogSpec>().is_err());
        let roles: Roles = "ingest, fanout".parse().unwrap();
        assert!(roles.has(Role::Ingest) && roles.has(Role::Fanout) && !roles.has(Role::Projector));
        assert!("ingest,dance".parse::<Roles>().is_err());
        assert!("".parse::<Roles>().is_err());
    }

    #[cfg(feature = "scylla")]
    #[test]
    fn store_specs_parse_and_a_bad_scylla_uri_is_refused() {
        assert_eq!(
            "embedded".parse::<StoreSpec>().unwrap(),
            StoreSpec::Embedded
        );
        let StoreSpec::Scylla(target) = "scylla://a:9142,b/chat".parse::<StoreSpec>().unwrap()
        else {
            panic!("not a scylla store");
        };
        assert_eq!(target.hosts, ["a:9142", "b:9042"]);
        assert_eq!(target.keyspace, "chat");
        assert_eq!(scylla_name(&target), "scylla://a:9142,b:9042/chat");
        // The parser's reason reaches the command line.
        let e = "scylla://bad".parse::<StoreSpec>().unwrap_err();
        assert!(e.contains("scylla://bad") && e.contains("KEYSPACE"), "{e}");
        let e = "scylla://h:9042/Chat".parse::<StoreSpec>().unwrap_err();
        assert!(e.contains("keyspace"), "{e}");
        for bad in ["scylla://h/chat?consistency=one", "cassandra://h/chat", ""] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad:?} was accepted");
        }
        let e = "redis://h".parse::<StoreSpec>().unwrap_err();
        assert!(e.contains("scylla://"), "{e}");
    }

    #[cfg(feature = "scylla")]
    #[tokio::test]
    async fn serving_on_an_unreachable_scylla_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServeConfig {
            data_dir: dir.path().to_owned(),
            partitions: 2,
            log: LogSpec::Embedded,
            kafka: KafkaTuning::default(),
            // Nothing listens on port 1.
            store: "scylla://127.0.0.1:1/ks".parse().unwrap(),
            roles: Roles::all(),
            group: None,
            gateway: GatewayConfig::default(),
            presence: PresenceConfig::default(),
            auth: ingest::auth::Auth::Dev,
        };
        let served = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            serve(listener, config, None, CancellationToken::new()),
        )
        .await
        .expect("serve neither failed nor gave up");
        let text = format!("{:#}", served.unwrap_err());
        assert!(
            text.contains("opening the history store scylla://127.0.0.1:1/ks"),
            "{text}"
        );
        assert!(text.contains("store unavailable"), "{text}");
    }
}
