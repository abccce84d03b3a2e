//! A resume older than the ring reads what the history store holds of it,
//! by room, and the rest from the log; a store that fails or lags leaves
//! it to the log. The store here is the real embedded one; its copies of
//! the messages say `store` in their body, the log's say `log`, so each
//! message shows where it came from.

use async_trait::async_trait;
use history::embedded::EmbeddedStore;
use history::{HistoryStore, StoreError};

use super::*;

/// A log of one partition holding `n` messages of room `a` (ids `m{i}`,
/// body `log`), a store holding the first `stored` of them (body `store`),
/// and a fan-out with a ring of 4 over both.
struct Setup {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    log: Arc<dyn EventLog>,
    store: Arc<EmbeddedStore>,
}

async fn setup(n: usize, stored: usize) -> Setup {
    let (dl, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(dl.path(), "chat.messages", 1).unwrap());
    let records: Vec<Record> = (0..n)
        .map(|i| record("a", &format!("m{i}"), "log"))
        .collect();
    log.append(records).await.unwrap();
    let store = Arc::new(EmbeddedStore::open(ds.path(), "v1").unwrap());
    store
        .apply(0, views(0..stored, "store"), stored as u64)
        .await
        .unwrap();
    Setup {
        _dirs: (dl, ds),
        log,
        store,
    }
}

/// Messages of room `a` at `offsets`, as the projector stores them.
fn views(offsets: std::ops::Range<usize>, body: &str) -> Vec<MessageView> {
    offsets
        .map(|i| MessageView {
            room: "a".into(),
            offset: i as i64,
            id: format!("m{i}"),
            user: "alice".into(),
            body: body.into(),
            ts: 1_763_800_000_000,
            ..MessageView::default()
        })
        .collect()
}

/// Joins `a` since `since` on `fanout`, appends a live message, and
/// returns (offset, body) of every message received up to it.
async fn resume(fanout: &Fanout, log: &dyn EventLog, since: i64) -> Vec<(i64, String)> {
    let (tx, mut rx) = mpsc::channel(1024);
    let member = Member::new("bob", tx, CancellationToken::new());
    let since = Position {
        offset: since,
        epoch: fanout.epoch().to_owned(),
    };
    within("join", fanout.join("a", &member, Some(&since)))
        .await
        .unwrap();
    let joined = expect_joined(&mut rx).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    log.append(vec![record("a", "live", "log")]).await.unwrap();
    let got = messages_until(&mut rx, "live").await;
    assert_increasing(&got);
    got.into_iter().map(|m| (m.offset, m.body)).collect()
}

fn expect(range: std::ops::Range<i64>, body: &str) -> Vec<(i64, String)> {
    range.map(|o| (o, body.to_owned())).collect()
}

#[tokio::test]
async fn a_resume_reads_what_the_store_holds_then_the_log() {
    let s = setup(30, 20).await;
    let history: Arc<dyn HistoryStore> = s.store.clone();
    let fanout = Fanout::with_history(s.log.clone(), Some(history), small_ring(4));
    let got = resume(&fanout, &*s.log, 4).await;
    let mut want = expect(5..20, "store");
    want.extend(expect(20..30, "log"));
    want.push((30, "log".into()));
    assert_eq!(got, want);
    fanout.shutdown().await;
}

#[tokio::test]
async fn a_store_that_covers_the_whole_gap_serves_all_of_it() {
    let s = setup(30, 30).await;
    let history: Arc<dyn HistoryStore> = s.store.clone();
    let fanout = Fanout::with_history(s.log.clone(), Some(history), small_ring(4));
    let got = resume(&fanout, &*s.log, -1).await;
    let mut want = expect(0..30, "store");
    want.push((30, "log".into()));
    assert_eq!(got, want);
    fanout.shutdown().await;
}

#[tokio::test]
async fn a_store_behind_the_since_leaves_the_catch_up_to_the_log() {
    let s = setup(30, 5).await;
    let history: Arc<dyn HistoryStore> = s.store.clone();
    let fanout = Fanout::with_history(s.log.clone(), Some(history), small_ring(4));
    let got = resume(&fanout, &*s.log, 9).await;
    let mut want = expect(10..30, "log");
    want.push((30, "log".into()));
    assert_eq!(got, want);
    fanout.shutdown().await;
}

/// A change record of room `a`: `user`'s `change` of the message at `target`.
fn change_record(id: &str, user: &str, target: i64, change: schemas::Change) -> Record {
    let ts = 1_763_800_000_000;
    let event = schemas::ChatEvent::MessageChanged(schemas::MessageChanged {
        room: "a".to_owned(),
        client_id: id.to_owned(),
        user: user.to_owned(),
        target,
        change,
        ts,
    });
    Record {
        key: b"a".to_vec(),
        value: schemas::encode(&event),
        ts,
    }
}

/// A resume served from the store gets the changes made while the client
/// was away, in their places among the messages, also those of messages
/// older than its `since` (which no message it gets carries).
#[tokio::test]
async fn a_resume_from_the_store_passes_on_the_changes_in_its_range() {
    use schemas::Change;
    let s = setup(30, 0).await;
    let edit = change_record(
        "e",
        "alice",
        2,
        Change::Edit {
            body: "fixed".into(),
        },
    );
    let react = change_record(
        "x",
        "bob",
        3,
        Change::React {
            emoji: "👍".into()
        },
    );
    s.log.append(vec![edit, react]).await.unwrap();
    s.log
        .append(
            (0..4)
                .map(|i| record("a", &format!("n{i}"), "log"))
                .collect(),
        )
        .await
        .unwrap();
    // The store holds the messages and both changes: up to offset 32.
    let change =
        |offset: u64, id: &str, user: &str, target: u64, change: Change| history::ChangeMark {
            room: "a".into(),
            offset,
            id: id.into(),
            user: user.into(),
            target,
            change,
            ts: 1_763_800_000_000,
        };
    s.store
        .apply_batch(
            0,
            history::Batch {
                messages: views(0..30, "store"),
                changes: vec![
                    change(
                        30,
                        "e",
                        "alice",
                        2,
                        Change::Edit {
                            body: "fixed".into(),
                        },
                    ),
                    change(
                        31,
                        "x",
                        "bob",
                        3,
                        Change::React {
                            emoji: "👍".into()
                        },
                    ),
                ],
                ..history::Batch::default()
            },
            32,
        )
        .await
        .unwrap();
    let history: Arc<dyn HistoryStore> = s.store.clone();
    let fanout = Fanout::with_history(s.log.clone(), Some(history), small_ring(4));
    let (tx, mut rx) = mpsc::channel(1024);
    let member = Member::new("carol", tx, CancellationToken::new());
    let since = Position {
        offset: 4,
        epoch: fanout.epoch().to_owned(),
    };
    within("join", fanout.join("a", &member, Some(&since)))
        .await
        .unwrap();
    expect_joined(&mut rx).await;
    s.log
        .append(vec![record("a", "live", "log")])
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let f = next_frame(&mut rx).await;
        let done = f["id"] == "live";
        got.push((
            f["type"].as_str().unwrap().to_owned(),
            f["offset"].as_i64().unwrap(),
        ));
        if done {
            break;
        }
    }
    let mut want: Vec<(String, i64)> = (5..30).map(|o| ("message".to_owned(), o)).collect();
    want.push(("edit".into(), 30));
    want.push(("react".into(), 31));
    want.extend((32..37).map(|o| ("message".to_owned(), o)));
    assert_eq!(got, want);
    fanout.shutdown().await;
}

/// A store that cannot be reached.
struct Down;

#[async_trait]
impl HistoryStore for Down {
    async fn apply_batch(&self, _: u32, _: history::Batch, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn read_position(&self, _: &str, _: &str) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn reads(&self, _: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn user_rooms(&self, _: &str) -> Result<Vec<String>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn position(&self, _: u32) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn page(
        &self,
        _: &str,
        _: Option<u64>,
        _: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn find_id(&self, _: &str, _: &str) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn page_as_of(
        &self,
        _: &str,
        _: Option<u64>,
        _: usize,
        _: history::AsOf,
    ) -> Result<Vec<history::PastMessage>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn changes_between(
        &self,
        _: &str,
        _: u64,
        _: u64,
    ) -> Result<Vec<history::ChangeMark>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
}

#[tokio::test]
async fn a_store_that_fails_leaves_the_catch_up_to_the_log() {
    let s = setup(30, 30).await;
    let fanout = Fanout::with_history(s.log.clone(), Some(Arc::new(Down)), small_ring(4));
    let got = resume(&fanout, &*s.log, 4).await;
    let mut want = expect(5..30, "log");
    want.push((30, "log".into()));
    assert_eq!(got, want);
    fanout.shutdown().await;
}

/// The walk back through the store's pages returns exactly the range,
/// oldest first, across many pages, and gives up on more than it may hold.
#[tokio::test]
async fn the_store_is_read_back_page_by_page_to_the_start_of_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), "v1").unwrap();
    store.apply(0, views(0..700, "store"), 700).await.unwrap();
    let got = crate::join::from_store::messages_between(&store, "a", 100, 650)
        .await
        .unwrap();
    let offsets: Vec<i64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (100..650).collect::<Vec<i64>>());
    let all = crate::join::from_store::messages_between(&store, "a", 0, 700)
        .await
        .unwrap();
    assert_eq!(all.len(), 700);
    assert!(
        crate::join::from_store::messages_between(&store, "b", 0, 700)
            .await
            .unwrap()
            .is_empty()
    );
}
