//! The append-only, partitioned log that is the source of truth of the chat.
//!
//! One trait, [`EventLog`], for every backend. Backends are cargo features:
//! `embedded` (default; `embedded::EmbeddedLog`, redb with group commit) and
//! `kafka` (`kafka::KafkaLog`, Redpanda/Kafka through librdkafka). The
//! conformance suite every backend passes, and a throwaway test broker, are
//! behind the `testing` feature. A record
//! goes to the partition Kafka's keyed partitioner picks for its key
//! ([`partitioner`]), so every backend agrees on where a room lives.
//!
//! Promises every backend keeps (checked by [`conformance`]):
//! - `append` returns only once the records are durable; their offsets are
//!   dense and increasing per partition, in the order of the batch, and a batch
//!   appended after another one completed gets higher offsets;
//! - `read` yields a partition's records in offset order from the asked
//!   offset, then keeps tailing new ones;
//! - the epoch names this incarnation of the log and never changes while the
//!   log's data lives.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(feature = "embedded")]
pub mod embedded;
#[cfg(feature = "embedded")]
pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod partitioner;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key (the room).
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: u32,
    pub offset: u64,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub partition: u32,
    pub offset: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub ts: i64,
}

/// A tailing read of one partition, in batches of records in offset order.
pub type RecordStream = BoxStream<'static, Result<Vec<LogRecord>, LogError>>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot be reached or is shutting down; nothing was appended.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("log has {found} partitions but {wanted} were asked for; rooms would move, refusing")]
    PartitionMismatch { found: u32, wanted: u32 },
    /// An existing topic would not keep what chat writes to it safely.
    #[error("topic {topic} is not fit to be the log: {}; fix it, or accept it as it is (--log-accept-topic-config)", problems.join("; "))]
    TopicConfig {
        topic: String,
        problems: Vec<String>,
    },
    #[error("partition {partition} out of range (log has {partitions})")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error("log storage error: {0}")]
    Storage(String),
    /// Only the first `appended.len()` records of the batch were appended;
    /// the others were not, for `cause`.
    #[error("{} records appended, the rest not: {cause}", appended.len())]
    Partial {
        appended: Vec<Appended>,
        cause: Box<LogError>,
    },
}

impl LogError {
    /// True when trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            LogError::Unavailable(_) => true,
            LogError::Partial { cause, .. } => cause.is_retriable(),
            _ => false,
        }
    }
}

/// The append-only partitioned log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Number of partitions; fixed for the life of the log.
    fn partitions(&self) -> u32;

    /// Identity of this incarnation of the log.
    fn epoch(&self) -> &str;

    /// The partition a key lives on.
    fn partition_for(&self, key: &[u8]) -> u32 {
        partitioner::partition_for(key, self.partitions())
    }

    /// Appends a batch; returns where each record landed, in batch order,
    /// once all of them are durable. On error nothing was appended, except
    /// what a [`LogError::Partial`] names; an append whose outcome is
    /// unknown (sent, not yet acknowledged) keeps waiting rather than fail.
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError>;

    /// The offset the next record of `partition` will get.
    async fn end_offset(&self, partition: u32) -> Result<u64, LogError>;

    /// The first offset of `partition` the log still holds: 0 until
    /// retention (or a deletion) removed older records, the end offset when
    /// every record is gone. A reader asking for less gets a gap.
    async fn start_offset(&self, partition: u32) -> Result<u64, LogError>;

    /// Whether every partition can be read and appended to now: the
    /// readiness of a node. The default asks each partition's end; a
    /// backend with a cheaper question (Kafka: one metadata request) answers
    /// it instead.
    async fn readable(&self) -> Result<(), LogError> {
        for partition in 0..self.partitions() {
            self.end_offset(partition).await?;
        }
        Ok(())
    }

    /// Reads `partition` from offset `from` on, then tails it.
    fn read(&self, partition: u32, from: u64) -> RecordStream;

    /// An offset of `partition` to start reading at for the records stamped
    /// `ts_ms` (milliseconds since the Unix epoch) or later: no record below
    /// it has a timestamp at or after `ts_ms`. A lower bound, not an exact
    /// seek: a reader still skips, by record timestamp, what is older than
    /// asked (timestamps need not grow with offsets). The default, 0, is
    /// always correct; a backend with a time index answers closer.
    async fn offset_for_time(&self, partition: u32, ts_ms: i64) -> Result<u64, LogError> {
        let _ = (partition, ts_ms);
        Ok(0)
    }

    /// The stored position (next offset to read) of a consumer `group`.
    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError>;

    /// Stores the position (next offset to read) of a consumer `group`.
    async fn store_position(&self, group: &str, partition: u32, next: u64) -> Result<(), LogError>;

    /// Joins consumer `group` and yields the partitions this member owns,
    /// anew after every change. A backend without groups (the embedded log,
    /// which one process owns) yields every partition once.
    fn assignments(&self, group: &str) -> BoxStream<'static, Result<Vec<u32>, LogError>> {
        let _ = group;
        let all: Vec<u32> = (0..self.partitions()).collect();
        futures::stream::once(async move { Ok(all) })
            .chain(futures::stream::pending())
            .boxed()
    }
}
