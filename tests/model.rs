//! A model-based protocol test: proptest generates sequences of client
//! actions (connect to either of two gateways, join with and without
//! `since`, leave, send, retry over the WebSocket or HTTP, malformed
//! frames, disconnect, reconnect elsewhere), runs each against real
//! `chat serve` processes on one real broker over real sockets, and checks
//! every observation against what docs/protocol.md promises:
//!
//! - every send is answered, once, by an `ack` or an `error` naming its id;
//!   every retry of an id gets the first ack's offset (idempotence), over
//!   either transport and either node;
//! - a malformed frame gets its error and the connection stays open; a
//!   `leave` of a room not joined gets `not_joined`;
//! - a `join` is answered `joined`, `recovered:true` without `since` and
//!   for a `since` of this epoch up to the head, `recovered:false` for one
//!   past the head or of another epoch;
//! - a member gets the room's messages in offset order, each once, only
//!   ones that were acked at that offset, and, by the end, every acked one
//!   after its join position (its `since` when recovered, else the head);
//! - every node's history holds exactly the acked messages, each once, at
//!   its offset.
//!
//! `MODEL_CASES` sets the number of cases (default 32 in CI; the long run
//! in README uses thousands). A failing case is shrunk and its seed kept
//! in `tests/model.proptest-regressions`, which later runs replay first.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use common::{Client, Server, WAIT};
use eventlog::kafka::testing::Broker;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// What the cases did, over the run: acked sends, resumes honoured,
/// deliveries checked.
static ACKS: AtomicUsize = AtomicUsize::new(0);
static RESUMES: AtomicUsize = AtomicUsize::new(0);
static DELIVERIES: AtomicUsize = AtomicUsize::new(0);

const CLIENTS: usize = 2;
const ROOMS: usize = 2;
const NODES: usize = 2;

#[derive(Debug, Clone, Copy)]
enum Since {
    /// No `since`: live from the head.
    Absent,
    /// The last offset this client saw of the room.
    Last,
    /// `-1`: everything from the partition's start.
    Start,
    /// Far past the head: `recovered:false`.
    Future,
    /// Another epoch: `recovered:false`.
    OtherEpoch,
}

#[derive(Debug, Clone, Copy)]
enum Bad {
    NotJson,
    UnknownType,
    SendWithoutId,
    InvalidRoom,
}

#[derive(Debug, Clone)]
enum Action {
    Connect {
        client: usize,
        node: usize,
    },
    Disconnect {
        client: usize,
    },
    Join {
        client: usize,
        room: usize,
        since: Since,
    },
    Leave {
        client: usize,
        room: usize,
    },
    Send {
        client: usize,
        room: usize,
    },
    /// Sends again the `which`-th id (modulo) this client sent, over HTTP
    /// to `node` or over its WebSocket.
    Retry {
        client: usize,
        which: usize,
        http: Option<usize>,
    },
    Post {
        client: usize,
        room: usize,
        node: usize,
    },
    Malformed {
        client: usize,
        bad: Bad,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let c = 0..CLIENTS;
    let r = 0..ROOMS;
    let n = 0..NODES;
    let since = prop_oneof![
        Just(Since::Absent),
        Just(Since::Last),
        Just(Since::Start),
        Just(Since::Future),
        Just(Since::OtherEpoch),
    ];
    let bad = prop_oneof![
        Just(Bad::NotJson),
        Just(Bad::UnknownType),
        Just(Bad::SendWithoutId),
        Just(Bad::InvalidRoom),
    ];
    prop_oneof![
        2 => (c.clone(), n.clone()).prop_map(|(client, node)| Action::Connect { client, node }),
        1 => c.clone().prop_map(|client| Action::Disconnect { client }),
        3 => (c.clone(), r.clone(), since)
            .prop_map(|(client, room, since)| Action::Join { client, room, since }),
        1 => (c.clone(), r.clone()).prop_map(|(client, room)| Action::Leave { client, room }),
        5 => (c.clone(), r.clone()).prop_map(|(client, room)| Action::Send { client, room }),
        2 => (c.clone(), any::<usize>(), proptest::option::of(n.clone()))
            .prop_map(|(client, which, http)| Action::Retry { client, which, http }),
        1 => (c.clone(), r, n).prop_map(|(client, room, node)| Action::Post { client, room, node }),
        1 => (c, bad).prop_map(|(client, bad)| Action::Malformed { client, bad }),
    ]
}

/// A room membership of one connection: from which offset on it is owed
/// every message, and what it got.
struct Membership {
    owed_after: i64,
    got: Vec<(i64, String)>,
}

struct Conn {
    client: Client,
    node: usize,
    rooms: HashMap<String, Membership>,
    /// Rooms this connection ever joined (a message of another room is a
    /// violation).
    ever: HashSet<String>,
}

/// What the case has seen so far.
struct Case {
    rooms: Vec<String>,
    users: Vec<String>,
    conns: Vec<Option<Conn>>,
    /// Ended memberships, checked at the end like the live ones.
    ended: Vec<(String, Membership)>,
    /// Acked messages: (room, id) -> the offset each node acked it at. A
    /// node always answers an id with the same offset; a retry through
    /// another node before the first copy reached its history may be
    /// appended again (documented), and then the copy of the lowest offset
    /// is the message: the one delivered and stored.
    acked: HashMap<(String, String), BTreeMap<usize, i64>>,
    /// Ids each client sent, with their room, in order.
    sent: Vec<Vec<(String, String)>>,
    /// The last offset each client saw of each room.
    last: Vec<HashMap<String, i64>>,
    epoch: Option<String>,
}

type Check = Result<(), String>;

fn fail(what: String) -> Check {
    Err(what)
}

impl Case {
    /// Routes a frame that is not the one being waited for: a message goes
    /// to its membership.
    fn observe(&mut self, client: usize, f: &Value) -> Check {
        if f["type"] == "close" {
            return fail(format!("client {client}: unexpected close {f}"));
        }
        if f["type"] != "message" {
            return Ok(());
        }
        let room = f["room"].as_str().unwrap_or_default().to_owned();
        let offset = f["offset"].as_i64().unwrap_or(-1);
        let id = f["id"].as_str().unwrap_or_default().to_owned();
        let conn = self.conns[client]
            .as_mut()
            .expect("frames come on a connection");
        if !conn.ever.contains(&room) {
            return fail(format!(
                "client {client}: a message of {room}, never joined: {f}"
            ));
        }
        let last = self.last[client].entry(room.clone()).or_insert(-1);
        *last = (*last).max(offset);
        if let Some(m) = conn.rooms.get_mut(&room) {
            m.got.push((offset, id));
        }
        Ok(())
    }

    /// Reads frames until `want` matches one (returned), observing the
    /// others.
    async fn answer(
        &mut self,
        client: usize,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        loop {
            let conn = self.conns[client].as_mut().expect("connected");
            let Some(f) = conn.client.try_recv(WAIT).await else {
                return Err(format!("client {client}: no answer within {WAIT:?}"));
            };
            if want(&f) {
                return Ok(f);
            }
            self.observe(client, &f)?;
        }
    }

    async fn send(&mut self, client: usize, room: &str, id: &str) -> Check {
        let conn = self.conns[client].as_mut().expect("connected");
        let node = conn.node;
        conn.client.send_message(room, id, &body(id)).await;
        let a = self
            .answer(client, |f| {
                f["id"] == id && (f["type"] == "ack" || f["type"] == "error")
            })
            .await?;
        self.acked_as(node, room, id, &a)
    }

    /// Checks `node`'s answer to a send of `id`: an ack, at the offset
    /// this node acked it at before, if it did.
    fn acked_as(&mut self, node: usize, room: &str, id: &str, a: &Value) -> Check {
        if a["type"] != "ack" || a["room"] != room {
            return fail(format!("send {id} to {room}: {a}"));
        }
        let offset = a["offset"].as_i64().unwrap_or(-1);
        let first = *self
            .acked
            .entry((room.to_owned(), id.to_owned()))
            .or_default()
            .entry(node)
            .or_insert(offset);
        if first != offset {
            return fail(format!(
                "node {node} acked {id} at {first}, then at {offset}"
            ));
        }
        ACKS.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The offset of each acked message: its lowest copy.
    fn messages(&self) -> HashMap<(String, String), i64> {
        self.acked
            .iter()
            .map(|(k, by_node)| (k.clone(), *by_node.values().min().expect("acked once")))
            .collect()
    }

    async fn post(
        &mut self,
        servers: &[Server],
        node: usize,
        user: &str,
        room: &str,
        id: &str,
    ) -> Check {
        let a: Value = reqwest::Client::new()
            .post(servers[node].url(&format!("/rooms/{room}/messages?user={user}")))
            .json(&json!({"id": id, "body": body(id)}))
            .timeout(WAIT)
            .send()
            .await
            .map_err(|e| format!("POST {id}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("POST {id}: {e}"))?;
        self.acked_as(node, room, id, &a)
    }

    async fn step(&mut self, servers: &[Server], action: &Action) -> Check {
        match *action {
            Action::Connect { client, node } => {
                if let Some(conn) = self.conns[client].take() {
                    self.end(conn);
                }
                let c = servers[node].connect(&self.users[client]).await;
                self.conns[client] = Some(Conn {
                    client: c,
                    node,
                    rooms: HashMap::new(),
                    ever: HashSet::new(),
                });
            }
            Action::Disconnect { client } => {
                if let Some(conn) = self.conns[client].take() {
                    self.end(conn);
                }
            }
            Action::Join {
                client,
                room,
                since,
            } => {
                let Some(conn) = self.conns[client].as_mut() else {
                    return Ok(());
                };
                let room = self.rooms[room].clone();
                let mut frame = json!({"type": "join", "room": room});
                let last = self.last[client].get(&room).copied();
                let epoch = self.epoch.clone().unwrap_or_else(|| "unknown".into());
                let (sent_since, honoured) = match (since, last) {
                    (Since::Absent, _) | (Since::Last, None) => (None, true),
                    (Since::Last, Some(o)) => (Some((o, epoch)), true),
                    (Since::Start, _) => (Some((-1, epoch)), true),
                    (Since::Future, _) => (Some((1 << 40, epoch)), false),
                    (Since::OtherEpoch, _) => (Some((0, "another-epoch".to_owned())), false),
                };
                // Without a known epoch, a since cannot be of this epoch.
                let honoured = honoured && (sent_since.is_none() || self.epoch.is_some());
                if let Some((offset, epoch)) = &sent_since {
                    frame["since"] = json!({"offset": offset, "epoch": epoch});
                }
                // A join of a joined room starts a new membership.
                if let Some(m) = conn.rooms.remove(&room) {
                    self.ended.push((room.clone(), m));
                }
                let conn = self.conns[client].as_mut().expect("connected");
                conn.client.send_json(frame.clone()).await;
                let j = self
                    .answer(client, |f| {
                        f["room"] == room.as_str()
                            && (f["type"] == "joined" || f["type"] == "error")
                    })
                    .await?;
                if j["type"] != "joined" {
                    return fail(format!("{frame}: {j}"));
                }
                let head = j["position"]["offset"].as_i64().unwrap_or(i64::MIN);
                let epoch = j["position"]["epoch"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if self.epoch.get_or_insert(epoch.clone()) != &epoch {
                    return fail(format!("the epoch changed: {j}"));
                }
                if j["recovered"] != honoured {
                    return fail(format!("{frame}: recovered should be {honoured}: {j}"));
                }
                if sent_since.is_some() && honoured {
                    RESUMES.fetch_add(1, Relaxed);
                }
                let owed_after = match (&sent_since, honoured) {
                    (Some((offset, _)), true) => *offset,
                    _ => head,
                };
                let conn = self.conns[client].as_mut().expect("connected");
                conn.ever.insert(room.clone());
                conn.rooms.insert(
                    room.clone(),
                    Membership {
                        owed_after,
                        got: Vec::new(),
                    },
                );
                // What the client has: up to its since, or up to the head
                // when it joined live.
                let last = self.last[client].entry(room).or_insert(owed_after);
                *last = (*last).max(owed_after);
            }
            Action::Leave { client, room } => {
                let Some(conn) = self.conns[client].as_mut() else {
                    return Ok(());
                };
                let room = self.rooms[room].clone();
                conn.client
                    .send_json(json!({"type": "leave", "room": room}))
                    .await;
                match conn.rooms.remove(&room) {
                    Some(m) => self.ended.push((room, m)),
                    None => {
                        let e = self
                            .answer(client, |f| {
                                f["type"] == "error" && f["room"] == room.as_str()
                            })
                            .await?;
                        if e["code"] != "not_joined" {
                            return fail(format!("leave of {room}, not joined: {e}"));
                        }
                    }
                }
            }
            Action::Send { client, room } => {
                if self.conns[client].is_none() {
                    return Ok(());
                }
                let room = self.rooms[room].clone();
                let id = common::id();
                self.sent[client].push((room.clone(), id.clone()));
                self.send(client, &room, &id).await?;
            }
            Action::Retry {
                client,
                which,
                http,
            } => {
                let Some((room, id)) = self.sent[client]
                    .get(which % self.sent[client].len().max(1))
                    .cloned()
                else {
                    return Ok(());
                };
                match http {
                    Some(node) => {
                        let user = self.users[client].clone();
                        self.post(servers, node, &user, &room, &id).await?;
                    }
                    None if self.conns[client].is_some() => self.send(client, &room, &id).await?,
                    None => {}
                }
            }
            Action::Post { client, room, node } => {
                let room = self.rooms[room].clone();
                let id = common::id();
                self.sent[client].push((room.clone(), id.clone()));
                let user = self.users[client].clone();
                self.post(servers, node, &user, &room, &id).await?;
            }
            Action::Malformed { client, bad } => {
                let Some(conn) = self.conns[client].as_mut() else {
                    return Ok(());
                };
                let (text, code) = match bad {
                    Bad::NotJson => ("{not json".to_owned(), "bad_frame"),
                    Bad::UnknownType => (json!({"type": "shout"}).to_string(), "bad_frame"),
                    Bad::SendWithoutId => (
                        json!({"type": "send", "room": self.rooms[0], "body": "x"}).to_string(),
                        "bad_frame",
                    ),
                    Bad::InvalidRoom => (
                        json!({"type": "send", "room": "no room!", "id": common::id(), "body": "x"})
                            .to_string(),
                        "bad_room",
                    ),
                };
                conn.client.send_text(&text).await;
                let e = self.answer(client, |f| f["type"] == "error").await?;
                if e["code"] != code {
                    return fail(format!("{text}: {e}"));
                }
            }
        }
        Ok(())
    }

    fn end(&mut self, conn: Conn) {
        for (room, m) in conn.rooms {
            self.ended.push((room, m));
        }
        drop(conn.client);
    }

    /// After the last action: every live member gets what it is owed, then
    /// every membership and every node's history are checked.
    async fn finish(mut self, servers: &[Server]) -> Check {
        let messages = self.messages();
        let mut by_room: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
        for ((room, id), offset) in &messages {
            by_room
                .entry(room.clone())
                .or_default()
                .push((*offset, id.clone()));
        }
        for rows in by_room.values_mut() {
            rows.sort();
        }
        // Live members: wait until each has every acked message it is owed.
        for client in 0..CLIENTS {
            while let Some(conn) = self.conns[client].as_ref() {
                let missing = conn.rooms.iter().any(|(room, m)| {
                    by_room
                        .get(room)
                        .into_iter()
                        .flatten()
                        .any(|(o, id)| *o > m.owed_after && !m.got.iter().any(|(_, g)| g == id))
                });
                if !missing {
                    break;
                }
                let conn = self.conns[client].as_mut().expect("connected");
                let Some(f) = conn.client.try_recv(WAIT).await else {
                    return fail(format!("client {client}: owed messages never came"));
                };
                self.observe(client, &f)?;
            }
        }
        let mut all: Vec<(String, Membership)> = std::mem::take(&mut self.ended);
        for conn in self.conns.iter_mut().filter_map(Option::take) {
            all.extend(conn.rooms);
        }
        for (room, m) in &all {
            DELIVERIES.fetch_add(m.got.len(), Relaxed);
            let mut ids = HashSet::new();
            for w in m.got.windows(2) {
                if w[0].0 >= w[1].0 {
                    return fail(format!("{room}: {} delivered after {}", w[1].0, w[0].0));
                }
            }
            for (offset, id) in &m.got {
                if !ids.insert(id) {
                    return fail(format!("{room}: {id} delivered twice"));
                }
                match messages.get(&(room.clone(), id.clone())) {
                    Some(o) if o == offset => {}
                    other => {
                        return fail(format!(
                            "{room}: {id} delivered at {offset}, acked at {other:?}"
                        ))
                    }
                }
            }
        }
        for server in servers {
            for room in &self.rooms {
                let want = by_room.get(room).cloned().unwrap_or_default();
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    let got: Vec<(i64, String)> = server
                        .history(room, 1000)
                        .await
                        .iter()
                        .map(|m| {
                            (
                                m["offset"].as_i64().unwrap_or(-1),
                                m["id"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    if got == want {
                        break;
                    }
                    if got.len() > want.len() || tokio::time::Instant::now() > deadline {
                        return fail(format!(
                            "{}: history of {room} is {got:?}, acked {want:?}",
                            server.addr
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }
}

fn body(id: &str) -> String {
    format!("body of {id}")
}

async fn run_case(servers: &[Server], actions: &[Action]) -> Check {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut case = Case {
        rooms: (0..ROOMS).map(|r| format!("m{}-{r}", &tag[..12])).collect(),
        users: (0..CLIENTS).map(|c| format!("u{c}")).collect(),
        conns: (0..CLIENTS).map(|_| None).collect(),
        ended: Vec::new(),
        acked: HashMap::new(),
        sent: vec![Vec::new(); CLIENTS],
        last: vec![HashMap::new(); CLIENTS],
        epoch: None,
    };
    // Every case starts with each client on its own node, a member of every
    // room, so that sends are delivered from the first action on.
    let mut prologue = Vec::new();
    for client in 0..CLIENTS {
        prologue.push(Action::Connect {
            client,
            node: client % NODES,
        });
        for room in 0..ROOMS {
            prologue.push(Action::Join {
                client,
                room,
                since: Since::Absent,
            });
        }
    }
    for (i, action) in prologue.iter().chain(actions).enumerate() {
        case.step(servers, action)
            .await
            .map_err(|e| format!("step {i} ({action:?}): {e}"))?;
    }
    case.finish(servers).await
}

#[test]
fn generated_client_sessions_keep_every_promise_of_the_protocol() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Broker::start(None);
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Server> = rt.block_on(async {
        let mut servers = Vec::new();
        for (n, dir) in dirs.iter().enumerate() {
            let node = format!("gw-{n}");
            servers.push(
                Server::start_with(dir.path(), 4, &["--log", &broker.url(), "--node", &node]).await,
            );
        }
        servers
    });
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/model.proptest-regressions",
        ))),
        ..Config::default()
    });
    let sessions = proptest::collection::vec(action(), 1..40);
    let result = runner.run(&sessions, |actions| {
        rt.block_on(run_case(&servers, &actions))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!(
        "{cases} generated cases passed: {} acks, {} resumes honoured, {} deliveries checked",
        ACKS.load(Relaxed),
        RESUMES.load(Relaxed),
        DELIVERIES.load(Relaxed)
    );
}
