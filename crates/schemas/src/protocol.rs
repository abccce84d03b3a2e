//! Client protocol v1 frames (docs/protocol.md): parsing and validation of
//! what a client sends, the frames a gateway answers with, and the error and
//! close codes it uses.
//!
//! Parsing never fails the connection: every problem becomes a [`FrameError`]
//! carrying the protocol error code and, when the frame had one, the request
//! `id`, so the gateway can answer that request alone and keep going.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message body, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest room name.
pub const MAX_ROOM_LEN: usize = 64;
/// Longest client message id.
pub const MAX_ID_LEN: usize = 128;
/// Longest reaction, in bytes of UTF-8 (an emoji with modifiers and joiners
/// fits; a sentence does not).
pub const MAX_EMOJI_BYTES: usize = 32;
/// Most distinct reactions one message takes; a new one past it is
/// refused with `limit_reached`.
pub const MAX_REACTIONS_PER_MESSAGE: usize = 32;
/// Most users a history page names per reaction; `count` is always exact.
pub const MAX_REACTION_USERS_LISTED: usize = 100;

/// A log position: an offset in the room's partition and the log's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Offset of the last message covered; -1 before the first one.
    pub offset: i64,
    pub epoch: String,
}

/// A validated frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Join {
        room: String,
        since: Option<Position>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        id: String,
        body: String,
    },
    Typing {
        room: String,
    },
    /// Extension: who is in the room, across nodes.
    Presence {
        room: String,
    },
    /// Extension: the user has read the room up to `offset`, inclusive.
    Read {
        room: String,
        offset: i64,
    },
    /// Extension: an `edit`, `delete` or `react` of the message at offset
    /// `target`; acked like a send, idempotent by `id`.
    Change {
        room: String,
        id: String,
        target: i64,
        change: crate::event::Change,
    },
}

/// The error codes of the client protocol (docs/protocol.md, Error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    TooLarge,
    BadRoom,
    Unauthorized,
    Forbidden,
    RateLimited,
    Unavailable,
    NotJoined,
    /// Extension: a limit that waiting does not lift (connections per
    /// address or user, rooms per connection).
    LimitReached,
    /// Extension, not an answer to a request: a message of the room in the
    /// log that this server cannot read (a record it cannot decode, as one
    /// of a newer schema during a rolling upgrade), so it was not shown.
    /// The frame names the `room` and the `offset`; reload the history.
    Unreadable,
    /// Extension: the request names a message that is not in the room (an
    /// `edit`, `delete` or `react` whose `target` is no message of it).
    NotFound,
}

impl ErrorCode {
    /// Every error code, in declaration order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::BadRoom,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::NotJoined,
        ErrorCode::LimitReached,
        ErrorCode::Unreadable,
        ErrorCode::NotFound,
    ];

    /// The code as it appears in an `error` frame's `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::Unreadable => "unreadable",
            ErrorCode::NotFound => "not_found",
        }
    }
}

/// The WebSocket close codes a gateway sends (docs/protocol.md, Close codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The client closed the connection: the gateway answers the client's
    /// close frame with the same code, normally this one. The gateway never
    /// starts a close with it.
    Normal = 1000,
    /// The server is shutting down: the connection's accepted sends were
    /// appended and acked first. Reconnect, to this node or another one.
    GoingAway = 1001,
    /// The client sent a frame over the size limit; the server stopped
    /// reading it at its header, without buffering it.
    TooLarge = 1009,
    /// The connection's user is not valid (any more): in dev mode it named
    /// no valid user (sent before any `welcome`), or its token expired; sent
    /// right after an `unauthorized` error frame.
    Unauthorized = 4001,
    /// The client sent nothing, not even a pong to the server's pings, for
    /// the idle timeout.
    IdleTimeout = 4002,
    /// The client's outbound queue filled up (a slow consumer); what was
    /// still queued is dropped. Reconnect and join with `since` to resume.
    SlowConsumer = 4008,
}

impl CloseCode {
    /// Every close code, in declaration order.
    pub const ALL: [CloseCode; 6] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::TooLarge,
        CloseCode::Unauthorized,
        CloseCode::IdleTimeout,
        CloseCode::SlowConsumer,
    ];

    /// The numeric code of the close frame.
    pub const fn code(self) -> u16 {
        self as u16
    }
}

/// A rejected request: what to answer, and to which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
    /// How long to wait before trying again (`rate_limited` only).
    pub retry_after_ms: Option<u64>,
    /// The room of a refused request that names no `id` (a `join`).
    pub room: Option<String>,
    /// `unavailable` only: the send was handed to the log but not answered
    /// in time, so it may yet be appended; a retry with the same `id` gets
    /// its outcome.
    pub pending: bool,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            id,
            retry_after_ms: None,
            room: None,
            pending: false,
        }
    }

    /// The `unavailable` answer to a send handed to the log that was not
    /// answered within the send timeout: it may yet be appended, and a
    /// retry with the same `id` is answered with what became of it.
    pub fn pending(id: &str) -> Self {
        FrameError {
            pending: true,
            ..FrameError::new(
                ErrorCode::Unavailable,
                "the log did not answer in time; the message may still be appended: retry with the same id to learn its outcome",
                Some(id.to_owned()),
            )
        }
    }

    /// The same error, naming the room of the request it refuses.
    pub fn in_room(self, room: &str) -> Self {
        FrameError {
            room: Some(room.to_owned()),
            ..self
        }
    }

    /// A `rate_limited` error: try again after `retry_after` (rounded up to
    /// whole milliseconds, at least 1).
    pub fn rate_limited(
        message: impl Into<String>,
        id: Option<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        let ms = retry_after.as_nanos().div_ceil(1_000_000).max(1);
        FrameError {
            retry_after_ms: Some(u64::try_from(ms).unwrap_or(u64::MAX)),
            ..FrameError::new(ErrorCode::RateLimited, message, id)
        }
    }
}

/// What a bad room name is told; the rule [`valid_room`] checks.
pub const ROOM_RULE: &str =
    "room names match ^[A-Za-z0-9_.-]{1,64}$, or dm:A:B for the direct messages of users A and B (sorted)";

/// The prefix of direct-message rooms.
pub const DM_PREFIX: &str = "dm:";

/// True when `room` is a public room name (`^[A-Za-z0-9_.-]{1,64}$`) or a
/// direct-message room ([`dm_members`]).
pub fn valid_room(room: &str) -> bool {
    valid_name(room) || dm_members(room).is_some()
}

/// True when `user` is a valid user name: the public room-name rule,
/// `^[A-Za-z0-9_.-]{1,64}$`. A user name never holds a colon, so the two
/// users of a direct-message room can be told apart.
pub fn valid_user(user: &str) -> bool {
    valid_name(user)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The direct-message room of users `a` and `b`: `dm:A:B` with the two
/// names sorted, whichever of them asks. `None` when a name is invalid or
/// both are the same user.
pub fn dm_room(a: &str, b: &str) -> Option<String> {
    if !valid_user(a) || !valid_user(b) || a == b {
        return None;
    }
    let (first, second) = if a < b { (a, b) } else { (b, a) };
    Some(format!("{DM_PREFIX}{first}:{second}"))
}

/// The two users of a direct-message room `dm:A:B` (A sorted before B, both
/// valid user names, A and B different); `None` for any other name.
pub fn dm_members(room: &str) -> Option<(&str, &str)> {
    let (a, b) = room.strip_prefix(DM_PREFIX)?.split_once(':')?;
    (valid_user(a) && valid_user(b) && a < b).then_some((a, b))
}

/// A set of rooms named by room names and prefix patterns: `team-a.*` is
/// every room whose name starts with `team-a.`, `dm:*` every
/// direct-message room, `*` every room. What a token's `rooms` claim
/// grants, and which rooms share their members' read positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPatterns {
    exact: std::collections::HashSet<String>,
    prefixes: Vec<String>,
}

impl RoomPatterns {
    /// Parses room names and prefix patterns (`PREFIX*`, the prefix made of
    /// room-name characters and `:`); one entry that is neither refuses
    /// them all, naming it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<RoomPatterns, String> {
        let mut patterns = RoomPatterns::default();
        for entry in entries {
            let entry = entry.as_ref();
            if let Some(prefix) = entry.strip_suffix('*') {
                let ok = prefix.len() <= 2 * MAX_ROOM_LEN
                    && prefix.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':')
                    });
                if !ok {
                    return Err(format!("bad room pattern {entry:?}"));
                }
                patterns.prefixes.push(prefix.to_owned());
            } else if valid_room(entry) {
                patterns.exact.insert(entry.to_owned());
            } else {
                return Err(format!("bad room {entry:?}"));
            }
        }
        Ok(patterns)
    }

    /// True when one of the patterns covers `room`.
    pub fn covers(&self, room: &str) -> bool {
        self.exact.contains(room) || self.prefixes.iter().any(|p| room.starts_with(p.as_str()))
    }
}

/// Checks a message body against the protocol limits.
pub fn check_body(body: &str, id: Option<&str>) -> Result<(), FrameError> {
    let id = id.map(str::to_owned);
    if body.is_empty() {
        return Err(FrameError::new(ErrorCode::BadFrame, "empty body", id));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(FrameError::new(
            ErrorCode::TooLarge,
            format!("body is {} bytes, limit is {MAX_BODY_BYTES}", body.len()),
            id,
        ));
    }
    Ok(())
}

/// Checks a reaction: 1 to [`MAX_EMOJI_BYTES`] bytes, no whitespace or
/// control characters.
pub fn check_emoji(emoji: &str, id: Option<&str>) -> Result<(), FrameError> {
    if emoji.is_empty()
        || emoji.len() > MAX_EMOJI_BYTES
        || emoji.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(FrameError::new(
            ErrorCode::BadFrame,
            format!(
                "emoji must be 1 to {MAX_EMOJI_BYTES} bytes without spaces or control characters"
            ),
            id.map(str::to_owned),
        ));
    }
    Ok(())
}

/// The fields of an `edit`, `delete` or `react` besides its room and id,
/// validated: `kind` is the frame's type. Shared by the WebSocket frames
/// and their HTTP equivalents.
pub fn parse_change(
    kind: &str,
    obj: &serde_json::Map<String, Value>,
    id: &str,
) -> Result<crate::event::Change, FrameError> {
    use crate::event::Change;
    let str_field = |name: &str| obj.get(name).and_then(Value::as_str);
    let bad = |message: &str| FrameError::new(ErrorCode::BadFrame, message, Some(id.to_owned()));
    match kind {
        "edit" => {
            let body = str_field("body").ok_or_else(|| bad("edit needs a string body"))?;
            check_body(body, Some(id))?;
            Ok(Change::Edit {
                body: body.to_owned(),
            })
        }
        "delete" => Ok(Change::Delete),
        "react" => {
            let emoji = str_field("emoji").ok_or_else(|| bad("react needs a string emoji"))?;
            check_emoji(emoji, Some(id))?;
            let remove = match obj.get("remove") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(remove)) => *remove,
                Some(_) => return Err(bad("remove must be true or false")),
            };
            let emoji = emoji.to_owned();
            Ok(if remove {
                Change::Unreact { emoji }
            } else {
                Change::React { emoji }
            })
        }
        other => Err(bad(&format!("unknown change {other:?}"))),
    }
}

/// The `target` of an `edit`, `delete` or `react`: a log offset, 0 or more.
pub fn parse_target(value: Option<&Value>, id: &str) -> Result<i64, FrameError> {
    value
        .and_then(Value::as_i64)
        .filter(|&target| target >= 0)
        .ok_or_else(|| {
            FrameError::new(
                ErrorCode::BadFrame,
                "target must be the offset of a message of the room: an integer, 0 or more",
                Some(id.to_owned()),
            )
        })
}

/// Checks a client message id.
pub fn check_id(id: &str) -> Result<(), FrameError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(FrameError::new(
            ErrorCode::BadFrame,
            format!("id must be 1 to {MAX_ID_LEN} printable bytes"),
            None,
        ));
    }
    Ok(())
}

fn check_room(room: Option<&str>, id: Option<&str>) -> Result<String, FrameError> {
    let id = id.map(str::to_owned);
    match room {
        None => Err(FrameError::new(ErrorCode::BadFrame, "missing room", id)),
        Some(r) if !valid_room(r) => Err(FrameError::new(ErrorCode::BadRoom, ROOM_RULE, id)),
        Some(r) => Ok(r.to_owned()),
    }
}

/// Parses and validates one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new(ErrorCode::BadFrame, format!("not json: {e}"), None))?;
    let Value::Object(obj) = value else {
        return Err(FrameError::new(
            ErrorCode::BadFrame,
            "a frame is a json object",
            None,
        ));
    };
    let id = obj.get("id").and_then(Value::as_str);
    let str_field = |name: &str| obj.get(name).and_then(Value::as_str);
    let kind = str_field("type")
        .ok_or_else(|| FrameError::new(ErrorCode::BadFrame, "missing type", id.map(Into::into)))?;
    match kind {
        "join" => {
            let room = check_room(str_field("room"), id)?;
            let since = match obj.get("since") {
                None | Some(Value::Null) => None,
                Some(v) => Some(Position::deserialize(v).map_err(|e| {
                    FrameError::new(
                        ErrorCode::BadFrame,
                        format!("since must be {{offset, epoch}}: {e}"),
                        None,
                    )
                })?),
            };
            if since.as_ref().is_some_and(|s| s.offset < -1) {
                return Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "since.offset must be -1 (before the first message) or more",
                    None,
                ));
            }
            Ok(ClientFrame::Join { room, since })
        }
        "leave" => Ok(ClientFrame::Leave {
            room: check_room(str_field("room"), id)?,
        }),
        "typing" => Ok(ClientFrame::Typing {
            room: check_room(str_field("room"), id)?,
        }),
        "presence" => Ok(ClientFrame::Presence {
            room: check_room(str_field("room"), id)?,
        }),
        "read" => {
            let room = check_room(str_field("room"), id)?;
            let offset = obj
                .get("offset")
                .and_then(Value::as_i64)
                .filter(|&offset| offset >= 0)
                .ok_or_else(|| {
                    FrameError::new(
                        ErrorCode::BadFrame,
                        "read needs an offset: an integer, 0 or more",
                        None,
                    )
                    .in_room(&room)
                })?;
            Ok(ClientFrame::Read { room, offset })
        }
        "edit" | "delete" | "react" => {
            let Some(id) = id else {
                return Err(FrameError::new(
                    ErrorCode::BadFrame,
                    format!("{kind} needs a string id"),
                    None,
                ));
            };
            check_id(id)?;
            let room = check_room(str_field("room"), Some(id))?;
            let target = parse_target(obj.get("target"), id)?;
            let change = parse_change(kind, &obj, id)?;
            Ok(ClientFrame::Change {
                room,
                id: id.to_owned(),
                target,
                change,
            })
        }
        "send" => {
            let Some(id) = id else {
                return Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "send needs a string id",
                    None,
                ));
            };
            check_id(id)?;
            let room = check_room(str_field("room"), Some(id))?;
            let Some(body) = str_field("body") else {
                return Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "send needs a string body",
                    Some(id.to_owned()),
                ));
            };
            check_body(body, Some(id))?;
            Ok(ClientFrame::Send {
                room,
                id: id.to_owned(),
                body: body.to_owned(),
            })
        }
        other => Err(FrameError::new(
            ErrorCode::BadFrame,
            format!("unknown type {other:?}"),
            id.map(Into::into),
        )),
    }
}

/// A chat message as clients see it, live and in history. Live, a message
/// is as it was sent; in history, as it is now: the latest edit's body with
/// `edited_ts`, a deleted message as a tombstone (`deleted`, empty body, no
/// reactions), and its reactions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub room: String,
    pub offset: i64,
    pub id: String,
    pub user: String,
    pub body: String,
    pub ts: i64,
    /// Extension: the time of the latest edit, when it was edited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<i64>,
    /// Extension: the author deleted it; `body` is empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Extension: its reactions, in the order each was first added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<Reaction>,
}

/// One emoji's reactions to a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub emoji: String,
    /// How many users reacted so.
    pub count: u64,
    /// Who, in the order they reacted, at most
    /// [`MAX_REACTION_USERS_LISTED`].
    pub users: Vec<String>,
}

/// Frames a gateway sends to a client; `type` is serialized first.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        node: &'a str,
        v: u32,
    },
    Joined {
        room: &'a str,
        position: Position,
        recovered: bool,
    },
    Left {
        room: &'a str,
    },
    Ack {
        id: &'a str,
        room: &'a str,
        offset: i64,
        ts: i64,
    },
    Message(&'a MessageView),
    Typing {
        room: &'a str,
        user: &'a str,
        /// Extension: how long the notice holds, in milliseconds, unless
        /// another one of the user renews it.
        ttl_ms: u64,
    },
    /// Extension: who is in a room. The answer to a `presence` request
    /// carries `users` (and `more` when the list was cut at its bound); a
    /// change told to a watching member carries `join` or `leave`.
    Presence {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<&'a [String]>,
        /// Users present beyond those listed in `users`.
        #[serde(skip_serializing_if = "is_zero")]
        more: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        join: Option<&'a [String]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        leave: Option<&'a [String]>,
    },
    /// Extension: `user` has read `room` up to `offset`, inclusive.
    Read {
        room: &'a str,
        user: &'a str,
        offset: i64,
    },
    /// Extension: the author edited the message at `target`; `offset` is
    /// the edit's own place in the log.
    Edit {
        room: &'a str,
        offset: i64,
        id: &'a str,
        target: i64,
        user: &'a str,
        body: &'a str,
        ts: i64,
    },
    /// Extension: the author deleted the message at `target`.
    Delete {
        room: &'a str,
        offset: i64,
        id: &'a str,
        target: i64,
        user: &'a str,
        ts: i64,
    },
    /// Extension: `user` added (or, with `remove`, took back) a reaction
    /// to the message at `target`.
    React {
        room: &'a str,
        offset: i64,
        id: &'a str,
        target: i64,
        user: &'a str,
        emoji: &'a str,
        remove: bool,
        ts: i64,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// Extension: with `rate_limited`, when to try again.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// Extension: the room of a refused `join`, or of an `unreadable`
        /// message.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        /// Extension: the log offset of an `unreadable` message.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<i64>,
        /// Extension: with `unavailable`, the send may yet be appended (it
        /// was handed to the log, which did not answer in time).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pending: bool,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

impl FrameError {
    pub fn to_frame(&self) -> ServerFrame<'_> {
        ServerFrame::Error {
            code: self.code,
            message: &self.message,
            id: self.id.as_deref(),
            retry_after_ms: self.retry_after_ms,
            room: self.room.as_deref(),
            offset: None,
            pending: self.pending,
        }
    }
}

/// The live frame of a change at log offset `offset`: `edit`, `delete` or
/// `react`.
pub fn change_frame(offset: i64, c: &crate::event::MessageChanged) -> String {
    use crate::event::Change;
    let (room, id, user, target, ts) = (&c.room, &c.client_id, &c.user, c.target, c.ts);
    match &c.change {
        Change::Edit { body } => ServerFrame::Edit {
            room,
            offset,
            id,
            target,
            user,
            body,
            ts,
        },
        Change::Delete => ServerFrame::Delete {
            room,
            offset,
            id,
            target,
            user,
            ts,
        },
        Change::React { emoji } | Change::Unreact { emoji } => ServerFrame::React {
            room,
            offset,
            id,
            target,
            user,
            emoji,
            remove: matches!(c.change, Change::Unreact { .. }),
            ts,
        },
    }
    .to_json()
}

/// The `unreadable` error frame: the message of `room` at `offset` could
/// not be read by this server, so its members were not shown it.
pub fn unreadable_frame(room: &str, offset: i64) -> String {
    ServerFrame::Error {
        code: ErrorCode::Unreadable,
        message: "a message of this room could not be read by this server; reload the history",
        id: None,
        retry_after_ms: None,
        room: Some(room),
        offset: Some(offset),
        pending: false,
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> (ErrorCode, Option<String>) {
        let e = parse_client_frame(text).unwrap_err();
        (e.code, e.id)
    }

    #[test]
    fn a_direct_message_room_names_its_two_users_sorted() {
        assert_eq!(dm_room("bob", "alice").as_deref(), Some("dm:alice:bob"));
        assert_eq!(dm_room("alice", "bob").as_deref(), Some("dm:alice:bob"));
        assert_eq!(dm_room("alice", "alice"), None);
        assert_eq!(dm_room("alice", "b:c"), None);
        assert_eq!(dm_members("dm:alice:bob"), Some(("alice", "bob")));
        assert!(valid_room("dm:alice:bob"));
        for bad in [
            "dm:bob:alice",
            "dm:alice:alice",
            "dm:alice",
            "dm:alice:bob:carol",
            "dm::bob",
            "dm:alice:",
            "dm:al ice:bob",
            "DM:alice:bob",
            "x:alice:bob",
        ] {
            assert!(!valid_room(bad), "{bad}");
            assert_eq!(dm_members(bad), None, "{bad}");
        }
        let long = "a".repeat(MAX_ROOM_LEN);
        let longer = "b".repeat(MAX_ROOM_LEN);
        assert!(valid_room(&dm_room(&long, &longer).unwrap()));
        assert!(!valid_user("dm:alice:bob"));
    }

    #[test]
    fn parses_every_client_frame() {
        assert_eq!(
            parse_client_frame(r#"{"type":"join","room":"general"}"#).unwrap(),
            ClientFrame::Join {
                room: "general".into(),
                since: None
            }
        );
        assert_eq!(
            parse_client_frame(
                r#"{"type":"join","room":"a.b-c_d","since":{"offset":41,"epoch":"e1"}}"#
            )
            .unwrap(),
            ClientFrame::Join {
                room: "a.b-c_d".into(),
                since: Some(Position {
                    offset: 41,
                    epoch: "e1".into()
                })
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"send","room":"r","id":"x","body":"hi","extra":1}"#)
                .unwrap(),
            ClientFrame::Send {
                room: "r".into(),
                id: "x".into(),
                body: "hi".into()
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"leave","room":"r"}"#).unwrap(),
            ClientFrame::Leave { room: "r".into() }
        );
    }

    #[test]
    fn parses_changes_and_refuses_bad_ones() {
        use crate::event::Change;
        let change = |text: &str| parse_client_frame(text);
        assert_eq!(
            change(r#"{"type":"edit","room":"r","id":"e1","target":4,"body":"fixed"}"#).unwrap(),
            ClientFrame::Change {
                room: "r".into(),
                id: "e1".into(),
                target: 4,
                change: Change::Edit {
                    body: "fixed".into()
                }
            }
        );
        assert_eq!(
            change(r#"{"type":"delete","room":"r","id":"d1","target":0}"#).unwrap(),
            ClientFrame::Change {
                room: "r".into(),
                id: "d1".into(),
                target: 0,
                change: Change::Delete
            }
        );
        assert_eq!(
            change(r#"{"type":"react","room":"r","id":"x","target":4,"emoji":"👍"}"#).unwrap(),
            ClientFrame::Change {
                room: "r".into(),
                id: "x".into(),
                target: 4,
                change: Change::React {
                    emoji: "👍".into()
                }
            }
        );
        assert_eq!(
            change(r#"{"type":"react","room":"r","id":"x","target":4,"emoji":"👍","remove":true}"#)
                .unwrap(),
            ClientFrame::Change {
                room: "r".into(),
                id: "x".into(),
                target: 4,
                change: Change::Unreact {
                    emoji: "👍".into()
                }
            }
        );
        for (bad, code) in [
            (r#"{"type":"edit","room":"r","target":4,"body":"b"}"#, None),
            (
                r#"{"type":"edit","room":"r","id":"i","target":-1,"body":"b"}"#,
                Some("i"),
            ),
            (
                r#"{"type":"edit","room":"r","id":"i","body":"b"}"#,
                Some("i"),
            ),
            (
                r#"{"type":"edit","room":"r","id":"i","target":"4","body":"b"}"#,
                Some("i"),
            ),
            (
                r#"{"type":"edit","room":"r","id":"i","target":4}"#,
                Some("i"),
            ),
            (
                r#"{"type":"edit","room":"r","id":"i","target":4,"body":""}"#,
                Some("i"),
            ),
            (
                r#"{"type":"react","room":"r","id":"i","target":4}"#,
                Some("i"),
            ),
            (
                r#"{"type":"react","room":"r","id":"i","target":4,"emoji":"a b"}"#,
                Some("i"),
            ),
            (
                r#"{"type":"react","room":"r","id":"i","target":4,"emoji":""}"#,
                Some("i"),
            ),
            (
                r#"{"type":"react","room":"r","id":"i","target":4,"emoji":"x","remove":1}"#,
                Some("i"),
            ),
        ] {
            let e = change(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame, "{bad}");
            assert_eq!(e.id.as_deref(), code, "{bad}");
        }
        let long = format!(
            r#"{{"type":"react","room":"r","id":"i","target":4,"emoji":"{}"}}"#,
            "x".repeat(MAX_EMOJI_BYTES + 1)
        );
        assert_eq!(change(&long).unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(
            code(r#"{"type":"delete","room":"no room","id":"i","target":1}"#),
            (ErrorCode::BadRoom, Some("i".into()))
        );
    }

    #[test]
    fn change_frames_name_their_target_and_their_own_offset() {
        use crate::event::{Change, MessageChanged};
        let mut c = MessageChanged {
            room: "r".into(),
            client_id: "e".into(),
            user: "ada".into(),
            target: 3,
            change: Change::Edit { body: "b".into() },
            ts: 9,
        };
        assert_eq!(
            change_frame(7, &c),
            r#"{"type":"edit","room":"r","offset":7,"id":"e","target":3,"user":"ada","body":"b","ts":9}"#
        );
        c.change = Change::Delete;
        assert_eq!(
            change_frame(7, &c),
            r#"{"type":"delete","room":"r","offset":7,"id":"e","target":3,"user":"ada","ts":9}"#
        );
        c.change = Change::Unreact {
            emoji: "👍".into()
        };
        assert_eq!(
            change_frame(7, &c),
            r#"{"type":"react","room":"r","offset":7,"id":"e","target":3,"user":"ada","emoji":"👍","remove":true,"ts":9}"#
        );
        // A plain message keeps the v1 fields alone.
        let m = MessageView {
            room: "r".into(),
            offset: 1,
            id: "i".into(),
            user: "u".into(),
            body: "b".into(),
            ts: 2,
            ..MessageView::default()
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"room":"r","offset":1,"id":"i","user":"u","body":"b","ts":2}"#
        );
    }

    #[test]
    fn bad_frames_get_their_codes() {
        assert_eq!(code("nope"), (ErrorCode::BadFrame, None));
        assert_eq!(code("[1]"), (ErrorCode::BadFrame, None));
        assert_eq!(
            code(r#"{"type":"dance","id":"q"}"#),
            (ErrorCode::BadFrame, Some("q".into()))
        );
        assert_eq!(
            code(r#"{"type":"send","room":"r","body":"hi"}"#),
            (ErrorCode::BadFrame, None)
        );
        assert_eq!(
            code(r#"{"type":"send","room":"r","id":"i","body":""}"#),
            (ErrorCode::BadFrame, Some("i".into()))
        );
        let big = format!(
            r#"{{"type":"send","room":"r","id":"i","body":"{}"}}"#,
            "x".repeat(5000)
        );
        assert_eq!(code(&big), (ErrorCode::TooLarge, Some("i".into())));
        assert_eq!(
            code(r#"{"type":"send","room":"no spaces","id":"i","body":"x"}"#),
            (ErrorCode::BadRoom, Some("i".into()))
        );
        assert_eq!(
            code(&format!(r#"{{"type":"join","room":"{}"}}"#, "a".repeat(65))),
            (ErrorCode::BadRoom, None)
        );
    }

    #[test]
    fn a_since_is_an_offset_of_minus_one_or_more_that_fits_an_i64() {
        let join = |offset: &str| {
            parse_client_frame(&format!(
                r#"{{"type":"join","room":"r","since":{{"offset":{offset},"epoch":"e"}}}}"#
            ))
        };
        for fine in ["-1", "0", "9223372036854775807"] {
            assert!(join(fine).is_ok(), "{fine} refused");
        }
        for bad in [
            "-2",
            "-9223372036854775808",
            "9223372036854775808",
            "1.5",
            "\"7\"",
        ] {
            let e = join(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame, "{bad}");
            assert!(e.message.contains("since"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn code_lists_are_complete() {
        // Exhaustive matches: a new variant does not compile until it gets
        // an arm here, the reminder to add it to `ALL` at that index (and to
        // docs/protocol.md, which tests/docs.rs compares with `ALL`).
        fn error_index(c: ErrorCode) -> usize {
            match c {
                ErrorCode::BadFrame => 0,
                ErrorCode::TooLarge => 1,
                ErrorCode::BadRoom => 2,
                ErrorCode::Unauthorized => 3,
                ErrorCode::Forbidden => 4,
                ErrorCode::RateLimited => 5,
                ErrorCode::Unavailable => 6,
                ErrorCode::NotJoined => 7,
                ErrorCode::LimitReached => 8,
                ErrorCode::Unreadable => 9,
                ErrorCode::NotFound => 10,
            }
        }
        fn close_index(c: CloseCode) -> usize {
            match c {
                CloseCode::Normal => 0,
                CloseCode::GoingAway => 1,
                CloseCode::TooLarge => 2,
                CloseCode::Unauthorized => 3,
                CloseCode::IdleTimeout => 4,
                CloseCode::SlowConsumer => 5,
            }
        }
        for (i, c) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(error_index(c), i, "{c:?}");
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json.as_str(), Some(c.as_str()), "{c:?}");
        }
        for (i, c) in CloseCode::ALL.into_iter().enumerate() {
            assert_eq!(close_index(c), i, "{c:?}");
        }
        let codes: Vec<u16> = CloseCode::ALL.into_iter().map(CloseCode::code).collect();
        assert_eq!(codes, [1000, 1001, 1009, 4001, 4002, 4008]);
    }

    #[test]
    fn server_frames_put_type_first() {
        let json = ServerFrame::Ack {
            id: "i",
            room: "r",
            offset: 3,
            ts: 9,
        }
        .to_json();
        assert_eq!(
            json,
            r#"{"type":"ack","id":"i","room":"r","offset":3,"ts":9}"#
        );
        let m = MessageView {
            room: "r".into(),
            offset: 1,
            id: "i".into(),
            user: "u".into(),
            body: "b".into(),
            ts: 2,
            ..MessageView::default()
        };
        assert!(ServerFrame::Message(&m)
            .to_json()
            .starts_with(r#"{"type":"message","room":"r""#));
    }
}
