//! A retried send appended twice (same room and client id at two offsets)
//! is delivered once: live, from the ring, in a catch-up, and when the first
//! copy is older than the dispatcher.

use super::*;

#[tokio::test]
async fn a_retry_appended_twice_is_delivered_once_live_and_from_the_ring() {
    let h = Harness::new(1, FanoutConfig::default());
    let (live, mut rl, _) = h.member(64);
    h.join("a", &live, None).await.unwrap();
    expect_joined(&mut rl).await;
    h.append(&[record("a", "x", "hi"), record("a", "y", "there")])
        .await;
    h.append(&[
        record("a", "x", "hi"),
        record("b", "x", "other room, same id"),
    ])
    .await;
    h.append(&[record("a", "z", "end")]).await;
    let got = messages_until(&mut rl, "z").await;
    assert_eq!(
        got.iter()
            .map(|m| (m.id.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [("x", 0), ("y", 1), ("z", 4)]
    );

    // The ring holds the first copy only.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(-1)).await.unwrap();
    expect_joined(&mut rx).await;
    let got = messages_until(&mut rx, "z").await;
    assert_eq!(
        got.iter()
            .map(|m| (m.id.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [("x", 0), ("y", 1), ("z", 4)]
    );
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_retry_appended_twice_is_delivered_once_by_a_catch_up() {
    let h = Harness::new(1, FanoutConfig::default());
    h.append(&[
        record("a", "x", "hi"),
        record("a", "y", "there"),
        record("a", "x", "hi"),
        record("a", "z", "end"),
    ])
    .await;
    // No dispatcher: the whole range is read back from the log.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(-1)).await.unwrap();
    expect_joined(&mut rx).await;
    let got = messages_until(&mut rx, "z").await;
    assert_eq!(
        got.iter()
            .map(|m| (m.id.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [("x", 0), ("y", 1), ("z", 3)]
    );
    h.fanout.leave("a", &m);
    assert!(h.fanout.active_partitions().is_empty());

    // Resuming after the first copy: the second one is not new either.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, Some(0)).await.unwrap();
    expect_joined(&mut rx).await;
    let got = messages_until(&mut rx, "z").await;
    assert_eq!(
        got.iter()
            .map(|m| (m.id.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [("y", 1), ("z", 3)]
    );
    h.fanout.shutdown().await;
}

#[tokio::test]
async fn a_retry_of_a_message_older_than_the_dispatcher_is_dropped() {
    let h = Harness::new(1, FanoutConfig::default());
    h.append(&[record("a", "x", "hi")]).await;
    // The dispatcher starts at 1 and learns x during its warm-up.
    let (m, mut rx, _) = h.member(64);
    h.join("a", &m, None).await.unwrap();
    expect_joined(&mut rx).await;
    h.append(&[record("a", "x", "hi"), record("a", "w", "new")])
        .await;
    let got = expect_message(&mut rx).await;
    assert_eq!((got.id.as_str(), got.offset), ("w", 2));
    h.fanout.shutdown().await;
}
