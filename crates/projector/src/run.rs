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

use backon::{ExponentialBuilder, Retryable};
use eventlog::{EventLog, LogRecord, Record};
use futures::StreamExt;
use schemas::protocol::MessageView;
use schemas::ChatEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use history::versions::Active;
use history::{Batch, ChangeMark, HistoryStore, ReadMark, StoreError};

/// Name of the dead-letter topic.
pub const DLQ_TOPIC: &str = "chat.dlq";

/// How often a partition's lag in records is measured at most (it asks the
/// log for the partition's end).
const LAG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Consumer group: projectors writing one store share its partitions.
    pub group: String,
    /// The store is this projector's alone (an embedded store): it reads
    /// every partition without joining the group, so a restart resumes at
    /// once instead of waiting for the group to notice the old member died.
    pub exclusive: bool,
    /// First wait after a failure; each next one doubles (jittered) up to
    /// `max_backoff`.
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
    handle: ProjectorHandle,
}

/// What the rest of a process may ask of a running projector: which
/// partitions it projects now (for readiness), and to pause or resume it
/// (the control socket's `chat projector pause`). Cheap to clone.
#[derive(Clone)]
pub struct ProjectorHandle {
    owned: Arc<std::sync::Mutex<std::collections::BTreeSet<u32>>>,
    paused: Arc<watch::Sender<bool>>,
}

impl Default for ProjectorHandle {
    fn default() -> Self {
        ProjectorHandle {
            owned: Arc::default(),
            paused: Arc::new(watch::channel(false).0),
        }
    }
}

impl ProjectorHandle {
    /// The partitions the projector projects now, in order.
    pub fn owned(&self) -> Vec<u32> {
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        owned.iter().copied().collect()
    }

    /// Pauses (`true`) or resumes the projector: while paused, each
    /// partition holds the batch it read, applies nothing, and moves no
    /// position. Returns whether that changed anything.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused
            .send_if_modified(|p| std::mem::replace(p, paused) != paused)
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Returns once the projector is not paused.
    async fn unpaused(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives in `self`: `wait_for` ends only by the value.
        let _resumed = paused.wait_for(|p| !p).await;
    }

    fn set_owned(&self, partitions: impl Iterator<Item = u32>) {
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        *owned = partitions.collect();
    }
}

/// Turns a log record into the message it holds; `None` for an event that
/// is not a message (a read position, a change of a message).
pub fn to_message(record: &LogRecord) -> Result<Option<MessageView>, schemas::DecodeError> {
    Ok(match schemas::decode(&record.value)? {
        ChatEvent::MessagePosted(m) => Some(view(record, m)),
        ChatEvent::ReadPositionMoved(_) | ChatEvent::MessageChanged(_) => None,
    })
}

fn view(record: &LogRecord, m: schemas::MessagePosted) -> MessageView {
    MessageView {
        room: m.room,
        offset: record.offset as i64,
        id: m.client_id,
        user: m.user,
        body: m.body,
        ts: m.ts,
        ..MessageView::default()
    }
}

/// Adds what `event`, read at `record`, changes to `batch`:
/// - a message is stored; it is listed among its sender's rooms (and, in a
///   direct-message room, the other user's), and its sender has read the
///   room up to it;
/// - a read position is kept, never beyond the offset before its own (it
///   is appended after every message its user can have seen: a claim
///   further on is cut there), and lists the room among the reader's;
/// - a change (edit, delete, reaction) goes to the store, which folds it
///   into its target by the rules of `history::fold` (only the author
///   edits or deletes); one naming a target at or after its own offset
///   (no writer of ours appends one) is kept out.
pub fn project(batch: &mut Batch, record: &LogRecord, event: ChatEvent) {
    match event {
        ChatEvent::MessagePosted(m) => {
            let room = m.room.clone();
            if let Some((a, b)) = schemas::protocol::dm_members(&room) {
                let other = if a == m.user { b } else { a };
                batch.members.push((other.to_owned(), room.clone()));
            }
            batch.members.push((m.user.clone(), room.clone()));
            batch.reads.push(ReadMark {
                room,
                user: m.user.clone(),
                offset: record.offset,
            });
            batch.messages.push(view(record, m));
        }
        ChatEvent::ReadPositionMoved(r) => {
            batch.members.push((r.user.clone(), r.room.clone()));
            let claimed = u64::try_from(r.offset).ok();
            let upto = claimed.zip(record.offset.checked_sub(1));
            if let Some((claimed, before)) = upto {
                batch.reads.push(ReadMark {
                    room: r.room,
                    user: r.user,
                    offset: claimed.min(before),
                });
            }
        }
        ChatEvent::MessageChanged(c) => {
            let Some(target) = u64::try_from(c.target)
                .ok()
                .filter(|&target| target < record.offset)
            else {
                tracing::warn!(
                    offset = record.offset,
                    target = c.target,
                    "a change names a target at or after itself; ignored"
                );
                return;
            };
            batch.changes.push(ChangeMark {
                room: c.room,
                offset: record.offset,
                id: c.client_id,
                user: c.user,
                target,
                change: c.change,
                ts: c.ts,
            });
        }
    }
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
    pub batch: Batch,
    /// Events decoded (messages and read positions).
    pub events: u64,
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
    /// The writer schemas read: the released ones, but for a test playing
    /// an older build.
    pub decoder: schemas::Decoder,
    pub dlq: Option<Arc<dyn EventLog>>,
    /// Who dead-letters: `projector`, or `replay`.
    pub consumer: String,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

/// How the projector waits between attempts of anything that failed:
/// exponential from `first` to `max` (each wait jittered by up to as much
/// again), without end: a projector never skips what it could not store.
pub(crate) fn retry_policy(first: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// The waits of a loop that retries by starting over (a read re-opened, a
/// group re-joined): the next wait, and a reset once it made progress.
struct Delays {
    policy: ExponentialBuilder,
    max: Duration,
    waits: backon::ExponentialBackoff,
}

impl Delays {
    fn new(first: Duration, max: Duration) -> Self {
        let policy = retry_policy(first, max);
        Delays {
            policy,
            max,
            waits: backon::BackoffBuilder::build(policy),
        }
    }

    fn next(&mut self) -> Duration {
        self.waits.next().unwrap_or(self.max)
    }

    fn reset(&mut self) {
        self.waits = backon::BackoffBuilder::build(self.policy);
    }
}

impl Applier {
    fn policy(&self) -> ExponentialBuilder {
        retry_policy(self.backoff, self.max_backoff)
    }

    /// Decodes `batch`, leaving out records stamped before `not_before`;
    /// dead-letters what cannot be decoded (retrying the dead-letter topic
    /// until it takes the record).
    pub async fn decode(&self, batch: &[LogRecord], not_before: Option<i64>) -> Decoded {
        let mut decoded = Decoded {
            batch: Batch::messages(Vec::with_capacity(batch.len())),
            next: batch.last().map_or(0, |r| r.offset + 1),
            ..Decoded::default()
        };
        for record in batch {
            if not_before.is_some_and(|t| record.ts < t) {
                decoded.skipped += 1;
                continue;
            }
            match self.decoder.decode(&record.value) {
                Ok(event) => {
                    project(&mut decoded.batch, record, event);
                    decoded.events += 1;
                }
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
        (|| store.apply_batch(partition, decoded.batch.clone(), decoded.next))
            .retry(self.policy())
            .when(StoreError::is_retriable)
            .notify(|e, wait| {
                tracing::warn!(partition, error = %e, ?wait, "store apply failed, retrying");
                metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL).increment(1);
            })
            .await
    }

    async fn dead_letter(&self, record: &LogRecord, reason: &str) {
        tracing::warn!(
            partition = record.partition,
            offset = record.offset,
            reason,
            consumer = self.consumer,
            "undecodable record sent to the dead-letter topic"
        );
        metrics::counter!(crate::metrics::DEAD_LETTERS_TOTAL, "consumer" => self.consumer.clone())
            .increment(1);
        let Some(dlq) = &self.dlq else { return };
        let appended = (|| dlq.append(vec![dead_letter(record, reason, &self.consumer)]))
            .retry(self.policy())
            .notify(|e, wait| {
                tracing::warn!(error = %e, ?wait, "dead-letter append failed, retrying");
            })
            .await;
        if let Err(e) = appended {
            // Unreachable: the policy has no last attempt.
            tracing::error!(error = %e, "dead-letter append gave up");
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
    /// changes (see [`history::versions::CurrentVersion::subscribe`]).
    pub fn following(
        log: Arc<dyn EventLog>,
        stores: watch::Receiver<Active>,
        dlq: Option<Arc<dyn EventLog>>,
        config: ProjectorConfig,
    ) -> Self {
        Projector {
            handle: ProjectorHandle::default(),
            log,
            stores,
            _fixed: None,
            applier: Applier {
                decoder: schemas::Decoder::new(),
                dlq,
                consumer: "projector".into(),
                backoff: config.backoff,
                max_backoff: config.max_backoff,
            },
            config,
        }
    }

    /// The handle to this projector, valid once it runs and after.
    pub fn handle(&self) -> ProjectorHandle {
        self.handle.clone()
    }

    /// Reads only the writer schemas `decoder` accepts, dead-lettering the
    /// rest: what a build of an older release does
    /// ([`schemas::Decoder::released_through`]), for tests of an upgrade.
    pub fn with_decoder(mut self, decoder: schemas::Decoder) -> Self {
        self.applier.decoder = decoder;
        self
    }

    /// Runs until `shutdown` is cancelled. Projects the partitions the
    /// consumer group gives this member; a partition taken away stops at
    /// once, and its new owner resumes from the position in its store. Every
    /// partition task is awaited before it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let tracker = TaskTracker::new();
        let mut owned: HashMap<u32, CancellationToken> = HashMap::new();
        let mut delays = Delays::new(this.config.backoff, this.config.max_backoff);
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
                        delays.reset();
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
                        metrics::gauge!(crate::metrics::PARTITIONS_OWNED).set(owned.len() as f64);
                        this.handle.set_owned(owned.keys().copied());
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
                _ = tokio::time::sleep(delays.next()) => {}
            }
        }
        for stop in owned.values() {
            stop.cancel();
        }
        tracker.close();
        tracker.wait().await;
        this.handle.set_owned(std::iter::empty());
    }

    async fn project_partition(&self, partition: u32) {
        let mut stores = self.stores.clone();
        let mut delays = Delays::new(self.config.backoff, self.config.max_backoff);
        loop {
            // (Re)start from the store's position: the store is the truth.
            let active = stores.borrow_and_update().clone();
            let store = active.store;
            let from = match store.position(partition).await {
                Ok(p) => p.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "reading projection position failed");
                    tokio::time::sleep(delays.next()).await;
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
            // When the partition's end was last asked, for the lag gauge.
            let mut lag_asked: Option<tokio::time::Instant> = None;
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
                if self.handle.is_paused() {
                    tracing::info!(partition, "projector paused; holding a batch");
                    self.handle.unpaused().await;
                }
                self.apply_batch(&*store, partition, &batch).await;
                delays.reset();
                if lag_asked.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                    lag_asked = Some(tokio::time::Instant::now());
                    self.record_lag(partition, batch.last()).await;
                }
            }
            if switched {
                continue;
            }
            tokio::time::sleep(delays.next()).await;
        }
    }

    /// Sets the lag gauges of `partition` after `last` was applied: the
    /// records between it and the partition's end, the seconds since it
    /// was appended. A log that does not answer leaves the records gauge.
    async fn record_lag(&self, partition: u32, last: Option<&LogRecord>) {
        let Some(last) = last else { return };
        let label = partition.to_string();
        let age_ms = (schemas::now_ms() - last.ts).max(0);
        metrics::gauge!(crate::metrics::LAG_SECONDS, "partition" => label.clone())
            .set(age_ms as f64 / 1000.0);
        match self.log.end_offset(partition).await {
            Ok(end) => metrics::gauge!(crate::metrics::LAG_RECORDS, "partition" => label)
                .set(end.saturating_sub(last.offset + 1) as f64),
            Err(e) => tracing::debug!(partition, error = %e, "end offset for the lag gauge"),
        }
    }

    /// Applies one batch, retrying the store until it succeeds.
    async fn apply_batch(&self, store: &dyn HistoryStore, partition: u32, batch: &[LogRecord]) {
        let started = std::time::Instant::now();
        let decoded = self.applier.decode(batch, None).await;
        // A terminal error ends an attempt, but the position must not move
        // past data it does not cover: wait and try again, without end.
        let stored = (|| self.applier.store(store, partition, &decoded))
            .retry(self.applier.policy())
            .notify(|e, wait| {
                tracing::error!(partition, error = %e, ?wait, "store apply failed, retrying");
                metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL).increment(1);
            })
            .await;
        if let Err(e) = stored {
            // Unreachable: the policy has no last attempt.
            tracing::error!(partition, error = %e, "store apply gave up");
            return;
        }
        metrics::counter!(crate::metrics::EVENTS_TOTAL).increment(decoded.events);
        metrics::gauge!(crate::metrics::POSITION, "partition" => partition.to_string())
            .set(decoded.next as f64);
        metrics::histogram!(crate::metrics::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    //! The projector loop over the embedded log and store: what it stores,
    //! where it resumes, what it dead-letters, and that it retries a store
    //! that fails instead of moving past the data.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use eventlog::embedded::EmbeddedLog;
    use history::embedded::EmbeddedStore;
    use schemas::MessagePosted;

    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    fn posted(room: &str, n: u64) -> Record {
        let event = ChatEvent::MessagePosted(MessagePosted {
            room: room.into(),
            client_id: format!("id-{room}-{n}"),
            user: "ada".into(),
            body: format!("message {n}"),
            ts: 1_000 + n as i64,
        });
        Record {
            key: room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts: 1_000 + n as i64,
        }
    }

    fn config() -> ProjectorConfig {
        ProjectorConfig {
            exclusive: true,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            ..ProjectorConfig::new("test")
        }
    }

    /// Waits until `store` covers every partition of `log` up to its head.
    async fn caught_up(log: &dyn EventLog, store: &dyn HistoryStore) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut done = true;
            for p in 0..log.partitions() {
                let end = log.end_offset(p).await.unwrap();
                let at = store.position(p).await.unwrap().unwrap_or(0);
                done &= at >= end;
            }
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "projection did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs a projector until it has caught up, then stops it.
    async fn project(
        log: Arc<dyn EventLog>,
        store: Arc<dyn HistoryStore>,
        dlq: Option<Arc<dyn EventLog>>,
    ) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Projector::new(log.clone(), store.clone(), dlq, config()).run(stop.clone()),
        );
        caught_up(&*log, &*store).await;
        stop.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the projector stops when cancelled")
            .unwrap();
    }

    fn bodies(page: &[MessageView]) -> Vec<&str> {
        page.iter().map(|m| m.body.as_str()).collect()
    }

    #[tokio::test]
    async fn every_partition_is_projected_in_offset_order_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 4).unwrap());
        let store: Arc<dyn HistoryStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap());
        let rooms = ["a", "b", "c", "d", "e"];
        for n in 0..20 {
            log.append(rooms.iter().map(|r| posted(r, n)).collect())
                .await
                .unwrap();
        }
        project(log.clone(), store.clone(), None).await;
        for room in rooms {
            let page = store.page(room, None, 100).await.unwrap();
            let expected: Vec<String> = (0..20).map(|n| format!("message {n}")).collect();
            assert_eq!(bodies(&page), expected, "room {room}");
            assert!(page.windows(2).all(|w| w[0].offset < w[1].offset));
        }
        for p in 0..4 {
            assert_eq!(
                store.position(p).await.unwrap().unwrap_or(0),
                log.end_offset(p).await.unwrap(),
                "partition {p}"
            );
        }
    }

    #[tokio::test]
    async fn a_restarted_projector_resumes_from_the_stores_position() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 1).unwrap());
        let store: Arc<dyn HistoryStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap());
        log.append((0..5).map(|n| posted("r", n)).collect())
            .await
            .unwrap();
        project(log.clone(), store.clone(), None).await;
        assert_eq!(store.position(0).await.unwrap(), Some(5));
        // More records while it was down; the new one starts at 5, and what
        // the first one stored is not stored again.
        log.append((5..9).map(|n| posted("r", n)).collect())
            .await
            .unwrap();
        project(log.clone(), store.clone(), None).await;
        let page = store.page("r", None, 100).await.unwrap();
        let expected: Vec<String> = (0..9).map(|n| format!("message {n}")).collect();
        assert_eq!(bodies(&page), expected);
        assert_eq!(store.position(0).await.unwrap(), Some(9));
    }

    #[tokio::test]
    async fn an_undecodable_record_is_dead_lettered_and_the_partition_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 1).unwrap());
        let dlq: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), DLQ_TOPIC, 1).unwrap());
        let store: Arc<dyn HistoryStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap());
        let poison = Record {
            key: b"r".to_vec(),
            value: b"not avro".to_vec(),
            ts: 1,
        };
        log.append(vec![posted("r", 0), poison, posted("r", 2)])
            .await
            .unwrap();
        project(log.clone(), store.clone(), Some(dlq.clone())).await;
        let page = store.page("r", None, 100).await.unwrap();
        assert_eq!(bodies(&page), ["message 0", "message 2"]);
        assert_eq!(store.position(0).await.unwrap(), Some(3));
        let letter = only_dead_letter(&*dlq).await;
        assert_eq!(letter["partition"], 0);
        assert_eq!(letter["offset"], 1);
        assert_eq!(letter["consumer"], "projector");
        assert_eq!(letter["value_hex"], "6e6f74206176726f");
        assert!(!letter["reason"].as_str().unwrap().is_empty());
    }

    /// A projector of a build that reads what `decoder` reads (today's
    /// when `None`) run over `records`, one partition, until caught up: the
    /// dir holding it all, the store and the dead-letter topic.
    async fn projected_by(
        records: Vec<Record>,
        decoder: Option<schemas::Decoder>,
    ) -> (tempfile::TempDir, Arc<dyn HistoryStore>, Arc<dyn EventLog>) {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 1).unwrap());
        let dlq: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), DLQ_TOPIC, 1).unwrap());
        let store: Arc<dyn HistoryStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap());
        log.append(records).await.unwrap();
        let stop = CancellationToken::new();
        let mut projector = Projector::new(log.clone(), store.clone(), Some(dlq.clone()), config());
        if let Some(decoder) = decoder {
            projector = projector.with_decoder(decoder);
        }
        let task = tokio::spawn(projector.run(stop.clone()));
        caught_up(&*log, &*store).await;
        stop.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        (dir, store, dlq)
    }

    /// The one record of the dead-letter topic, as JSON.
    async fn only_dead_letter(dlq: &dyn EventLog) -> serde_json::Value {
        assert_eq!(dlq.end_offset(0).await.unwrap(), 1, "one dead letter");
        let mut read = dlq.read(0, 0);
        let letter = tokio::time::timeout(WAIT, read.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_slice(&letter[0].value).unwrap()
    }

    fn read(room: &str, user: &str, offset: i64) -> Record {
        let event = ChatEvent::ReadPositionMoved(schemas::ReadPositionMoved {
            room: room.into(),
            user: user.into(),
            offset,
            ts: 2_000,
        });
        Record {
            key: room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts: 2_000,
        }
    }

    #[tokio::test]
    async fn read_positions_are_kept_cut_at_their_own_record_and_rooms_listed_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 1).unwrap());
        let store: Arc<dyn HistoryStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap());
        let dm = Record {
            key: b"dm:ada:bob".to_vec(),
            ..posted("dm:ada:bob", 9)
        };
        log.append(vec![
            posted("r", 0),        // 0: ada has read r up to 0
            read("r", "bob", 0),   // 1
            posted("r", 2),        // 2: ada up to 2
            read("r", "bob", 500), // 3: bob claims 500, is cut at 2
            read("r", "carl", 1),  // 4
            read("r", "bob", 1),   // 5: lower: bob stays at 2
            dm,                    // 6: ada writes to bob
        ])
        .await
        .unwrap();
        project(log.clone(), store.clone(), None).await;
        assert_eq!(store.read_position("r", "ada").await.unwrap(), Some(2));
        assert_eq!(store.read_position("r", "bob").await.unwrap(), Some(2));
        assert_eq!(store.read_position("r", "carl").await.unwrap(), Some(1));
        assert_eq!(store.user_rooms("ada").await.unwrap(), ["dm:ada:bob", "r"]);
        assert_eq!(store.user_rooms("bob").await.unwrap(), ["dm:ada:bob", "r"]);
        assert_eq!(store.user_rooms("carl").await.unwrap(), ["r"]);
        let page = store.page("r", None, 100).await.unwrap();
        assert_eq!(bodies(&page), ["message 0", "message 2"]);
    }

    /// The upgrade order: a projector of the release before read positions
    /// (schema v1) meets one on the log, sends it to the dead-letter topic
    /// with the reason, and projects what follows.
    #[tokio::test]
    async fn a_v1_build_dead_letters_a_read_position_and_moves_on() {
        let v1 = schemas::Decoder::released_through("v1").unwrap();
        let records = vec![posted("r", 0), read("r", "bob", 0), posted("r", 2)];
        let (_dir, store, dlq) = projected_by(records, Some(v1)).await;
        let page = store.page("r", None, 100).await.unwrap();
        assert_eq!(bodies(&page), ["message 0", "message 2"]);
        assert_eq!(store.read_position("r", "bob").await.unwrap(), None);
        let letter = only_dead_letter(&*dlq).await;
        assert_eq!(letter["offset"], 1);
        assert_eq!(letter["consumer"], "projector");
        let reason = letter["reason"].as_str().unwrap();
        assert_eq!(
            reason,
            format!(
                "unknown schema fingerprint {:#018x}",
                schemas::event::release_fingerprint("v2").unwrap()
            )
        );
    }

    fn changed(room: &str, user: &str, target: i64, change: schemas::Change) -> Record {
        let event = ChatEvent::MessageChanged(schemas::MessageChanged {
            room: room.to_owned(),
            client_id: format!("{room}-{user}-{target}-{change:?}"),
            user: user.to_owned(),
            target,
            change,
            ts: 1_700_000_000_000 + target,
        });
        Record {
            key: room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts: 1_700_000_000_000 + target,
        }
    }

    /// A build of the release before changes (schema v2) meets edits,
    /// deletes and reactions on the log: each goes to the dead-letter topic
    /// with the reason, and every message around them is projected.
    #[tokio::test]
    async fn a_v2_build_dead_letters_changes_and_moves_on() {
        use schemas::Change;
        let records = vec![
            posted("r", 0),
            changed("r", "ada", 0, Change::Edit { body: "e".into() }),
            changed(
                "r",
                "bob",
                0,
                Change::React {
                    emoji: "👍".into()
                },
            ),
            posted("r", 3),
            changed(
                "r",
                "bob",
                0,
                Change::Unreact {
                    emoji: "👍".into()
                },
            ),
            changed("r", "ada", 3, Change::Delete),
            posted("r", 6),
        ];
        let v2 = schemas::Decoder::released_through("v2").unwrap();
        let (_dir, store, dlq) = projected_by(records, Some(v2)).await;
        let page = store.page("r", None, 100).await.unwrap();
        assert_eq!(bodies(&page), ["message 0", "message 3", "message 6"]);
        assert!(page.iter().all(|m| m.edited_ts.is_none() && !m.deleted));
        assert_eq!(store.position(0).await.unwrap(), Some(7));
        assert_eq!(dlq.end_offset(0).await.unwrap(), 4, "four dead letters");
        let mut read = dlq.read(0, 0);
        let mut letters: Vec<serde_json::Value> = Vec::new();
        while letters.len() < 4 {
            let batch = tokio::time::timeout(WAIT, read.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            letters.extend(
                batch
                    .iter()
                    .map(|r| serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()),
            );
        }
        let offsets: Vec<u64> = letters
            .iter()
            .map(|l| l["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [1, 2, 4, 5]);
        let v3 = format!(
            "unknown schema fingerprint {:#018x}",
            schemas::event::release_fingerprint("v3").unwrap()
        );
        for letter in &letters {
            assert_eq!(letter["reason"], v3.as_str());
            assert_eq!(letter["consumer"], "projector");
        }
    }

    /// Today's build projects the same log: the edit and the delete by
    /// their author, the reaction taken back; a change by someone else is
    /// on the log but changes nothing.
    #[tokio::test]
    async fn changes_are_projected_into_their_targets() {
        use schemas::Change;
        let author = "ada"; // who `posted` sends as
        let records = vec![
            posted("r", 0),
            changed("r", author, 0, Change::Edit { body: "e".into() }),
            changed(
                "r",
                "bob",
                0,
                Change::React {
                    emoji: "👍".into()
                },
            ),
            posted("r", 3),
            changed("r", "mallory", 3, Change::Delete),
            changed("r", author, 3, Change::Delete),
            changed("r", "bob", 9, Change::Delete),
        ];
        let (_dir, store, _) = projected_by(records, None).await;
        let page = store.page("r", None, 100).await.unwrap();
        assert_eq!(bodies(&page), ["e", ""]);
        assert!(page[0].edited_ts.is_some());
        assert_eq!(page[0].reactions.len(), 1);
        assert_eq!(page[0].reactions[0].users, ["bob"]);
        assert!(page[1].deleted);
    }

    /// An embedded store whose first `failures` applies fail, retriable or
    /// not: the projector's retry is what is under test.
    struct Flaky {
        inner: EmbeddedStore,
        failures: usize,
        retriable: bool,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl HistoryStore for Flaky {
        async fn apply_batch(
            &self,
            partition: u32,
            batch: history::Batch,
            next: u64,
        ) -> Result<(), StoreError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(if self.retriable {
                    StoreError::Unavailable("down for the test".into())
                } else {
                    StoreError::Storage("broken for the test".into())
                });
            }
            self.inner.apply_batch(partition, batch, next).await
        }

        async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError> {
            self.inner.position(partition).await
        }

        async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError> {
            self.inner.read_position(room, user).await
        }

        async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError> {
            self.inner.reads(room).await
        }

        async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
            self.inner.user_rooms(user).await
        }

        async fn page(
            &self,
            room: &str,
            before: Option<u64>,
            limit: usize,
        ) -> Result<Vec<MessageView>, StoreError> {
            self.inner.page(room, before, limit).await
        }

        async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError> {
            self.inner.find_id(room, id).await
        }

        async fn page_as_of(
            &self,
            room: &str,
            before: Option<u64>,
            limit: usize,
            at: history::AsOf,
        ) -> Result<Vec<history::PastMessage>, StoreError> {
            self.inner.page_as_of(room, before, limit, at).await
        }

        async fn changes_between(
            &self,
            room: &str,
            from: u64,
            upto: u64,
        ) -> Result<Vec<ChangeMark>, StoreError> {
            self.inner.changes_between(room, from, upto).await
        }
    }

    #[tokio::test]
    async fn a_failing_store_is_retried_until_it_takes_the_batch() {
        for retriable in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), "m", 1).unwrap());
            let flaky = Arc::new(Flaky {
                inner: EmbeddedStore::open(&dir.path().join("h"), "v1").unwrap(),
                failures: 3,
                retriable,
                calls: AtomicUsize::new(0),
            });
            log.append((0..4).map(|n| posted("r", n)).collect())
                .await
                .unwrap();
            project(log.clone(), flaky.clone(), None).await;
            let page = flaky.page("r", None, 100).await.unwrap();
            assert_eq!(page.len(), 4, "retriable {retriable}: nothing skipped");
            assert_eq!(flaky.position(0).await.unwrap(), Some(4));
            assert!(flaky.calls.load(Ordering::SeqCst) > 3, "it was retried");
        }
    }

    #[test]
    fn the_retry_policy_grows_to_its_cap_and_never_ends() {
        let mut delays = Delays::new(Duration::from_millis(10), Duration::from_millis(80));
        let waits: Vec<Duration> = (0..50).map(|_| delays.next()).collect();
        // Jitter adds at most as much again as the un-jittered wait.
        assert!(waits[0] >= Duration::from_millis(10) && waits[0] <= Duration::from_millis(20));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(160)));
        assert!(waits[10..].iter().all(|w| *w >= Duration::from_millis(80)));
        delays.reset();
        assert!(
            delays.next() <= Duration::from_millis(20),
            "reset starts over"
        );
    }
}
