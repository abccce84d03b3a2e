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

/// The history of every room, as projected from the log.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores `messages` (all from `partition`, in offset order) and records
    /// `next` as the partition's position, atomically. A batch whose `next` is
    /// not beyond the stored position is ignored; a message whose id is
    /// already in its room is skipped.
    async fn apply(
        &self,
        partition: u32,
        messages: Vec<MessageView>,
        next: u64,
    ) -> Result<(), StoreError>;

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
