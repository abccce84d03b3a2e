//! Replay: rebuilds a history from the log into a store of its own (a new
//! projection version), while the current version keeps serving reads.
//!
//! [`Replay::run`] reads every partition, one task each, from the start asked
//! ([`StartAt`]) or from the position the target already holds (a stopped
//! replay resumes), up to the log's head; once there it looks at the head
//! again and stops when nothing new came: the target has caught up. Batches
//! go through the projector's own [`Applier`]: same decoding (every released
//! schema version), same dead-lettering of poison records, same atomic
//! "messages + position" writes, so a replay of the same log gives the same
//! history, and the live projector can take the version over from its
//! positions without a gap.
//!
//! Progress is published on a `watch` channel a few times a second; the
//! caller draws it (bars, lines, or a control socket).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventlog::{EventLog, LogError};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::run::Applier;
use history::{HistoryStore, StoreError};

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first record of each partition.
    Earliest,
    /// The first record stamped at or after this time (milliseconds since
    /// the Unix epoch); older records are left out.
    Time(i64),
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub start: StartAt,
    /// First wait after a failure; each next one doubles (jittered) up to
    /// `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How often progress is published.
    pub progress_every: Duration,
}

impl ReplayConfig {
    pub fn new(start: StartAt) -> Self {
        ReplayConfig {
            start,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            progress_every: Duration::from_millis(100),
        }
    }
}

/// How far one partition is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    /// Offset the replay of this partition started at (after a resume: the
    /// target's position then).
    pub start: u64,
    /// Next offset to apply.
    pub position: u64,
    /// The head to reach, as last read; it moves while the log grows.
    pub head: u64,
    pub done: bool,
}

/// A snapshot of a running replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub partitions: Vec<PartitionProgress>,
    /// Messages applied.
    pub events: u64,
    pub dead_lettered: u64,
    /// Records older than the start time, left out.
    pub skipped: u64,
    pub elapsed_ms: u64,
}

impl Progress {
    /// Records read so far, and records to read in all (as of the heads).
    pub fn totals(&self) -> (u64, u64) {
        self.partitions.iter().fold((0, 0), |(done, all), p| {
            (done + (p.position - p.start), all + (p.head - p.start))
        })
    }
}

/// What a finished replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Events applied: messages and read positions.
    pub events: u64,
    /// Rooms the messages applied belong to.
    pub rooms: u64,
    pub dead_lettered: u64,
    /// Records older than the start time, left out.
    pub skipped: u64,
    /// Records read.
    pub records: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the log: {0}")]
    Log(#[from] LogError),
    #[error("writing the new version: {0}")]
    Store(#[from] StoreError),
    #[error("the log stopped yielding partition {0} before its head")]
    LogEnded(u32),
    #[error("replay stopped before it finished")]
    Cancelled,
}

impl ReplayError {
    pub fn is_retriable(&self) -> bool {
        match self {
            ReplayError::Log(e) => e.is_retriable(),
            ReplayError::Store(e) => e.is_retriable(),
            ReplayError::LogEnded(_) | ReplayError::Cancelled => true,
        }
    }
}

/// Rebuilds a history from the log into `target`.
pub struct Replay {
    log: Arc<dyn EventLog>,
    target: Arc<dyn HistoryStore>,
    applier: Applier,
    config: ReplayConfig,
}

/// Counters the partition tasks move and the publisher reads.
#[derive(Default)]
struct Counters {
    start: AtomicU64,
    position: AtomicU64,
    head: AtomicU64,
    done: AtomicBool,
}

struct Shared {
    partitions: Vec<Counters>,
    events: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    began: Instant,
}

impl Shared {
    fn snapshot(&self) -> Progress {
        Progress {
            partitions: self
                .partitions
                .iter()
                .enumerate()
                .map(|(p, c)| PartitionProgress {
                    partition: p as u32,
                    start: c.start.load(Ordering::Relaxed),
                    position: c.position.load(Ordering::Relaxed),
                    head: c.head.load(Ordering::Relaxed),
                    done: c.done.load(Ordering::Relaxed),
                })
                .collect(),
            events: self.events.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            elapsed_ms: self.began.elapsed().as_millis() as u64,
        }
    }
}

impl Replay {
    /// A replay of `log` into `target`; undecodable records go to `dlq`.
    pub fn new(
        log: Arc<dyn EventLog>,
        target: Arc<dyn HistoryStore>,
        dlq: Option<Arc<dyn EventLog>>,
        config: ReplayConfig,
    ) -> Self {
        Replay {
            log,
            target,
            applier: Applier {
                decoder: schemas::Decoder::new(),
                dlq,
                consumer: "replay".into(),
                backoff: config.backoff,
                max_backoff: config.max_backoff,
            },
            config,
        }
    }

    /// Replays every partition up to the head, publishing progress on
    /// `progress`. Stops early with [`ReplayError::Cancelled`] when
    /// `shutdown` is cancelled, or with the first partition's error; either
    /// way every partition task has ended when it returns, and what was
    /// applied stays (a later replay into the same target resumes).
    pub async fn run(
        self,
        progress: &watch::Sender<Progress>,
        shutdown: CancellationToken,
    ) -> Result<Summary, ReplayError> {
        let partitions = self.log.partitions();
        let shared = Arc::new(Shared {
            partitions: (0..partitions).map(|_| Counters::default()).collect(),
            events: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            began: Instant::now(),
        });
        let this = Arc::new(self);
        let stop = shutdown.child_token();
        let mut tasks = JoinSet::new();
        for p in 0..partitions {
            let (this, shared, stop) = (this.clone(), shared.clone(), stop.clone());
            tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => Err(ReplayError::Cancelled),
                    rooms = this.replay_partition(p, &shared) => rooms,
                }
            });
        }
        let mut tick = tokio::time::interval(this.config.progress_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rooms = 0u64;
        let mut failed: Option<ReplayError> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    progress.send_replace(shared.snapshot());
                }
                joined = tasks.join_next() => {
                    let outcome = match joined {
                        None => break,
                        Some(Ok(outcome)) => outcome,
                        Some(Err(e)) => Err(ReplayError::Store(StoreError::Storage(
                            format!("replay task failed: {e}"),
                        ))),
                    };
                    match outcome {
                        Ok(n) => rooms += n,
                        Err(e) => {
                            // The first error stops the others; keep it.
                            stop.cancel();
                            if failed.is_none() || matches!(failed, Some(ReplayError::Cancelled)) {
                                failed = Some(e);
                            }
                        }
                    }
                }
            }
        }
        let last = shared.snapshot();
        progress.send_replace(last.clone());
        if let Some(e) = failed {
            return Err(e);
        }
        let (records, _) = last.totals();
        let summary = Summary {
            events: last.events,
            rooms,
            dead_lettered: last.dead_lettered,
            skipped: last.skipped,
            records,
            seconds: shared.began.elapsed().as_secs_f64(),
        };
        metrics::counter!(crate::metrics::REPLAY_EVENTS_TOTAL).increment(summary.events);
        tracing::info!(
            events = summary.events,
            rooms = summary.rooms,
            dead_lettered = summary.dead_lettered,
            seconds = summary.seconds,
            "replay finished"
        );
        Ok(summary)
    }

    /// Replays one partition up to its head; returns how many rooms it saw.
    async fn replay_partition(&self, partition: u32, shared: &Shared) -> Result<u64, ReplayError> {
        let counters = &shared.partitions[partition as usize];
        let (start, not_before) = match self.config.start {
            StartAt::Earliest => (0, None),
            StartAt::Time(t) => (self.log.offset_for_time(partition, t).await?, Some(t)),
        };
        let resumed = self.target.position(partition).await?;
        let mut position = start.max(resumed.unwrap_or(0));
        let mut head = self.log.end_offset(partition).await?;
        if resumed.is_none_or(|r| r < start) {
            // What the seek by time passed over is older than asked too.
            shared.skipped.fetch_add(start, Ordering::Relaxed);
        }
        counters.start.store(position, Ordering::Relaxed);
        counters.position.store(position, Ordering::Relaxed);
        counters.head.store(head.max(position), Ordering::Relaxed);
        let mut rooms = HashSet::new();
        let mut stream = None;
        loop {
            if position >= head {
                // Caught up with the head seen; stop unless it moved since.
                head = self.log.end_offset(partition).await?;
                counters.head.store(head.max(position), Ordering::Relaxed);
                if position >= head {
                    break;
                }
            }
            let reader = stream.get_or_insert_with(|| self.log.read(partition, position));
            let batch = reader
                .next()
                .await
                .ok_or(ReplayError::LogEnded(partition))??;
            // A backend may hand back records before the asked offset.
            let batch: Vec<_> = batch.into_iter().filter(|r| r.offset >= position).collect();
            if batch.is_empty() {
                continue;
            }
            let decoded = self.applier.decode(&batch, not_before).await;
            rooms.extend(decoded.batch.messages.iter().map(|m| m.room.clone()));
            self.applier
                .store(&*self.target, partition, &decoded)
                .await?;
            position = decoded.next;
            shared.events.fetch_add(decoded.events, Ordering::Relaxed);
            shared
                .dead_lettered
                .fetch_add(decoded.dead_lettered, Ordering::Relaxed);
            shared.skipped.fetch_add(decoded.skipped, Ordering::Relaxed);
            counters.position.store(position, Ordering::Relaxed);
        }
        // Record where the partition stands even when nothing was applied
        // (every record older than the start time): the live projector
        // takes the version over from there, not from offset 0.
        if position > 0 && resumed.is_none_or(|r| r < position) {
            self.target.apply(partition, Vec::new(), position).await?;
        }
        counters.done.store(true, Ordering::Relaxed);
        Ok(rooms.len() as u64)
    }
}
