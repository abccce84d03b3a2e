//! One WebSocket connection: reads client frames, answers each request, and
//! writes every frame for the client through one bounded queue.
//!
//! Tasks: the connection task reads and handles frames; a writer task owned
//! by it drains the queue into the socket and sends the close frame. A bad
//! frame is answered with an `error` and nothing else happens. Who the
//! client is was settled at the upgrade ([`crate::auth`]); every join and
//! send is checked against the rooms that identity may use. Close codes:
//! 4001 unauthorized (no user in dev mode, or the token expired), 4008 slow
//! consumer (its queue filled up), 1001 server
//! going away (shutdown, after in-flight appends are acked). However a
//! connection ends, the sends it accepted are appended (acked when the
//! client can still take the ack), so a retry of their ids gets the outcome.
//!
//! The socket itself is only touched at the edge: [`connection`] splits it
//! and hands its halves to [`session`], which works over any `Sink` and
//! `Stream` of messages, so the tests (`ws/tests.rs`) drive the production
//! code over channels.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::Extension;
use fanout::{Frame, Member};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use schemas::protocol::{
    parse_client_frame, ClientFrame, CloseCode, ErrorCode, FrameError, Position, ServerFrame,
    PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{access, AuthError, Identity};
use crate::dedup::{self, AckInfo, Claim, Outcome};
use crate::{now_ms, AppState, PendingSend, What};

/// Close codes, as [`CloseCode`] names them (docs/protocol.md, Close codes).
pub const CLOSE_UNAUTHORIZED: u16 = CloseCode::Unauthorized.code();
pub const CLOSE_SLOW_CONSUMER: u16 = CloseCode::SlowConsumer.code();
pub const CLOSE_GOING_AWAY: u16 = CloseCode::GoingAway.code();

/// How long a closing connection may take to flush its last frames.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Read buffer of a connection. The library's default (128 KiB) is
/// allocated per connection and zeroed on every read: 263 KiB of RSS per
/// idle connection and a 128 KiB memset per small frame (benches/RESULTS.md).
/// A frame larger than this is still read whole, in several reads.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Most frames written to the socket before one flush.
const MAX_WRITE_BURST: usize = 64;

/// `GET /ws`: checks the page's origin, identifies the client, counts the
/// connection, then upgrades. Refused before the upgrade: an origin not
/// allowed (403 `forbidden`), a token that does not verify (401), too many
/// connections from the address or of the user (429 `limit_reached`). In
/// dev mode a missing user is told after the upgrade (an `unauthorized`
/// error, then close 4001), as v1 does.
pub(crate) async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let limits = &state.guard.limits;
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if !limits
        .origins
        .allows(header(header::ORIGIN), header(header::HOST))
    {
        return refuse_upgrade(&FrameError::new(
            ErrorCode::Forbidden,
            "this page's origin may not open a connection (--allowed-origin)",
            None,
        ));
    }
    let identity = match state.gw.auth.identify_ws(&query, &headers).await {
        Ok(identity) => Some(identity),
        Err(AuthError::NoDevUser) => None,
        Err(e) => {
            count_refused(ErrorCode::Unauthorized);
            return crate::http::unauthorized(&e);
        }
    };
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = limits.client_ip(
        peer.map(|Extension(ConnectInfo(addr))| addr.ip()),
        &forwarded,
    );
    let user = identity.as_ref().map(|i| i.user.as_str());
    let slot = match state.guard.admit(ip, user) {
        Ok(slot) => slot,
        Err(e) => return refuse_upgrade(&e),
    };
    // Both sizes: a frame whose header announces more is refused before its
    // payload is read; a message of many small fragments when it grows past.
    ws.max_frame_size(limits.max_frame_bytes)
        .max_message_size(limits.max_frame_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let tracker = state.connections.clone();
            // Every line the connection logs names it and its user (never
            // what it sends).
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let user = identity.as_ref().map(|i| i.user.clone());
            let span = tracing::info_span!("connection", id, user = user.as_deref());
            tracker.track_future(
                async move {
                    tracing::debug!("connected");
                    connection(socket, state, identity).await;
                    drop(slot);
                    tracing::debug!("closed");
                }
                .instrument(span),
            )
        })
}

fn count_refused(code: ErrorCode) {
    metrics::counter!(crate::metrics::UPGRADES_REFUSED_TOTAL, "code" => code.as_str()).increment(1);
}

/// The answer to an upgrade refused with `e`, counted.
fn refuse_upgrade(e: &FrameError) -> Response {
    count_refused(e.code);
    crate::http::error_response(e)
}

/// True when a read failed on a frame over the size limit.
fn too_large(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn error_frame(e: &FrameError) -> Frame {
    Frame::from(e.to_frame().to_json())
}

fn ack_frame(id: &str, room: &str, ack: AckInfo) -> Frame {
    Frame::from(
        ServerFrame::Ack {
            id,
            room,
            offset: ack.offset,
            ts: ack.ts,
        }
        .to_json(),
    )
}

/// How a connection ends.
#[derive(Debug, Clone, Copy)]
struct Close {
    code: u16,
    reason: &'static str,
    /// Send what is queued first (acks of a drain); a slow consumer's
    /// backlog is dropped instead.
    flush: bool,
    /// Read what the client still sends until its close. Not after a frame
    /// over the limit: reading on would take in that frame's payload.
    handshake: bool,
}

const SLOW_CONSUMER: Close = Close {
    code: CLOSE_SLOW_CONSUMER,
    reason: "slow consumer",
    flush: false,
    handshake: true,
};
const GOING_AWAY: Close = Close {
    code: CLOSE_GOING_AWAY,
    reason: "server going away",
    flush: true,
    handshake: true,
};
const UNAUTHORIZED: Close = Close {
    code: CLOSE_UNAUTHORIZED,
    reason: "unauthorized",
    flush: true,
    handshake: true,
};
const TOO_LARGE: Close = Close {
    code: CloseCode::TooLarge.code(),
    reason: "frame too large",
    flush: true,
    handshake: false,
};
const IDLE: Close = Close {
    code: CloseCode::IdleTimeout.code(),
    reason: "idle timeout",
    flush: true,
    handshake: true,
};

/// Drains the queue into the socket until the queue closes or a close
/// arrives. `sink` is the socket's sending half (a channel in tests); a
/// failed write ends the writer.
async fn writer<Si>(
    mut sink: Si,
    mut rx: mpsc::Receiver<Frame>,
    mut close: oneshot::Receiver<Close>,
    ping_every: Duration,
) where
    Si: Sink<Message> + Unpin,
{
    let mut ping = (!ping_every.is_zero()).then(|| {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping
    });
    loop {
        tokio::select! {
            biased;
            close = &mut close => {
                if let Ok(close) = close {
                    if close.flush {
                        while let Ok(frame) = rx.try_recv() {
                            if sink.send(Message::Text(frame)).await.is_err() {
                                return;
                            }
                        }
                    }
                    let frame = CloseFrame { code: close.code, reason: Utf8Bytes::from_static(close.reason) };
                    let _closing = sink.send(Message::Close(Some(frame))).await;
                }
                break;
            }
            frame = rx.recv() => match frame {
                Some(frame) => {
                    // Every frame already queued goes out with this one, in
                    // one write: a burst of acks and messages costs one
                    // syscall instead of one each.
                    let mut written = sink.feed(Message::Text(frame)).await.is_ok();
                    for _ in 1..MAX_WRITE_BURST {
                        let Ok(frame) = rx.try_recv() else { break };
                        written = written && sink.feed(Message::Text(frame)).await.is_ok();
                    }
                    if !written || sink.flush().await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = async { ping.as_mut()?.tick().await; Some(()) }, if ping.is_some() => {
                // The client's pong (or any frame) keeps the connection
                // from its idle timeout.
                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _closed = sink.close().await;
}

type AppendFuture = BoxFuture<'static, (Arc<Vec<PendingSend>>, Vec<Outcome>)>;
type RetryFuture = BoxFuture<'static, (String, String, Outcome)>;

struct Connection {
    state: Arc<AppState>,
    user: String,
    identity: Identity,
    member: Arc<Member>,
    tx: mpsc::Sender<Frame>,
    kick: CancellationToken,
    rooms: HashSet<String>,
    /// The connection's send bucket, when sends are limited.
    bucket: Option<governor::DefaultDirectRateLimiter>,
    /// Until when the connection is not read, after a refused send: a
    /// client that floods waits in TCP instead of costing a refusal per
    /// frame (named policy: stop reading, as for a full send queue).
    throttled: Option<tokio::time::Instant>,
    /// Sends waiting for the batch in flight to finish.
    queued: Vec<PendingSend>,
    /// At most one batch in the log at a time, so a connection's sends keep
    /// their order.
    inflight: FuturesUnordered<AppendFuture>,
    /// Retries of ids whose first attempt is still in flight.
    retries: FuturesUnordered<RetryFuture>,
}

/// Serves an upgraded socket (the production path).
async fn connection(socket: WebSocket, state: Arc<AppState>, identity: Option<Identity>) {
    let (sink, stream) = socket.split();
    session(sink, stream, state, identity).await;
}

/// Serves one connection over the halves of its socket: `welcome` (or, when
/// `identity` is `None`, the `unauthorized` error and close), then the
/// client's frames, then the close. Returns when the writer is done, at most
/// [`CLOSE_GRACE`] after the connection stopped handling frames.
async fn session<Si, St>(sink: Si, mut stream: St, state: Arc<AppState>, identity: Option<Identity>)
where
    Si: Sink<Message> + Unpin + Send + 'static,
    St: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let (tx, rx) = mpsc::channel(state.gw.config.client_queue);
    let (close_tx, close_rx) = oneshot::channel();
    let ping_every = state.guard.limits.ping_every;
    let mut writer = tokio::spawn(writer(sink, rx, close_rx, ping_every));
    let Some(identity) = identity else {
        let e = AuthError::NoDevUser.to_frame_error();
        let _queued = tx.try_send(error_frame(&e));
        drop(tx);
        // Let the error go out before the close.
        let _sent = close_tx.send(UNAUTHORIZED);
        if tokio::time::timeout(CLOSE_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        return;
    };
    metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
    let mut conn = Connection::new(state.clone(), identity, tx);
    let node = state.gw.config.node.clone();
    conn.push(Frame::from(
        ServerFrame::Welcome {
            user: &conn.user,
            node: &node,
            v: PROTOCOL_VERSION,
        }
        .to_json(),
    ));
    let close = conn.run(&mut stream).await;
    conn.leave_all();
    let handshake = close.is_some_and(|c| c.handshake);
    if let Some(code) = close {
        let _sent = close_tx.send(code);
    } else {
        drop(close_tx);
    }
    drop(conn);
    // A client that does not read cannot hold the connection open: after a
    // grace period the socket is dropped with whatever is still unsent.
    let grace = tokio::time::Instant::now() + CLOSE_GRACE;
    if tokio::time::timeout_at(grace, &mut writer).await.is_err() {
        writer.abort();
    } else if handshake {
        // Close handshake: read (and drop) what the client still sends until
        // its close arrives, so the socket is not reset under unread data.
        let drained = tokio::time::timeout_at(grace, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        });
        if drained.await.is_err() {
            tracing::debug!("client did not answer the close");
        }
    }
    metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
}

impl Connection {
    /// A connection of `identity` whose frames for the client go to `tx`
    /// (the queue the writer drains); it has joined no room yet.
    fn new(state: Arc<AppState>, identity: Identity, tx: mpsc::Sender<Frame>) -> Self {
        let kick = CancellationToken::new();
        let member = Member::new(&identity.user, tx.clone(), kick.clone());
        let bucket = state.guard.connection_bucket();
        Connection {
            state,
            user: identity.user.clone(),
            identity,
            member,
            tx,
            kick,
            rooms: HashSet::new(),
            bucket,
            throttled: None,
            queued: Vec::new(),
            inflight: FuturesUnordered::new(),
            retries: FuturesUnordered::new(),
        }
    }

    /// Queues a frame for the client; a full queue makes it a slow consumer.
    fn push(&self, frame: Frame) {
        if self.tx.try_send(frame).is_err() && !self.kick.is_cancelled() {
            metrics::counter!(fanout::metrics::SLOW_CONSUMERS_TOTAL).increment(1);
            self.kick.cancel();
        }
    }

    fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave_room(&room);
        }
    }

    /// Ends the connection's membership of `room` (it was a member).
    fn leave_room(&self, room: &str) {
        if let Some(presence) = &self.state.gw.presence {
            presence.left(room, &self.member);
        }
        if let Some(fanout) = &self.state.gw.fanout {
            fanout.leave(room, &self.member);
        }
    }

    /// Handles frames until the client leaves or must be closed; returns the
    /// close code to send, if any. The end of `stream`, or an error from it,
    /// means the client is gone.
    async fn run<St>(&mut self, stream: &mut St) -> Option<Close>
    where
        St: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let shutdown = self.state.shutdown.clone();
        let kick = self.kick.clone();
        let max_pending = self.state.gw.config.max_pending_sends;
        let expired = expiry(self.identity.expires_at);
        tokio::pin!(expired);
        let idle_timeout = self.state.guard.limits.idle_timeout;
        // The timer is not moved on every frame (a timer-wheel update per
        // frame); it fires, and is set again from the last frame's time
        // until a whole timeout passed without one.
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let can_read =
                self.queued.len() + self.retries.len() < max_pending && self.throttled.is_none();
            let throttled_until = self.throttled;
            tokio::select! {
                biased;
                _ = kick.cancelled() => {
                    // The client's backlog is dropped, its accepted sends are
                    // not: an id stays claimed until its append has an
                    // outcome, so abandoning it would leave the retry the
                    // client makes after reconnecting waiting forever.
                    self.finish_appends().await;
                    return Some(SLOW_CONSUMER);
                }
                _ = shutdown.cancelled() => {
                    // Drain: finish the appends already accepted, ack them.
                    self.drain_accepted().await;
                    return Some(GOING_AWAY);
                }
                () = &mut expired => {
                    // The token ran out: what was accepted is still
                    // appended and acked, then the client is told why.
                    self.drain_accepted().await;
                    self.push(error_frame(&AuthError::Expired.to_frame_error()));
                    return Some(UNAUTHORIZED);
                }
                Some((batch, outcomes)) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.answer(batch, outcomes);
                    self.start_batch();
                }
                Some((id, room, outcome)) = self.retries.next(), if !self.retries.is_empty() => {
                    self.answer_one(&id, &room, outcome);
                }
                () = async { tokio::time::sleep_until(throttled_until.unwrap_or_else(tokio::time::Instant::now)).await }, if throttled_until.is_some() => {
                    self.throttled = None;
                    // Not heard from while not read: the pause is not silence.
                    last_heard = tokio::time::Instant::now();
                }
                () = &mut idle, if !idle_timeout.is_zero() && throttled_until.is_none() => {
                    let deadline = last_heard + idle_timeout;
                    if deadline > tokio::time::Instant::now() {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    // Nothing from the client, not even a pong: it is gone
                    // or stuck. What it had sent is still appended.
                    self.drain_accepted().await;
                    return Some(IDLE);
                }
                msg = stream.next(), if can_read => {
                    last_heard = tokio::time::Instant::now();
                    match msg {
                    Some(Ok(Message::Text(text))) => self.handle(&text).await,
                    Some(Ok(Message::Binary(_))) => self.push(error_frame(&FrameError::new(
                        ErrorCode::BadFrame,
                        "frames are json text",
                        None,
                    ))),
                    Some(Err(e)) if too_large(&e) => {
                        // Refused at the frame's header; what came before it
                        // is appended and acked, then the close says why.
                        metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::TooLarge.as_str())
                            .increment(1);
                        self.drain_accepted().await;
                        return Some(TOO_LARGE);
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // The client is gone; appends in flight still complete.
                        self.finish_appends().await;
                        return None;
                    }
                    Some(Ok(_)) => {} // pings are answered by the library; pongs only count as life
                    }
                },
            }
        }
    }

    /// Completes every accepted send, queued ones and retries included, and
    /// answers each.
    async fn drain_accepted(&mut self) {
        while !self.inflight.is_empty() || !self.queued.is_empty() {
            if let Some((batch, outcomes)) = self.inflight.next().await {
                self.answer(batch, outcomes);
            }
            self.start_batch();
        }
        while let Some((id, room, outcome)) = self.retries.next().await {
            self.answer_one(&id, &room, outcome);
        }
    }

    /// Completes the accepted sends: the batch in the log, then the ones
    /// queued behind it. Each outcome reaches the dedup cache, where retries
    /// of the id find it, and the client's queue when it has room.
    async fn finish_appends(&mut self) {
        while let Some((batch, outcomes)) = self.inflight.next().await {
            self.answer(batch, outcomes);
            self.start_batch();
        }
    }

    fn answer(&mut self, batch: Arc<Vec<PendingSend>>, outcomes: Vec<Outcome>) {
        for (send, outcome) in batch.iter().zip(outcomes) {
            if outcome.is_ok() {
                metrics::histogram!(crate::metrics::ACK_SECONDS)
                    .record(send.arrived.elapsed().as_secs_f64());
            }
            self.answer_one(&send.id, &send.room, outcome);
        }
    }

    fn answer_one(&self, id: &str, room: &str, outcome: Outcome) {
        match outcome {
            Ok(ack) => self.push(ack_frame(id, room, ack)),
            Err(e) => self.push(error_frame(&e)),
        }
    }

    /// Sends the queued sends to the log as one batch, if none is in flight.
    fn start_batch(&mut self) {
        if !self.inflight.is_empty() || self.queued.is_empty() {
            return;
        }
        let batch = Arc::new(std::mem::take(&mut self.queued));
        let state = self.state.clone();
        self.inflight.push(
            async move {
                let outcomes = state.append_within(&batch).await;
                (batch, outcomes)
            }
            .boxed(),
        );
    }

    async fn handle(&mut self, text: &str) {
        metrics::counter!(crate::metrics::FRAMES_TOTAL).increment(1);
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => e.code.as_str())
                    .increment(1);
                return self.push(error_frame(&e));
            }
        };
        match frame {
            ClientFrame::Send { room, id, body } => self.send(room, id, What::Message(body)),
            ClientFrame::Change {
                room,
                id,
                target,
                change,
            } => {
                if let Err(e) = self.state.refuse_change(&id) {
                    return self.push(error_frame(&e));
                }
                self.send(room, id, What::Change { target, change })
            }
            ClientFrame::Join { room, since } => self.join(room, since).await,
            ClientFrame::Leave { room } => {
                if !self.rooms.remove(&room) {
                    return self.push(not_joined(&room));
                }
                self.leave_room(&room);
            }
            ClientFrame::Typing { room } => {
                if !self.rooms.contains(&room) {
                    return self.push(not_joined(&room));
                }
                if let Err(e) = self.take_send(None) {
                    return self.push(error_frame(&e));
                }
                if let Some(presence) = &self.state.gw.presence {
                    presence.typing(&room, &self.user);
                }
            }
            ClientFrame::Read { room, offset } => self.read(room, offset),
            ClientFrame::Presence { room } => {
                if self.refuse_room(&room, None) {
                    return;
                }
                let Some(presence) = &self.state.gw.presence else {
                    return self.push(error_frame(
                        &FrameError::new(
                            ErrorCode::Unavailable,
                            "this node keeps no presence",
                            None,
                        )
                        .in_room(&room),
                    ));
                };
                presence.ask(&room, &self.member, self.rooms.contains(&room));
            }
        }
    }

    /// Appends the user's read position in `room`, on a task of its own
    /// (tracked with the connections, bounded by the send timeout): the
    /// connection reads on meanwhile. Not answered when it went well (the
    /// user's connections that joined the room get the `read` frame from
    /// the log); an `unavailable` error with the room when it did not.
    fn read(&mut self, room: String, offset: i64) {
        if self.refuse_room(&room, None) {
            return;
        }
        if let Err(e) = self.state.refuse_read(&room) {
            return self.push(error_frame(&e));
        }
        if let Err(e) = self.take_send(None) {
            return self.push(error_frame(&e));
        }
        let (state, user, tx) = (self.state.clone(), self.user.clone(), self.tx.clone());
        self.state.connections.spawn(async move {
            if let Err(e) = state.append_read(&room, &user, offset).await {
                // Best effort: a client whose queue is full misses it.
                let _dropped_when_full = tx.try_send(error_frame(&e));
            }
        });
    }

    /// Refuses a request for a room this user may not use: `forbidden`,
    /// and nothing else happens.
    fn refuse_room(&self, room: &str, id: Option<&str>) -> bool {
        if self.identity.may_use(room) {
            return false;
        }
        metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::Forbidden.as_str())
            .increment(1);
        let refused = access::forbidden(room, id.map(str::to_owned));
        // A join has no id: the room says which request was refused.
        let refused = if refused.id.is_none() {
            refused.in_room(room)
        } else {
            refused
        };
        self.push(error_frame(&refused));
        true
    }

    /// Takes one send from the connection's and the user's buckets.
    /// A refusal stops reading the connection for its `retry_after_ms`.
    fn take_send(&mut self, id: Option<&str>) -> Result<(), FrameError> {
        let taken = self
            .state
            .guard
            .take_send(self.bucket.as_ref(), &self.user, id);
        if let Err(e) = &taken {
            metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::RateLimited.as_str())
                .increment(1);
            let wait = Duration::from_millis(e.retry_after_ms.unwrap_or(0));
            self.throttled = Some(tokio::time::Instant::now() + wait);
        }
        taken
    }

    /// Appends a message or a change, acked once durable; idempotent by
    /// `id` (a retry is answered with the first attempt's outcome).
    fn send(&mut self, room: String, id: String, what: What) {
        if self.refuse_room(&room, Some(&id)) {
            return;
        }
        if let Err(e) = self.take_send(Some(&id)) {
            return self.push(error_frame(&e));
        }
        match self.state.dedup.claim(&room, &id, &self.user) {
            Err(e) => self.push(error_frame(&e)),
            Ok(Claim::Done(ack)) => self.push(ack_frame(&id, &room, ack)),
            Ok(Claim::Pending(rx)) => {
                let timeout = self.state.gw.config.send_timeout;
                self.retries.push(
                    async move {
                        let outcome = dedup::wait(rx, &id, timeout).await;
                        (id, room, outcome)
                    }
                    .boxed(),
                );
            }
            Ok(Claim::New) => {
                self.queued.push(PendingSend {
                    room,
                    id,
                    user: self.user.clone(),
                    what,
                    ts: now_ms(),
                    arrived: std::time::Instant::now(),
                });
                self.start_batch();
            }
        }
    }

    async fn join(&mut self, room: String, since: Option<Position>) {
        if self.refuse_room(&room, None) {
            return;
        }
        let Some(fanout) = self.state.gw.fanout.clone() else {
            return self.push(error_frame(
                &FrameError::new(
                    ErrorCode::Unavailable,
                    "this node does not serve live messages",
                    None,
                )
                .in_room(&room),
            ));
        };
        let most = self.state.guard.limits.rooms_per_connection;
        if most > 0 && !self.rooms.contains(&room) && self.rooms.len() >= most {
            metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::LimitReached.as_str())
                .increment(1);
            return self.push(error_frame(
                &crate::limits::limit_reached(format!(
                    "this connection has joined {most} rooms, the most it may; leave one first"
                ))
                .in_room(&room),
            ));
        }
        // A join again replaces the fan-out membership; presence keeps
        // the user in the room meanwhile.
        let again = self.rooms.remove(&room);
        if again {
            fanout.leave(&room, &self.member);
        }
        let joined = tokio::select! {
            r = fanout.join(&room, &self.member, since.as_ref()) => r,
            _ = self.kick.cancelled() => Err(fanout::FanoutError::Slow),
            _ = self.state.shutdown.cancelled() => {
                if again {
                    self.rooms.insert(room);
                }
                return;
            }
        };
        let presence = self.state.gw.presence.clone();
        match joined {
            Ok(()) | Err(fanout::FanoutError::Slow) => {
                // A slow member is joined as far as the fan-out is
                // concerned too; leave_all cleans up.
                if let (Some(presence), false) = (&presence, again) {
                    presence.joined(&room, &self.member);
                }
                self.rooms.insert(room);
            }
            Err(fanout::FanoutError::Log(e)) => {
                if let (Some(presence), true) = (&presence, again) {
                    presence.left(&room, &self.member);
                }
                tracing::warn!(error = %e, room, "join failed");
                self.push(error_frame(
                    &FrameError::new(
                        ErrorCode::Unavailable,
                        "the log is unavailable; join again",
                        None,
                    )
                    .in_room(&room),
                ));
            }
        }
    }
}

/// Resolves when a token expiring at `expires_at` (Unix seconds) has
/// expired past the leeway; never for `None` (dev mode).
async fn expiry(expires_at: Option<u64>) {
    let Some(exp) = expires_at else {
        return std::future::pending().await;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let end = std::time::Duration::from_secs(exp) + crate::auth::token::LEEWAY;
    tokio::time::sleep(end.saturating_sub(now)).await;
}

fn not_joined(room: &str) -> Frame {
    error_frame(
        &FrameError::new(
            ErrorCode::NotJoined,
            format!("not a member of {room}"),
            None,
        )
        .in_room(room),
    )
}

// The path is spelled out so that `rustfmt src/ws.rs` alone finds the file.
#[cfg(test)]
#[path = "ws/tests.rs"]
mod tests;
