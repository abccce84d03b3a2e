//! Routing: a member gets its rooms' messages, in offset order, once; rooms
//! sharing a partition stay apart; ephemeral frames reach the room's
//! members, skipping full queues.

use super::*;

#[tokio::test]
async fn a_member_gets_only_its_rooms_messages_in_offset_order_once() {
    let h = Harness::new(4, FanoutConfig::default());
    let same = h.rooms_on(0, 3);
    let (a, b, unwatched) = (same[0].as_str(), same[1].as_str(), same[2].as_str());
    let c = h.rooms_on(1, 1).remove(0);
    let c = c.as_str();
    let (ma, mut ra, _) = h.member(256);
    let (mab, mut rab, _) = h.member(256);
    let (mc, mut rc, _) = h.member(256);
    h.join(a, &ma, None).await.unwrap();
    h.join(a, &mab, None).await.unwrap();
    h.join(b, &mab, None).await.unwrap();
    h.join(c, &mc, None).await.unwrap();
    expect_joined(&mut ra).await;
    expect_joined(&mut rab).await;
    expect_joined(&mut rab).await;
    expect_joined(&mut rc).await;
    let rooms = [a, b, c, unwatched];
    let mut records: Vec<Record> = (0..40)
        .map(|i| record(rooms[i % 4], &format!("m{i}"), "hi"))
        .collect();
    records.push(record(a, "end-a", "bye"));
    records.push(record(b, "end-b", "bye"));
    records.push(record(c, "end-c", "bye"));
    // Several batches, so the dispatchers see several.
    for chunk in records.chunks(7) {
        h.append(chunk).await;
    }

    let got_a = messages_until(&mut ra, "end-a").await;
    assert_eq!(ids(&got_a), expected(&records, &[a]));
    assert_increasing(&got_a);

    // `a` and `b` share a partition: one offset order across both.
    let got_ab = messages_until(&mut rab, "end-b").await;
    assert_eq!(ids(&got_ab), expected(&records, &[a, b]));
    assert_increasing(&got_ab);

    let got_c = messages_until(&mut rc, "end-c").await;
    assert_eq!(ids(&got_c), expected(&records, &[c]));
    assert_increasing(&got_c);

    // Nothing else was queued meanwhile: the end markers were the last
    // records of their partitions.
    assert!(ra.try_recv().is_err());
    assert!(rab.try_recv().is_err());
    assert!(rc.try_recv().is_err());
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn two_rooms_on_one_partition_stay_apart() {
    let h = Harness::new(1, FanoutConfig::default());
    let (ma, mut ra, _) = h.member(64);
    let (mb, mut rb, _) = h.member(64);
    h.join("a", &ma, None).await.unwrap();
    h.join("b", &mb, None).await.unwrap();
    expect_joined(&mut ra).await;
    expect_joined(&mut rb).await;
    let records: Vec<Record> = (0..10)
        .map(|i| record(if i % 2 == 0 { "a" } else { "b" }, &format!("m{i}"), "hi"))
        .chain([record("a", "end", "bye"), record("b", "end", "bye")])
        .collect();
    h.append(&records).await;
    let got_a = messages_until(&mut ra, "end").await;
    let got_b = messages_until(&mut rb, "end").await;
    assert_eq!(ids(&got_a), expected(&records, &["a"]));
    assert_eq!(ids(&got_b), expected(&records, &["b"]));
    assert_increasing(&got_a);
    assert_increasing(&got_b);
    assert!(ra.try_recv().is_err());
    assert!(rb.try_recv().is_err());
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn ephemeral_frames_reach_the_room_and_skip_full_queues() {
    let h = Harness::new(1, FanoutConfig::default());
    let (ma, mut ra, _) = h.member(64);
    let (mb, mut rb, _) = h.member(64);
    let (full, mut rfull, full_kick) = h.member(1);
    h.join("a", &ma, None).await.unwrap();
    h.join("b", &mb, None).await.unwrap();
    h.join("a", &full, None).await.unwrap();
    expect_joined(&mut ra).await;
    expect_joined(&mut rb).await;
    h.fanout
        .broadcast_ephemeral("a", Frame::from(r#"{"type":"typing"}"#));
    assert_eq!(next_frame(&mut ra).await["type"], "typing");
    assert!(rb.try_recv().is_err());
    assert!(
        !full_kick.is_cancelled(),
        "a full queue misses it, unkicked"
    );
    expect_joined(&mut rfull).await;
    assert!(rfull.try_recv().is_err());
    h.fanout.shutdown().await;
}
