//! The history store's algorithm over the Scylla table layout, written once
//! against [`Tables`]: the cluster ([`super::cql::CqlTables`]) in production,
//! an in-memory copy of the tables in tests. What to write and what to read
//! comes from the pure plans in [`super::buckets`].
//!
//! Promises, per the [`HistoryStore`] contract:
//! - `apply` reads the partition's position first and ignores a batch it
//!   covers; otherwise it writes every row, change row, bucket entry and id
//!   claim (as concurrent single-partition requests, at most `concurrency`
//!   per call and `max_in_flight` per store), and only when all of them
//!   succeeded writes the position. A failure leaves the position where it
//!   was, so the batch is applied again, and the same writes land again:
//!   harmless. No write reads first, except for a delete: the message's row
//!   (for its author, when the message is not in the batch) and the changes
//!   kept for it (for the edits whose bodies to erase), one single-partition
//!   read each; and for an edit of a message not in the batch: its row (an
//!   edit of a message its author deleted keeps no body either).
//! - `page` walks the room's buckets from the cursor down with a
//!   [`PageWalk`], one request at a time, so a page is exact across bucket
//!   boundaries, then reads the changes kept for the page's messages (one
//!   request per bucket of the page, concurrently) and folds them in. It
//!   shows only rows and changes below the room's partition position, and
//!   `find_id`/`find_ids` only claims below it, so a batch whose position is
//!   not written yet (in flight, or failed) is not seen: to readers, `apply`
//!   is atomic, as the trait says, with one exception. A message deleted by
//!   its author shows as a tombstone once its body is erased, which an
//!   apply does before its position: like a read position, that is true
//!   either way, since the delete is on the log and its batch is applied
//!   before anything after it.
//! - `changes_between` finds the room's buckets in the range from the room
//!   index (where the bucket of each change's own offset is listed), reads
//!   the position, then the `room_changes` slice of each bucket below it
//!   (concurrently, in order), so it too shows only what a completed batch
//!   covers.
//! - No lock is held across an await: the only shared state is a semaphore.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use schemas::protocol::MessageView;
use tokio::sync::Semaphore;

use super::buckets::{
    change_reads, claim_keys, fold_page, fold_page_as_of, is_visible, listed_changes, plan_apply,
    Bucketing, ChangeBatch, ChangeRow, Claim, Deletion, Edited, IndexScan, PageWalk, RowBatch,
    Span, Step, WritePlan, INDEX_PAGE,
};
use crate::{AsOf, Batch, ChangeMark, HistoryStore, PastMessage, StoreError, MAX_LISTED};

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
    /// Erases the body of the message of (`room`, `bucket`) at `offset`.
    async fn erase_body(&self, room: &str, bucket: i64, offset: i64) -> Result<(), StoreError>;
    async fn write_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError>;
    /// Change rows of (`room`, `bucket`) whose target is in `first..=last`,
    /// by target, then by offset; every one of them (a large answer comes in
    /// pages).
    async fn changes(
        &self,
        room: &str,
        bucket: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<ChangeRow>, StoreError>;
    /// Erases the body of the edit of (`room`, `bucket`) at `offset` of the
    /// message at `target`.
    async fn erase_edit(
        &self,
        room: &str,
        bucket: i64,
        target: i64,
        offset: i64,
    ) -> Result<(), StoreError>;
    /// Writes change rows by their own offset (`room_changes`): `batch` is
    /// one partition (room, bucket of the changes' offsets).
    async fn write_room_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError>;
    /// `room_changes` rows of (`room`, `bucket`) with offset in
    /// `from..upto`, by offset; every one of them (a large answer comes in
    /// pages).
    async fn room_changes(
        &self,
        room: &str,
        bucket: i64,
        from: i64,
        upto: i64,
    ) -> Result<Vec<ChangeRow>, StoreError>;
    /// Erases the body of the edit of (`room`, `bucket`) at `offset` in
    /// `room_changes` (`bucket`: of the edit's own offset).
    async fn erase_room_edit(&self, room: &str, bucket: i64, offset: i64)
        -> Result<(), StoreError>;
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
    Changes(&'a ChangeBatch),
    RoomChanges(&'a ChangeBatch),
    EraseBody(&'a str, i64, i64),
    EraseEdit(&'a str, i64, i64, i64),
    EraseRoomEdit(&'a str, i64, i64),
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
            Write::Changes(batch) => self.tables.write_changes(batch).await,
            Write::RoomChanges(batch) => self.tables.write_room_changes(batch).await,
            Write::EraseBody(room, bucket, offset) => {
                self.tables.erase_body(room, bucket, offset).await
            }
            Write::EraseEdit(room, bucket, target, offset) => {
                self.tables.erase_edit(room, bucket, target, offset).await
            }
            Write::EraseRoomEdit(room, bucket, offset) => {
                self.tables.erase_room_edit(room, bucket, offset).await
            }
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

    /// For a message deleted in `plan`: its author (`None`: no message of
    /// the room there) and the changes already kept for it, read unless the
    /// message is in the batch (then its changes are all in the plan too: a
    /// failed attempt of the batch wrote the same rows).
    async fn deleted(
        &self,
        plan: &WritePlan,
        d: &Deletion,
    ) -> Result<(Option<String>, Vec<ChangeRow>), StoreError> {
        if let Some(m) = plan.message(&d.room, d.target) {
            return Ok((Some(m.user.clone()), Vec::new()));
        }
        let bucket = self.bucketing.bucket_of(d.target);
        let row = {
            let _slot = self.slot().await?;
            self.tables
                .rows(&d.room, bucket, d.target.saturating_add(1), 1)
                .await?
        };
        let Some(author) = row
            .into_iter()
            .find(|m| m.offset == d.target)
            .map(|m| m.user)
        else {
            return Ok((None, Vec::new()));
        };
        let _slot = self.slot().await?;
        let kept = self
            .tables
            .changes(&d.room, bucket, d.target, d.target)
            .await?;
        Ok((Some(author), kept))
    }

    /// Whether the message edited in `e` is deleted (its body erased by an
    /// earlier batch): one single-partition read.
    async fn edited_is_deleted(&self, e: &Edited) -> Result<bool, StoreError> {
        let bucket = self.bucketing.bucket_of(e.target);
        let _slot = self.slot().await?;
        let row = self
            .tables
            .rows(&e.room, bucket, e.target.saturating_add(1), 1)
            .await?;
        Ok(row.iter().any(|m| m.offset == e.target && m.deleted))
    }

    /// Every change kept for `rows` of `room` (oldest first): one read per
    /// bucket, concurrently.
    async fn changes_of<'a>(
        &self,
        room: &str,
        rows: impl IntoIterator<Item = &'a MessageView>,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        let reads: Vec<BoxFuture<'_, Result<Vec<ChangeRow>, StoreError>>> =
            change_reads(self.bucketing, rows)
                .into_iter()
                .map(|(bucket, first, last)| {
                    async move {
                        let _slot = self.slot().await?;
                        self.tables.changes(room, bucket, first, last).await
                    }
                    .boxed()
                })
                .collect();
        let changes: Vec<Vec<ChangeRow>> = futures::stream::iter(reads)
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        Ok(changes.concat())
    }

    /// The rows of a page, as stored, and the position bounding them
    /// (`None` when no row can show).
    async fn walk(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<MessageView>, Option<i64>), StoreError> {
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
                Step::Done => {
                    let position = walk.position();
                    return Ok((walk.finish(), position));
                }
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
            changes,
        } = batch;
        let next = i64::try_from(next).map_err(layout)?;
        let stored = self.stored_position(partition).await?;
        if stored.is_some_and(|stored| next <= stored) {
            return Ok(());
        }
        // Claims already stored for the batch's ids (reads, in parallel).
        let lookups: Vec<BoxFuture<'_, Result<_, StoreError>>> = claim_keys(&messages, &changes)
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
        let mut plan =
            plan_apply(self.bucketing, partition, messages, changes, &known).map_err(layout)?;
        // Deletes: whose message, and which edits, to erase (rare: reads).
        let deletions = plan.deletions.clone();
        let found: Vec<_> = {
            let plan = &plan;
            let reads: Vec<BoxFuture<'_, Result<_, StoreError>>> = deletions
                .iter()
                .map(|d| self.deleted(plan, d).boxed())
                .collect();
            futures::stream::iter(reads)
                .buffered(self.concurrency)
                .try_collect()
                .await?
        };
        for (d, (author, kept)) in deletions.iter().zip(found) {
            plan.erase(&d.room, d.target, author.as_deref(), &kept);
        }
        // Edits of messages of earlier batches: none keeps a body if its
        // message was deleted (rare: the gateway refuses such edits, but two
        // can race).
        let edited = plan.edited.clone();
        let gone: Vec<bool> = {
            let reads: Vec<BoxFuture<'_, Result<bool, StoreError>>> = edited
                .iter()
                .map(|e| self.edited_is_deleted(e).boxed())
                .collect();
            futures::stream::iter(reads)
                .buffered(self.concurrency)
                .try_collect()
                .await?
        };
        for (e, gone) in edited.iter().zip(gone) {
            if gone {
                plan.erase_edits_of(&e.room, e.target);
            }
        }
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
        writes.extend(
            plan.changes
                .iter()
                .map(|b| self.write(Write::Changes(b)).boxed()),
        );
        writes.extend(
            plan.room_changes
                .iter()
                .map(|b| self.write(Write::RoomChanges(b)).boxed()),
        );
        writes.extend(plan.erase_bodies.iter().map(|(room, bucket, offset)| {
            self.write(Write::EraseBody(room, *bucket, *offset)).boxed()
        }));
        writes.extend(
            plan.erase_edits
                .iter()
                .map(|(room, bucket, target, offset)| {
                    self.write(Write::EraseEdit(room, *bucket, *target, *offset))
                        .boxed()
                }),
        );
        writes.extend(plan.erase_room_edits.iter().map(|(room, bucket, offset)| {
            self.write(Write::EraseRoomEdit(room, *bucket, *offset))
                .boxed()
        }));
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
        let (rows, position) = self.walk(room, before, limit).await?;
        let Some(position) = position else {
            return Ok(rows); // nothing covered, so no row
        };
        // A tombstone takes no change: only the others' are read.
        let changes = self
            .changes_of(room, rows.iter().filter(|m| !m.deleted))
            .await?;
        Ok(fold_page(rows, changes, position))
    }

    async fn page_as_of(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        at: AsOf,
    ) -> Result<Vec<PastMessage>, StoreError> {
        let mut cursor = before;
        if let AsOf::Offset(upto) = at {
            let end = upto.saturating_add(1);
            cursor = Some(cursor.map_or(end, |b| b.min(end)));
        }
        // Newest first, the messages posted by `at`; by time, the walk
        // goes back past newer ones in growing steps.
        let mut kept: Vec<MessageView> = Vec::new();
        let mut position = None;
        let mut step = limit;
        while kept.len() < limit {
            let (rows, bound) = self.walk(room, cursor, step).await?;
            position = position.or(bound);
            let Some(oldest) = rows.first() else {
                break;
            };
            cursor = Some(oldest.offset as u64);
            let full = rows.len() == step;
            kept.extend(
                rows.into_iter()
                    .rev()
                    .filter(|m| at.covers(m.offset as u64, m.ts)),
            );
            if !full {
                break;
            }
            step = (step * 4).min(MAX_LISTED);
        }
        kept.truncate(limit);
        kept.reverse();
        let Some(position) = position else {
            return Ok(Vec::new());
        };
        let changes = self.changes_of(room, &kept).await?;
        Ok(fold_page_as_of(kept, changes, position, at))
    }

    async fn changes_between(
        &self,
        room: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<ChangeMark>, StoreError> {
        let Some(span) = Span::new(from, upto) else {
            return Ok(Vec::new());
        };
        let mut scan = IndexScan::new(self.bucketing, span);
        while let Some(at_most) = scan.next_read() {
            let (buckets, partition) = {
                let _slot = self.slot().await?;
                self.tables.buckets(room, at_most, INDEX_PAGE).await?
            };
            scan.on_index(buckets, partition).map_err(layout)?;
        }
        let (buckets, partition) = scan.finish();
        let Some(partition) = partition else {
            return Ok(Vec::new()); // no bucket of the room in the span
        };
        let position = self.stored_position(partition).await?;
        let Some(span) = span.below(position) else {
            return Ok(Vec::new());
        };
        let last = span.buckets(self.bucketing).1;
        let reads: Vec<BoxFuture<'_, Result<(i64, Vec<ChangeRow>), StoreError>>> = buckets
            .into_iter()
            .filter(|&bucket| bucket <= last)
            .map(|bucket| {
                async move {
                    let _slot = self.slot().await?;
                    let rows = self
                        .tables
                        .room_changes(room, bucket, span.from, span.upto)
                        .await?;
                    Ok((bucket, rows))
                }
                .boxed()
            })
            .collect();
        let reads: Vec<(i64, Vec<ChangeRow>)> = futures::stream::iter(reads)
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        listed_changes(self.bucketing, room, span, reads).map_err(layout)
    }

    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        // As the trait's default, but over the stored rows: a count needs
        // no change folded in (a deleted row says so itself).
        crate::count_newest_first(after, cap, |before, limit| async move {
            Ok(self.walk(room, before, limit).await?.0)
        })
        .await
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
