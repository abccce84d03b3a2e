//! The baseline: a bare WebSocket server that answers the client protocol
//! (docs/protocol.md) the way a gateway does, with no log behind it. What it
//! costs is the floor any gateway pays on this machine (HTTP upgrade,
//! WebSocket framing, JSON in and out, a per-connection writer), so load
//! figures of the real gateway are reported as ratios to it.
//!
//! It sends `welcome`; answers `join` with `joined`; answers each `send` with
//! an `ack` (fake offsets, one counter per room) and a `message` to every
//! member of the room, the sender included when it joined, serialized once;
//! `leave` and `typing` as the gateway does. Nothing is stored. Each
//! connection's outbound queue is bounded; a full one closes it as a slow
//! consumer (4008), as the gateway does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use schemas::protocol::{
    parse_client_frame, valid_user, ClientFrame, ErrorCode, FrameError, MessageView, Position,
    ServerFrame, PROTOCOL_VERSION,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of the bare server.
#[derive(Debug, Clone)]
pub struct BareConfig {
    /// Frames queued per client before it is closed as a slow consumer.
    pub client_queue: usize,
    /// WebSocket read buffer per connection (as the gateway sets it).
    pub read_buffer: usize,
    /// How long shutdown waits for connections to close.
    pub drain_timeout: Duration,
}

impl Default for BareConfig {
    fn default() -> Self {
        BareConfig {
            client_queue: 4096,
            read_buffer: 4 * 1024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

const EPOCH: &str = "bare";
const CLOSE_SLOW_CONSUMER: u16 = schemas::protocol::CloseCode::SlowConsumer.code();
const CLOSE_UNAUTHORIZED: u16 = schemas::protocol::CloseCode::Unauthorized.code();
const CLOSE_GOING_AWAY: u16 = schemas::protocol::CloseCode::GoingAway.code();

struct Member {
    id: u64,
    tx: mpsc::Sender<Utf8Bytes>,
    kick: CancellationToken,
}

impl Member {
    /// Queues a frame; a full queue kicks the member.
    fn offer(&self, frame: Utf8Bytes) {
        if self.tx.try_send(frame).is_err() {
            self.kick.cancel();
        }
    }
}

#[derive(Default)]
struct Room {
    members: Vec<Arc<Member>>,
    next_offset: i64,
}

struct AppState {
    config: BareConfig,
    rooms: Mutex<HashMap<String, Room>>,
    next_member: AtomicU64,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

/// Serves the bare baseline on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    config: BareConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let drain = config.drain_timeout;
    let state = Arc::new(AppState {
        config,
        rooms: Mutex::new(HashMap::new()),
        next_member: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
    });
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state.clone());
    // Small frames go out at once: without TCP_NODELAY an ack written
    // right after another frame waits for the client's delayed ACK (40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    state.connections.close();
    if tokio::time::timeout(drain, state.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not close in time");
    }
    Ok(())
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let user = query.get("user").filter(|u| valid_user(u)).cloned();
    ws.read_buffer_size(state.config.read_buffer)
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| {
            let tracker = state.connections.clone();
            tracker.track_future(connection(socket, state, user))
        })
}

fn frame(f: ServerFrame<'_>) -> Utf8Bytes {
    Utf8Bytes::from(f.to_json())
}

/// Writes queued frames, flushing when the queue is empty; sends the close
/// frame when `close` fires.
async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    close: CancellationToken,
    close_code: Arc<AtomicU64>,
) {
    loop {
        tokio::select! {
            biased;
            _ = close.cancelled() => {
                let code = close_code.load(Ordering::Relaxed) as u16;
                let reason = match code {
                    CLOSE_SLOW_CONSUMER => "slow consumer",
                    CLOSE_UNAUTHORIZED => "unauthorized",
                    _ => "server going away",
                };
                let _closing = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    })))
                    .await;
                break;
            }
            next = rx.recv() => match next {
                Some(f) => {
                    if sink.feed(Message::Text(f)).await.is_err() {
                        break;
                    }
                    while let Ok(f) = rx.try_recv() {
                        if sink.feed(Message::Text(f)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _closed = sink.close().await;
}

async fn connection(socket: WebSocket, state: Arc<AppState>, user: Option<String>) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(state.config.client_queue);
    let close = CancellationToken::new();
    let close_code = Arc::new(AtomicU64::new(CLOSE_GOING_AWAY as u64));
    let writer = tokio::spawn(writer(sink, rx, close.clone(), close_code.clone()));
    let Some(user) = user else {
        let e = FrameError::new(ErrorCode::Unauthorized, "connect with ?user=<name>", None);
        let _queued = tx.try_send(frame(e.to_frame()));
        // Let the error go out before the close.
        tokio::task::yield_now().await;
        close_code.store(CLOSE_UNAUTHORIZED as u64, Ordering::Relaxed);
        close.cancel();
        let _done = writer.await;
        return;
    };
    let member = Arc::new(Member {
        id: state.next_member.fetch_add(1, Ordering::Relaxed),
        tx,
        kick: CancellationToken::new(),
    });
    member.offer(frame(ServerFrame::Welcome {
        user: &user,
        node: "bare",
        v: PROTOCOL_VERSION,
    }));
    let mut joined: Vec<String> = Vec::new();
    loop {
        let msg = tokio::select! {
            _ = member.kick.cancelled() => {
                close_code.store(CLOSE_SLOW_CONSUMER as u64, Ordering::Relaxed);
                close.cancel();
                break;
            }
            _ = state.shutdown.cancelled() => {
                close.cancel();
                break;
            }
            msg = stream.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(text))) => handle(&state, &member, &user, &mut joined, &text),
            Some(Ok(Message::Binary(_))) => member.offer(frame(
                FrameError::new(ErrorCode::BadFrame, "frames are json text", None).to_frame(),
            )),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    {
        let mut rooms = state.rooms.lock().unwrap();
        for room in joined {
            leave(&mut rooms, &room, member.id);
        }
    }
    drop(member);
    let _done = writer.await;
}

fn leave(rooms: &mut HashMap<String, Room>, room: &str, member: u64) {
    if let Some(r) = rooms.get_mut(room) {
        r.members.retain(|m| m.id != member);
        if r.members.is_empty() {
            rooms.remove(room);
        }
    }
}

fn handle(
    state: &AppState,
    member: &Arc<Member>,
    user: &str,
    joined: &mut Vec<String>,
    text: &str,
) {
    let parsed = match parse_client_frame(text) {
        Ok(f) => f,
        Err(e) => return member.offer(frame(e.to_frame())),
    };
    let not_joined = |room: &str| {
        frame(
            FrameError::new(
                ErrorCode::NotJoined,
                format!("not a member of {room}"),
                None,
            )
            .to_frame(),
        )
    };
    match parsed {
        ClientFrame::Join { room, since } => {
            let mut rooms = state.rooms.lock().unwrap();
            let r = rooms.entry(room.clone()).or_default();
            if !joined.contains(&room) {
                r.members.push(member.clone());
                joined.push(room.clone());
            }
            member.offer(frame(ServerFrame::Joined {
                room: &room,
                position: Position {
                    offset: r.next_offset - 1,
                    epoch: EPOCH.to_owned(),
                },
                recovered: since.is_none_or(|s| s.epoch == EPOCH),
            }));
        }
        ClientFrame::Leave { room } => {
            if !joined.contains(&room) {
                return member.offer(not_joined(&room));
            }
            joined.retain(|r| r != &room);
            leave(&mut state.rooms.lock().unwrap(), &room, member.id);
        }
        ClientFrame::Typing { room } => {
            if !joined.contains(&room) {
                return member.offer(not_joined(&room));
            }
            let f = frame(ServerFrame::Typing {
                room: &room,
                user,
                ttl_ms: 3000,
            });
            if let Some(r) = state.rooms.lock().unwrap().get(&room) {
                for m in &r.members {
                    let _dropped_when_full = m.tx.try_send(f.clone());
                }
            }
        }
        ClientFrame::Presence { room } => {
            // The baseline keeps no presence: it answers as a node without it.
            let e =
                FrameError::new(ErrorCode::Unavailable, "no presence here", None).in_room(&room);
            member.offer(frame(e.to_frame()));
        }
        ClientFrame::Read { room, .. } => {
            // Nor read positions: it answers as a node that appends none.
            let e = FrameError::new(ErrorCode::Unavailable, "no read positions here", None)
                .in_room(&room);
            member.offer(frame(e.to_frame()));
        }
        ClientFrame::Change { id, .. } => {
            // Nor edits, deletes or reactions: as a node with them turned off.
            let e = FrameError::new(ErrorCode::Unavailable, "no message changes here", Some(id));
            member.offer(frame(e.to_frame()));
        }
        ClientFrame::Send { room, id, body } => {
            let ts = schemas::now_ms();
            let mut rooms = state.rooms.lock().unwrap();
            let r = rooms.entry(room.clone()).or_default();
            let offset = r.next_offset;
            r.next_offset += 1;
            member.offer(frame(ServerFrame::Ack {
                id: &id,
                room: &room,
                offset,
                ts,
            }));
            let view = MessageView {
                room,
                offset,
                id,
                user: user.to_owned(),
                body,
                ts,
                ..MessageView::default()
            };
            let f = frame(ServerFrame::Message(&view));
            for m in &r.members {
                m.offer(f.clone());
            }
            if r.members.is_empty() {
                let room = view.room;
                rooms.remove(&room);
            }
        }
    }
}
