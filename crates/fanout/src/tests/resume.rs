//! Joining with `since`: every message after it, no gap, no duplicate,
//! whether it comes from the ring, a catch-up from the log, or both, and
//! while messages keep coming.

use super::*;

/// Appends 20 messages to rooms `a` and `b` (last one `a`'s) while a watcher
/// is in `a`, and waits until the watcher has them all: the dispatcher's
/// ring then holds its newest `ring` messages. Returns the records.
async fn fill_ring(h: &Harness) -> Vec<Record> {
    let (watcher, mut rw, _) = h.member(256);
    h.join("a", &watcher, None).await.unwrap();
    expect_joined(&mut rw).await;
    let records: Vec<Record> = (0..20)
        .map(|i| record(if i % 3 == 2 { "b" } else { "a" }, &format!("m{i}"), "hi"))
        .collect();
    assert_eq!(
        records.last().map(|r| r.key.as_slice()),
        Some(&b"a"[..]),
        "the last record is a's, so the watcher sees the dispatcher reach the end"
    );
    h.append(&records).await;
    messages_until(&mut rw, "m19").await;
    records
}

/// The ring's (start, next) of partition 0.
fn ring_bounds(h: &Harness) -> (u64, u64) {
    let state = h.fanout.state_of(0).expect("partition 0 has a dispatcher");
    let st = state.lock().unwrap();
    (st.ring_start, st.next)
}

#[tokio::test]
async fn a_join_since_within_the_ring_resumes_without_gap_or_duplicate() {
    let h = Harness::new(1, small_ring(8));
    let records = fill_ring(&h).await;
    let (ring_start, next) = ring_bounds(&h);
    assert_eq!((ring_start, next), (12, 20));

    let since = 14;
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(since)).await.unwrap();
    let joined = expect_joined(&mut rx).await;
    assert_eq!(joined["position"]["offset"], 19);
    assert_eq!(joined["recovered"], true);
    h.append(&[record("b", "live-b", "x"), record("a", "live", "x")])
        .await;
    let got = messages_until(&mut rx, "live").await;
    let mut want: Vec<(String, String)> = expected(&records[since as usize + 1..], &["a"]);
    want.push(("a".into(), "live".into()));
    assert_eq!(ids(&got), want);
    assert_increasing(&got);
    assert!(got[0].offset > since);
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_join_since_older_than_the_ring_catches_up_then_hands_over() {
    let h = Harness::new(1, small_ring(4));
    let records = fill_ring(&h).await;
    assert_eq!(ring_bounds(&h), (16, 20), "offset 3 is older than the ring");

    let since = 2;
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(since)).await.unwrap();
    expect_joined(&mut rx).await;
    h.append(&[record("a", "live", "x")]).await;
    let got = messages_until(&mut rx, "live").await;
    let mut want = expected(&records[since as usize + 1..], &["a"]);
    want.push(("a".into(), "live".into()));
    assert_eq!(ids(&got), want);
    assert_increasing(&got);
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_catch_up_waits_for_a_slow_reader_instead_of_kicking_it() {
    let h = Harness::new(1, FanoutConfig::default());
    let records: Vec<Record> = (0..50)
        .map(|i| record("a", &format!("m{i}"), "hi"))
        .collect();
    h.append(&records).await;
    // No dispatcher yet: everything comes from the log, through a queue of 2.
    let (m, mut rx, kick) = h.member(2);
    let fanout = h.fanout.clone();
    let since = h.since(-1);
    let join = tokio::spawn({
        let m = m.clone();
        async move { fanout.join("a", &m, Some(&since)).await }
    });
    expect_joined(&mut rx).await;
    let got = messages_until(&mut rx, "m49").await;
    within("join", join).await.unwrap().unwrap();
    assert!(!kick.is_cancelled());
    assert_eq!(ids(&got), expected(&records, &["a"]));
    assert_increasing(&got);
    h.fanout.shutdown().await;
}

/// Members join at different points while messages keep coming; each one
/// gets exactly the room's messages after its `since` (or after the head
/// it was told), whichever path (ring, catch-up, both) its join took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_racing_live_appends_get_every_message_once() {
    let h = Arc::new(Harness::new(1, small_ring(16)));
    let (watcher, mut rw, _) = h.member(4096);
    h.join("a", &watcher, None).await.unwrap();
    expect_joined(&mut rw).await;
    let total = 400;
    let appender = tokio::spawn({
        let h = h.clone();
        async move {
            for chunk in (0..total).collect::<Vec<_>>().chunks(5) {
                let batch: Vec<Record> = chunk
                    .iter()
                    .map(|i| record(if i % 4 == 3 { "b" } else { "a" }, &format!("m{i}"), "hi"))
                    .collect();
                h.append(&batch).await;
                tokio::task::yield_now().await;
            }
            h.append(&[record("a", "end", "bye")]).await;
        }
    });
    let mut joiners = Vec::new();
    for (n, since) in [Some(-1), None, Some(5), Some(150), None, Some(60)]
        .into_iter()
        .enumerate()
    {
        // Let some messages through between joins.
        let until = format!("m{}", (n + 1) * 40);
        while expect_message(&mut rw).await.id != until {}
        let (m, rx, kick) = h.member(4096);
        h.join("a", &m, since).await.unwrap();
        joiners.push((since, m, rx, kick));
    }
    within("appends", appender).await.unwrap();
    for (since, _m, mut rx, kick) in joiners {
        let joined = expect_joined(&mut rx).await;
        let after = since.unwrap_or_else(|| joined["position"]["offset"].as_i64().unwrap());
        let got = messages_until(&mut rx, "end").await;
        assert!(!kick.is_cancelled());
        assert_increasing(&got);
        assert!(got.iter().all(|m| m.room == "a"));
        // Room `a` has a message at every offset but every fourth one.
        let want: Vec<i64> = (after + 1..=total as i64)
            .filter(|o| *o == total as i64 || o % 4 != 3)
            .collect();
        let offsets: Vec<i64> = got.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, want, "since {since:?}, after {after}");
    }
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn another_rooms_last_record_does_not_hold_up_a_since_catch_up() {
    let h = Harness::new(1, FanoutConfig::default());
    h.append(&[
        record("a", "m0", "hi"),
        record("a", "m1", "hi"),
        record("a", "m2", "hi"),
        record("b", "other", "the partition's last record"),
    ])
    .await;
    let (m, mut rx, _) = h.member(64);
    // Must return: no later record will ever come to end the catch-up.
    h.join("a", &m, Some(0)).await.unwrap();
    expect_joined(&mut rx).await;
    assert_eq!(expect_message(&mut rx).await.id, "m1");
    assert_eq!(expect_message(&mut rx).await.id, "m2");
    assert!(rx.try_recv().is_err());
    h.append(&[record("a", "live", "hi")]).await;
    let live = expect_message(&mut rx).await;
    assert_eq!((live.id.as_str(), live.offset), ("live", 4));
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_since_of_another_epoch_gets_live_messages_only() {
    let h = Harness::new(1, FanoutConfig::default());
    h.append(&[record("a", "old", "hi")]).await;
    let (m, mut rx, _) = h.member(64);
    let since = Position {
        offset: -1,
        epoch: "another".into(),
    };
    within("join", h.fanout.join("a", &m, Some(&since)))
        .await
        .unwrap();
    let joined = expect_joined(&mut rx).await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["position"]["offset"], 0);
    h.append(&[record("a", "new", "hi")]).await;
    assert_eq!(expect_message(&mut rx).await.id, "new");
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_since_past_the_head_is_not_recovered_and_goes_live() {
    let h = Harness::new(1, FanoutConfig::default());
    h.append(&[record("a", "m0", "hi")]).await;
    // The head is offset 0: a client claiming 2, or the largest offset
    // there is, names messages that do not exist.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(2)).await.unwrap();
    let joined = expect_joined(&mut rx).await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["position"]["offset"], 0);
    let (far, mut rf, _) = h.member(64);
    h.join("a", &far, Some(i64::MAX)).await.unwrap();
    let joined = expect_joined(&mut rf).await;
    assert_eq!(joined["recovered"], false, "no crash, and no lie");
    // Both get every message from the head on, as a fresh join would.
    let records: Vec<Record> = (1..5)
        .map(|i| record("a", &format!("m{i}"), "hi"))
        .collect();
    h.append(&records).await;
    for rx in [&mut rx, &mut rf] {
        let got = messages_until(rx, "m4").await;
        assert_eq!(
            got.iter().map(|m| m.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }
    // At the head exactly, nothing is lacking: recovered.
    let (at, mut ra, _) = h.member(64);
    h.join("a", &at, Some(4)).await.unwrap();
    assert_eq!(expect_joined(&mut ra).await["recovered"], true);
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_since_older_than_the_first_retained_offset_is_not_recovered() {
    let h = Harness::new(1, FanoutConfig::default());
    let records: Vec<Record> = (0..10)
        .map(|i| record("a", &format!("m{i}"), "hi"))
        .collect();
    h.append(&records).await;
    // Retention took offsets 0..4.
    h.embedded.delete_before(0, 4).unwrap();
    assert_eq!(h.log.start_offset(0).await.unwrap(), 4);
    for lost in [-1, 0, 2] {
        let (m, mut rx, _) = h.member(64);
        h.join("a", &m, Some(lost)).await.unwrap();
        let joined = expect_joined(&mut rx).await;
        assert_eq!(joined["recovered"], false, "since {lost}: a gap below 4");
        assert_eq!(joined["position"]["offset"], 9);
        assert!(rx.try_recv().is_err(), "since {lost}: nothing replayed");
    }
    // Lacking 4 on, all of it held: resumed with no gap.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(3)).await.unwrap();
    assert_eq!(expect_joined(&mut rx).await["recovered"], true);
    let got = messages_until(&mut rx, "m9").await;
    assert_eq!(
        got.iter().map(|m| m.offset).collect::<Vec<_>>(),
        (4..10).collect::<Vec<_>>()
    );
    h.fanout.shutdown().await;
}

/// With one catch-up allowed to read the log at a time, a member that stops
/// reading holds it only until the stall kicks it as a slow consumer; the
/// other resume gets everything either way.
#[tokio::test]
async fn a_stalled_catch_up_is_kicked_and_frees_its_read() {
    let config = FanoutConfig {
        ring: 4,
        catch_up_reads: 1,
        catch_up_stall: Duration::from_millis(200),
        ..FanoutConfig::default()
    };
    let h = Harness::new(1, config);
    let records: Vec<Record> = (0..40)
        .map(|i| record("a", &format!("m{i}"), "hi"))
        .collect();
    h.append(&records).await;
    // Room for the `joined` frame and one message, and nobody reads.
    let (stalled, _unread, kick) = h.member(2);
    let (reader, mut rx, _) = h.member(64);
    let (first, second) = tokio::join!(
        h.join("a", &stalled, Some(-1)),
        h.join("a", &reader, Some(-1))
    );
    assert!(matches!(first, Err(FanoutError::Slow)), "{first:?}");
    assert!(kick.is_cancelled());
    second.unwrap();
    expect_joined(&mut rx).await;
    let got = messages_until(&mut rx, "m39").await;
    assert_eq!(ids(&got), expected(&records, &["a"]));
    h.fanout.leave("a", &stalled);
    h.fanout.shutdown().await;
}
