//! The embedded log: one redb database per topic, written by one thread that
//! commits many callers' appends together (group commit).
//!
//! Appends travel over a bounded queue to the writer thread (full queue
//! policy: the caller waits). The writer takes every request waiting, writes
//! them in one transaction, commits it durably (fsync), then answers each
//! caller and wakes the readers. One commit thus serves many connections.
//!
//! Readers read committed data only: each partition's end offset is published
//! through a `watch` channel after the commit that wrote it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Appended, EventLog, LogError, LogRecord, Record, RecordStream};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const RECORDS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("records");
const POSITIONS: TableDefinition<(&str, u32), u64> = TableDefinition::new("positions");

/// Requests waiting for the writer; a full queue makes appenders wait.
const WRITE_QUEUE: usize = 4096;
/// Most records one commit takes; bounds a transaction's memory.
const MAX_COMMIT_RECORDS: usize = 16_384;
/// A commit costs about the same CPU and an fsync whatever it holds, so
/// under load the writer waits this long after the first request for others
/// to join it; idle (no commit within [`BUSY_WITHIN`]) it commits at once.
/// Measured in benches/RESULTS.md: without it a stream of small appends got
/// one commit each.
/// A reader behind the end by at most this many records reads them on the
/// async runtime; further behind (catching up, replaying), on the blocking
/// pool.
const INLINE_READ_MAX: u64 = 256;
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(5);
/// Most records one read batch yields.
const READ_BATCH: u64 = 1024;

enum WriteRequest {
    Append {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
    },
    Position {
        group: String,
        partition: u32,
        next: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

/// Embedded log backend. Cheap to share behind an `Arc`.
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    epoch: String,
    partitions: u32,
    /// Per partition, the end offset of committed data.
    ends: Vec<watch::Receiver<u64>>,
    writes: Option<mpsc::Sender<WriteRequest>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds and exit;
        // joining it releases the database file for the next open.
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _joined = writer.join();
        }
    }
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

fn encode_record(ts: i64, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(12 + key.len() + value.len());
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    buf
}

fn decode_record(partition: u32, offset: u64, raw: &[u8]) -> Result<LogRecord, LogError> {
    let corrupt = || LogError::Storage(format!("corrupt record at {partition}/{offset}"));
    let ts = i64::from_le_bytes(raw.get(0..8).ok_or_else(corrupt)?.try_into().unwrap());
    let key_len = u32::from_le_bytes(raw.get(8..12).ok_or_else(corrupt)?.try_into().unwrap());
    let key_end = 12usize.checked_add(key_len as usize).ok_or_else(corrupt)?;
    let key = raw.get(12..key_end).ok_or_else(corrupt)?.to_vec();
    Ok(LogRecord {
        partition,
        offset,
        key,
        value: raw[key_end..].to_vec(),
        ts,
    })
}

impl EmbeddedLog {
    /// Opens (or creates) the log of `topic` under `dir` with `partitions`
    /// partitions. An existing log with another partition count is an error.
    pub fn open(dir: &Path, topic: &str, partitions: u32) -> Result<Self, LogError> {
        if partitions == 0 {
            return Err(LogError::Storage(
                "a log needs at least one partition".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(storage)?;
        let path = dir.join(format!("{topic}.redb"));
        let db = Database::create(&path).map_err(storage)?;
        let (epoch, found) = Self::init_meta(&db, partitions)?;
        if found != partitions {
            return Err(LogError::PartitionMismatch {
                found,
                wanted: partitions,
            });
        }
        let next = Self::recover_ends(&db, partitions)?;
        let (senders, ends): (Vec<_>, Vec<_>) = next.iter().map(|&n| watch::channel(n)).unzip();
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            db: db.clone(),
            partitions,
            next,
            ends: senders,
        };
        let writer = std::thread::Builder::new()
            .name(format!("log-writer-{topic}"))
            .spawn(move || writer.run(rx))
            .map_err(storage)?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                path,
                epoch,
                partitions,
                ends,
                writes: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Reads the log's identity, creating it on first open.
    fn init_meta(db: &Database, partitions: u32) -> Result<(String, u32), LogError> {
        let txn = db.begin_write().map_err(storage)?;
        let result = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let epoch = meta
                .get("epoch")
                .map_err(storage)?
                .map(|v| v.value().to_owned());
            let found = meta
                .get("partitions")
                .map_err(storage)?
                .map(|v| v.value().parse::<u32>().map_err(storage))
                .transpose()?;
            match (epoch, found) {
                (Some(epoch), Some(found)) => (epoch, found),
                _ => {
                    let epoch = uuid::Uuid::new_v4().simple().to_string();
                    meta.insert("epoch", epoch.as_str()).map_err(storage)?;
                    meta.insert("partitions", partitions.to_string().as_str())
                        .map_err(storage)?;
                    (epoch, partitions)
                }
            }
        };
        txn.open_table(RECORDS).map_err(storage)?;
        txn.open_table(POSITIONS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(result)
    }

    fn recover_ends(db: &Database, partitions: u32) -> Result<Vec<u64>, LogError> {
        let txn = db.begin_read().map_err(storage)?;
        let records = txn.open_table(RECORDS).map_err(storage)?;
        (0..partitions)
            .map(|p| {
                let last = records
                    .range((p, 0)..=(p, u64::MAX))
                    .map_err(storage)?
                    .next_back()
                    .transpose()
                    .map_err(storage)?;
                Ok(last.map_or(0, |(k, _)| k.value().1 + 1))
            })
            .collect()
    }

    /// Deletes the records of `partition` below `before`, as retention
    /// would: a test-only stand-in for a broker's retention or
    /// `DeleteRecords`, so tests can resume from before the first retained
    /// offset. Blocks until the deletion is committed.
    #[cfg(any(test, feature = "testing"))]
    pub fn delete_before(&self, partition: u32, before: u64) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let txn = self.inner.db.begin_write().map_err(storage)?;
        {
            let mut records = txn.open_table(RECORDS).map_err(storage)?;
            records
                .retain_in((partition, 0)..(partition, before), |_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Runs `scan` on the blocking pool over the committed records of
    /// `partition` in offset order, with the partition's end offset.
    async fn scan_committed<T: Send + 'static>(
        &self,
        partition: u32,
        scan: impl FnOnce(redb::Range<'_, (u32, u64), &'static [u8]>, u64) -> Result<T, LogError>
            + Send
            + 'static,
    ) -> Result<T, LogError> {
        self.check_partition(partition)?;
        let end = *self.inner.ends[partition as usize].borrow();
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let records = txn.open_table(RECORDS).map_err(storage)?;
            let range = records
                .range((partition, 0)..(partition, end))
                .map_err(storage)?;
            scan(range, end)
        })
        .await
        .map_err(storage)?
    }

    fn sender(&self) -> Result<&mpsc::Sender<WriteRequest>, LogError> {
        self.inner
            .writes
            .as_ref()
            .ok_or_else(|| LogError::Unavailable("log is closed".into()))
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        if partition >= self.inner.partitions {
            return Err(LogError::NoSuchPartition {
                partition,
                partitions: self.inner.partitions,
            });
        }
        Ok(())
    }
}

/// Reads committed records of one partition in `[from, end)`, at most
/// `READ_BATCH` of them.
fn read_range(
    db: &Database,
    partition: u32,
    from: u64,
    end: u64,
) -> Result<Vec<LogRecord>, LogError> {
    let to = end.min(from.saturating_add(READ_BATCH));
    let txn = db.begin_read().map_err(storage)?;
    let records = txn.open_table(RECORDS).map_err(storage)?;
    let mut out = Vec::with_capacity((to - from) as usize);
    for entry in records
        .range((partition, from)..(partition, to))
        .map_err(storage)?
    {
        let (k, v) = entry.map_err(storage)?;
        out.push(decode_record(partition, k.value().1, v.value())?);
    }
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(WriteRequest::Append { records, reply })
            .await
            .map_err(|_| LogError::Unavailable("log writer stopped".into()))?;
        answer
            .await
            .map_err(|_| LogError::Unavailable("log writer stopped".into()))?
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        Ok(*self.inner.ends[partition as usize].borrow())
    }

    async fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.scan_committed(partition, |mut records, end| {
            let first = records.next().transpose().map_err(storage)?;
            Ok(first.map_or(end, |(k, _)| k.value().1))
        })
        .await
    }

    fn read(&self, partition: u32, from: u64) -> RecordStream {
        if let Err(e) = self.check_partition(partition) {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        let inner = self.inner.clone();
        let ends = inner.ends[partition as usize].clone();
        futures::stream::unfold(
            (inner, ends, from, false),
            move |(inner, mut ends, from, failed)| async move {
                if failed {
                    return None;
                }
                loop {
                    let end = *ends.borrow_and_update();
                    if from < end {
                        let batch = if end - from <= INLINE_READ_MAX {
                            // The tail just committed: a few records, in
                            // pages the commit left in memory. Reading them
                            // here costs microseconds; a blocking-pool
                            // round trip per commit and per reader cost more
                            // CPU than the rest of the pipeline (RESULTS.md).
                            read_range(&inner.db, partition, from, end)
                        } else {
                            let db = inner.db.clone();
                            tokio::task::spawn_blocking(move || {
                                read_range(&db, partition, from, end)
                            })
                            .await
                            .map_err(storage)
                            .and_then(|r| r)
                        };
                        return Some(match batch {
                            Ok(batch) => {
                                let next = batch.last().map_or(end, |r| r.offset + 1);
                                (Ok(batch), (inner, ends, next, false))
                            }
                            Err(e) => (Err(e), (inner, ends, from, true)),
                        });
                    }
                    if ends.changed().await.is_err() {
                        // The writer is gone: no more data will come.
                        return None;
                    }
                }
            },
        )
        .boxed()
    }

    /// The first offset whose record is stamped `ts_ms` or later (the end
    /// when none is), found by a scan of the partition's timestamps: there is
    /// no time index, and timestamps need not grow with offsets, so a binary
    /// search could skip a late-stamped record.
    async fn offset_for_time(&self, partition: u32, ts_ms: i64) -> Result<u64, LogError> {
        self.scan_committed(partition, move |records, end| {
            for entry in records {
                let (k, v) = entry.map_err(storage)?;
                let ts = v
                    .value()
                    .get(0..8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("an 8-byte slice")));
                if ts.is_none_or(|ts| ts >= ts_ms) {
                    // A record too short to hold a timestamp is not skipped.
                    return Ok(k.value().1);
                }
            }
            Ok(end)
        })
        .await
    }

    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.check_partition(partition)?;
        let db = self.inner.db.clone();
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let positions = txn.open_table(POSITIONS).map_err(storage)?;
            let value = positions
                .get((group.as_str(), partition))
                .map_err(storage)?
                .map(|v| v.value());
            Ok(value)
        })
        .await
        .map_err(storage)?
    }

    async fn store_position(&self, group: &str, partition: u32, next: u64) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(WriteRequest::Position {
                group: group.to_owned(),
                partition,
                next,
                reply,
            })
            .await
            .map_err(|_| LogError::Unavailable("log writer stopped".into()))?;
        answer
            .await
            .map_err(|_| LogError::Unavailable("log writer stopped".into()))?
    }
}

/// The one thread that writes the database.
struct Writer {
    db: Arc<Database>,
    partitions: u32,
    /// Next offset per partition, as of the last commit.
    next: Vec<u64>,
    ends: Vec<watch::Sender<u64>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut pending = Vec::new();
        let mut last_commit = std::time::Instant::now() - BUSY_WITHIN;
        while let Some(first) = rx.blocking_recv() {
            let mut count = first.len();
            pending.push(first);
            if last_commit.elapsed() < BUSY_WITHIN && count < MAX_COMMIT_RECORDS {
                // Under load: let more appends join this commit.
                std::thread::sleep(LINGER);
            }
            while count < MAX_COMMIT_RECORDS {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.len();
                        pending.push(req);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut pending);
            last_commit = std::time::Instant::now();
            metrics::counter!(crate::metrics::COMMITS_TOTAL).increment(1);
            metrics::histogram!(crate::metrics::COMMIT_RECORDS).record(count as f64);
        }
    }

    /// Writes every pending request in one transaction and answers them all.
    fn commit(&mut self, pending: &mut Vec<WriteRequest>) {
        let mut next = self.next.clone();
        let result = self.write(pending, &mut next);
        match result {
            Ok(placements) => {
                for (p, (&old, &new)) in self.next.iter().zip(&next).enumerate() {
                    if new != old {
                        self.ends[p].send_replace(new);
                    }
                }
                self.next = next;
                for (req, placed) in pending.drain(..).zip(placements) {
                    match req {
                        WriteRequest::Append { reply, .. } => {
                            // A caller that went away still had its records committed.
                            let _gone = reply.send(Ok(placed));
                        }
                        WriteRequest::Position { reply, .. } => {
                            let _gone = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "log commit failed");
                for req in pending.drain(..) {
                    let err = LogError::Unavailable(format!("commit failed: {e}"));
                    match req {
                        WriteRequest::Append { reply, .. } => {
                            let _gone = reply.send(Err(err));
                        }
                        WriteRequest::Position { reply, .. } => {
                            let _gone = reply.send(Err(err));
                        }
                    }
                }
            }
        }
    }

    fn write(
        &self,
        pending: &[WriteRequest],
        next: &mut [u64],
    ) -> Result<Vec<Vec<Appended>>, LogError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let mut placements = Vec::with_capacity(pending.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(storage)?;
            let mut positions = txn.open_table(POSITIONS).map_err(storage)?;
            for req in pending {
                match req {
                    WriteRequest::Append { records: batch, .. } => {
                        let mut placed = Vec::with_capacity(batch.len());
                        for r in batch {
                            let partition =
                                crate::partitioner::partition_for(&r.key, self.partitions);
                            let offset = next[partition as usize];
                            next[partition as usize] += 1;
                            let raw = encode_record(r.ts, &r.key, &r.value);
                            records
                                .insert((partition, offset), raw.as_slice())
                                .map_err(storage)?;
                            placed.push(Appended { partition, offset });
                        }
                        placements.push(placed);
                    }
                    WriteRequest::Position {
                        group,
                        partition,
                        next: pos,
                        ..
                    } => {
                        positions
                            .insert((group.as_str(), *partition), *pos)
                            .map_err(storage)?;
                        placements.push(Vec::new());
                    }
                }
            }
        }
        txn.commit().map_err(storage)?;
        Ok(placements)
    }
}

impl WriteRequest {
    fn len(&self) -> usize {
        match self {
            WriteRequest::Append { records, .. } => records.len(),
            WriteRequest::Position { .. } => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded backend passes the log conformance suite.
    struct Harness {
        dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
    }

    #[async_trait]
    impl crate::conformance::LogHarness for Harness {
        async fn fresh(&self, partitions: u32) -> (Arc<dyn EventLog>, String) {
            let dir = tempfile::tempdir().unwrap();
            let location = dir.path().to_str().unwrap().to_owned();
            self.dirs.lock().unwrap().push(dir);
            let log = EmbeddedLog::open(Path::new(&location), "chat.messages", partitions).unwrap();
            (Arc::new(log), location)
        }

        async fn reopen(
            &self,
            location: &str,
            partitions: u32,
        ) -> Result<Arc<dyn EventLog>, LogError> {
            let log = EmbeddedLog::open(Path::new(location), "chat.messages", partitions)?;
            Ok(Arc::new(log))
        }
    }

    fn harness() -> Harness {
        Harness {
            dirs: std::sync::Mutex::new(Vec::new()),
        }
    }

    crate::log_conformance_suite!(harness());

    /// The test-only retention: what is deleted is gone from reads, and the
    /// start offset says where the partition now begins.
    #[tokio::test]
    async fn deleting_old_records_moves_the_start_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), "t", 1).unwrap();
        let records = (0..10)
            .map(|i| Record {
                key: b"k".to_vec(),
                value: vec![i],
                ts: 0,
            })
            .collect();
        log.append(records).await.unwrap();
        log.delete_before(0, 4).unwrap();
        assert_eq!(log.start_offset(0).await.unwrap(), 4);
        assert_eq!(log.end_offset(0).await.unwrap(), 10);
        let mut read = log.read(0, 4);
        let got = crate::conformance::take(&mut read, 6).await;
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (4..10).collect::<Vec<_>>()
        );
        log.delete_before(0, 10).unwrap();
        assert_eq!(log.start_offset(0).await.unwrap(), 10, "all gone: the end");
    }

    #[tokio::test]
    async fn offset_for_time_is_the_first_record_at_or_after_the_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), "chat.messages", 1).unwrap();
        // Timestamps need not grow with offsets: 30 at offset 1, 15 at 2.
        let stamps = [10, 30, 15, 40];
        let records = stamps
            .iter()
            .map(|&ts| Record {
                key: b"room".to_vec(),
                value: vec![1],
                ts,
            })
            .collect();
        log.append(records).await.unwrap();
        for (ts, want) in [(0, 0), (10, 0), (11, 1), (20, 1), (31, 3), (40, 3), (41, 4)] {
            assert_eq!(log.offset_for_time(0, ts).await.unwrap(), want, "ts {ts}");
        }
        assert!(log.offset_for_time(1, 0).await.is_err());
    }

    #[test]
    fn record_encoding_round_trips_and_rejects_truncation() {
        let raw = encode_record(-5, b"room", b"value");
        let r = decode_record(1, 2, &raw).unwrap();
        assert_eq!(
            (r.ts, r.key.as_slice(), r.value.as_slice()),
            (-5, &b"room"[..], &b"value"[..])
        );
        assert!(decode_record(1, 2, &raw[..10]).is_err());
        assert!(decode_record(1, 2, &raw[..13]).is_err());
    }
}
