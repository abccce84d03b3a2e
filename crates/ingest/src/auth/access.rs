//! Who may use a room: the direct-message rule and the `rooms` claim.
//!
//! A direct-message room `dm:A:B` is open to A and B only. A token's
//! optional `rooms` claim narrows every room further, direct messages
//! included: it lists room names and prefix patterns (`team-a.*` is every
//! room whose name starts with `team-a.`, `dm:*` every direct-message room,
//! `*` every room). Without the claim, a user may use every public room and
//! its own direct messages. The same rule answers joins, sends, typing and
//! history reads, on every node.

use schemas::protocol::{dm_members, ErrorCode, FrameError, RoomPatterns};

/// The rooms a token grants, from its `rooms` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomGrant(RoomPatterns);

impl RoomGrant {
    /// Parses the entries of a `rooms` claim; an entry that is neither a
    /// valid room name nor a prefix pattern (`PREFIX*`, the prefix made of
    /// room-name characters and `:`) refuses the whole claim.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<RoomGrant, String> {
        RoomPatterns::parse(entries)
            .map(RoomGrant)
            .map_err(|e| format!("{e} in the rooms claim"))
    }

    /// True when the grant covers `room`.
    pub fn covers(&self, room: &str) -> bool {
        self.0.covers(room)
    }
}

/// Whether `user`, holding `grant` (None: no `rooms` claim), may join, send
/// to and read `room` (a valid room name).
pub fn may_use(user: &str, grant: Option<&RoomGrant>, room: &str) -> bool {
    if let Some((a, b)) = dm_members(room) {
        if user != a && user != b {
            return false;
        }
    }
    grant.is_none_or(|g| g.covers(room))
}

/// The `forbidden` answer to a request for `room`.
pub fn forbidden(room: &str, id: Option<String>) -> FrameError {
    FrameError::new(
        ErrorCode::Forbidden,
        format!("this user may not use the room {room}"),
        id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_message_room_is_open_to_its_two_users_only() {
        assert!(may_use("alice", None, "dm:alice:bob"));
        assert!(may_use("bob", None, "dm:alice:bob"));
        assert!(!may_use("carol", None, "dm:alice:bob"));
        assert!(may_use("carol", None, "general"));
    }

    #[test]
    fn a_rooms_claim_narrows_every_room_direct_messages_included() {
        let grant = RoomGrant::parse(&["general", "team-a.*"]).unwrap();
        assert!(may_use("alice", Some(&grant), "general"));
        assert!(may_use("alice", Some(&grant), "team-a.ops"));
        assert!(!may_use("alice", Some(&grant), "team-b.ops"));
        assert!(!may_use("alice", Some(&grant), "generalx"));
        assert!(!may_use("alice", Some(&grant), "dm:alice:bob"));
        let dms = RoomGrant::parse(&["dm:*"]).unwrap();
        assert!(may_use("alice", Some(&dms), "dm:alice:bob"));
        assert!(!may_use("carol", Some(&dms), "dm:alice:bob"));
        let all = RoomGrant::parse(&["*"]).unwrap();
        assert!(may_use("alice", Some(&all), "anything"));
        let none = RoomGrant::parse::<&str>(&[]).unwrap();
        assert!(!may_use("alice", Some(&none), "general"));
    }

    #[test]
    fn a_bad_entry_refuses_the_claim() {
        for bad in ["", "a b", "x*y", "bad/room", "dm:bob:alice", "*x*"] {
            assert!(RoomGrant::parse(&[bad]).is_err(), "{bad:?}");
        }
    }
}
