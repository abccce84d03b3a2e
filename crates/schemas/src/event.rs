//! The chat events and their wire codec: [`ChatEvent`] ⇄ Avro single-object
//! encoding.
//!
//! Owns the event contract: `schemas/avro/chat_event.avsc` (the current
//! schema, which [`encode`] writes and [`decode`] reads into) and the registry
//! of every released writer schema, `schemas/avro/history/vN/chat_event.avsc`,
//! embedded in the binary.
//!
//! Promises:
//! - Every record [`encode`] produces says which schema wrote it: the marker
//!   `C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
//!   schema's Parsing Canonical Form, then the Avro binary datum, exactly as
//!   the Avro specification's single-object encoding (and Java's
//!   `BinaryMessageEncoder`) lay it out.
//! - [`decode`] reads every record any released schema version wrote, resolved
//!   into the current schema by Avro's resolution rules. A union branch is
//!   matched by record name (or the reader's aliases), never by shape, so a new
//!   event type is never mistaken for an old one with similar fields.
//! - [`decode`] never panics, whatever the bytes. A record written by a schema
//!   this binary does not know (a newer release) is
//!   [`DecodeError::UnknownFingerprint`], never a guess: upgrade readers before
//!   writers.
//! - Releasing a schema change: edit `chat_event.avsc` compatibly (new fields
//!   with defaults, new union branches at the end), copy it to
//!   `history/vN+1/`, add it to `RELEASED` below. The tests fail until both are
//!   done, and check every released version stays readable.
//!
//! The fingerprint is computed here rather than by apache-avro: its 0.17
//! `Schema::fingerprint` keeps `{"type":"long"}` for a logical type where the
//! specification (and Java) reduce it to `"long"` (AVRO-4004), which would give
//! our `ts` field a fingerprint no other Avro implementation agrees with.

use std::collections::HashSet;
use std::sync::LazyLock;

use apache_avro::schema::{RecordSchema, Schema};
use apache_avro::types::Value;
use serde_json::Value as Json;

/// A message accepted into a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePosted {
    /// Room id; also the log's partition key.
    pub room: String,
    /// The client's UUID for this message; a retry carries the same one.
    pub client_id: String,
    /// Authenticated sender.
    pub user: String,
    pub body: String,
    /// Accept time, milliseconds since the Unix epoch (UTC).
    pub ts: i64,
}

/// A user has read a room up to a log offset (since schema v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPositionMoved {
    /// Room id; also the log's partition key.
    pub room: String,
    /// Authenticated reader.
    pub user: String,
    /// The last offset of the room's partition the user has read, inclusive.
    pub offset: i64,
    /// Accept time, milliseconds since the Unix epoch (UTC).
    pub ts: i64,
}

/// What a [`MessageChanged`] does to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `chat.MessageEdited`: the author replaced the body.
    Edit { body: String },
    /// `chat.MessageDeleted`: the author deleted the message.
    Delete,
    /// `chat.ReactionAdded`: the user reacted with `emoji`.
    React { emoji: String },
    /// `chat.ReactionRemoved`: the user took that reaction back.
    Unreact { emoji: String },
}

impl Change {
    /// The event type's name, as protocol frames and logs say it.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Edit { .. } => "edit",
            Change::Delete => "delete",
            Change::React { .. } | Change::Unreact { .. } => "react",
        }
    }
}

/// A change to a message already in the room: an edit, a delete, a
/// reaction added or removed (since schema v3; four union branches, one
/// Rust type, since they share every field but one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChanged {
    /// Room id; also the log's partition key.
    pub room: String,
    /// The client's UUID for this change; a retry carries the same one.
    pub client_id: String,
    /// Authenticated user who made the change.
    pub user: String,
    /// Log offset of the message changed (below this record's own).
    pub target: i64,
    pub change: Change,
    /// Accept time, milliseconds since the Unix epoch (UTC).
    pub ts: i64,
}

/// Everything that can be on the chat log: one variant per branch of the
/// `chat_event.avsc` union (one for the four branches of a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    MessagePosted(MessagePosted),
    /// Since v2.
    ReadPositionMoved(ReadPositionMoved),
    /// Since v3.
    MessageChanged(MessageChanged),
}

impl ChatEvent {
    /// The room the event belongs to: its log partition key.
    pub fn room(&self) -> &str {
        match self {
            ChatEvent::MessagePosted(m) => &m.room,
            ChatEvent::ReadPositionMoved(r) => &r.room,
            ChatEvent::MessageChanged(c) => &c.room,
        }
    }

    /// The event's time, milliseconds since the Unix epoch.
    pub fn ts(&self) -> i64 {
        match self {
            ChatEvent::MessagePosted(m) => m.ts,
            ChatEvent::ReadPositionMoved(r) => r.ts,
            ChatEvent::MessageChanged(c) => c.ts,
        }
    }
}

/// Why bytes are not a chat event. Every case is terminal for those bytes;
/// only [`DecodeError::UnknownFingerprint`] can go away, by running a build
/// that knows the newer schema.
#[derive(thiserror::Error, Debug)]
pub enum DecodeError {
    #[error("not avro single-object encoding")]
    BadHeader,
    #[error("unknown schema fingerprint {0:#018x}")]
    UnknownFingerprint(u64),
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// The current schema: what [`encode`] writes and what [`decode`] reads into.
const CURRENT_SCHEMA: &str = include_str!("../../../schemas/avro/chat_event.avsc");

/// Every released writer schema, oldest first. Append; never edit or remove a
/// line, records written with it live on in the log.
const RELEASED: &[(&str, &str)] = &[
    (
        "v1",
        include_str!("../../../schemas/avro/history/v1/chat_event.avsc"),
    ),
    (
        "v2",
        include_str!("../../../schemas/avro/history/v2/chat_event.avsc"),
    ),
    (
        "v3",
        include_str!("../../../schemas/avro/history/v3/chat_event.avsc"),
    ),
];

const MARKER: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;
const MESSAGE_POSTED: &str = "chat.MessagePosted";
const READ_POSITION_MOVED: &str = "chat.ReadPositionMoved";
const MESSAGE_EDITED: &str = "chat.MessageEdited";
const MESSAGE_DELETED: &str = "chat.MessageDeleted";
const REACTION_ADDED: &str = "chat.ReactionAdded";
const REACTION_REMOVED: &str = "chat.ReactionRemoved";
/// Each event type's index in the current union (checked by the tests).
const MESSAGE_POSTED_BRANCH: i64 = 0;
const READ_POSITION_MOVED_BRANCH: i64 = 1;
const MESSAGE_EDITED_BRANCH: i64 = 2;
const MESSAGE_DELETED_BRANCH: i64 = 3;
const REACTION_ADDED_BRANCH: i64 = 4;
const REACTION_REMOVED_BRANCH: i64 = 5;

/// The current schema, parsed once.
struct Current {
    schema: Schema,
    fingerprint: u64,
    /// Per union branch, the header [`encode`] writes: the oldest released
    /// schema whose union starts like the current one up to that branch, so
    /// a record of an event an older build knows stays readable by it (a
    /// v1 build reads today's `MessagePosted`, written with v1's header).
    headers: Vec<[u8; HEADER_LEN]>,
    /// The union's record branches, to resolve a writer's branch into.
    branches: Vec<ReaderBranch>,
    /// Parsing Canonical Form of each branch, to tell which writers lay out
    /// their union as a prefix of this one.
    canonical: Vec<String>,
}

struct ReaderBranch {
    fullname: String,
    /// Writer names this branch reads: its full name, then its aliases.
    reads: Vec<String>,
    schema: Schema,
}

static CURRENT: LazyLock<Current> = LazyLock::new(|| {
    // The schema is compiled in; a broken one fails every test, not a user.
    let schema = Schema::parse_str(CURRENT_SCHEMA)
        .unwrap_or_else(|e| panic!("schemas/avro/chat_event.avsc is not a valid schema: {e}"));
    let fingerprint = schema_fingerprint(&schema);
    let variants = union_variants(&schema);
    let canonical: Vec<String> = variants.iter().map(canonical_form).collect();
    let headers = (0..variants.len())
        .map(|branch| {
            let oldest = RELEASED
                .iter()
                .filter_map(|(_, text)| Schema::parse_str(text).ok())
                .find(|writer| prefix_branches(writer, &canonical) > branch);
            header(oldest.as_ref().map_or(fingerprint, schema_fingerprint))
        })
        .collect();
    let branches = variants
        .into_iter()
        .filter_map(|variant| {
            let Schema::Record(RecordSchema { name, aliases, .. }) = &variant else {
                return None;
            };
            let fullname = name.fullname(None);
            let mut reads = vec![fullname.clone()];
            reads.extend(
                aliases
                    .iter()
                    .flatten()
                    .map(|alias| alias.fullname(name.namespace.clone())),
            );
            Some(ReaderBranch {
                fullname,
                reads,
                schema: variant,
            })
        })
        .collect();
    Current {
        schema,
        fingerprint,
        headers,
        branches,
        canonical,
    }
});

fn header(fingerprint: u64) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..2].copy_from_slice(&MARKER);
    header[2..].copy_from_slice(&fingerprint.to_le_bytes());
    header
}

fn union_variants(schema: &Schema) -> Vec<Schema> {
    match schema {
        Schema::Union(union) => union.variants().to_vec(),
        other => vec![other.clone()],
    }
}

/// How many leading branches of `writer`'s union are, in the same place,
/// exactly the current union's (`current`, canonical forms): 0 unless
/// every branch of the writer is. Records of such a writer are laid out as
/// the current schema lays them out, and are read by hand.
fn prefix_branches(writer: &Schema, current: &[String]) -> usize {
    let theirs: Vec<String> = union_variants(writer).iter().map(canonical_form).collect();
    if theirs.len() <= current.len() && theirs.iter().zip(current).all(|(a, b)| a == b) {
        theirs.len()
    } else {
        0
    }
}

static RELEASED_DECODER: LazyLock<Decoder> = LazyLock::new(|| {
    let mut decoder = Decoder {
        writers: Vec::with_capacity(RELEASED.len()),
    };
    for (version, text) in RELEASED {
        let schema = Schema::parse_str(text).unwrap_or_else(|e| {
            panic!("schemas/avro/history/{version}/chat_event.avsc is not a valid schema: {e}")
        });
        decoder = decoder.with_writer(schema);
    }
    decoder
});

/// The current schema: what [`encode`] writes and what [`decode`] reads into.
pub fn schema() -> &'static Schema {
    &CURRENT.schema
}

/// Fingerprint of the current schema. [`encode`] writes it in the header of
/// an event type this schema added; an older event type keeps the header of
/// the release that added it (see `Current::headers`).
pub fn fingerprint() -> u64 {
    CURRENT.fingerprint
}

/// CRC-64-AVRO (Rabin) fingerprint of `schema`'s Parsing Canonical Form, as
/// the Avro specification defines it (and Java's `SchemaNormalization`
/// computes it).
pub fn schema_fingerprint(schema: &Schema) -> u64 {
    crc64_avro(canonical_form(schema).as_bytes())
}

/// The fingerprint of released schema `version` (`"v1"`, …): the header
/// of the events that release added.
pub fn release_fingerprint(version: &str) -> Option<u64> {
    let (_, text) = RELEASED.iter().find(|(v, _)| *v == version)?;
    Schema::parse_str(text).ok().map(|s| schema_fingerprint(&s))
}

/// The released schema versions this build reads, oldest first (`v1`, …).
pub fn released_versions() -> Vec<&'static str> {
    RELEASED.iter().map(|(version, _)| *version).collect()
}

/// Encodes `event` with the current schema, in single-object encoding.
pub fn encode(event: &ChatEvent) -> Vec<u8> {
    // Written by hand against the current schema's layout (the tests check it
    // byte for byte against apache-avro's writer): no `Value` tree, no
    // per-field allocation, one buffer sized up front.
    const MAX_VARINT: usize = 10;
    match event {
        ChatEvent::MessagePosted(m) => {
            let strings = [&m.room, &m.client_id, &m.user, &m.body];
            let len = HEADER_LEN
                + MAX_VARINT
                + strings.iter().map(|s| MAX_VARINT + s.len()).sum::<usize>()
                + MAX_VARINT;
            let mut buf = Vec::with_capacity(len);
            buf.extend_from_slice(&CURRENT.headers[MESSAGE_POSTED_BRANCH as usize]);
            put_long(&mut buf, MESSAGE_POSTED_BRANCH);
            for s in strings {
                put_string(&mut buf, s);
            }
            put_long(&mut buf, m.ts);
            buf
        }
        ChatEvent::ReadPositionMoved(r) => {
            let len = HEADER_LEN + 4 * MAX_VARINT + r.room.len() + r.user.len();
            let mut buf = Vec::with_capacity(len);
            buf.extend_from_slice(&CURRENT.headers[READ_POSITION_MOVED_BRANCH as usize]);
            put_long(&mut buf, READ_POSITION_MOVED_BRANCH);
            put_string(&mut buf, &r.room);
            put_string(&mut buf, &r.user);
            put_long(&mut buf, r.offset);
            put_long(&mut buf, r.ts);
            buf
        }
        ChatEvent::MessageChanged(c) => {
            let (branch, text) = match &c.change {
                Change::Edit { body } => (MESSAGE_EDITED_BRANCH, Some(body)),
                Change::Delete => (MESSAGE_DELETED_BRANCH, None),
                Change::React { emoji } => (REACTION_ADDED_BRANCH, Some(emoji)),
                Change::Unreact { emoji } => (REACTION_REMOVED_BRANCH, Some(emoji)),
            };
            let len = HEADER_LEN
                + 6 * MAX_VARINT
                + c.room.len()
                + c.client_id.len()
                + c.user.len()
                + text.map_or(0, String::len);
            let mut buf = Vec::with_capacity(len);
            buf.extend_from_slice(&CURRENT.headers[branch as usize]);
            put_long(&mut buf, branch);
            put_string(&mut buf, &c.room);
            put_string(&mut buf, &c.client_id);
            put_string(&mut buf, &c.user);
            put_long(&mut buf, c.target);
            if let Some(text) = text {
                put_string(&mut buf, text);
            }
            put_long(&mut buf, c.ts);
            buf
        }
    }
}

/// Decodes a record any released schema version wrote (see [`Decoder`]).
pub fn decode(bytes: &[u8]) -> Result<ChatEvent, DecodeError> {
    RELEASED_DECODER.decode(bytes)
}

/// A set of writer schemas, by fingerprint, that records are accepted from;
/// each record is resolved into the current schema.
///
/// [`decode`] uses the released ones. Build your own to also accept writer
/// schemas this build does not ship (from a schema registry, or a test).
#[derive(Debug, Clone)]
pub struct Decoder {
    writers: Vec<Writer>,
}

#[derive(Debug, Clone)]
struct Writer {
    fingerprint: u64,
    schema: Schema,
    /// Branches of its union laid out as the current schema's (a prefix of
    /// it): their records are read by hand, without resolution.
    hand: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// Accepts every released writer schema.
    pub fn new() -> Self {
        RELEASED_DECODER.clone()
    }

    /// Accepts the writer schemas released up to `version` (`"v1"`, …) and
    /// no later one: what a build of that release reads. `None` for a
    /// version that was never released.
    pub fn released_through(version: &str) -> Option<Self> {
        let last = RELEASED.iter().position(|(v, _)| *v == version)?;
        let mut decoder = RELEASED_DECODER.clone();
        decoder.writers.truncate(last + 1);
        Some(decoder)
    }

    /// Also accepts records written with `writer`, keyed by its fingerprint.
    /// Whether they resolve into the current schema is decided per record.
    pub fn with_writer(mut self, writer: Schema) -> Self {
        let fingerprint = schema_fingerprint(&writer);
        if !self.writers.iter().any(|w| w.fingerprint == fingerprint) {
            let hand = prefix_branches(&writer, &CURRENT.canonical);
            self.writers.push(Writer {
                fingerprint,
                schema: writer,
                hand,
            });
        }
        self
    }

    /// Decodes one single-object-encoded record. Never panics.
    pub fn decode(&self, bytes: &[u8]) -> Result<ChatEvent, DecodeError> {
        let (header, datum) = bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(DecodeError::BadHeader)?;
        let (marker, fingerprint) = header.split_at(MARKER.len());
        if marker != MARKER {
            return Err(DecodeError::BadHeader);
        }
        let mut le = [0; 8];
        le.copy_from_slice(fingerprint);
        let fingerprint = u64::from_le_bytes(le);
        let writer = self
            .writers
            .iter()
            .find(|w| w.fingerprint == fingerprint)
            .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
        if writer.hand > 0 {
            // Nearly every record: laid out as today's, nothing to resolve.
            return decode_current(datum, writer.hand);
        }
        decode_resolving(&writer.schema, datum)
    }
}

/// Reads a record `writer` wrote with apache-avro and resolves it into the
/// current schema.
fn decode_resolving(writer: &Schema, mut datum: &[u8]) -> Result<ChatEvent, DecodeError> {
    // Resolution happens below, per branch, by name: apache-avro resolves
    // a union by trying the reader's branches in order by shape, which
    // would read a future event carrying a superset of MessagePosted's
    // fields as a MessagePosted.
    let value = apache_avro::from_avro_datum(writer, &mut datum, None).map_err(malformed)?;
    if !datum.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the end of the record",
            datum.len()
        )));
    }
    let (writer_name, record) = writer_branch(writer, value)?;
    let current = &*CURRENT;
    let branch = current
        .branches
        .iter()
        .find(|branch| branch.reads.contains(&writer_name))
        .ok_or_else(|| {
            DecodeError::Malformed(format!("no event type reads a {writer_name} record"))
        })?;
    let resolved = record
        .resolve_schemata(&branch.schema, vec![&current.schema])
        .map_err(malformed)?;
    to_event(&branch.fullname, resolved)
}

/// Reads a record of the current schema by hand, the mirror of [`encode`]:
/// no `Value` tree and no resolution, 20 to 50 times faster than
/// apache-avro's reader (benches/RESULTS.md). The tests hold it to
/// apache-avro's answer on valid, truncated and corrupted records.
///
/// `branches`: how many branches of the current union the writer's union
/// has (a writer's union is a prefix of the current one, or not read here).
fn decode_current(mut datum: &[u8], branches: usize) -> Result<ChatEvent, DecodeError> {
    let branch = get_long(&mut datum)?;
    let event = match branch {
        b if usize::try_from(b).map_or(true, |b| b >= branches) => {
            return Err(DecodeError::Malformed(format!("no union branch {branch}")));
        }
        MESSAGE_POSTED_BRANCH => {
            let room = get_string(&mut datum, "room")?;
            let client_id = get_string(&mut datum, "client_id")?;
            let user = get_string(&mut datum, "user")?;
            let body = get_string(&mut datum, "body")?;
            let ts = get_long(&mut datum)?;
            ChatEvent::MessagePosted(MessagePosted {
                room,
                client_id,
                user,
                body,
                ts,
            })
        }
        READ_POSITION_MOVED_BRANCH => {
            let room = get_string(&mut datum, "room")?;
            let user = get_string(&mut datum, "user")?;
            let offset = get_long(&mut datum)?;
            let ts = get_long(&mut datum)?;
            ChatEvent::ReadPositionMoved(ReadPositionMoved {
                room,
                user,
                offset,
                ts,
            })
        }
        MESSAGE_EDITED_BRANCH
        | MESSAGE_DELETED_BRANCH
        | REACTION_ADDED_BRANCH
        | REACTION_REMOVED_BRANCH => {
            let room = get_string(&mut datum, "room")?;
            let client_id = get_string(&mut datum, "client_id")?;
            let user = get_string(&mut datum, "user")?;
            let target = get_long(&mut datum)?;
            let change = match branch {
                MESSAGE_EDITED_BRANCH => Change::Edit {
                    body: get_string(&mut datum, "body")?,
                },
                MESSAGE_DELETED_BRANCH => Change::Delete,
                REACTION_ADDED_BRANCH => Change::React {
                    emoji: get_string(&mut datum, "emoji")?,
                },
                _ => Change::Unreact {
                    emoji: get_string(&mut datum, "emoji")?,
                },
            };
            let ts = get_long(&mut datum)?;
            ChatEvent::MessageChanged(MessageChanged {
                room,
                client_id,
                user,
                target,
                change,
                ts,
            })
        }
        other => return Err(DecodeError::Malformed(format!("no union branch {other}"))),
    };
    if !datum.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the end of the record",
            datum.len()
        )));
    }
    Ok(event)
}

/// Avro `long`, as apache-avro reads it: at most ten bytes of base-128
/// varint (bits past the 64th dropped), then zig-zag.
fn get_long(datum: &mut &[u8]) -> Result<i64, DecodeError> {
    let mut z = 0u64;
    for j in 0..10 {
        let (&byte, rest) = datum
            .split_first()
            .ok_or_else(|| DecodeError::Malformed("record ends inside an integer".to_owned()))?;
        *datum = rest;
        z |= u64::from(byte & 0x7F) << (j * 7);
        if byte & 0x80 == 0 {
            let half = (z >> 1) as i64;
            return Ok(if z & 1 == 0 { half } else { !half });
        }
    }
    Err(DecodeError::Malformed(
        "integer longer than ten bytes".to_owned(),
    ))
}

/// Avro `string`: a length, then that many bytes of UTF-8.
fn get_string(datum: &mut &[u8], field: &str) -> Result<String, DecodeError> {
    let len = get_long(datum)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= datum.len())
        .ok_or_else(|| {
            DecodeError::Malformed(format!(
                "field {field}: length {len} with {} bytes left",
                datum.len()
            ))
        })?;
    let (bytes, rest) = datum.split_at(len);
    *datum = rest;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| DecodeError::Malformed(format!("field {field} is not UTF-8")))
}

fn malformed(e: apache_avro::Error) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// The record a writer wrote and the full name of its schema. apache-avro
/// reads a union index past the end of input as branch 0 holding `null`, so
/// the record's shape is checked here, not assumed.
fn writer_branch(writer: &Schema, value: Value) -> Result<(String, Value), DecodeError> {
    let (schema, record) = match (writer, value) {
        (Schema::Union(union), Value::Union(index, record)) => {
            let schema = usize::try_from(index)
                .ok()
                .and_then(|i| union.variants().get(i))
                .ok_or_else(|| DecodeError::Malformed(format!("no union branch {index}")))?;
            (schema, *record)
        }
        (schema, record) => (schema, record),
    };
    match (schema, record) {
        (Schema::Record(RecordSchema { name, .. }), record @ Value::Record(_)) => {
            Ok((name.fullname(None), record))
        }
        _ => Err(DecodeError::Malformed("not a record".to_owned())),
    }
}

fn to_event(fullname: &str, value: Value) -> Result<ChatEvent, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(DecodeError::Malformed("not a record".to_owned()));
    };
    match fullname {
        MESSAGE_POSTED => message_posted(fields).map(ChatEvent::MessagePosted),
        READ_POSITION_MOVED => read_position_moved(fields).map(ChatEvent::ReadPositionMoved),
        MESSAGE_EDITED | MESSAGE_DELETED | REACTION_ADDED | REACTION_REMOVED => {
            message_changed(fullname, fields).map(ChatEvent::MessageChanged)
        }
        other => Err(DecodeError::Malformed(format!(
            "event type {other} has no ChatEvent variant"
        ))),
    }
}

fn message_posted(fields: Vec<(String, Value)>) -> Result<MessagePosted, DecodeError> {
    let (mut room, mut client_id, mut user, mut body, mut ts) = (None, None, None, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "room" => room = Some(string(&name, value)?),
            "client_id" => client_id = Some(string(&name, value)?),
            "user" => user = Some(string(&name, value)?),
            "body" => body = Some(string(&name, value)?),
            "ts" => ts = Some(timestamp_millis(&name, value)?),
            // The reader schema is ours: a field without a home here means
            // the struct and chat_event.avsc diverged.
            _ => return Err(DecodeError::Malformed(format!("unexpected field {name}"))),
        }
    }
    let missing = |field: &str| DecodeError::Malformed(format!("missing field {field}"));
    Ok(MessagePosted {
        room: room.ok_or_else(|| missing("room"))?,
        client_id: client_id.ok_or_else(|| missing("client_id"))?,
        user: user.ok_or_else(|| missing("user"))?,
        body: body.ok_or_else(|| missing("body"))?,
        ts: ts.ok_or_else(|| missing("ts"))?,
    })
}

fn read_position_moved(fields: Vec<(String, Value)>) -> Result<ReadPositionMoved, DecodeError> {
    let (mut room, mut user, mut offset, mut ts) = (None, None, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "room" => room = Some(string(&name, value)?),
            "user" => user = Some(string(&name, value)?),
            "offset" => offset = Some(long(&name, value)?),
            "ts" => ts = Some(timestamp_millis(&name, value)?),
            _ => return Err(DecodeError::Malformed(format!("unexpected field {name}"))),
        }
    }
    let missing = |field: &str| DecodeError::Malformed(format!("missing field {field}"));
    Ok(ReadPositionMoved {
        room: room.ok_or_else(|| missing("room"))?,
        user: user.ok_or_else(|| missing("user"))?,
        offset: offset.ok_or_else(|| missing("offset"))?,
        ts: ts.ok_or_else(|| missing("ts"))?,
    })
}

fn message_changed(
    fullname: &str,
    fields: Vec<(String, Value)>,
) -> Result<MessageChanged, DecodeError> {
    let (mut room, mut client_id, mut user, mut target, mut text, mut ts) =
        (None, None, None, None, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "room" => room = Some(string(&name, value)?),
            "client_id" => client_id = Some(string(&name, value)?),
            "user" => user = Some(string(&name, value)?),
            "target" => target = Some(long(&name, value)?),
            "body" | "emoji" => text = Some(string(&name, value)?),
            "ts" => ts = Some(timestamp_millis(&name, value)?),
            _ => return Err(DecodeError::Malformed(format!("unexpected field {name}"))),
        }
    }
    let missing = |field: &str| DecodeError::Malformed(format!("missing field {field}"));
    let change = match fullname {
        MESSAGE_EDITED => Change::Edit {
            body: text.ok_or_else(|| missing("body"))?,
        },
        MESSAGE_DELETED => Change::Delete,
        REACTION_ADDED => Change::React {
            emoji: text.ok_or_else(|| missing("emoji"))?,
        },
        _ => Change::Unreact {
            emoji: text.ok_or_else(|| missing("emoji"))?,
        },
    };
    Ok(MessageChanged {
        room: room.ok_or_else(|| missing("room"))?,
        client_id: client_id.ok_or_else(|| missing("client_id"))?,
        user: user.ok_or_else(|| missing("user"))?,
        target: target.ok_or_else(|| missing("target"))?,
        change,
        ts: ts.ok_or_else(|| missing("ts"))?,
    })
}

fn long(field: &str, value: Value) -> Result<i64, DecodeError> {
    match value {
        Value::Long(n) => Ok(n),
        _ => Err(DecodeError::Malformed(format!(
            "field {field} is not a long"
        ))),
    }
}

fn string(field: &str, value: Value) -> Result<String, DecodeError> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(DecodeError::Malformed(format!(
            "field {field} is not a string"
        ))),
    }
}

fn timestamp_millis(field: &str, value: Value) -> Result<i64, DecodeError> {
    match value {
        Value::TimestampMillis(ms) | Value::Long(ms) => Ok(ms),
        _ => Err(DecodeError::Malformed(format!(
            "field {field} is not a timestamp-millis"
        ))),
    }
}

/// Avro `long`: zig-zag, then little-endian base-128 varint.
fn put_long(buf: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Avro `string`: length as a `long`, then the UTF-8 bytes.
fn put_string(buf: &mut Vec<u8>, s: &str) {
    // A Rust allocation never exceeds isize::MAX bytes, so the cast is lossless.
    put_long(buf, s.len() as i64);
    buf.extend_from_slice(s.as_bytes());
}

/// CRC-64-AVRO, the Rabin fingerprint the Avro specification's "Schema
/// Fingerprints" section defines: reflected, initial value and polynomial
/// both `0xc15d213aa4d7a795`.
fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut table = [0; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut bit = 0;
            while bit < 8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
                bit += 1;
            }
            table[i] = fp;
            i += 1;
        }
        table
    };
    bytes.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize]
    })
}

/// The Parsing Canonical Form of `schema`, by the specification's rules:
/// primitives as bare names (whatever else, e.g. `logicalType`, decorates
/// them), full names, only the attributes that matter for parsing, in the
/// order `name, type, fields, symbols, items, values, size`, no whitespace, a
/// named type spelled out only where first defined.
fn canonical_form(schema: &Schema) -> String {
    // apache-avro serializes every `Schema` it parsed back to JSON; it cannot
    // fail on one (map keys are all strings).
    let json = serde_json::to_value(schema).expect("an apache-avro schema serializes to JSON");
    let mut out = String::new();
    write_canonical(&json, "", &mut HashSet::new(), &mut out);
    out
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

fn write_canonical(json: &Json, namespace: &str, defined: &mut HashSet<String>, out: &mut String) {
    match json {
        Json::String(name) if PRIMITIVES.contains(&name.as_str()) => quote(name, out),
        Json::String(name) => quote(&fullname(name, namespace), out),
        Json::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(branch, namespace, defined, out);
            }
            out.push(']');
        }
        Json::Object(map) => match map.get("type") {
            Some(Json::String(kind)) => match kind.as_str() {
                primitive if PRIMITIVES.contains(&primitive) => quote(primitive, out),
                "record" | "error" | "enum" | "fixed" => {
                    let name = map.get("name").and_then(Json::as_str).unwrap_or_default();
                    let space = map
                        .get("namespace")
                        .and_then(Json::as_str)
                        .unwrap_or(namespace);
                    let full = fullname(name, space);
                    if !defined.insert(full.clone()) {
                        return quote(&full, out);
                    }
                    let inner = full.rsplit_once('.').map_or("", |(space, _)| space);
                    out.push_str("{\"name\":");
                    quote(&full, out);
                    out.push_str(",\"type\":");
                    quote(kind, out);
                    match kind.as_str() {
                        "enum" => {
                            out.push_str(",\"symbols\":");
                            let none = Json::Array(Vec::new());
                            write_canonical(map.get("symbols").unwrap_or(&none), "", defined, out);
                        }
                        "fixed" => {
                            let size = match map.get("size") {
                                Some(Json::Number(n)) => n.as_u64(),
                                Some(Json::String(s)) => s.parse().ok(),
                                _ => None,
                            };
                            out.push_str(&format!(",\"size\":{}", size.unwrap_or_default()));
                        }
                        _ => {
                            out.push_str(",\"fields\":[");
                            let fields = map.get("fields").and_then(Json::as_array);
                            for (i, field) in fields.into_iter().flatten().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                out.push_str("{\"name\":");
                                let name = field.get("name").and_then(Json::as_str);
                                quote(name.unwrap_or_default(), out);
                                out.push_str(",\"type\":");
                                let kind = field.get("type").unwrap_or(&Json::Null);
                                write_canonical(kind, inner, defined, out);
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                "array" | "map" => {
                    let key = if kind == "array" { "items" } else { "values" };
                    out.push_str("{\"type\":");
                    quote(kind, out);
                    out.push_str(&format!(",\"{key}\":"));
                    write_canonical(map.get(key).unwrap_or(&Json::Null), namespace, defined, out);
                    out.push('}');
                }
                // `{"type": "SomeRecord"}`: a reference to a named type.
                reference => quote(&fullname(reference, namespace), out),
            },
            Some(nested) => write_canonical(nested, namespace, defined, out),
            None => out.push_str("null"),
        },
        // Not a schema (only reachable from malformed JSON); keep it verbatim.
        other => out.push_str(&other.to_string()),
    }
}

fn fullname(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// [STRINGS]: string literals appear with their characters, unescaped.
fn quote(s: &str, out: &mut String) {
    out.push('"');
    out.push_str(s);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use proptest::prelude::*;
    use std::path::Path;

    fn canonical_of_json(text: &str) -> String {
        let json: Json = serde_json::from_str(text).unwrap();
        let mut out = String::new();
        write_canonical(&json, "", &mut HashSet::new(), &mut out);
        out
    }

    /// Apache Avro's shared schema test data: input, canonical form,
    /// fingerprint (as Java's signed long; `None` where the file gives none).
    const SPEC_CASES: &[(&str, &str, Option<i64>)] = &[
        (r#""null""#, r#""null""#, Some(7195948357588979594)),
        (r#"{"type":"null"}"#, r#""null""#, None),
        (r#""boolean""#, r#""boolean""#, Some(-6970731678124411036)),
        (r#""int""#, r#""int""#, Some(8247732601305521295)),
        (r#""long""#, r#""long""#, Some(-3434872931120570953)),
        (r#"{"type":"long"}"#, r#""long""#, None),
        (r#""float""#, r#""float""#, Some(5583340709985441680)),
        (r#""double""#, r#""double""#, Some(-8181574048448539266)),
        (r#""bytes""#, r#""bytes""#, Some(5746618253357095269)),
        (r#""string""#, r#""string""#, Some(-8142146995180207161)),
        (r#"[  ]"#, r#"[]"#, Some(-1241056759729112623)),
        (r#"[ "int"  ]"#, r#"["int"]"#, Some(-5232228896498058493)),
        (
            r#"[ "int" , {"type":"boolean"} ]"#,
            r#"["int","boolean"]"#,
            Some(5392556393470105090),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"foo"}"#,
            r#"{"name":"foo","type":"record","fields":[]}"#,
            Some(-4824392279771201922),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}"#,
            r#"{"name":"x.y.foo","type":"record","fields":[]}"#,
            Some(5916914534497305771),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"a.b.foo", "namespace":"x.y"}"#,
            r#"{"name":"a.b.foo","type":"record","fields":[]}"#,
            Some(-4616218487480524110),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"foo", "doc":"foo", "aliases":["foo","bar"]}"#,
            r#"{"name":"foo","type":"record","fields":[]}"#,
            Some(-4824392279771201922),
        ),
        (
            r#"{"fields":[{"type":{"type":"boolean"}, "name":"f1"}], "type":"record", "name":"foo"}"#,
            r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}"#,
            Some(7843277075252814651),
        ),
        (
            r#"{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":"true"},
                {"order":"descending","name":"f2","doc":"Hello","type":"int"}],
                "type":"record", "name":"foo"}"#,
            r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},{"name":"f2","type":"int"}]}"#,
            Some(-4860222112080293046),
        ),
        (
            r#"{"type":"enum", "name":"foo", "symbols":["A1"]}"#,
            r#"{"name":"foo","type":"enum","symbols":["A1"]}"#,
            Some(-6342190197741309591),
        ),
        (
            r#"{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}"#,
            r#"{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}"#,
            Some(-4448647247586288245),
        ),
        (
            r#"{"name":"foo","type":"fixed","size":15}"#,
            r#"{"name":"foo","type":"fixed","size":15}"#,
            Some(1756455273707447556),
        ),
        (
            r#"{"namespace":"x.y.z", "type":"fixed", "name":"foo", "doc":"foo bar", "size":32}"#,
            r#"{"name":"x.y.z.foo","type":"fixed","size":32}"#,
            Some(-3064184465700546786),
        ),
        (
            r#"{ "items":{"type":"null"}, "type":"array"}"#,
            r#"{"type":"array","items":"null"}"#,
            Some(-589620603366471059),
        ),
        (
            r#"{ "values":"string", "type":"map"}"#,
            r#"{"type":"map","values":"string"}"#,
            Some(-8732877298790414990),
        ),
        (
            r#"{"name":"PigValue","type":"record",
                "fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}"#,
            r#"{"name":"PigValue","type":"record","fields":[{"name":"value","type":["null","int","long","PigValue"]}]}"#,
            Some(-1759257747318642341),
        ),
    ];

    #[test]
    fn canonical_form_and_fingerprint_match_the_avro_spec_vectors() {
        for (input, canonical, fingerprint) in SPEC_CASES {
            assert_eq!(canonical_of_json(input), *canonical, "input {input}");
            if let Some(expected) = fingerprint {
                assert_eq!(
                    crc64_avro(canonical.as_bytes()) as i64,
                    *expected,
                    "input {input}"
                );
            }
        }
    }

    #[test]
    fn canonical_form_survives_apache_avro_parsing() {
        // The production path goes through apache-avro's Schema and its JSON
        // serialization; it must reach the same canonical form.
        let mut checked = 0;
        for (input, canonical, _) in SPEC_CASES {
            let Ok(schema) = Schema::parse_str(input) else {
                continue; // apache-avro rejects a few of the spec's inputs
            };
            assert_eq!(canonical_form(&schema), *canonical, "input {input}");
            checked += 1;
        }
        assert!(checked >= SPEC_CASES.len() - 2, "only {checked} parsed");
    }

    #[test]
    fn logical_types_reduce_to_their_underlying_type() {
        let ts = Schema::parse_str(r#"{"type":"long","logicalType":"timestamp-millis"}"#).unwrap();
        assert_eq!(canonical_form(&ts), r#""long""#);
        assert_eq!(schema_fingerprint(&ts) as i64, -3434872931120570953);
        let uuid = Schema::parse_str(r#"{"type":"string","logicalType":"uuid"}"#).unwrap();
        assert_eq!(canonical_form(&uuid), r#""string""#);
    }

    #[test]
    fn current_schema_has_the_expected_canonical_form() {
        assert_eq!(
            canonical_form(schema()),
            concat!(
                r#"[{"name":"chat.MessagePosted","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"client_id","type":"string"},"#,
                r#"{"name":"user","type":"string"},{"name":"body","type":"string"},"#,
                r#"{"name":"ts","type":"long"}]},"#,
                r#"{"name":"chat.ReadPositionMoved","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"user","type":"string"},"#,
                r#"{"name":"offset","type":"long"},{"name":"ts","type":"long"}]},"#,
                r#"{"name":"chat.MessageEdited","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"client_id","type":"string"},"#,
                r#"{"name":"user","type":"string"},{"name":"target","type":"long"},"#,
                r#"{"name":"body","type":"string"},{"name":"ts","type":"long"}]},"#,
                r#"{"name":"chat.MessageDeleted","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"client_id","type":"string"},"#,
                r#"{"name":"user","type":"string"},{"name":"target","type":"long"},"#,
                r#"{"name":"ts","type":"long"}]},"#,
                r#"{"name":"chat.ReactionAdded","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"client_id","type":"string"},"#,
                r#"{"name":"user","type":"string"},{"name":"target","type":"long"},"#,
                r#"{"name":"emoji","type":"string"},{"name":"ts","type":"long"}]},"#,
                r#"{"name":"chat.ReactionRemoved","type":"record","fields":["#,
                r#"{"name":"room","type":"string"},{"name":"client_id","type":"string"},"#,
                r#"{"name":"user","type":"string"},{"name":"target","type":"long"},"#,
                r#"{"name":"emoji","type":"string"},{"name":"ts","type":"long"}]}]"#
            )
        );
        assert_eq!(
            fingerprint(),
            crc64_avro(canonical_of_json(CURRENT_SCHEMA).as_bytes())
        );
    }

    #[test]
    fn header_is_marker_then_little_endian_fingerprint() {
        let bytes = encode(&ChatEvent::MessagePosted(MessagePosted {
            room: String::new(),
            client_id: String::new(),
            user: String::new(),
            body: String::new(),
            ts: 0,
        }));
        assert_eq!(bytes[..2], [0xC3, 0x01]);
        // A message keeps v1's header: v1 builds read it during an upgrade.
        let v1 = Schema::parse_str(RELEASED[0].1).unwrap();
        assert_eq!(bytes[2..10], schema_fingerprint(&v1).to_le_bytes());
        // Branch 0, four empty strings, ts 0.
        assert_eq!(bytes[10..], [0, 0, 0, 0, 0, 0]);
        let read = encode(&ChatEvent::ReadPositionMoved(ReadPositionMoved {
            room: String::new(),
            user: String::new(),
            offset: 0,
            ts: 0,
        }));
        // v2 added the event: its records carry v2's fingerprint.
        let v2 = Schema::parse_str(RELEASED[1].1).unwrap();
        assert_eq!(read[2..10], schema_fingerprint(&v2).to_le_bytes());
        let delete = encode(&ChatEvent::MessageChanged(MessageChanged {
            room: String::new(),
            client_id: String::new(),
            user: String::new(),
            target: 0,
            change: Change::Delete,
            ts: 0,
        }));
        // v3 added changes: their records carry v3's fingerprint.
        assert_eq!(delete[2..10], fingerprint().to_le_bytes());
        // Branch 3 (zig-zag 6), three empty strings, target 0, ts 0.
        assert_eq!(delete[10..], [6, 0, 0, 0, 0, 0]);
        // Branch 1 (zig-zag 2), two empty strings, offset 0, ts 0.
        assert_eq!(read[10..], [2, 0, 0, 0, 0]);
    }

    #[test]
    fn a_build_of_an_older_release_reads_the_events_it_knows_and_refuses_the_rest() {
        let v1 = Decoder::released_through("v1").unwrap();
        let message = ChatEvent::MessagePosted(MessagePosted {
            room: "general".into(),
            client_id: "c".into(),
            user: "ada".into(),
            body: "hi".into(),
            ts: 7,
        });
        assert_eq!(v1.decode(&encode(&message)).unwrap(), message);
        let read = encode(&ChatEvent::ReadPositionMoved(ReadPositionMoved {
            room: "general".into(),
            user: "ada".into(),
            offset: 41,
            ts: 8,
        }));
        assert!(matches!(
            v1.decode(&read),
            Err(DecodeError::UnknownFingerprint(_))
        ));
        assert!(Decoder::released_through("v0").is_none());
        let v2 = Decoder::released_through("v2").unwrap();
        assert!(v2.decode(&read).is_ok());
        assert_eq!(v2.decode(&encode(&message)).unwrap(), message);
        for change in [
            Change::Edit { body: "x".into() },
            Change::Delete,
            Change::React {
                emoji: "👍".into()
            },
            Change::Unreact {
                emoji: "👍".into()
            },
        ] {
            let bytes = encode(&ChatEvent::MessageChanged(MessageChanged {
                room: "general".into(),
                client_id: "e".into(),
                user: "ada".into(),
                target: 3,
                change,
                ts: 9,
            }));
            assert!(matches!(
                v2.decode(&bytes),
                Err(DecodeError::UnknownFingerprint(f)) if f == fingerprint()
            ));
            assert!(Decoder::released_through("v3")
                .unwrap()
                .decode(&bytes)
                .is_ok());
        }
    }

    #[test]
    fn every_release_is_hand_read_as_a_prefix_of_the_current_union() {
        for (version, text) in RELEASED {
            let writer = Schema::parse_str(text).unwrap();
            assert_eq!(
                prefix_branches(&writer, &CURRENT.canonical),
                union_variants(&writer).len(),
                "{version} reorders or changes a branch: records of it would need resolving"
            );
        }
    }

    #[test]
    fn every_history_version_is_registered() {
        let history = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/avro/history");
        let mut on_disk: Vec<String> = std::fs::read_dir(&history)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort_by_key(|v| v.trim_start_matches('v').parse::<u32>().unwrap_or(u32::MAX));
        let registered: Vec<String> = RELEASED.iter().map(|(v, _)| v.to_string()).collect();
        assert_eq!(
            registered, on_disk,
            "RELEASED must list every schemas/avro/history/vN, oldest first"
        );
        for (version, text) in RELEASED {
            let file = history.join(version).join("chat_event.avsc");
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                *text,
                "{}",
                file.display()
            );
        }
    }

    #[test]
    fn current_schema_is_the_newest_release() {
        let (version, newest) = RELEASED.last().unwrap();
        assert_eq!(
            schema_fingerprint(&Schema::parse_str(newest).unwrap()),
            fingerprint(),
            "chat_event.avsc changed: copy it to schemas/avro/history/vN+1 and add it to \
             RELEASED (the newest release is {version})"
        );
    }

    #[test]
    fn every_release_is_readable_by_the_current_schema() {
        for (version, text) in RELEASED {
            let writer = Schema::parse_str(text).unwrap();
            SchemaCompatibility::can_read(&writer, schema())
                .unwrap_or_else(|e| panic!("{version} records would not resolve: {e}"));
        }
    }

    #[test]
    fn every_union_branch_has_a_rust_type() {
        let names: Vec<&str> = CURRENT
            .branches
            .iter()
            .map(|b| b.fullname.as_str())
            .collect();
        assert_eq!(
            names,
            [
                MESSAGE_POSTED,
                READ_POSITION_MOVED,
                MESSAGE_EDITED,
                MESSAGE_DELETED,
                REACTION_ADDED,
                REACTION_REMOVED
            ]
        );
        let Schema::Union(union) = schema() else {
            panic!("chat_event.avsc is a union");
        };
        assert_eq!(union.variants().len(), CURRENT.branches.len());
        assert!(matches!(
            &union.variants()[MESSAGE_POSTED_BRANCH as usize],
            Schema::Record(r) if r.name.fullname(None) == MESSAGE_POSTED
        ));
        for (branch, name) in [
            (READ_POSITION_MOVED_BRANCH, READ_POSITION_MOVED),
            (MESSAGE_EDITED_BRANCH, MESSAGE_EDITED),
            (MESSAGE_DELETED_BRANCH, MESSAGE_DELETED),
            (REACTION_ADDED_BRANCH, REACTION_ADDED),
            (REACTION_REMOVED_BRANCH, REACTION_REMOVED),
        ] {
            assert!(matches!(
                &union.variants()[branch as usize],
                Schema::Record(r) if r.name.fullname(None) == name
            ));
        }
    }

    #[test]
    fn fingerprint_matches_apache_avro_where_it_follows_the_spec() {
        // Without logical types apache-avro's canonical form is the spec's;
        // the two CRC-64-AVRO implementations must then agree.
        use apache_avro::rabin::Rabin;
        for (input, _, _) in SPEC_CASES {
            let Ok(schema) = Schema::parse_str(input) else {
                continue;
            };
            let theirs = schema.fingerprint::<Rabin>().bytes;
            assert_eq!(
                schema_fingerprint(&schema).to_le_bytes().to_vec(),
                theirs,
                "input {input}"
            );
        }
    }

    fn to_value(m: &MessagePosted) -> Value {
        Value::Union(
            MESSAGE_POSTED_BRANCH as u32,
            Box::new(Value::Record(vec![
                ("room".into(), Value::String(m.room.clone())),
                ("client_id".into(), Value::String(m.client_id.clone())),
                ("user".into(), Value::String(m.user.clone())),
                ("body".into(), Value::String(m.body.clone())),
                ("ts".into(), Value::TimestampMillis(m.ts)),
            ])),
        )
    }

    /// The hand reader and apache-avro's both read `datum` as the same
    /// event, or both refuse it.
    fn agree(datum: &[u8]) -> Result<(), TestCaseError> {
        let hand = decode_current(datum, CURRENT.branches.len());
        let avro = decode_resolving(schema(), datum);
        match (&hand, &avro) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "hand {hand:?} vs apache-avro {avro:?} on {datum:?}"),
        }
        Ok(())
    }

    #[test]
    fn hand_decoding_reads_ten_byte_integers_and_refuses_eleven() {
        for ts in [i64::MIN, i64::MAX, -(1 << 62) - 1, 1 << 62, 0, -1] {
            let event = ChatEvent::MessagePosted(MessagePosted {
                room: "r".into(),
                client_id: "c".into(),
                user: "u".into(),
                body: "b".into(),
                ts,
            });
            let datum = encode(&event)[HEADER_LEN..].to_vec();
            assert_eq!(
                decode_current(&datum, CURRENT.branches.len()).ok(),
                Some(event),
                "ts {ts}"
            );
            agree(&datum).unwrap();
        }
        // Ten continuation bytes: no integer ends within ten bytes.
        let mut datum = vec![0x80; 10];
        datum.push(0);
        assert!(decode_current(&datum, CURRENT.branches.len()).is_err());
        agree(&datum).unwrap();
    }

    proptest! {
        #[test]
        fn hand_encoding_matches_apache_avro(
            room in ".*", client_id in ".*", user in ".*", body in ".*", ts in any::<i64>(),
        ) {
            let m = MessagePosted { room, client_id, user, body, ts };
            let datum = apache_avro::to_avro_datum(schema(), to_value(&m)).unwrap();
            let bytes = encode(&ChatEvent::MessagePosted(m));
            prop_assert_eq!(&bytes[HEADER_LEN..], &datum[..]);
        }

        /// The hand-written reader gives apache-avro's answer: the same
        /// event for every valid record, an error wherever it errs.
        #[test]
        fn hand_decoding_matches_apache_avro_on_valid_records(
            room in ".*", client_id in ".*", user in ".*", body in ".*", ts in any::<i64>(),
        ) {
            let event = ChatEvent::MessagePosted(MessagePosted { room, client_id, user, body, ts });
            let bytes = encode(&event);
            prop_assert_eq!(decode_current(&bytes[HEADER_LEN..], CURRENT.branches.len()).ok(), Some(event.clone()));
            prop_assert_eq!(decode_resolving(schema(), &bytes[HEADER_LEN..]).ok(), Some(event));
        }

        #[test]
        fn hand_decoding_errs_where_apache_avro_errs(
            body in ".{0,40}",
            ts in any::<i64>(),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            tail in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let event = ChatEvent::MessagePosted(MessagePosted {
                room: "general".into(),
                client_id: "4b1d".into(),
                user: "alice".into(),
                body,
                ts,
            });
            let mut datum = encode(&event)[HEADER_LEN..].to_vec();
            for (at, byte) in flips {
                let i = at.index(datum.len());
                datum[i] ^= byte;
            }
            datum.truncate(cut.index(datum.len() + 1));
            datum.extend(tail);
            agree(&datum)?;
        }

        #[test]
        fn hand_coding_of_read_positions_matches_apache_avro(
            room in ".*", user in ".*", offset in any::<i64>(), ts in any::<i64>(),
        ) {
            let value = Value::Union(
                READ_POSITION_MOVED_BRANCH as u32,
                Box::new(Value::Record(vec![
                    ("room".into(), Value::String(room.clone())),
                    ("user".into(), Value::String(user.clone())),
                    ("offset".into(), Value::Long(offset)),
                    ("ts".into(), Value::TimestampMillis(ts)),
                ])),
            );
            let datum = apache_avro::to_avro_datum(schema(), value).unwrap();
            let event = ChatEvent::ReadPositionMoved(ReadPositionMoved { room, user, offset, ts });
            let bytes = encode(&event);
            prop_assert_eq!(&bytes[HEADER_LEN..], &datum[..]);
            prop_assert_eq!(decode(&bytes).ok(), Some(event.clone()));
            prop_assert_eq!(decode_resolving(schema(), &datum).ok(), Some(event));
            agree(&datum)?;
        }

        #[test]
        fn hand_coding_of_changes_matches_apache_avro(
            room in ".*", client_id in ".*", user in ".*", target in any::<i64>(),
            kind in 0u32..4, text in ".*", ts in any::<i64>(),
        ) {
            let mut fields = vec![
                ("room".into(), Value::String(room.clone())),
                ("client_id".into(), Value::String(client_id.clone())),
                ("user".into(), Value::String(user.clone())),
                ("target".into(), Value::Long(target)),
            ];
            let change = match kind {
                0 => {
                    fields.push(("body".into(), Value::String(text.clone())));
                    Change::Edit { body: text }
                }
                1 => Change::Delete,
                2 => {
                    fields.push(("emoji".into(), Value::String(text.clone())));
                    Change::React { emoji: text }
                }
                _ => {
                    fields.push(("emoji".into(), Value::String(text.clone())));
                    Change::Unreact { emoji: text }
                }
            };
            fields.push(("ts".into(), Value::TimestampMillis(ts)));
            let value = Value::Union(MESSAGE_EDITED_BRANCH as u32 + kind, Box::new(Value::Record(fields)));
            let datum = apache_avro::to_avro_datum(schema(), value).unwrap();
            let event = ChatEvent::MessageChanged(MessageChanged { room, client_id, user, target, change, ts });
            let bytes = encode(&event);
            prop_assert_eq!(&bytes[HEADER_LEN..], &datum[..]);
            prop_assert_eq!(decode(&bytes).ok(), Some(event.clone()));
            prop_assert_eq!(decode_resolving(schema(), &datum).ok(), Some(event));
            agree(&datum)?;
        }

        #[test]
        fn hand_decoding_matches_apache_avro_on_any_bytes(
            datum in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            agree(&datum)?;
        }
    }
}
