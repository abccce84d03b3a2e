//! HTTP endpoints: history paging, posting a message, health, metrics, and
//! the web page.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use schemas::protocol::{check_body, check_id, valid_room, ErrorCode, FrameError};
use serde::Deserialize;
use serde_json::json;

use crate::dedup::{self, Claim};
use crate::{now_ms, AppState, PendingSend};

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
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// An `error` object with the status its code calls for.
fn error_response(e: &FrameError) -> Response {
    (
        status_of(e.code),
        Json(serde_json::to_value(e.to_frame()).unwrap_or_default()),
    )
        .into_response()
}

fn bad_room() -> FrameError {
    FrameError::new(
        ErrorCode::BadRoom,
        "room names match ^[A-Za-z0-9_.-]{1,64}$",
        None,
    )
}

#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

/// `GET /rooms/{room}/messages`: the newest `limit` messages before
/// `before`, oldest first; `before` in the answer is the cursor of the next
/// older page, or null when there is none.
pub(crate) async fn history(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !valid_room(&room) {
        return error_response(&bad_room());
    }
    let Ok(Query(query)) = query else {
        return error_response(&FrameError::new(
            ErrorCode::BadFrame,
            "limit and before are non-negative integers",
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
    // One more than asked tells whether an older page exists.
    match store.page(&room, query.before, limit + 1).await {
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

#[derive(Deserialize)]
pub(crate) struct PostBody {
    id: Option<String>,
    body: Option<String>,
}

/// The user of an HTTP request in open dev mode: `?user=` or `X-User`.
pub(crate) fn dev_user(query: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    let user = query
        .get("user")
        .cloned()
        .or_else(|| headers.get("x-user")?.to_str().ok().map(str::to_owned))?;
    crate::ws::valid_user(&user).then_some(user)
}

/// `POST /rooms/{room}/messages`: the same as a `send`.
pub(crate) async fn post_message(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Json<PostBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(user) = dev_user(&query, &headers) else {
        return error_response(&FrameError::new(
            ErrorCode::Unauthorized,
            "name the user with ?user= or X-User",
            None,
        ));
    };
    let Ok(Json(body)) = body else {
        return error_response(&FrameError::new(
            ErrorCode::BadFrame,
            "the body is a json object {id, body}",
            None,
        ));
    };
    let Some(id) = body.id else {
        return error_response(&FrameError::new(ErrorCode::BadFrame, "missing id", None));
    };
    if let Err(e) = check_id(&id) {
        return error_response(&e);
    }
    if !valid_room(&room) {
        return error_response(&FrameError {
            id: Some(id),
            ..bad_room()
        });
    }
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
    let outcome = match state.dedup.claim(&room, &id, &user) {
        Err(e) => Err(e),
        Ok(Claim::Done(ack)) => Ok(ack),
        Ok(Claim::Pending(rx)) => dedup::wait(rx, &id).await,
        Ok(Claim::New) => {
            let send = PendingSend {
                room: room.clone(),
                id: id.clone(),
                user,
                body: text,
                ts: now_ms(),
            };
            state.append(std::slice::from_ref(&send)).await.remove(0)
        }
    };
    match outcome {
        Ok(ack) => Json(json!({
            "type": "ack", "id": id, "room": room, "offset": ack.offset, "ts": ack.ts
        }))
        .into_response(),
        Err(e) => error_response(&e),
    }
}

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the log answers and, on a node with history, the store does.
pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Err(e) = state.gw.log.end_offset(0).await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("log: {e}")).into_response();
    }
    if let Some(store) = &state.gw.store {
        if let Err(e) = store.position(0).await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")).into_response();
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
