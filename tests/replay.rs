//! End-to-end tests of `chat replay` and `chat versions`: real `chat serve`
//! processes fed over WebSocket, the replay run as a user runs it (through
//! the server's control socket, or on its own when no server holds the data
//! dir), on the embedded log and on a Kafka-protocol broker.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{id, Client, Server, WAIT};
use eventlog::EventLog;
use serde_json::Value;

const PARTITIONS: u32 = 4;
const ROOMS: [&str; 5] = ["general", "random", "rust.lang", "ops", "music"];

/// Runs `chat ARGS`, failing the test after a deadline.
async fn chat(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(args)
        .env("NO_COLOR", "1")
        // The test broker is a single broker: one replica, one in sync.
        .env("CHAT_LOG_REPLICATION_FACTOR", "1")
        .env("CHAT_LOG_MIN_INSYNC_REPLICAS", "1")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .unwrap_or_else(|_| panic!("chat {args:?} did not finish"))
        .unwrap()
}

/// Runs `chat ARGS`, which must succeed; returns its stdout as JSON.
async fn chat_json(args: &[&str]) -> Value {
    let out = chat(args).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "chat {args:?} failed: {stderr}\n{stdout}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("chat {args:?} printed no JSON ({e}): {stdout}\n{stderr}"))
}

/// `chat replay --switch` of the Kafka log at `url` into the store of
/// `data_dir` (inside the server holding it, if one does); its report.
async fn replay_and_switch(url: &str, data_dir: &str) -> Value {
    let partitions = PARTITIONS.to_string();
    chat_json(&[
        "replay",
        "--log",
        url,
        "--data-dir",
        data_dir,
        "--partitions",
        &partitions,
        "--switch",
        "--json",
    ])
    .await
}

/// Waits for the control socket of the server on `dir`.
async fn control_socket(dir: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(dir.join("chat.sock")).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no control socket in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every page of `room`'s history, newest first, as the HTTP API gives them.
async fn pages(server: &Server, room: &str, limit: usize) -> Vec<Vec<Value>> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut url = server.url(&format!("/rooms/{room}/messages?limit={limit}"));
        if let Some(b) = before {
            url.push_str(&format!("&before={b}"));
        }
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let page: Value = response.json().await.unwrap();
        out.push(page["messages"].as_array().unwrap().clone());
        match page["before"].as_i64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

/// The pages of every room.
async fn all_pages(server: &Server, rooms: &[&str]) -> HashMap<String, Vec<Vec<Value>>> {
    let mut all = HashMap::new();
    for room in rooms {
        all.insert(room.to_string(), pages(server, room, 7).await);
    }
    all
}

/// Sends `n` messages round-robin over `rooms` and waits for every ack;
/// returns how many went to each room.
async fn send_acked(c: &mut Client, rooms: &[&str], n: usize) -> HashMap<String, usize> {
    let mut per_room = HashMap::new();
    for i in 0..n {
        let room = rooms[i % rooms.len()];
        c.send_message(room, &id(), &format!("{} says {i}", c.user))
            .await;
        *per_room.entry(room.to_owned()).or_default() += 1;
    }
    for _ in 0..n {
        c.recv_type("ack").await;
    }
    per_room
}

/// Waits until the history of each room holds its count.
async fn projected(server: &Server, counts: &HashMap<String, usize>) {
    for (room, n) in counts {
        let h = server.history_with(room, *n).await;
        assert_eq!(h.len(), *n, "history of {room}");
    }
}

fn add(into: &mut HashMap<String, usize>, more: HashMap<String, usize>) {
    for (room, n) in more {
        *into.entry(room).or_default() += n;
    }
}

fn names(list: &Value) -> Vec<(String, bool, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["current"].as_bool().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_serving_rebuilds_the_live_history_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let server = Server::start(dir.path(), PARTITIONS).await;
    control_socket(dir.path()).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut counts = send_acked(&mut alice, &ROOMS, 150).await;
    add(&mut counts, send_acked(&mut bob, &ROOMS[1..], 120).await);
    projected(&server, &counts).await;
    let live = all_pages(&server, &ROOMS).await;

    // Replay into v2 inside the server while readers keep reading v1.
    let reader = {
        let (url, want) = (
            server.url("/rooms/general/messages?limit=7"),
            live["general"][0].clone(),
        );
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut reads = 0;
            loop {
                let page: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
                assert_eq!(
                    page["messages"],
                    Value::Array(want.clone()),
                    "reads during the replay"
                );
                reads += 1;
                if reads >= 20 {
                    return reads;
                }
            }
        })
    };
    let args = ["replay", "--data-dir", &d, "--partitions", "4", "--json"];
    let report = chat_json(&args).await;
    assert_eq!(reader.await.unwrap(), 20);
    assert_eq!(report["version"], "v2");
    assert_eq!(report["events"], 270);
    assert_eq!(report["rooms"], 5);
    assert_eq!(report["dead_lettered"], 0);
    assert_eq!(report["switched"], false);
    let list = chat_json(&["versions", "list", "--data-dir", &d, "--json"]).await;
    assert_eq!(
        names(&list),
        [
            ("v1".into(), true, "ready".into()),
            ("v2".into(), false, "ready".into())
        ]
    );

    // Switch: the running server now reads v2, and it equals v1 page by page.
    let out = chat(&["versions", "switch", "v2", "--data-dir", &d]).await;
    assert!(out.status.success(), "{out:?}");
    let list = chat_json(&["versions", "list", "--data-dir", &d, "--json"]).await;
    assert!(names(&list).contains(&("v2".into(), true, "ready".into())));
    assert_eq!(
        all_pages(&server, &ROOMS).await,
        live,
        "v2 equals the live history"
    );

    // Replaying twice gives the same result, and --switch moves reads at once.
    let args = [
        "replay",
        "--data-dir",
        &d,
        "--partitions",
        "4",
        "--switch",
        "--json",
    ];
    let report = chat_json(&args).await;
    assert_eq!(
        (&report["version"], &report["switched"]),
        (&Value::from("v3"), &Value::from(true))
    );
    assert_eq!(report["events"], 270);
    assert_eq!(
        all_pages(&server, &ROOMS).await,
        live,
        "v3 equals the live history"
    );

    // The projector follows the switch: new traffic lands in v3.
    add(&mut counts, send_acked(&mut alice, &ROOMS, 40).await);
    projected(&server, &counts).await;
    let live = all_pages(&server, &ROOMS).await;

    // Old versions can be dropped; the current one cannot.
    let out = chat(&["versions", "drop", "v3", "--data-dir", &d]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("current"),
        "{out:?}"
    );
    for old in ["v1", "v2"] {
        let out = chat(&["versions", "drop", old, "--data-dir", &d]).await;
        assert!(out.status.success(), "{out:?}");
    }
    let list = chat_json(&["versions", "list", "--data-dir", &d, "--json"]).await;
    assert_eq!(names(&list), [("v3".into(), true, "ready".into())]);

    // Without a server, the command replays on its own; the next server
    // reads what it switched to.
    alice.close().await;
    bob.close().await;
    assert!(server.terminate().await.success());
    let out = chat(&[
        "replay",
        "--data-dir",
        &d,
        "--partitions",
        "4",
        "--switch",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("inside the chat server"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&report["version"], &report["events"]),
        (&Value::from("v4"), &Value::from(310))
    );
    let server = Server::start(dir.path(), PARTITIONS).await;
    assert_eq!(
        all_pages(&server, &ROOMS).await,
        live,
        "v4 equals the live history"
    );
    let list = chat_json(&["versions", "list", "--data-dir", &d, "--json"]).await;
    assert!(names(&list).contains(&("v4".into(), true, "ready".into())));
}

/// A record no released schema wrote: a fingerprint nobody knows.
fn unknown_fingerprint() -> Vec<u8> {
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    bytes.extend_from_slice(b"\x00\x02r\x02i\x02u\x02b\x02");
    bytes
}

fn posted(room: &str, n: usize) -> eventlog::Record {
    let event = schemas::ChatEvent::MessagePosted(schemas::MessagePosted {
        room: room.into(),
        client_id: format!("seeded-{room}-{n}"),
        user: "seed".into(),
        body: format!("seeded {n}"),
        ts: 1_763_800_000_000 + n as i64,
    });
    eventlog::Record {
        key: room.as_bytes().to_vec(),
        value: schemas::encode(&event),
        ts: 1_763_800_000_000 + n as i64,
    }
}

fn raw(room: &str, value: Vec<u8>) -> eventlog::Record {
    eventlog::Record {
        key: room.as_bytes().to_vec(),
        value,
        ts: 1_763_800_000_000,
    }
}

/// The v1 fixture of the schemas history, as an old writer put it.
fn v1_fixture() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/avro/history/v1/fixtures/message_posted.bin"),
    )
    .unwrap()
}

/// Good records, garbage, a record of an unknown schema, and a v1 fixture,
/// interleaved; returns the good ones per room and where the bad ones are.
async fn seed(log: &dyn EventLog) -> (HashMap<String, usize>, BTreeSet<(u64, u64)>) {
    let mut records = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in 0..60 {
        let room = ROOMS[n % ROOMS.len()];
        records.push(posted(room, n));
        *counts.entry(room.to_owned()).or_default() += 1;
        if n == 20 {
            records.push(raw("general", b"\xffthis is not avro at all".to_vec()));
        }
        if n == 40 {
            records.push(raw("random", unknown_fingerprint()));
        }
    }
    records.push(raw("general", v1_fixture()));
    *counts.entry("general".into()).or_default() += 1;
    let placed = log.append(records).await.unwrap();
    let bad = [21, 42]
        .iter()
        .map(|&i| (placed[i].partition as u64, placed[i].offset))
        .collect();
    (counts, bad)
}

/// The dead letters in the embedded `chat.dlq` of `dir`, as JSON.
async fn dead_letters(dir: &Path) -> Vec<Value> {
    let dlq = eventlog::file::FileLog::open(&dir.join("log"), "chat.dlq", 1).unwrap();
    let end = dlq.end_offset(0).await.unwrap();
    let mut out = Vec::new();
    let mut stream = dlq.read(0, 0);
    while (out.len() as u64) < end {
        use futures::StreamExt;
        for r in stream.next().await.unwrap().unwrap() {
            out.push(serde_json::from_slice::<Value>(&r.value).unwrap());
        }
    }
    out
}

fn check_dead_letters(letters: &[Value], bad: &BTreeSet<(u64, u64)>, consumer: &str) {
    let mine: Vec<&Value> = letters
        .iter()
        .filter(|l| l["consumer"] == consumer)
        .collect();
    let at: BTreeSet<(u64, u64)> = mine
        .iter()
        .map(|l| {
            (
                l["partition"].as_u64().unwrap(),
                l["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        &at, bad,
        "{consumer} dead-lettered the two bad records: {letters:?}"
    );
    let reasons: Vec<&str> = mine.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert!(
        reasons.contains(&"not avro single-object encoding"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown schema fingerprint")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_and_old_schema_fixtures_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let (counts, bad) = {
        let log =
            eventlog::file::FileLog::open(&dir.path().join("log"), "chat.messages", PARTITIONS)
                .unwrap();
        seed(&log).await
    };
    // The projector goes past the poison records and projects the rest,
    // the v1 fixture included.
    let server = Server::start(dir.path(), PARTITIONS).await;
    control_socket(dir.path()).await;
    projected(&server, &counts).await;
    let general = server.history("general", 100).await;
    let fixture = general
        .iter()
        .find(|m| m["user"] == "ada")
        .expect("the v1 fixture");
    assert_eq!(fixture["body"], "héllo, wörld 👋");
    assert_eq!(fixture["id"], "6f1c2a4e-3b5d-4c8e-9f70-1a2b3c4d5e6f");
    let live = all_pages(&server, &ROOMS).await;

    // So does the replay.
    let report = chat_json(&[
        "replay",
        "--data-dir",
        &d,
        "--partitions",
        "4",
        "--switch",
        "--json",
    ])
    .await;
    assert_eq!(report["dead_lettered"], 2);
    assert_eq!(report["events"], 61);
    assert_eq!(all_pages(&server, &ROOMS).await, live);

    assert!(server.terminate().await.success());
    let letters = dead_letters(dir.path()).await;
    assert_eq!(
        letters.len(),
        4,
        "each bad record once per consumer: {letters:?}"
    );
    check_dead_letters(&letters, &bad, "projector");
    check_dead_letters(&letters, &bad, "replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_the_broker_inside_a_server_and_on_its_own() {
    let broker = eventlog::kafka::testing::Broker::start(None);
    let url = broker.url();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_dir, b_dir) = (
        da.path().to_str().unwrap().to_owned(),
        db.path().to_str().unwrap().to_owned(),
    );
    let a = Server::start_with(da.path(), PARTITIONS, &["--log", &url]).await;
    control_socket(da.path()).await;
    // Poison and an old-schema record straight onto the topic, then traffic.
    let log = eventlog::kafka::KafkaLog::connect(eventlog::kafka::KafkaConfig::new(
        &broker.brokers(),
        "chat.messages",
        PARTITIONS,
    ))
    .await
    .unwrap();
    let (mut counts, _) = seed(&log).await;
    let mut alice = a.connect("alice").await;
    add(&mut counts, send_acked(&mut alice, &ROOMS, 100).await);
    projected(&a, &counts).await;
    let live = all_pages(&a, &ROOMS).await;
    let events = counts.values().sum::<usize>();

    // Inside the server holding data dir A.
    let report = replay_and_switch(&url, &a_dir).await;
    assert_eq!(report["version"], "v2");
    assert_eq!(report["events"], events);
    assert_eq!(report["dead_lettered"], 2);
    assert_eq!(
        all_pages(&a, &ROOMS).await,
        live,
        "v2 on A equals the live history"
    );

    // On its own, into a fresh store B, then served from B.
    let report = replay_and_switch(&url, &b_dir).await;
    assert_eq!(report["events"], events);
    assert_eq!(report["dead_lettered"], 2);
    assert_eq!(report["switched"], true);
    // B serves the version the replay built (and projects on from its
    // position; a gateway without the projector role would serve no
    // history from an embedded store nobody writes).
    let b = Server::start_with(db.path(), PARTITIONS, &["--log", &url]).await;
    assert_eq!(
        all_pages(&b, &ROOMS).await,
        live,
        "the replay into B equals A's live history"
    );
}

/// Sends `n` messages to `room` and waits for their acks; their offsets,
/// and every other frame read meanwhile is added to `heard`.
async fn acked_offsets(c: &mut Client, room: &str, n: usize, heard: &mut Vec<Value>) -> Vec<i64> {
    for i in 0..n {
        c.send_message(room, &id(), &format!("{} says {i}", c.user))
            .await;
    }
    let mut offsets = Vec::new();
    while offsets.len() < n {
        let f = c.recv().await;
        if f["type"] == "ack" {
            offsets.push(f["offset"].as_i64().unwrap());
        } else {
            heard.push(f);
        }
    }
    offsets
}

/// Frames of `c` up to the first one `until` accepts, added to `heard`.
async fn hear_until(c: &mut Client, heard: &mut Vec<Value>, until: impl Fn(&Value) -> bool) {
    loop {
        let f = c.recv().await;
        let done = until(&f);
        heard.push(f);
        if done {
            return;
        }
    }
}

/// `GET /me/rooms` of `user` on `server`, by room.
async fn my_rooms(server: &Server, user: &str) -> HashMap<String, Value> {
    let (status, body) = server.get_as(&format!("/me/rooms?user={user}"), None).await;
    assert_eq!(status, 200, "{body}");
    body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["room"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

/// Waits until `GET /me/rooms` of `user` on `server` lists `room` as `want`
/// (`last_offset`, `read_offset`, `unread`).
async fn rooms_say(server: &Server, user: &str, room: &str, want: (i64, Option<i64>, u64)) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = my_rooms(server, user).await.get(room).map(|r| {
            (
                r["last_offset"].as_i64().unwrap_or(-1),
                r["read_offset"].as_i64(),
                r["unread"].as_u64().unwrap(),
            )
        });
        if got == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}'s {room} on {} is {got:?}, not {want:?}",
            server.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two gateways (`gw-a`, `gw-b`), each with its own data dir, on one test
/// broker; B's control socket is up (for `chat replay` into it).
struct TwoGateways {
    a: Server,
    b: Server,
    url: String,
    b_data: tempfile::TempDir,
    _a_data: tempfile::TempDir,
    _broker: eventlog::kafka::testing::Broker,
}

impl TwoGateways {
    async fn start() -> TwoGateways {
        let broker = eventlog::kafka::testing::Broker::start(None);
        let url = broker.url();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Server::start_with(da.path(), PARTITIONS, &["--log", &url, "--node", "gw-a"]).await;
        let b = Server::start_with(db.path(), PARTITIONS, &["--log", &url, "--node", "gw-b"]).await;
        control_socket(db.path()).await;
        TwoGateways {
            a,
            b,
            url,
            b_data: db,
            _a_data: da,
            _broker: broker,
        }
    }

    fn b_dir(&self) -> String {
        self.b_data.path().to_str().unwrap().to_owned()
    }
}

/// Read positions and unread counts (issue 19, point 2), on two gateways
/// of one broker: alice reads up to an offset on A, bob sends 5, alice asks
/// B: 5 unread; a replay into a new projection version says the same. In a
/// direct-message room read positions are shared across gateways; in a
/// public one they are the reader's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_hold_on_another_gateway_and_after_a_replay() {
    let g = TwoGateways::start().await;
    let (url, b_dir, a, b) = (g.url.clone(), g.b_dir(), &g.a, &g.b);
    const DM: &str = "dm:alice:bob";
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    for room in ["general", DM] {
        alice.join(room, None).await;
        bob.join(room, None).await;
    }

    // Every frame bob's connection gets.
    let mut heard = Vec::new();
    let first = acked_offsets(&mut bob, "general", 3, &mut heard).await;
    let read_to = *first.last().unwrap();
    alice
        .send_json(serde_json::json!({"type": "read", "room": "general", "offset": read_to}))
        .await;
    // Alice's own connection hears it back from the log.
    let echo = alice.recv_type("read").await;
    assert_eq!(
        echo,
        serde_json::json!({"type": "read", "room": "general", "user": "alice", "offset": read_to})
    );
    let later = acked_offsets(&mut bob, "general", 5, &mut heard).await;
    let last = *later.last().unwrap();
    // Alice's read of general is before bob's last message in its
    // partition: had bob been sent it, he would have it by then.
    hear_until(&mut bob, &mut heard, |f| {
        f["type"] == "message" && f["offset"] == last
    })
    .await;
    assert!(
        !heard.iter().any(|f| f["type"] == "read"),
        "alice's read of the public room reached bob: {heard:?}"
    );

    // A direct message: bob writes twice, alice reads the first.
    let dm = acked_offsets(&mut bob, DM, 2, &mut heard).await;
    alice
        .send_json(serde_json::json!({"type": "read", "room": DM, "offset": dm[0]}))
        .await;
    // Shared in a DM: bob, on the other gateway, is told.
    let told = bob.recv_type("read").await;
    assert_eq!(told["room"], DM, "{told}");
    assert_eq!(
        told,
        serde_json::json!({"type": "read", "room": DM, "user": "alice", "offset": dm[0]})
    );

    alice.close().await;
    let mut alice = b.connect("alice").await;
    alice.join("general", None).await;
    rooms_say(b, "alice", "general", (last, Some(read_to), 5)).await;
    rooms_say(b, "alice", DM, (dm[1], Some(dm[0]), 1)).await;
    // Bob's own messages are read by him.
    rooms_say(b, "bob", "general", (last, Some(last), 0)).await;
    rooms_say(a, "alice", "general", (last, Some(read_to), 5)).await;

    // Public rooms keep read positions to their reader; DMs share them.
    let (status, reads) = b.get_as("/rooms/general/reads?user=bob", None).await;
    assert_eq!(status, 200, "{reads}");
    assert_eq!(reads["shared"], false);
    assert_eq!(
        reads["reads"],
        serde_json::json!([{"user": "bob", "offset": last}])
    );
    let (_, reads) = b.get_as(&format!("/rooms/{DM}/reads?user=bob"), None).await;
    assert_eq!(reads["shared"], true);
    assert_eq!(
        reads["reads"],
        serde_json::json!([{"user": "alice", "offset": dm[0]}, {"user": "bob", "offset": dm[1]}])
    );
    let (status, _) = b
        .get_as(&format!("/rooms/{DM}/reads?user=carol"), None)
        .await;
    assert_eq!(status, 403, "carol may not read the DM's positions");

    // A replay into a new projection version rebuilds the same answers.
    let report = replay_and_switch(&url, &b_dir).await;
    assert_eq!(report["version"], "v2");
    assert_eq!(report["switched"], true);
    let rooms = my_rooms(b, "alice").await;
    let general = &rooms["general"];
    assert_eq!(
        (
            general["last_offset"].as_i64(),
            general["read_offset"].as_i64(),
            general["unread"].as_u64()
        ),
        (Some(last), Some(read_to), Some(5)),
        "after the replay: {general}"
    );
    assert_eq!(rooms[DM]["unread"], 1, "{}", rooms[DM]);
    alice.close().await;
}

/// `GET /readyz` of `server`: the status and the body.
async fn readyz(server: &Server) -> (u16, String) {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Issue 21: a node that projects turns unready, with the reason, once its
/// history is past the lag bound (here: its projector paused through the
/// control socket), and ready again when the projector catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_the_projector_is_paused_past_its_lag_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let server =
        Server::start_with(dir.path(), PARTITIONS, &["--ready-max-lag-records", "3"]).await;
    control_socket(dir.path()).await;
    assert_eq!(readyz(&server).await, (200, "ready".to_owned()));

    let paused = chat(&["projector", "pause", "--data-dir", &d]).await;
    assert!(paused.status.success(), "{paused:?}");
    assert_eq!(
        String::from_utf8_lossy(&paused.stdout).trim(),
        "the projector is paused"
    );
    // Five messages of one room: one partition, five records behind.
    let mut alice = server.connect("alice").await;
    acked_offsets(&mut alice, "general", 5, &mut Vec::new()).await;
    let (status, why) = readyz(&server).await;
    assert_eq!(status, 503, "{why}");
    assert!(
        why.starts_with("projector: partition ")
            && why.contains("is 5 records behind the log (bound 3)"),
        "{why}"
    );
    // Nothing was applied meanwhile.
    let (_, page) = server.get_as("/rooms/general/messages", None).await;
    assert_eq!(page["messages"], serde_json::json!([]), "{page}");

    let resumed = chat(&["projector", "resume", "--data-dir", &d]).await;
    assert!(resumed.status.success(), "{resumed:?}");
    assert_eq!(server.history_with("general", 5).await.len(), 5);
    let deadline = tokio::time::Instant::now() + WAIT;
    while readyz(&server).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A server without a projector says so.
    let gateway_dir = tempfile::tempdir().unwrap();
    let gateway = Server::start_with(
        gateway_dir.path(),
        PARTITIONS,
        &["--roles", "ingest,fanout"],
    )
    .await;
    control_socket(gateway_dir.path()).await;
    let refused = chat(&[
        "projector",
        "pause",
        "--data-dir",
        gateway_dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("this server runs no projector"),
        "{refused:?}"
    );
    drop(gateway);
}

/// Issue 21: `chat doctor` on a broker and the store of a running server:
/// every topic and the current version are fine; told another partition
/// count, it names the problem and its fix, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_the_topics_and_the_store_and_what_is_wrong() {
    let broker = eventlog::kafka::testing::Broker::start(None);
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let server = Server::start_with(dir.path(), PARTITIONS, &["--log", &url]).await;
    control_socket(dir.path()).await;
    let partitions = PARTITIONS.to_string();
    let args = [
        "doctor",
        "--log",
        &url,
        "--data-dir",
        &d,
        "--partitions",
        &partitions,
        "--json",
    ];
    let report = chat_json(&args).await;
    assert_eq!(report["problems"], 0, "{report}");
    let finding = |subject: &str| -> Vec<String> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["subject"] == subject)
            .map(|f| f["what"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        finding("chat.messages"),
        ["4 partitions, 1 replicas at the fewest, kept forever"]
    );
    assert_eq!(finding("chat.dlq").len(), 1);
    assert!(
        finding("chat.ephemeral")[0].contains("retention.ms=60000"),
        "{report}"
    );
    assert!(
        finding("store")[0].starts_with("projection version v1 serves reads"),
        "{report}"
    );
    assert!(finding("events")[0].contains("v1, v2"), "{report}");

    let wrong = chat(&[
        "doctor",
        "--log",
        &url,
        "--data-dir",
        &d,
        "--partitions",
        "8",
    ])
    .await;
    assert!(!wrong.status.success(), "{wrong:?}");
    let out = String::from_utf8_lossy(&wrong.stdout);
    assert!(
        out.contains("PROBLEM  chat.messages: 4 partitions, but chat is told 8"),
        "{out}"
    );
    assert!(out.contains("fix: start chat with --partitions 4"), "{out}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("1 problem(s) found"),
        "{wrong:?}"
    );
    drop(server);
}

/// Sends `frame` (an edit, delete or react with its `id`) and returns the
/// answer to it, an `ack` or an `error`; every other frame read meanwhile is
/// added to `heard`.
async fn answer_to(c: &mut Client, frame: Value, heard: &mut Vec<Value>) -> Value {
    let id = frame["id"].clone();
    c.send_json(frame).await;
    loop {
        let f = c.recv().await;
        if (f["type"] == "ack" || f["type"] == "error") && f["id"] == id {
            return f;
        }
        heard.push(f);
    }
}

/// The frames of `c` up to (and with) its change frame of id `id`, added to
/// `heard`; that frame.
async fn change_frame(c: &mut Client, id: &str, heard: &mut Vec<Value>) -> Value {
    loop {
        let f = c.recv().await;
        heard.push(f.clone());
        if ["edit", "delete", "react"].contains(&f["type"].as_str().unwrap_or("")) && f["id"] == id
        {
            return f;
        }
    }
}

/// `GET /rooms/{room}/messages` with `query` on `server`: the messages.
async fn page_with(server: &Server, room: &str, query: &str) -> Vec<Value> {
    let (status, page) = server
        .get_as(&format!("/rooms/{room}/messages?{query}"), None)
        .await;
    assert_eq!(status, 200, "{query}: {page}");
    page["messages"].as_array().unwrap().clone()
}

/// Waits until the history of `room` on `server` says `want` of the
/// message at `offset` (compared field by field, as JSON).
async fn history_says(server: &Server, room: &str, offset: i64, want: &Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = page_with(server, room, "limit=100").await;
        let got = page.iter().find(|m| m["offset"] == offset);
        let agrees = got.is_some_and(|m| {
            want.as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| m.get(k).unwrap_or(&Value::Null) == v)
        });
        if agrees {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{room}@{offset} on {} is {got:?}, not {want}",
            server.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An RFC 3339 time of `ms` milliseconds since the Unix epoch.
fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Issue 20, points 1 and 2, on two gateways of one broker: an edit, a
/// delete and reactions reach both live and the history of both; a
/// non-author's edit and delete are `forbidden` and append nothing; a
/// retried edit is one event; `as_of` shows the room as it stood; a replay
/// into a new projection version gives the same pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_deletes_and_reactions_on_two_gateways() {
    use serde_json::json;
    let g = TwoGateways::start().await;
    let (url, b_dir, a, b) = (g.url.clone(), g.b_dir(), &g.a, &g.b);
    const ROOM: &str = "general";
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.join(ROOM, None).await;
    bob.join(ROOM, None).await;
    let (mut heard_a, mut heard_b) = (Vec::new(), Vec::new());

    let first = acked_offsets(&mut alice, ROOM, 1, &mut heard_a).await[0];
    let second = acked_offsets(&mut bob, ROOM, 1, &mut heard_b).await[0];
    let second_ts = b.history_with(ROOM, 2).await[1]["ts"].as_i64().unwrap();
    // The edit's time is after the second message's (as_of by time below):
    // the clock has moved past it before the edit is sent.
    while schemas::now_ms() <= second_ts {
        tokio::task::yield_now().await;
    }

    // Alice edits her message: both gateways' members get it live.
    let edit =
        json!({"type": "edit", "room": ROOM, "id": id(), "target": first, "body": "first, edited"});
    let edit_id = edit["id"].as_str().unwrap().to_owned();
    let acked = answer_to(&mut alice, edit.clone(), &mut heard_a).await;
    assert_eq!(acked["type"], "ack", "{acked}");
    let edit_offset = acked["offset"].as_i64().unwrap();
    for (c, heard) in [(&mut alice, &mut heard_a), (&mut bob, &mut heard_b)] {
        let live = change_frame(c, &edit_id, heard).await;
        assert_eq!(
            live,
            json!({"type": "edit", "room": ROOM, "offset": edit_offset, "id": edit_id,
                   "target": first, "user": "alice", "body": "first, edited", "ts": acked["ts"]})
        );
    }
    // Retried on the same connection: the first ack, nothing appended.
    assert_eq!(
        answer_to(&mut alice, edit.clone(), &mut heard_a).await,
        acked
    );
    // Retried over HTTP on the other gateway, once its history has it.
    history_says(b, ROOM, first, &json!({"body": "first, edited"})).await;
    let http = reqwest::Client::new();
    let patch = http
        .patch(b.url(&format!("/rooms/{ROOM}/messages/{first}?user=alice")))
        .json(&json!({"id": edit_id, "body": "first, edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 200);
    assert_eq!(patch.json::<Value>().await.unwrap(), acked);

    // Bob may neither edit nor delete alice's message, by frame or HTTP.
    for frame in [
        json!({"type": "edit", "room": ROOM, "id": id(), "target": first, "body": "mine now"}),
        json!({"type": "delete", "room": ROOM, "id": id(), "target": first}),
    ] {
        let refused = answer_to(&mut bob, frame, &mut heard_b).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
    }
    let refused = http
        .delete(a.url(&format!("/rooms/{ROOM}/messages/{first}?user=bob")))
        .json(&json!({"id": id()}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    // No such message: not_found.
    let missing =
        json!({"type": "react", "room": ROOM, "id": id(), "target": 1_000_000, "emoji": "👍"});
    assert_eq!(
        answer_to(&mut bob, missing, &mut heard_b).await["code"],
        "not_found"
    );

    // Reactions: bob 👍, alice 👍 (over HTTP), bob 🎉, bob takes back 👍.
    let react = |emoji: &str, remove: bool| json!({"type": "react", "room": ROOM, "id": id(), "target": first, "emoji": emoji, "remove": remove});
    let r1 = answer_to(&mut bob, react("👍", false), &mut heard_b).await;
    assert_eq!(r1["type"], "ack", "{r1}");
    // Nothing the refusals tried was appended: the partition went on
    // from the edit to this reaction (the retries appended nothing either).
    assert_eq!(r1["offset"].as_i64().unwrap(), edit_offset + 1);
    let r2_id = id();
    let r2 = http
        .post(a.url(&format!(
            "/rooms/{ROOM}/messages/{first}/reactions?user=alice"
        )))
        .json(&json!({"id": r2_id, "emoji": "👍"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200);
    let r3 = answer_to(&mut bob, react("🎉", false), &mut heard_b).await;
    let r4 = react("👍", true);
    let r4_id = r4["id"].as_str().unwrap().to_owned();
    assert_eq!(answer_to(&mut bob, r4, &mut heard_b).await["type"], "ack");
    for (c, heard) in [(&mut alice, &mut heard_a), (&mut bob, &mut heard_b)] {
        let live = change_frame(c, &r4_id, heard).await;
        assert_eq!(
            (
                &live["user"],
                &live["emoji"],
                &live["remove"],
                &live["target"]
            ),
            (&json!("bob"), &json!("👍"), &json!(true), &json!(first))
        );
        for id in [&r2_id, r3["id"].as_str().unwrap()] {
            assert!(heard.iter().any(|f| f["id"] == *id), "{id} not heard");
        }
    }

    // Bob deletes his own message.
    let delete = json!({"type": "delete", "room": ROOM, "id": id(), "target": second});
    let delete_id = delete["id"].as_str().unwrap().to_owned();
    let deleted = answer_to(&mut bob, delete, &mut heard_b).await;
    assert_eq!(deleted["type"], "ack", "{deleted}");
    let delete_offset = deleted["offset"].as_i64().unwrap();
    for (c, heard) in [(&mut alice, &mut heard_a), (&mut bob, &mut heard_b)] {
        let live = change_frame(c, &delete_id, heard).await;
        assert_eq!(
            (&live["type"], &live["target"]),
            (&json!("delete"), &json!(second))
        );
    }
    // Each change reached each member once.
    for heard in [&heard_a, &heard_b] {
        let edits = heard
            .iter()
            .filter(|f| f["id"] == edit_id.as_str() && f["type"] == "edit");
        assert_eq!(edits.count(), 1, "{heard:?}");
    }

    // The history of both gateways: the latest body with its edit time,
    // reactions with who, a tombstone without its body.
    let now_first = json!({
        "body": "first, edited", "edited_ts": acked["ts"],
        "reactions": [
            {"emoji": "👍", "count": 1, "users": ["alice"]},
            {"emoji": "🎉", "count": 1, "users": ["bob"]},
        ],
    });
    let now_second = json!({"body": "", "deleted": true, "user": "bob", "reactions": null});
    for server in [&a, &b] {
        history_says(server, ROOM, first, &now_first).await;
        history_says(server, ROOM, second, &now_second).await;
    }

    // As of a moment: before the edit, the old body and no reactions; the
    // deleted message as it was (its body read back from the log).
    let as_of = |at: String| async move { page_with(b, ROOM, &format!("as_of={at}")).await };
    let before_edit = as_of((edit_offset - 1).to_string()).await;
    assert_eq!(before_edit.len(), 2, "{before_edit:?}");
    assert_eq!(before_edit[0]["body"], "alice says 0");
    assert_eq!(before_edit[0].get("edited_ts"), None);
    assert_eq!(before_edit[0].get("reactions"), None);
    assert_eq!(before_edit[1]["body"], "bob says 0");
    assert_eq!(before_edit[1].get("deleted"), None);
    assert_eq!(as_of(rfc3339(second_ts)).await, before_edit, "by time");
    let before_delete = as_of((delete_offset - 1).to_string()).await;
    assert_eq!(before_delete[0]["body"], "first, edited");
    assert_eq!(before_delete[0]["reactions"], now_first["reactions"]);
    assert_eq!(before_delete[1]["body"], "bob says 0");
    let at_end = as_of(delete_offset.to_string()).await;
    assert_eq!(at_end, page_with(b, ROOM, "limit=100").await);
    let (status, bad) = b
        .get_as(&format!("/rooms/{ROOM}/messages?as_of=yesterday"), None)
        .await;
    assert_eq!((status, &bad["code"]), (400, &json!("bad_frame")));

    // A replay into a new projection version: page for page the same, and
    // the same room as of a moment.
    let live = all_pages(b, &[ROOM]).await;
    let report = replay_and_switch(&url, &b_dir).await;
    assert_eq!(report["version"], "v2");
    assert_eq!(report["switched"], true);
    assert_eq!(all_pages(b, &[ROOM]).await, live);
    assert_eq!(as_of((edit_offset - 1).to_string()).await, before_edit);
    assert_eq!(as_of((delete_offset - 1).to_string()).await, before_delete);
    alice.close().await;
    bob.close().await;
}
