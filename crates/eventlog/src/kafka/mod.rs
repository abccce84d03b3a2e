//! The Kafka/Redpanda backend of the log, through rdkafka (bundled
//! librdkafka).
//!
//! - Appends use one idempotent producer (`acks=all`, `murmur2_random`, the
//!   partitioner the embedded log uses too); `append` returns once every
//!   record of the batch is acknowledged by the brokers, with its offset.
//! - The topic is created at start when missing, with the configured
//!   partition count; an existing topic with another count is refused.
//! - The epoch is the topic's id (DescribeTopics), so a deleted and
//!   re-created topic is a new epoch.
//! - Reads never make clients: every `read` of the process is a cursor of
//!   one of two shared readers ([`reader`]), each one consumer with manual
//!   assignment polled by one thread. `live` serves the reads near where it
//!   already fetches a partition (so fan-out and a projector that keeps up
//!   share one fetch); `back` serves the far ones (catch-ups, a projector far
//!   behind) and the slow ones `live` hands over. The logs of other topics
//!   of the process ([`KafkaLog::sibling`]) use the same clients, so the
//!   connections to the brokers are a fixed number: a producer, the two
//!   readers, the end probe, and a group member per `assignments` stream.
//! - `assignments` joins a consumer group only to learn which partitions
//!   this member owns; it fetches nothing (its partitions are paused): the
//!   owner reads them with `read` from the position its store keeps.

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::{Appended, EventLog, LogError, Record, RecordStream};

mod reader;

use reader::{Reader, TopicPartition};

/// How to reach the brokers and which topic to use.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    pub topic: String,
    pub partitions: u32,
    /// Replication factor of a topic this creates, and the fewest replicas
    /// an existing topic's partitions may have.
    pub replication: i32,
    /// `min.insync.replicas` of a topic this creates: with `acks=all`, how
    /// many replicas hold a record before it is acknowledged.
    pub min_insync_replicas: i32,
    /// Use an existing topic even when it keeps records for a limited time
    /// or size, or has fewer replicas than [`Self::replication`] (reported
    /// as warnings instead of refused).
    pub accept_topic_config: bool,
    /// Deadline of metadata and admin requests.
    pub timeout: Duration,
    /// How long an append waits for room in a full producer queue before
    /// the rest of its batch is refused (`unavailable`: never sent).
    pub enqueue_timeout: Duration,
    /// Bound of the producer queue, in KiB.
    pub queue_kbytes: u32,
    /// `fetch.wait.max.ms` of every reader: how long the brokers may hold a
    /// fetch that finds nothing new. Kafka and Redpanda answer as soon as a
    /// record arrives, so it costs no latency there; it bounds how long a
    /// partition newly given to a reader waits for the fetch in flight, and
    /// how often an idle reader asks. The test broker, tansu, holds an idle
    /// fetch up to about half of it, and gives up a fetch whose work takes
    /// longer (see [`FETCH_WAIT`]).
    pub fetch_wait: Duration,
    /// `None` for a topic that is a source of truth: created keeping every
    /// record, and refused when it would delete some. `Some(t)` for an
    /// ephemeral topic (presence, typing): created with `retention.ms` of
    /// `t`, its retention and replicas never checked, its partition count
    /// taken as found.
    pub retention: Option<Duration>,
}

/// The default [`KafkaConfig::fetch_wait`]. tansu 0.6's memory engine lists
/// every batch of a partition on each fetch that has records to return and
/// stops at the fetch's wait: measured here, a partition of 30,000 batches
/// could no longer be read at all with 10 or 20 ms (not even its new
/// records, nor the other partitions of the same fetch, whose share of the
/// wait the listing used up), and could with 50 ms. 10 ms was the setting
/// before; a gateway restarted after ten minutes of the fault harness then
/// read nothing. 250 ms leaves that listing room for partitions ten times
/// longer, and costs an idle reader on Kafka four requests a second.
pub const FETCH_WAIT: Duration = Duration::from_millis(250);

impl KafkaConfig {
    pub fn new(brokers: &str, topic: &str, partitions: u32) -> Self {
        KafkaConfig {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            partitions,
            replication: 1,
            min_insync_replicas: 1,
            accept_topic_config: false,
            timeout: Duration::from_secs(10),
            enqueue_timeout: Duration::from_secs(5),
            queue_kbytes: 64 * 1024,
            fetch_wait: FETCH_WAIT,
            retention: None,
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true")
            // Every client connects to every broker at once, so the
            // connections a process holds do not change with what it does.
            .set("enable.sparse.connections", "false")
            .set("log_level", "4");
        // librdkafka's own debug contexts (`fetch,consumer,protocol`, `all`
        // …), logged under the `librdkafka` target: for chasing a client
        // that stands still, never needed otherwise.
        if let Ok(contexts) = std::env::var("CHAT_KAFKA_DEBUG") {
            c.set("debug", contexts).set("log_level", "7");
        }
        c
    }

    /// The producer's settings: idempotent, `acks=all`, Kafka's keyed
    /// partitioner, batched with a short linger. Public so that a benchmark
    /// baseline uses exactly these.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", self.queue_kbytes.to_string())
            // A record sent but not acknowledged may yet be written: it is
            // never timed out and reported as failed, which would tell a
            // client `unavailable` (nothing appended) falsely. It waits for
            // the brokers instead; the queue bound above stops intake.
            .set("message.timeout.ms", "0");
        c
    }

    /// A consumer for manual assignment (librdkafka wants a group id for
    /// it; the group is never joined and nothing is committed).
    fn reader(&self) -> ClientConfig {
        self.consumer("chat-reader")
    }

    /// The readers' settings with `group` as the group id. Public so that a
    /// benchmark baseline fetches exactly as the log does.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.client();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait.as_millis().to_string())
            .set("enable.partition.eof", "false");
        c
    }
}

/// Parses `kafka://HOST:PORT[,HOST:PORT…]` into the brokers list.
pub fn parse_url(url: &str) -> Result<String, LogError> {
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| LogError::Storage(format!("not a kafka:// url: {url}")))?;
    let brokers = rest.trim_end_matches('/');
    if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
        return Err(LogError::Storage(format!(
            "expected kafka://HOST:PORT[,HOST:PORT...], got {url}"
        )));
    }
    Ok(brokers.to_owned())
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// Kafka/Redpanda log backend: one topic, on clients it may share with the
/// other topics of this process ([`KafkaLog::sibling`]).
pub struct KafkaLog {
    config: KafkaConfig,
    topic: Arc<str>,
    clients: Arc<Clients>,
    epoch: String,
}

/// The broker clients of a process, shared by its topics: a fixed set, so
/// the connections to the brokers do not grow with reads.
struct Clients {
    producer: FutureProducer,
    /// Serves the reads near where it already fetches (fan-out's
    /// dispatchers, a projector that keeps up), and metadata queries.
    live: Reader,
    /// Serves the reads far from where `live` fetches (catch-ups, a
    /// projector far behind) and the reads `live` hands over because their
    /// queue is full, pausing a partition for a slow read.
    back: Reader,
    /// Reads the last batch to find the exact end (see [`exact_end`]).
    probe: std::sync::Mutex<BaseConsumer>,
    /// Bounds the blocking metadata calls in flight, each of which holds
    /// one of the runtime's blocking threads.
    blocking: tokio::sync::Semaphore,
}

/// A read starting this close to `live`'s fetch position of its partition
/// shares that fetch; a farther one goes to `back`.
const NEAR: u64 = 8192;

/// Blocking metadata calls in flight at most.
const BLOCKING_CALLS: usize = 4;

impl Clients {
    fn new(config: &KafkaConfig) -> Result<Self, LogError> {
        let producer: FutureProducer = config.producer().create().map_err(unavailable)?;
        let back = Reader::start(
            "kafka-read-back",
            config.reader().create().map_err(unavailable)?,
            None,
        )?;
        let live = Reader::start(
            "kafka-read",
            config.reader().create().map_err(unavailable)?,
            Some(back.overflow()),
        )?;
        let probe = config.reader().create().map_err(unavailable)?;
        Ok(Clients {
            producer,
            live,
            back,
            probe: std::sync::Mutex::new(probe),
            blocking: tokio::sync::Semaphore::new(BLOCKING_CALLS),
        })
    }

    /// Runs the blocking `call`, at most [`BLOCKING_CALLS`] at once.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let _permit = self.blocking.acquire().await.map_err(unavailable)?;
        tokio::task::spawn_blocking(call)
            .await
            .map_err(unavailable)?
    }
}

impl KafkaLog {
    /// Connects, creates the topic when missing, checks its partition count
    /// and reads its id (the epoch).
    pub async fn connect(config: KafkaConfig) -> Result<Self, LogError> {
        if config.replication < 1 || !(1..=config.replication).contains(&config.min_insync_replicas)
        {
            return Err(LogError::Storage(format!(
                "replication factor {} with min.insync.replicas {}: need 1 <= min.insync.replicas <= replication factor",
                config.replication, config.min_insync_replicas
            )));
        }
        if config.replication == 1 {
            tracing::warn!(
                topic = %config.topic,
                "replication factor 1: losing the one broker that holds a partition loses its acked messages; use 3 on a cluster"
            );
        }
        let clients = Arc::new(Clients::new(&config)?);
        Self::open(clients, config).await
    }

    /// The log of another topic, on this log's clients (no new connections):
    /// created when missing with this log's settings and checked like it.
    pub async fn sibling(&self, topic: &str, partitions: u32) -> Result<Self, LogError> {
        let config = KafkaConfig {
            topic: topic.to_owned(),
            partitions,
            ..self.config.clone()
        };
        Self::open(self.clients.clone(), config).await
    }

    /// An ephemeral topic on this log's clients (no new connections):
    /// created when missing with `partitions` partitions and records kept
    /// for `retention`; an existing one is used as it is, whatever its
    /// partition count and retention. Nothing of it is a source of truth.
    pub async fn ephemeral_sibling(
        &self,
        topic: &str,
        partitions: u32,
        retention: Duration,
    ) -> Result<Self, LogError> {
        let config = KafkaConfig {
            topic: topic.to_owned(),
            partitions,
            retention: Some(retention),
            ..self.config.clone()
        };
        Self::open(self.clients.clone(), config).await
    }

    async fn open(clients: Arc<Clients>, mut config: KafkaConfig) -> Result<Self, LogError> {
        // A short-lived client: its connections close once the topic is
        // checked.
        let admin: AdminClient<DefaultClientContext> =
            config.client().create().map_err(unavailable)?;
        let min_insync = config.min_insync_replicas.to_string();
        let retention_ms = config
            .retention
            .map_or("-1".to_owned(), |t| t.as_millis().max(1).to_string());
        let topic = NewTopic::new(
            &config.topic,
            config.partitions as i32,
            TopicReplication::Fixed(config.replication),
        )
        .set("retention.ms", &retention_ms)
        .set("retention.bytes", "-1")
        .set("min.insync.replicas", &min_insync);
        let opts = AdminOptions::new().request_timeout(Some(config.timeout));
        let created = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(unavailable)?;
        for result in created {
            match result {
                Ok(_) => {
                    tracing::info!(topic = %config.topic, partitions = config.partitions, "topic created")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Unavailable(format!(
                        "creating topic {name}: {code}"
                    )))
                }
            }
        }
        let meta = clients.live.consumer().clone();
        let found = {
            let (meta, topic, timeout) = (meta.clone(), config.topic.clone(), config.timeout);
            clients
                .blocking(move || partition_count(&meta, &topic, timeout))
                .await?
        };
        if config.retention.is_some() {
            // Ephemeral: nothing depends on where a key lives over time.
            config.partitions = found;
        } else {
            if found != config.partitions {
                return Err(LogError::PartitionMismatch {
                    found,
                    wanted: config.partitions,
                });
            }
            check_topic(&admin, &meta, &config).await?;
        }
        let epoch = {
            let (client, topic, timeout) = (admin, config.topic.clone(), config.timeout);
            clients
                .blocking(move || topic_id(client.inner(), &topic, timeout))
                .await?
        };
        tracing::info!(topic = %config.topic, epoch, partitions = found, "kafka log ready");
        Ok(KafkaLog {
            topic: Arc::from(config.topic.as_str()),
            config,
            clients,
            epoch,
        })
    }

    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    fn tp(&self, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: self.topic.clone(),
            partition,
        }
    }
}

/// What the brokers say of one topic (`chat doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicReport {
    pub topic: String,
    /// False when the brokers know no such topic (nothing else is set).
    pub exists: bool,
    pub partitions: u32,
    /// Replicas per partition, at the fewest.
    pub replicas: usize,
    /// `None`: the broker does not report it (its default applies).
    pub retention_ms: Option<String>,
    pub retention_bytes: Option<String>,
}

impl TopicReport {
    /// Why the topic cannot be chat's source of truth with `replication`
    /// replicas asked for (empty when it can); what `chat serve` refuses.
    pub fn problems_as_log(&self, replication: i32) -> Vec<String> {
        topic_problems(
            self.retention_ms.as_deref(),
            self.retention_bytes.as_deref(),
            self.replicas,
            replication,
        )
    }
}

/// Describes `config.topic` without creating it: its partitions, replicas
/// and retention, on a short-lived client.
pub async fn inspect_topic(config: &KafkaConfig) -> Result<TopicReport, LogError> {
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(config.client().create().map_err(unavailable)?);
    let (topic, timeout) = (config.topic.clone(), config.timeout);
    let found = {
        let (admin, topic) = (admin.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(unavailable)?;
            Ok::<_, LogError>(
                md.topics()
                    .iter()
                    .find(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    })
                    .map(|t| {
                        let partitions = t.partitions();
                        let fewest = partitions.iter().map(|p| p.replicas().len()).min();
                        (partitions.len() as u32, fewest.unwrap_or(0))
                    }),
            )
        })
        .await
        .map_err(unavailable)??
    };
    let Some((partitions, replicas)) = found else {
        return Ok(TopicReport {
            topic,
            exists: false,
            partitions: 0,
            replicas: 0,
            retention_ms: None,
            retention_bytes: None,
        });
    };
    let resource = topic_configs(&admin, &topic, timeout).await?;
    let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
    Ok(TopicReport {
        retention_ms: value("retention.ms"),
        retention_bytes: value("retention.bytes"),
        topic,
        exists: true,
        partitions,
        replicas,
    })
}

/// The configs of `topic`, as the brokers describe them.
async fn topic_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<rdkafka::admin::ConfigResource, LogError> {
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(unavailable)?;
    match described.into_iter().next() {
        Some(Ok(resource)) => Ok(resource),
        Some(Err(code)) => Err(LogError::Unavailable(format!(
            "describing the configs of topic {topic}: {code}"
        ))),
        None => Err(LogError::Unavailable(format!(
            "the configs of topic {topic} were not described"
        ))),
    }
}

/// What an existing topic must be for chat to use it as the source of
/// truth: records kept forever (by time and by size) and at least
/// `config.replication` replicas per partition. Each shortfall is named; they
/// refuse the topic unless `config.accept_topic_config`, which turns them
/// into warnings. A setting the broker does not report counts as the
/// broker's default, which is finite on Kafka and Redpanda (7 days).
async fn check_topic(
    admin: &AdminClient<DefaultClientContext>,
    meta: &Arc<BaseConsumer>,
    config: &KafkaConfig,
) -> Result<(), LogError> {
    let resource = topic_configs(admin, &config.topic, config.timeout).await?;
    let replicas = {
        let (meta, topic, timeout) = (meta.clone(), config.topic.clone(), config.timeout);
        tokio::task::spawn_blocking(move || fewest_replicas(&meta, &topic, timeout))
            .await
            .map_err(unavailable)??
    };
    let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
    let problems = topic_problems(
        value("retention.ms").as_deref(),
        value("retention.bytes").as_deref(),
        replicas,
        config.replication,
    );
    if problems.is_empty() {
        return Ok(());
    }
    if config.accept_topic_config {
        for problem in &problems {
            tracing::warn!(topic = %config.topic, problem, "topic config accepted as it is");
        }
        return Ok(());
    }
    Err(LogError::TopicConfig {
        topic: config.topic.clone(),
        problems,
    })
}

/// The shortfalls of a topic with these settings (`None`: not reported)
/// whose partitions have `replicas` replicas at the fewest, when
/// `replication` are asked for.
fn topic_problems(
    retention_ms: Option<&str>,
    retention_bytes: Option<&str>,
    replicas: usize,
    replication: i32,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, value) in [
        ("retention.ms", retention_ms),
        ("retention.bytes", retention_bytes),
    ] {
        match value.map(str::trim) {
            Some("-1") => {}
            Some(v) => problems.push(format!(
                "{name}={v}: the log would delete records, and a replay could no longer rebuild the history (want -1)"
            )),
            None => problems.push(format!(
                "{name} is not set: the broker's default applies, finite on Kafka and Redpanda (want -1)"
            )),
        }
    }
    if (replicas as i64) < i64::from(replication) {
        problems.push(format!(
            "{replicas} replicas per partition at the fewest, fewer than the {replication} asked for"
        ));
    }
    problems
}

/// `f` of what the brokers say of `topic`, asked now.
fn with_topic<T>(
    meta: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    f: impl FnOnce(&rdkafka::metadata::MetadataTopic) -> Result<T, LogError>,
) -> Result<T, LogError> {
    let md = meta
        .fetch_metadata(Some(topic), timeout)
        .map_err(unavailable)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| LogError::Unavailable(format!("topic {topic} has no metadata")))?;
    f(t)
}

/// The fewest replicas any partition of `topic` has.
fn fewest_replicas(meta: &BaseConsumer, topic: &str, timeout: Duration) -> Result<usize, LogError> {
    with_topic(meta, topic, timeout, |t| {
        Ok(t.partitions()
            .iter()
            .map(|p| p.replicas().len())
            .min()
            .unwrap_or(0))
    })
}

/// The longest a readiness check waits for the brokers.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Ok when the brokers name a leader for each of the `wanted` partitions of
/// `topic`; else the first partition without one.
fn leaders(
    meta: &BaseConsumer,
    topic: &str,
    wanted: u32,
    timeout: Duration,
) -> Result<(), LogError> {
    with_topic(meta, topic, timeout, |t| has_leaders(t, topic, wanted))
}

fn has_leaders(
    t: &rdkafka::metadata::MetadataTopic,
    topic: &str,
    wanted: u32,
) -> Result<(), LogError> {
    if let Some(e) = t.error() {
        return Err(LogError::Unavailable(format!("topic {topic}: {e:?}")));
    }
    for p in 0..wanted {
        let leader = t
            .partitions()
            .iter()
            .find(|m| m.id() == p as i32)
            .filter(|m| m.error().is_none())
            .map(|m| m.leader());
        if leader.is_none_or(|l| l < 0) {
            return Err(LogError::Unavailable(format!(
                "partition {p} of {topic} has no leader"
            )));
        }
    }
    Ok(())
}

/// The partition count of `topic`, waiting for a just-created topic to show.
fn partition_count(meta: &BaseConsumer, topic: &str, timeout: Duration) -> Result<u32, LogError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let md = meta
            .fetch_metadata(Some(topic), timeout)
            .map_err(unavailable)?;
        let count = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as u32);
        if count > 0 {
            return Ok(count);
        }
        if std::time::Instant::now() > deadline {
            return Err(LogError::Unavailable(format!(
                "topic {topic} has no partitions"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The topic id, by DescribeTopics, which the rdkafka crate does not wrap.
#[allow(unsafe_code)]
fn topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<String, LogError> {
    use rdkafka::bindings as rd;
    let name = CString::new(topic).map_err(|e| LogError::Storage(e.to_string()))?;
    let mut names = [name.as_ptr()];
    // SAFETY: every pointer passed comes from librdkafka or from `names`,
    // which outlives the calls; every object created here is destroyed
    // exactly once below, after its last use; the description and the uuid
    // are owned by `event` and only read before it is destroyed.
    unsafe {
        let rk = client.native_ptr();
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, topics, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout.as_millis() as i32);
        let text = |p: *const std::os::raw::c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let result = if event.is_null() {
            Err(LogError::Unavailable(
                "describing the topic timed out".into(),
            ))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(LogError::Unavailable(format!(
                "describing the topic: {}",
                text(rd::rd_kafka_event_error_string(event))
            )))
        } else {
            let res = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0usize;
            let descs = rd::rd_kafka_DescribeTopics_result_topics(res, &mut count);
            if res.is_null() || descs.is_null() || count == 0 {
                Err(LogError::Unavailable("the topic was not described".into()))
            } else {
                let desc = *descs;
                let err = rd::rd_kafka_TopicDescription_error(desc);
                if !err.is_null()
                    && rd::rd_kafka_error_code(err)
                        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    Err(LogError::Unavailable(format!(
                        "describing the topic: {}",
                        text(rd::rd_kafka_error_string(err))
                    )))
                } else {
                    let id = rd::rd_kafka_TopicDescription_topic_id(desc);
                    if id.is_null() {
                        Err(LogError::Unavailable("the topic has no id".into()))
                    } else {
                        let msb = rd::rd_kafka_Uuid_most_significant_bits(id) as u64;
                        let lsb = rd::rd_kafka_Uuid_least_significant_bits(id) as u64;
                        if msb == 0 && lsb == 0 {
                            Err(LogError::Unavailable(
                                "the broker gave the topic no id; cannot name the epoch".into(),
                            ))
                        } else {
                            Ok(format!("{msb:016x}{lsb:016x}"))
                        }
                    }
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_TopicCollection_destroy(topics);
        rd::rd_kafka_AdminOptions_destroy(options);
        result
    }
}

/// The watermarks (low, high) the brokers sent with the last fetch of a
/// partition this consumer reads, without a round trip; `None` when it has
/// none. The rdkafka crate does not wrap this call.
#[allow(unsafe_code)]
fn cached_watermarks(consumer: &BaseConsumer, topic: &str, partition: u32) -> Option<(i64, i64)> {
    use rdkafka::bindings as rd;
    let name = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the handle is the consumer's own and outlives the call; `name`
    // outlives it too; `low` and `high` are valid for writes.
    let err = unsafe {
        rd::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            name.as_ptr(),
            partition as i32,
            &mut low,
            &mut high,
        )
    };
    (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some((low, high))
}

/// The offset after the last record of a partition whose high watermark
/// the broker reports as `high`.
///
/// Some Kafka-protocol brokers (tansu 0.6) report the last batch's base
/// offset + 1 as the high watermark instead of the last offset + 1. Reading
/// from `high - 1` returns the rest of that batch, so its last record gives
/// the exact end on every broker; on Kafka and Redpanda it is `high` itself.
fn exact_end(
    probe: &BaseConsumer,
    topic: &str,
    partition: u32,
    high: u64,
    timeout: Duration,
) -> Result<u64, LogError> {
    if high == 0 {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(high as i64 - 1))
        .map_err(unavailable)?;
    probe.assign(&tpl).map_err(unavailable)?;
    let mut end = high;
    let mut deadline = std::time::Instant::now() + timeout;
    let mut seen = false;
    // Bounded whatever the broker does: the deadline is checked on every
    // turn (errors and records included), and once the batch at `high - 1`
    // is seen, only what is already fetched is read, for at most
    // `BATCH_READ`. Records appended meanwhile only move the end further,
    // which a caller may take (everything up to it is in the log); an
    // unbounded loop here, under steady traffic, held the probe and with it
    // every join that asked the log for a partition's end.
    const BATCH_READ: Duration = Duration::from_millis(100);
    while std::time::Instant::now() < deadline {
        let wait = if seen {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        match probe.poll(wait) {
            Some(Ok(m)) => {
                if !seen {
                    seen = true;
                    deadline = deadline.min(std::time::Instant::now() + BATCH_READ);
                }
                end = end.max(m.offset() as u64 + 1);
            }
            Some(Err(e)) => tracing::debug!(error = %e, "probe read error"),
            None if seen => break,
            None => {}
        }
    }
    if let Err(e) = probe.unassign() {
        tracing::debug!(error = %e, "probe unassign failed");
    }
    Ok(end)
}

#[async_trait]
impl EventLog for KafkaLog {
    fn partitions(&self) -> u32 {
        self.config.partitions
    }

    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        let mut deliveries = Vec::with_capacity(records.len());
        let mut refused = None;
        'records: for r in &records {
            let deadline = tokio::time::Instant::now() + self.config.enqueue_timeout;
            loop {
                let record = FutureRecord::to(&self.config.topic)
                    .key(&r.key)
                    .payload(&r.value)
                    .timestamp(r.ts);
                match self.clients.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        // Full producer queue (the brokers are slow or
                        // gone): wait for room, up to the deadline.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        // Never enqueued, so certainly not appended.
                        refused = Some(unavailable(e));
                        break 'records;
                    }
                }
            }
        }
        let mut placed = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            // Enqueued records are awaited whatever happens: their outcome
            // decides what the caller may be told.
            match delivery.await {
                Ok(Ok(d)) => placed.push(Appended {
                    partition: d.partition as u32,
                    offset: d.offset as u64,
                }),
                Ok(Err((e, _))) => {
                    refused.get_or_insert(unavailable(e));
                    break;
                }
                Err(_) => {
                    refused.get_or_insert(LogError::Unavailable("producer closed".into()));
                    break;
                }
            }
        }
        match refused {
            None => Ok(placed),
            Some(cause) if placed.is_empty() => Err(cause),
            Some(cause) => Err(LogError::Partial {
                appended: placed,
                cause: Box::new(cause),
            }),
        }
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check(partition)?;
        let clients = self.clients.clone();
        let (topic, timeout) = (self.config.topic.clone(), self.config.timeout);
        self.clients
            .blocking(move || {
                let (_, high) = clients
                    .live
                    .consumer()
                    .fetch_watermarks(&topic, partition as i32, timeout)
                    .map_err(unavailable)?;
                let probe = clients.probe.lock().unwrap_or_else(|p| p.into_inner());
                exact_end(&probe, &topic, partition, high.max(0) as u64, timeout)
            })
            .await
    }

    /// One metadata request: every partition of the topic has a leader.
    /// Bounded by [`READY_TIMEOUT`], so a readiness probe against dead
    /// brokers holds a blocking thread that long at most.
    async fn readable(&self) -> Result<(), LogError> {
        let meta = self.clients.live.consumer().clone();
        let (topic, wanted) = (self.config.topic.clone(), self.config.partitions);
        let timeout = self.config.timeout.min(READY_TIMEOUT);
        self.clients
            .blocking(move || leaders(&meta, &topic, wanted, timeout))
            .await
    }

    async fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check(partition)?;
        // The low watermark the brokers sent with the last fetch of a
        // partition a reader follows: no round trip.
        for reader in [&self.clients.live, &self.clients.back] {
            if reader.position(&self.tp(partition)).is_none() {
                continue;
            }
            if let Some((low, _)) =
                cached_watermarks(reader.consumer(), &self.config.topic, partition)
            {
                if low >= 0 {
                    return Ok(low as u64);
                }
            }
        }
        let meta = self.clients.live.consumer().clone();
        let (topic, timeout) = (self.config.topic.clone(), self.config.timeout);
        self.clients
            .blocking(move || {
                let (low, _) = meta
                    .fetch_watermarks(&topic, partition as i32, timeout)
                    .map_err(unavailable)?;
                Ok(low.max(0) as u64)
            })
            .await
    }

    fn read(&self, partition: u32, from: u64) -> RecordStream {
        if let Err(e) = self.check(partition) {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        let tp = self.tp(partition);
        let near = self
            .clients
            .live
            .position(&tp)
            .is_none_or(|at| from.abs_diff(at) <= NEAR);
        if near {
            self.clients.live.read(tp, from)
        } else {
            self.clients.back.read(tp, from)
        }
    }

    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.check(partition)?;
        let consumer: BaseConsumer = self.config.consumer(group).create().map_err(unavailable)?;
        let (topic, timeout) = (self.config.topic.clone(), self.config.timeout);
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition as i32);
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(unavailable)?;
            let offset = committed
                .find_partition(&topic, partition as i32)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o as u64),
                    _ => None,
                });
            Ok(offset)
        })
        .await
        .map_err(unavailable)?
    }

    async fn store_position(&self, group: &str, partition: u32, next: u64) -> Result<(), LogError> {
        self.check(partition)?;
        let consumer: BaseConsumer = self.config.consumer(group).create().map_err(unavailable)?;
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(next as i64))
                .map_err(unavailable)?;
            consumer.commit(&tpl, CommitMode::Sync).map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    fn assignments(&self, group: &str) -> BoxStream<'static, Result<Vec<u32>, LogError>> {
        let (tx, rx) = watch::channel(None);
        let context = GroupContext { tx: tx.clone() };
        let consumer: Result<BaseConsumer<GroupContext>, _> = self
            .config
            .consumer(group)
            // Fast joins and fast takeover of a dead member's partitions.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "6000")
            .create_with_context(context);
        let consumer = match consumer.and_then(|c| c.subscribe(&[&self.config.topic]).map(|()| c)) {
            Ok(c) => c,
            Err(e) => return futures::stream::once(async move { Err(unavailable(e)) }).boxed(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("kafka-group".into())
            .spawn(move || {
                // Polling keeps the membership alive and runs the rebalance
                // callbacks; nothing is fetched since partitions are paused.
                while !thread_stop.load(Ordering::Relaxed) && !tx.is_closed() {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                        tracing::debug!(
                            partition = m.partition(),
                            "group consumer fetched a record it ignores"
                        );
                    }
                }
                consumer.unsubscribe();
            });
        if let Err(e) = spawned {
            return futures::stream::once(async move { Err(unavailable(e)) }).boxed();
        }
        let guard = StopOnDrop(stop);
        tokio_stream::wrappers::WatchStream::new(rx)
            .filter_map(move |v| {
                let _keep = &guard;
                futures::future::ready(v.map(Ok))
            })
            .boxed()
    }
}

impl KafkaLog {
    fn check(&self, partition: u32) -> Result<(), LogError> {
        if partition >= self.config.partitions {
            return Err(LogError::NoSuchPartition {
                partition,
                partitions: self.config.partitions,
            });
        }
        Ok(())
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Publishes the member's partitions after each rebalance, and pauses them.
struct GroupContext {
    tx: watch::Sender<Option<Vec<u32>>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing the group's partitions failed");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        let mut owned: Vec<u32> = consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| e.partition() as u32)
                    .collect()
            })
            .unwrap_or_default();
        owned.sort_unstable();
        tracing::info!(?owned, "group assignment");
        self.tx.send_replace(Some(owned));
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::LogHarness;

    struct Harness {
        broker: testing::Broker,
    }

    #[async_trait]
    impl LogHarness for Harness {
        async fn fresh(&self, partitions: u32) -> (Arc<dyn EventLog>, String) {
            let topic = format!("t-{}", uuid::Uuid::new_v4().simple());
            let log = self.reopen(&topic, partitions).await.unwrap();
            (log, topic)
        }

        async fn reopen(
            &self,
            topic: &str,
            partitions: u32,
        ) -> Result<Arc<dyn EventLog>, LogError> {
            let log =
                KafkaLog::connect(KafkaConfig::new(&self.broker.brokers(), topic, partitions))
                    .await?;
            Ok(Arc::new(log))
        }
    }

    fn harness() -> Harness {
        Harness {
            broker: testing::Broker::start(None),
        }
    }

    crate::log_conformance_suite!(harness());

    #[test]
    fn a_topic_is_fit_only_when_it_keeps_everything_on_enough_replicas() {
        assert!(topic_problems(Some("-1"), Some("-1"), 3, 3).is_empty());
        assert!(topic_problems(Some("-1"), Some(" -1"), 5, 3).is_empty());
        let p = topic_problems(Some("604800000"), Some("-1"), 3, 3);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("retention.ms=604800000"), "{p:?}");
        let p = topic_problems(None, Some("1073741824"), 1, 3);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("retention.ms is not set"), "{p:?}");
        assert!(p[1].starts_with("retention.bytes=1073741824"), "{p:?}");
        assert!(p[2].contains("fewer than the 3"), "{p:?}");
    }

    /// The configs of `topic` as the broker reports them.
    async fn configs(
        broker: &testing::Broker,
        topic: &str,
    ) -> std::collections::HashMap<String, String> {
        let admin: AdminClient<DefaultClientContext> =
            KafkaConfig::new(&broker.brokers(), topic, 1)
                .client()
                .create()
                .unwrap();
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
            .await
            .unwrap();
        let resource = described.into_iter().next().unwrap().unwrap();
        resource
            .entries
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    }

    /// A partition of many small batches, as a chat's steady trickle of
    /// sends makes, is read behind its end, at its end, and its end offset
    /// is found. With a 10 ms fetch wait the test broker gave up every fetch
    /// of such a partition (its listing of the batches took longer), so a
    /// gateway restarted late in a long run read nothing at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_partition_is_read_behind_its_end_and_at_it() {
        const BATCHES: u64 = 20_000;
        let broker = testing::Broker::start(None);
        let config = KafkaConfig::new(&broker.brokers(), "long", 1);
        let log = KafkaLog::connect(config.clone()).await.unwrap();
        // A batch per record, as fast as the broker takes them.
        let producer: FutureProducer = config
            .producer()
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .create()
            .unwrap();
        let sent: Vec<_> = (0..BATCHES)
            .map(|i| {
                let value = i.to_string();
                producer
                    .send_result(FutureRecord::to("long").key("room").payload(&value))
                    .unwrap()
            })
            .collect();
        for (i, delivery) in sent.into_iter().enumerate() {
            let placed = delivery.await.unwrap().unwrap();
            assert_eq!(placed.offset, i as i64);
        }
        assert_eq!(log.end_offset(0).await.unwrap(), BATCHES);
        let mut behind = log.read(0, BATCHES - 100);
        let got = crate::conformance::take(&mut behind, 100).await;
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (BATCHES - 100..BATCHES).collect::<Vec<u64>>());
        let last = Record {
            key: b"room".to_vec(),
            value: BATCHES.to_string().into_bytes(),
            ts: 1,
        };
        log.append(vec![last]).await.unwrap();
        let next = crate::conformance::take(&mut behind, 1).await;
        assert_eq!(next[0].offset, BATCHES, "the tail is read too");
        assert_eq!(next[0].value, BATCHES.to_string().into_bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_created_topic_keeps_records_forever_with_its_min_insync_replicas() {
        let broker = testing::Broker::start(None);
        let topic = format!("t-{}", uuid::Uuid::new_v4().simple());
        let log = KafkaLog::connect(KafkaConfig::new(&broker.brokers(), &topic, 2))
            .await
            .unwrap();
        drop(log);
        let configs = configs(&broker, &topic).await;
        assert_eq!(
            configs.get("retention.ms").map(String::as_str),
            Some("-1"),
            "{configs:?}"
        );
        assert_eq!(
            configs.get("retention.bytes").map(String::as_str),
            Some("-1"),
            "{configs:?}"
        );
        assert_eq!(
            configs.get("min.insync.replicas").map(String::as_str),
            Some("1"),
            "{configs:?}"
        );
        // Opened again, the topic chat made passes the check.
        KafkaLog::connect(KafkaConfig::new(&broker.brokers(), &topic, 2))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ephemeral_topic_is_created_short_lived_and_used_as_found() {
        let broker = testing::Broker::start(None);
        let log = KafkaLog::connect(KafkaConfig::new(&broker.brokers(), "messages", 2))
            .await
            .unwrap();
        let minute = Duration::from_secs(60);
        let fresh = log.ephemeral_sibling("fresh", 1, minute).await.unwrap();
        assert_eq!(fresh.partitions(), 1);
        let configs = configs(&broker, "fresh").await;
        assert_eq!(
            configs.get("retention.ms").map(String::as_str),
            Some("60000"),
            "{configs:?}"
        );
        // One made by someone else, with other partitions and retention: used
        // as it is, since nothing in it must last.
        let admin: AdminClient<DefaultClientContext> = log.config.client().create().unwrap();
        let other =
            NewTopic::new("other", 3, TopicReplication::Fixed(1)).set("retention.ms", "604800000");
        for created in admin
            .create_topics([&other], &AdminOptions::new())
            .await
            .unwrap()
        {
            created.unwrap();
        }
        let found = log.ephemeral_sibling("other", 1, minute).await.unwrap();
        assert_eq!(found.partitions(), 3);
        let at = found
            .append(vec![Record {
                key: b"gw-1/x".to_vec(),
                value: b"{}".to_vec(),
                ts: 1,
            }])
            .await
            .unwrap();
        let mut read = found.read(at[0].partition, at[0].offset);
        let got = crate::conformance::take(&mut read, 1).await;
        assert_eq!(got[0].value, b"{}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_existing_topic_that_deletes_records_is_refused_unless_accepted() {
        let broker = testing::Broker::start(None);
        let topic = format!("t-{}", uuid::Uuid::new_v4().simple());
        let config = KafkaConfig::new(&broker.brokers(), &topic, 2);
        let admin: AdminClient<DefaultClientContext> = config.client().create().unwrap();
        let week = NewTopic::new(&topic, 2, TopicReplication::Fixed(1))
            .set("retention.ms", "604800000")
            .set("retention.bytes", "-1");
        for created in admin
            .create_topics([&week], &AdminOptions::new())
            .await
            .unwrap()
        {
            created.unwrap();
        }
        let refused = KafkaLog::connect(config.clone())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(&refused, LogError::TopicConfig { problems, .. }
                if problems.len() == 1 && problems[0].starts_with("retention.ms=604800000")),
            "{refused}"
        );
        assert!(!refused.is_retriable());
        assert!(
            refused.to_string().contains("--log-accept-topic-config"),
            "{refused}"
        );
        // Nothing was changed on the broker.
        assert_eq!(
            configs(&broker, &topic)
                .await
                .get("retention.ms")
                .map(String::as_str),
            Some("604800000")
        );
        KafkaLog::connect(KafkaConfig {
            accept_topic_config: true,
            ..config
        })
        .await
        .expect("accepted as it is");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_existing_topic_with_fewer_replicas_than_asked_is_refused() {
        let broker = testing::Broker::start(None);
        let topic = format!("t-{}", uuid::Uuid::new_v4().simple());
        KafkaLog::connect(KafkaConfig::new(&broker.brokers(), &topic, 2))
            .await
            .unwrap();
        let refused = KafkaLog::connect(KafkaConfig {
            replication: 3,
            min_insync_replicas: 2,
            ..KafkaConfig::new(&broker.brokers(), &topic, 2)
        })
        .await
        .err()
        .expect("refused");
        assert!(
            matches!(&refused, LogError::TopicConfig { problems, .. }
                if problems.len() == 1 && problems[0].contains("fewer than the 3")),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn min_insync_replicas_above_the_replication_factor_is_refused() {
        for (replication, min_insync) in [(1, 2), (3, 0), (0, 0)] {
            let e = KafkaLog::connect(KafkaConfig {
                replication,
                min_insync_replicas: min_insync,
                ..KafkaConfig::new("127.0.0.1:1", "t", 1)
            })
            .await
            .err()
            .expect("refused before connecting");
            assert!(e.to_string().contains("min.insync.replicas"), "{e}");
        }
    }

    #[test]
    fn urls_are_parsed() {
        assert_eq!(parse_url("kafka://a:1,b:2").unwrap(), "a:1,b:2");
        assert_eq!(parse_url("kafka://a:1/").unwrap(), "a:1");
        assert!(parse_url("redpanda://a:1").is_err());
        assert!(parse_url("kafka://").is_err());
        assert!(parse_url("kafka://host").is_err());
    }

    /// Every record lands on the partition the embedded partitioner computes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_partitioning_matches_the_embedded_partitioner() {
        let h = harness();
        let (log, _) = h.fresh(12).await;
        let records: Vec<Record> = (0..10_000)
            .map(|i| Record {
                key: format!("room-{i}-{}", i * 7919).into_bytes(),
                value: vec![1],
                ts: 0,
            })
            .collect();
        let mut placed = Vec::new();
        for chunk in records.chunks(1000) {
            placed.extend(log.append(chunk.to_vec()).await.unwrap());
        }
        assert_eq!(placed.len(), 10_000);
        for (r, a) in records.iter().zip(&placed) {
            assert_eq!(
                a.partition,
                crate::partitioner::partition_for(&r.key, 12),
                "key {}",
                String::from_utf8_lossy(&r.key)
            );
        }
    }
}
