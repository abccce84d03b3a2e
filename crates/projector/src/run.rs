//! The projector loop: one task per partition reads the log from the
//! position the store holds, decodes each record, and applies the batch with
//! its end position in one store call.
//!
//! A record that cannot be decoded goes to the dead-letter topic with the
//! reason and its original partition/offset, and the projector moves on. A
//! store error is retried with backoff, never skipped: the position only
//! moves with the data it covers. [`Applier`] does both, for the projector
//! and for a replay ([`crate::replay`]) alike.
//!
//! A projector may follow the current projection version
//! ([`Projector::following`]): when reads switch to another version, each
//! partition finishes the batch in hand, then resumes from the position the
//! new version stores, so the new version has no gap whatever its lag.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventlog::{EventLog, LogRecord, Record};
use futures::StreamExt;
use schemas::protocol::MessageView;
use schemas::ChatEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::versions::Active;
use crate::{HistoryStore, StoreError};

/// Name of the dead-letter topic.
pub const DLQ_TOPIC: &str = "chat.dlq";

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Consumer group: projectors writing one store share its partitions.
    pub group: String,
    /// The store is this projector's alone (an embedded store): it reads
    /// every partition without joining the group, so a restart resumes at
    /// once instead of waiting for the group to notice the old member died.
    pub exclusive: bool,
    /// First wait after a failed store write; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl ProjectorConfig {
    pub fn new(group: &str) -> Self {
        ProjectorConfig {
            group: group.to_owned(),
            exclusive: false,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Projects the log into a history store.
pub struct Projector {
    log: Arc<dyn EventLog>,
    /// The store to write, anew after each version switch.
    stores: watch::Receiver<Active>,
    /// Keeps `stores` open when the store is fixed.
    _fixed: Option<watch::Sender<Active>>,
    applier: Applier,
    config: ProjectorConfig,
}

/// Turns a log record into the message it holds.
pub fn to_message(record: &LogRecord) -> Result<MessageView, schemas::DecodeError> {
    let ChatEvent::MessagePosted(m) = schemas::decode(&record.value)?;
    Ok(MessageView {
        room: m.room,
        offset: record.offset as i64,
        id: m.client_id,
        user: m.user,
        body: m.body,
        ts: m.ts,
    })
}

/// The dead-letter record for a record that `consumer` (the projector, or
/// a replay) could not decode.
pub fn dead_letter(record: &LogRecord, reason: &str, consumer: &str) -> Record {
    let value = serde_json::json!({
        "reason": reason,
        "consumer": consumer,
        "partition": record.partition,
        "offset": record.offset,
        "key": String::from_utf8_lossy(&record.key),
        "value_hex": record.value.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    });
    Record {
        key: record.key.clone(),
        value: value.to_string().into_bytes(),
        ts: record.ts,
    }
}

/// A batch of the log, decoded: what to store, and up to where.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub messages: Vec<MessageView>,
    /// The partition's position once the batch is applied.
    pub next: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Records stamped before the replay's start time, left out.
    pub skipped: u64,
}

/// Decodes batches of the log and applies them to a store; what the
/// projector and a replay share. Undecodable records go to the dead-letter
/// topic (counted in `projector_dead_letters_total`, labelled with the
/// consumer) and never stop the partition.
pub(crate) struct Applier {
    pub dlq: Option<Arc<dyn EventLog>>,
    /// Who dead-letters: `projector`, or `replay`.
    pub consumer: String,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Applier {
    /// Decodes `batch`, leaving out records stamped before `not_before`;
    /// dead-letters what cannot be decoded (retrying the dead-letter topic
    /// until it takes the record).
    pub async fn decode(&self, batch: &[LogRecord], not_before: Option<i64>) -> Decoded {
        let mut decoded = Decoded {
            messages: Vec::with_capacity(batch.len()),
            next: batch.last().map_or(0, |r| r.offset + 1),
            ..Decoded::default()
        };
        for record in batch {
            if not_before.is_some_and(|t| record.ts < t) {
                decoded.skipped += 1;
                continue;
            }
            match to_message(record) {
                Ok(m) => decoded.messages.push(m),
                Err(e) => {
                    self.dead_letter(record, &e.to_string()).await;
                    decoded.dead_lettered += 1;
                }
            }
        }
        decoded
    }

    /// Applies `decoded` with its position, retrying while the store says a
    /// retry may help; a terminal error is returned.
    pub async fn store(
        &self,
        store: &dyn HistoryStore,
        partition: u32,
        decoded: &Decoded,
    ) -> Result<(), StoreError> {
        let mut backoff = self.backoff;
        loop {
            match store
                .apply(partition, decoded.messages.clone(), decoded.next)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retriable() => {
                    tracing::warn!(partition, error = %e, "store apply failed, retrying");
                    metrics::counter!("projector_store_errors_total").increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn dead_letter(&self, record: &LogRecord, reason: &str) {
        tracing::warn!(
            partition = record.partition,
            offset = record.offset,
            reason,
            consumer = self.consumer,
            "undecodable record sent to the dead-letter topic"
        );
        metrics::counter!("projector_dead_letters_total", "consumer" => self.consumer.clone())
            .increment(1);
        let Some(dlq) = &self.dlq else { return };
        let mut backoff = self.backoff;
        while let Err(e) = dlq
            .append(vec![dead_letter(record, reason, &self.consumer)])
            .await
        {
            tracing::warn!(error = %e, "dead-letter append failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

impl Projector {
    /// A projector writing `store`.
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn HistoryStore>,
        dlq: Option<Arc<dyn EventLog>>,
        config: ProjectorConfig,
    ) -> Self {
        let (fixed, stores) = watch::channel(Active {
            name: "".into(),
            store,
        });
        let mut projector = Self::following(log, stores, dlq, config);
        projector._fixed = Some(fixed);
        projector
    }

    /// A projector writing the version `stores` names, following it when it
    /// changes (see [`crate::versions::CurrentVersion::subscribe`]).
    pub fn following(
        log: Arc<dyn EventLog>,
        stores: watch::Receiver<Active>,
        dlq: Option<Arc<dyn EventLog>>,
        config: ProjectorConfig,
    ) -> Self {
        Projector {
            log,
            stores,
            _fixed: None,
            applier: Applier {
                dlq,
                consumer: "projector".into(),
                backoff: config.backoff,
                max_backoff: config.max_backoff,
            },
            config,
        }
    }

    /// Runs until `shutdown` is cancelled. Projects the partitions the
    /// consumer group gives this member; a partition taken away stops at
    /// once, and its new owner resumes from the position in its store. Every
    /// partition task is awaited before it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let tracker = TaskTracker::new();
        let mut owned: HashMap<u32, CancellationToken> = HashMap::new();
        let mut backoff = this.config.backoff;
        'membership: loop {
            let mut assignments = if this.config.exclusive {
                let all: Vec<u32> = (0..this.log.partitions()).collect();
                futures::stream::once(async move { Ok(all) })
                    .chain(futures::stream::pending())
                    .boxed()
            } else {
                this.log.assignments(&this.config.group)
            };
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'membership,
                    next = assignments.next() => next,
                };
                match next {
                    Some(Ok(partitions)) => {
                        backoff = this.config.backoff;
                        owned.retain(|p, stop| {
                            let keep = partitions.contains(p);
                            if !keep {
                                tracing::info!(partition = p, "partition revoked");
                                stop.cancel();
                            }
                            keep
                        });
                        for p in partitions {
                            owned.entry(p).or_insert_with(|| {
                                let stop = shutdown.child_token();
                                let this = this.clone();
                                let token = stop.clone();
                                tracker.spawn(async move {
                                    tokio::select! {
                                        _ = token.cancelled() => {}
                                        _ = this.project_partition(p) => {}
                                    }
                                });
                                stop
                            });
                        }
                        metrics::gauge!("projector_partitions_owned").set(owned.len() as f64);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer group membership failed");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(this.config.max_backoff);
        }
        for stop in owned.values() {
            stop.cancel();
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn project_partition(&self, partition: u32) {
        let mut stores = self.stores.clone();
        let mut backoff = self.config.backoff;
        loop {
            // (Re)start from the store's position: the store is the truth.
            let active = stores.borrow_and_update().clone();
            let store = active.store;
            let from = match store.position(partition).await {
                Ok(p) => p.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "reading projection position failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    continue;
                }
            };
            tracing::info!(
                partition,
                from,
                version = &*active.name,
                "projecting partition"
            );
            let mut stream = self.log.read(partition, from);
            let mut watching = true;
            let mut switched = false;
            loop {
                let batch = tokio::select! {
                    biased;
                    changed = stores.changed(), if watching => {
                        if changed.is_ok() {
                            switched = true;
                            break; // another version: resume from its position
                        }
                        watching = false; // fixed from now on
                        continue;
                    }
                    batch = stream.next() => batch,
                };
                let Some(batch) = batch else { break };
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::warn!(partition, error = %e, "log read failed");
                        break;
                    }
                };
                if batch.is_empty() {
                    continue;
                }
                self.apply_batch(&*store, partition, &batch).await;
                backoff = self.config.backoff;
            }
            if switched {
                continue;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// Applies one batch, retrying the store until it succeeds.
    async fn apply_batch(&self, store: &dyn HistoryStore, partition: u32, batch: &[LogRecord]) {
        let decoded = self.applier.decode(batch, None).await;
        let mut backoff = self.config.backoff;
        while let Err(e) = self.applier.store(store, partition, &decoded).await {
            // Terminal for this attempt, but the position must not move
            // past data it does not cover: wait and try again.
            tracing::error!(partition, error = %e, "store apply failed, retrying");
            metrics::counter!("projector_store_errors_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
        metrics::counter!("projector_events_total").increment(decoded.messages.len() as u64);
        metrics::gauge!("projector_position", "partition" => partition.to_string())
            .set(decoded.next as f64);
    }
}
