//! End-to-end tests on a real Kafka-protocol broker (tansu, started per
//! test on a free port): several `chat serve` processes sharing one log.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{id, Client, Server};
use eventlog::kafka::testing::Broker;
use serde_json::Value;

const PARTITIONS: u32 = 4;

async fn gateway(dir: &std::path::Path, broker: &Broker, extra: &[&str]) -> Server {
    let url = broker.url();
    let mut args = vec!["--log", url.as_str()];
    args.extend_from_slice(extra);
    Server::start_with(dir, PARTITIONS, &args).await
}

async fn gauge(server: &Server, name: &str) -> f64 {
    server.metric(name).await
}

/// Waits until `check` holds, polling, failing after `wait`.
async fn eventually<F, Fut>(wait: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `n` messages round-robin over `rooms`; returns (room, id, offset)
/// of each once all are acked.
async fn send_acked(c: &mut Client, rooms: &[String], n: usize) -> Vec<(String, String, i64)> {
    let mut sent = Vec::new();
    for i in 0..n {
        let room = &rooms[i % rooms.len()];
        let id = id();
        c.send_message(room, &id, &format!("m{i}")).await;
        sent.push((room.clone(), id));
    }
    let mut offsets = HashMap::new();
    while offsets.len() < n {
        let ack = c.recv_type("ack").await;
        offsets.insert(
            ack["id"].as_str().unwrap().to_owned(),
            ack["offset"].as_i64().unwrap(),
        );
    }
    sent.into_iter()
        .map(|(room, id)| {
            let offset = offsets[&id];
            (room, id, offset)
        })
        .collect()
}

async fn messages(c: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = c.recv().await;
        if f["type"] == "message" {
            out.push(f);
        } else {
            assert_eq!(f["type"], "ack", "{f}");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_broker_see_each_other_once_in_order() {
    let broker = Broker::start(None);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = gateway(da.path(), &broker, &["--node", "gw-a"]).await;
    let b = gateway(db.path(), &broker, &["--node", "gw-b"]).await;
    let rooms = ["general", "random"];
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    for room in rooms {
        alice.join(room, None).await;
        bob.join(room, None).await;
    }
    const EACH: usize = 100;
    for i in 0..EACH {
        for room in rooms {
            alice.send_message(room, &id(), &format!("alice {i}")).await;
            bob.send_message(room, &id(), &format!("bob {i}")).await;
        }
    }
    let total = 2 * EACH * rooms.len();
    let (got_a, got_b) = tokio::join!(messages(&mut alice, total), messages(&mut bob, total));
    for got in [&got_a, &got_b] {
        let ids: HashSet<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), total, "each message exactly once");
    }
    for room in rooms {
        let seq = |got: &[Value]| -> Vec<(String, i64)> {
            got.iter()
                .filter(|m| m["room"] == room)
                .map(|m| {
                    (
                        m["id"].as_str().unwrap().to_owned(),
                        m["offset"].as_i64().unwrap(),
                    )
                })
                .collect()
        };
        let (sa, sb) = (seq(&got_a), seq(&got_b));
        assert!(
            sa.windows(2).all(|w| w[0].1 < w[1].1),
            "offset order in {room}"
        );
        assert_eq!(sa, sb, "both gateways deliver the same sequence of {room}");
        for server in [&a, &b] {
            let history = server.history_with(room, sa.len()).await;
            let h: Vec<(String, i64)> = history
                .iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap().to_owned(),
                        m["offset"].as_i64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(h, sa, "history of {room} on {}", server.addr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_group_survives_the_sigkill_of_a_member() {
    let broker = Broker::start(None);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let group = ["--roles", "projector", "--group", "shared-projectors"];
    let p1 = gateway(dirs[0].path(), &broker, &group).await;
    let p2 = gateway(dirs[1].path(), &broker, &group).await;
    let gw = gateway(dirs[2].path(), &broker, &["--roles", "ingest,fanout"]).await;
    // The two members split the partitions.
    eventually(
        Duration::from_secs(60),
        "the group to split the partitions",
        || async {
            let (o1, o2) = (
                gauge(&p1, "projector_partitions_owned").await,
                gauge(&p2, "projector_partitions_owned").await,
            );
            o1 > 0.0 && o2 > 0.0 && o1 + o2 == PARTITIONS as f64
        },
    )
    .await;

    let rooms: Vec<String> = (0..8).map(|i| format!("room-{i}")).collect();
    let mut sender = gw.connect("sender").await;
    let mut acked: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for (room, id, offset) in send_acked(&mut sender, &rooms, 200).await {
        acked.entry(room).or_default().push((id, offset));
    }
    // Kill one member mid-stream; the survivor takes its partitions over.
    p1.kill();
    for (room, id, offset) in send_acked(&mut sender, &rooms, 200).await {
        acked.entry(room).or_default().push((id, offset));
    }
    eventually(
        Duration::from_secs(90),
        "the survivor to project every message",
        || async {
            let mut complete = true;
            for (room, want) in &acked {
                complete &= p2.history(room, 100).await.len() >= want.len();
            }
            complete
        },
    )
    .await;
    for (room, want) in &acked {
        let history = p2.history(room, 100).await;
        let got: Vec<(String, i64)> = history
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["offset"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            &got, want,
            "the survivor's history of {room}: every message once, in order"
        );
    }
    assert_eq!(
        gauge(&p2, "projector_partitions_owned").await,
        PARTITIONS as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reads_only_the_partitions_of_joined_rooms() {
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), &broker, &["--roles", "ingest,fanout"]).await;
    assert_eq!(gauge(&gw, "fanout_partitions").await, 0.0);
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    assert_eq!(
        gauge(&gw, "fanout_partitions").await,
        1.0,
        "one room, one partition"
    );
    let m = id();
    alice.send_message("general", &m, "hi").await;
    assert_eq!(bob.recv_type("message").await["id"], m.as_str());
    alice
        .send_text(r#"{"type":"leave","room":"general"}"#)
        .await;
    bob.close().await;
    eventually(
        Duration::from_secs(30),
        "the partition to be dropped",
        || async { gauge(&gw, "fanout_partitions").await == 0.0 },
    )
    .await;
}

/// `chat serve` refuses a `chat.messages` that would delete records (here:
/// a week's retention, the brokers' default), names what is wrong and the
/// flag that accepts it, and starts with that flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_topic_that_deletes_records_unless_accepted() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let broker = Broker::start(None);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap();
    let week = NewTopic::new(
        "chat.messages",
        PARTITIONS as i32,
        TopicReplication::Fixed(1),
    )
    .set("retention.ms", "604800000")
    .set("retention.bytes", "-1");
    for created in admin
        .create_topics([&week], &AdminOptions::new())
        .await
        .unwrap()
    {
        created.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["serve", "--listen", "127.0.0.1:0", "--partitions"])
        .arg(PARTITIONS.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--log", &broker.url()])
        .args([
            "--log-replication-factor",
            "1",
            "--log-min-insync-replicas",
            "1",
        ])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .expect("chat serve gives up on the topic")
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("retention.ms=604800000"), "{stderr}");
    assert!(stderr.contains("--log-accept-topic-config"), "{stderr}");

    let server = gateway(dir.path(), &broker, &["--log-accept-topic-config"]).await;
    let mut c = server.connect("alice").await;
    c.join("general", None).await;
    c.send_message("general", &id(), "kept a week").await;
    assert_eq!(c.recv_type("ack").await["type"], "ack");
    assert!(
        server.log().contains("topic config accepted as it is"),
        "the shortfall is warned about"
    );
}
