//! What the nodes tell each other on the ephemeral channel: one JSON object
//! per record, keyed by the sending node's source id, so one node's notices
//! keep their order (they share a partition).
//!
//! JSON rather than Avro: nothing here is kept, replayed or projected, and
//! a notice of a kind this build does not know is skipped (counted), never
//! an error; the fields a newer build adds are ignored.

use serde::{Deserialize, Serialize};

/// One notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Notice {
    /// The whole set of the source's users of each room named; an empty
    /// set: nobody there any more. Sent when a room's users change, and for
    /// every room of the source as its heartbeat (a heartbeat of a node
    /// with no room names none: the node is still alive).
    Rooms {
        source: String,
        rooms: Vec<RoomUsers>,
    },
    /// `user` is typing in `room`.
    Typing {
        source: String,
        room: String,
        user: String,
    },
    /// The source stops (a drain): its users leave every room now.
    Bye { source: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RoomUsers {
    pub room: String,
    pub users: Vec<String>,
}

impl Notice {
    pub(crate) fn source(&self) -> &str {
        match self {
            Notice::Rooms { source, .. }
            | Notice::Typing { source, .. }
            | Notice::Bye { source } => source,
        }
    }

    /// The metric label of its kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Notice::Rooms { .. } => "rooms",
            Notice::Typing { .. } => "typing",
            Notice::Bye { .. } => "bye",
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("notices always serialize")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Notice, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Splits `rooms` into `Rooms` notices of at most `names` user names (and
/// at least one room) each, so no record grows with the node.
pub(crate) fn rooms_notices(
    source: &str,
    rooms: Vec<(String, Vec<String>)>,
    names: usize,
) -> Vec<Notice> {
    let mut out = Vec::new();
    let mut part: Vec<RoomUsers> = Vec::new();
    let mut held = 0;
    for (room, users) in rooms {
        if !part.is_empty() && held + users.len() > names {
            out.push(Notice::Rooms {
                source: source.to_owned(),
                rooms: std::mem::take(&mut part),
            });
            held = 0;
        }
        held += users.len().max(1);
        part.push(RoomUsers { room, users });
    }
    if !part.is_empty() || out.is_empty() {
        out.push(Notice::Rooms {
            source: source.to_owned(),
            rooms: part,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_read_back_and_unknown_fields_are_ignored() {
        let n = Notice::Typing {
            source: "gw-1/ab".into(),
            room: "r".into(),
            user: "bob".into(),
        };
        assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
        let newer = br#"{"kind":"bye","source":"gw-2/cd","reason":"drain"}"#;
        assert_eq!(
            Notice::decode(newer).unwrap(),
            Notice::Bye {
                source: "gw-2/cd".into()
            }
        );
        assert!(Notice::decode(br#"{"kind":"dance","source":"x"}"#).is_err());
        assert!(Notice::decode(b"\x00\x01").is_err());
    }

    #[test]
    fn rooms_are_split_into_bounded_notices_and_a_heartbeat_is_never_empty_of_notices() {
        let rooms: Vec<(String, Vec<String>)> = (0..5)
            .map(|i| (format!("r{i}"), vec!["a".into(), "b".into()]))
            .collect();
        let notices = rooms_notices("s", rooms, 4);
        assert_eq!(notices.len(), 3);
        let total: usize = notices
            .iter()
            .map(|n| match n {
                Notice::Rooms { rooms, .. } => rooms.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(total, 5);
        assert_eq!(
            rooms_notices("s", Vec::new(), 4),
            vec![Notice::Rooms {
                source: "s".into(),
                rooms: vec![]
            }]
        );
    }
}
