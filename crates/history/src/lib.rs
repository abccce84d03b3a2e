//! The history of every room, as projected from the log: the store trait
//! and its backends.
//!
//! - [`HistoryStore`]: what a gateway reads (pages, ids) and a projector
//!   writes (batches with the position they reach, atomically).
//! - [`versions`]: projection versions: which ones a store holds, which one
//!   reads use ([`versions::CurrentVersion`] follows a switch).
//! - Backends, each a cargo feature: `embedded` (default; redb files in the
//!   data dir, [`embedded::EmbeddedStore`]) and `scylla` (ScyllaDB,
//!   `scylla::ScyllaStore`). A crate that only reads or writes through the
//!   trait (the gateway) depends on this crate without default features and
//!   builds no backend.
//! - The conformance suite every backend passes is behind the `testing`
//!   feature ([`store_conformance_suite!`]).
//!
//! Promises every backend keeps (checked by the conformance suite): a batch
//! is applied together with the position it reaches, a batch the store
//! already covers is ignored, and a message id already in a room is not
//! stored twice.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod metrics;
#[cfg(feature = "scylla")]
pub mod scylla;
pub mod versions;

use async_trait::async_trait;
use schemas::protocol::MessageView;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now; retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Storage(String),
}

impl StoreError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A user's read position in a room: every offset of the room's partition
/// up to `offset`, inclusive, is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    pub room: String,
    pub user: String,
    pub offset: u64,
}

/// What one apply stores, all of it from one log partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In offset order.
    pub messages: Vec<MessageView>,
    /// Read positions; a store keeps the highest of each (room, user).
    pub reads: Vec<ReadMark>,
    /// (user, room): rooms to list among the user's rooms (a sender's, both
    /// users' of a direct message, a reader's), each kept once.
    pub members: Vec<(String, String)>,
}

impl Batch {
    /// A batch of messages alone.
    pub fn messages(messages: Vec<MessageView>) -> Self {
        Batch {
            messages,
            ..Batch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.reads.is_empty() && self.members.is_empty()
    }
}

/// Most rooms [`HistoryStore::user_rooms`] and most readers
/// [`HistoryStore::reads`] answer.
pub const MAX_LISTED: usize = 1000;

/// Unread messages counted per room at most; past it a count says "at
/// least this many".
pub const UNREAD_CAP: u64 = 1000;

/// The history of every room, as projected from the log.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores `batch` (all from `partition`; messages in offset order) and
    /// records `next` as the partition's position, atomically. A batch whose
    /// `next` is not beyond the stored position is ignored; a message whose
    /// id is already in its room is skipped; a read position lower than the
    /// stored one is ignored.
    async fn apply_batch(&self, partition: u32, batch: Batch, next: u64) -> Result<(), StoreError>;

    /// [`HistoryStore::apply_batch`] of messages alone.
    async fn apply(
        &self,
        partition: u32,
        messages: Vec<MessageView>,
        next: u64,
    ) -> Result<(), StoreError> {
        self.apply_batch(partition, Batch::messages(messages), next)
            .await
    }

    /// The next offset of `partition` to apply, if anything was applied.
    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError>;

    /// Up to `limit` of the newest messages of `room` with an offset below
    /// `before` (all when `None`), oldest first.
    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError>;

    /// The read position of `user` in `room`, if any was stored.
    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError>;

    /// The read positions of `room`, by user name, at most [`MAX_LISTED`].
    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError>;

    /// The rooms listed for `user` (see [`Batch::members`]), sorted by
    /// name, at most [`MAX_LISTED`].
    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError>;

    /// Messages of `room` with an offset above `after` (all when `None`),
    /// counted up to `cap`.
    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        // Newest first, a page at a time, until below `after` or at `cap`.
        let mut count = 0;
        let mut before = None;
        let mut limit = 16;
        loop {
            let page = self.page(room, before, limit).await?;
            let Some(oldest) = page.first() else {
                return Ok(count);
            };
            let oldest = oldest.offset as u64;
            let newer = page
                .iter()
                .filter(|m| after.is_none_or(|a| m.offset as u64 > a))
                .count() as u64;
            count += newer;
            if count >= cap {
                return Ok(cap);
            }
            if page.len() < limit || after.is_some_and(|a| oldest <= a) {
                return Ok(count);
            }
            before = Some(oldest);
            limit = (limit * 4).min(MAX_LISTED);
        }
    }

    /// The offset of the message of `room` sent with client id `id`.
    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError>;

    /// For each (room, id), the offset and timestamp of the stored message,
    /// if any: how a gateway answers a retry whose first attempt another
    /// node (or an earlier process) appended.
    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for (room, id) in keys {
            let hit = match self.find_id(room, id).await? {
                Some(offset) => self
                    .page(room, Some(offset + 1), 1)
                    .await?
                    .into_iter()
                    .find(|m| m.offset == offset as i64)
                    .map(|m| (offset, m.ts)),
                None => None,
            };
            found.push(hit);
        }
        Ok(found)
    }
}
