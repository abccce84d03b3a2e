//! Members and partitions: a full queue kicks its member and no one else; a
//! partition's dispatcher runs exactly while rooms of it have members here.

use super::*;

#[tokio::test]
async fn a_full_queue_kicks_the_member_and_the_others_keep_receiving() {
    let h = Harness::new(1, FanoutConfig::default());
    let (slow, mut rs, slow_kick) = h.member(2);
    let (fast, mut rf, fast_kick) = h.member(64);
    h.join("a", &slow, None).await.unwrap();
    h.join("a", &fast, None).await.unwrap();
    expect_joined(&mut rf).await;
    // The slow member reads nothing: `joined` and one message fill it.
    let records: Vec<Record> = (0..5)
        .map(|i| record("a", &format!("m{i}"), "hi"))
        .collect();
    h.append(&records).await;
    within("the kick", slow_kick.cancelled()).await;
    assert_eq!(
        ids(&messages_until(&mut rf, "m4").await),
        expected(&records, &["a"])
    );

    h.append(&[record("a", "after", "hi")]).await;
    assert_eq!(expect_message(&mut rf).await.id, "after");
    assert!(!fast_kick.is_cancelled());
    // The kicked member got what fitted and nothing after.
    expect_joined(&mut rs).await;
    assert_eq!(expect_message(&mut rs).await.id, "m0");
    assert!(rs.try_recv().is_err());

    // The gateway then closes it and leaves its rooms.
    h.fanout.leave("a", &slow);
    assert_eq!(h.fanout.active_partitions(), [0]);
    h.fanout.leave("a", &fast);
    assert!(h.fanout.active_partitions().is_empty());
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_join_into_a_full_queue_fails_slow_and_leaves_no_dispatcher() {
    let h = Harness::new(1, FanoutConfig::default());
    let (m, _rx, kick) = h.member(1);
    // Fill the queue, as a burst of replies would.
    m.offer(Frame::from("busy"));
    assert!(matches!(
        h.join("a", &m, None).await,
        Err(FanoutError::Slow)
    ));
    assert!(kick.is_cancelled());
    assert!(h.fanout.active_partitions().is_empty());
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn leaving_the_last_room_of_a_partition_stops_its_dispatcher() {
    let h = Harness::new(2, FanoutConfig::default());
    let p0 = h.rooms_on(0, 2);
    let p1 = h.rooms_on(1, 1);
    let (m, mut rx, _) = h.member(64);
    assert!(h.fanout.active_partitions().is_empty());
    h.join(&p0[0], &m, None).await.unwrap();
    h.join(&p0[1], &m, None).await.unwrap();
    h.join(&p1[0], &m, None).await.unwrap();
    assert_eq!(h.fanout.active_partitions(), [0, 1]);
    h.fanout.leave(&p0[0], &m);
    assert_eq!(
        h.fanout.active_partitions(),
        [0, 1],
        "p0[1] is still joined"
    );
    h.fanout.leave(&p1[0], &m);
    assert_eq!(h.fanout.active_partitions(), [0]);
    h.fanout.leave(&p0[1], &m);
    assert!(h.fanout.active_partitions().is_empty());
    // Leaving again, or a room never joined, changes nothing.
    h.fanout.leave(&p0[1], &m);
    assert!(h.fanout.active_partitions().is_empty());

    // Joining again starts a dispatcher that delivers.
    for _ in 0..3 {
        expect_joined(&mut rx).await;
    }
    h.join(&p1[0], &m, None).await.unwrap();
    expect_joined(&mut rx).await;
    assert_eq!(h.fanout.active_partitions(), [1]);
    h.append(&[record(&p1[0], "again", "hi")]).await;
    assert_eq!(expect_message(&mut rx).await.id, "again");
    h.fanout.shutdown().await;
}
