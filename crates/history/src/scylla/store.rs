//! The history store's algorithm over the Scylla table layout, written once
//! against [`Tables`]: the cluster ([`super::cql::CqlTables`]) in production,
//! an in-memory copy of the tables in tests. What to write and what to read
//! comes from the pure plans in [`super::buckets`].
//!
//! Promises, per the [`HistoryStore`] contract:
//! - `apply` reads the partition's position first and ignores a batch it
//!   covers; otherwise it writes every row, bucket entry and id claim (as
//!   concurrent single-partition requests, at most `concurrency` per call and
//!   `max_in_flight` per store), and only when all of them succeeded writes
//!   the position. A failure leaves the position where it was, so the batch
//!   is applied again, and the same writes land again: harmless.
//! - `page` walks the room's buckets from the cursor down with a
//!   [`PageWalk`], one request at a time, so a page is exact across bucket
//!   boundaries; it shows only rows below the room's partition position, and
//!   `find_id`/`find_ids` only claims below it, so a batch whose position is
//!   not written yet (in flight, or failed) is not seen at all: to readers,
//!   `apply` is atomic, as the trait says.
//! - No lock is held across an await: the only shared state is a semaphore.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use schemas::protocol::MessageView;
use tokio::sync::Semaphore;

use super::buckets::{
    claim_keys, is_visible, plan_apply, Bucketing, Claim, PageWalk, RowBatch, Step,
};
use crate::{Batch, HistoryStore, StoreError, MAX_LISTED};

/// Requests in flight per `apply` or `find_ids` call.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Requests in flight per store, across all calls (one projector task per
/// log partition, gateways reading history).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// A stored claim: where the id's message is, and the room's log partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRow {
    pub offset: i64,
    pub ts: i64,
    pub partition: u32,
}

/// The tables, one operation per request. Each call is one single-partition
/// request (a row batch is one unlogged batch within one partition).
#[async_trait]
pub trait Tables: Send + Sync + 'static {
    async fn position(&self, partition: u32) -> Result<Option<i64>, StoreError>;
    /// The position of every log partition with one (a scan of a table of
    /// partition-count rows).
    async fn positions(&self) -> Result<Vec<i64>, StoreError>;
    /// Writes `next` so that the highest position ever written wins.
    async fn write_position(&self, partition: u32, next: i64) -> Result<(), StoreError>;
    /// The claim of `id` in `room`, covered by a position or not.
    async fn claim(&self, room: &str, id: &str) -> Result<Option<ClaimRow>, StoreError>;
    async fn write_claim(&self, claim: &Claim) -> Result<(), StoreError>;
    /// Lists `bucket` in the index of `room`, whose log partition is
    /// `partition`.
    async fn write_bucket(&self, room: &str, bucket: i64, partition: u32)
        -> Result<(), StoreError>;
    async fn write_rows(&self, batch: &RowBatch) -> Result<(), StoreError>;
    /// Buckets of `room` at most `at_most`, newest first, at most `limit`,
    /// and the room's log partition (when any bucket is listed).
    async fn buckets(
        &self,
        room: &str,
        at_most: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Option<u32>), StoreError>;
    /// Rows of (`room`, `bucket`) with offset below `before`, newest first,
    /// at most `limit`.
    async fn rows(
        &self,
        room: &str,
        bucket: i64,
        before: i64,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError>;
    /// The stored read position of `user` in `room`.
    async fn read_position(&self, room: &str, user: &str) -> Result<Option<i64>, StoreError>;
    /// Writes the read position of `user` in `room` so that the highest
    /// offset ever written wins.
    async fn write_read_position(
        &self,
        room: &str,
        user: &str,
        offset: i64,
    ) -> Result<(), StoreError>;
    /// The read positions of `room`, by user name, at most `limit`.
    async fn read_positions(
        &self,
        room: &str,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// Lists `room` among the rooms of `user`.
    async fn write_member(&self, user: &str, room: &str) -> Result<(), StoreError>;
    /// The rooms listed for `user`, by name, at most `limit`.
    async fn user_rooms(&self, user: &str, limit: usize) -> Result<Vec<String>, StoreError>;
}

/// One write of a plan.
enum Write<'a> {
    Rows(&'a RowBatch),
    Bucket(&'a str, i64, u32),
    Claim(&'a Claim),
    Member(&'a str, &'a str),
    Read(&'a str, &'a str, i64),
}

fn layout(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// A history store over [`Tables`].
pub struct BucketedStore<T> {
    tables: T,
    bucketing: Bucketing,
    concurrency: usize,
    in_flight: Arc<Semaphore>,
}

impl<T: Tables> BucketedStore<T> {
    pub fn new(tables: T, bucketing: Bucketing) -> Self {
        Self::with_limits(
            tables,
            bucketing,
            DEFAULT_CONCURRENCY,
            DEFAULT_MAX_IN_FLIGHT,
        )
    }

    pub fn with_limits(
        tables: T,
        bucketing: Bucketing,
        concurrency: usize,
        max_in_flight: usize,
    ) -> Self {
        BucketedStore {
            tables,
            bucketing,
            concurrency: concurrency.max(1),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    pub fn tables(&self) -> &T {
        &self.tables
    }

    /// Records of the log the store covers: the sum of its partition
    /// positions (what [`crate::versions::VersionInfo::records`] reports).
    pub async fn records(&self) -> Result<u64, StoreError> {
        let positions = {
            let _slot = self.slot().await?;
            self.tables.positions().await?
        };
        Ok(positions
            .into_iter()
            .map(|p| u64::try_from(p).unwrap_or(0))
            .sum())
    }

    /// Waits for a request slot of the store.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        self.in_flight.acquire().await.map_err(layout)
    }

    async fn write(&self, write: Write<'_>) -> Result<(), StoreError> {
        let _slot = self.slot().await?;
        match write {
            Write::Rows(batch) => self.tables.write_rows(batch).await,
            Write::Bucket(room, bucket, partition) => {
                self.tables.write_bucket(room, bucket, partition).await
            }
            Write::Claim(claim) => self.tables.write_claim(claim).await,
            Write::Member(user, room) => self.tables.write_member(user, room).await,
            Write::Read(room, user, offset) => {
                self.tables.write_read_position(room, user, offset).await
            }
        }
    }
    async fn claim(&self, room: &str, id: &str) -> Result<Option<ClaimRow>, StoreError> {
        let _slot = self.slot().await?;
        self.tables.claim(room, id).await
    }

    async fn stored_position(&self, partition: u32) -> Result<Option<i64>, StoreError> {
        let _slot = self.slot().await?;
        self.tables.position(partition).await
    }

    /// The claim of `id` in `room` if a position covers it: (offset, ts).
    async fn visible_claim(&self, room: &str, id: &str) -> Result<Option<(u64, i64)>, StoreError> {
        let Some(claim) = self.claim(room, id).await? else {
            return Ok(None);
        };
        let position = self.stored_position(claim.partition).await?;
        if !is_visible(claim.offset, position) {
            return Ok(None);
        }
        Ok(Some((
            u64::try_from(claim.offset).map_err(layout)?,
            claim.ts,
        )))
    }
}

#[async_trait]
impl<T: Tables> HistoryStore for BucketedStore<T> {
    async fn apply_batch(&self, partition: u32, batch: Batch, next: u64) -> Result<(), StoreError> {
        let Batch {
            messages,
            reads,
            members,
        } = batch;
        let next = i64::try_from(next).map_err(layout)?;
        let stored = self.stored_position(partition).await?;
        if stored.is_some_and(|stored| next <= stored) {
            return Ok(());
        }
        // Claims already stored for the batch's ids (reads, in parallel).
        let lookups: Vec<BoxFuture<'_, Result<_, StoreError>>> = claim_keys(&messages)
            .into_iter()
            .map(|key| {
                async move {
                    let found = self.claim(&key.0, &key.1).await?;
                    Ok(found.map(|claim| (key, claim.offset)))
                }
                .boxed()
            })
            .collect();
        let known: HashMap<(String, String), i64> = futures::stream::iter(lookups)
            .buffer_unordered(self.concurrency)
            .try_filter_map(|hit| async move { Ok(hit) })
            .try_collect()
            .await?;
        let plan = plan_apply(self.bucketing, partition, messages, &known).map_err(layout)?;
        if plan.skipped > 0 {
            metrics::counter!(crate::metrics::DUPLICATE_IDS_TOTAL).increment(plan.skipped as u64);
        }
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> =
            Vec::with_capacity(plan.statements());
        writes.extend(
            plan.batches
                .iter()
                .map(|b| self.write(Write::Rows(b)).boxed()),
        );
        writes.extend(
            plan.buckets
                .iter()
                .map(|(room, bucket)| self.write(Write::Bucket(room, *bucket, partition)).boxed()),
        );
        writes.extend(
            plan.claims
                .iter()
                .map(|c| self.write(Write::Claim(c)).boxed()),
        );
        // The highest read position of each (room, user) in the batch.
        let mut highest: HashMap<(&str, &str), i64> = HashMap::new();
        for r in &reads {
            let offset = i64::try_from(r.offset).map_err(layout)?;
            let slot = highest
                .entry((r.room.as_str(), r.user.as_str()))
                .or_insert(offset);
            *slot = (*slot).max(offset);
        }
        writes.extend(
            highest
                .into_iter()
                .map(|((room, user), offset)| self.write(Write::Read(room, user, offset)).boxed()),
        );
        let members: std::collections::BTreeSet<(&str, &str)> = members
            .iter()
            .map(|(user, room)| (user.as_str(), room.as_str()))
            .collect();
        writes.extend(
            members
                .into_iter()
                .map(|(user, room)| self.write(Write::Member(user, room)).boxed()),
        );
        futures::stream::iter(writes)
            .buffer_unordered(self.concurrency)
            .try_collect::<()>()
            .await?;
        // Only now: every row the position covers is written.
        let _slot = self.slot().await?;
        self.tables.write_position(partition, next).await
    }

    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError> {
        let stored = self.stored_position(partition).await?;
        stored.map(|p| u64::try_from(p).map_err(layout)).transpose()
    }

    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        let mut walk = PageWalk::new(self.bucketing, before, limit);
        loop {
            match walk.next_step() {
                Step::Index { at_most, limit } => {
                    let (buckets, partition) = {
                        let _slot = self.slot().await?;
                        self.tables.buckets(room, at_most, limit).await?
                    };
                    walk.on_index(buckets, partition).map_err(layout)?;
                }
                Step::Position { partition } => {
                    let position = self.stored_position(partition).await?;
                    walk.on_position(position).map_err(layout)?;
                }
                Step::Rows {
                    bucket,
                    before,
                    limit,
                } => {
                    let rows = {
                        let _slot = self.slot().await?;
                        self.tables.rows(room, bucket, before, limit).await?
                    };
                    walk.on_rows(rows).map_err(layout)?;
                }
                Step::Done => return Ok(walk.finish()),
            }
        }
    }

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError> {
        let stored = {
            let _slot = self.slot().await?;
            self.tables.read_position(room, user).await?
        };
        stored.map(|p| u64::try_from(p).map_err(layout)).transpose()
    }

    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = {
            let _slot = self.slot().await?;
            self.tables.read_positions(room, MAX_LISTED).await?
        };
        rows.into_iter()
            .map(|(user, offset)| Ok((user, u64::try_from(offset).map_err(layout)?)))
            .collect()
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let _slot = self.slot().await?;
        self.tables.user_rooms(user, MAX_LISTED).await
    }

    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .visible_claim(room, id)
            .await?
            .map(|(offset, _)| offset))
    }

    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        let lookups: Vec<BoxFuture<'_, Result<Option<(u64, i64)>, StoreError>>> = keys
            .iter()
            .map(|(room, id)| self.visible_claim(room, id).boxed())
            .collect();
        futures::stream::iter(lookups)
            .buffered(self.concurrency)
            .try_collect()
            .await
    }
}
