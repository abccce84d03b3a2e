//! Tests of the WebSocket protocol handling, without sockets.
//!
//! A [`Client`] runs the production [`session`] over two channels that
//! stand for the socket's halves: the test writes client frames into one and
//! reads what the writer task wrote from the other. The node behind it has
//! real backends (an embedded log and history store in a temporary
//! directory, and a fan-out), built as `chat serve` builds them. The shutdown
//! and slow-consumer paths are driven on a bare [`Connection`] or [`writer`],
//! where the order of events is fixed by the test rather than the scheduler.
//!
//! Every wait is on a condition (a frame, the end of a channel), bounded by
//! [`WAIT`] so a broken promise fails the test instead of hanging it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use eventlog::embedded::EmbeddedLog;
use eventlog::{EventLog, LogRecord};
use fanout::{Fanout, FanoutConfig};
use futures::channel::mpsc as socket;
use futures::StreamExt;
use history::embedded::EmbeddedStore;
use history::HistoryStore;
use schemas::protocol::{MessageView, MAX_BODY_BYTES};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::{dedup, AppState, Gateway, GatewayConfig};

/// Longest wait for anything; reached only when a test fails.
const WAIT: Duration = Duration::from_secs(10);
const ROOM: &str = "general";
const PARTITIONS: u32 = 4;

/// One gateway node over real backends in a temporary directory.
struct Node {
    log: Arc<dyn EventLog>,
    store: Arc<EmbeddedStore>,
    state: Arc<AppState>,
    /// Holds the backends' files for the life of the node.
    _dir: tempfile::TempDir,
}

impl Node {
    /// A node with every role, as `chat serve` runs by default, but
    /// without rate and count limits (the tests of those set their own).
    fn new() -> Node {
        Node::with(
            GatewayConfig {
                limits: crate::limits::Limits::unlimited(),
                ..GatewayConfig::default()
            },
            true,
        )
    }

    /// A node with `config`, and a fan-out when `fanout` is set.
    fn with(config: GatewayConfig, fanout: bool) -> Node {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(dir.path(), schemas::MESSAGES_TOPIC, PARTITIONS).expect("open log"),
        );
        let store =
            Arc::new(EmbeddedStore::open(&dir.path().join("history"), "v1").expect("store"));
        let fanout = fanout.then(|| Fanout::new(log.clone(), FanoutConfig::default()));
        let presence = fanout
            .clone()
            .map(|f| fanout::presence::Presence::start(f, None, "gw-1", Default::default()));
        let gw = Gateway {
            log: log.clone(),
            auth: crate::auth::Auth::Dev,
            fanout,
            presence,
            store: Some(store.clone() as Arc<dyn HistoryStore>),
            projected: None,
            metrics: None,
            config,
        };
        let state = Arc::new(AppState {
            dedup: dedup::Dedup::new(gw.config.dedup_capacity),
            guard: crate::limits::Guard::new(gw.config.limits.clone()),
            gw,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        });
        Node {
            log,
            store,
            state,
            _dir: dir,
        }
    }

    fn partition(&self, room: &str) -> u32 {
        self.log.partition_for(room.as_bytes())
    }

    /// The offset the next record of `room`'s partition will get.
    async fn end(&self, room: &str) -> u64 {
        self.log
            .end_offset(self.partition(room))
            .await
            .expect("end offset")
    }

    fn epoch(&self) -> String {
        self.log.epoch().to_owned()
    }

    /// The record of `room`'s partition at `offset`.
    async fn record(&self, room: &str, offset: u64) -> LogRecord {
        let mut read = self.log.read(self.partition(room), offset);
        let batch = tokio::time::timeout(WAIT, read.next())
            .await
            .expect("the record is in the log")
            .expect("the read yields")
            .expect("the read succeeds");
        batch.into_iter().next().expect("a record at the offset")
    }
}

/// A client of a [`Node`], connected through channels instead of a socket.
struct Client {
    /// What the socket's stream yields to the session.
    to_server: socket::UnboundedSender<Result<Message, axum::Error>>,
    /// What the writer task wrote to the socket.
    from_server: socket::UnboundedReceiver<Message>,
}

impl Client {
    /// Connects `user` and checks that its first frame is `welcome`.
    async fn connect(node: &Node, user: &str) -> Client {
        let mut client = Client::open(node, Some(user));
        let welcome = client.recv().await;
        assert_eq!(
            welcome,
            json!({"type": "welcome", "user": user, "node": "gw-1", "v": PROTOCOL_VERSION}),
        );
        client
    }

    /// Starts a session as the upgrade does in dev mode, `user` being what
    /// the query named (`None`: no valid user).
    fn open(node: &Node, user: Option<&str>) -> Client {
        Client::open_as(node, user.map(Identity::dev))
    }

    /// Starts a session of `identity`, as the upgrade does once it has
    /// identified the client (`None`: dev mode without a user).
    fn open_as(node: &Node, identity: Option<Identity>) -> Client {
        let (to_server, stream) = socket::unbounded();
        let (sink, from_server) = socket::unbounded();
        tokio::spawn(session(sink, stream, node.state.clone(), identity));
        Client {
            to_server,
            from_server,
        }
    }

    /// Sends one text frame.
    fn send_text(&self, text: &str) {
        self.to_server
            .unbounded_send(Ok(Message::Text(text.into())))
            .expect("the session reads");
    }

    fn send(&self, frame: Value) {
        self.send_text(&frame.to_string());
    }

    /// The next frame the server wrote.
    async fn next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.from_server.next())
            .await
            .expect("a frame from the server")
            .expect("the socket is still open")
    }

    /// The next frame, which must be a text frame, as JSON.
    async fn recv(&mut self) -> Value {
        match self.next().await {
            Message::Text(text) => serde_json::from_str(&text).expect("server frames are json"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next `n` frames, in the order they came.
    async fn recv_n(&mut self, n: usize) -> Vec<Value> {
        let mut frames = Vec::with_capacity(n);
        for _ in 0..n {
            frames.push(self.recv().await);
        }
        frames
    }

    /// The next frame, which must be an `error` with `code`; returns it.
    async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["code"], code, "{frame}");
        frame
    }

    /// Sends a message and returns its `ack`, the next frame: for a client
    /// that is not a member of `room` (a member may get its message first).
    async fn post(&mut self, room: &str, id: &str, body: &str) -> Value {
        self.send(json!({"type": "send", "room": room, "id": id, "body": body}));
        let ack = self.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(
            (ack["id"].as_str(), ack["room"].as_str()),
            (Some(id), Some(room))
        );
        ack
    }

    /// Joins `room` (from `since`, if any) and returns the `joined` frame.
    async fn join(&mut self, room: &str, since: Option<Value>) -> Value {
        let mut frame = json!({"type": "join", "room": room});
        if let Some(since) = since {
            frame["since"] = since;
        }
        self.send(frame);
        let joined = self.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(joined["room"], room);
        joined
    }

    /// The next frame, which must be a close frame with a code; returns
    /// its code and reason.
    async fn closed(&mut self) -> (u16, String) {
        match self.next().await {
            Message::Close(Some(close)) => (close.code, close.reason.to_string()),
            other => panic!("expected a close frame with a code, got {other:?}"),
        }
    }
}

fn offset(frame: &Value) -> i64 {
    frame["offset"].as_i64().expect("an integer offset")
}

/// The one frame of `frames` with this `type`.
fn one_of<'a>(frames: &'a [Value], kind: &str) -> &'a Value {
    let mut found = frames.iter().filter(|f| f["type"] == kind);
    let frame = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in {frames:?}"));
    assert!(found.next().is_none(), "two {kind} in {frames:?}");
    frame
}

#[tokio::test]
async fn a_connection_without_user_gets_unauthorized_then_4001() {
    let node = Node::new();
    let mut client = Client::open(&node, None);
    // The error comes first, and no welcome at all.
    client.expect_error("unauthorized").await;
    assert_eq!(
        client.closed().await,
        (CLOSE_UNAUTHORIZED, "unauthorized".to_owned())
    );
}

#[tokio::test]
async fn malformed_frames_get_bad_frame_and_the_connection_keeps_working() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let cases: [(&str, Option<&str>); 7] = [
        ("nope", None),
        ("[1]", None),
        (r#"{"room":"general"}"#, None),
        (r#"{"type":"dance","id":"q"}"#, Some("q")),
        (r#"{"type":"join"}"#, None),
        (r#"{"type":"send","room":"general","body":"hi"}"#, None),
        (r#"{"type":"send","room":"general","id":"m1"}"#, Some("m1")),
    ];
    for (text, id) in cases {
        alice.send_text(text);
        let error = alice.expect_error("bad_frame").await;
        assert_eq!(error["id"].as_str(), id, "{text}");
    }
    alice
        .to_server
        .unbounded_send(Ok(Message::Binary(vec![1, 2].into())))
        .unwrap();
    alice.expect_error("bad_frame").await;
    assert_eq!(node.end(ROOM).await, 0, "nothing was appended");

    let ack = alice.post(ROOM, "m1", "still here").await;
    assert_eq!(offset(&ack), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_too_large_and_not_appended() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    alice.send(json!({"type": "send", "room": ROOM, "id": "big", "body": big}));
    let error = alice.expect_error("too_large").await;
    assert_eq!(error["id"], "big");
    assert_eq!(node.end(ROOM).await, 0, "nothing was appended");

    // The limit itself is allowed, and the refused id is not remembered.
    let ack = alice.post(ROOM, "big", &big[1..]).await;
    assert_eq!(offset(&ack), 0);
    assert_eq!(node.end(ROOM).await, 1);
}

#[tokio::test]
async fn bad_room_names_get_bad_room() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let long = "a".repeat(65);
    for room in ["no spaces", "", long.as_str(), "slash/room"] {
        alice.send(json!({"type": "send", "room": room, "id": "m", "body": "hi"}));
        assert_eq!(alice.expect_error("bad_room").await["id"], "m");
        for kind in ["join", "leave", "typing"] {
            alice.send(json!({"type": kind, "room": room}));
            alice.expect_error("bad_room").await;
        }
    }
    for partition in 0..PARTITIONS {
        assert_eq!(node.log.end_offset(partition).await.unwrap(), 0);
    }
}

#[tokio::test]
async fn a_direct_message_room_is_only_for_its_two_users() {
    const DM: &str = "dm:alice:bob";
    let node = Node::new();
    let mut carol = Client::connect(&node, "carol").await;
    carol.send(json!({"type": "join", "room": DM}));
    // A join has no id: the refusal names its room.
    assert_eq!(carol.expect_error("forbidden").await["room"], DM);
    carol.send(json!({"type": "send", "room": DM, "id": "c1", "body": "psst"}));
    assert_eq!(carol.expect_error("forbidden").await["id"], "c1");
    // Not joined, so no typing either.
    carol.send(json!({"type": "typing", "room": DM}));
    carol.expect_error("not_joined").await;
    assert_eq!(node.end(DM).await, 0, "nothing of carol's was appended");

    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    alice.join(DM, None).await;
    bob.join(DM, None).await;
    alice.send(json!({"type": "send", "room": DM, "id": "a1", "body": "hi bob"}));
    let got = bob.recv().await;
    assert_eq!(
        (got["user"].as_str(), got["body"].as_str()),
        (Some("alice"), Some("hi bob"))
    );
    assert_eq!(node.end(DM).await, 1, "alice's message only");
    // Carol's refused id was not claimed: the same id is still free.
    carol.send(json!({"type": "send", "room": ROOM, "id": "c1", "body": "public"}));
    assert_eq!(carol.recv().await["type"], "ack");
}

#[tokio::test]
async fn a_rooms_claim_limits_the_rooms_a_connection_may_use() {
    let node = Node::new();
    let identity = Identity {
        rooms: Some(crate::auth::RoomGrant::parse(&["team-a.*"]).unwrap()),
        ..Identity::dev("alice")
    };
    let mut alice = Client::open_as(&node, Some(identity));
    assert_eq!(alice.recv().await["type"], "welcome");
    alice.join("team-a.ops", None).await;
    alice.send(json!({"type": "join", "room": ROOM}));
    alice.expect_error("forbidden").await;
    alice.send(json!({"type": "send", "room": ROOM, "id": "x", "body": "hi"}));
    assert_eq!(alice.expect_error("forbidden").await["id"], "x");
    assert_eq!(node.end(ROOM).await, 0, "nothing was appended");
}

#[tokio::test]
async fn an_expired_token_ends_the_connection_with_4001() {
    let node = Node::new();
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - crate::auth::token::LEEWAY.as_secs()
        - 1;
    let identity = Identity {
        expires_at: Some(past),
        ..Identity::dev("alice")
    };
    let mut alice = Client::open_as(&node, Some(identity));
    assert_eq!(alice.recv().await["type"], "welcome");
    let error = alice.expect_error("unauthorized").await;
    assert!(
        error["message"].as_str().unwrap().contains("expired"),
        "{error}"
    );
    assert_eq!(alice.closed().await.0, CLOSE_UNAUTHORIZED);
}

#[tokio::test]
async fn leave_and_typing_need_a_joined_room_but_send_does_not() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    alice.send(json!({"type": "leave", "room": ROOM}));
    alice.expect_error("not_joined").await;
    alice.send(json!({"type": "typing", "room": ROOM}));
    alice.expect_error("not_joined").await;
    assert_eq!(node.end(ROOM).await, 0);

    // docs/protocol.md: "the connection does not need to have joined it".
    let ack = alice.post(ROOM, "m1", "from outside").await;
    assert_eq!(offset(&ack), 0);
    assert_eq!(node.end(ROOM).await, 1);
}

#[tokio::test]
async fn a_send_is_acked_with_its_offset_after_the_append() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    // Back to back: appended in the order sent, acked in that order.
    for (id, body) in [("m1", "hello"), ("m2", "world"), ("m3", "again")] {
        alice.send(json!({"type": "send", "room": ROOM, "id": id, "body": body}));
    }
    let acks = alice.recv_n(3).await;
    for (n, (ack, (id, body))) in acks
        .iter()
        .zip([("m1", "hello"), ("m2", "world"), ("m3", "again")])
        .enumerate()
    {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], id);
        assert_eq!(ack["room"], ROOM);
        assert_eq!(offset(ack), n as i64);
        let ts = ack["ts"].as_i64().expect("an integer ts");
        // Acked means in the log.
        assert!(node.end(ROOM).await > n as u64);
        let record = node.record(ROOM, n as u64).await;
        assert_eq!(record.offset, n as u64);
        assert_eq!(record.key, ROOM.as_bytes());
        assert_eq!(record.ts, ts);
        let Ok(schemas::ChatEvent::MessagePosted(m)) = schemas::decode(&record.value) else {
            panic!("offset {n} holds a message");
        };
        assert_eq!(
            (m.room.as_str(), m.client_id.as_str(), m.user.as_str()),
            (ROOM, id, "alice")
        );
        assert_eq!((m.body.as_str(), m.ts), (body, ts));
    }
    assert_eq!(node.end(ROOM).await, 3);
}

#[tokio::test]
async fn the_same_id_twice_is_appended_once() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let send = json!({"type": "send", "room": ROOM, "id": "once", "body": "hi"});
    // The second one comes while the first may still be in the log.
    alice.send(send.clone());
    alice.send(send.clone());
    let acks = alice.recv_n(2).await;
    assert_eq!(acks[0]["type"], "ack", "{acks:?}");
    assert_eq!(acks[0], acks[1], "same offset and ts");
    // And once the first is acked, from the ids the node remembers.
    alice.send(send);
    assert_eq!(alice.recv().await, acks[0]);
    assert_eq!(node.end(ROOM).await, 1, "appended once");

    // An id is per room: the same id elsewhere is another message.
    let other = alice.post("other", "once", "hi").await;
    assert_eq!(node.end("other").await, offset(&other) as u64 + 1);
}

#[tokio::test]
async fn an_id_another_user_used_is_refused() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut mallory = Client::connect(&node, "mallory").await;
    alice.post(ROOM, "mine", "hi").await;
    mallory.send(json!({"type": "send", "room": ROOM, "id": "mine", "body": "hijack"}));
    assert_eq!(mallory.expect_error("bad_frame").await["id"], "mine");
    assert_eq!(node.end(ROOM).await, 1);
}

#[tokio::test]
async fn a_retry_the_history_knows_is_answered_from_it() {
    let node = Node::new();
    stored_message(&node).await;
    let mut alice = Client::connect(&node, "alice").await;
    let ack = alice.post(ROOM, "elsewhere", "hi").await;
    assert_eq!((offset(&ack), ack["ts"].as_i64()), (7, Some(1_234)));
    assert_eq!(node.end(ROOM).await, 0, "not appended again");
}

#[tokio::test]
async fn joined_members_get_the_rooms_messages() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    for client in [&mut alice, &mut bob] {
        let joined = client.join(ROOM, None).await;
        assert_eq!(
            joined["position"],
            json!({"offset": -1, "epoch": node.epoch()})
        );
        assert_eq!(joined["recovered"], true);
    }
    alice.send(json!({"type": "send", "room": ROOM, "id": "m1", "body": "hello"}));
    // The sender's ack and its own message come in either order.
    let frames = alice.recv_n(2).await;
    let ack = one_of(&frames, "ack");
    let message = one_of(&frames, "message").clone();
    assert_eq!(
        message,
        json!({"type": "message", "room": ROOM, "offset": ack["offset"], "id": "m1",
               "user": "alice", "body": "hello", "ts": ack["ts"]}),
    );
    assert_eq!(bob.recv().await, message);
}

#[tokio::test]
async fn join_with_since_resumes_after_that_offset() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut offsets = Vec::new();
    for n in 1..=3 {
        let ack = alice
            .post(ROOM, &format!("m{n}"), &format!("body {n}"))
            .await;
        offsets.push(offset(&ack));
    }
    let mut carol = Client::connect(&node, "carol").await;
    let joined = carol
        .join(
            ROOM,
            Some(json!({"offset": offsets[0], "epoch": node.epoch()})),
        )
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["position"]["offset"], offsets[2]);
    for (n, &expected) in offsets.iter().enumerate().skip(1) {
        let message = carol.recv().await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(offset(&message), expected);
        assert_eq!(message["id"], format!("m{}", n + 1));
        assert_eq!(message["body"], format!("body {}", n + 1));
    }
    // Then live ones, with no repeat of the caught-up ones in between.
    let ack = alice.post(ROOM, "m4", "live").await;
    let live = carol.recv().await;
    assert_eq!(
        (live["type"].as_str(), offset(&live)),
        (Some("message"), offset(&ack))
    );
}

#[tokio::test]
async fn join_with_since_of_another_epoch_is_not_recovered() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    alice.post(ROOM, "old", "before").await;
    let mut carol = Client::connect(&node, "carol").await;
    let joined = carol
        .join(ROOM, Some(json!({"offset": -1, "epoch": "another log"})))
        .await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["position"]["offset"], 0);
    // Live messages only: the old one is not replayed.
    alice.post(ROOM, "new", "after").await;
    assert_eq!(carol.recv().await["id"], "new");
}

#[tokio::test]
async fn after_leave_no_message_of_the_room_comes() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    alice.join(ROOM, None).await;
    bob.join(ROOM, None).await;
    alice.send(json!({"type": "leave", "room": ROOM}));
    // A successful leave has no answer: the next frame answers the probe.
    alice.send_text("probe");
    alice.expect_error("bad_frame").await;
    bob.send(json!({"type": "send", "room": ROOM, "id": "m1", "body": "hello"}));
    // The fan-out hands a message to every member of the room at once: once
    // bob has it, alice would have it queued before her next answer.
    let frames = bob.recv_n(2).await;
    one_of(&frames, "ack");
    one_of(&frames, "message");
    alice.send_text("probe");
    alice.expect_error("bad_frame").await;
    alice.send(json!({"type": "leave", "room": ROOM}));
    alice.expect_error("not_joined").await;
}

#[tokio::test]
async fn typing_reaches_the_members_the_sender_included() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    alice.join(ROOM, None).await;
    bob.join(ROOM, None).await;
    bob.send(json!({"type": "typing", "room": ROOM}));
    let typing = json!({"type": "typing", "room": ROOM, "user": "bob", "ttl_ms": 3000});
    assert_eq!(alice.recv().await, typing);
    assert_eq!(bob.recv().await, typing);
    assert_eq!(node.end(ROOM).await, 0, "typing is not stored");
    // A repeat right away is absorbed: the next frame alice gets is bob's
    // message, not a second notice.
    bob.send(json!({"type": "typing", "room": ROOM}));
    bob.send(json!({"type": "send", "room": ROOM, "id": "m1", "body": "hi"}));
    assert_eq!(alice.recv().await["type"], "message");
}

#[tokio::test]
async fn presence_lists_the_room_and_tells_each_user_once() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    alice.join(ROOM, None).await;
    alice.send(json!({"type": "presence", "room": ROOM}));
    assert_eq!(
        alice.recv().await,
        json!({"type": "presence", "room": ROOM, "users": ["alice"]})
    );
    let change = |kind: &str, user: &str| json!({"type": "presence", "room": ROOM, kind: [user]});
    // Two tabs of bob: one join, one leave, when the last tab closes.
    let mut tab1 = Client::connect(&node, "bob").await;
    tab1.join(ROOM, None).await;
    assert_eq!(alice.recv().await, change("join", "bob"));
    let mut tab2 = Client::connect(&node, "bob").await;
    tab2.join(ROOM, None).await;
    tab1.send(json!({"type": "leave", "room": ROOM}));
    let mut carol = Client::connect(&node, "carol").await;
    carol.join(ROOM, None).await;
    assert_eq!(alice.recv().await, change("join", "carol"));
    drop(tab2);
    assert_eq!(alice.recv().await, change("leave", "bob"));
    // Joining again is no change; a room alice has not joined tells her
    // nothing, though she may ask.
    carol.join(ROOM, None).await;
    alice.send(json!({"type": "presence", "room": "elsewhere"}));
    assert_eq!(
        alice.recv().await,
        json!({"type": "presence", "room": "elsewhere", "users": []})
    );
    carol.join("elsewhere", None).await;
    let mut dave = Client::connect(&node, "dave").await;
    dave.join(ROOM, None).await;
    assert_eq!(alice.recv().await, change("join", "dave"));
    // Asked again: the whole list, sorted.
    alice.send(json!({"type": "presence", "room": ROOM}));
    assert_eq!(
        alice.recv().await,
        json!({"type": "presence", "room": ROOM, "users": ["alice", "carol", "dave"]})
    );
}

#[tokio::test]
async fn presence_of_a_room_the_user_may_not_use_is_forbidden() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    alice.send(json!({"type": "presence", "room": "dm:bob:carol"}));
    let refused = alice.expect_error("forbidden").await;
    assert_eq!(refused["room"], "dm:bob:carol");
    alice.send(json!({"type": "presence"}));
    alice.expect_error("bad_frame").await;
}

#[tokio::test]
async fn without_roles_joins_and_sends_are_unavailable() {
    let config = GatewayConfig {
        ingest: false,
        ..GatewayConfig::default()
    };
    let node = Node::with(config, false);
    let mut alice = Client::connect(&node, "alice").await;
    alice.send(json!({"type": "join", "room": ROOM}));
    alice.expect_error("unavailable").await;
    alice.send(json!({"type": "send", "room": ROOM, "id": "m1", "body": "hi"}));
    assert_eq!(alice.expect_error("unavailable").await["id"], "m1");
    alice.send(json!({"type": "presence", "room": ROOM}));
    assert_eq!(alice.expect_error("unavailable").await["room"], ROOM);
    assert_eq!(node.end(ROOM).await, 0);
}

#[tokio::test]
async fn shutdown_closes_with_1001_after_the_queued_frames() {
    let node = Node::new();
    let mut alice = Client::open(&node, Some("alice"));
    node.state.shutdown.cancel();
    assert_eq!(alice.recv().await["type"], "welcome");
    assert_eq!(
        alice.closed().await,
        (CLOSE_GOING_AWAY, "server going away".to_owned())
    );
}

/// A client stream that never yields: the connection is driven by its own
/// state (shutdown, kick, appends in flight) alone.
fn silent() -> futures::stream::Pending<Result<Message, axum::Error>> {
    futures::stream::pending()
}

#[tokio::test]
async fn shutdown_acks_the_accepted_sends_first() {
    let node = Node::new();
    let (tx, mut rx) = mpsc::channel(16);
    let mut conn = Connection::new(node.state.clone(), Identity::dev("alice"), tx);
    conn.handle(r#"{"type":"send","room":"general","id":"m1","body":"hi"}"#)
        .await;
    conn.handle(r#"{"type":"send","room":"general","id":"m2","body":"hi"}"#)
        .await;
    // Accepted, not appended yet: the batch runs only when `run` polls it.
    node.state.shutdown.cancel();
    let close = tokio::time::timeout(WAIT, conn.run(&mut silent()))
        .await
        .expect("the drain ends");
    assert_eq!(close.map(|c| c.code), Some(CLOSE_GOING_AWAY));
    for (n, id) in ["m1", "m2"].into_iter().enumerate() {
        let ack: Value = serde_json::from_str(&rx.try_recv().expect("an ack")).unwrap();
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some(id))
        );
        assert_eq!(offset(&ack), n as i64);
    }
    assert_eq!(node.end(ROOM).await, 2);
}

#[tokio::test]
async fn the_client_leaving_still_completes_the_appends_in_flight() {
    let node = Node::new();
    let (tx, mut rx) = mpsc::channel(16);
    let mut conn = Connection::new(node.state.clone(), Identity::dev("alice"), tx);
    conn.handle(r#"{"type":"send","room":"general","id":"m1","body":"hi"}"#)
        .await;
    let mut gone = futures::stream::empty::<Result<Message, axum::Error>>();
    let close = tokio::time::timeout(WAIT, conn.run(&mut gone))
        .await
        .expect("run ends");
    assert!(close.is_none(), "no close frame for a client that is gone");
    let ack: Value = serde_json::from_str(&rx.try_recv().expect("an ack")).unwrap();
    assert_eq!((ack["type"].as_str(), offset(&ack)), (Some("ack"), 0));
    assert_eq!(node.end(ROOM).await, 1);
}

#[tokio::test]
async fn a_full_queue_makes_a_slow_consumer() {
    let node = Node::new();
    // Room for one frame, and nobody drains it.
    let (tx, _rx) = mpsc::channel(1);
    let mut conn = Connection::new(node.state.clone(), Identity::dev("alice"), tx);
    conn.handle("nope").await;
    assert!(!conn.kick.is_cancelled());
    conn.handle("nope").await;
    assert!(
        conn.kick.is_cancelled(),
        "the second error found the queue full"
    );
    let close = tokio::time::timeout(WAIT, conn.run(&mut silent()))
        .await
        .expect("run ends");
    assert_eq!(close.map(|c| c.code), Some(CLOSE_SLOW_CONSUMER));
}

/// What [`writer`] writes for `frames` queued and then `close`.
async fn written(frames: &[&str], close: Close) -> Vec<Message> {
    let (tx, rx) = mpsc::channel(16);
    for frame in frames {
        tx.try_send(Frame::from(*frame)).unwrap();
    }
    let (close_tx, close_rx) = oneshot::channel();
    close_tx.send(close).unwrap();
    let (sink, out) = socket::unbounded();
    tokio::time::timeout(WAIT, writer(sink, rx, close_rx, Duration::ZERO))
        .await
        .expect("the writer ends");
    // The writer closed the sink: `out` ends.
    out.collect().await
}

#[tokio::test]
async fn the_writer_flushes_before_1001_and_drops_the_backlog_of_4008() {
    let close = |m: &Message| match m {
        Message::Close(Some(c)) => Some((c.code, c.reason.to_string())),
        _ => None,
    };
    let going = written(&["a", "b"], GOING_AWAY).await;
    assert_eq!(going.len(), 3, "{going:?}");
    assert_eq!(going[0], Message::Text("a".into()));
    assert_eq!(going[1], Message::Text("b".into()));
    assert_eq!(
        close(&going[2]),
        Some((CLOSE_GOING_AWAY, "server going away".to_owned()))
    );

    let slow = written(&["a", "b"], SLOW_CONSUMER).await;
    assert_eq!(slow.len(), 1, "{slow:?}");
    assert_eq!(
        close(&slow[0]),
        Some((CLOSE_SLOW_CONSUMER, "slow consumer".to_owned()))
    );
}

#[tokio::test]
async fn a_retry_after_a_slow_consumer_close_is_answered() {
    let node = Node::new();
    // Room for one frame, and nobody drains it.
    let (tx, _rx) = mpsc::channel(1);
    let mut conn = Connection::new(node.state.clone(), Identity::dev("alice"), tx);
    conn.handle("nope").await;
    // Accepted: one batch for the log, one send waiting behind it.
    conn.handle(r#"{"type":"send","room":"general","id":"m1","body":"hi"}"#)
        .await;
    conn.handle(r#"{"type":"send","room":"general","id":"m2","body":"hi"}"#)
        .await;
    conn.handle("nope").await;
    let close = tokio::time::timeout(WAIT, conn.run(&mut silent()))
        .await
        .expect("run ends");
    assert_eq!(close.map(|c| c.code), Some(CLOSE_SLOW_CONSUMER));
    drop(conn);
    // docs/protocol.md: reconnect after 4008 and retry with the same ids;
    // each is answered, and is one message.
    let mut alice = Client::connect(&node, "alice").await;
    let first = alice.post(ROOM, "m1", "hi").await;
    let second = alice.post(ROOM, "m2", "hi").await;
    assert_eq!((offset(&first), offset(&second)), (0, 1));
    assert_eq!(node.end(ROOM).await, 2);
}

/// A node with `limits` and every role.
fn limited(limits: crate::limits::Limits) -> Node {
    Node::with(
        GatewayConfig {
            limits,
            ..GatewayConfig::default()
        },
        true,
    )
}

fn rates(connection: (u32, u32), user: (u32, u32)) -> crate::limits::Limits {
    use crate::limits::{Limits, Rate};
    let rate = |(per_second, burst)| Rate { per_second, burst };
    Limits {
        send_rate: rate(connection),
        user_send_rate: rate(user),
        ..Limits::unlimited()
    }
}

/// The `n` next frames, split into acks and errors by id.
async fn acks_and_errors(client: &mut Client, n: usize) -> (Vec<String>, Vec<Value>) {
    let (mut acks, mut errors) = (Vec::new(), Vec::new());
    for frame in client.recv_n(n).await {
        match frame["type"].as_str() {
            Some("ack") => acks.push(frame["id"].as_str().unwrap().to_owned()),
            Some("error") => errors.push(frame),
            _ => panic!("expected an ack or an error, got {frame}"),
        }
    }
    acks.sort();
    (acks, errors)
}

#[tokio::test]
async fn a_connection_over_its_send_rate_is_rate_limited_and_nothing_more_is_appended() {
    // A burst of 3, then one a second: the 6 sends below arrive at once.
    let node = limited(rates((1, 3), (0, 0)));
    let mut alice = Client::connect(&node, "alice").await;
    for i in 0..6 {
        alice.send(json!({"type": "send", "room": ROOM, "id": format!("m{i}"), "body": "hi"}));
    }
    let (acks, errors) = acks_and_errors(&mut alice, 6).await;
    // The burst goes through, the next is refused; the connection is not
    // read until its wait is over, so at most one send in each later
    // second finds a token and the rest are refused.
    assert_eq!(acks[..3], ["m0", "m1", "m2"]);
    assert_eq!(errors[0]["id"], "m3", "{errors:?}");
    for e in &errors {
        assert_eq!(e["code"], "rate_limited", "{e}");
        let wait = e["retry_after_ms"].as_u64().expect("a retry_after_ms");
        assert!((1..=1000).contains(&wait), "{e}");
    }
    assert_eq!(
        node.end(ROOM).await,
        acks.len() as u64,
        "the refused sends are not in the log"
    );
    // The refused ids were not claimed: the same id may be sent again later.
    assert!(node.state.dedup.claim(ROOM, "m3", "alice").is_ok());
}

#[tokio::test]
async fn a_users_send_rate_is_shared_by_its_connections_and_no_one_elses() {
    let node = limited(rates((0, 0), (1, 2)));
    let mut a = Client::connect(&node, "alice").await;
    let mut b = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    a.post(ROOM, "a1", "one").await;
    b.post(ROOM, "b1", "two").await;
    a.send(json!({"type": "send", "room": ROOM, "id": "a2", "body": "three"}));
    let refused = a.expect_error("rate_limited").await;
    assert_eq!(refused["id"], "a2");
    bob.post(ROOM, "c1", "bob has a bucket of his own").await;
    assert_eq!(node.end(ROOM).await, 3);
}

#[tokio::test]
async fn typing_counts_against_the_send_rate() {
    let node = limited(rates((1, 1), (0, 0)));
    let mut alice = Client::connect(&node, "alice").await;
    alice.join(ROOM, None).await;
    alice.send(json!({"type": "typing", "room": ROOM}));
    assert_eq!(alice.recv().await["type"], "typing");
    alice.send(json!({"type": "typing", "room": ROOM}));
    let refused = alice.expect_error("rate_limited").await;
    assert!(refused["retry_after_ms"].as_u64().is_some(), "{refused}");
}

#[tokio::test]
async fn a_connection_joins_at_most_its_rooms_limit() {
    let node = limited(crate::limits::Limits {
        rooms_per_connection: 2,
        ..crate::limits::Limits::unlimited()
    });
    let mut alice = Client::connect(&node, "alice").await;
    alice.join("a", None).await;
    alice.join("b", None).await;
    alice.send(json!({"type": "join", "room": "c"}));
    let refused = alice.expect_error("limit_reached").await;
    assert_eq!(refused["room"], "c");
    assert!(
        refused["message"].as_str().unwrap().contains('2'),
        "{refused}"
    );
    // Joining a room again is not a new room; leaving one makes room.
    alice.join("a", None).await;
    alice.send(json!({"type": "leave", "room": "b"}));
    alice.join("c", None).await;
}

/// Limits that ping every `ping` and close after `idle` of silence.
fn pinging(ping: Duration, idle: Duration) -> crate::limits::Limits {
    crate::limits::Limits {
        ping_every: ping,
        idle_timeout: idle,
        ..crate::limits::Limits::unlimited()
    }
}

#[tokio::test]
async fn a_silent_connection_is_pinged_then_closed_with_4002() {
    let node = limited(pinging(
        Duration::from_millis(50),
        Duration::from_millis(300),
    ));
    let mut alice = Client::connect(&node, "alice").await;
    alice.post(ROOM, "m1", "then silence").await;
    let mut pings = 0;
    let close = loop {
        match alice.next().await {
            Message::Ping(_) => pings += 1,
            Message::Close(Some(close)) => break close,
            other => panic!("expected pings then a close, got {other:?}"),
        }
    };
    assert_eq!((close.code, close.reason.as_str()), (4002, "idle timeout"));
    assert!(pings >= 1, "pinged before the close");
}

#[tokio::test]
async fn pongs_keep_a_quiet_connection_open() {
    // Twenty pings at 50 ms span twice the idle timeout: only the pongs
    // can have kept the connection open.
    let node = limited(pinging(
        Duration::from_millis(50),
        Duration::from_millis(500),
    ));
    let mut alice = Client::connect(&node, "alice").await;
    for _ in 0..20 {
        match alice.next().await {
            Message::Ping(data) => alice
                .to_server
                .unbounded_send(Ok(Message::Pong(data)))
                .expect("the session reads"),
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    alice.send(json!({"type": "send", "room": ROOM, "id": "m1", "body": "still here"}));
    loop {
        match alice.next().await {
            Message::Ping(_) => {}
            Message::Text(text) => {
                let ack: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(
                    (ack["type"].as_str(), ack["id"].as_str()),
                    (Some("ack"), Some("m1"))
                );
                break;
            }
            other => panic!("expected the ack, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_read_is_appended_and_comes_back_to_the_readers_connections_only() {
    let node = Node::new();
    let mut alice = Client::connect(&node, "alice").await;
    let mut other_tab = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    for c in [&mut alice, &mut other_tab, &mut bob] {
        c.join(ROOM, None).await;
    }
    bob.send(json!({"type": "send", "room": ROOM, "id": "b1", "body": "hi"}));
    let message = alice.recv().await;
    assert_eq!(other_tab.recv().await, message);
    // A member may get its own message before its ack.
    let mut types: Vec<Value> = bob
        .recv_n(2)
        .await
        .iter()
        .map(|f| f["type"].clone())
        .collect();
    types.sort_by_key(|t| t.to_string());
    assert_eq!(types, ["ack", "message"]);
    let offset = message["offset"].as_i64().unwrap();

    alice.send(json!({"type": "read", "room": ROOM, "offset": offset}));
    let read = json!({"type": "read", "room": ROOM, "user": "alice", "offset": offset});
    assert_eq!(alice.recv().await, read);
    assert_eq!(
        other_tab.recv().await,
        read,
        "alice's other tab learns it too"
    );
    let record = node.record(ROOM, offset as u64 + 1).await;
    assert_eq!(
        schemas::decode(&record.value).unwrap(),
        schemas::ChatEvent::ReadPositionMoved(schemas::ReadPositionMoved {
            room: ROOM.into(),
            user: "alice".into(),
            offset,
            ts: record.ts,
        })
    );
    // A public room keeps it from bob: his next frames are about his own
    // next message, which the log holds after alice's read.
    bob.send(json!({"type": "send", "room": ROOM, "id": "b2", "body": "again"}));
    for frame in bob.recv_n(2).await {
        assert_eq!(frame["id"], "b2", "{frame}");
    }
}

#[tokio::test]
async fn a_refused_read_appends_nothing() {
    const DM: &str = "dm:alice:bob";
    let node = Node::new();
    let mut carol = Client::connect(&node, "carol").await;
    carol.send(json!({"type": "read", "room": DM, "offset": 0}));
    assert_eq!(carol.expect_error("forbidden").await["room"], DM);
    for bad in [json!(-1), json!("3"), json!(1.5), json!(null)] {
        carol.send(json!({"type": "read", "room": ROOM, "offset": bad}));
        carol.expect_error("bad_frame").await;
    }
    carol.send(json!({"type": "read", "room": "no room!", "offset": 0}));
    carol.expect_error("bad_room").await;
    assert_eq!(node.end(DM).await, 0);
    assert_eq!(node.end(ROOM).await, 0);

    let off = Node::with(
        GatewayConfig {
            read_positions: false,
            limits: crate::limits::Limits::unlimited(),
            ..GatewayConfig::default()
        },
        true,
    );
    let mut alice = Client::connect(&off, "alice").await;
    alice.send(json!({"type": "read", "room": ROOM, "offset": 0}));
    let refused = alice.expect_error("unavailable").await;
    assert_eq!(refused["room"], ROOM, "{refused}");
    assert_eq!(off.end(ROOM).await, 0, "turned off: nothing appended");
}

/// A message of alice's at offset 7 of `ROOM`, in the node's history only
/// (as if appended through another node and projected).
async fn stored_message(node: &Node) {
    let stored = MessageView {
        room: ROOM.to_owned(),
        offset: 7,
        id: "elsewhere".to_owned(),
        user: "alice".to_owned(),
        body: "hi".to_owned(),
        ts: 1_234,
        ..MessageView::default()
    };
    node.store
        .apply(node.partition(ROOM), vec![stored], 8)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_change_is_checked_against_the_history_before_it_is_appended() {
    let node = Node::new();
    stored_message(&node).await;
    let mut bob = Client::connect(&node, "bob").await;
    let change = |kind: &str, id: &str, target: i64| json!({"type": kind, "room": ROOM, "id": id, "target": target, "body": "b", "emoji": "👍"});
    // Not bob's message: he may neither edit nor delete it.
    for (kind, id) in [("edit", "e1"), ("delete", "d1")] {
        bob.send(change(kind, id, 7));
        assert_eq!(bob.expect_error("forbidden").await["id"], id);
    }
    let mut alice = Client::connect(&node, "alice").await;
    // No message there: the history covers offset 5, or the log ends
    // before 100.
    for target in [5, 100] {
        alice.send(change("edit", "e2", target));
        assert_eq!(alice.expect_error("not_found").await["id"], "e2");
    }
    assert_eq!(node.end(ROOM).await, 0, "nothing refused was appended");
    // Her own: acked like a send, and a retry gets the same ack.
    alice.send(change("edit", "e3", 7));
    let ack = alice.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    alice.send(change("edit", "e3", 7));
    assert_eq!(alice.recv().await, ack);
    // Anyone may react.
    bob.send(change("react", "x1", 7));
    assert_eq!(bob.recv().await["type"], "ack");
    assert_eq!(node.end(ROOM).await, 2, "the edit once, the reaction");
    let record = node.record(ROOM, 0).await;
    assert!(matches!(
        schemas::decode(&record.value).unwrap(),
        schemas::ChatEvent::MessageChanged(schemas::MessageChanged {
            target: 7,
            change: schemas::Change::Edit { .. },
            ..
        })
    ));
}

#[tokio::test]
async fn a_deleted_message_and_a_full_set_of_reactions_are_refused() {
    use schemas::protocol::MAX_REACTIONS_PER_MESSAGE;
    let node = Node::new();
    stored_message(&node).await;
    let partition = node.partition(ROOM);
    let reactions: Vec<history::ChangeMark> = (0..MAX_REACTIONS_PER_MESSAGE)
        .map(|i| history::ChangeMark {
            room: ROOM.to_owned(),
            offset: 8 + i as u64,
            id: format!("x{i}"),
            user: "bob".to_owned(),
            target: 7,
            change: schemas::Change::React {
                emoji: format!("e{i}"),
            },
            ts: 1_235,
        })
        .collect();
    let next = 8 + MAX_REACTIONS_PER_MESSAGE as u64;
    let batch = history::Batch {
        changes: reactions,
        ..history::Batch::default()
    };
    node.store
        .apply_batch(partition, batch, next)
        .await
        .unwrap();
    let mut carol = Client::connect(&node, "carol").await;
    let react = |id: &str, emoji: &str| json!({"type": "react", "room": ROOM, "id": id, "target": 7, "emoji": emoji});
    carol.send(react("new", "🆕"));
    carol.expect_error("limit_reached").await;
    // One of the 32 already there is still fine.
    carol.send(react("old", "e3"));
    assert_eq!(carol.recv().await["type"], "ack");
    // Once deleted, the message takes no change at all.
    let delete = history::ChangeMark {
        room: ROOM.to_owned(),
        offset: next,
        id: "gone".to_owned(),
        user: "alice".to_owned(),
        target: 7,
        change: schemas::Change::Delete,
        ts: 1_236,
    };
    let batch = history::Batch {
        changes: vec![delete],
        ..history::Batch::default()
    };
    node.store
        .apply_batch(partition, batch, next + 1)
        .await
        .unwrap();
    carol.send(react("late", "e3"));
    carol.expect_error("not_found").await;
    assert_eq!(node.end(ROOM).await, 1, "only the accepted reaction");
}

#[tokio::test]
async fn changes_turned_off_append_nothing() {
    let off = Node::with(
        GatewayConfig {
            message_changes: false,
            limits: crate::limits::Limits::unlimited(),
            ..GatewayConfig::default()
        },
        true,
    );
    stored_message(&off).await;
    let mut alice = Client::connect(&off, "alice").await;
    alice.send(json!({"type": "delete", "room": ROOM, "id": "d", "target": 7}));
    assert_eq!(alice.expect_error("unavailable").await["id"], "d");
    assert_eq!(off.end(ROOM).await, 0);
}
