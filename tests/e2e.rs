//! End-to-end tests of `chat serve` on the embedded backends: real processes,
//! real sockets, a real WebSocket client.

mod common;

use std::collections::{HashMap, HashSet};

use common::{id, Client, Server, WAIT};
use serde_json::{json, Value};

const ROOMS: [&str; 3] = ["general", "random", "rust.lang"];

/// Reads frames until `n` `message` frames and `acks` `ack` frames arrived.
async fn collect(c: &mut Client, n: usize, acks: usize) -> (Vec<Value>, Vec<Value>) {
    let (mut messages, mut acked) = (Vec::new(), Vec::new());
    while messages.len() < n || acked.len() < acks {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "message" => messages.push(f),
            "ack" => acked.push(f),
            other => panic!("unexpected {other}: {f}"),
        }
    }
    (messages, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_in_three_rooms_get_everything_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for room in ROOMS {
        alice.join(room, None).await;
        bob.join(room, None).await;
    }
    const EACH: usize = 200;
    let send_all = |mut c: Client| async move {
        let mut sent = Vec::new();
        for i in 0..EACH {
            for room in ROOMS {
                let id = id();
                c.send_message(room, &id, &format!("{} #{i} in {room}", c.user))
                    .await;
                sent.push(id);
            }
        }
        (c, sent)
    };
    let ((mut alice, _), (mut bob, _)) = tokio::join!(send_all(alice), send_all(bob));
    let total = 2 * EACH * ROOMS.len();
    let mine = EACH * ROOMS.len();
    let ((a_msgs, a_acks), (b_msgs, b_acks)) = tokio::join!(
        collect(&mut alice, total, mine),
        collect(&mut bob, total, mine)
    );

    for (msgs, acks) in [(&a_msgs, &a_acks), (&b_msgs, &b_acks)] {
        // Exactly once.
        let ids: HashSet<&str> = msgs.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), total, "every message delivered exactly once");
        // In offset order per room.
        let mut last: HashMap<&str, i64> = HashMap::new();
        for m in msgs {
            let room = m["room"].as_str().unwrap();
            let offset = m["offset"].as_i64().unwrap();
            if let Some(prev) = last.insert(room, offset) {
                assert!(
                    offset > prev,
                    "offset order in {room}: {prev} then {offset}"
                );
            }
        }
        // Each ack's offset is the offset of the delivered message.
        let delivered: HashMap<&str, (&str, i64)> = msgs
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap(),
                    (m["room"].as_str().unwrap(), m["offset"].as_i64().unwrap()),
                )
            })
            .collect();
        for a in acks {
            let (room, offset) = delivered[a["id"].as_str().unwrap()];
            assert_eq!(a["room"], room);
            assert_eq!(a["offset"].as_i64().unwrap(), offset);
        }
    }
    // Both clients saw the same sequence per room, and history pages give it too.
    for room in ROOMS {
        let seq = |msgs: &[Value]| -> Vec<Value> {
            msgs.iter().filter(|m| m["room"] == room).cloned().collect()
        };
        let a = seq(&a_msgs);
        assert_eq!(a, seq(&b_msgs));
        let history = server.history_with(room, a.len()).await;
        let history: Vec<Value> = history
            .into_iter()
            .map(|mut m| {
                m.as_object_mut()
                    .unwrap()
                    .insert("type".into(), json!("message"));
                m
            })
            .collect();
        assert_eq!(history, a, "history of {room} equals the live sequence");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_gives_exactly_the_missed_messages_then_live() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let joined = alice.join("general", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    bob.join("general", None).await;
    // Some traffic alice sees, and traffic in another room of the partition space.
    bob.send_message("general", &id(), "before").await;
    let seen = alice.recv_type("message").await;
    let last_seen = seen["offset"].as_i64().unwrap();
    alice.close().await;

    let mut sent = Vec::new();
    for i in 0..500 {
        let id = id();
        bob.send_message("general", &id, &format!("missed {i}"))
            .await;
        bob.send_message("other", &common::id(), "noise").await;
        sent.push(id);
    }
    for _ in 0..1000 {
        assert_eq!(bob.recv_type("ack").await["type"], "ack");
    }

    let mut alice = server.connect("alice").await;
    let joined = alice.join("general", Some((last_seen, &epoch))).await;
    assert_eq!(joined["recovered"], true);
    let mut got = Vec::new();
    while got.len() < 500 {
        let f = alice.recv().await;
        assert_eq!(f["type"], "message", "{f}");
        got.push(f);
    }
    let ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        sent.iter().map(String::as_str).collect::<Vec<_>>(),
        "exactly the missed ones, in order"
    );
    assert!(got
        .windows(2)
        .all(|w| w[0]["offset"].as_i64() < w[1]["offset"].as_i64()));
    // Then live.
    let live = id();
    bob.send_message("general", &live, "live again").await;
    let f = alice.recv().await;
    assert_eq!(f["id"], live.as_str(), "{f}");
    // Nothing else arrives.
    assert!(alice
        .try_recv(std::time::Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_one_message_with_one_offset() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    let retried = id();
    alice.send_message("general", &retried, "once").await;
    alice.send_message("general", &retried, "once").await;
    let mut acks = Vec::new();
    while acks.len() < 2 {
        let f = alice.recv().await;
        if f["type"] == "ack" {
            acks.push(f);
        }
    }
    assert_eq!(acks[0]["offset"], acks[1]["offset"]);
    assert_eq!(acks[0]["ts"], acks[1]["ts"]);
    // A retry after reconnecting is answered the same way.
    alice.close().await;
    let mut alice = server.connect("alice").await;
    alice.send_message("general", &retried, "once").await;
    let again = alice.recv_type("ack").await;
    assert_eq!(again["offset"], acks[0]["offset"]);
    // Bob sees it once: a marker sent after it is the next thing he gets.
    let marker = id();
    alice.send_message("general", &marker, "marker").await;
    let first = bob.recv_type("message").await;
    assert_eq!(first["id"], retried.as_str());
    let second = bob.recv_type("message").await;
    assert_eq!(second["id"], marker.as_str());
    let history = server.history_with("general", 2).await;
    let ids: Vec<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [retried.as_str(), marker.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_error_code_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    let big = "x".repeat(5000);
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("this is not json".into(), "bad_frame", None),
        (
            json!({"type": "shout", "room": "general", "id": "u1"}).to_string(),
            "bad_frame",
            Some("u1"),
        ),
        (
            json!({"type": "send", "room": "general", "id": "u2", "body": big}).to_string(),
            "too_large",
            Some("u2"),
        ),
        (
            json!({"type": "send", "room": "general", "id": "u3", "body": ""}).to_string(),
            "bad_frame",
            Some("u3"),
        ),
        (
            json!({"type": "send", "room": "no/such room", "id": "u4", "body": "hi"}).to_string(),
            "bad_room",
            Some("u4"),
        ),
        (
            json!({"type": "send", "room": "general", "body": "no id"}).to_string(),
            "bad_frame",
            None,
        ),
        (
            json!({"type": "join", "room": ""}).to_string(),
            "bad_room",
            None,
        ),
        (
            json!({"type": "leave", "room": "never-joined"}).to_string(),
            "not_joined",
            None,
        ),
    ];
    for (frame, code, id) in &cases {
        alice.send_text(frame).await;
        let e = alice.recv().await;
        assert_eq!(e["type"], "error", "{frame} -> {e}");
        assert_eq!(e["code"], *code, "{frame} -> {e}");
        assert_eq!(e["id"].as_str(), *id, "{frame} -> {e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    // The connection is still usable, and only the good message was appended.
    let good = id();
    alice.send_message("general", &good, "good").await;
    let ack = alice.recv_type("ack").await;
    assert_eq!(ack["id"], good.as_str());
    assert_eq!(ack["offset"], 0, "nothing was appended before it");
    let m = bob.recv_type("message").await;
    assert_eq!(m["id"], good.as_str());
    let history = server.history_with("general", 1).await;
    assert_eq!(history.len(), 1);
    assert!(bob
        .try_recv(std::time::Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let mut acked = Vec::new();
    for i in 0..300 {
        alice.send_message("general", &id(), &format!("m{i}")).await;
    }
    while acked.len() < 300 {
        let ack = alice.recv_type("ack").await;
        acked.push((
            ack["id"].as_str().unwrap().to_owned(),
            ack["offset"].as_i64().unwrap(),
        ));
    }
    server.kill();
    let server = Server::start(dir.path(), 4).await;
    let history = server.history_with("general", 300).await;
    let got: Vec<(String, i64)> = history
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, acked, "every acked message, in order, after SIGKILL");
}

/// The history store commits without an fsync and makes its commits durable
/// at most a second later: a SIGKILL right after the history showed every
/// message may roll the store back, rows and positions together, and the
/// projector applies the log again. Nothing is missing, nothing twice, the
/// offsets are the log's, and a retry of an acked id is answered with its
/// first ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_projected_just_before_a_sigkill_is_rebuilt_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 4).await;
    let mut alice = server.connect("alice").await;
    let rooms = ["general", "random"];
    let mut acked: std::collections::BTreeMap<&str, Vec<(String, i64)>> = Default::default();
    let mut sent = Vec::new();
    for i in 0..200 {
        let room = rooms[i % 2];
        let id = id();
        alice.send_message(room, &id, &format!("m{i}")).await;
        sent.push((room, id));
    }
    for (room, id) in &sent {
        let ack = alice.recv_type("ack").await;
        assert_eq!(ack["id"].as_str(), Some(id.as_str()), "acks in send order");
        acked
            .entry(room)
            .or_default()
            .push((id.clone(), ack["offset"].as_i64().unwrap()));
    }
    for room in rooms {
        assert_eq!(server.history_with(room, 100).await.len(), 100);
    }
    server.kill();

    let server = Server::start(dir.path(), 4).await;
    for room in rooms {
        let got: Vec<(String, i64)> = server
            .history_with(room, 100)
            .await
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["offset"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got, acked[room],
            "room {room}: every message once, in order"
        );
    }
    let (room, first) = (rooms[0], &acked[rooms[0]][0]);
    let mut again = server.connect("alice").await;
    again.send_message(room, &first.0, "m0").await;
    let ack = again.recv_type("ack").await;
    assert_eq!(
        ack["offset"].as_i64(),
        Some(first.1),
        "the first attempt's ack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_health_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let page = http
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<html"), "the web page is served");
    let id = id();
    let post = |body: Value| {
        http.post(server.url("/rooms/general/messages?user=carol"))
            .json(&body)
            .send()
    };
    let ack: Value = post(json!({"id": id, "body": "via http"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack");
    let again: Value = post(json!({"id": id, "body": "via http"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["offset"], ack["offset"]);
    let bad = post(json!({"id": "x", "body": ""})).await.unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["code"], "bad_frame");
    let bad_room = http
        .get(server.url("/rooms/bad%20room/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_room.status(), 400);
    let history = server.history_with("general", 1).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["user"], "carol");
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ingest_messages_acked_total"), "{metrics}");
}

/// The latency histograms and the projector's lag gauges move with
/// traffic, and `*_seconds` are Prometheus histograms (buckets), so
/// percentiles can be taken across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_and_projector_lag_move_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    let mut alice = server.connect("alice").await;
    alice.join("general", None).await;
    const SENT: usize = 5;
    for i in 0..SENT {
        alice.send_message("general", &id(), &format!("m{i}")).await;
    }
    let (mut acks, mut messages) = (0, 0);
    while acks < SENT || messages < SENT {
        match alice.recv().await["type"].as_str() {
            Some("ack") => acks += 1,
            Some("message") => messages += 1,
            _ => {}
        }
    }
    assert_eq!(server.history_with("general", SENT).await.len(), SENT);
    let at_least = SENT as f64;
    assert!(server.metric("ingest_ack_seconds_count").await >= at_least);
    assert!(
        server.metric("ingest_ack_seconds_bucket{le=\"10\"}").await >= at_least,
        "ack latency has buckets"
    );
    assert!(server.metric("fanout_delivery_lag_seconds_count").await >= at_least);
    assert!(
        server
            .metric("ingest_store_read_seconds_count{op=\"page\"}")
            .await
            >= 1.0
    );
    // The projector's, once it applied the batches it read.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let batches = server.metric("projector_batch_seconds_count").await;
        let lag = server.metric_sum("projector_lag_seconds").await;
        let behind = server.metric_sum("projector_lag_records").await;
        let series = server.metric_series("projector_lag_records").await;
        if batches >= 1.0 && series >= 1 {
            assert!(lag >= 0.0 && behind >= 0.0, "lag {lag} s, {behind} records");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no projector batch or lag: {batches} batches, {series} lag series"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Issue 21: every catalogued metric is on `/metrics`, and traffic moves
/// the ones traffic moves. Each of the others is named below with what
/// moves it (a fault, another log, a replay) and the test that shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalogued_metric_is_on_metrics_and_traffic_moves_its_own() {
    // Moved by the traffic below, on the embedded log and store.
    const MOVED: &[&str] = &[
        "ingest_connections",
        "ingest_frames_total",
        "ingest_bad_frames_total",
        "ingest_appends_total",
        "ingest_messages_acked_total",
        "ingest_reads_total",
        "ingest_ack_seconds",
        "ingest_store_read_seconds",
        "fanout_delivery_lag_seconds",
        "fanout_partitions",
        "fanout_deliveries_total",
        "eventlog_commits_total",
        "eventlog_commit_seconds",
        "eventlog_commit_records",
        "projector_partitions_owned",
        "projector_events_total",
        "projector_batch_seconds",
        "projector_position",
        "projector_store_commits_total",
        "projector_store_durable_commits_total",
    ];
    // Set by the traffic below, but rightly 0 when the projector keeps up.
    const SET: &[&str] = &["projector_lag_records", "projector_lag_seconds"];
    // On `/metrics` at zero from the start; moved elsewhere.
    const AT_ZERO: &[(&str, &str)] = &[
        (
            "ingest_append_errors_total",
            "a log that fails: tests/faults.rs",
        ),
        (
            "ingest_send_timeouts_total",
            "a stalled log: tests/faults.rs",
        ),
        (
            "fanout_slow_consumers_total",
            "a client that stops reading: tests/faults.rs",
        ),
        (
            "fanout_duplicates_dropped_total",
            "a retry appended twice: crates/fanout/src/tests/duplicates.rs",
        ),
        (
            "fanout_unreadable_records_total",
            "a record of a newer schema: tests/kafka.rs",
        ),
        (
            "presence_bytes_sent_total",
            "the Kafka log's ephemeral channel: tests/kafka.rs",
        ),
        (
            "presence_notices_unreadable_total",
            "a notice of a newer build: crates/fanout/src/presence",
        ),
        (
            "presence_notices_dropped_total",
            "a stalled broker: crates/fanout/src/presence",
        ),
        (
            "presence_nodes",
            "other gateways on the Kafka log: tests/kafka.rs",
        ),
        (
            "presence_entries",
            "presence on the Kafka log: tests/kafka.rs, benches presence-load",
        ),
        (
            "projector_store_errors_total",
            "a failing store: crates/projector/src/run.rs tests",
        ),
        ("replay_events_total", "chat replay: tests/replay.rs"),
        (
            "projector_duplicate_ids_total",
            "a retry appended twice: the store conformance suite",
        ),
        (
            "projector_version_switches_total",
            "chat replay --switch: tests/replay.rs",
        ),
    ];
    // Labelled, so on `/metrics` once a label value is seen.
    const LABELLED_ELSEWHERE: &[(&str, &str)] = &[
        (
            "ingest_upgrades_refused_total",
            "a refused upgrade: tests/limits.rs",
        ),
        (
            "fanout_catch_up_messages_total",
            "a join with since: tests/kafka.rs",
        ),
        (
            "presence_notices_sent_total",
            "the Kafka log's ephemeral channel: tests/kafka.rs",
        ),
        (
            "presence_notices_received_total",
            "the Kafka log's ephemeral channel: tests/kafka.rs",
        ),
        (
            "log_read_gaps_total",
            "a Kafka read that skips offsets: crates/eventlog (never in health)",
        ),
        (
            "projector_dead_letters_total",
            "an undecodable record: tests/replay.rs",
        ),
    ];
    let catalogue: Vec<String> = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"),
    )
    .unwrap()
    .lines()
    .filter_map(|l| {
        l.strip_prefix("| `")?
            .split_once('`')
            .map(|(n, _)| n.to_owned())
    })
    .collect();
    let mut accounted: Vec<&str> = MOVED
        .iter()
        .copied()
        .chain(SET.iter().copied())
        .chain(AT_ZERO.iter().map(|m| m.0))
        .chain(LABELLED_ELSEWHERE.iter().map(|m| m.0))
        .collect();
    accounted.sort_unstable();
    let mut listed: Vec<&str> = catalogue.iter().map(String::as_str).collect();
    listed.sort_unstable();
    assert_eq!(
        accounted, listed,
        "every catalogued metric is accounted for here"
    );

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    for (name, _) in AT_ZERO {
        assert_eq!(server.metric_series(name).await, 1, "{name} is on /metrics");
        assert_eq!(server.metric(name).await, 0.0, "{name} starts at zero");
    }
    let mut alice = server.connect("alice").await;
    alice.join("general", None).await;
    alice.send_text(r#"{"type":"nope"}"#).await;
    assert_eq!(alice.recv_type("error").await["code"], "bad_frame");
    let mut last = 0;
    for i in 0..3 {
        alice.send_message("general", &id(), &format!("m{i}")).await;
    }
    let (mut acks, mut messages) = (0, 0);
    while acks < 3 || messages < 3 {
        let f = alice.recv().await;
        match f["type"].as_str() {
            Some("ack") => acks += 1,
            Some("message") => {
                messages += 1;
                last = f["offset"].as_i64().unwrap();
            }
            _ => {}
        }
    }
    alice
        .send_json(json!({"type": "read", "room": "general", "offset": last}))
        .await;
    alice.recv_type("read").await;
    assert_eq!(server.history_with("general", 3).await.len(), 3);
    let deadline = tokio::time::Instant::now() + WAIT;
    for name in MOVED {
        loop {
            let text = server.metric_text_of(name).await;
            if text > 0.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not move with traffic"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    for name in SET {
        while server.metric_series(name).await == 0 {
            assert!(tokio::time::Instant::now() < deadline, "{name} was not set");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connection_is_closed_with_4001() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    use futures::StreamExt;
    let mut saw_error = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.unwrap();
        match msg {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["code"], "unauthorized");
                saw_error = true;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4001);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_ends_when_the_partitions_last_record_is_another_rooms() {
    // One partition: `general` and `other` share it, and the last record
    // is `other`'s. Nobody else is connected, so no later record comes: the
    // catch-up of `general` must still end, and the connection go on.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 1).await;
    let mut alice = server.connect("alice").await;
    let joined = alice.join("general", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    let first = id();
    alice.send_message("general", &first, "in general").await;
    let before = alice.recv_type("ack").await["offset"].as_i64().unwrap() - 1;
    alice.send_message("other", &id(), "in other").await;
    alice.recv_type("ack").await;
    alice.close().await;

    let mut alice = server.connect("alice").await;
    let joined = alice.join("general", Some((before, &epoch))).await;
    assert_eq!(joined["recovered"], true);
    let m = alice.recv_type("message").await;
    assert_eq!(m["id"], first.as_str());
    // The join is over: the next request is read and answered.
    let next = id();
    alice
        .send_message("general", &next, "after the resume")
        .await;
    let ack = alice.recv_type("ack").await;
    assert_eq!(ack["id"], next.as_str());
}

/// A `since` the server cannot honour is answered `recovered:false` (another
/// epoch, past the head, the largest offset there is) or `bad_frame` (below
/// -1, not an integer), never a crash: the connection and the node keep
/// serving, and a `since` it can honour still resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_that_cannot_be_honoured_is_never_answered_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    let mut bob = server.connect("bob").await;
    let joined = bob.join("general", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    for i in 0..3 {
        bob.send_message("general", &id(), &format!("m{i}")).await;
    }
    // The acks, and the messages themselves: once bob has them, this
    // node's fan-out has read up to the head (an ack alone may come first,
    // and a join would then be told the position the fan-out has reached).
    let (mut head, mut acks, mut delivered) = (-1, 0, 0);
    while acks < 3 || delivered < 3 {
        let f = bob.recv().await;
        match f["type"].as_str() {
            Some("ack") => {
                acks += 1;
                head = head.max(f["offset"].as_i64().unwrap());
            }
            Some("message") => delivered += 1,
            _ => {}
        }
    }

    let mut alice = server.connect("alice").await;
    for (since, why) in [
        ((0, "another-epoch"), "another epoch"),
        ((head + 1, epoch.as_str()), "one past the head"),
        ((head + 1_000_000, epoch.as_str()), "far past the head"),
        ((i64::MAX, epoch.as_str()), "the largest offset"),
    ] {
        let joined = alice.join("general", Some(since)).await;
        assert_eq!(joined["recovered"], false, "{why}: {joined}");
        assert_eq!(joined["position"]["offset"], head, "{why}");
    }
    for bad in [
        json!({"offset": -2, "epoch": epoch}),
        json!({"offset": i64::MIN, "epoch": epoch}),
        json!({"offset": "7", "epoch": epoch}),
        json!({"offset": 1.5, "epoch": epoch}),
        json!({"offset": 18446744073709551615u64, "epoch": epoch}),
    ] {
        alice
            .send_json(json!({"type": "join", "room": "general", "since": bad}))
            .await;
        let f = alice.recv().await;
        assert_eq!(f["type"], "error", "{bad}: {f}");
        assert_eq!(f["code"], "bad_frame", "{bad}: {f}");
    }

    // Still serving, on this connection and to others: a live message
    // arrives once even though alice joined five times, and a `since` that
    // can be honoured resumes.
    let live = id();
    bob.send_message("general", &live, "live").await;
    let f = alice.recv_type("message").await;
    assert_eq!(f["id"], live.as_str());
    assert!(alice
        .try_recv(std::time::Duration::from_millis(300))
        .await
        .is_none());
    let mut carol = server.connect("carol").await;
    let joined = carol.join("general", Some((head - 1, &epoch))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let bodies: Vec<Value> = vec![
        carol.recv_type("message").await["body"].clone(),
        carol.recv_type("message").await["body"].clone(),
    ];
    assert_eq!(bodies, [json!("m2"), json!("live")]);
}

/// A gateway-only node on the embedded store has no projector writing its
/// history: it answers history requests `unavailable` (503), never an empty
/// page, while sends and live delivery work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_projector_serves_no_untrue_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), 2, &["--roles", "ingest,fanout"]).await;
    let mut alice = server.connect("alice").await;
    alice.join("general", None).await;
    alice.send_message("general", &id(), "hello").await;
    // The ack and the message come in either order.
    let mut kinds = vec![alice.recv().await, alice.recv().await];
    kinds.sort_by_key(|f| f["type"].as_str().unwrap_or_default().to_owned());
    assert_eq!(kinds[0]["type"], "ack", "{kinds:?}");
    assert_eq!(kinds[1]["type"], "message", "{kinds:?}");
    assert_eq!(kinds[1]["body"], "hello");
    let answer = reqwest::get(server.url("/rooms/general/messages"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(
        server
            .log()
            .contains("no projector writes this node's embedded history store"),
        "the operator is told why"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_the_connections_span_and_no_body() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_env(
        dir.path(),
        2,
        &["--log-format", "json"],
        &[("RUST_LOG", "info,ingest=debug")],
    )
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("general", None).await;
    const BODY: &str = "a body that must never reach the log";
    alice.send_message("general", &id(), BODY).await;
    alice.recv_type("ack").await;
    alice.close().await;
    // The close is logged by the connection's task once it is done.
    let deadline = tokio::time::Instant::now() + WAIT;
    let lines: Vec<Value> = loop {
        let log = server.log();
        let lines: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.iter().any(|l| l["message"] == "closed") {
            break lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `closed` line:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"),
        "levels are named"
    );
    let closed = lines.iter().find(|l| l["message"] == "closed").unwrap();
    let span = &closed["spans"][0];
    assert_eq!(span["name"], "connection", "{closed}");
    assert_eq!(span["user"], "alice", "{closed}");
    assert!(span["id"].as_u64().is_some(), "{closed}");
    assert!(!server.log().contains(BODY), "a message body was logged");
}
