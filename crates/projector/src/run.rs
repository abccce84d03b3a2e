//! The projector loop: one task per partition reads the log from the
//! position the store holds, decodes each record, and applies the batch with
//! its end position in one store call.
//!
//! A record that cannot be decoded goes to the dead-letter topic with the
//! reason and its original partition/offset, and the projector moves on. A
//! store error is retried with backoff, never skipped: the position only
//! moves with the data it covers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventlog::{EventLog, LogRecord, Record};
use futures::StreamExt;
use schemas::protocol::MessageView;
use schemas::ChatEvent;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::HistoryStore;

/// Name of the dead-letter topic.
pub const DLQ_TOPIC: &str = "chat.dlq";

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Consumer group: projectors writing one store share its partitions.
    pub group: String,
    /// First wait after a failed store write; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl ProjectorConfig {
    pub fn new(group: &str) -> Self {
        ProjectorConfig {
            group: group.to_owned(),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Projects the log into a history store.
pub struct Projector {
    log: Arc<dyn EventLog>,
    store: Arc<dyn HistoryStore>,
    dlq: Option<Arc<dyn EventLog>>,
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

/// The dead-letter record for a record that could not be decoded.
pub fn dead_letter(record: &LogRecord, reason: &str) -> Record {
    let value = serde_json::json!({
        "reason": reason,
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

impl Projector {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn HistoryStore>,
        dlq: Option<Arc<dyn EventLog>>,
        config: ProjectorConfig,
    ) -> Self {
        Projector {
            log,
            store,
            dlq,
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
            let mut assignments = this.log.assignments(&this.config.group);
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
        let mut backoff = self.config.backoff;
        loop {
            // (Re)start from the store's position: the store is the truth.
            let from = match self.store.position(partition).await {
                Ok(p) => p.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "reading projection position failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    continue;
                }
            };
            tracing::info!(partition, from, "projecting partition");
            let mut stream = self.log.read(partition, from);
            while let Some(batch) = stream.next().await {
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
                self.apply_batch(partition, &batch).await;
                backoff = self.config.backoff;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// Applies one batch, retrying the store until it succeeds.
    async fn apply_batch(&self, partition: u32, batch: &[LogRecord]) {
        let next = batch.last().map_or(0, |r| r.offset + 1);
        let mut messages = Vec::with_capacity(batch.len());
        for record in batch {
            match to_message(record) {
                Ok(m) => messages.push(m),
                Err(e) => self.dead_letter(record, &e.to_string()).await,
            }
        }
        let count = messages.len() as u64;
        let mut backoff = self.config.backoff;
        loop {
            match self.store.apply(partition, messages.clone(), next).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "store apply failed, retrying");
                    metrics::counter!("projector_store_errors_total").increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
        metrics::counter!("projector_events_total").increment(count);
        metrics::gauge!("projector_position", "partition" => partition.to_string())
            .set(next as f64);
    }

    async fn dead_letter(&self, record: &LogRecord, reason: &str) {
        tracing::warn!(
            partition = record.partition,
            offset = record.offset,
            reason,
            "undecodable record sent to the dead-letter topic"
        );
        metrics::counter!("projector_dead_letters_total").increment(1);
        let Some(dlq) = &self.dlq else { return };
        let mut backoff = self.config.backoff;
        while let Err(e) = dlq.append(vec![dead_letter(record, reason)]).await {
            tracing::warn!(error = %e, "dead-letter append failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }
}
