//! The embedded log as one append-only file per topic, written by one thread
//! that commits many callers' appends together (group commit): each commit
//! is one `pwrite` of every waiting request's entries at the end of the file
//! and one `fdatasync`, then the callers are answered and the readers woken.
//!
//! Why a file and not a B-tree: a log only appends and reads forward, and
//! the redb log paid for a B-tree's commit (page rewrites, checksums, the
//! allocator's state, several dirty pages to write back) on every commit,
//! which at light load is one commit per message. benches/RESULTS.md, "Cost
//! per delivery", has the figures.
//!
//! `TOPIC.log` is a sequence of entries, each `len: u32 | crc32: u32 | body`
//! (little-endian, the CRC over the body), the body a kind byte and its
//! fields:
//! - `1` a record: `partition u32 | offset u64 | ts i64 | key_len u32 | key |
//!   value`;
//! - `2` a consumer group's position: `partition u32 | next u64 | group`;
//! - `3` a deletion (retention, tests only): `partition u32 | before u64`.
//!
//! `TOPIC.meta` holds the log's epoch and partition count, written once when
//! the log is created. Opening reads the whole file once and keeps, per
//! partition, where each record's entry is (12 bytes of memory a record).
//! An entry that does not check out (a torn write of a commit that was
//! never acked) ends the log there and is cut off, but only when it is
//! within the last [`TORN_TAIL_MAX`] bytes: a bad entry further from the
//! end is corruption of acked data, and opening fails instead.
//!
//! Readers read committed entries only: each partition's end offset is
//! published through a `watch` channel after the `fdatasync` of the commit
//! that wrote it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Appended, EventLog, LogError, LogRecord, Record, RecordStream};

/// Requests waiting for the writer; a full queue makes appenders wait.
const WRITE_QUEUE: usize = 4096;
/// Most records one commit takes.
const MAX_COMMIT_RECORDS: usize = 16_384;
/// A commit stops taking requests past this many bytes (a request larger
/// than this goes alone).
const MAX_COMMIT_BYTES: usize = 16 << 20;
/// A bad entry this close to the end of the file is a torn write and is cut
/// off at open; further from the end, opening fails. A commit writes at
/// most [`MAX_COMMIT_BYTES`] plus one request (a gateway's batch of sends
/// is at most 1,024 frames of 64 KiB).
const TORN_TAIL_MAX: u64 = (MAX_COMMIT_BYTES as u64) + (64 << 20) + (1 << 20);
/// Largest entry body accepted at open.
const MAX_ENTRY: u32 = 64 << 20;
/// Under load (a commit within [`BUSY_WITHIN`]) the writer waits this long
/// after the first request for others to join the commit; idle, it commits
/// at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(5);
/// A reader behind the end by at most this many records reads them on the
/// async runtime (one `pread` of pages the commit left in the page cache);
/// further behind, on the blocking pool.
const INLINE_READ_MAX: u64 = 256;
/// Most records one read batch yields.
const READ_BATCH: u64 = 1024;
/// Most bytes of the file one read batch spans (the entries of a partition
/// are interleaved with the others').
const READ_SPAN_MAX: u64 = 1 << 20;

const RECORD: u8 = 1;
const POSITION: u8 = 2;
const DELETE_BEFORE: u8 = 3;
/// `len` and `crc`.
const HEADER: usize = 8;

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
    DeleteBefore {
        partition: u32,
        before: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

impl WriteRequest {
    fn len(&self) -> usize {
        match self {
            WriteRequest::Append { records, .. } => records.len(),
            _ => 1,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            WriteRequest::Append { records, .. } => records
                .iter()
                .map(|r| HEADER + 29 + r.key.len() + r.value.len())
                .sum(),
            WriteRequest::Position { group, .. } => HEADER + 13 + group.len(),
            WriteRequest::DeleteBefore { .. } => HEADER + 13,
        }
    }

    fn fail(self, e: LogError) {
        match self {
            WriteRequest::Append { reply, .. } => {
                let _gone = reply.send(Err(e));
            }
            WriteRequest::Position { reply, .. } | WriteRequest::DeleteBefore { reply, .. } => {
                let _gone = reply.send(Err(e));
            }
        }
    }
}

/// Where the entries of one partition's records are in the file.
#[derive(Default)]
struct Partition {
    /// Offset of the first record held.
    start: u64,
    /// Per record from `start` on: its entry's position and length.
    at: Vec<u64>,
    len: Vec<u32>,
}

impl Partition {
    fn end(&self) -> u64 {
        self.start + self.at.len() as u64
    }

    fn delete_before(&mut self, before: u64) {
        let before = before.min(self.end());
        if before > self.start {
            let n = (before - self.start) as usize;
            self.at.drain(..n);
            self.len.drain(..n);
            self.start = before;
        }
    }
}

#[derive(Default)]
struct Index {
    partitions: Vec<Partition>,
    positions: HashMap<(String, u32), u64>,
}

/// The embedded log in an append-only file. Cheap to share behind an `Arc`.
pub struct FileLog {
    inner: Arc<Inner>,
}

struct Inner {
    file: Arc<File>,
    path: PathBuf,
    epoch: String,
    partitions: u32,
    index: Arc<RwLock<Index>>,
    /// Per partition, the end offset of committed data.
    ends: Vec<watch::Receiver<u64>>,
    writes: Option<mpsc::Sender<WriteRequest>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds and exit.
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _joined = writer.join();
        }
    }
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

/// The log's identity, `TOPIC.meta`.
struct Meta {
    epoch: String,
    partitions: u32,
}

impl Meta {
    fn read(path: &Path) -> Result<Option<Meta>, LogError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage(format!("reading {}: {e}", path.display()))),
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::trim)
                .ok_or_else(|| storage(format!("{} has no {name}", path.display())))
        };
        if field("format")? != "1" {
            return Err(storage(format!("{}: unknown format", path.display())));
        }
        Ok(Some(Meta {
            epoch: field("epoch")?.to_owned(),
            partitions: field("partitions")?.parse().map_err(storage)?,
        }))
    }

    /// Writes the file durably: a temporary file, synced, renamed, and the
    /// directory synced.
    fn create(path: &Path, partitions: u32) -> Result<Meta, LogError> {
        let meta = Meta {
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            partitions,
        };
        let tmp = path.with_extension("meta.tmp");
        let mut f = File::create(&tmp).map_err(storage)?;
        write!(
            f,
            "format=1\nepoch={}\npartitions={}\n",
            meta.epoch, meta.partitions
        )
        .map_err(storage)?;
        f.sync_all().map_err(storage)?;
        std::fs::rename(&tmp, path).map_err(storage)?;
        sync_dir(path)?;
        Ok(meta)
    }
}

fn sync_dir(path: &Path) -> Result<(), LogError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(storage)
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Appends one entry whose body `body` writes; returns its position in
/// `buf` and its length.
fn put_entry(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) -> (usize, u32) {
    let at = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    body(buf);
    let body_len = (buf.len() - at - HEADER) as u32;
    let crc = crc32fast::hash(&buf[at + HEADER..]);
    buf[at..at + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    (at, HEADER as u32 + body_len)
}

/// A reader of the fields of an entry's body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// A decoded entry body.
enum Body<'a> {
    Record {
        partition: u32,
        offset: u64,
        ts: i64,
        key: &'a [u8],
        value: &'a [u8],
    },
    Position {
        partition: u32,
        next: u64,
        group: &'a str,
    },
    DeleteBefore {
        partition: u32,
        before: u64,
    },
}

fn parse_body(body: &[u8]) -> Option<Body<'_>> {
    let mut f = Fields(body);
    match f.u8()? {
        RECORD => {
            let partition = f.u32()?;
            let offset = f.u64()?;
            let ts = f.u64()? as i64;
            let key_len = f.u32()? as usize;
            let key = f.take(key_len)?;
            Some(Body::Record {
                partition,
                offset,
                ts,
                key,
                value: f.rest(),
            })
        }
        POSITION => {
            let partition = f.u32()?;
            let next = f.u64()?;
            let group = std::str::from_utf8(f.rest()).ok()?;
            Some(Body::Position {
                partition,
                next,
                group,
            })
        }
        DELETE_BEFORE => Some(Body::DeleteBefore {
            partition: f.u32()?,
            before: f.u64()?,
        }),
        _ => None,
    }
}

/// Reads every entry of the file into an index; returns it and the length
/// of the good part of the file.
fn recover(
    file: &File,
    path: &Path,
    partitions: u32,
    torn_tail_max: u64,
) -> Result<(Index, u64), LogError> {
    let size = file.metadata().map_err(storage)?.len();
    let mut index = Index {
        partitions: (0..partitions).map(|_| Partition::default()).collect(),
        positions: HashMap::new(),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut body = Vec::new();
    let bad = loop {
        let mut header = [0u8; HEADER];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break (pos < size).then_some("a truncated entry header");
            }
            Err(e) => return Err(storage(e)),
        }
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_ENTRY || pos + (HEADER as u64) + u64::from(len) > size {
            break Some("an entry whose length runs past the end");
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).map_err(storage)?;
        if crc32fast::hash(&body) != crc {
            break Some("an entry whose checksum does not match");
        }
        let entry_len = HEADER as u32 + len;
        match parse_body(&body) {
            Some(Body::Record {
                partition, offset, ..
            }) => {
                let p = index
                    .partitions
                    .get_mut(partition as usize)
                    .filter(|p| p.end() == offset);
                let Some(p) = p else {
                    return Err(storage(format!(
                        "{}: record {partition}/{offset} at byte {pos} is out of order",
                        path.display()
                    )));
                };
                p.at.push(pos);
                p.len.push(entry_len);
            }
            Some(Body::Position {
                partition,
                next,
                group,
            }) => {
                index.positions.insert((group.to_owned(), partition), next);
            }
            Some(Body::DeleteBefore { partition, before }) => {
                if let Some(p) = index.partitions.get_mut(partition as usize) {
                    p.delete_before(before);
                }
            }
            None => break Some("an entry that cannot be read"),
        }
        pos += u64::from(entry_len);
    };
    if let Some(what) = bad {
        let cut = size - pos;
        if cut > torn_tail_max {
            return Err(storage(format!(
                "{}: {what} at byte {pos}, {cut} bytes before the end: the log is corrupt",
                path.display()
            )));
        }
        tracing::warn!(
            path = %path.display(),
            at = pos,
            bytes = cut,
            "cutting off a torn write at the end of the log ({what}); it was never acked"
        );
        file.set_len(pos).map_err(storage)?;
        file.sync_all().map_err(storage)?;
    }
    Ok((index, pos))
}

impl FileLog {
    /// Opens (or creates) the log of `topic` under `dir` with `partitions`
    /// partitions. An existing log with another partition count is an error.
    pub fn open(dir: &Path, topic: &str, partitions: u32) -> Result<Self, LogError> {
        if partitions == 0 {
            return Err(LogError::Storage(
                "a log needs at least one partition".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(storage)?;
        let path = dir.join(format!("{topic}.log"));
        let meta_path = dir.join(format!("{topic}.meta"));
        let meta = match Meta::read(&meta_path)? {
            Some(meta) => meta,
            None if path.exists() => {
                return Err(storage(format!(
                    "{} exists without {}",
                    path.display(),
                    meta_path.display()
                )))
            }
            None => Meta::create(&meta_path, partitions)?,
        };
        if meta.partitions != partitions {
            return Err(LogError::PartitionMismatch {
                found: meta.partitions,
                wanted: partitions,
            });
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(storage)?;
        if !existed {
            sync_dir(&path)?;
        }
        let (index, len) = recover(&file, &path, partitions, TORN_TAIL_MAX)?;
        let next: Vec<u64> = index.partitions.iter().map(Partition::end).collect();
        let (senders, ends): (Vec<_>, Vec<_>) = next.iter().map(|&n| watch::channel(n)).unzip();
        let file = Arc::new(file);
        let index = Arc::new(RwLock::new(index));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            file: file.clone(),
            index: index.clone(),
            partitions,
            next,
            len,
            broken: None,
            ends: senders,
            buf: Vec::new(),
        };
        let writer = std::thread::Builder::new()
            .name(format!("log-writer-{topic}"))
            .spawn(move || writer.run(rx))
            .map_err(storage)?;
        Ok(FileLog {
            inner: Arc::new(Inner {
                file,
                path,
                epoch: meta.epoch,
                partitions,
                index,
                ends,
                writes: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Deletes the records of `partition` below `before`, as a broker's
    /// retention would (the bytes stay in the file; readers and
    /// `start_offset` no longer see them), kept across reopens. Returns once
    /// the deletion is durable. Nothing in chat calls it yet: tests use it
    /// to make gaps.
    pub async fn delete_before(&self, partition: u32, before: u64) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::DeleteBefore {
            partition,
            before,
            reply,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    async fn send(&self, req: WriteRequest) -> Result<(), LogError> {
        let sender = self
            .inner
            .writes
            .as_ref()
            .ok_or_else(|| LogError::Unavailable("log is closed".into()))?;
        sender.send(req).await.map_err(|_| stopped())
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

fn stopped() -> LogError {
    LogError::Unavailable("log writer stopped".into())
}

/// Reads committed records of `partition` in `[from, end)`: at most
/// [`READ_BATCH`] of them, spanning at most [`READ_SPAN_MAX`] bytes of the
/// file (at least one), in one `pread`.
fn read_range(
    inner: &Inner,
    partition: u32,
    from: u64,
    end: u64,
) -> Result<Vec<LogRecord>, LogError> {
    let (first, spans) = {
        let index = inner.index.read().unwrap_or_else(|e| e.into_inner());
        let p = &index.partitions[partition as usize];
        // Below the start is gone (retention): read from the start.
        let from = from.max(p.start);
        let to = end.min(p.end()).min(from.saturating_add(READ_BATCH));
        if from >= to {
            return Ok(Vec::new());
        }
        let (lo, hi) = ((from - p.start) as usize, (to - p.start) as usize);
        let base = p.at[lo];
        let mut spans = Vec::with_capacity(hi - lo);
        for i in lo..hi {
            let (at, len) = (p.at[i], p.len[i]);
            if !spans.is_empty() && at + u64::from(len) - base > READ_SPAN_MAX {
                break;
            }
            spans.push((at - base, len));
        }
        (from, (base, spans))
    };
    let (base, spans) = spans;
    let (last_at, last_len) = *spans.last().expect("at least one entry");
    let mut buf = vec![0u8; (last_at + u64::from(last_len)) as usize];
    inner.file.read_exact_at(&mut buf, base).map_err(storage)?;
    let mut out = Vec::with_capacity(spans.len());
    for (i, (at, len)) in spans.into_iter().enumerate() {
        let offset = first + i as u64;
        let corrupt = || LogError::Storage(format!("corrupt record at {partition}/{offset}"));
        let entry = &buf[at as usize..(at + u64::from(len)) as usize];
        match parse_body(&entry[HEADER..]) {
            Some(Body::Record {
                partition: p,
                offset: o,
                ts,
                key,
                value,
            }) if p == partition && o == offset => out.push(LogRecord {
                partition,
                offset,
                key: key.to_vec(),
                value: value.to_vec(),
                ts,
            }),
            _ => return Err(corrupt()),
        }
    }
    Ok(out)
}

#[async_trait]
impl EventLog for FileLog {
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
        self.send(WriteRequest::Append { records, reply }).await?;
        answer.await.map_err(|_| stopped())?
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        Ok(*self.inner.ends[partition as usize].borrow())
    }

    async fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        let index = self.inner.index.read().unwrap_or_else(|e| e.into_inner());
        let p = &index.partitions[partition as usize];
        let end = *self.inner.ends[partition as usize].borrow();
        Ok(p.start.min(end))
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
                            // The tail just committed: one pread of pages in
                            // the page cache, cheaper here than a round trip
                            // through the blocking pool.
                            read_range(&inner, partition, from, end)
                        } else {
                            let reading = inner.clone();
                            tokio::task::spawn_blocking(move || {
                                read_range(&reading, partition, from, end)
                            })
                            .await
                            .map_err(storage)
                            .and_then(|r| r)
                        };
                        return Some(match batch {
                            Ok(batch) if batch.is_empty() => {
                                // Everything up to the end was deleted.
                                (Ok(batch), (inner, ends, end, false))
                            }
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
    /// when none is), by a scan of the partition's records: there is no
    /// time index, and timestamps need not grow with offsets.
    async fn offset_for_time(&self, partition: u32, ts_ms: i64) -> Result<u64, LogError> {
        self.check_partition(partition)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let end = *inner.ends[partition as usize].borrow();
            let mut from = 0;
            while from < end {
                let batch = read_range(&inner, partition, from, end)?;
                let Some(last) = batch.last() else {
                    return Ok(end);
                };
                from = last.offset + 1;
                if let Some(hit) = batch.iter().find(|r| r.ts >= ts_ms) {
                    return Ok(hit.offset);
                }
            }
            Ok(end)
        })
        .await
        .map_err(storage)?
    }

    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.check_partition(partition)?;
        let index = self.inner.index.read().unwrap_or_else(|e| e.into_inner());
        Ok(index.positions.get(&(group.to_owned(), partition)).copied())
    }

    async fn store_position(&self, group: &str, partition: u32, next: u64) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Position {
            group: group.to_owned(),
            partition,
            next,
            reply,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The one thread that writes the file.
struct Writer {
    file: Arc<File>,
    index: Arc<RwLock<Index>>,
    partitions: u32,
    /// Next offset per partition, as of the last commit.
    next: Vec<u64>,
    /// Length of the file's committed part.
    len: u64,
    /// Set when a failed write could not be undone: nothing more is written.
    broken: Option<String>,
    ends: Vec<watch::Sender<u64>>,
    buf: Vec<u8>,
}

/// What one entry of a commit changes in the index.
enum Change {
    Record {
        partition: u32,
        at: u64,
        len: u32,
    },
    Position {
        group: String,
        partition: u32,
        next: u64,
    },
    DeleteBefore {
        partition: u32,
        before: u64,
    },
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut pending = Vec::new();
        let mut last_commit = std::time::Instant::now() - BUSY_WITHIN;
        while let Some(first) = rx.blocking_recv() {
            let (mut count, mut bytes) = (first.len(), first.bytes());
            pending.push(first);
            if last_commit.elapsed() < BUSY_WITHIN && count < MAX_COMMIT_RECORDS {
                // Under load: let more appends join this commit.
                std::thread::sleep(LINGER);
            }
            while count < MAX_COMMIT_RECORDS && bytes < MAX_COMMIT_BYTES {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.len();
                        bytes += req.bytes();
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

    /// Writes every pending request in one `pwrite`, syncs, and answers
    /// them all.
    fn commit(&mut self, pending: &mut Vec<WriteRequest>) {
        if let Some(why) = &self.broken {
            let why = why.clone();
            for req in pending.drain(..) {
                req.fail(LogError::Unavailable(why.clone()));
            }
            return;
        }
        let mut next = self.next.clone();
        let mut changes = Vec::new();
        let mut placements = Vec::with_capacity(pending.len());
        self.buf.clear();
        for req in pending.iter() {
            let mut placed = Vec::new();
            match req {
                WriteRequest::Append { records, .. } => {
                    placed.reserve(records.len());
                    for r in records {
                        let partition = crate::partitioner::partition_for(&r.key, self.partitions);
                        let offset = next[partition as usize];
                        next[partition as usize] += 1;
                        let (at, len) = put_entry(&mut self.buf, |b| {
                            b.push(RECORD);
                            put_u32(b, partition);
                            put_u64(b, offset);
                            put_u64(b, r.ts as u64);
                            put_u32(b, r.key.len() as u32);
                            b.extend_from_slice(&r.key);
                            b.extend_from_slice(&r.value);
                        });
                        changes.push(Change::Record {
                            partition,
                            at: self.len + at as u64,
                            len,
                        });
                        placed.push(Appended { partition, offset });
                    }
                }
                WriteRequest::Position {
                    group,
                    partition,
                    next: pos,
                    ..
                } => {
                    put_entry(&mut self.buf, |b| {
                        b.push(POSITION);
                        put_u32(b, *partition);
                        put_u64(b, *pos);
                        b.extend_from_slice(group.as_bytes());
                    });
                    changes.push(Change::Position {
                        group: group.clone(),
                        partition: *partition,
                        next: *pos,
                    });
                }
                WriteRequest::DeleteBefore {
                    partition, before, ..
                } => {
                    put_entry(&mut self.buf, |b| {
                        b.push(DELETE_BEFORE);
                        put_u32(b, *partition);
                        put_u64(b, *before);
                    });
                    changes.push(Change::DeleteBefore {
                        partition: *partition,
                        before: *before,
                    });
                }
            }
            placements.push(placed);
        }
        let started = std::time::Instant::now();
        let written = self
            .file
            .write_all_at(&self.buf, self.len)
            .and_then(|()| self.file.sync_data());
        metrics::histogram!(crate::metrics::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if let Err(e) = written {
            tracing::error!(error = %e, "log commit failed");
            // Undo what may have reached the file, so the next commit
            // starts at the end of the committed part.
            if let Err(undo) = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
            {
                let why =
                    format!("the log file could not be repaired after a failed write: {undo}");
                tracing::error!("{why}; refusing further appends");
                self.broken = Some(why);
            }
            for req in pending.drain(..) {
                req.fail(LogError::Unavailable(format!("commit failed: {e}")));
            }
            return;
        }
        self.len += self.buf.len() as u64;
        {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            for change in changes {
                match change {
                    Change::Record { partition, at, len } => {
                        let p = &mut index.partitions[partition as usize];
                        p.at.push(at);
                        p.len.push(len);
                    }
                    Change::Position {
                        group,
                        partition,
                        next,
                    } => {
                        index.positions.insert((group, partition), next);
                    }
                    Change::DeleteBefore { partition, before } => {
                        index.partitions[partition as usize].delete_before(before);
                    }
                }
            }
        }
        for (p, (&old, &new)) in self.next.iter().zip(&next).enumerate() {
            if new != old {
                self.ends[p].send_replace(new);
            }
        }
        self.next = next;
        for (req, placed) in pending.drain(..).zip(placements) {
            // A caller that went away still had its records committed.
            match req {
                WriteRequest::Append { reply, .. } => {
                    let _gone = reply.send(Ok(placed));
                }
                WriteRequest::Position { reply, .. } | WriteRequest::DeleteBefore { reply, .. } => {
                    let _gone = reply.send(Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
    }

    #[async_trait]
    impl crate::conformance::LogHarness for Harness {
        async fn fresh(&self, partitions: u32) -> (Arc<dyn EventLog>, String) {
            let dir = tempfile::tempdir().unwrap();
            let location = dir.path().to_str().unwrap().to_owned();
            self.dirs.lock().unwrap().push(dir);
            let log = FileLog::open(Path::new(&location), "chat.messages", partitions).unwrap();
            (Arc::new(log), location)
        }

        async fn reopen(
            &self,
            location: &str,
            partitions: u32,
        ) -> Result<Arc<dyn EventLog>, LogError> {
            let log = FileLog::open(Path::new(location), "chat.messages", partitions)?;
            Ok(Arc::new(log))
        }
    }

    fn harness() -> Harness {
        Harness {
            dirs: std::sync::Mutex::new(Vec::new()),
        }
    }

    crate::log_conformance_suite!(harness());

    fn records(n: u8) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                key: b"room".to_vec(),
                value: vec![i; 10],
                ts: i64::from(i),
            })
            .collect()
    }

    async fn all(log: &FileLog, partition: u32) -> Vec<LogRecord> {
        let end = log.end_offset(partition).await.unwrap();
        let start = log.start_offset(partition).await.unwrap();
        let mut read = log.read(partition, start);
        crate::conformance::take(&mut read, (end - start) as usize).await
    }

    /// A torn write at the end (a commit that was never acked) is cut off
    /// at open, and appends go on after the good part.
    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        log.append(records(5)).await.unwrap();
        let path = log.path().to_owned();
        drop(log);
        let good = std::fs::metadata(&path).unwrap().len();
        for torn in [
            &[7u8, 0, 0][..],
            &[40, 0, 0, 0, 1, 2, 3, 4, 1, 0][..],
            &[0; 100][..],
        ] {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(torn).unwrap();
            drop(f);
            let log = FileLog::open(dir.path(), "t", 1).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
            assert_eq!(log.end_offset(0).await.unwrap(), 5);
            assert_eq!(all(&log, 0).await.len(), 5);
        }
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        let placed = log.append(records(2)).await.unwrap();
        assert_eq!(placed[0].offset, 5);
        drop(log);
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        let got = all(&log, 0).await;
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
        assert_eq!(got[6].value, vec![1; 10]);
    }

    /// A bad byte in a record is corruption, not a torn write, when more of
    /// the log follows it than one commit writes: opening fails rather than
    /// cut acked records off. Within a commit's length of the end it is a
    /// torn write, cut off with what follows.
    #[tokio::test]
    async fn a_bad_checksum_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        log.append(records(3)).await.unwrap();
        let path = log.path().to_owned();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let err = recover(&file, &path, 1, 10)
            .err()
            .expect("corrupt, not torn");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            bytes.len() as u64,
            "nothing cut"
        );
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        assert_eq!(
            log.end_offset(0).await.unwrap(),
            2,
            "the bad last record is cut off"
        );
    }

    #[tokio::test]
    async fn deletions_move_the_start_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        log.append(records(10)).await.unwrap();
        log.delete_before(0, 4).await.unwrap();
        assert_eq!(log.start_offset(0).await.unwrap(), 4);
        let got = all(&log, 0).await;
        assert_eq!(got.first().map(|r| r.offset), Some(4));
        let mut from_zero = log.read(0, 0);
        let first = crate::conformance::take(&mut from_zero, 1).await;
        assert_eq!(first[0].offset, 4, "below the start reads from the start");
        drop(from_zero);
        drop(log);
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        assert_eq!(log.start_offset(0).await.unwrap(), 4);
        assert_eq!(log.end_offset(0).await.unwrap(), 10);
        log.delete_before(0, 10).await.unwrap();
        drop(log);
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
        assert_eq!(log.start_offset(0).await.unwrap(), 10, "all gone: the end");
        let placed = log.append(records(1)).await.unwrap();
        assert_eq!(placed[0].offset, 10, "offsets go on from the end");
    }

    #[tokio::test]
    async fn offset_for_time_is_the_first_record_at_or_after_the_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), "t", 1).unwrap();
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
    }

    /// A read spanning more of the file than one pread takes comes in
    /// several batches, none of them missing a record.
    #[tokio::test]
    async fn large_records_are_read_in_bounded_spans() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), "t", 2).unwrap();
        let big: Vec<Record> = (0..40u32)
            .map(|i| Record {
                key: format!("room{}", i % 3).into_bytes(),
                value: vec![i as u8; 100_000],
                ts: 0,
            })
            .collect();
        let placed = log.append(big).await.unwrap();
        for p in 0..2 {
            let want: Vec<u64> = placed
                .iter()
                .filter(|a| a.partition == p)
                .map(|a| a.offset)
                .collect();
            let got = all(&log, p).await;
            assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
            assert!(got.iter().all(|r| r.value.len() == 100_000));
        }
    }
}
