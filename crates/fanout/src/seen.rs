//! Message identities, for duplicate suppression: a retried send that was
//! appended twice (a retry through another node, or after a crash) keeps its
//! room and client id, and is delivered once.
//!
//! Owns [`identity`] (the key of a message) and [`SeenIds`] (the bounded
//! memory of the identities of recent messages, with the first offset each
//! was seen at). Promises: an identity is the same for the same (room, id)
//! within this process and differs, but for hash collisions, otherwise;
//! [`SeenIds`] remembers at most its capacity, forgetting the oldest first.

use std::collections::{HashMap, VecDeque};

/// How far before a starting point fan-out looks for message identities: a
/// dispatcher warming up, a catch-up learning what the member already has.
pub(crate) const LOOKBACK: u64 = 2048;

/// The identity of a message: a hash of (room, client id).
pub(crate) fn identity(room: &str, id: &str) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    room.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

/// The recent message identities of a partition, with the first offset
/// each was seen at. Bounded: the oldest identities are forgotten first.
pub(crate) struct SeenIds {
    first: HashMap<u64, u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl SeenIds {
    pub(crate) fn new(capacity: usize) -> Self {
        SeenIds {
            first: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Records `key` at `offset`; false when it was first seen earlier (the
    /// message at `offset` is a duplicate). Seeing a key again at its first
    /// offset (a re-read) is still its first sighting.
    pub(crate) fn first_sighting(&mut self, key: u64, offset: u64) -> bool {
        match self.first.get(&key) {
            Some(&first) => first >= offset,
            None => {
                self.first.insert(key, offset);
                self.order.push_back(key);
                if self.order.len() > self.capacity {
                    let old = self.order.pop_front().expect("order is not empty");
                    self.first.remove(&old);
                }
                true
            }
        }
    }

    /// True when `key` was first seen before `offset`; records nothing.
    pub(crate) fn seen_before(&self, key: u64, offset: u64) -> bool {
        self.first.get(&key).is_some_and(|&first| first < offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_copy_is_a_duplicate_and_a_reread_is_not() {
        let mut seen = SeenIds::new(8);
        let k = identity("r", "id-1");
        assert!(seen.first_sighting(k, 5));
        assert!(
            seen.first_sighting(k, 5),
            "the same offset again is a re-read"
        );
        assert!(!seen.first_sighting(k, 9));
        assert!(seen.seen_before(k, 9));
        assert!(!seen.seen_before(k, 5));
        assert!(!seen.seen_before(identity("r", "id-2"), 9));
    }

    #[test]
    fn identities_tell_rooms_and_ids_apart() {
        assert_eq!(identity("r", "x"), identity("r", "x"));
        assert_ne!(identity("r", "x"), identity("s", "x"));
        assert_ne!(identity("r", "x"), identity("r", "y"));
        // The room and id are not simply concatenated.
        assert_ne!(identity("ab", "c"), identity("a", "bc"));
    }

    #[test]
    fn the_oldest_identity_is_forgotten_first() {
        let mut seen = SeenIds::new(2);
        assert!(seen.first_sighting(1, 0));
        assert!(seen.first_sighting(2, 1));
        assert!(seen.first_sighting(3, 2));
        assert!(!seen.seen_before(1, 10), "forgotten");
        assert!(seen.seen_before(2, 10));
        assert!(seen.seen_before(3, 10));
    }
}
