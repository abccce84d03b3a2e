//! Delivery guarantees under faults: slow consumers, graceful shutdown,
//! retries across nodes, and a stalled log. Real processes, real sockets,
//! a real broker.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{id, Client, Server, WAIT};
use eventlog::kafka::testing::Broker;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sends `n` messages to `room` and waits for every ack; returns the ids in
/// order of their offsets.
async fn send_acked(c: &mut Client, room: &str, n: usize, body: &str) -> Vec<(String, i64)> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = id();
        c.send_message(room, &id, body).await;
        ids.push(id);
    }
    let mut offsets = HashMap::new();
    while offsets.len() < n {
        let ack = c.recv_type("ack").await;
        offsets.insert(
            ack["id"].as_str().unwrap().to_owned(),
            ack["offset"].as_i64().unwrap(),
        );
    }
    let mut acked: Vec<(String, i64)> = ids
        .into_iter()
        .map(|i| {
            let o = offsets[&i];
            (i, o)
        })
        .collect();
    acked.sort_by_key(|(_, o)| *o);
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4008_and_resumes_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), 2, &["--client-queue", "32"]).await;
    let mut slow = server.connect("slow").await;
    let joined = slow.join("general", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    let mut fast = server.connect("fast").await;
    fast.join("general", None).await;
    let mut sender = server.connect("sender").await;
    // The slow client reads nothing while ~20 MB flow to the room.
    let body = "x".repeat(4000);
    const N: usize = 5000;
    // The fast member reads each step before the next is sent, so its own
    // queue never holds more than a step however loaded the machine is.
    let send_and_receive = async {
        let (mut all, mut got) = (Vec::new(), Vec::new());
        // In steps smaller than the client queue: acks are queued too.
        for _ in 0..(N / 20) {
            all.extend(send_acked(&mut sender, "general", 20, &body).await);
            while got.len() < all.len() {
                let m = fast.recv_type("message").await;
                got.push((
                    m["id"].as_str().unwrap().to_owned(),
                    m["offset"].as_i64().unwrap(),
                ));
            }
        }
        (all, got)
    };
    // The slow client starts reading once it has been kicked: it finds what
    // was buffered for it, then the 4008 close.
    let slow_side = async {
        let deadline = tokio::time::Instant::now() + WAIT * 4;
        while server.metric("fanout_slow_consumers_total").await < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "never kicked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seen: Vec<(String, i64)> = Vec::new();
        let code = loop {
            let f = slow.recv().await;
            match f["type"].as_str().unwrap() {
                "message" => seen.push((
                    f["id"].as_str().unwrap().to_owned(),
                    f["offset"].as_i64().unwrap(),
                )),
                "close" => break f["code"].as_u64(),
                other => panic!("unexpected {other}"),
            }
        };
        (seen, code)
    };
    let ((acked, fast_got), (seen, code)) = tokio::join!(send_and_receive, slow_side);
    assert_eq!(fast_got, acked, "the other member got everything, in order");
    assert!(
        rss_kib(server.pid()) < 512 * 1024,
        "server memory stays bounded"
    );
    assert_eq!(code, Some(4008), "closed as a slow consumer");
    assert!(seen.len() < N, "the slow client fell behind");
    assert_eq!(
        seen[..],
        acked[..seen.len()],
        "what it got is a prefix, in order"
    );

    // Resuming with `since` gives exactly the rest.
    let last = seen
        .last()
        .map_or(joined["position"]["offset"].as_i64().unwrap(), |s| s.1);
    let mut again = server.connect("slow").await;
    again.join("general", Some((last, &epoch))).await;
    let mut rest = Vec::new();
    while seen.len() + rest.len() < N {
        let m = again.recv_type("message").await;
        rest.push((
            m["id"].as_str().unwrap().to_owned(),
            m["offset"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        rest[..],
        acked[seen.len()..],
        "nothing missed after resuming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acks_what_was_accepted_closes_with_1001_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 2).await;
    let mut alice = server.connect("alice").await;
    alice.join("general", None).await;
    let mut sent = Vec::new();
    for i in 0..2000 {
        let id = id();
        alice.send_message("general", &id, &format!("m{i}")).await;
        sent.push(id);
    }
    let status_task = tokio::spawn(server.terminate_keep());
    // Every frame until the close: acks for what the server accepted.
    let mut acked = HashMap::new();
    let mut errors = 0;
    let code = loop {
        let f = alice.recv().await;
        match f["type"].as_str().unwrap() {
            "ack" => {
                acked.insert(
                    f["id"].as_str().unwrap().to_owned(),
                    f["offset"].as_i64().unwrap(),
                );
            }
            "error" => errors += 1,
            "message" | "joined" => {}
            "close" => break f["code"].as_u64(),
            other => panic!("unexpected {other}"),
        }
    };
    assert_eq!(code, Some(1001), "server going away");
    assert_eq!(errors, 0, "a drain answers accepted sends with acks");
    assert!(
        !acked.is_empty(),
        "sends in flight at the SIGTERM were acked"
    );
    let server = status_task.await.unwrap();
    let status = server.exit_status().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    // Everything acked is in history after a restart.
    let server = Server::start(&server.data_dir.clone(), 2).await;
    let history = server.history_with("general", acked.len()).await;
    let stored: HashSet<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in acked.keys() {
        assert!(
            stored.contains(id.as_str()),
            "acked {id} survives the drain"
        );
    }
    assert!(history.len() <= sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_through_another_node_shows_up_once() {
    let broker = Broker::start(None);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = broker.url();
    let a = Server::start_with(da.path(), 2, &["--log", &url, "--node", "gw-a"]).await;
    let b = Server::start_with(db.path(), 2, &["--log", &url, "--node", "gw-b"]).await;
    let mut watch_a = a.connect("watcher-a").await;
    let mut watch_b = b.connect("watcher-b").await;
    watch_a.join("general", None).await;
    watch_b.join("general", None).await;

    // Retried at once (B may or may not have the first attempt projected),
    // and retried after B's history has it.
    let mut alice = a.connect("alice").await;
    let quick = id();
    alice.send_message("general", &quick, "quick retry").await;
    let first = alice.recv_type("ack").await;
    let mut alice_b = b.connect("alice").await;
    alice_b.send_message("general", &quick, "quick retry").await;
    let retried = alice_b.recv_type("ack").await;
    assert_eq!(retried["id"], quick.as_str());

    let late = id();
    alice.send_message("general", &late, "late retry").await;
    let late_ack = alice.recv_type("ack").await;
    b.history_with("general", 2).await;
    alice_b.send_message("general", &late, "late retry").await;
    let late_retry = alice_b.recv_type("ack").await;
    assert_eq!(
        late_retry["offset"], late_ack["offset"],
        "answered from history"
    );

    let marker = id();
    alice.send_message("general", &marker, "marker").await;
    for watcher in [&mut watch_a, &mut watch_b] {
        let mut got = Vec::new();
        loop {
            let m = watcher.recv_type("message").await;
            got.push(m["id"].as_str().unwrap().to_owned());
            if m["id"] == marker.as_str() {
                break;
            }
        }
        assert_eq!(
            got,
            [quick.clone(), late.clone(), marker.clone()],
            "each once, live"
        );
    }
    for server in [&a, &b] {
        let history = server.history_with("general", 3).await;
        let ids: Vec<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [quick.as_str(), late.as_str(), marker.as_str()],
            "each once in history"
        );
        assert_eq!(history[0]["offset"], first["offset"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_stops_intake_and_unavailable_means_not_appended() {
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let url = broker.url();
    let server = Server::start_with(
        dir.path(),
        2,
        &[
            "--log",
            &url,
            "--log-queue-kbytes",
            "64",
            "--log-enqueue-timeout-ms",
            "500",
        ],
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(server.connect(&format!("c{i}")).await);
    }
    // Stall the broker, then every client sends.
    let broker_pid = Pid::from_raw(broker.pid() as i32);
    kill(broker_pid, Signal::SIGSTOP).unwrap();
    let body = "y".repeat(4000);
    let mut sent: Vec<String> = Vec::new();
    for c in clients.iter_mut() {
        for _ in 0..5 {
            let id = id();
            c.send_message("general", &id, &body).await;
            sent.push(id);
        }
    }
    // Some sends are refused once the producer queue is full...
    let mut answered: HashMap<String, Value> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !answered.values().any(|f| f["type"] == "error") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no send was refused"
        );
        for c in clients.iter_mut() {
            if let Some(f) = c.try_recv(Duration::from_millis(20)).await {
                answered.insert(f["id"].as_str().unwrap().to_owned(), f);
            }
        }
    }
    assert!(
        rss_kib(server.pid()) < 512 * 1024,
        "memory stays bounded while stalled"
    );
    // ...and once the broker resumes, every other send is acked.
    kill(broker_pid, Signal::SIGCONT).unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let mine = &sent[i * 5..(i + 1) * 5];
        while !mine.iter().all(|id| answered.contains_key(id)) {
            let f = c.recv().await;
            answered.insert(f["id"].as_str().unwrap().to_owned(), f);
        }
    }
    assert_eq!(answered.len(), sent.len(), "every send answered");
    let acked: HashSet<&str> = answered
        .iter()
        .filter(|(_, f)| f["type"] == "ack")
        .map(|(id, _)| id.as_str())
        .collect();
    let refused: HashSet<&str> = answered
        .iter()
        .filter(|(_, f)| f["type"] == "error")
        .map(|(id, f)| {
            assert_eq!(f["code"], "unavailable", "{f}");
            id.as_str()
        })
        .collect();
    assert!(!refused.is_empty() && !acked.is_empty());
    let history = server.history_with("general", acked.len()).await;
    let stored: HashSet<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        stored, acked,
        "acked ones are stored; refused ones never appear"
    );
}

/// Sends `id` on `c` until it is acked: while the log is slow to come back,
/// an attempt may be answered `unavailable` with `pending` (never anything
/// else); returns the ack.
async fn retried_until_acked(c: &mut Client, room: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        c.send_message(room, id, "retried").await;
        let answer = answer_to(c, id).await;
        if answer["type"] == "ack" {
            return answer;
        }
        assert_eq!(
            (answer["code"].as_str(), &answer["pending"]),
            (Some("unavailable"), &Value::Bool(true)),
            "{answer}"
        );
        assert!(tokio::time::Instant::now() < deadline, "never acked");
    }
}

/// Sends one more message after a warm-up (offset 0) and a retried one
/// (offset 1): it lands at offset 2, so the retried one is in the log once,
/// and the history holds the three in order. Returns the new id.
async fn after_the_retry(server: &Server, c: &mut Client, before: [&String; 2]) -> String {
    let next = send_acked(c, "general", 1, "after").await;
    assert_eq!(next[0].1, 2, "the retried message is in the log once");
    let history = server.history_with("general", 3).await;
    let ids: Vec<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [before[0].as_str(), before[1].as_str(), next[0].0.as_str()]
    );
    next[0].0.clone()
}

/// The next `ack` or `error` frame naming `id`.
async fn answer_to(c: &mut Client, id: &str) -> Value {
    loop {
        let f = c.recv().await;
        if f["id"] == id && (f["type"] == "ack" || f["type"] == "error") {
            return f;
        }
    }
}

/// The hung retry: the broker stalls, a client POSTs and gives up, the
/// broker comes back; the retry with the same id gets the first attempt's
/// ack (it used to time out forever), and the log holds the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_stalled_broker_gets_the_abandoned_attempts_ack() {
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), 1, &["--log", &broker.url()]).await;
    let mut alice = server.connect("alice").await;
    let warm = send_acked(&mut alice, "general", 1, "warm-up").await;
    assert_eq!(warm[0].1, 0);

    let broker_pid = Pid::from_raw(broker.pid() as i32);
    kill(broker_pid, Signal::SIGSTOP).unwrap();
    let first = id();
    let gave_up = reqwest::Client::new()
        .post(server.url("/rooms/general/messages?user=alice"))
        .json(&serde_json::json!({"id": first, "body": "abandoned"}))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(
        gave_up.is_err_and(|e| e.is_timeout()),
        "the stalled broker does not answer"
    );
    kill(broker_pid, Signal::SIGCONT).unwrap();

    let ack = retried_until_acked(&mut alice, "general", &first).await;
    assert_eq!(ack["offset"], 1, "the first attempt's place in the log");
    let again: Value = reqwest::Client::new()
        .post(server.url("/rooms/general/messages?user=alice"))
        .json(&serde_json::json!({"id": first, "body": "again"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&again["type"], &again["offset"]),
        (&Value::from("ack"), &ack["offset"]),
        "over HTTP too: {again}"
    );
    after_the_retry(&server, &mut alice, [&warm[0].0, &first]).await;
}

/// A send the stalled broker does not answer within `--send-timeout-ms` is
/// answered `unavailable` with `pending`, and so is its retry while the
/// broker stays stalled; once it is back, the retry is acked with the first
/// attempt's offset, and the room holds one message, live and in history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_past_the_timeout_is_pending_and_one_message_after_the_retry() {
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        1,
        &["--log", &broker.url(), "--send-timeout-ms", "1000"],
    )
    .await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    bob.join("general", None).await;
    let warm = send_acked(&mut alice, "general", 1, "warm-up").await;

    let broker_pid = Pid::from_raw(broker.pid() as i32);
    kill(broker_pid, Signal::SIGSTOP).unwrap();
    let first = id();
    alice.send_message("general", &first, "stalled").await;
    let answer = answer_to(&mut alice, &first).await;
    assert_eq!(
        (answer["code"].as_str(), &answer["pending"]),
        (Some("unavailable"), &Value::Bool(true)),
        "{answer}"
    );
    alice.send_message("general", &first, "stalled").await;
    let retry = answer_to(&mut alice, &first).await;
    assert_eq!(retry["pending"], true, "still stalled: {retry}");
    assert!(server.metric("ingest_send_timeouts_total").await >= 2.0);
    kill(broker_pid, Signal::SIGCONT).unwrap();

    let ack = retried_until_acked(&mut alice, "general", &first).await;
    assert_eq!(ack["offset"], 1);
    let next = after_the_retry(&server, &mut alice, [&warm[0].0, &first]).await;
    // Live, the room saw it once too.
    let mut live = Vec::new();
    while live.last() != Some(&next) {
        let m = bob.recv_type("message").await;
        live.push(m["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(live, [warm[0].0.clone(), first.clone(), next]);
}
