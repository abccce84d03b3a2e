//! The conformance suite every history store must pass, written once.
//!
//! A backend provides a [`StoreHarness`] and expands
//! [`store_conformance_suite!`]; each case becomes its own named test.

use std::sync::Arc;

use async_trait::async_trait;
use schemas::protocol::MessageView;

use crate::{Batch, HistoryStore, ReadMark};

/// How a backend makes stores for the suite.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// A new, empty store.
    async fn fresh(&self) -> Arc<dyn HistoryStore>;
}

/// Expands the suite into one `#[tokio::test]` per case; `$harness` is an
/// expression building a [`StoreHarness`]. Attributes written before it are
/// put on every case, e.g. an `#[ignore = "why"]` for a backend that needs a
/// server: the runner then reports those cases as skipped, not passed.
///
/// ```ignore
/// store_conformance_suite!(harness());
/// store_conformance_suite!(#[ignore = "needs SCYLLA_URI"] harness());
/// ```
#[macro_export]
macro_rules! store_conformance_suite {
    (@cases $attrs:tt $harness:expr; $($case:ident),* $(,)?) => {
        $(
            $crate::store_conformance_suite!(@case $attrs $harness; $case);
        )*
    };
    (@case { $(#[$attr:meta])* } $harness:expr; $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $case() {
            let harness = $harness;
            $crate::conformance::$case(&harness).await;
        }
    };
    (@attrs { $($acc:tt)* } #[$attr:meta] $($rest:tt)*) => {
        $crate::store_conformance_suite!(@attrs { $($acc)* #[$attr] } $($rest)*);
    };
    (@attrs $attrs:tt $harness:expr) => {
        $crate::store_conformance_suite!(@cases $attrs $harness;
            empty_store_has_no_positions_or_messages,
            apply_stores_messages_and_position,
            pages_walk_back_with_before_cursors,
            rooms_sharing_a_partition_stay_apart,
            reapplying_a_covered_batch_changes_nothing,
            duplicate_id_is_stored_once,
            positions_are_per_partition,
            find_id_returns_the_first_offset,
            find_ids_answers_each_key,
            unicode_bodies_round_trip,
            read_positions_keep_the_highest,
            read_positions_are_per_room_and_user,
            a_covered_batch_moves_no_read_position,
            rooms_are_listed_per_user_once,
            unread_counts_messages_after_the_read_position,
        );
    };
    ($($input:tt)*) => {
        $crate::store_conformance_suite!(@attrs {} $($input)*);
    };
}

/// A message of `room` at `offset`, with id `id`.
pub fn message(room: &str, offset: u64, id: &str) -> MessageView {
    MessageView {
        room: room.to_owned(),
        offset: offset as i64,
        id: id.to_owned(),
        user: "alice".to_owned(),
        body: format!("body {offset}"),
        ts: 1_700_000_000_000 + offset as i64,
    }
}

/// `user`'s read position `offset` in `room`.
pub fn read(room: &str, user: &str, offset: u64) -> ReadMark {
    ReadMark {
        room: room.to_owned(),
        user: user.to_owned(),
        offset,
    }
}

fn reads(marks: Vec<ReadMark>) -> Batch {
    Batch {
        reads: marks,
        ..Batch::default()
    }
}

fn offsets(page: &[MessageView]) -> Vec<i64> {
    page.iter().map(|m| m.offset).collect()
}

pub async fn empty_store_has_no_positions_or_messages(h: &impl StoreHarness) {
    let s = h.fresh().await;
    assert_eq!(s.position(0).await.unwrap(), None);
    assert!(s.page("general", None, 50).await.unwrap().is_empty());
    assert_eq!(s.find_id("general", "x").await.unwrap(), None);
}

pub async fn apply_stores_messages_and_position(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let batch: Vec<_> = (0..5)
        .map(|o| message("general", o, &format!("id{o}")))
        .collect();
    s.apply(3, batch.clone(), 5).await.unwrap();
    assert_eq!(s.position(3).await.unwrap(), Some(5));
    assert_eq!(s.page("general", None, 50).await.unwrap(), batch);
}

pub async fn pages_walk_back_with_before_cursors(h: &impl StoreHarness) {
    let s = h.fresh().await;
    // Offsets are increasing but not dense: other rooms share the partition.
    let all: Vec<_> = (0..230)
        .map(|i| message("r", i * 3 + 1, &format!("m{i}")))
        .collect();
    for chunk in all.chunks(40) {
        let next = chunk.last().unwrap().offset as u64 + 1;
        s.apply(0, chunk.to_vec(), next).await.unwrap();
    }
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let page = s.page("r", before, 50).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 50);
        assert!(
            page.windows(2).all(|w| w[0].offset < w[1].offset),
            "oldest first"
        );
        before = Some(page[0].offset as u64);
        walked.splice(0..0, page);
    }
    assert_eq!(walked, all);
    let newest = s.page("r", None, 10).await.unwrap();
    assert_eq!(offsets(&newest), offsets(&all[220..]));
    let middle = s.page("r", Some(all[100].offset as u64), 3).await.unwrap();
    assert_eq!(offsets(&middle), offsets(&all[97..100]));
}

pub async fn rooms_sharing_a_partition_stay_apart(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let batch = vec![
        message("a", 0, "1"),
        message("b", 1, "2"),
        message("a", 2, "3"),
        message("ab", 3, "4"),
    ];
    s.apply(0, batch, 4).await.unwrap();
    assert_eq!(offsets(&s.page("a", None, 50).await.unwrap()), vec![0, 2]);
    assert_eq!(offsets(&s.page("b", None, 50).await.unwrap()), vec![1]);
    assert_eq!(offsets(&s.page("ab", None, 50).await.unwrap()), vec![3]);
}

pub async fn reapplying_a_covered_batch_changes_nothing(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let batch: Vec<_> = (0..3).map(|o| message("r", o, &format!("id{o}"))).collect();
    s.apply(0, batch.clone(), 3).await.unwrap();
    let mut altered = batch.clone();
    altered[1].body = "rewritten".into();
    s.apply(0, altered, 3).await.unwrap();
    s.apply(0, vec![message("r", 1, "other")], 2).await.unwrap();
    assert_eq!(s.page("r", None, 50).await.unwrap(), batch);
    assert_eq!(s.position(0).await.unwrap(), Some(3));
}

pub async fn duplicate_id_is_stored_once(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("r", 0, "same")], 1).await.unwrap();
    s.apply(0, vec![message("r", 4, "same"), message("r", 5, "new")], 6)
        .await
        .unwrap();
    assert_eq!(offsets(&s.page("r", None, 50).await.unwrap()), vec![0, 5]);
    // The same id in another room is another message.
    s.apply(1, vec![message("q", 0, "same")], 1).await.unwrap();
    assert_eq!(offsets(&s.page("q", None, 50).await.unwrap()), vec![0]);
}

pub async fn positions_are_per_partition(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("a", 0, "1")], 1).await.unwrap();
    s.apply(1, Vec::new(), 10).await.unwrap();
    assert_eq!(s.position(0).await.unwrap(), Some(1));
    assert_eq!(s.position(1).await.unwrap(), Some(10));
    assert_eq!(s.position(2).await.unwrap(), None);
}

pub async fn find_id_returns_the_first_offset(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("r", 7, "x"), message("r", 9, "x")], 10)
        .await
        .unwrap();
    assert_eq!(s.find_id("r", "x").await.unwrap(), Some(7));
    assert_eq!(s.find_id("other", "x").await.unwrap(), None);
}

pub async fn find_ids_answers_each_key(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("r", 3, "x"), message("q", 4, "y")], 5)
        .await
        .unwrap();
    let keys = [("r", "x"), ("r", "y"), ("q", "y"), ("nowhere", "x")]
        .map(|(r, i)| (r.to_owned(), i.to_owned()));
    let found = s.find_ids(&keys).await.unwrap();
    let ts = |o: u64| message("r", o, "").ts;
    assert_eq!(found, vec![Some((3, ts(3))), None, Some((4, ts(4))), None]);
}

pub async fn unicode_bodies_round_trip(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let mut m = message("r", 0, "u");
    m.body = "héllo 🌍 <script>alert(1)</script> \u{0}".into();
    m.user = "zoë".into();
    s.apply(0, vec![m.clone()], 1).await.unwrap();
    assert_eq!(s.page("r", None, 1).await.unwrap(), vec![m]);
}

pub async fn read_positions_keep_the_highest(h: &impl StoreHarness) {
    let s = h.fresh().await;
    assert_eq!(s.read_position("r", "ada").await.unwrap(), None);
    s.apply_batch(0, reads(vec![read("r", "ada", 5), read("r", "ada", 3)]), 6)
        .await
        .unwrap();
    assert_eq!(s.read_position("r", "ada").await.unwrap(), Some(5));
    // A later, lower position (an older message read again) moves nothing.
    s.apply_batch(0, reads(vec![read("r", "ada", 2)]), 7)
        .await
        .unwrap();
    assert_eq!(s.read_position("r", "ada").await.unwrap(), Some(5));
    s.apply_batch(0, reads(vec![read("r", "ada", 9)]), 10)
        .await
        .unwrap();
    assert_eq!(s.read_position("r", "ada").await.unwrap(), Some(9));
}

pub async fn read_positions_are_per_room_and_user(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let marks = vec![
        read("r", "ada", 4),
        read("r", "bob", 2),
        read("q", "ada", 7),
    ];
    s.apply_batch(0, reads(marks), 8).await.unwrap();
    assert_eq!(s.read_position("r", "bob").await.unwrap(), Some(2));
    assert_eq!(s.read_position("q", "ada").await.unwrap(), Some(7));
    assert_eq!(s.read_position("q", "bob").await.unwrap(), None);
    assert_eq!(
        s.reads("r").await.unwrap(),
        vec![("ada".to_owned(), 4), ("bob".to_owned(), 2)]
    );
    assert!(s.reads("nowhere").await.unwrap().is_empty());
}

pub async fn a_covered_batch_moves_no_read_position(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply_batch(0, reads(vec![read("r", "ada", 1)]), 5)
        .await
        .unwrap();
    let replayed = Batch {
        reads: vec![read("r", "ada", 4)],
        members: vec![("ada".to_owned(), "elsewhere".to_owned())],
        ..Batch::default()
    };
    s.apply_batch(0, replayed, 5).await.unwrap();
    assert_eq!(s.read_position("r", "ada").await.unwrap(), Some(1));
    assert!(s.user_rooms("ada").await.unwrap().is_empty());
}

pub async fn rooms_are_listed_per_user_once(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let member = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    let batch = Batch {
        messages: vec![message("general", 0, "1")],
        reads: Vec::new(),
        members: vec![
            member("alice", "general"),
            member("alice", "dm:alice:bob"),
            member("bob", "dm:alice:bob"),
            member("alice", "general"),
        ],
    };
    s.apply_batch(0, batch, 1).await.unwrap();
    s.apply_batch(
        0,
        Batch {
            members: vec![member("alice", "general"), member("alice", "a-team")],
            ..Batch::default()
        },
        2,
    )
    .await
    .unwrap();
    assert_eq!(
        s.user_rooms("alice").await.unwrap(),
        ["a-team", "dm:alice:bob", "general"]
    );
    assert_eq!(s.user_rooms("bob").await.unwrap(), ["dm:alice:bob"]);
    assert!(s.user_rooms("carol").await.unwrap().is_empty());
}

pub async fn unread_counts_messages_after_the_read_position(h: &impl StoreHarness) {
    let s = h.fresh().await;
    // Two rooms interleaved in one partition.
    let batch: Vec<_> = (0..40)
        .map(|o| message(if o % 2 == 0 { "r" } else { "q" }, o, &format!("id{o}")))
        .collect();
    s.apply(0, batch, 40).await.unwrap();
    assert_eq!(s.count_after("r", None, 1000).await.unwrap(), 20);
    assert_eq!(s.count_after("r", Some(29), 1000).await.unwrap(), 5);
    assert_eq!(s.count_after("r", Some(30), 1000).await.unwrap(), 4);
    assert_eq!(s.count_after("r", Some(39), 1000).await.unwrap(), 0);
    assert_eq!(s.count_after("r", None, 7).await.unwrap(), 7);
    assert_eq!(s.count_after("nowhere", None, 1000).await.unwrap(), 0);
}
