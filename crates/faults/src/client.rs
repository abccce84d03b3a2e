//! One workload client: sends messages with unique ids at a steady rate to
//! its rooms, records every ack and every message it receives, and when its
//! connection breaks reconnects to any gateway, rejoins its rooms with
//! `since` (the last offset it saw) and resends what was not acked, with the
//! same ids.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
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
}

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
}

struct State {
    rec: Record,
    epoch: Option<String>,
    /// Sent, not yet acked: id -> (room, body).
    pending: BTreeMap<String, (String, String)>,
    seq: u64,
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
    };
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
            &config,
            &mut st,
            interval,
            &stop_sending,
            &finish,
            drain_deadline,
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

/// One connection, until it breaks or the client is done.
async fn session(
    ws: Ws,
    config: &Config,
    st: &mut State,
    interval: Duration,
    stop_sending: &CancellationToken,
    finish: &CancellationToken,
    drain_deadline: Option<tokio::time::Instant>,
) {
    let (mut sink, mut stream) = ws.split();
    let mut outbox: VecDeque<Value> = VecDeque::new();
    // Join every room, from where we left off.
    for room in &config.rooms {
        let mut frame = json!({"type": "join", "room": room});
        if let (Some(offset), Some(epoch)) = (st.last_offset(room), &st.epoch) {
            frame["since"] = json!({"offset": offset, "epoch": epoch});
        }
        outbox.push_back(frame);
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
                        outbox.pop_front();
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
                outbox.push_back(json!({"type": "send", "room": room, "id": id, "body": body}));
            }
            _ = finish.cancelled(), if !finish.is_cancelled() => {}
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
                        // A refused send (e.g. `unavailable`) is retried with its id.
                        let retry = (frame["type"] == "error")
                            .then(|| frame["id"].as_str().map(str::to_owned))
                            .flatten()
                            .and_then(|id| st.pending.get(&id).map(|(r, b)| (id, r.clone(), b.clone())));
                        handle(frame, st, &config.progress);
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
            *st.rec.errors.entry(s("code")).or_default() += 1;
        }
        _ => {}
    }
}
