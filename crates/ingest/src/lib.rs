//! The gateway's front door: the client WebSocket protocol (docs/protocol.md),
//! the HTTP endpoints, and the web page.
//!
//! Ingest validates each request, appends accepted messages to the log and
//! acks them only once the append is durable. A connection's sends are
//! appended in the order they arrived: while one batch is in the log, the
//! next ones wait in a bounded per-connection queue and go as one batch
//! (full queue policy: stop reading the socket). Fan-out (joins, live
//! messages) is delegated to the `fanout` crate; history to the store.

pub mod auth;
mod dedup;
mod http;
pub mod limits;
pub mod metrics;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use eventlog::{EventLog, Record};
use fanout::Fanout;
use history::HistoryStore;
use metrics_exporter_prometheus::PrometheusHandle;
pub(crate) use schemas::now_ms;
use schemas::protocol::{ErrorCode, FrameError, MAX_REACTIONS_PER_MESSAGE};
use schemas::{Change, ChatEvent, MessageChanged, MessagePosted, ReadPositionMoved};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use dedup::AckInfo;

/// Gateway settings; defaults in [`GatewayConfig::default`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Name of this node, sent in `welcome`.
    pub node: String,
    /// Frames queued for one client before it counts as a slow consumer.
    pub client_queue: usize,
    /// Sends of one connection waiting for the log before it stops reading.
    pub max_pending_sends: usize,
    /// Client message ids remembered for idempotent retries.
    pub dedup_capacity: usize,
    /// How long shutdown waits for connections to drain.
    pub drain_timeout: Duration,
    /// How long a send handed to the log waits for the log's answer before
    /// it is answered `unavailable` with `pending` (the append goes on, and
    /// a retry with the same id gets its outcome). Zero: no limit.
    pub send_timeout: Duration,
    /// Whether this node accepts messages; without the ingest role, sends
    /// and posts are answered `unavailable`.
    pub ingest: bool,
    /// Look each new send id up in the history before appending, so a retry
    /// through another node is not appended twice.
    pub check_history: bool,
    /// How often a JWKS from a URL is fetched again.
    pub jwks_refresh: Duration,
    /// Rates, counts, sizes, the idle timeout and the Origin check.
    pub limits: limits::Limits,
    /// Whether `read` frames and posts are appended. Off while a rolling
    /// upgrade from a release before read positions (schema v1) still has
    /// old projectors or gateways: they cannot read the new event.
    pub read_positions: bool,
    /// Whether edits, deletes and reactions are appended. Off while a
    /// rolling upgrade from a release before them (schema v2) still has old
    /// projectors or gateways: they cannot read the new events.
    pub message_changes: bool,
    /// Rooms whose members see each other's read positions (the fan-out is
    /// given the same).
    pub shared_reads: Arc<schemas::protocol::RoomPatterns>,
    /// On a node that projects, `/readyz` says not ready while a projected
    /// partition's history is more than this many records behind the log.
    pub ready_max_lag: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            node: "gw-1".to_owned(),
            client_queue: 4096,
            max_pending_sends: 1024,
            dedup_capacity: 100_000,
            drain_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            ingest: true,
            check_history: true,
            jwks_refresh: Duration::from_secs(300),
            limits: limits::Limits::default(),
            read_positions: true,
            message_changes: true,
            shared_reads: Arc::new(fanout::default_shared_reads()),
            ready_max_lag: 10_000,
        }
    }
}

/// The partitions this node's projector projects now.
pub type Projected = Arc<dyn Fn() -> Vec<u32> + Send + Sync>;

/// What a gateway serves from. `fanout` and `store` are optional roles: a
/// gateway without them answers joins and history with `unavailable`.
pub struct Gateway {
    pub log: Arc<dyn EventLog>,
    /// How users are identified: tokens, or open dev mode.
    pub auth: auth::Auth,
    pub fanout: Option<Arc<Fanout>>,
    /// Who is in which room across nodes; with the fan-out role.
    pub presence: Option<Arc<fanout::presence::Presence>>,
    pub store: Option<Arc<dyn HistoryStore>>,
    /// On a node that projects: which partitions, for `/readyz` to check
    /// the store keeps up with them.
    pub projected: Option<Projected>,
    pub metrics: Option<PrometheusHandle>,
    pub config: GatewayConfig,
}

pub(crate) struct AppState {
    gw: Gateway,
    dedup: dedup::Dedup,
    guard: Arc<limits::Guard>,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

/// A validated message or change waiting to be appended.
pub(crate) struct PendingSend {
    pub room: String,
    pub id: String,
    pub user: String,
    pub what: What,
    pub ts: i64,
    /// When the send reached the gateway, for its ack's latency.
    pub arrived: std::time::Instant,
}

/// What a [`PendingSend`] appends.
pub(crate) enum What {
    /// A message with this body.
    Message(String),
    /// An edit, delete or reaction of the message at offset `target`.
    Change { target: i64, change: Change },
}

impl PendingSend {
    fn record(&self) -> Record {
        let event = match &self.what {
            What::Message(body) => ChatEvent::MessagePosted(MessagePosted {
                room: self.room.clone(),
                client_id: self.id.clone(),
                user: self.user.clone(),
                body: body.clone(),
                ts: self.ts,
            }),
            What::Change { target, change } => ChatEvent::MessageChanged(MessageChanged {
                room: self.room.clone(),
                client_id: self.id.clone(),
                user: self.user.clone(),
                target: *target,
                change: change.clone(),
                ts: self.ts,
            }),
        };
        Record {
            key: self.room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts: self.ts,
        }
    }
}

/// How long a change waits for its target to reach the history (a message
/// acked a moment ago may not be projected yet) before it is answered
/// `unavailable`; within the send timeout, when there is one.
const TARGET_WAIT: Duration = Duration::from_secs(5);
/// How often a change waiting for its target looks again.
const TARGET_POLL: Duration = Duration::from_millis(20);

impl AppState {
    /// Why this node appends no edit, delete or reaction now, if it does
    /// not.
    pub(crate) fn refuse_change(&self, id: &str) -> Result<(), FrameError> {
        let why = if !self.gw.config.ingest {
            "this node does not accept writes"
        } else if !self.gw.config.message_changes {
            "edits, deletes and reactions are turned off on this node"
        } else {
            return Ok(());
        };
        Err(FrameError::new(
            ErrorCode::Unavailable,
            why,
            Some(id.to_owned()),
        ))
    }

    /// Why this node appends no read position now, if it does not.
    pub(crate) fn refuse_read(&self, room: &str) -> Result<(), FrameError> {
        let why = if !self.gw.config.ingest {
            "this node does not accept writes"
        } else if !self.gw.config.read_positions {
            "read positions are turned off on this node"
        } else {
            return Ok(());
        };
        Err(FrameError::new(ErrorCode::Unavailable, why, None).in_room(room))
    }

    /// Appends `user`'s read position `offset` in `room`, waiting at most
    /// the send timeout. An error says it may not be stored (a position
    /// appended late is harmless: the highest one counts).
    pub(crate) async fn append_read(
        &self,
        room: &str,
        user: &str,
        offset: i64,
    ) -> Result<(), FrameError> {
        let ts = now_ms();
        let event = ChatEvent::ReadPositionMoved(ReadPositionMoved {
            room: room.to_owned(),
            user: user.to_owned(),
            offset,
            ts,
        });
        let record = Record {
            key: room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts,
        };
        let append = self.gw.log.append(vec![record]);
        let timeout = self.gw.config.send_timeout;
        let appended = if timeout.is_zero() {
            Ok(append.await)
        } else {
            tokio::time::timeout(timeout, append).await
        };
        let why = match appended {
            Ok(Ok(_)) => {
                ::metrics::counter!(crate::metrics::READS_TOTAL).increment(1);
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_elapsed) => "the log did not answer in time".to_owned(),
        };
        tracing::warn!(room, error = why, "a read position was not appended");
        Err(FrameError::new(
            ErrorCode::Unavailable,
            format!("the read position may not be stored ({why}); send it again"),
            None,
        )
        .in_room(room))
    }

    /// Appends `batch` on a task of its own and answers each send within
    /// the send timeout. The task is tracked with the connections and never
    /// cancelled: whatever happens to the request or connection that
    /// started it, and however long the log takes, it finishes every id, so
    /// a retry gets this attempt's outcome. A send still unanswered at the
    /// timeout is answered `unavailable` with `pending`: it may yet be
    /// appended, and its id stays claimed until the log answers.
    pub(crate) async fn append_within(
        self: &Arc<Self>,
        batch: &Arc<Vec<PendingSend>>,
    ) -> Vec<dedup::Outcome> {
        let (state, sends) = (self.clone(), batch.clone());
        let mut task = self
            .connections
            .spawn(async move { state.append(&sends).await });
        let timeout = self.gw.config.send_timeout;
        let finished = if timeout.is_zero() {
            Ok((&mut task).await)
        } else {
            tokio::time::timeout(timeout, &mut task).await
        };
        match finished {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "append task failed");
                // The task ended without finishing its ids: do it here, or
                // their retries would wait for an outcome that never comes.
                self.refuse(batch, "the append failed; retry with the same id")
            }
            Err(_elapsed) => {
                ::metrics::counter!(crate::metrics::SEND_TIMEOUTS_TOTAL)
                    .increment(batch.len() as u64);
                tracing::warn!(
                    sends = batch.len(),
                    timeout_ms = timeout.as_millis() as u64,
                    "the log did not answer in time; sends answered pending"
                );
                batch
                    .iter()
                    .map(|s| Err(FrameError::pending(&s.id)))
                    .collect()
            }
        }
    }

    /// Answers every send of `batch` `unavailable` (nothing appended) and
    /// finishes its ids, so that a retry appends afresh.
    fn refuse(&self, batch: &[PendingSend], why: &str) -> Vec<dedup::Outcome> {
        let outcomes: Vec<dedup::Outcome> = batch
            .iter()
            .map(|s| {
                Err(FrameError::new(
                    ErrorCode::Unavailable,
                    why,
                    Some(s.id.clone()),
                ))
            })
            .collect();
        for (s, o) in batch.iter().zip(&outcomes) {
            self.dedup.finish(&s.room, &s.id, o);
        }
        outcomes
    }

    /// Appends a batch in order; answers each send, records outcomes for retries.
    pub(crate) async fn append(&self, batch: &[PendingSend]) -> Vec<dedup::Outcome> {
        if !self.gw.config.ingest {
            return self.refuse(batch, "this node does not accept messages (no ingest role)");
        }
        // A retry whose first attempt went through another node, or an
        // earlier process, is answered from the history instead of appended.
        let known = self.known(batch).await;
        // A change the history refuses (not the author's, no such
        // message) is answered so and appends nothing.
        let mut refused = Vec::with_capacity(batch.len());
        for (s, known) in batch.iter().zip(&known) {
            refused.push(match (&s.what, known) {
                (What::Change { target, change }, None) => {
                    self.check_target(s, *target, change).await.err()
                }
                _ => None,
            });
        }
        let fresh: Vec<&PendingSend> = batch
            .iter()
            .zip(known.iter().zip(&refused))
            .filter(|(_, (k, r))| k.is_none() && r.is_none())
            .map(|(s, _)| s)
            .collect();
        let records = fresh.iter().map(|s| s.record()).collect();
        let appended = if fresh.is_empty() {
            Ok(Vec::new())
        } else {
            self.gw.log.append(records).await
        };
        ::metrics::counter!(crate::metrics::APPENDS_TOTAL).increment(1);
        if let Err(e) = &appended {
            tracing::warn!(error = %e, "append failed");
            ::metrics::counter!(crate::metrics::APPEND_ERRORS_TOTAL).increment(1);
        }
        let mut placed = match &appended {
            Ok(all) => Some(all.iter()),
            Err(eventlog::LogError::Partial { appended, .. }) => Some(appended.iter()),
            Err(_) => None,
        };
        let outcomes: Vec<dedup::Outcome> = batch
            .iter()
            .zip(known.into_iter().zip(refused))
            .map(|(s, (known, refused))| match (known, placed.as_mut()) {
                (Some(ack), _) => Ok(ack),
                (None, _) if refused.is_some() => Err(refused.expect("checked")),
                (None, Some(placed)) => match placed.next() {
                    Some(a) => Ok(AckInfo {
                        offset: a.offset as i64,
                        ts: s.ts,
                    }),
                    None => Err(FrameError::new(
                        ErrorCode::Unavailable,
                        "the log is unavailable; nothing was appended; retry with the same id",
                        Some(s.id.clone()),
                    )),
                },
                (None, None) => Err(FrameError::new(
                    ErrorCode::Unavailable,
                    "the log is unavailable; nothing was appended; retry with the same id",
                    Some(s.id.clone()),
                )),
            })
            .collect();
        for (s, o) in batch.iter().zip(&outcomes) {
            self.dedup.finish(&s.room, &s.id, o);
        }
        ::metrics::counter!(crate::metrics::MESSAGES_ACKED_TOTAL)
            .increment(outcomes.iter().filter(|o| o.is_ok()).count() as u64);
        outcomes
    }
}

impl AppState {
    /// Whether `s`, a change of the message at `target`, may be appended:
    /// the message is in the room's history (waiting up to [`TARGET_WAIT`]
    /// for a message not projected yet), not deleted, and, for an edit or
    /// a delete, `s`'s user wrote it. The history store judges: a node
    /// without one cannot tell, and answers `unavailable`.
    async fn check_target(
        &self,
        s: &PendingSend,
        target: i64,
        change: &Change,
    ) -> Result<(), FrameError> {
        let id = Some(s.id.clone());
        let refuse = |code, message: String| Err(FrameError::new(code, message, id.clone()));
        let Some(store) = &self.gw.store else {
            return refuse(
                ErrorCode::Unavailable,
                "this node keeps no history, so it cannot tell whose message this is; send it to a node that does".to_owned(),
            );
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            refuse(
                ErrorCode::Unavailable,
                format!("the history cannot be read ({e}); nothing was appended; retry with the same id"),
            )
        };
        let not_found = || {
            refuse(
                ErrorCode::NotFound,
                format!("room {} has no message at offset {target}", s.room),
            )
        };
        let Ok(offset) = u64::try_from(target) else {
            return not_found();
        };
        let partition = self.gw.log.partition_for(s.room.as_bytes());
        let deadline = tokio::time::Instant::now() + TARGET_WAIT;
        let mut asked_log = false;
        let message = loop {
            // The position first: a store applies a message with the
            // position past it, so a position past the target and no
            // message there means there is none.
            let covered = match http::timed("position", store.position(partition)).await {
                Ok(position) => position.is_some_and(|p| p > offset),
                Err(e) => return unavailable(&e),
            };
            match http::timed("message", store.message(&s.room, offset)).await {
                Ok(Some(message)) => break message,
                Ok(None) if covered => return not_found(),
                Ok(None) => {}
                Err(e) => return unavailable(&e),
            }
            if !asked_log {
                asked_log = true;
                match self.gw.log.end_offset(partition).await {
                    Ok(end) if offset >= end => return not_found(),
                    Ok(_) => {}
                    Err(e) => return unavailable(&e),
                }
            }
            if tokio::time::Instant::now() + TARGET_POLL > deadline {
                return refuse(
                    ErrorCode::Unavailable,
                    format!(
                        "message {target} of room {} is not in the history yet; nothing was appended; retry with the same id",
                        s.room
                    ),
                );
            }
            tokio::time::sleep(TARGET_POLL).await;
        };
        if message.deleted {
            return refuse(
                ErrorCode::NotFound,
                format!("message {target} of room {} was deleted", s.room),
            );
        }
        match change {
            Change::Edit { .. } | Change::Delete if message.user != s.user => refuse(
                ErrorCode::Forbidden,
                format!(
                    "only its author ({}) may {} message {target}",
                    message.user,
                    change.kind()
                ),
            ),
            Change::React { emoji }
                if message.reactions.len() >= MAX_REACTIONS_PER_MESSAGE
                    && !message.reactions.iter().any(|r| &r.emoji == emoji) =>
            {
                refuse(
                    ErrorCode::LimitReached,
                    format!(
                        "message {target} has {MAX_REACTIONS_PER_MESSAGE} different reactions, the most it takes"
                    ),
                )
            }
            _ => Ok(()),
        }
    }

    /// The acks of sends already in the history, when the node has one.
    async fn known(&self, batch: &[PendingSend]) -> Vec<Option<AckInfo>> {
        let Some(store) = self
            .gw
            .store
            .as_ref()
            .filter(|_| self.gw.config.check_history)
        else {
            return vec![None; batch.len()];
        };
        let keys: Vec<(String, String)> = batch
            .iter()
            .map(|s| (s.room.clone(), s.id.clone()))
            .collect();
        match http::timed("ids", store.find_ids(&keys)).await {
            Ok(found) => found
                .into_iter()
                .map(|f| {
                    f.map(|(offset, ts)| AckInfo {
                        offset: offset as i64,
                        ts,
                    })
                })
                .collect(),
            Err(e) => {
                // Not knowing is not fatal: the store and fan-out drop
                // duplicates of an id too.
                tracing::debug!(error = %e, "history lookup of send ids failed");
                vec![None; batch.len()]
            }
        }
    }
}

/// The HTTP router of a gateway, and the tracker of its WebSocket
/// connections.
fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.gw.config.limits.max_body_bytes;
    Router::new()
        .route("/", get(http::index))
        .route("/ws", get(ws::upgrade))
        .route("/auth", get(http::auth_mode))
        .route(
            "/rooms/{room}/messages",
            get(http::history).post(http::post_message),
        )
        .route(
            "/rooms/{room}/messages/{target}",
            axum::routing::patch(|s, p, q, h, b| http::post_change("edit", s, p, q, h, b))
                .delete(|s, p, q, h, b| http::post_change("delete", s, p, q, h, b)),
        )
        .route(
            "/rooms/{room}/messages/{target}/reactions",
            axum::routing::post(|s, p, q, h, b| http::post_change("react", s, p, q, h, b)),
        )
        .route("/rooms/{room}/presence", get(http::presence))
        .route(
            "/rooms/{room}/reads",
            get(http::reads).post(http::post_read),
        )
        .route("/me/rooms", get(http::my_rooms))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

impl AppState {
    fn new(gateway: Gateway, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(AppState {
            dedup: dedup::Dedup::new(gateway.config.dedup_capacity),
            guard: limits::Guard::new(gateway.config.limits.clone()),
            gw: gateway,
            shutdown,
            connections: TaskTracker::new(),
        })
    }
}

/// The gateway's routes as a `Router`, for driving it in-process (the fuzz
/// targets send it requests without a socket). Its WebSocket connections
/// are not drained at shutdown: [`serve`] does that.
pub fn app(gateway: Gateway, shutdown: CancellationToken) -> Router {
    router(AppState::new(gateway, shutdown))
}

/// Serves the gateway on `listener` until `shutdown` is cancelled, then
/// drains: stops accepting, lets connections finish their appends and close
/// with 1001, and returns once they are gone or `drain_timeout` passed.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if gateway.store.is_none() {
        tracing::info!("no history store on this node: history requests answer unavailable");
    }
    let drain_timeout = gateway.config.drain_timeout;
    let refresher = gateway.auth.jwks().map(|jwks| {
        tokio::spawn(
            jwks.clone()
                .refresh_every(gateway.config.jwks_refresh, shutdown.clone()),
        )
    });
    let state = AppState::new(gateway, shutdown.clone());
    let app = router(state.clone());
    // Frames are small and written one by one: without TCP_NODELAY a frame
    // written while the previous one is unacknowledged waits for the
    // client's delayed ACK (40 ms on Linux), which showed as a 40 ms p99.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // The peer's address, for the connections-per-address limit.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    state.connections.close();
    if tokio::time::timeout(drain_timeout, state.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not drain in time");
    }
    if let Some(refresher) = refresher {
        if let Err(e) = refresher.await {
            tracing::error!(error = %e, "the JWKS refresh task failed");
        }
    }
    Ok(())
}
