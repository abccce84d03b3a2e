//! The contracts every other crate relies on: the Avro event schemas and their
//! codec (`event`), and the client protocol frames (`protocol`, described in
//! docs/protocol.md).
//!
//! Nothing here does I/O; a change here is a change to a public contract.

pub mod event;
pub mod protocol;

pub use event::{
    decode, encode, Change, ChatEvent, DecodeError, Decoder, MessageChanged, MessagePosted,
    ReadPositionMoved,
};

/// The log topic of the chat's events, partitioned by room.
pub const MESSAGES_TOPIC: &str = "chat.messages";

/// Milliseconds since the Unix epoch (UTC): the time every event carries.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
