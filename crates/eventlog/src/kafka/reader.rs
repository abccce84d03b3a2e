//! The shared reader of the Kafka log: one consumer, polled by one thread,
//! serves every read of this process that is given to it, whatever its
//! partition, offset or topic. Reads come and go without new clients: a
//! partition is assigned to the consumer (manual assignment, no group) while
//! at least one read wants it, and unassigned when the last one ends.
//!
//! Each read is a cursor: the next offset it lacks and a bounded queue. A
//! partition has one fetch position; the records fetched are routed to
//! every cursor of the partition that lacks them, so reads near each other
//! share one fetch. A read that starts below the position moves it back (the
//! others skip what they have); one that starts above waits for the fetch to
//! reach it.
//!
//! Full queues, the named policy: a read whose queue is full keeps the batch
//! that did not fit and misses what is fetched after it until its queue has
//! room; then the partition is read again from it (the others skip what they
//! have). It never holds up the other reads of its partition: with an
//! overflow reader ([`Reader::start`]) and other reads on the partition, it
//! is handed over there, with its batch, and goes on at its own pace; a
//! partition whose reads all wait is parked (unassigned, then assigned again
//! from the lowest read with room), so nothing more than one batch per read
//! is held.
//!
//! Promises, for each read: its records come in offset order from the
//! offset asked, each once; a record past the next expected offset (a fetch
//! that skipped, or one from before a seek) makes the partition be read
//! again from there, up to [`GAP_RETRIES`] times, and only then is the gap
//! taken as real (deleted records) and reported in
//! [`crate::metrics::READ_GAPS_TOTAL`]; a read ends when its stream is
//! dropped. The thread never blocks on a read's queue and stops when the
//! [`Reader`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::{LogError, LogRecord, RecordStream};

/// Most records handed to a read in one batch.
pub(crate) const READ_BATCH: usize = 1024;
/// Batches a read's queue holds.
const QUEUE: usize = 4;
/// Reads waiting to start, at most; more are refused (`unavailable`).
const STARTING: usize = 4096;
/// How long one poll of the consumer waits for records.
const POLL_WAIT: Duration = Duration::from_millis(10);
/// How long the thread waits for a read to start when it has none.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Times a partition is read again over a gap before the gap is taken as
/// real.
pub(crate) const GAP_RETRIES: u32 = 3;
/// Deadline of a seek.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

type Batches = mpsc::Sender<Result<Vec<LogRecord>, LogError>>;

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TopicPartition {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
}

/// A read to start: `tp` from `from` on, into `tx`. `pending`: records
/// already taken for it that did not fit its queue (a read handed over by
/// another reader), all below `from`.
struct Start {
    tp: TopicPartition,
    from: u64,
    tx: Batches,
    pending: Option<Vec<LogRecord>>,
}

/// Where reads are handed over to: another reader's queue of starts.
#[derive(Clone)]
pub(crate) struct Overflow(SyncSender<Start>);

/// One consumer and the thread that polls it; see the module doc.
pub(crate) struct Reader {
    consumer: Arc<BaseConsumer>,
    starts: SyncSender<Start>,
    /// The fetch position of each partition with reads, and whether it is
    /// parked, as of the thread's last round.
    positions: Arc<Mutex<HashMap<TopicPartition, (u64, bool)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts the thread `name` polling `consumer` (which must have no
    /// assignment and no subscription). `overflow`: where a read whose
    /// queue is full goes on when its partition has other reads.
    pub(crate) fn start(
        name: &str,
        consumer: BaseConsumer,
        overflow: Option<Overflow>,
    ) -> Result<Reader, LogError> {
        let consumer = Arc::new(consumer);
        let (starts, rx) = sync_channel(STARTING);
        let positions = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            consumer: consumer.clone(),
            starts: rx,
            overflow,
            positions: positions.clone(),
            stop: stop.clone(),
            topics: Vec::new(),
            parts: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || worker.run())
            .map_err(|e| LogError::Unavailable(format!("starting the log reader: {e}")))?;
        Ok(Reader {
            consumer,
            starts,
            positions,
            stop,
            thread: Some(thread),
        })
    }

    /// The consumer, for metadata and watermark queries.
    pub(crate) fn consumer(&self) -> &Arc<BaseConsumer> {
        &self.consumer
    }

    /// Where to hand reads over to this reader.
    pub(crate) fn overflow(&self) -> Overflow {
        Overflow(self.starts.clone())
    }

    /// The fetch position of `tp`, when it is assigned.
    pub(crate) fn position(&self, tp: &TopicPartition) -> Option<u64> {
        self.positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tp)
            .map(|&(next, _)| next)
    }

    /// Whether `tp` is parked (every read of it waits).
    #[cfg(test)]
    fn parked(&self, tp: &TopicPartition) -> bool {
        self.positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tp)
            .is_some_and(|&(_, parked)| parked)
    }

    /// Reads `tp` from `from` on, then tails it.
    pub(crate) fn read(&self, tp: TopicPartition, from: u64) -> RecordStream {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let start = Start {
            tp,
            from,
            tx,
            pending: None,
        };
        let refused = match self.starts.try_send(start) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) => Some("too many log reads are starting; try again"),
            Err(TrySendError::Disconnected(_)) => Some("the log reader has stopped"),
        };
        if let Some(why) = refused {
            return futures::stream::once(async move { Err(LogError::Unavailable(why.into())) })
                .boxed();
        }
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the log reader thread panicked");
            }
        }
    }
}

/// A read being served.
struct Cursor {
    /// The first offset it lacks.
    next: u64,
    tx: Batches,
    /// Records taken for it that its queue had no room for; while it has
    /// some it gets nothing more.
    pending: Option<Vec<LogRecord>>,
}

/// A partition with reads.
struct Part {
    dense: Dense,
    /// Unassigned while every read waits for room in its queue.
    parked: bool,
    cursors: Vec<Cursor>,
    /// Records fetched this round, in offset order.
    batch: Vec<LogRecord>,
}

/// A partition by topic index (into `Worker::topics`) and number.
type Key = (usize, u32);

struct Worker {
    consumer: Arc<BaseConsumer>,
    starts: Receiver<Start>,
    overflow: Option<Overflow>,
    positions: Arc<Mutex<HashMap<TopicPartition, (u64, bool)>>>,
    stop: Arc<AtomicBool>,
    topics: Vec<Arc<str>>,
    parts: HashMap<Key, Part>,
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.parts.is_empty() {
                // Nothing to fetch: wait for a read to start.
                match self.starts.recv_timeout(IDLE_WAIT) {
                    Ok(start) => self.start(start),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(start) = self.starts.try_recv() {
                self.start(start);
            }
            self.tidy();
            self.publish();
            if !self.parts.is_empty() {
                self.fetch();
                self.deliver();
            }
        }
        if let Err(e) = self.consumer.unassign() {
            tracing::debug!(error = %e, "unassigning the reader's partitions failed");
        }
    }

    fn key(&mut self, topic: &Arc<str>) -> usize {
        match self.topics.iter().position(|t| t == topic) {
            Some(i) => i,
            None => {
                self.topics.push(topic.clone());
                self.topics.len() - 1
            }
        }
    }

    fn start(&mut self, start: Start) {
        if start.tx.is_closed() {
            return;
        }
        let key = (self.key(&start.tp.topic), start.tp.partition);
        let topic = &self.topics[key.0];
        let cursor = Cursor {
            next: start.from,
            tx: start.tx,
            pending: start.pending,
        };
        match self.parts.get_mut(&key) {
            Some(part) => {
                // A parked partition is assigned again by `tidy`, from its
                // lowest read that has room.
                if !part.parked && start.from < part.dense.next {
                    reposition(&self.consumer, topic, key.1, start.from);
                    part.dense = Dense::new(start.from);
                }
                part.cursors.push(cursor);
            }
            None => {
                let assigned = tpl(topic, key.1, start.from)
                    .and_then(|tpl| self.consumer.incremental_assign(&tpl));
                if let Err(e) = assigned {
                    let _ = cursor.tx.try_send(Err(LogError::Unavailable(format!(
                        "assigning {topic}/{}: {e}",
                        key.1
                    ))));
                    return;
                }
                self.parts.insert(
                    key,
                    Part {
                        dense: Dense::new(start.from),
                        parked: false,
                        cursors: vec![cursor],
                        batch: Vec::new(),
                    },
                );
            }
        }
    }

    /// Drops ended reads, hands pending batches over where there is room,
    /// reads a partition again from a read that waited and fell behind,
    /// parks a partition whose reads all wait (and assigns it again), and
    /// unassigns partitions nobody reads.
    fn tidy(&mut self) {
        let mut idle = Vec::new();
        for (key, part) in &mut self.parts {
            part.cursors.retain_mut(|c| {
                if c.tx.is_closed() {
                    return false;
                }
                match c.pending.take() {
                    None => true,
                    Some(batch) => match c.tx.try_send(Ok(batch)) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(Ok(batch))) => {
                            c.pending = Some(batch);
                            true
                        }
                        Err(_) => false,
                    },
                }
            });
            let topic = &self.topics[key.0];
            if part.cursors.is_empty() {
                idle.push(*key);
                continue;
            }
            let ready = part
                .cursors
                .iter()
                .filter(|c| c.pending.is_none())
                .map(|c| c.next)
                .min();
            match ready {
                None if !part.parked => {
                    // Every read waits for room: fetch nothing meanwhile.
                    // Parked by unassigning, not by librdkafka's pause: a
                    // pause outlives unassign and assign, and a pause, an
                    // assign (a seek that failed assigns again) and a
                    // resume can leave a partition paused for good
                    // (librdkafka issues 1849 and 5591); under network
                    // cuts, reads stood still that way.
                    if let Err(e) = tpl(topic, key.1, 0)
                        .and_then(|tpl| self.consumer.incremental_unassign(&tpl))
                    {
                        tracing::warn!(topic = &**topic, partition = key.1, error = %e, "parking a partition failed");
                    }
                    part.parked = true;
                }
                None => {}
                Some(from) if part.parked => {
                    // Assigned again from the lowest read with room; what
                    // was fetched before it was parked was dropped.
                    match tpl(topic, key.1, from)
                        .and_then(|tpl| self.consumer.incremental_assign(&tpl))
                    {
                        Ok(()) => {
                            part.dense = Dense::new(from);
                            part.parked = false;
                        }
                        Err(e) => {
                            // Tried again next round.
                            tracing::warn!(topic = &**topic, partition = key.1, error = %e, "assigning a parked partition again failed");
                        }
                    }
                }
                Some(from) if from < part.dense.next => {
                    // A read that waited missed what was fetched meanwhile.
                    reposition(&self.consumer, topic, key.1, from);
                    part.dense = Dense::new(from);
                }
                Some(_) => {}
            }
        }
        for key in idle {
            let part = self.parts.remove(&key).expect("idle parts are known");
            if part.parked {
                continue; // unassigned already
            }
            let topic = &self.topics[key.0];
            let removed =
                tpl(topic, key.1, 0).and_then(|tpl| self.consumer.incremental_unassign(&tpl));
            if let Err(e) = removed {
                tracing::warn!(topic = &**topic, partition = key.1, error = %e, "unassigning a partition failed");
            }
        }
    }

    fn publish(&self) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        positions.clear();
        for ((topic, partition), part) in &self.parts {
            let tp = TopicPartition {
                topic: self.topics[*topic].clone(),
                partition: *partition,
            };
            positions.insert(tp, (part.dense.next, part.parked));
        }
    }

    /// Polls up to [`READ_BATCH`] records into their partitions' batches.
    fn fetch(&mut self) {
        let consumer = self.consumer.clone();
        let mut wait = POLL_WAIT;
        for _ in 0..READ_BATCH {
            match consumer.poll(wait) {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "kafka read error (retried by librdkafka)");
                    return;
                }
                Some(Ok(m)) => {
                    self.offer(&m);
                    wait = Duration::ZERO;
                }
            }
        }
    }

    fn offer(&mut self, m: &BorrowedMessage<'_>) {
        let Some(topic) = self.topics.iter().position(|t| **t == *m.topic()) else {
            return;
        };
        let key = (topic, m.partition() as u32);
        let Some(part) = self.parts.get_mut(&key) else {
            return; // fetched before its partition was unassigned
        };
        if part.parked {
            return; // fetched again once it is assigned again
        }
        let offset = m.offset() as u64;
        match part.dense.offer(offset) {
            Take::Record => part.batch.push(to_record(m)),
            Take::Skip => {}
            Take::SeekBack(to) => {
                ::metrics::counter!(crate::metrics::READ_GAPS_TOTAL, "outcome" => "read_again")
                    .increment(1);
                tracing::debug!(
                    partition = key.1,
                    expected = to,
                    got = offset,
                    "fetch skipped records: reading again"
                );
                reposition(&self.consumer, &self.topics[topic], key.1, to);
            }
        }
    }

    /// Hands each partition's batch to its reads that lack its records. A
    /// read whose queue is full keeps the batch as pending and misses what
    /// follows until it has room (then [`Worker::tidy`] reads again from
    /// it); with an overflow and other reads on the partition, it is handed
    /// over there instead.
    fn deliver(&mut self) {
        for (key, part) in &mut self.parts {
            if part.batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut part.batch);
            let many = part.cursors.len() > 1;
            let overflow = self.overflow.as_ref().filter(|_| many);
            part.cursors.retain_mut(|c| {
                if c.pending.is_some() {
                    return true;
                }
                let from = batch.partition_point(|r| r.offset < c.next);
                let Some(last) = batch[from..].last() else {
                    return true;
                };
                c.next = last.offset + 1;
                match c.tx.try_send(Ok(batch[from..].to_vec())) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(Ok(records))) => {
                        let Some(Overflow(to)) = overflow else {
                            c.pending = Some(records);
                            return true;
                        };
                        let start = Start {
                            tp: TopicPartition {
                                topic: self.topics[key.0].clone(),
                                partition: key.1,
                            },
                            from: c.next,
                            tx: c.tx.clone(),
                            pending: Some(records),
                        };
                        match to.try_send(start) {
                            Ok(()) => false,
                            Err(TrySendError::Full(start) | TrySendError::Disconnected(start)) => {
                                c.pending = start.pending;
                                true
                            }
                        }
                    }
                    Err(_) => false,
                }
            });
        }
    }
}

fn tpl(
    topic: &str,
    partition: u32,
    offset: u64,
) -> rdkafka::error::KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))?;
    Ok(tpl)
}

/// Makes the consumer fetch `partition` from `offset` next: a seek, or, when
/// the partition cannot seek yet, assigning it again at `offset`.
fn reposition(consumer: &BaseConsumer, topic: &str, partition: u32, offset: u64) {
    let sought = consumer.seek(
        topic,
        partition as i32,
        Offset::Offset(offset as i64),
        SEEK_TIMEOUT,
    );
    let Err(e) = sought else { return };
    tracing::debug!(topic, partition, offset, error = %e, "seek failed: assigning the partition again");
    let again = tpl(topic, partition, offset).and_then(|tpl| {
        consumer.incremental_unassign(&tpl)?;
        consumer.incremental_assign(&tpl)
    });
    if let Err(e) = again {
        tracing::warn!(topic, partition, offset, error = %e, "repositioning a partition failed");
    }
}

pub(crate) fn to_record(m: &BorrowedMessage<'_>) -> LogRecord {
    LogRecord {
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        key: m.key().unwrap_or_default().to_vec(),
        value: m.payload().unwrap_or_default().to_vec(),
        ts: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// What a reader does with the record at an offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    Record,
    /// Already taken (a fetch from before a seek): dropped.
    Skip,
    /// Offsets are missing before this one: read again from there.
    SeekBack(u64),
}

/// The next offset a partition's fetch must yield, and how many times the
/// gap before the record it met has been read again.
///
/// Offsets are dense here (no transactions, no compaction), so a record
/// past the next expected offset means the fetch skipped some: tansu, the
/// test broker, has been seen to return a fetch that starts past a record
/// appended at the same moment, and a stale fetch from before a seek or a
/// re-assignment can still arrive. Taking such a record would lose the ones
/// before it for good. The partition is read again from the expected
/// offset; a gap still there after [`GAP_RETRIES`] reads is real (records
/// deleted below the log's start).
pub(crate) struct Dense {
    pub(crate) next: u64,
    retries: u32,
}

impl Dense {
    pub(crate) fn new(from: u64) -> Self {
        Dense {
            next: from,
            retries: 0,
        }
    }

    pub(crate) fn offer(&mut self, offset: u64) -> Take {
        if offset < self.next {
            return Take::Skip;
        }
        if offset > self.next {
            if self.retries < GAP_RETRIES {
                self.retries += 1;
                return Take::SeekBack(self.next);
            }
            ::metrics::counter!(crate::metrics::READ_GAPS_TOTAL, "outcome" => "accepted")
                .increment(1);
            tracing::warn!(
                expected = self.next,
                got = offset,
                "the log has no records between these offsets (read {GAP_RETRIES} more times)"
            );
        }
        self.next = offset + 1;
        self.retries = 0;
        Take::Record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{testing, KafkaConfig, KafkaLog};
    use crate::{EventLog, Record};

    /// Waits, up to a deadline, until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A read nobody consumes parks its partition; when it ends, the next
    /// read of the partition must get records. With librdkafka's pause in
    /// place of parking, it did not: the pause outlived the unassign and
    /// the next assign, and a projector given its partition back after a
    /// rebalance stood still.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_dropped_while_parked_is_read_again_by_the_next_read() {
        const RECORDS: usize = 8_000;
        let broker = testing::Broker::start(None);
        let config = KafkaConfig::new(&broker.brokers(), "paused", 1);
        let log = KafkaLog::connect(config.clone()).await.unwrap();
        for chunk in 0..RECORDS / 1000 {
            let batch = (0..1000)
                .map(|i| Record {
                    key: b"k".to_vec(),
                    value: format!("{chunk}:{i}").into_bytes(),
                    ts: 1,
                })
                .collect();
            log.append(batch).await.unwrap();
        }
        let reader = Reader::start("test-reader", config.reader().create().unwrap(), None).unwrap();
        let tp = TopicPartition {
            topic: "paused".into(),
            partition: 0,
        };
        let stalled = reader.read(tp.clone(), 0);
        until("the unconsumed read parks its partition", || {
            reader.parked(&tp)
        })
        .await;
        drop(stalled);
        until("the partition nobody reads is unassigned", || {
            reader.position(&tp).is_none()
        })
        .await;
        let mut next = reader.read(tp.clone(), 7_000);
        let got = crate::conformance::take(&mut next, 1_000).await;
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (7_000..8_000).collect::<Vec<u64>>());
    }

    #[test]
    fn a_gap_is_read_again_before_it_is_taken_as_real() {
        let mut r = Dense::new(5);
        assert_eq!(r.offer(5), Take::Record);
        assert_eq!(r.offer(6), Take::Record);
        assert_eq!(r.offer(6), Take::Skip, "taken already");
        assert_eq!(r.offer(9), Take::SeekBack(7), "7 and 8 missing: read again");
        assert_eq!(r.offer(7), Take::Record, "the second read has them");
        assert_eq!(r.offer(8), Take::Record);
        for _ in 0..GAP_RETRIES {
            assert_eq!(r.offer(12), Take::SeekBack(9), "another gap, read again");
        }
        assert_eq!(r.offer(12), Take::Record, "still missing: taken as real");
        assert_eq!(r.offer(13), Take::Record);
        assert_eq!(r.offer(15), Take::SeekBack(14), "a new gap is read again");
    }
}
