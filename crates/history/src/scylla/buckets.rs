//! The layout of the history in Scylla's tables, as pure functions: which
//! bucket holds an offset, which writes apply a batch, and the cursor that
//! walks buckets backwards to answer a page. No I/O: the store runs these
//! plans against the cluster, the tests against an in-memory copy of the
//! tables, and both must agree with the embedded store.
//!
//! Promises:
//! - [`Bucketing::bucket_of`] is monotone: a higher offset is never in a lower
//!   bucket, so "older" is "lower bucket, then lower offset".
//! - [`plan_apply`] stores a message unless its id is already claimed in its
//!   room at another offset (by an earlier batch or earlier in this one), the
//!   same rule as the embedded store; replanning the same batch gives the same
//!   writes, so a replay is harmless.
//! - [`PageWalk`] shows only rows below their log partition's stored
//!   position (every row below it is written: the position goes last), so a
//!   batch appears at once although its rows span many Scylla partitions. It
//!   asks only for reads that can hold wanted rows, checks every answer (a
//!   misordered one is an error, never a loop), and ends: each step lowers
//!   its cursor, drops a bucket, or settles the bound.

use std::collections::{HashMap, HashSet, VecDeque};

use schemas::protocol::MessageView;

/// Offsets per bucket in production; the arithmetic that chose it is in
/// `schemas/cql/tables.cql`. Changing it needs a new projection version.
pub const BUCKET_SIZE: u64 = 16_384;

/// Buckets read from the room index per request.
pub const INDEX_PAGE: usize = 16;

/// Most rows asked of one bucket per request; a larger page continues in the
/// same bucket below the last offset read.
pub const MAX_ROWS_PER_READ: usize = 1_000;

/// Most rows in one unlogged batch, and most estimated bytes: below Scylla's
/// default batch size warning (128 KiB) whatever the bodies.
pub const MAX_BATCH_ROWS: usize = 64;
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("negative offset {offset} for message {id}")]
    NegativeOffset { offset: i64, id: String },
    #[error("the store answered out of order: {0}")]
    Misordered(&'static str),
}

/// How offsets map to buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucketing {
    size: u64,
}

impl Default for Bucketing {
    fn default() -> Self {
        Bucketing { size: BUCKET_SIZE }
    }
}

impl Bucketing {
    /// Buckets of `size` offsets (at least 1).
    pub fn new(size: u64) -> Self {
        Bucketing { size: size.max(1) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bucket holding `offset` (`offset >= 0`).
    pub fn bucket_of(&self, offset: i64) -> i64 {
        debug_assert!(offset >= 0);
        (offset.max(0) as u64 / self.size) as i64
    }
}

/// A message id claimed in a room: where the message was first stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub room: String,
    pub id: String,
    pub offset: i64,
    pub ts: i64,
    /// The room's log partition.
    pub partition: u32,
}

/// Whether a row at `offset` of a partition whose stored position is
/// `position` may be shown: only what a completed batch covers.
pub fn is_visible(offset: i64, position: Option<i64>) -> bool {
    position.is_some_and(|p| offset < p)
}

/// Rows of one Scylla partition (room, bucket), newest last, written as one
/// unlogged batch (one statement when alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBatch {
    pub room: String,
    pub bucket: i64,
    pub rows: Vec<MessageView>,
}

/// The writes that apply one batch. All of them go before the position.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// The log partition of every message of the batch.
    pub partition: u32,
    pub batches: Vec<RowBatch>,
    /// (room, bucket) entries of the room index, each once.
    pub buckets: Vec<(String, i64)>,
    pub claims: Vec<Claim>,
    /// Messages not stored because their id was already claimed elsewhere.
    pub skipped: usize,
}

impl WritePlan {
    /// Number of statements the plan issues (batches count as one).
    pub fn statements(&self) -> usize {
        self.batches.len() + self.buckets.len() + self.claims.len()
    }
}

/// The (room, id) keys whose claims the plan of `messages` needs, each once,
/// in first-seen order.
pub fn claim_keys(messages: &[MessageView]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    messages
        .iter()
        .filter(|m| seen.insert((m.room.as_str(), m.id.as_str())))
        .map(|m| (m.room.clone(), m.id.clone()))
        .collect()
}

/// Estimated size of a row in a batch request.
fn row_bytes(m: &MessageView) -> usize {
    m.room.len() + m.id.len() + m.user.len() + m.body.len() + 3 * 8 + 32
}

/// Plans the writes of `messages` (one log partition, offset order), given
/// `known`: the offsets of the claims already stored for [`claim_keys`]
/// (missing = none), whether or not a position covers them yet.
pub fn plan_apply(
    bucketing: Bucketing,
    partition: u32,
    messages: Vec<MessageView>,
    known: &HashMap<(String, String), i64>,
) -> Result<WritePlan, LayoutError> {
    let mut plan = WritePlan {
        partition,
        ..WritePlan::default()
    };
    // Claims made by this batch, on top of `known`.
    let mut claimed: HashMap<(String, String), i64> = HashMap::new();
    // Partition (room, bucket) -> index of its open batch in `plan.batches`.
    let mut open: HashMap<(String, i64), (usize, usize)> = HashMap::new();
    let mut indexed: HashSet<(String, i64)> = HashSet::new();
    for m in messages {
        if m.offset < 0 {
            return Err(LayoutError::NegativeOffset {
                offset: m.offset,
                id: m.id,
            });
        }
        let key = (m.room.clone(), m.id.clone());
        let first = claimed
            .get(&key)
            .copied()
            .or_else(|| known.get(&key).copied());
        if first.is_some_and(|first| first != m.offset) {
            plan.skipped += 1;
            continue;
        }
        claimed.insert(key, m.offset);
        plan.claims.push(Claim {
            room: m.room.clone(),
            id: m.id.clone(),
            offset: m.offset,
            ts: m.ts,
            partition,
        });
        let bucket = bucketing.bucket_of(m.offset);
        if indexed.insert((m.room.clone(), bucket)) {
            plan.buckets.push((m.room.clone(), bucket));
        }
        let size = row_bytes(&m);
        let slot = open.get(&(m.room.clone(), bucket)).copied();
        match slot {
            Some((i, bytes))
                if plan.batches[i].rows.len() < MAX_BATCH_ROWS
                    && bytes + size <= MAX_BATCH_BYTES =>
            {
                open.insert((m.room.clone(), bucket), (i, bytes + size));
                plan.batches[i].rows.push(m);
            }
            _ => {
                open.insert((m.room.clone(), bucket), (plan.batches.len(), size));
                plan.batches.push(RowBatch {
                    room: m.room.clone(),
                    bucket,
                    rows: vec![m],
                });
            }
        }
    }
    Ok(plan)
}

/// What a [`PageWalk`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the room index: buckets `<= at_most`, newest first, at most
    /// `limit`, with the room's log partition.
    Index { at_most: i64, limit: usize },
    /// Read the stored position of the room's log partition: rows at or
    /// above it are not shown.
    Position { partition: u32 },
    /// Read `bucket`: rows with offset `< before`, newest first, at most `limit`.
    Rows {
        bucket: i64,
        before: i64,
        limit: usize,
    },
    /// The page is complete: call [`PageWalk::finish`].
    Done,
}

/// The cursor of one history read: the newest `limit` messages below
/// `before`, found by walking the room's buckets from the newest candidate
/// down, and within each bucket from the newest offset down.
#[derive(Debug)]
pub struct PageWalk {
    bucketing: Bucketing,
    limit: usize,
    /// Every row still wanted has an offset below this.
    before: i64,
    /// Buckets listed by the index and not yet exhausted, newest first.
    pending: VecDeque<i64>,
    /// Where the next index read starts; `None` once the index is exhausted.
    index_at_most: Option<i64>,
    /// The room's log partition, once the index named it.
    partition: Option<u32>,
    /// Whether `before` is already bounded by the partition's position.
    bounded: bool,
    /// The read last handed out, to check its answer against.
    asked: Option<Step>,
    newest_first: Vec<MessageView>,
}

impl PageWalk {
    /// A walk for the newest `limit` messages with offset below `before`
    /// (all when `None`).
    pub fn new(bucketing: Bucketing, before: Option<u64>, limit: usize) -> Self {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let index_at_most = (before > 0 && limit > 0).then(|| bucketing.bucket_of(before - 1));
        PageWalk {
            bucketing,
            limit,
            before,
            pending: VecDeque::new(),
            index_at_most,
            partition: None,
            bounded: false,
            asked: None,
            newest_first: Vec::with_capacity(limit.min(MAX_ROWS_PER_READ)),
        }
    }

    fn remaining(&self) -> usize {
        self.limit - self.newest_first.len()
    }

    /// The next read to perform (and feed back with [`Self::on_index`],
    /// [`Self::on_position`] or [`Self::on_rows`]), or [`Step::Done`].
    pub fn next_step(&mut self) -> Step {
        let step = if self.remaining() == 0 {
            Step::Done
        } else if let (false, Some(partition)) = (self.bounded, self.partition) {
            Step::Position { partition }
        } else if let Some(&bucket) = self.pending.front() {
            Step::Rows {
                bucket,
                before: self.before,
                limit: self.remaining().min(MAX_ROWS_PER_READ),
            }
        } else if let Some(at_most) = self.index_at_most {
            Step::Index {
                at_most,
                limit: INDEX_PAGE,
            }
        } else {
            Step::Done
        };
        self.asked = Some(step);
        step
    }

    /// Feeds the answer to a [`Step::Index`]: buckets, newest first, and the
    /// room's log partition (known whenever a bucket is listed).
    pub fn on_index(
        &mut self,
        buckets: Vec<i64>,
        partition: Option<u32>,
    ) -> Result<(), LayoutError> {
        let Some(Step::Index { at_most, limit }) = self.asked.take() else {
            return Err(LayoutError::Misordered(
                "index answer without an index read",
            ));
        };
        if !buckets.is_empty() {
            match (self.partition, partition) {
                (_, None) => {
                    return Err(LayoutError::Misordered("index buckets without a partition"))
                }
                (Some(known), Some(p)) if known != p => {
                    return Err(LayoutError::Misordered("the room changed partition"))
                }
                (_, Some(p)) => self.partition = Some(p),
            }
        }
        let mut bound = at_most.saturating_add(1);
        for &b in &buckets {
            if b >= bound || b < 0 {
                return Err(LayoutError::Misordered("index buckets not descending"));
            }
            bound = b;
        }
        if buckets.len() > limit {
            return Err(LayoutError::Misordered("index answer over its limit"));
        }
        self.index_at_most = match buckets.last() {
            Some(&last) if buckets.len() == limit && last > 0 => Some(last - 1),
            _ => None,
        };
        self.pending.extend(buckets);
        Ok(())
    }

    /// Feeds the answer to a [`Step::Position`]: the stored position of the
    /// room's partition. Rows at or above it are hidden, buckets wholly above
    /// it dropped.
    pub fn on_position(&mut self, position: Option<i64>) -> Result<(), LayoutError> {
        let Some(Step::Position { .. }) = self.asked.take() else {
            return Err(LayoutError::Misordered(
                "position answer without a position read",
            ));
        };
        self.bounded = true;
        self.before = self.before.min(position.unwrap_or(0).max(0));
        if self.before == 0 {
            self.pending.clear();
            self.index_at_most = None;
        } else {
            let top = self.bucketing.bucket_of(self.before - 1);
            self.pending.retain(|&b| b <= top);
            self.index_at_most = self.index_at_most.map(|a| a.min(top));
        }
        Ok(())
    }

    /// Feeds the answer to a [`Step::Rows`]: rows of that bucket, newest first.
    pub fn on_rows(&mut self, rows: Vec<MessageView>) -> Result<(), LayoutError> {
        let Some(Step::Rows {
            bucket,
            before,
            limit,
        }) = self.asked.take()
        else {
            return Err(LayoutError::Misordered("rows answer without a rows read"));
        };
        if rows.len() > limit {
            return Err(LayoutError::Misordered("rows answer over its limit"));
        }
        let mut bound = before;
        for m in &rows {
            if m.offset >= bound || m.offset < 0 || self.bucketing.bucket_of(m.offset) != bucket {
                return Err(LayoutError::Misordered(
                    "rows not descending within the bucket",
                ));
            }
            bound = m.offset;
        }
        self.before = bound;
        if rows.len() < limit {
            // The bucket has nothing more below the cursor.
            self.pending.pop_front();
        }
        self.newest_first.extend(rows);
        Ok(())
    }

    /// The page, oldest first.
    pub fn finish(mut self) -> Vec<MessageView> {
        self.newest_first.reverse();
        self.newest_first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::message;

    #[test]
    fn buckets_are_ranges_of_offsets() {
        let b = Bucketing::new(10);
        assert_eq!(b.bucket_of(0), 0);
        assert_eq!(b.bucket_of(9), 0);
        assert_eq!(b.bucket_of(10), 1);
        assert_eq!(Bucketing::default().bucket_of(16_383), 0);
        assert_eq!(Bucketing::default().bucket_of(16_384), 1);
        assert_eq!(Bucketing::new(0).size(), 1);
    }

    #[test]
    fn the_cql_comment_states_the_bucket_size() {
        let cql = include_str!("../../../../schemas/cql/tables.cql");
        assert!(cql.contains(&format!("bucket = log_offset / {BUCKET_SIZE}")));
    }

    #[test]
    fn plan_skips_ids_claimed_at_other_offsets() {
        let known = HashMap::from([(("r".to_owned(), "old".to_owned()), 2)]);
        let batch = vec![
            message("r", 4, "old"),
            message("r", 5, "x"),
            message("r", 6, "x"),
            message("q", 7, "x"),
        ];
        let plan = plan_apply(Bucketing::new(100), 0, batch, &known).unwrap();
        assert_eq!(plan.skipped, 2);
        let stored: Vec<_> = plan
            .batches
            .iter()
            .flat_map(|b| b.rows.iter().map(|m| m.offset))
            .collect();
        assert_eq!(stored, vec![5, 7]);
        assert_eq!(plan.claims.len(), 2);
    }

    #[test]
    fn plan_rewrites_a_claim_at_its_own_offset() {
        // A replay after a crash between the data and the position.
        let known = HashMap::from([(("r".to_owned(), "a".to_owned()), 3)]);
        let plan = plan_apply(Bucketing::new(100), 0, vec![message("r", 3, "a")], &known).unwrap();
        assert_eq!(plan.skipped, 0);
        assert_eq!(plan.batches.len(), 1);
    }

    #[test]
    fn plan_groups_rows_by_partition_within_limits() {
        let batch: Vec<_> = (0..200)
            .map(|o| message("r", o, &format!("i{o}")))
            .collect();
        let plan = plan_apply(Bucketing::new(100), 0, batch, &HashMap::new()).unwrap();
        assert_eq!(plan.buckets, vec![("r".into(), 0), ("r".into(), 1)]);
        assert!(plan.batches.iter().all(|b| b.rows.len() <= MAX_BATCH_ROWS));
        assert!(plan.batches.iter().all(|b| b
            .rows
            .iter()
            .all(|m| m.offset / 100 == b.bucket && m.room == b.room)));
        assert_eq!(
            plan.batches.iter().map(|b| b.rows.len()).sum::<usize>(),
            200
        );

        let mut big = message("r", 0, "big");
        big.body = "x".repeat(4096);
        let batch: Vec<_> = (0..64)
            .map(|o| MessageView {
                offset: o,
                id: format!("b{o}"),
                ..big.clone()
            })
            .collect();
        let plan = plan_apply(Bucketing::new(100), 0, batch, &HashMap::new()).unwrap();
        assert!(plan.batches.len() > 1);
        assert!(plan
            .batches
            .iter()
            .all(|b| b.rows.iter().map(row_bytes).sum::<usize>() <= MAX_BATCH_BYTES));
    }

    #[test]
    fn plan_refuses_negative_offsets() {
        let err = plan_apply(
            Bucketing::default(),
            0,
            vec![message("r", 0, "a")],
            &HashMap::new(),
        );
        assert!(err.is_ok());
        let mut m = message("r", 0, "a");
        m.offset = -1;
        assert!(plan_apply(Bucketing::default(), 0, vec![m], &HashMap::new()).is_err());
    }

    #[test]
    fn claim_keys_are_unique_in_first_seen_order() {
        let batch = vec![
            message("r", 0, "a"),
            message("r", 1, "a"),
            message("q", 2, "a"),
        ];
        assert_eq!(
            claim_keys(&batch),
            vec![("r".into(), "a".into()), ("q".into(), "a".into())]
        );
    }

    #[test]
    fn an_empty_walk_reads_nothing() {
        let b = Bucketing::new(10);
        assert_eq!(PageWalk::new(b, Some(0), 10).next_step(), Step::Done);
        assert_eq!(PageWalk::new(b, None, 0).next_step(), Step::Done);
    }

    #[test]
    fn the_walk_starts_at_the_cursor_bucket_and_steps_down() {
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, Some(25), 3);
        assert_eq!(
            w.next_step(),
            Step::Index {
                at_most: 2,
                limit: INDEX_PAGE
            }
        );
        w.on_index(vec![2, 0], Some(4)).unwrap();
        assert_eq!(w.next_step(), Step::Position { partition: 4 });
        w.on_position(Some(1_000)).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 2,
                before: 25,
                limit: 3
            }
        );
        w.on_rows(vec![message("r", 21, "a")]).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 0,
                before: 21,
                limit: 2
            }
        );
        w.on_rows(vec![message("r", 9, "b"), message("r", 3, "c")])
            .unwrap();
        assert_eq!(w.next_step(), Step::Done);
        let page: Vec<_> = w.finish().iter().map(|m| m.offset).collect();
        assert_eq!(page, vec![3, 9, 21]);
    }

    #[test]
    fn the_walk_hides_what_no_position_covers_yet() {
        // Rows up to 24 are written, but the position says 13: a batch is
        // still being applied, and its rows must not show.
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, None, 10);
        w.next_step();
        w.on_index(vec![2, 1, 0], Some(0)).unwrap();
        assert_eq!(w.next_step(), Step::Position { partition: 0 });
        w.on_position(Some(13)).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 1,
                before: 13,
                limit: 10
            }
        );
        w.on_rows(vec![message("r", 12, "a")]).unwrap();
        w.next_step();
        w.on_rows(vec![message("r", 5, "b")]).unwrap();
        assert_eq!(w.next_step(), Step::Done);
        assert_eq!(w.finish().len(), 2);

        // Nothing covered yet: nothing shows, and no bucket is read.
        let mut w = PageWalk::new(b, None, 10);
        w.next_step();
        w.on_index(vec![0], Some(0)).unwrap();
        w.next_step();
        w.on_position(None).unwrap();
        assert_eq!(w.next_step(), Step::Done);
        assert!(is_visible(3, Some(4)));
        assert!(!is_visible(4, Some(4)));
        assert!(!is_visible(0, None));
    }

    #[test]
    fn the_walk_refuses_misordered_answers() {
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(w.on_index(vec![1, 3], Some(0)).is_err());
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(
            w.on_index(vec![1], None).is_err(),
            "buckets without partition"
        );
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        w.on_index(vec![3], Some(0)).unwrap();
        w.next_step();
        w.on_position(Some(100)).unwrap();
        w.next_step();
        assert!(
            w.on_rows(vec![message("r", 5, "a")]).is_err(),
            "wrong bucket"
        );
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(w.on_rows(Vec::new()).is_err(), "answer to another read");
    }
}

/// Property tests: random histories, paged through across bucket
/// boundaries, against the embedded store as the oracle.
#[cfg(test)]
mod props {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::conformance::message;
    use crate::embedded::EmbeddedStore;
    use crate::scylla::memory::MemTables;
    use crate::scylla::store::BucketedStore;
    use crate::HistoryStore;

    const ROOMS: [&str; 3] = ["a", "b", "ab"];

    /// One message of the history: its room, the offset gap before it, and
    /// whether it reuses one of a few ids (a retry, or the same id in
    /// another room).
    #[derive(Debug, Clone)]
    struct Event {
        room: usize,
        gap: u64,
        reuse: Option<usize>,
    }

    #[derive(Debug, Clone)]
    struct Case {
        bucket: u64,
        events: Vec<Event>,
        /// Sizes of the batches the history is applied in (cycled).
        chunks: Vec<usize>,
        /// A batch whose position write fails once, then is applied again.
        crash: Option<usize>,
        /// Page size of the full walks.
        walk: usize,
        /// Extra single pages: room, `before`, limit.
        probes: Vec<(usize, Option<u64>, usize)>,
    }

    fn case() -> impl Strategy<Value = Case> {
        prop_oneof![3 => 1u64..6, 1 => Just(BUCKET_SIZE)].prop_flat_map(|bucket| {
            let gap = prop_oneof![6 => 1u64..3, 1 => 1u64..(3 * bucket.min(20_000))];
            let event = (
                0..ROOMS.len(),
                gap,
                proptest::option::weighted(0.2, 0..4usize),
            )
                .prop_map(|(room, gap, reuse)| Event { room, gap, reuse });
            (
                Just(bucket),
                proptest::collection::vec(event, 0..90),
                proptest::collection::vec(1..25usize, 1..5),
                proptest::option::of(0..6usize),
                1..12usize,
                proptest::collection::vec(
                    (
                        0..ROOMS.len(),
                        proptest::option::of(0..2_000u64),
                        0..30usize,
                    ),
                    0..8,
                ),
            )
                .prop_map(|(bucket, events, chunks, crash, walk, probes)| Case {
                    bucket,
                    events,
                    chunks,
                    crash,
                    walk,
                    probes,
                })
        })
    }

    fn history(events: &[Event]) -> Vec<MessageView> {
        let mut offset = 0;
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                offset += e.gap;
                let id = match e.reuse {
                    Some(k) => format!("reused{k}"),
                    None => format!("u{i}"),
                };
                message(ROOMS[e.room], offset, &id)
            })
            .collect()
    }

    fn batches(all: &[MessageView], sizes: &[usize]) -> Vec<Vec<MessageView>> {
        let mut out = Vec::new();
        let mut rest = all;
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at(n.min(rest.len()));
            out.push(head.to_vec());
            rest = tail;
        }
        out
    }

    /// Everything a reader can see, compared: every page of a full walk of
    /// each room, the probes, and every id lookup.
    async fn compare(store: &impl HistoryStore, oracle: &EmbeddedStore, case: &Case) {
        assert_eq!(
            store.position(0).await.unwrap(),
            oracle.position(0).await.unwrap()
        );
        for room in ROOMS {
            // Every page of a full walk, newest to oldest.
            let mut before = None;
            loop {
                let want = oracle.page(room, before, case.walk).await.unwrap();
                let got = store.page(room, before, case.walk).await.unwrap();
                assert_eq!(
                    got, want,
                    "room {room}, before {before:?}, limit {}",
                    case.walk
                );
                match want.first() {
                    Some(m) => before = Some(m.offset as u64),
                    None => break,
                }
            }
            let ids: Vec<String> = (0..4)
                .map(|k| format!("reused{k}"))
                .chain((0..case.events.len()).map(|i| format!("u{i}")))
                .collect();
            for id in &ids {
                assert_eq!(
                    store.find_id(room, id).await.unwrap(),
                    oracle.find_id(room, id).await.unwrap(),
                    "find_id({room}, {id})"
                );
            }
            let keys: Vec<_> = ids.iter().map(|id| (room.to_owned(), id.clone())).collect();
            assert_eq!(
                store.find_ids(&keys).await.unwrap(),
                oracle.find_ids(&keys).await.unwrap()
            );
        }
        for &(room, before, limit) in &case.probes {
            let room = ROOMS[room];
            assert_eq!(
                store.page(room, before, limit).await.unwrap(),
                oracle.page(room, before, limit).await.unwrap(),
                "room {room}, before {before:?}, limit {limit}"
            );
        }
    }

    async fn run(case: Case) {
        let dir = tempfile::tempdir().unwrap();
        let oracle = EmbeddedStore::open(dir.path(), "v1").unwrap();
        let store =
            BucketedStore::with_limits(MemTables::default(), Bucketing::new(case.bucket), 3, 5);
        let all = history(&case.events);
        let batches = batches(&all, &case.chunks);
        for (i, batch) in batches.iter().enumerate() {
            let next = batch.last().unwrap().offset as u64 + 1;
            if case.crash == Some(i) {
                // The rows land, the position does not: readers must still
                // see the store as it was before the batch.
                store.tables().fail_position_writes(1);
                assert!(store.apply(0, batch.clone(), next).await.is_err());
                compare(&store, &oracle, &case).await;
            }
            oracle.apply(0, batch.clone(), next).await.unwrap();
            store.apply(0, batch.clone(), next).await.unwrap();
        }
        // A covered batch, altered, is ignored by both.
        if let Some(first) = batches.first() {
            let mut altered = first.clone();
            altered.iter_mut().for_each(|m| m.body = "rewritten".into());
            let next = first.last().unwrap().offset as u64 + 1;
            oracle.apply(0, altered.clone(), next).await.unwrap();
            store.apply(0, altered, next).await.unwrap();
        }
        compare(&store, &oracle, &case).await;
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The Scylla layout, in memory, answers every page, claim and
        /// position as the embedded store does.
        #[test]
        fn scylla_layout_matches_the_embedded_store(case in case()) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(case));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The cursor alone, many more cases: walking sorted offsets through
        /// buckets gives the newest `limit` below `before` and below the
        /// partition position, oldest first.
        #[test]
        fn page_walk_is_a_slice_of_the_history(
            bucket in 1u64..8,
            offsets in proptest::collection::btree_set(0i64..400, 0..120),
            before in proptest::option::of(0u64..420),
            limit in 0usize..40,
            position in proptest::option::of(0i64..420),
        ) {
            let b = Bucketing::new(bucket);
            let mut rows: BTreeMap<i64, BTreeMap<i64, MessageView>> = BTreeMap::new();
            let mut index = BTreeSet::new();
            for &o in &offsets {
                rows.entry(b.bucket_of(o)).or_default().insert(o, message("r", o as u64, "x"));
                index.insert(b.bucket_of(o));
            }
            let mut walk = PageWalk::new(b, before, limit);
            let mut steps = 0;
            let page = loop {
                steps += 1;
                prop_assert!(steps < 10_000, "the walk does not end");
                match walk.next_step() {
                    Step::Index { at_most, limit } => {
                        let answer = index.range(..=at_most).rev().take(limit).copied().collect();
                        walk.on_index(answer, Some(7)).unwrap();
                    }
                    Step::Position { partition } => {
                        prop_assert_eq!(partition, 7);
                        walk.on_position(position).unwrap();
                    }
                    Step::Rows { bucket, before, limit } => {
                        let answer = rows
                            .get(&bucket)
                            .map(|r| r.range(..before).rev().take(limit).map(|(_, m)| m.clone()).collect())
                            .unwrap_or_default();
                        walk.on_rows(answer).unwrap();
                    }
                    Step::Done => break walk.finish(),
                }
            };
            let below: Vec<i64> = offsets
                .iter()
                .copied()
                .filter(|&o| before.is_none_or(|b| (o as u64) < b) && position.is_some_and(|p| o < p))
                .collect();
            let want = &below[below.len().saturating_sub(limit)..];
            let got: Vec<i64> = page.iter().map(|m| m.offset).collect();
            prop_assert_eq!(got, want.to_vec());
        }
    }
}
