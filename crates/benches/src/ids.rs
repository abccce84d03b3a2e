//! Message ids that carry what the load generator needs to measure a message
//! when it comes back: which run and phase sent it, from which connection, its
//! sequence number, and its intended send time.
//!
//! The id is shaped like a UUID (36 characters, 8-4-4-4-12 hex), so the
//! server handles ids of the length real clients send. Nothing is kept per
//! message in flight: an `ack` or `message` frame alone says when the message
//! was meant to be sent, which is what latency is measured from (open loop:
//! a server stall delays the receipt, never the intended time).

use std::fmt::Write;

/// What a load-generator message id encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgId {
    /// Identifies one `chat-load` run; frames of another run are ignored.
    pub run: u16,
    /// Traffic phase of the run (one step of `ingest-max`, say).
    pub phase: u8,
    /// Index of the sending connection (24 bits).
    pub conn: u32,
    /// Sequence number of the message on its connection, from 0.
    pub seq: u32,
    /// Intended send time, microseconds since the run's start (48 bits).
    pub intended_us: u64,
}

const CONN_BITS: u32 = 24;
const TIME_BITS: u32 = 48;

impl MsgId {
    /// Largest connection index an id can carry.
    pub const MAX_CONN: u32 = (1 << CONN_BITS) - 1;

    /// Length of the binary form ([`MsgId::to_bytes`]).
    pub const BYTES: usize = 16;

    fn to_u128(self) -> u128 {
        ((self.run as u128) << 112)
            | ((self.phase as u128) << 104)
            | (((self.conn & Self::MAX_CONN) as u128) << 80)
            | ((self.seq as u128) << 48)
            | (self.intended_us & ((1 << TIME_BITS) - 1)) as u128
    }

    fn from_u128(n: u128) -> MsgId {
        MsgId {
            run: (n >> 112) as u16,
            phase: (n >> 104) as u8,
            conn: ((n >> 80) as u32) & Self::MAX_CONN,
            seq: (n >> 48) as u32,
            intended_us: (n & ((1 << TIME_BITS) - 1)) as u64,
        }
    }

    /// The id in 16 bytes (big-endian), for payloads that are not text.
    pub fn to_bytes(self) -> [u8; Self::BYTES] {
        self.to_u128().to_be_bytes()
    }

    /// Reads the id from the first 16 bytes of `bytes`; None when shorter.
    pub fn from_bytes(bytes: &[u8]) -> Option<MsgId> {
        let head: [u8; Self::BYTES] = bytes.get(..Self::BYTES)?.try_into().ok()?;
        Some(Self::from_u128(u128::from_be_bytes(head)))
    }

    /// The id as sent: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn encode(self) -> String {
        let hex = format!("{:032x}", self.to_u128());
        let mut s = String::with_capacity(36);
        for (i, part) in [(0, 8), (8, 12), (12, 16), (16, 20), (20, 32)]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                s.push('-');
            }
            let _infallible = s.write_str(&hex[part.0..part.1]);
        }
        s
    }

    /// Parses an id written by [`MsgId::encode`]; None for any other id.
    pub fn decode(id: &str) -> Option<MsgId> {
        if id.len() != 36 {
            return None;
        }
        let mut n: u128 = 0;
        let mut digits = 0;
        for (i, b) in id.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return None;
                }
                continue;
            }
            let d = (b as char).to_digit(16)?;
            n = (n << 4) | d as u128;
            digits += 1;
        }
        if digits != 32 {
            return None;
        }
        Some(Self::from_u128(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_look_like_uuids() {
        let id = MsgId {
            run: 0xbeef,
            phase: 7,
            conn: 19_999,
            seq: 123_456,
            intended_us: 86_400_000_000,
        };
        let s = id.encode();
        assert_eq!(s.len(), 36);
        assert_eq!(s.matches('-').count(), 4);
        assert_eq!(MsgId::decode(&s), Some(id));
        let max = MsgId {
            run: u16::MAX,
            phase: u8::MAX,
            conn: MsgId::MAX_CONN,
            seq: u32::MAX,
            intended_us: (1 << 48) - 1,
        };
        assert_eq!(MsgId::decode(&max.encode()), Some(max));
        let mut payload = max.to_bytes().to_vec();
        payload.extend_from_slice(b"xxxx");
        assert_eq!(MsgId::from_bytes(&payload), Some(max));
        assert_eq!(MsgId::from_bytes(&payload[..15]), None);
    }

    #[test]
    fn foreign_ids_are_not_ours() {
        assert_eq!(MsgId::decode("hello"), None);
        assert_eq!(MsgId::decode("zzzzzzzz-0000-0000-0000-000000000000"), None);
        assert_eq!(MsgId::decode("00000000_0000-0000-0000-000000000000"), None);
        assert!(MsgId::decode("6f1c2b9e-3c1d-4a55-9a7e-0b8c2d1e4f60").is_some());
    }
}
