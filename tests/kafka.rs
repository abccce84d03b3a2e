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

/// Established TCP connections from process `pid` to `port`, from /proc,
/// counted by socket inode: a read of `/proc/PID/net/tcp` while sockets
/// come and go (the storm's clients) can list a line twice.
fn connections_to(pid: u32, port: u16) -> usize {
    let sockets: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01" && remote_port == Some(port) && sockets.contains(*inode) {
                found.insert(inode.to_string());
            }
        }
    }
    found.len()
}

/// Threads of process `pid`.
fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The most connections to the broker and threads of `pid` seen until
/// `stop` is set, sampled every few milliseconds.
fn sample_peaks(
    pid: u32,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut connections, mut threads) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let now = connections_to(pid, port);
            connections = connections.max(now);
            threads = threads.max(threads_of(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        (connections, threads)
    })
}

/// The broker clients of a gateway (all roles) are a fixed set: the TCP
/// connections it holds to the broker are the same number at idle, after
/// traffic in 1,000 rooms over every partition, and while 500 clients each
/// resume 2 rooms from old offsets, and its thread count does not grow with
/// the clients (bounded pools only). In
/// that storm every client gets exactly the messages it missed, in order,
/// then a live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_connections_to_the_broker_do_not_grow_with_reads() {
    const PARTITIONS: u32 = 16;
    const ROOMS: usize = 1000;
    const PER_ROOM: usize = 3;
    const CLIENTS: usize = 500;
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let url = broker.url();
    let gw = Server::start_with(dir.path(), PARTITIONS, &["--log", url.as_str()]).await;
    let pid = gw.pid();
    eventually(
        Duration::from_secs(30),
        "the projector to own every partition",
        || async { gauge(&gw, "projector_partitions_owned").await == f64::from(PARTITIONS) },
    )
    .await;
    // The epoch, from a room nobody else uses (left at once).
    let mut scout = gw.connect("scout").await;
    let joined = scout.join("scout-room", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    scout.close().await;
    eventually(
        Duration::from_secs(30),
        "the scout's partition to be dropped",
        || async { gauge(&gw, "fanout_partitions").await == 0.0 },
    )
    .await;
    let idle = (connections_to(pid, broker.port), threads_of(pid));

    // Traffic: PER_ROOM messages in each of ROOMS rooms (every partition).
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("storm-{i}")).collect();
    let mut sender = gw.connect("sender").await;
    let mut sent: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for chunk in rooms.chunks(100) {
        let batch: Vec<String> = chunk
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), PER_ROOM))
            .collect();
        for (room, id, offset) in send_acked(&mut sender, &batch, batch.len()).await {
            sent.entry(room).or_default().push((id, offset));
        }
    }
    for messages in sent.values_mut() {
        messages.sort_by_key(|(_, offset)| *offset);
    }
    eventually(
        Duration::from_secs(60),
        "the history to hold every message",
        || async {
            let last = &rooms[ROOMS - 1];
            gw.history_with(last, PER_ROOM).await.len() == PER_ROOM
        },
    )
    .await;
    let after_traffic = (connections_to(pid, broker.port), threads_of(pid));

    // The storm: each client resumes its 2 rooms from their first message,
    // so it lacks the others, which are read back from the log.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_peaks(pid, broker.port, stop.clone());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(gw.connect(&format!("u{c}")).await);
    }
    let began = std::time::Instant::now();
    let last_joined = std::sync::Mutex::new(began);
    let storm = clients.into_iter().enumerate().map(|(c, mut client)| {
        let last_joined = &last_joined;
        let mine = [rooms[2 * c].clone(), rooms[2 * c + 1].clone()];
        let sent = &sent;
        let epoch = epoch.as_str();
        async move {
            for room in &mine {
                let since = sent[room][0].1;
                client
                    .send_json(serde_json::json!({"type": "join", "room": room,
                        "since": {"offset": since, "epoch": epoch}}))
                    .await;
            }
            let mut got: HashMap<String, Vec<String>> = HashMap::new();
            let mut joined = 0;
            let missed = 2 * (PER_ROOM - 1);
            while joined < 2 || got.values().map(Vec::len).sum::<usize>() < missed {
                let f = client.recv().await;
                match f["type"].as_str() {
                    Some("joined") => {
                        assert_eq!(f["recovered"], true, "{f}");
                        joined += 1;
                        let mut last = last_joined.lock().unwrap();
                        *last = (*last).max(std::time::Instant::now());
                    }
                    Some("message") => got
                        .entry(f["room"].as_str().unwrap().to_owned())
                        .or_default()
                        .push(f["id"].as_str().unwrap().to_owned()),
                    _ => panic!("unexpected {f}"),
                }
            }
            for room in &mine {
                let expected: Vec<String> =
                    sent[room][1..].iter().map(|(id, _)| id.clone()).collect();
                assert_eq!(
                    got[room], expected,
                    "{room}: what was missed, in order, once"
                );
            }
            (client, mine)
        }
    });
    let resumed = futures::future::join_all(storm).await;
    let joins_took = last_joined.lock().unwrap().duration_since(began);
    let caught_up = gw.metric_sum("fanout_catch_up_messages_total").await;
    // Then live ones.
    let live: HashMap<String, String> = rooms.iter().map(|r| (r.clone(), id())).collect();
    for chunk in rooms.chunks(100) {
        for room in chunk {
            sender.send_message(room, &live[room], "live").await;
        }
        for _ in chunk {
            sender.recv_type("ack").await;
        }
    }
    let checks = resumed.into_iter().map(|(mut client, mine)| {
        let live = &live;
        async move {
            let mut got = HashSet::new();
            while got.len() < 2 {
                let f = client.recv_type("message").await;
                assert!(mine.iter().any(|r| f["room"] == r.as_str()), "{f}");
                assert_eq!(f["id"], live[f["room"].as_str().unwrap()].as_str(), "{f}");
                got.insert(f["room"].as_str().unwrap().to_owned());
            }
        }
    });
    futures::future::join_all(checks).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let storm_peak = sampler.join().unwrap();
    eprintln!(
        "connections to the broker / threads: idle {idle:?}, after traffic {after_traffic:?}, storm peak {storm_peak:?}; {} joins in {joins_took:?}",
        2 * CLIENTS
    );
    // No dispatcher ran before the storm, so its rings were empty: every
    // missed message came from a catch-up (the history store's or the
    // log's).
    assert_eq!(caught_up, (2 * CLIENTS * (PER_ROOM - 1)) as f64);
    assert_eq!(idle.0, after_traffic.0, "connections after traffic");
    assert_eq!(idle.0, storm_peak.0, "connections in the storm");
    assert!(idle.0 < 10, "{} connections to one broker", idle.0);
    // Threads do not grow with clients: the only ones a storm may add are
    // the runtime's blocking threads (for the Kafka log's metadata calls
    // and the embedded store's reads), a pool `chat` caps at 8 on 2 cores.
    let blocking_cap = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        storm_peak.1 <= idle.1 + blocking_cap.max(8),
        "threads grew from {} to {}",
        idle.1,
        storm_peak.1
    );
}

/// Every record of the topic, partition by partition, up to the end each
/// partition had when asked: (key, decoded event).
async fn whole_topic(broker: &Broker) -> Vec<(String, schemas::ChatEvent)> {
    use eventlog::EventLog;
    use futures::StreamExt;
    let log = eventlog::kafka::KafkaLog::connect(eventlog::kafka::KafkaConfig::new(
        &broker.brokers(),
        "chat.messages",
        PARTITIONS,
    ))
    .await
    .unwrap();
    let mut all = Vec::new();
    for partition in 0..PARTITIONS {
        let end = log.end_offset(partition).await.unwrap();
        let mut read = log.read(partition, 0);
        let mut next = 0;
        while next < end {
            let batch = tokio::time::timeout(common::WAIT, read.next())
                .await
                .expect("records before the deadline")
                .expect("the read goes on")
                .expect("the read succeeds");
            for record in batch {
                next = record.offset + 1;
                let key = String::from_utf8(record.key).unwrap();
                all.push((key, schemas::decode(&record.value).unwrap()));
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_reaches_its_two_users_across_gateways_and_no_one_else() {
    use ingest::auth::testing::{claims, sign};
    const SECRET: &str = "two gateways share this secret";
    const DM: &str = "dm:alice:bob";
    let token = |user: &str| {
        sign(
            jsonwebtoken::Algorithm::HS256,
            SECRET.as_bytes(),
            None,
            &claims(user, Duration::from_secs(3600)),
        )
    };
    let broker = Broker::start(None);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = broker.url();
    let env = [("CHAT_JWT_SECRET", SECRET)];
    let a = Server::start_env(
        da.path(),
        PARTITIONS,
        &["--log", &url, "--node", "gw-a"],
        &env,
    )
    .await;
    let b = Server::start_env(
        db.path(),
        PARTITIONS,
        &["--log", &url, "--node", "gw-b"],
        &env,
    )
    .await;
    let (ta, tb, tc) = (token("alice"), token("bob"), token("carol"));
    let mut alice = a.connect_token(&ta, "alice").await;
    let mut bob = b.connect_token(&tb, "bob").await;
    let mut carol = b.connect_token(&tc, "carol").await;
    alice.join(DM, None).await;
    bob.join(DM, None).await;

    // Carol, on bob's gateway: her join, send and history read are each
    // forbidden, over the WebSocket and over HTTP.
    carol
        .send_json(serde_json::json!({"type": "join", "room": DM}))
        .await;
    assert_eq!(carol.recv().await["code"], "forbidden");
    let sneaky = id();
    carol.send_message(DM, &sneaky, "carol was here").await;
    let e = carol.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("forbidden"), Some(sneaky.as_str()))
    );
    for server in [&a, &b] {
        let (status, _) = server.post_as(DM, &id(), "carol again", Some(&tc)).await;
        assert_eq!(status, 403);
        let (status, _) = server
            .get_as(&format!("/rooms/{DM}/messages"), Some(&tc))
            .await;
        assert_eq!(status, 403);
    }

    // Alice and bob talk, live, each on their own gateway; each message
    // reaches both of them (the sender too), once, in order.
    let mut sent = Vec::new();
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    async fn message_ids(c: &mut Client, into: &mut Vec<String>, until: &str) {
        while into.last().map(String::as_str) != Some(until) {
            let m = c.recv_type("message").await;
            into.push(m["id"].as_str().unwrap().to_owned());
        }
    }
    for i in 0..5 {
        let mid = id();
        let from = if i % 2 == 0 { &mut alice } else { &mut bob };
        from.send_message(DM, &mid, &format!("dm {i}")).await;
        sent.push(mid.clone());
        message_ids(&mut alice, &mut seen[0], &mid).await;
        message_ids(&mut bob, &mut seen[1], &mid).await;
    }
    assert_eq!(seen[0], sent, "alice got every message once, in order");
    assert_eq!(seen[1], sent, "bob got every message once, in order");
    // In history on both gateways, read with either user's token.
    for (server, token) in [(&a, &ta), (&b, &tb)] {
        let deadline = tokio::time::Instant::now() + common::WAIT;
        let ids = loop {
            let (status, page) = server
                .get_as(&format!("/rooms/{DM}/messages"), Some(token))
                .await;
            assert_eq!(status, 200, "{page}");
            let ids: Vec<String> = page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            if ids.len() >= sent.len() || tokio::time::Instant::now() > deadline {
                break ids;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ids, sent, "history of {DM} on {}", server.addr);
    }
    // Carol got nothing of the DM, and the log holds nothing of hers.
    assert_eq!(carol.try_recv(Duration::from_millis(200)).await, None);
    let topic = whole_topic(&broker).await;
    assert_eq!(topic.len(), sent.len(), "{topic:?}");
    for (key, event) in &topic {
        let schemas::ChatEvent::MessagePosted(m) = event else {
            panic!("only messages were sent: {event:?}");
        };
        assert_eq!(key, DM);
        assert_ne!(m.user, "carol");
    }
}

/// A record the fan-out cannot decode (garbage here; a newer schema during
/// a rolling upgrade) is never a silent gap: the room's members get an
/// `unreadable` error in its place, live and on a resume from the ring,
/// and it is counted; the messages around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_is_told_to_its_rooms_members_not_skipped() {
    use eventlog::EventLog;
    let broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let server = gateway(dir.path(), &broker, &[]).await;
    let mut alice = server.connect("alice").await;
    let joined = alice.join("general", None).await;
    let epoch = joined["position"]["epoch"].as_str().unwrap().to_owned();
    // What alice gets, acks left out, until `n` frames.
    async fn frames(c: &mut Client, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        while got.len() < n {
            let f = c.recv().await;
            if f["type"] != "ack" {
                got.push(f);
            }
        }
        got
    }
    let (first, last) = (id(), id());
    alice.send_message("general", &first, "before").await;
    let mut seen = frames(&mut alice, 1).await;
    let writer = tokio::time::timeout(
        common::WAIT,
        eventlog::kafka::KafkaLog::connect(eventlog::kafka::KafkaConfig::new(
            &broker.brokers(),
            "chat.messages",
            PARTITIONS,
        )),
    )
    .await
    .expect("the writer connects")
    .unwrap();
    let placed = tokio::time::timeout(
        common::WAIT,
        writer.append(vec![eventlog::Record {
            key: b"general".to_vec(),
            value: b"\xffnot a chat event".to_vec(),
            ts: 1_763_800_000_000,
        }]),
    )
    .await
    .expect("the garbage is appended")
    .unwrap();
    let bad = placed[0].offset as i64;
    alice.send_message("general", &last, "after").await;
    // Alice, live: the first message, the notice, the last, in offset order.
    seen.extend(frames(&mut alice, 2).await);
    let expect = |got: &[Value]| {
        assert_eq!(got[0]["type"], "message", "{got:?}");
        assert_eq!(got[0]["id"], first.as_str());
        assert_eq!(got[1]["type"], "error", "{got:?}");
        assert_eq!(got[1]["code"], "unreadable");
        assert_eq!(got[1]["room"], "general");
        assert_eq!(got[1]["offset"], bad);
        assert_eq!(got[2]["type"], "message", "{got:?}");
        assert_eq!(got[2]["id"], last.as_str());
    };
    expect(&seen);
    // Bob resumes from before the first message: the same three frames.
    let mut bob = server.connect("bob").await;
    let from = seen[0]["offset"].as_i64().unwrap() - 1;
    let joined = bob.join("general", Some((from, &epoch))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let resumed = frames(&mut bob, 3).await;
    expect(&resumed);
    assert_eq!(server.metric("fanout_unreadable_records_total").await, 1.0);
}

/// The next `presence` change (a frame with `join` or `leave`) `c` gets,
/// skipping other frames.
async fn presence_change(c: &mut Client) -> Value {
    loop {
        let f = c.recv_type("presence").await;
        if f.get("join").is_some() || f.get("leave").is_some() {
            return f;
        }
    }
}

/// Asks `c`'s node who is in `room` until the answer is `want`.
async fn presence_becomes(c: &mut Client, room: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        c.send_json(serde_json::json!({"type": "presence", "room": room}))
            .await;
        let f = loop {
            let f = c.recv_type("presence").await;
            if f.get("users").is_some() {
                break f;
            }
        };
        if f["users"] == serde_json::json!(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {room} stayed {f}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_cross_gateways_and_a_killed_gateways_users_leave() {
    // 1 s keeps the test short; CHAT_TEST_HEARTBEAT_MS=5000 measures the
    // default.
    let heartbeat_ms: u64 = std::env::var("CHAT_TEST_HEARTBEAT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let broker = Broker::start(None);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let heartbeat = heartbeat_ms.to_string();
    let a = gateway(
        da.path(),
        &broker,
        &["--node", "gw-a", "--presence-heartbeat-ms", &heartbeat],
    )
    .await;
    let b = gateway(
        db.path(),
        &broker,
        &["--node", "gw-b", "--presence-heartbeat-ms", &heartbeat],
    )
    .await;
    let room = "lobby";
    let mut alice = a.connect("alice").await;
    alice.join(room, None).await;
    presence_becomes(&mut alice, room, &["alice"]).await;

    // bob on the other gateway: each sees the other, over WebSocket and HTTP.
    let mut bob = b.connect("bob").await;
    bob.join(room, None).await;
    assert_eq!(
        presence_change(&mut alice).await,
        serde_json::json!({"type": "presence", "room": room, "join": ["bob"]})
    );
    presence_becomes(&mut bob, room, &["alice", "bob"]).await;
    for server in [&a, &b] {
        let (status, body) = server
            .get_as(&format!("/rooms/{room}/presence"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            serde_json::json!({"room": room, "users": ["alice", "bob"]})
        );
    }

    // bob's typing reaches alice on the other gateway.
    bob.send_json(serde_json::json!({"type": "typing", "room": room}))
        .await;
    let typing = alice.recv_type("typing").await;
    assert_eq!(typing["user"], "bob", "{typing}");
    assert!(typing["ttl_ms"].as_u64().is_some_and(|t| t > 0), "{typing}");

    // A second tab of bob's: one entry; closing one tab is no leave. carol
    // joins on bob's gateway after the tab closed: that gateway announces
    // in order, so a leave of bob would reach alice before carol's join.
    let mut tab = b.connect("bob").await;
    tab.join(room, None).await;
    tab.close().await;
    let mut carol = b.connect("carol").await;
    carol.join(room, None).await;
    assert_eq!(
        presence_change(&mut alice).await,
        serde_json::json!({"type": "presence", "room": room, "join": ["carol"]}),
        "a tab closing while another is open is no leave"
    );
    bob.close().await;
    assert_eq!(
        presence_change(&mut alice).await,
        serde_json::json!({"type": "presence", "room": room, "leave": ["bob"]})
    );

    // The gateway dies: its users leave alice's presence within the bound
    // (three heartbeats and a sweep), plus the channel's own delay.
    let bound = Duration::from_millis(3 * heartbeat_ms + 1000);
    let killed = tokio::time::Instant::now();
    b.kill();
    let left = presence_change(&mut alice).await;
    let took = killed.elapsed();
    eprintln!("measured: carol left alice's presence {took:?} after the SIGKILL (bound {bound:?})");
    assert_eq!(
        left,
        serde_json::json!({"type": "presence", "room": room, "leave": ["carol"]})
    );
    assert!(
        took <= bound + Duration::from_secs(3),
        "carol left after {took:?}; the bound is {bound:?}"
    );
    let (_, body) = a.get_as(&format!("/rooms/{room}/presence"), None).await;
    assert_eq!(body["users"], serde_json::json!(["alice"]));
    drop(carol);
}

/// `GET /readyz` of `server`: the status and the body.
async fn readyz(server: &Server) -> (u16, String) {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_with_its_reason_when_the_broker_goes() {
    let mut broker = Broker::start(None);
    let dir = tempfile::tempdir().unwrap();
    let server = gateway(dir.path(), &broker, &[]).await;
    assert_eq!(readyz(&server).await, (200, "ready".to_owned()));
    broker.kill();
    eventually(common::WAIT, "unready with the broker gone", || async {
        readyz(&server).await.0 != 200
    })
    .await;
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("log: "),
        "the reason names the log: {body}"
    );
    // Liveness is another question: the process still serves.
    let live = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(live.status().as_u16(), 200);
}
