//! The raw Kafka producer baseline (`chat-load compare --baseline
//! kafka-producer --log kafka://HOST:PORT`): the log's producer with
//! nothing of ours around it.
//!
//! The Kafka-mode target is "`ingest-max` against `chat serve --log
//! kafka://...` reaches at least 80% of the msgs/s a raw rdkafka producer
//! gets from the same broker". [`produce`] measures the second figure, on
//! the scenario the chat run gets, and returns a [`Report`] labelled
//! [`LABEL`], so [`crate::compare`] divides by it as by `bare`.
//!
//! - One `FutureProducer` with the settings of the log's Kafka backend
//!   (`crates/eventlog/src/kafka/mod.rs`: idempotent, `acks=all`,
//!   `murmur2_random`, `linger.ms=2`, the same batch and queue bounds, no
//!   message timeout), producing to a topic of its own ([`DEFAULT_TOPIC`]),
//!   created when missing with the chat run's partition count; an existing
//!   topic with another count is refused.
//! - Before the first step, one record per partition is sent and awaited,
//!   so connecting and getting the idempotent producer id are not measured.
//! - A record is what chat appends minus chat: key = the sender's room name
//!   (as chat keys by room), payload = `body` bytes whose first 16 are the
//!   message id ([`MsgId::to_bytes`]). No WebSocket, no JSON, no Avro.
//! - Open loop, as [`crate::fleet`]: sender `k` of `S` is meant to send its
//!   `n`th message at `start + (k + n * S) / rate`; one task runs every
//!   sender's schedule in order of intended time, sending what is due at
//!   once when late. Latency counts from the intended time to the delivery
//!   report, into the same [`Recorder`] windows, so a stalled broker shows
//!   as latency, not as a slower sender.
//! - In flight is bounded ([`MAX_INFLIGHT`]): when full, the schedule waits
//!   (its latency still counts from the intended time); a full producer
//!   queue is waited out the same way. Nothing is kept per message but the
//!   delivery future.
//! - After a phase's schedule it waits, up to the drain, for every delivery
//!   report, then reads the phase's records back from the topic and checks
//!   what the fleet checks of deliveries: every acked message is in the log
//!   once, in order per sender, with its key and size; nothing unacked is.
//!   Nothing is delivered live, so delivered/s and end-to-end latency stay
//!   empty and `compare` computes no ratio of them.
//! - `ingest-max` steps with [`crate::run::ingest_max`]: the same steps and
//!   the same pass rule as the WebSocket run. Other presets run one phase
//!   at their rate.
//! - Bounded: the scenario's deadline cancels whatever runs, admin and
//!   metadata requests have their own deadline, and dropping the producer
//!   purges what is still queued.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Check, PhaseReport, Traffic};
use crate::ids::MsgId;
use crate::report::{tool, Report, Summary};
use crate::run::{fill, headline, ingest_max, run_id, traffic, Phases};
use crate::scenario::{Preset, Scenario};
use crate::stats::{Counted, Percentiles, Recorder};
use crate::sys::{Machine, NofileLimit};

/// What the report and the ratios call this baseline.
pub const LABEL: &str = "kafka-producer";

/// What they call it with fetchers ([`FETCHERS`]).
pub const FETCH_LABEL: &str = "kafka-fetch";

/// Raw consumers of `--baseline kafka-fetch`, each fetching every partition
/// from its end for the whole run: as many as a gateway with fan-out and a
/// projector keeps fetching, its one shared `live` reader (the `back`
/// reader fetches only for catch-ups and reads that fall behind).
pub const FETCHERS: usize = 1;

/// The baseline's topic, apart from chat's `chat.messages`.
pub const DEFAULT_TOPIC: &str = "bench.producer";

/// Most records sent and not yet reported delivered.
pub const MAX_INFLIGHT: usize = 100_000;

/// Deadline of admin and metadata requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most records sent in one go before looking at the clock again.
const MAX_BURST: usize = 256;

/// Where to produce, and what the report says about the run.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    pub topic: String,
    /// Partitions of the topic (those of the chat run).
    pub partitions: u32,
    /// Raw consumers tailing every partition of the topic meanwhile.
    pub fetchers: usize,
    /// The command line, for the report.
    pub command: String,
    pub nofile_limit: Option<NofileLimit>,
}

impl ProducerOptions {
    /// What the report calls this run.
    pub fn label(&self) -> &'static str {
        if self.fetchers == 0 {
            LABEL
        } else {
            FETCH_LABEL
        }
    }
}

/// Consumers that tail every partition of `topic` from its end, as a
/// gateway's readers do, until dropped: records fetched are counted and
/// thrown away. The fetch settings are the log's readers'
/// ([`eventlog::kafka::KafkaConfig::consumer`]).
struct Fetchers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Fetchers {
    fn start(o: &ProducerOptions) -> anyhow::Result<Fetchers> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..o.fetchers {
            let consumer = consumer(&o.brokers)?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..o.partitions {
                tpl.add_partition_offset(&o.topic, p as i32, Offset::End)
                    .context("listing the partitions to fetch")?;
            }
            consumer
                .assign(&tpl)
                .context("assigning the partitions to fetch")?;
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fetcher-{i}"))
                .spawn(move || {
                    let mut fetched = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                            fetched += 1;
                        }
                    }
                    fetched
                })
                .context("starting a fetcher thread")?;
            threads.push(thread);
        }
        Ok(Fetchers { stop, threads })
    }

    /// Stops the fetchers; returns the records each fetched.
    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().unwrap_or(0))
            .collect()
    }
}

impl Drop for Fetchers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The brokers of `--log kafka://HOST:PORT[,HOST:PORT...]`.
pub fn brokers(log: &str) -> anyhow::Result<String> {
    let Some(rest) = log.strip_prefix("kafka://") else {
        bail!(
            "--baseline {LABEL} produces to the brokers of --log kafka://HOST:PORT, \
             but --log is {log:?}"
        );
    };
    let brokers = rest.trim_end_matches('/');
    if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
        bail!("expected --log kafka://HOST:PORT[,HOST:PORT...], got {log:?}");
    }
    Ok(brokers.to_owned())
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.keepalive.enable", "true")
        .set("log_level", "4");
    c
}

/// The producer of the log's Kafka backend, setting for setting: its own
/// configuration, so the two cannot drift apart.
fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    eventlog::kafka::KafkaConfig::new(brokers, DEFAULT_TOPIC, 0)
        .producer()
        .create()
        .context("creating the kafka producer")
}

/// A consumer with the log's readers' settings, setting for setting (the
/// same configuration, as for the producer).
fn consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    eventlog::kafka::KafkaConfig::new(brokers, DEFAULT_TOPIC, 0)
        .consumer("chat-load-read-back")
        .create()
        .context("creating the kafka consumer")
}

/// Creates the topic when missing and checks its partition count.
async fn ensure_topic(o: &ProducerOptions) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(&o.brokers)
        .create()
        .context("creating the kafka admin client")?;
    let topic = NewTopic::new(&o.topic, o.partitions as i32, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let created = tokio::time::timeout(2 * REQUEST_TIMEOUT, admin.create_topics([&topic], &opts))
        .await
        .with_context(|| format!("creating topic {} timed out ({})", o.topic, o.brokers))?
        .with_context(|| format!("creating topic {} ({})", o.topic, o.brokers))?;
    for result in created {
        match result {
            Ok(name) => tracing::info!(topic = name, partitions = o.partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    let meta = consumer(&o.brokers)?;
    let name = o.topic.clone();
    let found = tokio::task::spawn_blocking(move || partition_count(&meta, &name)).await??;
    if found != o.partitions {
        bail!(
            "topic {} has {found} partitions, not the {} of --partitions: \
             pick another with --producer-topic",
            o.topic,
            o.partitions
        );
    }
    Ok(())
}

/// The partition count of `topic`, waiting for a just-created topic to show.
fn partition_count(meta: &BaseConsumer, topic: &str) -> anyhow::Result<u32> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let md = meta
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .with_context(|| format!("reading the metadata of topic {topic}"))?;
        let count = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as u32);
        if count > 0 {
            return Ok(count);
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has no partitions");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `scenario` with a raw producer to `options.topic` and reports it
/// like a WebSocket run.
pub async fn produce(scenario: &Scenario, options: &ProducerOptions) -> anyhow::Result<Report> {
    scenario.validate()?;
    if scenario.body < MsgId::BYTES {
        bail!(
            "--baseline {LABEL} needs a body of at least {} bytes (each record carries its id)",
            MsgId::BYTES
        );
    }
    if options.partitions == 0 {
        bail!("--partitions must be at least 1");
    }
    let deadline = tokio::time::Instant::now() + scenario.deadline();
    tokio::time::timeout_at(deadline, ensure_topic(options))
        .await
        .context("creating the topic took longer than the deadline")??;
    let run = run_id();
    let recorder = Arc::new(Recorder::new(
        run,
        (scenario.deadline_s / scenario.interval_s) as usize + 1,
    ));
    let senders = scenario.senders;
    let cancel = CancellationToken::new();
    let mut producer = Producer {
        producer: producer(&options.brokers)?,
        brokers: options.brokers.clone(),
        topic: options.topic.clone(),
        partitions: options.partitions as usize,
        rooms: (0..scenario.rooms)
            .map(|r| crate::fleet::room_name(run, r))
            .collect::<Vec<_>>()
            .into(),
        senders,
        recorder: recorder.clone(),
        inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        cancel: cancel.clone(),
        phase: 0,
    };
    tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + 3 * REQUEST_TIMEOUT),
        producer.warm_up(),
    )
    .await
    .context("the brokers did not acknowledge the warm-up records in time")??;
    let fetchers = Fetchers::start(options)?;
    tracing::info!(brokers = %options.brokers, topic = %options.topic, run, fetchers = options.fetchers, "producer baseline ready");

    let stop = CancellationToken::new();
    let aborted = CancellationToken::new();
    let watchdog = {
        let (stop, aborted, cancel) = (stop.clone(), aborted.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("deadline passed; stopping the run");
                    aborted.cancel();
                    cancel.cancel();
                }
            }
        })
    };
    let ticker = {
        let (stop, recorder) = (stop.clone(), recorder.clone());
        let interval = Duration::from_secs_f64(scenario.interval_s);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => { recorder.tick(None); }
                }
            }
            recorder.tick(None);
        })
    };

    let mut summary = Summary::default();
    let mut phases = Vec::new();
    if scenario.preset == Preset::IngestMax {
        let (best, failed) = ingest_max(&mut producer, scenario, &mut phases, &aborted).await;
        headline(&mut summary, &phases, best, failed);
    } else {
        let p = producer.traffic(&traffic(scenario, scenario.rate)).await;
        fill(&mut summary, &p);
        phases.push(p);
    }
    stop.cancel();
    let _ticker_ended = ticker.await;
    let _watchdog_ended = watchdog.await;
    // Dropping purges what is queued and flushes for at most 500 ms; off
    // the runtime, since it blocks.
    let Producer { producer, .. } = producer;
    let _dropped = tokio::task::spawn_blocking(move || drop(producer)).await;
    if let Ok(fetched) = tokio::task::spawn_blocking(move || fetchers.stop()).await {
        if !fetched.is_empty() {
            tracing::info!(?fetched, "records the fetchers read");
        }
    }

    let aborted = aborted.is_cancelled();
    let ok = !aborted
        && !phases.is_empty()
        && match scenario.preset {
            Preset::IngestMax => {
                summary.max_sustained_rate.is_some() && phases.iter().all(|p| p.check.correct())
            }
            _ => phases.iter().all(|p| p.check.ok),
        };
    Ok(Report {
        tool: tool(),
        date: crate::sys::utc_now(),
        machine: Machine::detect(),
        label: options.label().to_owned(),
        target: format!("kafka://{}/{}", options.brokers, options.topic),
        command: options.command.clone(),
        scenario: scenario.clone(),
        nofile_limit: options.nofile_limit,
        // Senders are schedules of one producer here, not sockets.
        connected: senders,
        connect_failures: Default::default(),
        disconnects: Default::default(),
        summary,
        phases,
        series: recorder.series(),
        aborted,
        ok,
    })
}

/// The producer and what its phases share.
struct Producer {
    producer: FutureProducer,
    brokers: String,
    topic: String,
    partitions: usize,
    rooms: Arc<[String]>,
    senders: usize,
    recorder: Arc<Recorder>,
    inflight: Arc<Semaphore>,
    /// Cancelled when the run's deadline passes.
    cancel: CancellationToken,
    /// Of the last phase; steps count from 1, the warm-up is 0.
    phase: u8,
}

/// What a phase counted, shared by its schedule and its collector.
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    /// Per sender, messages acked.
    acked_by: Vec<AtomicU64>,
    /// Per partition, messages acked.
    partition_acked: Vec<AtomicU64>,
    /// Per partition, the lowest offset acked (`i64::MAX`: none).
    partition_first: Vec<AtomicI64>,
}

impl Counts {
    fn new(senders: usize, partitions: usize) -> Counts {
        Counts {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            acked_by: (0..senders).map(|_| AtomicU64::new(0)).collect(),
            partition_acked: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            partition_first: (0..partitions).map(|_| AtomicI64::new(i64::MAX)).collect(),
        }
    }

    fn reject(&self, recorder: &Recorder, code: &str, id: &MsgId) {
        if recorder.error(code, Some(id)) == Counted::Yes {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn error_code(e: &KafkaError) -> String {
    e.rdkafka_error_code()
        .map_or_else(|| "kafka_error".to_owned(), |c| format!("kafka_{c:?}"))
}

/// One sent record waiting for its delivery report.
type Pending = (MsgId, DeliveryFuture, OwnedSemaphorePermit);

/// A phase's send schedule.
struct Plan {
    phase: u8,
    base: Instant,
    end: Instant,
    rate: f64,
    body: usize,
}

impl Phases for Producer {
    async fn traffic(&mut self, traffic: &Traffic) -> PhaseReport {
        self.phase = self.phase.wrapping_add(1).max(1);
        let phase = self.phase;
        let counts = Arc::new(Counts::new(self.senders, self.partitions));
        let total = traffic.warmup_s + traffic.duration_s;
        // A little ahead, so the first records are not late.
        let base = Instant::now() + Duration::from_millis(100);
        let window_start = base + Duration::from_secs_f64(traffic.warmup_s);
        let end = base + Duration::from_secs_f64(total);
        let drain_until =
            tokio::time::Instant::from(end) + Duration::from_secs_f64(traffic.drain_s);
        self.recorder
            .begin_phase(phase, window_start, end, traffic.rate);

        let (tx, rx) = mpsc::channel::<Pending>(4096);
        let collecting = self.cancel.child_token();
        let collector = tokio::spawn(collect(
            rx,
            counts.clone(),
            self.recorder.clone(),
            collecting.clone(),
        ));
        let sending = self.cancel.child_token();
        let sender = (traffic.rate > 0.0 && self.senders > 0).then(|| {
            let plan = Plan {
                phase,
                base,
                end,
                rate: traffic.rate,
                body: traffic.body,
            };
            tokio::spawn(self.schedule(plan, tx, counts.clone(), sending.clone()))
        });

        // Measure CPU over the window only.
        self.sleep_until(window_start).await;
        let cpu0 = crate::sys::cpu_seconds(None).unwrap_or(0.0);
        self.sleep_until(end).await;
        let cpu1 = crate::sys::cpu_seconds(None).unwrap_or(0.0);
        let window = traffic.duration_s.max(1e-6);
        // A schedule held back by the in-flight bound may still be sending
        // what was due; it gets the drain, then stops.
        if let Some(mut sender) = sender {
            if tokio::time::timeout_at(drain_until, &mut sender)
                .await
                .is_err()
            {
                tracing::warn!(
                    phase,
                    "the schedule did not finish in the drain; stopping it"
                );
                sending.cancel();
                let _stopped = sender.await;
            }
        }
        self.recorder.schedule_done();
        let mut collector = collector;
        if tokio::time::timeout_at(drain_until, &mut collector)
            .await
            .is_err()
        {
            tracing::warn!(phase, "delivery reports did not all come in the drain");
            collecting.cancel();
            let _stopped = collector.await;
        }
        let totals = self.recorder.end_phase();
        let mut errors = totals.errors.clone();
        let check = self.check(phase, &counts, traffic, &mut errors).await;
        PhaseReport {
            phase,
            traffic: Some(traffic.clone()),
            connections: self.senders,
            rooms: self.rooms.len(),
            senders: self.senders,
            acked_per_s: totals.acks_in_window as f64 / window,
            delivered_per_s: 0.0,
            ack_latency: Percentiles::of(&totals.ack),
            e2e_latency: Percentiles::default(),
            errors,
            stale_frames: totals.stale,
            check,
            server_cpu: None,
            client_cpu: (cpu1 - cpu0) / window,
            server_rss_bytes: None,
        }
    }

    fn broken(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Producer {
    /// Sends one record to each partition and waits for them all, so the
    /// first step does not pay for connecting, metadata and the idempotent
    /// producer id. The records carry phase 0, which no step has.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let id = MsgId {
            run: self.recorder.run(),
            phase: 0,
            conn: 0,
            seq: 0,
            intended_us: 0,
        };
        let mut payload = vec![b'x'; MsgId::BYTES];
        payload.copy_from_slice(&id.to_bytes());
        let mut deliveries = Vec::with_capacity(self.partitions);
        for p in 0..self.partitions {
            let record = FutureRecord::to(&self.topic)
                .partition(p as i32)
                .key(&self.rooms[0])
                .payload(&payload);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .context("sending a warm-up record")?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e).context("a warm-up record failed"),
                Err(_canceled) => bail!("the producer closed during the warm-up"),
            }
        }
        Ok(())
    }

    async fn sleep_until(&self, t: Instant) {
        tokio::select! {
            _ = tokio::time::sleep_until(t.into()) => {}
            _ = self.cancel.cancelled() => {}
        }
    }

    /// The phase's schedule, every sender's in order of intended time:
    /// message `j` is sender `j % S`'s `j / S`th, meant for `base + j / rate`.
    fn schedule(
        &self,
        plan: Plan,
        tx: mpsc::Sender<Pending>,
        counts: Arc<Counts>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let rooms = self.rooms.clone();
        let senders = self.senders as u64;
        let recorder = self.recorder.clone();
        let inflight = self.inflight.clone();
        async move {
            let run = recorder.run();
            let intended = |j: u64| plan.base + Duration::from_secs_f64(j as f64 / plan.rate);
            let mut payload = vec![b'x'; plan.body];
            let mut j: u64 = 0;
            let send = async {
                loop {
                    let next = intended(j);
                    if next >= plan.end {
                        return;
                    }
                    if next > Instant::now() {
                        tokio::time::sleep_until(next.into()).await;
                    }
                    // Everything due now goes out before the clock is read again.
                    let now = Instant::now();
                    for _ in 0..MAX_BURST {
                        let at = intended(j);
                        if at > now || at >= plan.end {
                            break;
                        }
                        let k = (j % senders) as usize;
                        let id = MsgId {
                            run,
                            phase: plan.phase,
                            conn: k as u32,
                            seq: (j / senders) as u32,
                            intended_us: recorder.at_us(at),
                        };
                        payload[..MsgId::BYTES].copy_from_slice(&id.to_bytes());
                        let Ok(permit) = inflight.clone().acquire_owned().await else {
                            return;
                        };
                        let mut record = FutureRecord::to(&topic)
                            .key(rooms[k % rooms.len()].as_bytes())
                            .payload(&payload[..]);
                        counts.sent.fetch_add(1, Ordering::Relaxed);
                        recorder.sent();
                        let delivery = loop {
                            match producer.send_result(record) {
                                Ok(delivery) => break Some(delivery),
                                Err((
                                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                    r,
                                )) => {
                                    // Full producer queue: wait for room.
                                    record = r;
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                                Err((e, _)) => {
                                    counts.reject(&recorder, &error_code(&e), &id);
                                    break None;
                                }
                            }
                        };
                        if let Some(delivery) = delivery {
                            if tx.send((id, delivery, permit)).await.is_err() {
                                return;
                            }
                        }
                        j += 1;
                    }
                }
            };
            tokio::select! {
                _ = send => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// The phase's check: what the delivery reports said, then what reading
    /// the records back from the topic found.
    async fn check(
        &self,
        phase: u8,
        counts: &Arc<Counts>,
        traffic: &Traffic,
        errors: &mut std::collections::BTreeMap<String, u64>,
    ) -> Check {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut c = Check {
            sent: load(&counts.sent),
            acked: load(&counts.acked),
            rejected: load(&counts.rejected),
            ..Check::default()
        };
        c.unacked = c.sent.saturating_sub(c.acked + c.rejected);
        // The log is the one member: each acked record is read back once.
        c.expected_deliveries = c.acked;
        let read = ReadBack {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            run: self.recorder.run(),
            phase,
            rooms: self.rooms.clone(),
            body: traffic.body,
            counts: counts.clone(),
            deadline: Instant::now() + Duration::from_secs_f64(traffic.drain_s),
            cancel: self.cancel.clone(),
        };
        let found = match tokio::task::spawn_blocking(move || read.run()).await {
            Ok(found) => found,
            Err(e) => Err(e.into()),
        };
        match found {
            Ok(found) => {
                for (k, &got) in found.by_sender.iter().enumerate() {
                    let acked = load(&counts.acked_by[k]);
                    c.delivered += got.min(acked);
                    c.missing += acked.saturating_sub(got);
                    c.unexpected += got.saturating_sub(acked);
                }
                c.unexpected += found.foreign;
                c.misordered = found.misordered;
            }
            Err(e) => {
                tracing::warn!(phase, error = %e, "reading the records back failed");
                *errors.entry("read_back_failed".to_owned()).or_default() += 1;
                c.missing = c.acked;
            }
        }
        c.ok = c.correct()
            && c.unacked == 0
            && c.missing_closed == 0
            && c.rejected == 0
            && c.disconnected == 0;
        c
    }
}

/// Records delivery reports as they come, until the schedule has ended and
/// every record sent is reported, or `stop`.
async fn collect(
    mut rx: mpsc::Receiver<Pending>,
    counts: Arc<Counts>,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
) {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        if !open && pending.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some((id, report, _permit)) = pending.next(), if !pending.is_empty() => {
                let now_us = recorder.now_us();
                match report {
                    Ok(Ok(Delivery { partition, offset, .. })) => {
                        if recorder.ack(&id, now_us) == Counted::Yes {
                            counts.acked.fetch_add(1, Ordering::Relaxed);
                            if let Some(n) = counts.acked_by.get(id.conn as usize) {
                                n.fetch_add(1, Ordering::Relaxed);
                            }
                            let p = usize::try_from(partition).unwrap_or(usize::MAX);
                            if let (Some(n), Some(first)) =
                                (counts.partition_acked.get(p), counts.partition_first.get(p))
                            {
                                n.fetch_add(1, Ordering::Relaxed);
                                first.fetch_min(offset, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(Err((e, _))) => counts.reject(&recorder, &error_code(&e), &id),
                    Err(_canceled) => counts.reject(&recorder, "producer_closed", &id),
                }
            }
            item = rx.recv(), if open => match item {
                Some((id, delivery, permit)) => pending.push(delivery.map(move |r| (id, r, permit))),
                None => open = false,
            },
        }
    }
}

/// Reads a phase's records back from the partitions it was acked on.
struct ReadBack {
    brokers: String,
    topic: String,
    run: u16,
    phase: u8,
    rooms: Arc<[String]>,
    body: usize,
    counts: Arc<Counts>,
    deadline: Instant,
    cancel: CancellationToken,
}

/// What reading back found.
struct Found {
    /// Per sender, records of this phase found in order.
    by_sender: Vec<u64>,
    /// Records of this phase with a wrong key, size or sender.
    foreign: u64,
    /// Records of a sender found again or before an earlier one.
    misordered: u64,
}

impl ReadBack {
    /// Reads from the lowest acked offset of each partition until every
    /// acked record of the partition is found, or the deadline.
    fn run(self) -> anyhow::Result<Found> {
        let senders = self.counts.acked_by.len();
        let mut found = Found {
            by_sender: vec![0; senders],
            foreign: 0,
            misordered: 0,
        };
        let wanted: Vec<u64> = self
            .counts
            .partition_acked
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for (p, first) in self.counts.partition_first.iter().enumerate() {
            let first = first.load(Ordering::Relaxed);
            if wanted[p] > 0 && first != i64::MAX {
                tpl.add_partition_offset(&self.topic, p as i32, Offset::Offset(first))?;
            }
        }
        if tpl.count() == 0 {
            return Ok(found);
        }
        let consumer = consumer(&self.brokers)?;
        consumer.assign(&tpl).context("assigning the partitions")?;
        let mut seen = vec![0u64; wanted.len()];
        let mut last_seq: Vec<Option<u32>> = vec![None; senders];
        while seen.iter().zip(&wanted).any(|(s, w)| s < w)
            && Instant::now() < self.deadline
            && !self.cancel.is_cancelled()
        {
            let m = match consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "read-back error (retried by librdkafka)");
                    continue;
                }
                Some(Ok(m)) => m,
            };
            let payload = m.payload().unwrap_or_default();
            let Some(id) = MsgId::from_bytes(payload) else {
                continue;
            };
            if id.run != self.run || id.phase != self.phase {
                continue;
            }
            if let Some(s) = usize::try_from(m.partition())
                .ok()
                .and_then(|p| seen.get_mut(p))
            {
                *s += 1;
            }
            let k = id.conn as usize;
            let room = self.rooms[k % self.rooms.len()].as_bytes();
            if k >= senders || m.key() != Some(room) || payload.len() != self.body {
                found.foreign += 1;
                continue;
            }
            match last_seq[k] {
                Some(last) if id.seq <= last => found.misordered += 1,
                _ => {
                    last_seq[k] = Some(id.seq);
                    found.by_sender[k] += 1;
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_come_from_a_kafka_log_url() {
        assert_eq!(brokers("kafka://a:1,b:2/").unwrap(), "a:1,b:2");
        let e = brokers("embedded").unwrap_err().to_string();
        assert!(e.contains("--log kafka://HOST:PORT"), "{e}");
        assert!(brokers("kafka://").is_err());
        assert!(brokers("kafka://host").is_err());
    }
}
