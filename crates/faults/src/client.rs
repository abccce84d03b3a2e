//! One workload client: sends messages with unique ids at a steady rate to
//! its rooms, records every ack and every message it receives, and when its
//! connection breaks reconnects to any gateway, rejoins its rooms with
//! `since` (the last offset it saw) and resends what was not acked, with the
//! same ids. Every `post_every`-th message goes as an HTTP POST that the
//! client abandons after a few milliseconds and then retries on its
//! WebSocket. A send left unanswered on a live connection for
//! [`REQUEST_BOUND`] is recorded as a request that never ended.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use rand::seq::IndexedRandom;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What one client observed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Record {
    pub user: String,
    pub rooms: Vec<String>,
    /// Every id sent, with its room.
    pub sent: Vec<(String, String)>,
    /// Ack offsets by id (a retry may be acked again).
    pub acks: HashMap<String, Vec<i64>>,
    /// Per room: the offset the client first joined at (messages after it
    /// are owed to the client).
    pub start: BTreeMap<String, i64>,
    /// Per room: the messages received, in arrival order, as (offset, id).
    pub received: BTreeMap<String, Vec<(i64, String)>>,
    pub reconnects: u64,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Sends never acked by the end.
    pub unacked: Vec<String>,
    /// Joins with `since`, and what they were answered.
    pub resumes: Vec<Resume>,
    /// Sends written on a connection that stayed open but was not answered
    /// (neither `ack` nor `error`) within [`REQUEST_BOUND`].
    pub never_ended: Vec<String>,
    /// POSTs given up on before their answer (then retried on the
    /// WebSocket with the same id).
    pub abandoned_posts: u64,
}

/// A join with `since`: the client is owed every message of `room` after
/// `since`, and `recovered:true` says it will get them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resume {
    pub room: String,
    pub since: i64,
    /// The `joined` frame's position: the head when the join took effect.
    pub head: i64,
    pub recovered: bool,
}

/// How long a send may stay unanswered on a connection that stays open
/// before it counts as a request that never ended: far above the gateways'
/// send timeout and the longest stall the harness injects.
pub const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// Counters the harness watches while clients run.
#[derive(Debug, Default)]
pub struct Progress {
    /// Sends not acked yet, over every client.
    pub pending: std::sync::atomic::AtomicI64,
    /// Distinct ids acked, over every client.
    pub acked: std::sync::atomic::AtomicU64,
}

pub struct Config {
    pub progress: std::sync::Arc<Progress>,
    pub user: String,
    pub rooms: Vec<String>,
    pub gateways: Vec<String>,
    /// Messages per second this client sends while sending.
    pub rate: f64,
    /// Every this many sends goes as an abandoned POST; 0: none.
    pub post_every: u64,
}

struct State {
    rec: Record,
    epoch: Option<String>,
    /// Sent, not yet acked: id -> (room, body).
    pending: BTreeMap<String, (String, String)>,
    seq: u64,
    /// The `since` of each room's join in flight.
    joining: HashMap<String, i64>,
}

impl State {
    fn last_offset(&self, room: &str) -> Option<i64> {
        self.rec
            .received
            .get(room)
            .and_then(|v| v.last())
            .map(|(o, _)| *o)
            .or_else(|| self.rec.start.get(room).copied())
    }
}

/// Longest wait for the server to take a frame or a connection: a stalled
/// gateway counts as a broken connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs until `finish` is cancelled and nothing is left unacked (or
/// `finish` has been cancelled for `drain` already). Stops sending new
/// messages when `stop_sending` is cancelled.
pub async fn run(
    config: Config,
    stop_sending: CancellationToken,
    finish: CancellationToken,
    drain: Duration,
) -> Record {
    let mut st = State {
        rec: Record {
            user: config.user.clone(),
            rooms: config.rooms.clone(),
            ..Default::default()
        },
        epoch: None,
        pending: BTreeMap::new(),
        seq: 0,
        joining: HashMap::new(),
    };
    let http = reqwest::Client::new();
    let interval = Duration::from_secs_f64(1.0 / config.rate.max(0.001));
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        if finish.is_cancelled() {
            let deadline = *drain_deadline.get_or_insert(tokio::time::Instant::now() + drain);
            if st.pending.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
        }
        let addr = config
            .gateways
            .choose(&mut rand::rng())
            .expect("at least one gateway")
            .clone();
        let url = format!("ws://{addr}/ws?user={}", config.user);
        let ws = match tokio::time::timeout(IO_TIMEOUT, tokio_tungstenite::connect_async(url)).await
        {
            Ok(Ok((ws, _))) => ws,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        st.rec.reconnects += 1;
        session(
            ws,
            &addr,
            &http,
            &config,
            &mut st,
            interval,
            &stop_sending,
            &finish,
            (drain, drain_deadline),
        )
        .await;
    }
    st.rec.unacked = st.pending.keys().cloned().collect();
    st.rec.reconnects = st.rec.reconnects.saturating_sub(1);
    st.rec
}

/// Frames waiting to be written on one connection. Writing never stops
/// reading: a server that catches a join up pushes frames until its queue
/// for us is full, and stops reading ours meanwhile, so a client that wrote
/// its whole backlog before reading would wait on it forever (a long run
/// with thousands of unacked resends did exactly that).
const OUTBOX_MAX: usize = 100_000;

/// A POST in flight: (id, room, body, the ack if one came in time).
type Post = BoxFuture<'static, (String, String, String, Option<Value>)>;

/// POSTs `id` to `addr` and gives up after 1 to 50 ms.
fn abandoned_post(
    http: &reqwest::Client,
    addr: &str,
    user: &str,
    send: (String, String, String),
) -> Post {
    let (id, room, body) = send;
    let request = http
        .post(format!("http://{addr}/rooms/{room}/messages?user={user}"))
        .json(&json!({"id": id, "body": body}))
        .timeout(Duration::from_millis(rand::random_range(1..=50)));
    async move {
        let answer = match request.send().await {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        };
        let ack = answer.filter(|a| a["type"] == "ack");
        (id, room, body, ack)
    }
    .boxed()
}

/// One connection, until it breaks or the client is done.
#[allow(clippy::too_many_arguments)]
async fn session(
    ws: Ws,
    addr: &str,
    http: &reqwest::Client,
    config: &Config,
    st: &mut State,
    interval: Duration,
    stop_sending: &CancellationToken,
    finish: &CancellationToken,
    (drain, drain_deadline): (Duration, Option<tokio::time::Instant>),
) {
    let (mut sink, mut stream) = ws.split();
    let mut outbox: VecDeque<Value> = VecDeque::new();
    // Join every room, from where we left off.
    for room in &config.rooms {
        outbox.push_back(join_frame(st, room));
    }
    // Resend what was not acked, with the same ids.
    for (id, (room, body)) in &st.pending {
        outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let drain_check = tokio::time::sleep_until(
        drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
    );
    tokio::pin!(drain_check);
    // Written but not flushed yet.
    let mut unflushed = false;
    // When the oldest frame of the outbox started waiting for the socket:
    // a gateway that takes nothing for IO_TIMEOUT counts as stalled.
    let mut waiting_since: Option<tokio::time::Instant> = None;
    // Sends written on this connection and not answered yet.
    let mut outstanding: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut posts: FuturesUnordered<Post> = FuturesUnordered::new();
    // Rooms whose join was refused (`unavailable`), to join again shortly.
    let mut rejoins: FuturesUnordered<BoxFuture<'static, String>> = FuturesUnordered::new();
    let mut overdue = tokio::time::interval(Duration::from_secs(1));
    loop {
        if finish.is_cancelled() && st.pending.is_empty() && outbox.is_empty() {
            let _closing = tokio::time::timeout(IO_TIMEOUT, sink.close()).await;
            return;
        }
        if outbox.len() > OUTBOX_MAX {
            return; // the gateway takes nothing: reconnect
        }
        if !outbox.is_empty() {
            let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() > IO_TIMEOUT {
                return;
            }
        }
        tokio::select! {
            // `feed` either hands the frame to the sink or, cancelled, leaves
            // it in the outbox: nothing is lost or written twice. With the
            // outbox empty, what was fed is flushed.
            written = async {
                match outbox.front() {
                    Some(frame) => sink.feed(Message::text(frame.to_string())).await.map(|()| true),
                    None => sink.flush().await.map(|()| false),
                }
            }, if !outbox.is_empty() || unflushed => {
                match written {
                    Ok(true) => {
                        let frame = outbox.pop_front().expect("fed the front");
                        if frame["type"] == "send" {
                            let id = frame["id"].as_str().unwrap_or_default().to_owned();
                            outstanding.entry(id).or_insert_with(tokio::time::Instant::now);
                        }
                        waiting_since = None;
                        unflushed = true;
                    }
                    Ok(false) => unflushed = false,
                    Err(_) => return,
                }
            }
            _ = tick.tick(), if !stop_sending.is_cancelled() => {
                st.seq += 1;
                let room = config.rooms[(st.seq as usize) % config.rooms.len()].clone();
                let id = uuid::Uuid::new_v4().to_string();
                let body = format!("{} #{}", config.user, st.seq);
                st.rec.sent.push((id.clone(), room.clone()));
                st.pending.insert(id.clone(), (room.clone(), body.clone()));
                config.progress.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if config.post_every > 0 && st.seq.is_multiple_of(config.post_every) {
                    posts.push(abandoned_post(http, addr, &config.user, (id, room, body)));
                } else {
                    outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
                }
            }
            Some(room) = rejoins.next(), if !rejoins.is_empty() => {
                outbox.push_back(join_frame(st, &room));
            }
            Some((id, room, body, ack)) = posts.next(), if !posts.is_empty() => {
                match ack {
                    Some(ack) => handle(ack, st, &config.progress),
                    None => {
                        // Given up on: the same id again, on the WebSocket.
                        st.rec.abandoned_posts += 1;
                        if st.pending.contains_key(&id) {
                            outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
                        }
                    }
                }
            }
            _ = overdue.tick() => {
                let now = tokio::time::Instant::now();
                let mut late = Vec::new();
                outstanding.retain(|id, since| {
                    let overdue = now.duration_since(*since) > REQUEST_BOUND;
                    if overdue {
                        late.push(id.clone());
                    }
                    !overdue
                });
                for id in late {
                    tracing::warn!(user = config.user, id, "a send was never answered");
                    // Counted, then sent again, as a client would.
                    if let Some((room, body)) = st.pending.get(&id) {
                        outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
                    }
                    st.rec.never_ended.push(id);
                }
            }
            _ = finish.cancelled(), if !finish.is_cancelled() => {
                // The drain starts now for a session that began before it.
                if drain_deadline.is_none() {
                    drain_check.as_mut().reset(tokio::time::Instant::now() + drain);
                }
            }
            _ = &mut drain_check => return,
            msg = tokio::time::timeout(Duration::from_secs(2), stream.next()) => {
                let msg = match msg {
                    // Quiet for a while: check the finish condition again.
                    Err(_) => continue,
                    Ok(Some(Ok(m))) => m,
                    Ok(_) => return,
                };
                match msg {
                    Message::Text(text) => {
                        let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                        if frame["type"] == "ack" || frame["type"] == "error" {
                            if let Some(id) = frame["id"].as_str() {
                                outstanding.remove(id);
                            }
                        }
                        // A refused send (e.g. `unavailable`) is retried with its id.
                        let retry = (frame["type"] == "error")
                            .then(|| frame["id"].as_str().map(str::to_owned))
                            .flatten()
                            .and_then(|id| st.pending.get(&id).map(|(r, b)| (id, r.clone(), b.clone())));
                        // A refused join (a gateway cut from the log) is
                        // made again after a moment, from where we are.
                        let rejoin = (frame["type"] == "error" && frame["code"] == "unavailable")
                            .then(|| frame["room"].as_str().map(str::to_owned))
                            .flatten()
                            .filter(|room| frame["id"].is_null() && config.rooms.contains(room));
                        handle(frame, st, &config.progress);
                        if let Some(room) = rejoin {
                            rejoins.push(
                                async move {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    room
                                }
                                .boxed(),
                            );
                        }
                        if let Some((id, room, body)) = retry {
                            outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
                        }
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
        }
    }
}

/// A `join` of `room` with `since` the last offset the client has (none
/// before its first join), noted as the join in flight.
fn join_frame(st: &mut State, room: &str) -> Value {
    let mut frame = json!({"type": "join", "room": room});
    if let (Some(offset), Some(epoch)) = (st.last_offset(room), &st.epoch) {
        frame["since"] = json!({"offset": offset, "epoch": epoch});
        st.joining.insert(room.to_owned(), offset);
    } else {
        st.joining.remove(room);
    }
    frame
}

fn handle(frame: Value, st: &mut State, progress: &Progress) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = |k: &str| frame[k].as_str().unwrap_or_default().to_owned();
    match frame["type"].as_str().unwrap_or_default() {
        "joined" => {
            let room = s("room");
            let epoch = frame["position"]["epoch"].as_str().map(str::to_owned);
            if st.epoch.is_some() && st.epoch != epoch {
                // Another log incarnation: positions mean nothing any more.
                *st.rec.errors.entry("epoch_changed".into()).or_default() += 1;
            }
            st.epoch = epoch;
            let offset = frame["position"]["offset"].as_i64().unwrap_or(-1);
            if let Some(since) = st.joining.remove(&room) {
                st.rec.resumes.push(Resume {
                    room: room.clone(),
                    since,
                    head: offset,
                    recovered: frame["recovered"] == true,
                });
            }
            st.rec.start.entry(room).or_insert(offset);
            if frame["recovered"] == false {
                *st.rec.errors.entry("not_recovered".into()).or_default() += 1;
            }
        }
        "ack" => {
            let id = s("id");
            if st.pending.remove(&id).is_some() {
                progress.pending.fetch_sub(1, Relaxed);
                progress.acked.fetch_add(1, Relaxed);
            }
            st.rec
                .acks
                .entry(id)
                .or_default()
                .push(frame["offset"].as_i64().unwrap_or(-1));
        }
        "message" => {
            let room = s("room");
            let offset = frame["offset"].as_i64().unwrap_or(-1);
            st.rec
                .received
                .entry(room)
                .or_default()
                .push((offset, s("id")));
        }
        "error" => {
            let code = match s("code") {
                c if frame["pending"] == true => format!("{c} (pending)"),
                c => c,
            };
            *st.rec.errors.entry(code).or_default() += 1;
        }
        _ => {}
    }
}
