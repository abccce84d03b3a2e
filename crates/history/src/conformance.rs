//! The conformance suite every history store must pass, written once.
//!
//! A backend provides a [`StoreHarness`] and expands
//! [`store_conformance_suite!`]; each case becomes its own named test.

use std::sync::Arc;

use async_trait::async_trait;
use schemas::protocol::MessageView;

use schemas::protocol::{Reaction, MAX_REACTION_USERS_LISTED};
use schemas::Change;

use crate::{AsOf, Batch, ChangeMark, HistoryStore, PastMessage, ReadMark};

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
            changes_fold_into_pages,
            only_the_author_edits_or_deletes,
            a_deleted_message_is_a_tombstone_that_takes_no_change,
            a_retried_change_is_applied_once,
            a_change_in_the_batch_of_its_target_applies,
            a_change_of_no_message_changes_nothing,
            a_covered_batch_applies_no_change,
            reactions_name_at_most_the_listed_users,
            as_of_shows_the_room_as_it_stood,
            as_of_points_to_the_log_for_a_body_deleted_since,
            changes_between_lists_a_rooms_changes_in_log_order,
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
        ..MessageView::default()
    }
}

/// `user`'s change `id`, at `offset`, of the message of `room` at `target`.
pub fn change(
    room: &str,
    offset: u64,
    id: &str,
    user: &str,
    target: u64,
    change: Change,
) -> ChangeMark {
    ChangeMark {
        room: room.to_owned(),
        offset,
        id: id.to_owned(),
        user: user.to_owned(),
        target,
        change,
        ts: 1_700_000_000_000 + offset as i64,
    }
}

fn changes(marks: Vec<ChangeMark>) -> Batch {
    Batch {
        changes: marks,
        ..Batch::default()
    }
}

fn by(mut m: MessageView, user: &str) -> MessageView {
    m.user = user.to_owned();
    m
}

fn edit(body: &str) -> Change {
    Change::Edit {
        body: body.to_owned(),
    }
}

fn react(emoji: &str) -> Change {
    Change::React {
        emoji: emoji.to_owned(),
    }
}

fn unreact(emoji: &str) -> Change {
    Change::Unreact {
        emoji: emoji.to_owned(),
    }
}

fn reaction(emoji: &str, users: &[&str]) -> Reaction {
    Reaction {
        emoji: emoji.to_owned(),
        count: users.len() as u64,
        users: users.iter().map(|u| u.to_string()).collect(),
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
        changes: Vec::new(),
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
    // A deleted message is no longer unread; other changes count nothing.
    s.apply_batch(
        0,
        changes(vec![
            change("r", 40, "d", "alice", 32, Change::Delete),
            change("r", 41, "x", "bob", 34, react("👍")),
            change("r", 42, "e", "alice", 36, edit("edited")),
        ]),
        43,
    )
    .await
    .unwrap();
    assert_eq!(s.count_after("r", Some(29), 1000).await.unwrap(), 4);
    assert_eq!(s.count_after("r", Some(32), 1000).await.unwrap(), 3);
    assert_eq!(s.count_after("r", None, 1000).await.unwrap(), 19);
    assert_eq!(s.count_after("r", None, 19).await.unwrap(), 19);
}

pub async fn changes_fold_into_pages(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    let m1 = message("r", 1, "m1");
    let m2 = by(message("r", 2, "m2"), "bob");
    s.apply(0, vec![m0.clone(), m1.clone(), m2.clone()], 3)
        .await
        .unwrap();
    s.apply_batch(
        0,
        changes(vec![
            change("r", 3, "e1", "alice", 0, edit("first edit")),
            change("r", 4, "x1", "bob", 1, react("👍")),
            change("r", 5, "x2", "carol", 1, react("👍")),
        ]),
        6,
    )
    .await
    .unwrap();
    s.apply_batch(
        0,
        changes(vec![
            change("r", 6, "e2", "alice", 0, edit("second edit")),
            change("r", 7, "x3", "bob", 1, react("🎉")),
            change("r", 8, "x4", "bob", 1, unreact("👍")),
            change("r", 9, "d1", "bob", 2, Change::Delete),
        ]),
        10,
    )
    .await
    .unwrap();
    let mut e0 = m0.clone();
    e0.body = "second edit".into();
    e0.edited_ts = Some(change("r", 6, "", "", 0, Change::Delete).ts);
    let mut r1 = m1.clone();
    r1.reactions = vec![reaction("👍", &["carol"]), reaction("🎉", &["bob"])];
    let mut d2 = m2.clone();
    d2.body = String::new();
    d2.deleted = true;
    let page = s.page("r", None, 50).await.unwrap();
    assert_eq!(page, vec![e0.clone(), r1.clone(), d2.clone()]);
    // Pages walk back the same way, and a message alone reads the same.
    assert_eq!(
        s.page("r", Some(2), 1).await.unwrap(),
        vec![r1.clone()],
        "before 2"
    );
    assert_eq!(s.message("r", 0).await.unwrap(), Some(e0));
    assert_eq!(s.message("r", 2).await.unwrap(), Some(d2));
    assert_eq!(
        s.message("r", 3).await.unwrap(),
        None,
        "a change is no message"
    );
    assert_eq!(s.position(0).await.unwrap(), Some(10));
}

pub async fn only_the_author_edits_or_deletes(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    s.apply(0, vec![m0.clone()], 1).await.unwrap();
    s.apply_batch(
        0,
        changes(vec![
            change("r", 1, "e", "mallory", 0, edit("not yours")),
            change("r", 2, "d", "mallory", 0, Change::Delete),
        ]),
        3,
    )
    .await
    .unwrap();
    assert_eq!(s.page("r", None, 50).await.unwrap(), vec![m0]);
}

pub async fn a_deleted_message_is_a_tombstone_that_takes_no_change(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    s.apply(0, vec![m0.clone()], 1).await.unwrap();
    s.apply_batch(
        0,
        changes(vec![
            change("r", 1, "e", "alice", 0, edit("edited")),
            change("r", 2, "x", "bob", 0, react("👍")),
            change("r", 3, "d", "alice", 0, Change::Delete),
            change("r", 4, "e2", "alice", 0, edit("after the delete")),
            change("r", 5, "x2", "carol", 0, react("🎉")),
        ]),
        6,
    )
    .await
    .unwrap();
    let tombstone = MessageView {
        body: String::new(),
        deleted: true,
        ..m0
    };
    assert_eq!(
        s.page("r", None, 50).await.unwrap(),
        vec![tombstone.clone()]
    );
    // No body of it is left to read back, not even the edit that came after
    // the delete (in another batch too): every moment after the delete
    // shows the tombstone, and a catch-up lists no edit of it.
    s.apply_batch(
        0,
        changes(vec![change("r", 6, "e3", "alice", 0, edit("later still"))]),
        7,
    )
    .await
    .unwrap();
    for upto in 3..7 {
        let page = s
            .page_as_of("r", None, 50, AsOf::Offset(upto))
            .await
            .unwrap();
        assert_eq!(page, vec![past(tombstone.clone(), None)], "as of {upto}");
    }
    let listed = s.changes_between("r", 0, 7).await.unwrap();
    assert!(
        listed
            .iter()
            .all(|c| !matches!(c.change, Change::Edit { .. })),
        "{listed:?}"
    );
}

pub async fn a_retried_change_is_applied_once(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("r", 0, "m0")], 1).await.unwrap();
    s.apply_batch(
        0,
        changes(vec![
            change("r", 1, "x", "bob", 0, react("👍")),
            change("r", 2, "y", "bob", 0, unreact("👍")),
        ]),
        3,
    )
    .await
    .unwrap();
    // The first react reached the log again after its undo: skipped by id.
    s.apply_batch(
        0,
        changes(vec![change("r", 3, "x", "bob", 0, react("👍"))]),
        4,
    )
    .await
    .unwrap();
    assert!(s.page("r", None, 50).await.unwrap()[0].reactions.is_empty());
    // A change's id answers a retry like a message's: its first offset.
    assert_eq!(s.find_id("r", "x").await.unwrap(), Some(1));
    let keys = [("r", "x"), ("r", "y"), ("r", "m0")].map(|(r, i)| (r.to_owned(), i.to_owned()));
    let ts = |o: u64| message("r", o, "").ts;
    assert_eq!(
        s.find_ids(&keys).await.unwrap(),
        vec![Some((1, ts(1))), Some((2, ts(2))), Some((0, ts(0)))]
    );
    // A message reusing a change's id is a duplicate too.
    s.apply(0, vec![message("r", 4, "y")], 5).await.unwrap();
    assert_eq!(offsets(&s.page("r", None, 50).await.unwrap()), vec![0]);
}

pub async fn a_change_in_the_batch_of_its_target_applies(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    s.apply_batch(
        0,
        Batch {
            messages: vec![m0.clone()],
            changes: vec![
                change("r", 1, "e", "alice", 0, edit("typo fixed")),
                change("r", 2, "x", "bob", 0, react("👀")),
            ],
            ..Batch::default()
        },
        3,
    )
    .await
    .unwrap();
    let expected = MessageView {
        body: "typo fixed".into(),
        edited_ts: Some(change("r", 1, "", "", 0, Change::Delete).ts),
        reactions: vec![reaction("👀", &["bob"])],
        ..m0
    };
    assert_eq!(s.page("r", None, 50).await.unwrap(), vec![expected]);
}

pub async fn a_change_of_no_message_changes_nothing(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let q0 = message("q", 0, "q0");
    s.apply(0, vec![q0.clone()], 1).await.unwrap();
    s.apply_batch(
        0,
        changes(vec![
            // Room r has no message 0 (it is q's), nor 7.
            change("r", 1, "x", "alice", 0, edit("where")),
            change("r", 2, "y", "alice", 7, react("👍")),
        ]),
        3,
    )
    .await
    .unwrap();
    assert!(s.page("r", None, 50).await.unwrap().is_empty());
    assert_eq!(s.page("q", None, 50).await.unwrap(), vec![q0]);
    // Its id is kept: a retry is answered, not appended again.
    assert_eq!(s.find_id("r", "x").await.unwrap(), Some(1));
}

pub async fn a_covered_batch_applies_no_change(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    s.apply(0, vec![m0.clone()], 5).await.unwrap();
    s.apply_batch(
        0,
        changes(vec![change("r", 3, "e", "alice", 0, edit("stale"))]),
        4,
    )
    .await
    .unwrap();
    assert_eq!(s.page("r", None, 50).await.unwrap(), vec![m0]);
    assert_eq!(s.find_id("r", "e").await.unwrap(), None);
}

pub async fn reactions_name_at_most_the_listed_users(h: &impl StoreHarness) {
    let s = h.fresh().await;
    s.apply(0, vec![message("r", 0, "m0")], 1).await.unwrap();
    let users = MAX_REACTION_USERS_LISTED + 20;
    let marks: Vec<ChangeMark> = (0..users)
        .map(|i| {
            let offset = 1 + i as u64;
            change(
                "r",
                offset,
                &format!("x{i}"),
                &format!("u{i:03}"),
                0,
                react("👍"),
            )
        })
        .collect();
    s.apply_batch(0, changes(marks), 1 + users as u64)
        .await
        .unwrap();
    // The first reactor takes it back: the count follows, the rest stay in order.
    let next = 1 + users as u64;
    s.apply_batch(
        0,
        changes(vec![change("r", next, "undo", "u000", 0, unreact("👍"))]),
        next + 1,
    )
    .await
    .unwrap();
    let page = s.page("r", None, 50).await.unwrap();
    let reactions = &page[0].reactions;
    assert_eq!(reactions.len(), 1);
    assert_eq!(reactions[0].count, users as u64 - 1);
    assert_eq!(reactions[0].users.len(), MAX_REACTION_USERS_LISTED);
    assert_eq!(reactions[0].users[0], "u001");
    assert_eq!(
        reactions[0].users[MAX_REACTION_USERS_LISTED - 1],
        format!("u{MAX_REACTION_USERS_LISTED:03}")
    );
}

fn past(message: MessageView, body_on_log: Option<u64>) -> PastMessage {
    PastMessage {
        message,
        body_on_log,
    }
}

pub async fn as_of_shows_the_room_as_it_stood(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let (m0, m1) = (message("r", 0, "m0"), message("r", 1, "m1"));
    let m2 = message("r", 4, "m2");
    let ts = |o: u64| message("r", o, "").ts;
    s.apply(0, vec![m0.clone(), m1.clone()], 2).await.unwrap();
    s.apply_batch(
        0,
        Batch {
            messages: vec![m2.clone()],
            changes: vec![
                change("r", 2, "e1", "alice", 0, edit("edited once")),
                change("r", 3, "x1", "bob", 1, react("👍")),
                change("r", 5, "d1", "alice", 1, Change::Delete),
                change("r", 6, "e2", "alice", 0, edit("edited twice")),
            ],
            ..Batch::default()
        },
        7,
    )
    .await
    .unwrap();
    let at = |upto: u64| {
        let s = s.clone();
        async move {
            s.page_as_of("r", None, 50, AsOf::Offset(upto))
                .await
                .unwrap()
        }
    };
    // Before any change: as posted. m1 was deleted since: its body is on
    // the log, at its own record.
    let gone = |m: &MessageView| MessageView {
        body: String::new(),
        ..m.clone()
    };
    assert_eq!(
        at(1).await,
        vec![past(m0.clone(), None), past(gone(&m1), Some(1))]
    );
    let mut e0 = m0.clone();
    e0.body = "edited once".into();
    e0.edited_ts = Some(ts(2));
    assert_eq!(
        at(2).await,
        vec![past(e0.clone(), None), past(gone(&m1), Some(1))]
    );
    let mut r1 = gone(&m1);
    r1.reactions = vec![reaction("👍", &["bob"])];
    assert_eq!(
        at(3).await,
        vec![past(e0.clone(), None), past(r1.clone(), Some(1))]
    );
    assert_eq!(
        at(4).await,
        vec![
            past(e0.clone(), None),
            past(r1, Some(1)),
            past(m2.clone(), None)
        ]
    );
    let d1 = MessageView {
        deleted: true,
        ..gone(&m1)
    };
    assert_eq!(
        at(5).await,
        vec![
            past(e0.clone(), None),
            past(d1.clone(), None),
            past(m2.clone(), None)
        ]
    );
    // At the end: exactly the current page.
    let now: Vec<MessageView> = at(6).await.into_iter().map(|p| p.message).collect();
    assert_eq!(now, s.page("r", None, 50).await.unwrap());
    // A time means what was stamped by then; cursors and limits as in pages.
    let by_time = s
        .page_as_of("r", None, 50, AsOf::Time(ts(2)))
        .await
        .unwrap();
    assert_eq!(by_time, at(2).await);
    let older = s
        .page_as_of("r", Some(4), 1, AsOf::Offset(6))
        .await
        .unwrap();
    assert_eq!(older, vec![past(d1, None)]);
    assert!(s
        .page_as_of("r", None, 50, AsOf::Time(ts(0) - 1))
        .await
        .unwrap()
        .is_empty());
}

pub async fn as_of_points_to_the_log_for_a_body_deleted_since(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let m0 = message("r", 0, "m0");
    s.apply_batch(
        0,
        Batch {
            messages: vec![m0.clone()],
            changes: vec![
                change("r", 1, "e", "alice", 0, edit("second thoughts")),
                change("r", 2, "d", "alice", 0, Change::Delete),
            ],
            ..Batch::default()
        },
        3,
    )
    .await
    .unwrap();
    let gone = MessageView {
        body: String::new(),
        ..m0.clone()
    };
    let at = |upto| s.page_as_of("r", None, 50, AsOf::Offset(upto));
    assert_eq!(at(0).await.unwrap(), vec![past(gone.clone(), Some(0))]);
    // Edited then: the body is the edit's, on the log at the edit.
    let edited = MessageView {
        edited_ts: Some(message("r", 1, "").ts),
        ..gone.clone()
    };
    assert_eq!(at(1).await.unwrap(), vec![past(edited, Some(1))]);
    let tombstone = MessageView {
        deleted: true,
        ..gone
    };
    assert_eq!(at(2).await.unwrap(), vec![past(tombstone, None)]);
}

pub async fn changes_between_lists_a_rooms_changes_in_log_order(h: &impl StoreHarness) {
    let s = h.fresh().await;
    let (m0, m1, q2) = (
        message("r", 0, "m0"),
        message("r", 1, "m1"),
        message("q", 2, "q2"),
    );
    let e3 = change("r", 3, "e3", "alice", 1, edit("one"));
    let x4 = change("r", 4, "x4", "bob", 0, react("👍"));
    let y5 = change("q", 5, "y5", "bob", 2, react("👍"));
    let e6 = change("r", 6, "e6", "alice", 0, edit("edited, then deleted"));
    let retry = change("r", 7, "x4", "bob", 0, react("👍"));
    let d8 = change("r", 8, "d8", "alice", 0, Change::Delete);
    s.apply_batch(
        0,
        Batch {
            messages: vec![m0, m1, q2],
            changes: vec![e3.clone(), x4.clone(), y5.clone(), e6, retry, d8.clone()],
            ..Batch::default()
        },
        9,
    )
    .await
    .unwrap();
    // In log order, the retry not listed, the deleted message's edit left
    // out (its body is gone; the delete follows it).
    assert_eq!(
        s.changes_between("r", 0, 9).await.unwrap(),
        vec![e3.clone(), x4.clone(), d8]
    );
    assert_eq!(s.changes_between("r", 4, 8).await.unwrap(), vec![x4]);
    assert_eq!(s.changes_between("q", 0, 9).await.unwrap(), vec![y5]);
    assert!(s.changes_between("r", 9, 100).await.unwrap().is_empty());
}
