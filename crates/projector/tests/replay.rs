//! Replay and projection versions on the embedded log and store: poison
//! records, fixtures of every released schema version, `--from` a time, and
//! a live switch of the projector to a replayed version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eventlog::embedded::EmbeddedLog;
use eventlog::{EventLog, LogRecord, Record};
use futures::StreamExt;
use history::embedded::EmbeddedVersions;
use history::versions::{CurrentVersion, Versions};
use history::HistoryStore;
use projector::replay::{Progress, Replay, ReplayConfig, StartAt, Summary};
use projector::{Projector, ProjectorConfig};
use schemas::protocol::MessageView;
use schemas::{ChatEvent, MessagePosted};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn posted(room: &str, n: u64, ts: i64) -> Record {
    let event = ChatEvent::MessagePosted(MessagePosted {
        room: room.into(),
        client_id: format!("id-{room}-{n}"),
        user: "grace".into(),
        body: format!("message {n}"),
        ts,
    });
    Record {
        key: room.as_bytes().to_vec(),
        value: schemas::encode(&event),
        ts,
    }
}

fn raw(room: &str, value: Vec<u8>, ts: i64) -> Record {
    Record {
        key: room.as_bytes().to_vec(),
        value,
        ts,
    }
}

/// Single-object header with a fingerprint no released schema has, then a
/// plausible datum.
fn unknown_fingerprint() -> Vec<u8> {
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    bytes.extend_from_slice(&[0, 2, b'r', 2, b'i', 2, b'u', 2, b'b', 2]);
    bytes
}

/// Every page of every room in `rooms`, walking back `limit` at a time.
async fn pages(store: &dyn HistoryStore, rooms: &[&str], limit: usize) -> Vec<Vec<MessageView>> {
    let mut all = Vec::new();
    for room in rooms {
        let mut before = None;
        loop {
            let page = store.page(room, before, limit).await.unwrap();
            let Some(first) = page.first() else { break };
            before = Some(first.offset as u64);
            let last = page.len() < limit;
            all.push(page);
            if last {
                break;
            }
        }
    }
    all
}

/// Waits until `store` has applied every partition of `log` to its head.
async fn caught_up(log: &dyn EventLog, store: &dyn HistoryStore) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut done = true;
        for p in 0..log.partitions() {
            let end = log.end_offset(p).await.unwrap();
            let at = store.position(p).await.unwrap().unwrap_or(0);
            done &= end == 0 || at >= end;
        }
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "projection did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every record of the one-partition dead-letter log, as JSON.
async fn dead_letters(dlq: &dyn EventLog, n: usize) -> Vec<serde_json::Value> {
    let mut stream = dlq.read(0, 0);
    let mut out: Vec<LogRecord> = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("dead letters before the deadline")
            .unwrap()
            .unwrap();
        out.extend(batch);
    }
    assert_eq!(
        dlq.end_offset(0).await.unwrap(),
        n as u64,
        "no more dead letters than that"
    );
    out.iter()
        .map(|r| serde_json::from_slice(&r.value).unwrap())
        .collect()
}

async fn replay(
    log: &Arc<dyn EventLog>,
    target: Arc<dyn HistoryStore>,
    dlq: Option<Arc<dyn EventLog>>,
    start: StartAt,
) -> Summary {
    let (progress, _) = tokio::sync::watch::channel(Progress::default());
    let summary = Replay::new(log.clone(), target, dlq, ReplayConfig::new(start))
        .run(&progress, CancellationToken::new())
        .await
        .unwrap();
    let last = progress.borrow().clone();
    assert!(last
        .partitions
        .iter()
        .all(|p| p.done && p.position == p.head));
    summary
}

struct Setup {
    _dir: tempfile::TempDir,
    log: Arc<dyn EventLog>,
    dlq: Arc<dyn EventLog>,
    versions: EmbeddedVersions,
}

fn setup(partitions: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.path().join("log"), "chat.messages", partitions).unwrap());
    let dlq: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.path().join("log"), "chat.dlq", 1).unwrap());
    let versions = EmbeddedVersions::open(&dir.path().join("history"), "v1").unwrap();
    Setup {
        _dir: dir,
        log,
        dlq,
        versions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_projector_and_replay_go_on() {
    let s = setup(2);
    let rooms = ["general", "random", "ops"];
    let mut records = Vec::new();
    for n in 0..30 {
        records.push(posted(rooms[n as usize % 3], n, 1_000 + n as i64));
        if n == 10 {
            records.push(raw("general", b"\x00garbage, not avro".to_vec(), 1_010));
        }
        if n == 20 {
            records.push(raw("random", unknown_fingerprint(), 1_020));
        }
    }
    let placed = s.log.append(records).await.unwrap();
    let bad: BTreeSet<(u32, u64)> = [11, 22]
        .iter()
        .map(|&i| (placed[i].partition, placed[i].offset))
        .collect();

    // The projector passes the poison records and reaches the head.
    let live = s.versions.open("v1").await.unwrap();
    let stop = CancellationToken::new();
    let projector = Projector::new(
        s.log.clone(),
        live.clone(),
        Some(s.dlq.clone()),
        ProjectorConfig::new("test"),
    );
    let running = tokio::spawn(projector.run(stop.clone()));
    caught_up(&*s.log, &*live).await;
    stop.cancel();
    running.await.unwrap();

    // So does a replay into a new version.
    let v2 = s.versions.create("v2", "earliest").await.unwrap();
    let summary = replay(&s.log, v2.clone(), Some(s.dlq.clone()), StartAt::Earliest).await;
    assert_eq!(summary.events, 30);
    assert_eq!(summary.dead_lettered, 2);
    assert_eq!(summary.rooms, 3);
    assert_eq!(summary.records, 32);

    // Both hold every good record, the same pages.
    let want = pages(&*live, &rooms, 4).await;
    assert_eq!(want.iter().map(Vec::len).sum::<usize>(), 30);
    assert_eq!(pages(&*v2, &rooms, 4).await, want);

    // The dead-letter topic holds the two bad records, once per consumer,
    // with their reasons and original partition/offset.
    let letters = dead_letters(&*s.dlq, 4).await;
    for consumer in ["projector", "replay"] {
        let mine: Vec<_> = letters
            .iter()
            .filter(|l| l["consumer"] == consumer)
            .collect();
        let at: BTreeSet<(u32, u64)> = mine
            .iter()
            .map(|l| {
                (
                    l["partition"].as_u64().unwrap() as u32,
                    l["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(at, bad, "{consumer}: {letters:?}");
        let reasons: BTreeSet<&str> = mine.iter().map(|l| l["reason"].as_str().unwrap()).collect();
        assert!(
            reasons.contains("not avro single-object encoding"),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("unknown schema fingerprint 0x0123456789abcdef")),
            "{reasons:?}"
        );
    }
}

/// Every fixture of every released schema version under
/// `schemas/avro/history/*/fixtures/`.
fn fixtures() -> Vec<(String, PathBuf)> {
    let history = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/avro/history");
    let mut found = Vec::new();
    for version in std::fs::read_dir(&history).unwrap() {
        let version = version.unwrap().path();
        let Ok(files) = std::fs::read_dir(version.join("fixtures")) else {
            continue;
        };
        for file in files {
            let file = file.unwrap().path();
            if file.extension().is_some_and(|e| e == "bin") {
                let name = version.file_name().unwrap().to_string_lossy().into_owned();
                found.push((name, file));
            }
        }
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_of_every_released_schema_version_replay() {
    let fixtures = fixtures();
    assert!(
        fixtures.iter().any(|(v, _)| v == "v1"),
        "the v1 fixtures are found: {fixtures:?}"
    );
    assert!(
        fixtures.iter().any(|(v, _)| v == "v2"),
        "the v2 fixtures are found: {fixtures:?}"
    );
    let s = setup(4);
    let mut expected = Vec::new();
    let mut read_positions = Vec::new();
    let mut changes = Vec::new();
    // The v3 fixtures change the message at offset 17 of `general`: put
    // their records after it, as a writer would have.
    let padding: Vec<_> = (0..18).map(|n| posted("general", 3000 + n, 1)).collect();
    s.log.append(padding).await.unwrap();
    for (i, (_, path)) in fixtures.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        // What the build that wrote it meant, by the codec's own reading.
        let event = schemas::decode(&bytes).unwrap();
        let (room, ts) = match &event {
            ChatEvent::MessagePosted(m) => (m.room.clone(), m.ts),
            ChatEvent::ReadPositionMoved(r) => (r.room.clone(), r.ts),
            ChatEvent::MessageChanged(c) => (c.room.clone(), c.ts),
        };
        // Appended raw, as the old writer put it on the log, between
        // records of today's schema.
        let offsets = s
            .log
            .append(vec![
                posted(&room, 1000 + i as u64, ts),
                raw(&room, bytes, ts),
                posted(&room, 2000 + i as u64, ts),
            ])
            .await
            .unwrap();
        match event {
            ChatEvent::MessagePosted(m) => expected.push(m),
            ChatEvent::ReadPositionMoved(r) => {
                // Kept, cut at the offset before its own record; then the
                // reader's own message after it (grace sends them all)
                // moves it on to that message.
                let own = offsets[1].offset;
                let cut = (r.offset as u64).min(own - 1);
                let after = if r.user == "grace" {
                    offsets[2].offset
                } else {
                    cut
                };
                read_positions.push((r.room, r.user, after));
            }
            // Projected (not dead-lettered): its id is kept at its offset.
            ChatEvent::MessageChanged(c) => changes.push((c.room, c.client_id, offsets[1].offset)),
        }
    }
    let v2 = s.versions.create("v2", "earliest").await.unwrap();
    let summary = replay(&s.log, v2.clone(), Some(s.dlq.clone()), StartAt::Earliest).await;
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(summary.events, 18 + 3 * fixtures.len() as u64);
    assert!(!read_positions.is_empty());
    assert_eq!(changes.len(), 4, "the v3 fixtures are found: {fixtures:?}");
    for (room, id, offset) in changes {
        assert_eq!(v2.find_id(&room, &id).await.unwrap(), Some(offset), "{id}");
    }
    for (room, user, offset) in read_positions {
        assert_eq!(v2.read_position(&room, &user).await.unwrap(), Some(offset));
        assert!(v2.user_rooms(&user).await.unwrap().contains(&room));
    }
    for m in expected {
        let page = v2.page(&m.room, None, 1000).await.unwrap();
        let got = page
            .iter()
            .find(|v| v.id == m.client_id)
            .unwrap_or_else(|| panic!("fixture {} in {page:?}", m.client_id));
        assert_eq!(
            (&got.user, &got.body, got.ts),
            (&m.user, &m.body, m.ts),
            "the fixture's fields survive"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_time_leaves_older_records_out_and_records_the_position() {
    let s = setup(2);
    // "old" only holds records before the start; timestamps of "mixed" are
    // out of order around it.
    let records = vec![
        posted("old", 0, 100),
        posted("old", 1, 200),
        posted("mixed", 0, 100),
        posted("mixed", 1, 600),
        posted("mixed", 2, 400),
        posted("mixed", 3, 700),
    ];
    s.log.append(records).await.unwrap();
    let v2 = s.versions.create("v2", "t").await.unwrap();
    let summary = replay(&s.log, v2.clone(), None, StartAt::Time(500)).await;
    assert_eq!(summary.events, 2);
    assert_eq!(summary.skipped, 4);
    let ids: Vec<String> = v2
        .page("mixed", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["id-mixed-1", "id-mixed-3"]);
    assert!(v2.page("old", None, 10).await.unwrap().is_empty());
    // Every partition's position is at its head, so a projector taking the
    // version over does not go back to offset 0.
    for p in 0..2 {
        assert_eq!(
            v2.position(p).await.unwrap(),
            Some(s.log.end_offset(p).await.unwrap())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_follows_a_switch_to_a_replayed_version() {
    let s = setup(2);
    let rooms = ["a", "b", "c"];
    let batch = |from: u64| -> Vec<Record> {
        (from..from + 30)
            .map(|n| posted(rooms[n as usize % 3], n, n as i64))
            .collect()
    };
    s.log.append(batch(0)).await.unwrap();
    let versions: Arc<dyn Versions> = Arc::new(s.versions.clone());
    let current = CurrentVersion::open(versions.clone()).await.unwrap();
    let stop = CancellationToken::new();
    let projector = Projector::following(
        s.log.clone(),
        current.subscribe(),
        None,
        ProjectorConfig::new("test"),
    );
    let running = tokio::spawn(projector.run(stop.clone()));
    caught_up(&*s.log, &current).await;
    let v1 = current.active().store;

    let v2 = versions.create("v2", "earliest").await.unwrap();
    replay(&s.log, v2.clone(), None, StartAt::Earliest).await;
    // Not ready yet: refused. Ready: switched.
    let v3 = versions.create("v3", "earliest").await.unwrap();
    assert!(current.switch("v3").await.is_err());
    drop(v3);
    versions.mark_ready("v2").await.unwrap();
    current.switch("v2").await.unwrap();
    assert_eq!(&*current.active().name, "v2");
    assert_eq!(versions.current().await.unwrap(), "v2");

    // New records land in v2 through the projector, from v2's positions.
    s.log.append(batch(30)).await.unwrap();
    caught_up(&*s.log, &*v2).await;
    let all = pages(&*v2, &rooms, 1000).await;
    assert_eq!(all.iter().map(Vec::len).sum::<usize>(), 60);
    assert_eq!(
        pages(&current, &rooms, 7).await,
        pages(&*v2, &rooms, 7).await
    );
    // v1 stays where the switch left it.
    assert_eq!(
        pages(&*v1, &rooms, 1000)
            .await
            .iter()
            .map(Vec::len)
            .sum::<usize>(),
        30
    );

    // The old version can be dropped, the current one cannot.
    assert!(versions.drop_version("v2").await.is_err());
    versions.drop_version("v1").await.unwrap();
    let names: Vec<String> = versions
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["v2", "v3"]);
    stop.cancel();
    running.await.unwrap();
}
