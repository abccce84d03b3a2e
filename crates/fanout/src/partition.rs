//! The state of one partition on this node, shared by its dispatcher and the
//! joins of its rooms under one lock: the members by room, the ring of recent
//! messages, the next offset to read, and the identities already delivered.
//!
//! Owns routing: [`PartitionState::dispatch`] hands each message to the
//! members of its room. Promises, for every call sequence that feeds
//! [`PartitionState::dispatch`] the partition's records in offset order:
//! - a member gets a message only when it is of one of its rooms and at or
//!   after the member's `from`, and each message at most once;
//! - a message whose identity was first seen at a lower offset is dropped
//!   for everyone and kept out of the ring;
//! - the ring holds every delivered message with an offset in
//!   `[ring_start, next)`, in offset order, and at most its capacity of them;
//! - a member whose queue is full is kicked and taken out of its room.
//!
//! Nothing here waits: the lock is a std mutex, held only by code that
//! never awaits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use eventlog::LogRecord;
use schemas::protocol::MessageView;

use crate::member::Member;
use crate::seen::{identity, SeenIds};
use crate::{message_frame, Frame};

/// A message as the dispatcher holds it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) offset: u64,
    pub(crate) room: String,
    /// Hash of (room, client id): the identity a retried send keeps.
    pub(crate) key: u64,
    pub(crate) frame: Frame,
    /// The record's append time, milliseconds since the epoch.
    pub(crate) ts: i64,
    /// Set for a read position: live only, never in the ring or a
    /// catch-up, and shown to the reader's own connections, or to every
    /// member where the room shares read positions.
    pub(crate) reader: Option<Box<Reader>>,
}

#[derive(Debug)]
pub(crate) struct Reader {
    pub(crate) user: String,
    /// The room shares its members' read positions (decided by the
    /// dispatcher, from its configuration).
    pub(crate) shared: bool,
}

/// A record this build cannot read as a chat message (a newer schema
/// during a rolling upgrade, or a corrupt one).
#[derive(Debug)]
pub(crate) struct Unreadable {
    pub(crate) error: String,
    /// The `unreadable` notice for the members of the record's room, in
    /// the message's place; `None` when the record's key names no room.
    pub(crate) notice: Option<Entry>,
}

/// Decodes a record and serializes its frame.
pub(crate) fn decode(record: &LogRecord) -> Result<Entry, Unreadable> {
    let m = match schemas::decode(&record.value) {
        Ok(schemas::ChatEvent::MessagePosted(m)) => m,
        Ok(schemas::ChatEvent::ReadPositionMoved(r)) => return Ok(read_entry(record, r)),
        Ok(schemas::ChatEvent::MessageChanged(c)) => return Ok(change_entry(record, c)),
        Err(e) => return Err(unreadable(record, e.to_string())),
    };
    let view = MessageView {
        room: m.room,
        offset: record.offset as i64,
        id: m.client_id,
        user: m.user,
        body: m.body,
        ts: m.ts,
        ..MessageView::default()
    };
    Ok(Entry {
        offset: record.offset,
        key: identity(&view.room, &view.id),
        frame: message_frame(&view),
        room: view.room,
        ts: record.ts,
        reader: None,
    })
}

/// A change (edit, delete, reaction) as its frame. It goes where a message
/// goes (the room's members, the ring, catch-ups from the log), under the
/// identity of its client id, so a retry that reached the log twice is
/// delivered once. Whether it counts (only the author edits or deletes) is
/// the projection's judgement, which the fan-out does not repeat: no
/// gateway appends a change it refused.
fn change_entry(record: &LogRecord, c: schemas::MessageChanged) -> Entry {
    let frame = schemas::protocol::change_frame(record.offset as i64, &c);
    Entry {
        offset: record.offset,
        key: identity(&c.room, &c.client_id),
        frame: Frame::from(frame),
        room: c.room,
        ts: record.ts,
        reader: None,
    }
}

/// A read position as its frame: cut, as the projector cuts it, at the
/// offset before its own record.
fn read_entry(record: &LogRecord, r: schemas::ReadPositionMoved) -> Entry {
    let offset = r.offset.min(record.offset as i64 - 1).max(-1);
    let frame = schemas::protocol::ServerFrame::Read {
        room: &r.room,
        user: &r.user,
        offset,
    }
    .to_json();
    Entry {
        offset: record.offset,
        key: identity(&r.room, &format!("\0read{}", record.offset)),
        frame: Frame::from(frame),
        room: r.room,
        ts: record.ts,
        reader: Some(Box::new(Reader {
            user: r.user,
            shared: false,
        })),
    }
}

fn unreadable(record: &LogRecord, error: String) -> Unreadable {
    let room = std::str::from_utf8(&record.key)
        .ok()
        .filter(|r| schemas::protocol::valid_room(r));
    let notice = room.map(|room| Entry {
        offset: record.offset,
        // Client ids have no control characters: this identity is the
        // record's own, never a message's.
        key: identity(room, &format!("\0{}", record.offset)),
        frame: Frame::from(schemas::protocol::unreadable_frame(
            room,
            record.offset as i64,
        )),
        room: room.to_owned(),
        ts: record.ts,
        reader: None,
    });
    Unreadable { error, notice }
}

/// A member of a room, with the first offset it has not seen yet.
pub(crate) struct Sub {
    pub(crate) member: Arc<Member>,
    pub(crate) from: u64,
}

pub(crate) struct PartitionState {
    /// Members by room; a room is present only while it has members.
    pub(crate) rooms: HashMap<String, Vec<Sub>>,
    /// Every delivered message with an offset in `[ring_start, next)`.
    pub(crate) ring: VecDeque<Entry>,
    pub(crate) ring_start: u64,
    /// Next offset the dispatcher will read.
    pub(crate) next: u64,
    pub(crate) seen: SeenIds,
}

impl PartitionState {
    /// The state of a dispatcher that starts reading at `start`, with an
    /// empty ring and room for `seen_ids` identities.
    pub(crate) fn new(start: u64, seen_ids: usize) -> Self {
        PartitionState {
            rooms: HashMap::new(),
            ring: VecDeque::new(),
            ring_start: start,
            next: start,
            seen: SeenIds::new(seen_ids),
        }
    }

    /// True when no room of the partition has a member here.
    pub(crate) fn is_idle(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Adds `member` to `room`: it gets the room's messages from `from` on.
    pub(crate) fn subscribe(&mut self, room: &str, member: Arc<Member>, from: u64) {
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .push(Sub { member, from });
    }

    /// Removes the member with id `member` from `room`, and the room when it
    /// was its last member.
    pub(crate) fn unsubscribe(&mut self, room: &str, member: u64) {
        if let Some(members) = self.rooms.get_mut(room) {
            members.retain(|s| s.member.id != member);
            if members.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// Frames of the ring's messages of `room` at or after `from`, in
    /// offset order.
    pub(crate) fn backlog(&self, room: &str, from: u64) -> Vec<Frame> {
        self.ring
            .iter()
            .filter(|e| e.offset >= from && e.room == room)
            .map(|e| e.frame.clone())
            .collect()
    }

    /// Hands each of `entries` (decoded records, in offset order, all below
    /// `next`) to the members of its room, keeps them in the ring (trimmed
    /// to `ring` messages), and moves the read position to `next`. Returns
    /// the number of frames queued.
    pub(crate) fn dispatch(&mut self, entries: Vec<Entry>, next: u64, ring: usize) -> u64 {
        let mut delivered = 0u64;
        // Asked once a batch, and only when a message is delivered here.
        let mut now: Option<i64> = None;
        for e in entries {
            if let Some(reader) = &e.reader {
                // Live only: offered where it fits, never kicking.
                if let Some(members) = self.rooms.get(&e.room) {
                    for s in members.iter().filter(|s| e.offset >= s.from) {
                        if reader.shared || s.member.user() == reader.user {
                            s.member.offer_ephemeral(e.frame.clone());
                            delivered += 1;
                        }
                    }
                }
                continue;
            }
            if !self.seen.first_sighting(e.key, e.offset) {
                ::metrics::counter!(crate::metrics::DUPLICATES_DROPPED_TOTAL).increment(1);
                continue;
            }
            if let Some(members) = self.rooms.get_mut(&e.room) {
                let before = delivered;
                members.retain(|s| {
                    if e.offset < s.from {
                        return true;
                    }
                    let ok = s.member.offer(e.frame.clone());
                    delivered += ok as u64;
                    ok
                });
                if members.is_empty() {
                    self.rooms.remove(&e.room);
                }
                if delivered > before {
                    let lag_ms = (*now.get_or_insert_with(schemas::now_ms) - e.ts).max(0);
                    ::metrics::histogram!(crate::metrics::DELIVERY_LAG_SECONDS)
                        .record(lag_ms as f64 / 1000.0);
                }
            }
            self.ring.push_back(e);
        }
        self.next = next;
        while self.ring.len() > ring {
            let dropped = self.ring.pop_front().expect("ring is not empty");
            self.ring_start = dropped.offset + 1;
        }
        if self.ring.is_empty() {
            self.ring_start = self.next;
        }
        delivered
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// A decoded message of `room` with client id `id` at `offset`.
    pub(crate) fn entry(offset: u64, room: &str, id: &str) -> Entry {
        Entry {
            offset,
            room: room.to_owned(),
            key: identity(room, id),
            frame: Frame::from(format!("{room}/{id}@{offset}")),
            ts: 0,
            reader: None,
        }
    }

    fn member(queue: usize) -> (Arc<Member>, mpsc::Receiver<Frame>, CancellationToken) {
        let (tx, rx) = mpsc::channel(queue);
        let kick = CancellationToken::new();
        (Member::new("u", tx, kick.clone()), rx, kick)
    }

    fn drain(rx: &mut mpsc::Receiver<Frame>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|f| f.as_str().to_owned())).collect()
    }

    fn read_record(offset: u64, room: &str, user: &str, upto: i64) -> LogRecord {
        let event = schemas::ChatEvent::ReadPositionMoved(schemas::ReadPositionMoved {
            room: room.into(),
            user: user.into(),
            offset: upto,
            ts: 1,
        });
        LogRecord {
            partition: 0,
            offset,
            key: room.as_bytes().to_vec(),
            value: schemas::encode(&event),
            ts: 1,
        }
    }

    #[test]
    fn a_read_position_reaches_the_readers_connections_or_every_member_where_shared() {
        let mut st = PartitionState::new(0, 64);
        let user = |name: &str| {
            let (tx, rx) = mpsc::channel(16);
            (Member::new(name, tx, CancellationToken::new()), rx)
        };
        let (ada, mut ra) = user("ada");
        let (bob, mut rb) = user("bob");
        st.subscribe("r", ada, 0);
        st.subscribe("r", bob, 0);
        // ada claims 9 at offset 3: cut at 2.
        let mut private = decode(&read_record(3, "r", "ada", 9)).unwrap();
        let mut shared = decode(&read_record(4, "r", "ada", 3)).unwrap();
        shared.reader.as_mut().unwrap().shared = true;
        private.reader.as_mut().unwrap().shared = false;
        st.dispatch(vec![private, shared], 5, 16);
        assert_eq!(
            drain(&mut ra),
            [
                r#"{"type":"read","room":"r","user":"ada","offset":2}"#,
                r#"{"type":"read","room":"r","user":"ada","offset":3}"#
            ]
        );
        assert_eq!(
            drain(&mut rb),
            [r#"{"type":"read","room":"r","user":"ada","offset":3}"#]
        );
        assert!(st.ring.is_empty(), "read positions are live only");
        assert_eq!(st.next, 5);
    }

    #[test]
    fn a_message_goes_to_its_room_from_each_members_start() {
        let mut st = PartitionState::new(0, 64);
        let (a, mut ra, _) = member(16);
        let (b, mut rb, _) = member(16);
        let (late, mut rl, _) = member(16);
        st.subscribe("a", a, 0);
        st.subscribe("b", b, 0);
        st.subscribe("a", late, 2);
        let n = st.dispatch(
            vec![entry(0, "a", "1"), entry(1, "b", "2"), entry(2, "a", "3")],
            3,
            16,
        );
        assert_eq!(n, 4);
        assert_eq!(drain(&mut ra), ["a/1@0", "a/3@2"]);
        assert_eq!(drain(&mut rb), ["b/2@1"]);
        assert_eq!(drain(&mut rl), ["a/3@2"]);
        assert_eq!(st.next, 3);
    }

    #[test]
    fn an_unreadable_record_of_a_room_becomes_its_notice() {
        let record = |key: &[u8]| LogRecord {
            partition: 0,
            offset: 7,
            key: key.to_vec(),
            value: b"\xffnot avro".to_vec(),
            ts: 1,
        };
        let u = decode(&record(b"general")).unwrap_err();
        let notice = u.notice.expect("a room's record gets a notice");
        assert_eq!((notice.offset, notice.room.as_str()), (7, "general"));
        let frame: serde_json::Value = serde_json::from_str(notice.frame.as_str()).unwrap();
        assert_eq!(
            (
                &frame["type"],
                &frame["code"],
                &frame["room"],
                &frame["offset"]
            ),
            (
                &serde_json::json!("error"),
                &serde_json::json!("unreadable"),
                &serde_json::json!("general"),
                &serde_json::json!(7)
            )
        );
        // Two notices of one room are two identities, neither a message's.
        let other = LogRecord {
            offset: 8,
            ..record(b"general")
        };
        assert_ne!(decode(&other).unwrap_err().notice.unwrap().key, notice.key);
        assert!(decode(&record(b"not a room!"))
            .unwrap_err()
            .notice
            .is_none());
    }

    #[test]
    fn a_duplicate_is_dropped_and_kept_out_of_the_ring() {
        let mut st = PartitionState::new(0, 64);
        let (a, mut ra, _) = member(16);
        st.subscribe("a", a, 0);
        st.dispatch(
            vec![entry(0, "a", "x"), entry(1, "a", "y"), entry(2, "a", "x")],
            3,
            16,
        );
        assert_eq!(drain(&mut ra), ["a/x@0", "a/y@1"]);
        assert_eq!(st.backlog("a", 0), ["a/x@0", "a/y@1"]);
    }

    #[test]
    fn the_ring_keeps_the_newest_and_knows_where_it_starts() {
        let mut st = PartitionState::new(10, 64);
        st.dispatch(
            (10..15).map(|o| entry(o, "a", &o.to_string())).collect(),
            15,
            2,
        );
        assert_eq!((st.ring_start, st.next), (13, 15));
        assert_eq!(st.backlog("a", 0), ["a/13@13", "a/14@14"]);
        assert_eq!(st.backlog("a", 14), ["a/14@14"]);
        assert!(st.backlog("b", 0).is_empty());
        // A batch without a message (another schema, say) moves `next` only.
        st.dispatch(Vec::new(), 20, 2);
        assert_eq!((st.ring_start, st.next), (13, 20));
        // An empty ring starts at the read position.
        st.dispatch(Vec::new(), 21, 0);
        assert_eq!((st.ring_start, st.next), (21, 21));
    }

    #[test]
    fn a_full_queue_kicks_its_member_out_of_the_room_and_others_keep_going() {
        let mut st = PartitionState::new(0, 64);
        let (slow, _rs, kick) = member(1);
        let (fast, mut rf, _) = member(16);
        st.subscribe("a", slow.clone(), 0);
        st.subscribe("a", fast, 0);
        st.dispatch(vec![entry(0, "a", "1"), entry(1, "a", "2")], 2, 16);
        assert!(kick.is_cancelled());
        assert_eq!(drain(&mut rf), ["a/1@0", "a/2@1"]);
        assert_eq!(st.rooms["a"].len(), 1, "the slow member is out");
        st.unsubscribe("a", slow.id);
        assert_eq!(st.rooms["a"].len(), 1);
    }

    #[test]
    fn the_last_member_out_removes_the_room() {
        let mut st = PartitionState::new(0, 64);
        let (a, _ra, _) = member(4);
        st.subscribe("a", a.clone(), 0);
        assert!(!st.is_idle());
        st.unsubscribe("b", a.id);
        assert!(!st.is_idle());
        st.unsubscribe("a", a.id);
        assert!(st.is_idle());
    }
}
