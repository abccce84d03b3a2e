//! The contracts every other crate relies on: the Avro event schemas and their
//! codec (`event`), and the client protocol frames (`protocol`, described in
//! docs/protocol.md).
//!
//! Nothing here does I/O; a change here is a change to a public contract.

pub mod event;
pub mod protocol;

pub use event::{
    decode, encode, ChatEvent, DecodeError, Decoder, MessagePosted, ReadPositionMoved,
};

/// The log topic of the chat's events, partitioned by room.
pub const MESSAGES_TOPIC: &str = "chat.messages";
