//! An in-memory copy of the Scylla tables, for tests: the same keys, the
//! same clustering order, the same upsert and last-write-wins rules as the
//! CQL in `schemas/cql/tables.cql`, so the store algorithm
//! ([`super::store::BucketedStore`]) runs unchanged against it.
//!
//! It can be told to fail position writes, to show that a failed batch
//! leaves the position behind its data and that applying it again is
//! harmless.
//!
//! [`MemCatalog`] does the same for the projection versions: the
//! `projection_versions` rows and one [`MemTables`] per version, so the
//! version algorithm ([`super::catalog::CatalogVersions`]) runs unchanged
//! against it; it can slip another process's write in after one of its own,
//! to show how a switch and a drop racing each other end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use schemas::protocol::MessageView;

use super::buckets::{Bucketing, ChangeBatch, ChangeRow, Claim, RowBatch};
use super::catalog::{Catalog, VersionRow};
use super::store::{BucketedStore, ClaimRow, Tables};
use crate::{HistoryStore, StoreError};

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
    /// messages: (room, bucket) -> log_offset -> row (read descending). A
    /// row whose body is erased (null) has `deleted` set.
    rows: HashMap<(String, i64), BTreeMap<i64, MessageView>>,
    /// message_changes: (room, bucket of the target) -> (target_offset,
    /// change_offset) -> row (read ascending).
    changes: HashMap<(String, i64), BTreeMap<(i64, i64), ChangeRow>>,
    /// room_changes: (room, bucket of the change) -> change_offset -> row
    /// (read ascending).
    room_changes: HashMap<(String, i64), BTreeMap<i64, ChangeRow>>,
    /// room_reads: room -> user -> read_offset (written USING TIMESTAMP
    /// read_offset: the highest wins).
    reads: HashMap<String, BTreeMap<String, i64>>,
    /// user_rooms: user -> rooms.
    members: HashMap<String, BTreeSet<String>>,
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

    /// Change rows per (room, bucket) partition.
    pub fn change_partition_sizes(&self) -> Vec<((String, i64), usize)> {
        let state = self.state.lock().unwrap();
        let mut sizes: Vec<_> = state
            .changes
            .iter()
            .map(|(k, rows)| (k.clone(), rows.len()))
            .collect();
        sizes.sort();
        sizes
    }

    /// Change rows per (room, bucket of the change) partition of
    /// `room_changes`.
    pub fn room_change_partition_sizes(&self) -> Vec<((String, i64), usize)> {
        let state = self.state.lock().unwrap();
        let mut sizes: Vec<_> = state
            .room_changes
            .iter()
            .map(|(k, rows)| (k.clone(), rows.len()))
            .collect();
        sizes.sort();
        sizes
    }

    /// Every stored message row and change row (of both change tables), as
    /// the tables hold them (what a test looks through for a body that
    /// should be gone).
    pub fn dump(&self) -> (Vec<MessageView>, Vec<ChangeRow>) {
        let state = self.state.lock().unwrap();
        let rows = state.rows.values().flat_map(|r| r.values().cloned());
        let changes = state.changes.values().flat_map(|r| r.values().cloned());
        let logged = state
            .room_changes
            .values()
            .flat_map(|r| r.values().cloned());
        (rows.collect(), changes.chain(logged).collect())
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

    async fn positions(&self) -> Result<Vec<i64>, StoreError> {
        Ok(self.with(|s| s.positions.values().copied().collect()))
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

    async fn erase_body(&self, room: &str, bucket: i64, offset: i64) -> Result<(), StoreError> {
        // DELETE body: a cell of a row; no row where there was none.
        self.with(|s| {
            if let Some(m) = s
                .rows
                .get_mut(&(room.to_owned(), bucket))
                .and_then(|rows| rows.get_mut(&offset))
            {
                m.body.clear();
                m.deleted = true;
            }
        });
        Ok(())
    }

    async fn write_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.with(|s| {
            let partition = s
                .changes
                .entry((batch.room.clone(), batch.bucket))
                .or_default();
            for c in &batch.rows {
                partition.insert((c.target, c.offset), c.clone());
            }
        });
        Ok(())
    }

    async fn changes(
        &self,
        room: &str,
        bucket: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        Ok(self.with(|s| {
            s.changes
                .get(&(room.to_owned(), bucket))
                .map(|rows| {
                    rows.range((first, i64::MIN)..=(last, i64::MAX))
                        .map(|(_, c)| c.clone())
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    async fn erase_edit(
        &self,
        room: &str,
        bucket: i64,
        target: i64,
        offset: i64,
    ) -> Result<(), StoreError> {
        // DELETE text: the cell only, of a row that is there.
        self.with(|s| {
            if let Some(c) = s
                .changes
                .get_mut(&(room.to_owned(), bucket))
                .and_then(|rows| rows.get_mut(&(target, offset)))
            {
                c.change = None;
            }
        });
        Ok(())
    }

    async fn write_room_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.with(|s| {
            let partition = s
                .room_changes
                .entry((batch.room.clone(), batch.bucket))
                .or_default();
            for c in &batch.rows {
                partition.insert(c.offset, c.clone());
            }
        });
        Ok(())
    }

    async fn room_changes(
        &self,
        room: &str,
        bucket: i64,
        from: i64,
        upto: i64,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        Ok(self.with(|s| {
            s.room_changes
                .get(&(room.to_owned(), bucket))
                .filter(|_| from < upto)
                .map(|rows| rows.range(from..upto).map(|(_, c)| c.clone()).collect())
                .unwrap_or_default()
        }))
    }

    async fn erase_room_edit(
        &self,
        room: &str,
        bucket: i64,
        offset: i64,
    ) -> Result<(), StoreError> {
        // DELETE text: the cell only, of a row that is there.
        self.with(|s| {
            if let Some(c) = s
                .room_changes
                .get_mut(&(room.to_owned(), bucket))
                .and_then(|rows| rows.get_mut(&offset))
            {
                c.change = None;
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

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.with(|s| s.reads.get(room).and_then(|r| r.get(user)).copied()))
    }

    async fn write_read_position(
        &self,
        room: &str,
        user: &str,
        offset: i64,
    ) -> Result<(), StoreError> {
        // USING TIMESTAMP read_offset: the highest wins.
        self.with(|s| {
            let stored = s
                .reads
                .entry(room.to_owned())
                .or_default()
                .entry(user.to_owned())
                .or_insert(offset);
            *stored = (*stored).max(offset);
        });
        Ok(())
    }

    async fn read_positions(
        &self,
        room: &str,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self.with(|s| {
            s.reads
                .get(room)
                .map(|r| r.iter().take(limit).map(|(u, o)| (u.clone(), *o)).collect())
                .unwrap_or_default()
        }))
    }

    async fn write_member(&self, user: &str, room: &str) -> Result<(), StoreError> {
        self.with(|s| {
            s.members
                .entry(user.to_owned())
                .or_default()
                .insert(room.to_owned())
        });
        Ok(())
    }

    async fn user_rooms(&self, user: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self.with(|s| {
            s.members
                .get(user)
                .map(|r| r.iter().take(limit).cloned().collect())
                .unwrap_or_default()
        }))
    }
}

/// The `projection_versions` partition in memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Book {
    /// The pointer's row.
    pub pointer: Option<String>,
    /// The versions' rows.
    pub rows: BTreeMap<String, VersionRow>,
}

type Interleaved = Box<dyn FnOnce(&mut Book) + Send>;

/// The versions table and each version's tables, in memory. Locks are
/// never held across an await.
pub struct MemCatalog {
    book: Mutex<Book>,
    /// Each version's tables, while they exist.
    stores: Mutex<HashMap<String, Arc<BucketedStore<MemTables>>>>,
    bucketing: Bucketing,
    /// What another process writes right after this one's next write.
    interleaved: Mutex<Option<Interleaved>>,
}

impl MemCatalog {
    pub fn new(bucketing: Bucketing) -> Self {
        Self::with_book(Book::default(), bucketing)
    }

    /// A catalog whose versions table already holds `book`.
    pub fn with_book(book: Book, bucketing: Bucketing) -> Self {
        MemCatalog {
            book: Mutex::new(book),
            stores: Mutex::new(HashMap::new()),
            bucketing,
            interleaved: Mutex::new(None),
        }
    }

    /// Runs `write` on the book right after the next write to it, as
    /// another process's command landing between two steps of this one.
    pub fn interleave(&self, write: impl FnOnce(&mut Book) + Send + 'static) {
        *self.interleaved.lock().unwrap() = Some(Box::new(write));
    }

    pub fn book(&self) -> Book {
        self.book.lock().unwrap().clone()
    }

    /// Whether the tables of version `name` exist.
    pub fn has_tables(&self, name: &str) -> bool {
        self.stores.lock().unwrap().contains_key(name)
    }

    fn tables(&self, name: &str) -> Arc<BucketedStore<MemTables>> {
        self.stores
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(BucketedStore::new(MemTables::default(), self.bucketing)))
            .clone()
    }

    fn write(&self, f: impl FnOnce(&mut Book)) {
        let mut book = self.book.lock().unwrap();
        f(&mut book);
        if let Some(other) = self.interleaved.lock().unwrap().take() {
            other(&mut book);
        }
    }
}

#[async_trait]
impl Catalog for MemCatalog {
    async fn pointer(&self) -> Result<Option<String>, StoreError> {
        Ok(self.book.lock().unwrap().pointer.clone())
    }

    async fn write_pointer(&self, name: &str) -> Result<(), StoreError> {
        self.write(|b| b.pointer = Some(name.to_owned()));
        Ok(())
    }

    async fn rows(&self) -> Result<Vec<VersionRow>, StoreError> {
        Ok(self.book.lock().unwrap().rows.values().cloned().collect())
    }

    async fn row(&self, name: &str) -> Result<Option<VersionRow>, StoreError> {
        Ok(self.book.lock().unwrap().rows.get(name).cloned())
    }

    async fn write_row(&self, row: &VersionRow) -> Result<(), StoreError> {
        self.write(|b| {
            b.rows.insert(row.name.clone(), row.clone());
        });
        Ok(())
    }

    async fn delete_row(&self, name: &str) -> Result<(), StoreError> {
        self.write(|b| {
            b.rows.remove(name);
        });
        Ok(())
    }

    async fn store(&self, name: &str) -> Result<Arc<dyn HistoryStore>, StoreError> {
        Ok(self.tables(name))
    }

    async fn records(&self, name: &str) -> Result<u64, StoreError> {
        self.tables(name).records().await
    }

    async fn drop_tables(&self, name: &str) -> Result<(), StoreError> {
        self.stores.lock().unwrap().remove(name);
        Ok(())
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
        // the position, 5 buckets and the changes of those 5 buckets, not
        // the ~500 buckets between them.
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(10));
        let batch: Vec<_> = (0..20)
            .map(|i| message("quiet", i * 1_000, &format!("q{i}")))
            .collect();
        store.apply(0, batch, 20_000).await.unwrap();
        let before = store.tables().requests();
        let page = store.page("quiet", None, 5).await.unwrap();
        assert_eq!(page.len(), 5);
        assert_eq!(page[0].offset, 15_000);
        assert_eq!(store.tables().requests() - before, 12);
        // A count reads no change: a first step of 16 rows is an index
        // page, the position and 16 buckets.
        let before = store.tables().requests();
        assert_eq!(
            store.count_after("quiet", Some(14_000), 100).await.unwrap(),
            5
        );
        assert_eq!(store.tables().requests() - before, 18);
    }

    #[tokio::test]
    async fn changes_live_with_their_target_and_a_delete_leaves_no_body() {
        use crate::conformance::change;
        use crate::Batch;
        use schemas::Change;

        let store = BucketedStore::new(MemTables::default(), Bucketing::new(10));
        let edit = |body: &str| Change::Edit {
            body: body.to_owned(),
        };
        let mut m = message("r", 3, "m");
        m.body = "secret one".into();
        store
            .apply(0, vec![m, message("r", 4, "n")], 5)
            .await
            .unwrap();
        let batch = |changes| Batch {
            changes,
            ..Batch::default()
        };
        store
            .apply_batch(
                0,
                batch(vec![change("r", 25, "e1", "alice", 3, edit("secret two"))]),
                26,
            )
            .await
            .unwrap();
        // Kept in the target's bucket (0), and by its own offset in the
        // change's (2), which the room index lists.
        assert_eq!(
            store.tables().change_partition_sizes(),
            vec![(("r".to_owned(), 0), 1)]
        );
        assert_eq!(
            store.tables().room_change_partition_sizes(),
            vec![(("r".to_owned(), 2), 1)]
        );
        assert_eq!(
            store.tables().buckets("r", 10, 10).await.unwrap(),
            (vec![2, 0], Some(0))
        );
        store
            .apply_batch(
                0,
                batch(vec![
                    change("r", 30, "e2", "alice", 3, edit("secret three")),
                    change("r", 31, "d", "alice", 3, Change::Delete),
                    change("r", 32, "e3", "alice", 4, edit("kept")),
                ]),
                33,
            )
            .await
            .unwrap();
        // An edit racing the delete, in a later batch: no body either.
        store
            .apply_batch(
                0,
                batch(vec![change("r", 40, "e4", "alice", 3, edit("secret four"))]),
                41,
            )
            .await
            .unwrap();
        let page = store.page("r", None, 10).await.unwrap();
        assert!(page[0].deleted && page[0].body.is_empty(), "{page:?}");
        assert_eq!(page[1].body, "kept");
        let listed: Vec<u64> = store
            .changes_between("r", 0, 41)
            .await
            .unwrap()
            .iter()
            .map(|c| c.offset)
            .collect();
        assert_eq!(listed, vec![31, 32], "no edit of the deleted message");
        let (rows, changes) = store.tables().dump();
        let texts: Vec<String> = rows
            .iter()
            .map(|m| m.body.clone())
            .chain(
                changes
                    .iter()
                    .filter_map(|c| c.kind_and_text().1.map(str::to_owned)),
            )
            .collect();
        assert!(texts.iter().all(|t| !t.contains("secret")), "{texts:?}");
        assert!(texts.contains(&"kept".to_owned()));
    }
}

#[cfg(test)]
mod change_list_tests {
    use super::*;
    use crate::conformance::{change, message};
    use crate::Batch;
    use schemas::Change;

    fn react(emoji: &str) -> Change {
        Change::React {
            emoji: emoji.to_owned(),
        }
    }

    #[tokio::test]
    async fn changes_show_only_once_their_position_is_written() {
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(4));
        store.apply(0, vec![message("r", 0, "m")], 1).await.unwrap();
        let batch = Batch {
            changes: vec![change("r", 9, "x", "bob", 0, react("x"))],
            ..Batch::default()
        };
        store.tables().fail_position_writes(1);
        assert!(store.apply_batch(0, batch.clone(), 10).await.is_err());
        assert!(store.changes_between("r", 0, 10).await.unwrap().is_empty());
        store.apply_batch(0, batch.clone(), 10).await.unwrap();
        assert_eq!(
            store.changes_between("r", 0, 10).await.unwrap(),
            batch.changes
        );
        assert!(store.changes_between("r", 10, 9).await.unwrap().is_empty());
        assert!(store
            .changes_between("nobody", 0, 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_catch_up_reads_only_the_buckets_holding_changes() {
        // A quiet room, buckets of 10: one message, then a reaction every
        // 1,000 offsets. Listing the changes of 2,500..7,500 reads the index
        // once, the position, and the 5 buckets holding a change; a page
        // of the room reads the buckets of the reactions too, empty.
        let store = BucketedStore::new(MemTables::default(), Bucketing::new(10));
        store
            .apply(0, vec![message("quiet", 0, "m")], 1)
            .await
            .unwrap();
        let changes: Vec<_> = (1..10)
            .map(|i| {
                let user = format!("user{i}");
                change("quiet", i * 1_000, &format!("x{i}"), &user, 0, react("x"))
            })
            .collect();
        let batch = Batch {
            changes: changes.clone(),
            ..Batch::default()
        };
        store.apply_batch(0, batch, 10_000).await.unwrap();
        let before = store.tables().requests();
        let listed = store.changes_between("quiet", 2_500, 7_500).await.unwrap();
        assert_eq!(listed, changes[2..7]);
        assert_eq!(store.tables().requests() - before, 7);
        let page = store.page("quiet", None, 10).await.unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].reactions[0].count, 9);
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;
    use crate::conformance::message;
    use crate::scylla::catalog::{lifecycle, CatalogVersions, RowState};
    use crate::versions::{VersionError, VersionState, Versions};

    fn catalog() -> MemCatalog {
        MemCatalog::new(Bucketing::new(3))
    }

    /// v1 current, v2 ready beside it.
    async fn two_versions() -> CatalogVersions<MemCatalog> {
        let versions = CatalogVersions::open(catalog(), "v1").await.unwrap();
        versions.create("v2", "earliest").await.unwrap();
        versions.mark_ready("v2").await.unwrap();
        versions
    }

    #[tokio::test]
    async fn versions_live_their_life_on_the_memory_tables() {
        let versions = CatalogVersions::open(catalog(), "v1").await.unwrap();
        lifecycle(&versions).await;
    }

    #[tokio::test]
    async fn a_keyspace_from_before_versions_has_v1_current_and_ready() {
        // The tables of v1 hold a history; the versions table is empty.
        let catalog = catalog();
        let v1 = catalog.store("v1").await.unwrap();
        let batch: Vec<_> = (0..6).map(|o| message("r", o, &format!("i{o}"))).collect();
        v1.apply(0, batch, 6).await.unwrap();
        v1.apply(3, vec![message("s", 1, "j")], 2).await.unwrap();
        let versions = CatalogVersions::open(catalog, "v1").await.unwrap();
        assert_eq!(versions.current().await.unwrap(), "v1");
        let list = versions.list().await.unwrap();
        assert_eq!(list.len(), 1);
        let v = &list[0];
        assert!(v.current && v.state == VersionState::Ready, "{v:?}");
        assert_eq!(
            (v.records, v.created_ms, v.from.as_str()),
            (8, 0, "earliest")
        );
        assert_eq!(
            versions
                .open("v1")
                .await
                .unwrap()
                .page("r", None, 10)
                .await
                .unwrap()
                .len(),
            6
        );
        let book = versions.catalog().book();
        assert_eq!(book.pointer.as_deref(), Some("v1"));
        assert_eq!(book.rows["v1"], VersionRow::found("v1"));
        // Opening again changes nothing.
        let again =
            CatalogVersions::open(MemCatalog::with_book(book.clone(), Bucketing::new(3)), "v1")
                .await
                .unwrap();
        assert_eq!(again.catalog().book(), book);
    }

    #[tokio::test]
    async fn a_pointer_to_a_version_without_a_row_is_refused_not_guessed() {
        let book = Book {
            pointer: Some("v7".into()),
            rows: BTreeMap::new(),
        };
        let opened =
            CatalogVersions::open(MemCatalog::with_book(book, Bucketing::new(3)), "v1").await;
        assert!(matches!(opened, Err(VersionError::NotFound(n)) if n == "v7"));
    }

    #[tokio::test]
    async fn a_drop_that_a_switch_overtook_backs_off() {
        let versions = two_versions().await;
        // Right after the drop marks v2, a switch (which read v2 ready
        // before the mark) points reads at it.
        versions
            .catalog()
            .interleave(|b| b.pointer = Some("v2".into()));
        assert!(matches!(
            versions.drop_version("v2").await,
            Err(VersionError::IsCurrent(_))
        ));
        let book = versions.catalog().book();
        assert_eq!(book.rows["v2"].state, RowState::Ready);
        assert!(versions.catalog().has_tables("v2"));
        assert_eq!(versions.current().await.unwrap(), "v2");
    }

    #[tokio::test]
    async fn a_switch_that_a_drop_overtook_backs_off() {
        let versions = two_versions().await;
        // Right after the switch writes the pointer, a drop (which read the
        // pointer before) marks v2.
        versions.catalog().interleave(|b| {
            b.rows.get_mut("v2").unwrap().state = RowState::Dropping;
        });
        assert!(matches!(
            versions.set_current("v2").await,
            Err(VersionError::NotFound(_))
        ));
        assert_eq!(versions.current().await.unwrap(), "v1");
    }

    #[tokio::test]
    async fn a_replay_that_a_switch_overtook_leaves_the_version_alone() {
        let versions = two_versions().await;
        let v2 = versions.open("v2").await.unwrap();
        v2.apply(0, vec![message("r", 0, "a")], 1).await.unwrap();
        versions
            .catalog()
            .interleave(|b| b.pointer = Some("v2".into()));
        assert!(matches!(
            versions.create("v2", "earliest").await,
            Err(VersionError::IsCurrent(_))
        ));
        assert_eq!(versions.catalog().book().rows["v2"].state, RowState::Ready);
        assert_eq!(v2.position(0).await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn a_drop_cut_short_is_hidden_and_finished_later() {
        let versions = two_versions().await;
        let v2 = versions.open("v2").await.unwrap();
        v2.apply(0, vec![message("r", 0, "a")], 1).await.unwrap();
        // A drop stopped after marking the row: the tables are still there.
        versions.catalog().interleave(|b| {
            b.rows.get_mut("v2").unwrap().state = RowState::Dropping;
        });
        versions.catalog().write_pointer("v1").await.unwrap();
        let names: Vec<_> = versions
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["v1"]);
        assert!(matches!(
            versions.open("v2").await,
            Err(VersionError::NotFound(_))
        ));
        assert!(versions.set_current("v2").await.is_err());
        // Replaying into it starts from empty tables.
        let reborn = versions.create("v2", "earliest").await.unwrap();
        assert_eq!(reborn.position(0).await.unwrap(), None);
        assert_eq!(
            versions.catalog().book().rows["v2"].state,
            RowState::Building
        );

        // Or dropping it again finishes the drop.
        versions.catalog().interleave(|b| {
            b.rows.get_mut("v2").unwrap().state = RowState::Dropping;
        });
        versions.catalog().write_pointer("v1").await.unwrap();
        versions.drop_version("v2").await.unwrap();
        assert!(!versions.catalog().book().rows.contains_key("v2"));
        assert!(!versions.catalog().has_tables("v2"));
    }
}
