//! An in-memory copy of the Scylla tables, for tests: the same keys, the
//! same clustering order, the same upsert and last-write-wins rules as the
//! CQL in `schemas/cql/tables.cql`, so the store algorithm
//! ([`super::store::BucketedStore`]) runs unchanged against it.
//!
//! It can be told to fail position writes, to show that a failed batch
//! leaves the position behind its data and that applying it again is
//! harmless.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use schemas::protocol::MessageView;

use super::buckets::{Claim, RowBatch};
use super::store::{ClaimRow, Tables};
use crate::StoreError;

#[derive(Default)]
struct State {
    /// positions: log_partition -> next_offset (written USING TIMESTAMP
    /// next_offset: the highest wins).
    positions: HashMap<u32, i64>,
    /// message_ids: (room, msg_id) -> (log_offset, ts, log_partition).
    claims: HashMap<(String, String), ClaimRow>,
    /// room_buckets: room -> (static log_partition, buckets read in
    /// descending order).
    buckets: HashMap<String, (u32, BTreeSet<i64>)>,
    /// messages: (room, bucket) -> log_offset -> row (read descending).
    rows: HashMap<(String, i64), BTreeMap<i64, MessageView>>,
}

/// The tables in memory. The lock is never held across an await: every
/// method takes it, does its work, and drops it.
#[derive(Default)]
pub struct MemTables {
    state: Mutex<State>,
    /// Position writes still to fail.
    failing_positions: AtomicUsize,
    /// Requests served, for tests that count them.
    requests: AtomicUsize,
}

impl MemTables {
    /// Makes the next `n` position writes fail (after the data was written).
    pub fn fail_position_writes(&self, n: usize) {
        self.failing_positions.store(n, Ordering::SeqCst);
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Rows per (room, bucket) partition.
    pub fn partition_sizes(&self) -> Vec<((String, i64), usize)> {
        let state = self.state.lock().unwrap();
        let mut sizes: Vec<_> = state
            .rows
            .iter()
            .map(|(k, rows)| (k.clone(), rows.len()))
            .collect();
        sizes.sort();
        sizes
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.requests.fetch_add(1, Ordering::SeqCst);
        f(&mut self.state.lock().unwrap())
    }
}

#[async_trait]
impl Tables for MemTables {
    async fn position(&self, partition: u32) -> Result<Option<i64>, StoreError> {
        Ok(self.with(|s| s.positions.get(&partition).copied()))
    }

    async fn write_position(&self, partition: u32, next: i64) -> Result<(), StoreError> {
        let fail = self
            .failing_positions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(StoreError::Unavailable(
                "injected position write failure".into(),
            ));
        }
        self.with(|s| {
            let stored = s.positions.entry(partition).or_insert(next);
            *stored = (*stored).max(next);
        });
        Ok(())
    }

    async fn claim(&self, room: &str, id: &str) -> Result<Option<ClaimRow>, StoreError> {
        Ok(self.with(|s| s.claims.get(&(room.to_owned(), id.to_owned())).copied()))
    }

    async fn write_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        self.with(|s| {
            s.claims.insert(
                (claim.room.clone(), claim.id.clone()),
                ClaimRow {
                    offset: claim.offset,
                    ts: claim.ts,
                    partition: claim.partition,
                },
            )
        });
        Ok(())
    }

    async fn write_bucket(
        &self,
        room: &str,
        bucket: i64,
        partition: u32,
    ) -> Result<(), StoreError> {
        self.with(|s| {
            let entry = s.buckets.entry(room.to_owned()).or_default();
            entry.0 = partition;
            entry.1.insert(bucket);
        });
        Ok(())
    }

    async fn write_rows(&self, batch: &RowBatch) -> Result<(), StoreError> {
        self.with(|s| {
            let partition = s
                .rows
                .entry((batch.room.clone(), batch.bucket))
                .or_default();
            for m in &batch.rows {
                partition.insert(m.offset, m.clone());
            }
        });
        Ok(())
    }

    async fn buckets(
        &self,
        room: &str,
        at_most: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Option<u32>), StoreError> {
        Ok(self.with(|s| {
            let Some((partition, buckets)) = s.buckets.get(room) else {
                return (Vec::new(), None);
            };
            let listed: Vec<i64> = buckets
                .range(..=at_most)
                .rev()
                .take(limit)
                .copied()
                .collect();
            // Like CQL: the static column comes with the rows, none without.
            let partition = (!listed.is_empty()).then_some(*partition);
            (listed, partition)
        }))
    }

    async fn rows(
        &self,
        room: &str,
        bucket: i64,
        before: i64,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        Ok(self.with(|s| {
            s.rows
                .get(&(room.to_owned(), bucket))
                .map(|rows| {
                    rows.range(..before)
                        .rev()
                        .take(limit)
                        .map(|(_, m)| m.clone())
                        .collect()
                })
                .unwrap_or_default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use async_trait::async_trait;

    use super::*;
    use crate::conformance::{message, StoreHarness};
    use crate::scylla::buckets::Bucketing;
    use crate::scylla::store::BucketedStore;
    use crate::HistoryStore;

    /// The Scylla layout in memory with tiny buckets (3 offsets), so the
    /// conformance cases cross many bucket boundaries.
    struct Harness;

    #[async_trait]
    impl StoreHarness for Harness {
        async fn fresh(&self) -> Arc<dyn HistoryStore> {
            Arc::new(BucketedStore::with_limits(
                MemTables::default(),
                Bucketing::new(3),
                4,
                8,
            ))
        }
    }

    mod tiny_buckets {
        use super::Harness;
        crate::store_conformance_suite!(Harness);
    }

    /// And with the production bucket size.
    struct ProductionHarness;

    #[async_trait]
    impl StoreHarness for ProductionHarness {
        async fn fresh(&self) -> Arc<dyn HistoryStore> {
            Arc::new(BucketedStore::new(
                MemTables::default(),
                Bucketing::default(),
            ))
        }
    }

    mod production_buckets {
        use super::ProductionHarness;
        crate::store_conformance_suite!(ProductionHarness);
    }

    #[tokio::test]
    async fn a_failed_position_write_leaves_the_batch_to_replay() {
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(4));
        let batch: Vec<_> = (0..10).map(|o| message("r", o, &format!("i{o}"))).collect();
        store.tables().fail_position_writes(1);
        let err = store.apply(0, batch.clone(), 10).await.unwrap_err();
        assert!(err.is_retriable());
        assert_eq!(
            store.position(0).await.unwrap(),
            None,
            "position not written"
        );
        // The rows are there, but nothing says so: the projector applies the
        // batch again, and the same writes land again.
        store.apply(0, batch.clone(), 10).await.unwrap();
        assert_eq!(store.position(0).await.unwrap(), Some(10));
        assert_eq!(store.page("r", None, 50).await.unwrap(), batch);
    }

    #[tokio::test]
    async fn a_batch_shows_only_once_its_position_is_written() {
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(4));
        store.apply(0, vec![message("r", 0, "a")], 1).await.unwrap();
        store.tables().fail_position_writes(1);
        let batch = vec![message("r", 1, "b"), message("r", 9, "c")];
        assert!(store.apply(0, batch, 10).await.is_err());
        // Rows 1 and 9 and their claims are stored, but nothing covers them.
        assert_eq!(store.page("r", None, 50).await.unwrap().len(), 1);
        assert_eq!(store.find_id("r", "c").await.unwrap(), None);
        let keys = [("r".to_owned(), "b".to_owned())];
        assert_eq!(store.find_ids(&keys).await.unwrap(), vec![None]);
    }

    #[tokio::test]
    async fn a_stale_position_never_wins() {
        let tables = MemTables::default();
        tables.write_position(0, 9).await.unwrap();
        tables.write_position(0, 5).await.unwrap();
        assert_eq!(tables.position(0).await.unwrap(), Some(9));
    }

    #[tokio::test]
    async fn partitions_hold_at_most_a_bucket_of_offsets() {
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(16));
        let batch: Vec<_> = (0..100)
            .map(|o| message("busy", o, &format!("i{o}")))
            .collect();
        store.apply(0, batch, 100).await.unwrap();
        let sizes = store.tables().partition_sizes();
        assert_eq!(sizes.len(), 7);
        assert!(sizes.iter().all(|(_, n)| *n <= 16));
    }

    #[tokio::test]
    async fn a_quiet_room_skips_empty_buckets() {
        // A room with one message every 1,000 offsets, buckets of 10: the
        // index lists only its buckets, so a page of 5 reads 1 index page,
        // the position, and 5 buckets, not the ~500 buckets between them.
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(10));
        let batch: Vec<_> = (0..20)
            .map(|i| message("quiet", i * 1_000, &format!("q{i}")))
            .collect();
        store.apply(0, batch, 20_000).await.unwrap();
        let before = store.tables().requests();
        let page = store.page("quiet", None, 5).await.unwrap();
        assert_eq!(page.len(), 5);
        assert_eq!(page[0].offset, 15_000);
        assert_eq!(store.tables().requests() - before, 7);
    }
}
