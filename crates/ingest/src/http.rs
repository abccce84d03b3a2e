//! HTTP endpoints: history paging, posting a message, health, metrics, and
//! the web page.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use schemas::protocol::{
    check_body, check_id, dm_members, valid_room, ErrorCode, FrameError, MessageView,
};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{access, AuthError, Identity};
use crate::dedup::{self, Claim};
use crate::{now_ms, AppState, PendingSend, What};

const INDEX: &str = include_str!("web/index.html");
/// Largest history page.
const MAX_LIMIT: usize = 1000;

pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX)
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadRoom => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::NotJoined => StatusCode::FORBIDDEN,
        ErrorCode::RateLimited | ErrorCode::LimitReached => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        // Never the answer to a request; a store that cannot read a row
        // it holds cannot serve the page.
        ErrorCode::Unreadable => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An `error` object with the status its code calls for; a `rate_limited`
/// one with `Retry-After` (whole seconds, rounded up) too.
pub(crate) fn error_response(e: &FrameError) -> Response {
    let mut response = (
        status_of(e.code),
        Json(serde_json::to_value(e.to_frame()).unwrap_or_default()),
    )
        .into_response();
    if let Some(ms) = e.retry_after_ms {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(ms.div_ceil(1000)),
        );
    }
    response
}

/// The 401 answer to a request that did not identify its user.
pub(crate) fn unauthorized(e: &AuthError) -> Response {
    let mut response = error_response(&e.to_frame_error());
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

fn bad_room() -> FrameError {
    FrameError::new(ErrorCode::BadRoom, schemas::protocol::ROOM_RULE, None)
}

/// `GET /auth`: how this gateway identifies users, for the web page:
/// `{"mode":"dev"}` or `{"mode":"token"}`. With tokens and an
/// `Authorization: Bearer` header, the token is checked: `{"mode":"token",
/// "user":…}`, or the 401 a refused token gets everywhere else.
pub(crate) async fn auth_mode(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if state.gw.auth.is_dev() {
        return Json(json!({ "mode": "dev" })).into_response();
    }
    if !headers.contains_key(header::AUTHORIZATION) {
        return Json(json!({ "mode": "token" })).into_response();
    }
    match state.gw.auth.identify_http(&HashMap::new(), &headers).await {
        Ok(identity) => Json(json!({ "mode": "token", "user": identity.user })).into_response(),
        Err(e) => unauthorized(&e),
    }
}

#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    limit: Option<usize>,
    before: Option<u64>,
    /// The room as it stood at this moment: a log offset, or an RFC 3339
    /// time.
    as_of: Option<String>,
}

/// Reads an `as_of`: digits are a log offset, anything else an RFC 3339
/// time.
fn parse_as_of(text: &str) -> Result<history::AsOf, FrameError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(offset) = text.parse() {
            return Ok(history::AsOf::Offset(offset));
        }
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok())
        .map(history::AsOf::Time)
        .ok_or_else(|| {
            FrameError::new(
                ErrorCode::BadFrame,
                "as_of is a log offset (0 or more) or an RFC 3339 time, like 2026-12-06T19:30:00Z",
                None,
            )
        })
}

/// Most records of deleted bodies one `as_of` page reads back from the log
/// at once.
const LOG_BODIES_AT_ONCE: usize = 8;

/// How long reading a deleted body back from the log may take.
const LOG_BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The body held by the record at `offset` of `partition`: a message's, or
/// an edit's.
async fn body_on_log(
    log: &dyn eventlog::EventLog,
    partition: u32,
    offset: u64,
) -> Result<String, String> {
    let mut records = log.read(partition, offset);
    let read = async {
        loop {
            let batch = match records.next().await {
                Some(Ok(batch)) => batch,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the log ended".to_owned()),
            };
            if let Some(record) = batch.iter().find(|r| r.offset >= offset) {
                if record.offset != offset {
                    return Err(format!("the log has no record at offset {offset}"));
                }
                return match schemas::decode(&record.value) {
                    Ok(schemas::ChatEvent::MessagePosted(m)) => Ok(m.body),
                    Ok(schemas::ChatEvent::MessageChanged(schemas::MessageChanged {
                        change: schemas::Change::Edit { body },
                        ..
                    })) => Ok(body),
                    Ok(_) => Err(format!("the record at offset {offset} holds no body")),
                    Err(e) => Err(e.to_string()),
                };
            }
        }
    };
    tokio::time::timeout(LOG_BODY_WITHIN, read)
        .await
        .unwrap_or_else(|_| Err("the log did not answer in time".to_owned()))
}

/// A page of `room` as it stood at `at`, bodies deleted since read back
/// from the log (where they stay).
async fn page_as_of(
    state: &AppState,
    store: &dyn history::HistoryStore,
    room: &str,
    before: Option<u64>,
    limit: usize,
    at: history::AsOf,
) -> Result<Vec<MessageView>, String> {
    let page = timed("as_of", store.page_as_of(room, before, limit, at))
        .await
        .map_err(|e| e.to_string())?;
    let partition = state.gw.log.partition_for(room.as_bytes());
    let log = &*state.gw.log;
    futures::stream::iter(page)
        .map(|past| async move {
            let mut message = past.message;
            if let Some(offset) = past.body_on_log {
                message.body = body_on_log(log, partition, offset).await?;
            }
            Ok::<_, String>(message)
        })
        .buffered(LOG_BODIES_AT_ONCE)
        .try_collect()
        .await
}

/// Whether the request may read `room` (its history, its presence): a
/// valid room name, and a user who may use it. With tokens the request
/// must carry one; in dev mode public rooms are open to all, and a
/// direct-message room needs a user that is one of its two. The refusal
/// is the answer to send.
async fn may_read(
    state: &AppState,
    room: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), Response> {
    if !valid_room(room) {
        return Err(error_response(&bad_room()));
    }
    let identity = match state.gw.auth.identify_http(params, headers).await {
        Ok(identity) => Some(identity),
        Err(AuthError::NoDevUser) if dm_members(room).is_none() => None,
        Err(e) => return Err(unauthorized(&e)),
    };
    if identity.as_ref().is_some_and(|i| !i.may_use(room)) {
        return Err(forbidden(room, None));
    }
    Ok(())
}

/// `GET /rooms/{room}/messages`: the newest `limit` messages before
/// `before`, oldest first; `before` in the answer is the cursor of the next
/// older page, or null when there is none.
///
/// With tokens, the request must carry one that may use the room. In dev
/// mode public rooms are open to all; a direct-message room needs `?user=`
/// (or `X-User`) naming one of its two users.
pub(crate) async fn history(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = may_read(&state, &room, &params, &headers).await {
        return refused;
    }
    let Ok(Query(query)) = query else {
        return error_response(&FrameError::new(
            ErrorCode::BadFrame,
            "limit and before are non-negative integers; as_of an offset or an RFC 3339 time",
            None,
        ));
    };
    let Some(store) = &state.gw.store else {
        return error_response(&FrameError::new(
            ErrorCode::Unavailable,
            "this node keeps no history",
            None,
        ));
    };
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    if let Some(as_of) = &query.as_of {
        let at = match parse_as_of(as_of) {
            Ok(at) => at,
            Err(e) => return error_response(&e),
        };
        return match page_as_of(&state, &**store, &room, query.before, limit + 1, at).await {
            Ok(mut messages) => {
                let more = messages.len() > limit;
                if more {
                    messages.remove(0);
                }
                let before = more.then(|| messages[0].offset);
                Json(
                    json!({ "room": room, "messages": messages, "before": before, "as_of": as_of }),
                )
                .into_response()
            }
            Err(e) => {
                tracing::warn!(error = %e, "history read as of a moment failed");
                error_response(&FrameError::new(
                    ErrorCode::Unavailable,
                    "the history as of that moment cannot be read now",
                    None,
                ))
            }
        };
    }
    // One more than asked tells whether an older page exists.
    match timed("page", store.page(&room, query.before, limit + 1)).await {
        Ok(mut messages) => {
            let more = messages.len() > limit;
            if more {
                messages.remove(0);
            }
            let before = more.then(|| messages[0].offset);
            Json(json!({ "room": room, "messages": messages, "before": before })).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "history read failed");
            error_response(&FrameError::new(
                ErrorCode::Unavailable,
                "history store unavailable",
                None,
            ))
        }
    }
}

/// `GET /rooms/{room}/presence`: `{"room":R,"users":[…]}`, the users
/// present in the room on every node this one hears from (and `more` when
/// the list was cut at its bound). Access as for history.
pub(crate) async fn presence(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = may_read(&state, &room, &params, &headers).await {
        return refused;
    }
    let Some(presence) = &state.gw.presence else {
        return error_response(&FrameError::new(
            ErrorCode::Unavailable,
            "this node keeps no presence",
            None,
        ));
    };
    let (users, more) = presence.users(&room);
    let mut answer = json!({ "room": room, "users": users });
    if more > 0 {
        answer["more"] = json!(more);
    }
    Json(answer).into_response()
}

/// Awaits `read`, a history store read, timed in
/// `ingest_store_read_seconds{op}`.
pub(crate) async fn timed<T>(op: &'static str, read: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let answer = read.await;
    ::metrics::histogram!(crate::metrics::STORE_READ_SECONDS, "op" => op)
        .record(started.elapsed().as_secs_f64());
    answer
}

/// The `unavailable` answer of a node without a history store.
fn no_history() -> Response {
    error_response(&FrameError::new(
        ErrorCode::Unavailable,
        "this node keeps no history",
        None,
    ))
}

/// The `unavailable` answer to a store that failed.
fn store_failed(e: &history::StoreError) -> Response {
    tracing::warn!(error = %e, "history read failed");
    error_response(&FrameError::new(
        ErrorCode::Unavailable,
        "history store unavailable",
        None,
    ))
}

/// `GET /rooms/{room}/reads`: `{"room":R,"shared":B,"reads":[{"user":U,
/// "offset":N}, …]}`, the read positions of the room's users, sorted by
/// user, where the room shares them (`shared: true`); elsewhere only the
/// asking user's own. The request must name its user (a token, or `?user=`
/// in dev mode) and may use the room.
pub(crate) async fn reads(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let identity = match user_of(&state, &room, &params, &headers).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    let Some(store) = &state.gw.store else {
        return no_history();
    };
    let shared = state.gw.config.shared_reads.covers(&room);
    let found = if shared {
        store.reads(&room).await
    } else {
        store.read_position(&room, &identity.user).await.map(|own| {
            own.map(|o| (identity.user.clone(), o))
                .into_iter()
                .collect()
        })
    };
    match found {
        Ok(found) => {
            let reads: Vec<_> = found
                .into_iter()
                .map(|(user, offset)| json!({ "user": user, "offset": offset }))
                .collect();
            Json(json!({ "room": room, "shared": shared, "reads": reads })).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

#[derive(Deserialize)]
pub(crate) struct ReadBody {
    offset: i64,
}

/// `POST /rooms/{room}/reads` with `{"offset":N}`: the same as a `read`
/// frame; answered `{"type":"read","room":R,"user":U,"offset":N}` once the
/// position is in the log.
pub(crate) async fn post_read(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Json<ReadBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let identity = match user_of(&state, &room, &params, &headers).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    let offset = match body {
        Ok(Json(ReadBody { offset })) if offset >= 0 => offset,
        _ => {
            return error_response(&FrameError::new(
                ErrorCode::BadFrame,
                "the body is a json object {offset}, offset an integer, 0 or more",
                None,
            ))
        }
    };
    if let Err(e) = state.refuse_read(&room) {
        return error_response(&e);
    }
    if let Err(e) = state.guard.take_send(None, &identity.user, None) {
        ::metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::RateLimited.as_str())
            .increment(1);
        return error_response(&e);
    }
    match state.append_read(&room, &identity.user, offset).await {
        Ok(()) => Json(json!({
            "type": "read", "room": room, "user": identity.user, "offset": offset
        }))
        .into_response(),
        Err(e) => error_response(&e),
    }
}

/// The user of a request for `room`, which must name one (a token, or
/// `?user=` in dev mode) who may use the room.
async fn user_of(
    state: &AppState,
    room: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Identity, Response> {
    if !valid_room(room) {
        return Err(error_response(&bad_room()));
    }
    let identity = state
        .gw
        .auth
        .identify_http(params, headers)
        .await
        .map_err(|e| unauthorized(&e))?;
    if !identity.may_use(room) {
        return Err(forbidden(room, None));
    }
    Ok(identity)
}

/// Rooms of one `GET /me/rooms` asked of the store at once.
const ROOMS_AT_ONCE: usize = 8;

/// `GET /me/rooms`: `{"rooms":[{"room":R,"last_offset":N,"last_ts":T,
/// "read_offset":M,"unread":K}, …]}` for the rooms listed for the user
/// (sent to, marked read, or a direct message of theirs someone sent to)
/// that the user may still use, the most recently active first.
/// `read_offset` is null before the first read, `last_offset` and
/// `last_ts` null in a room without messages; `unread` counts the messages
/// after the read position up to 1000, with `"unread_more":true` when
/// there are more.
pub(crate) async fn my_rooms(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let identity = match state.gw.auth.identify_http(&params, &headers).await {
        Ok(identity) => identity,
        Err(e) => return unauthorized(&e),
    };
    let Some(store) = &state.gw.store else {
        return no_history();
    };
    let started = std::time::Instant::now();
    let rooms = match store.user_rooms(&identity.user).await {
        Ok(rooms) => rooms,
        Err(e) => return store_failed(&e),
    };
    let rooms: Vec<String> = rooms.into_iter().filter(|r| identity.may_use(r)).collect();
    let user = identity.user.as_str();
    let summaries: Result<Vec<_>, history::StoreError> = futures::stream::iter(rooms)
        .map(|room| async move {
            let last = store.page(&room, None, 1).await?.pop();
            let read = store.read_position(&room, user).await?;
            let unread = store
                .count_after(&room, read, history::UNREAD_CAP + 1)
                .await?;
            Ok((room, last, read, unread))
        })
        .buffered(ROOMS_AT_ONCE)
        .try_collect()
        .await;
    ::metrics::histogram!(crate::metrics::STORE_READ_SECONDS, "op" => "rooms")
        .record(started.elapsed().as_secs_f64());
    let mut summaries = match summaries {
        Ok(summaries) => summaries,
        Err(e) => return store_failed(&e),
    };
    summaries.sort_by(|a, b| {
        let ts =
            |s: &(String, Option<schemas::protocol::MessageView>, _, _)| s.1.as_ref().map(|m| m.ts);
        ts(b).cmp(&ts(a)).then_with(|| a.0.cmp(&b.0))
    });
    let rooms: Vec<_> = summaries
        .into_iter()
        .map(|(room, last, read, unread)| {
            let mut entry = json!({
                "room": room,
                "last_offset": last.as_ref().map(|m| m.offset),
                "last_ts": last.as_ref().map(|m| m.ts),
                "read_offset": read,
                "unread": unread.min(history::UNREAD_CAP),
            });
            if unread > history::UNREAD_CAP {
                entry["unread_more"] = json!(true);
            }
            entry
        })
        .collect();
    Json(json!({ "rooms": rooms })).into_response()
}

#[derive(Deserialize)]
pub(crate) struct PostBody {
    id: Option<String>,
    body: Option<String>,
}

/// The `forbidden` answer (403) to a request for `room`.
fn forbidden(room: &str, id: Option<String>) -> Response {
    ::metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::Forbidden.as_str())
        .increment(1);
    error_response(&access::forbidden(room, id))
}

/// The `id` of a request that appends to `room`, checked with the room
/// name, or why it is refused.
fn checked_id(id: Option<String>, room: &str) -> Result<String, Box<FrameError>> {
    let Some(id) = id else {
        return Err(Box::new(FrameError::new(
            ErrorCode::BadFrame,
            "missing id",
            None,
        )));
    };
    check_id(&id)?;
    if !valid_room(room) {
        return Err(Box::new(FrameError {
            id: Some(id),
            ..bad_room()
        }));
    }
    Ok(id)
}

/// The `too_large` answer (413) to a request body over the limit.
fn body_too_large(state: &AppState) -> Response {
    error_response(&FrameError::new(
        ErrorCode::TooLarge,
        format!(
            "the request body is over {} bytes",
            state.guard.limits.max_body_bytes
        ),
        None,
    ))
}

/// `POST /rooms/{room}/messages`: the same as a `send`.
pub(crate) async fn post_message(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Json<PostBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let arrived = std::time::Instant::now();
    let identity: Identity = match state.gw.auth.identify_http(&query, &headers).await {
        Ok(identity) => identity,
        Err(e) => return unauthorized(&e),
    };
    let body = match body {
        Ok(Json(body)) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return body_too_large(&state);
        }
        Err(_) => {
            return error_response(&FrameError::new(
                ErrorCode::BadFrame,
                "the body is a json object {id, body}",
                None,
            ))
        }
    };
    let id = match checked_id(body.id, &room) {
        Ok(id) => id,
        Err(refused) => return error_response(&refused),
    };
    let Some(text) = body.body else {
        return error_response(&FrameError::new(
            ErrorCode::BadFrame,
            "missing body",
            Some(id),
        ));
    };
    if let Err(e) = check_body(&text, Some(&id)) {
        return error_response(&e);
    }
    if !identity.may_use(&room) {
        return forbidden(&room, Some(id));
    }
    if let Err(e) = state.guard.take_send(None, &identity.user, Some(&id)) {
        ::metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::RateLimited.as_str())
            .increment(1);
        return error_response(&e);
    }
    append_one(
        &state,
        room,
        id,
        identity.user,
        What::Message(text),
        arrived,
    )
    .await
}

/// Appends one message or change like a `send` (idempotent by `id`) and
/// answers its `ack` object, or its error.
async fn append_one(
    state: &Arc<AppState>,
    room: String,
    id: String,
    user: String,
    what: What,
    arrived: std::time::Instant,
) -> Response {
    let outcome = match state.dedup.claim(&room, &id, &user) {
        Err(e) => Err(e),
        Ok(Claim::Done(ack)) => Ok(ack),
        Ok(Claim::Pending(rx)) => dedup::wait(rx, &id, state.gw.config.send_timeout).await,
        Ok(Claim::New) => {
            let send = PendingSend {
                room: room.clone(),
                id: id.clone(),
                user,
                what,
                ts: now_ms(),
                arrived: std::time::Instant::now(),
            };
            // A client that gives up (the request is dropped) does not
            // cancel the append: it runs on a task of its own.
            state.append_within(&Arc::new(vec![send])).await.remove(0)
        }
    };
    match outcome {
        Ok(ack) => {
            ::metrics::histogram!(crate::metrics::ACK_SECONDS)
                .record(arrived.elapsed().as_secs_f64());
            Json(json!({
                "type": "ack", "id": id, "room": room, "offset": ack.offset, "ts": ack.ts
            }))
            .into_response()
        }
        Err(e) => error_response(&e),
    }
}

/// An `edit`, `delete` or `react` (`kind`) over HTTP: validated as the
/// frame is, then appended like a post. `PATCH /rooms/{room}/messages/{target}`
/// with `{"id","body"}` edits, `DELETE` of it with `{"id"}` (or `?id=`)
/// deletes, `POST /rooms/{room}/messages/{target}/reactions` with
/// `{"id","emoji","remove"}` reacts.
pub(crate) async fn post_change(
    kind: &str,
    State(state): State<Arc<AppState>>,
    Path((room, target)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let arrived = std::time::Instant::now();
    let identity: Identity = match state.gw.auth.identify_http(&query, &headers).await {
        Ok(identity) => identity,
        Err(e) => return unauthorized(&e),
    };
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return body_too_large(&state);
        }
        Err(_) => {
            return error_response(&FrameError::new(
                ErrorCode::BadFrame,
                "the request body could not be read",
                None,
            ))
        }
    };
    let fields = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => {
                return error_response(&FrameError::new(
                    ErrorCode::BadFrame,
                    "the body is a json object",
                    None,
                ))
            }
        }
    };
    let id = fields
        .get("id")
        .and_then(serde_json::Value::as_str)
        .or_else(|| query.get("id").map(String::as_str));
    let id = match checked_id(id.map(str::to_owned), &room) {
        Ok(id) => id,
        Err(refused) => return error_response(&refused),
    };
    let target = serde_json::Value::from(target.parse::<i64>().ok());
    let target = match schemas::protocol::parse_target(Some(&target), &id) {
        Ok(target) => target,
        Err(e) => return error_response(&e),
    };
    let change = match schemas::protocol::parse_change(kind, &fields, &id) {
        Ok(change) => change,
        Err(e) => return error_response(&e),
    };
    if !identity.may_use(&room) {
        return forbidden(&room, Some(id));
    }
    if let Err(e) = state.refuse_change(&id) {
        return error_response(&e);
    }
    if let Err(e) = state.guard.take_send(None, &identity.user, Some(&id)) {
        ::metrics::counter!(crate::metrics::BAD_FRAMES_TOTAL, "code" => ErrorCode::RateLimited.as_str())
            .increment(1);
        return error_response(&e);
    }
    let what = What::Change { target, change };
    append_one(&state, room, id, identity.user, what, arrived).await
}

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the log answers and, on a node with history, the store does.
/// How long `/readyz` waits for each thing it asks: a probe must get an
/// answer, and one that waits on dead brokers is no answer.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET /readyz`: `ready` when every partition of the log can be read (on
/// Kafka: each has a leader), on a node with a history store the store
/// answers, and on a node that projects no partition it projects is more
/// than `ready_max_lag` records behind; else 503 with what is not (`log: …`,
/// `store: …`, `projector: …`), each question bounded by [`READY_WITHIN`].
/// The partition, of `partitions`, whose history is furthest behind the
/// log, and by how many records.
async fn projector_lag(
    state: &AppState,
    store: &dyn history::HistoryStore,
    partitions: Vec<u32>,
) -> Result<Option<(u32, u64)>, String> {
    let mut worst: Option<(u32, u64)> = None;
    for partition in partitions {
        let end = state
            .gw
            .log
            .end_offset(partition)
            .await
            .map_err(|e| e.to_string())?;
        let at = store.position(partition).await.map_err(|e| e.to_string())?;
        let lag = end.saturating_sub(at.unwrap_or(0));
        if worst.is_none_or(|(_, most)| lag > most) {
            worst = Some((partition, lag));
        }
    }
    Ok(worst)
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let not_ready = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    let within = |what: &str| format!("{what}: no answer within {} s", READY_WITHIN.as_secs());
    match tokio::time::timeout(READY_WITHIN, state.gw.log.readable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return not_ready(format!("log: {e}")),
        Err(_) => return not_ready(within("log")),
    }
    if let Some(store) = &state.gw.store {
        match tokio::time::timeout(READY_WITHIN, store.position(0)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return not_ready(format!("store: {e}")),
            Err(_) => return not_ready(within("store")),
        }
        if let Some(projected) = &state.gw.projected {
            let bound = state.gw.config.ready_max_lag;
            let behind = projector_lag(&state, &**store, projected());
            match tokio::time::timeout(READY_WITHIN, behind).await {
                Ok(Ok(Some((partition, lag)))) if lag > bound => {
                    return not_ready(format!(
                        "projector: partition {partition} is {lag} records behind the log (bound {bound})"
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return not_ready(format!("projector: {e}")),
                Err(_) => return not_ready(within("projector")),
            }
        }
    }
    "ready".into_response()
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.gw.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    //! The HTTP send over the embedded log, with its appends held at a gate
    //! so a test can give up on a request while its append is in flight.

    use std::time::Duration;

    use async_trait::async_trait;
    use eventlog::embedded::EmbeddedLog;
    use eventlog::{Appended, EventLog, LogError, Record, RecordStream};
    use tokio::sync::{Notify, Semaphore};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::{dedup, Gateway, GatewayConfig};

    const WAIT: Duration = Duration::from_secs(10);

    /// The embedded log, whose appends each wait for a permit.
    struct Gated {
        inner: EmbeddedLog,
        entered: Notify,
        open: Semaphore,
    }

    #[async_trait]
    impl EventLog for Gated {
        fn partitions(&self) -> u32 {
            self.inner.partitions()
        }
        fn epoch(&self) -> &str {
            self.inner.epoch()
        }
        async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
            self.entered.notify_one();
            self.open
                .acquire()
                .await
                .expect("the gate stays open")
                .forget();
            self.inner.append(records).await
        }
        async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
            self.inner.end_offset(partition).await
        }
        async fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
            self.inner.start_offset(partition).await
        }
        fn read(&self, partition: u32, from: u64) -> RecordStream {
            self.inner.read(partition, from)
        }
        async fn load_position(
            &self,
            group: &str,
            partition: u32,
        ) -> Result<Option<u64>, LogError> {
            self.inner.load_position(group, partition).await
        }
        async fn store_position(
            &self,
            group: &str,
            partition: u32,
            next: u64,
        ) -> Result<(), LogError> {
            self.inner.store_position(group, partition, next).await
        }
    }

    fn post(
        state: &Arc<AppState>,
        id: &str,
    ) -> impl std::future::Future<Output = Response> + Send + 'static {
        post_message(
            State(state.clone()),
            Path("general".to_owned()),
            Query(HashMap::from([("user".to_owned(), "alice".to_owned())])),
            HeaderMap::new(),
            Ok(Json(PostBody {
                id: Some(id.to_owned()),
                body: Some("hi".to_owned()),
            })),
        )
    }

    /// A gateway over a [`Gated`] embedded log in `dir`.
    fn gated(dir: &std::path::Path, send_timeout: Duration) -> (Arc<Gated>, Arc<AppState>) {
        let log = Arc::new(Gated {
            inner: EmbeddedLog::open(dir, "chat.messages", 1).unwrap(),
            entered: Notify::new(),
            open: Semaphore::new(0),
        });
        let state = Arc::new(AppState {
            dedup: dedup::Dedup::new(16),
            guard: crate::limits::Guard::new(crate::limits::Limits::default()),
            gw: Gateway {
                log: log.clone(),
                auth: crate::auth::Auth::Dev,
                fanout: None,
                presence: None,
                store: None,
                projected: None,
                metrics: None,
                config: GatewayConfig {
                    send_timeout,
                    ..GatewayConfig::default()
                },
            },
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        });
        (log, state)
    }

    async fn json_of(response: Response) -> (StatusCode, serde_json::Value) {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// A client that gives up on a POST while its append is in flight
    /// does not cancel the append: a retry with the same id is answered
    /// with that append's ack (it used to wait forever), and the log holds
    /// the message once.
    #[tokio::test]
    async fn a_post_abandoned_mid_append_is_finished_and_its_retry_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (log, state) = gated(dir.path(), GatewayConfig::default().send_timeout);
        let first = tokio::spawn(post(&state, "m1"));
        tokio::time::timeout(WAIT, log.entered.notified())
            .await
            .expect("the first attempt reaches the log");
        first.abort();
        assert!(
            first.await.unwrap_err().is_cancelled(),
            "the client gave up"
        );
        log.open.add_permits(1);
        let retry = tokio::time::timeout(WAIT, post(&state, "m1"))
            .await
            .expect("the retry is answered");
        let (status, ack) = json_of(retry).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (ack["type"].as_str(), ack["offset"].as_i64()),
            (Some("ack"), Some(0))
        );
        assert_eq!(log.end_offset(0).await.unwrap(), 1, "appended once");
        state.connections.close();
        tokio::time::timeout(WAIT, state.connections.wait())
            .await
            .expect("the append task is done");
    }

    /// Posts `id` until it is acked: a slow disk may outlast the short send
    /// timeout of a test, which answers `pending`, never anything else.
    async fn retried_until_acked(state: &Arc<AppState>, id: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, answer) = json_of(post(state, id).await).await;
            if status == StatusCode::OK {
                return answer;
            }
            assert_eq!(answer["pending"], true, "{answer}");
            assert!(tokio::time::Instant::now() < deadline, "never acked");
        }
    }

    /// A send the log does not answer within the send timeout is answered
    /// `unavailable` with `pending` (it may yet be appended), and so is a
    /// retry while the log still says nothing; once the log answers, a
    /// retry gets the first attempt's ack, and the log holds it once.
    #[tokio::test]
    async fn a_send_the_log_does_not_answer_in_time_is_pending_and_its_retry_gets_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let (log, state) = gated(dir.path(), Duration::from_millis(100));
        let (status, first) = json_of(post(&state, "m1").await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            (
                first["code"].as_str(),
                first["id"].as_str(),
                &first["pending"]
            ),
            (Some("unavailable"), Some("m1"), &serde_json::json!(true)),
            "{first}"
        );
        let (_, retry) = json_of(post(&state, "m1").await).await;
        assert_eq!(retry["pending"], true, "still unknown: {retry}");
        log.open.add_permits(1);
        let ack = retried_until_acked(&state, "m1").await;
        assert_eq!(
            (ack["type"].as_str(), ack["offset"].as_i64()),
            (Some("ack"), Some(0))
        );
        assert_eq!(log.end_offset(0).await.unwrap(), 1, "appended once");
        // A fresh id is not held up by the first: the log answers it.
        log.open.add_permits(1);
        let next = retried_until_acked(&state, "m2").await;
        assert_eq!(next["offset"].as_i64(), Some(1));
        state.connections.close();
        tokio::time::timeout(WAIT, state.connections.wait())
            .await
            .expect("the append tasks are done");
    }
}
