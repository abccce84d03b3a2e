//! The pure decisions of a join: where it starts, what its `joined` frame
//! says, and, from a partition's ring and read position, whether it is
//! served from the ring, is live at once, or must catch up first.
//!
//! Promises: nothing here locks, waits or changes state; [`plan`] answers a
//! catch-up only with an `until` above the offset asked for, so every step
//! of a join makes progress.

use schemas::protocol::{Position, ServerFrame};

use crate::partition::PartitionState;
use crate::Frame;

/// The first offset a member joining with `resume` (a `since` of this
/// epoch) lacks, the partition's end being `end`: one past `since` (a
/// `since` below -1 counts as -1), or the end without one.
pub(crate) fn first_wanted(resume: Option<&Position>, end: u64) -> u64 {
    match resume {
        // At least 0, so the cast is exact; saturating for `i64::MAX`.
        Some(s) => s.offset.max(-1).saturating_add(1) as u64,
        None => end,
    }
}

/// Whether a `since` of this epoch can be honoured on a partition that
/// holds offsets `[start, end)`: it covers an offset the partition has had
/// (-1, before the first one, up to the head `end - 1`), and the first
/// offset it lacks is still held (no gap below `start`, the first retained
/// offset). A `since` past the head names messages that do not exist; one
/// older than retention has lost messages. Neither can be resumed without
/// a lie: the join is answered `recovered: false` and goes live.
pub(crate) fn resumable(since: &Position, start: u64, end: u64) -> bool {
    let head = i64::try_from(end).unwrap_or(i64::MAX) - 1;
    let first = i64::try_from(start).unwrap_or(i64::MAX);
    (-1..=head).contains(&since.offset) && since.offset + 1 >= first
}

/// Whether honouring `since` depends on the partition's first retained
/// offset: only when it lacks offsets below `end` (a `since` at the head or
/// past it lacks none that could be gone).
pub(crate) fn needs_start(since: &Position, end: u64) -> bool {
    since.offset.saturating_add(1) < i64::try_from(end).unwrap_or(i64::MAX)
}

/// Whether `since` names an offset at or past `next`: one a dispatcher that
/// reads from `next` on has not read yet.
pub(crate) fn beyond(since: &Position, next: u64) -> bool {
    since.offset >= i64::try_from(next).unwrap_or(i64::MAX)
}

/// The `joined` frame: the partition's head (its last offset, -1 when
/// empty) given its `end`.
pub(crate) fn joined_frame(room: &str, end: u64, epoch: &str, recovered: bool) -> Frame {
    Frame::from(
        ServerFrame::Joined {
            room,
            position: Position {
                offset: end as i64 - 1,
                epoch: epoch.to_owned(),
            },
            recovered,
        }
        .to_json(),
    )
}

/// What a join that wants offsets from `want` on must do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `want` is at or past the dispatcher's read position: nothing to
    /// replay, subscribe from `want`.
    Live,
    /// The ring holds every message from `want` on, and the member's queue
    /// has room for the room's ones (`backlog`, in offset order): queue
    /// them, then subscribe from `want`.
    FromRing { backlog: Vec<Frame> },
    /// Read `[want, until)` back from the log first (`want` is older than
    /// the ring, or the ring's share is more than the queue takes now), then
    /// plan again. `until > want`.
    CatchUp { until: u64 },
}

/// Decides, from the partition's ring and read position, how a join of
/// `room` that wants offsets from `want` on, for a member whose queue can
/// take `free` frames now, goes on. Pure: reads `st`, changes nothing.
pub(crate) fn plan(st: &PartitionState, room: &str, want: u64, free: usize) -> Plan {
    if want < st.ring_start {
        return Plan::CatchUp {
            until: st.ring_start,
        };
    }
    if want >= st.next {
        return Plan::Live;
    }
    let backlog = st.backlog(room, want);
    if backlog.len() <= free {
        Plan::FromRing { backlog }
    } else {
        // More than the queue holds: read it back at the member's pace.
        Plan::CatchUp { until: st.next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::entry;
    use crate::partition::Entry;

    fn state(start: u64, entries: Vec<Entry>, next: u64, ring: usize) -> PartitionState {
        let mut st = PartitionState::new(start, 64);
        st.dispatch(entries, next, ring);
        st
    }

    #[test]
    fn the_first_wanted_offset_follows_since() {
        let at = |offset| Position {
            offset,
            epoch: "e".into(),
        };
        assert_eq!(first_wanted(None, 7), 7);
        assert_eq!(first_wanted(Some(&at(3)), 7), 4);
        assert_eq!(first_wanted(Some(&at(-1)), 7), 0);
        assert_eq!(first_wanted(Some(&at(-40)), 7), 0, "below -1 counts as -1");
        assert_eq!(first_wanted(Some(&at(100)), 7), 101, "past the head");
        assert_eq!(first_wanted(Some(&at(i64::MAX)), 7), i64::MAX as u64);
    }

    #[test]
    fn a_since_is_resumable_only_within_what_the_partition_holds() {
        let at = |offset| Position {
            offset,
            epoch: "e".into(),
        };
        // Offsets 0..10 held.
        assert!(resumable(&at(-1), 0, 10));
        assert!(resumable(&at(3), 0, 10));
        assert!(resumable(&at(9), 0, 10), "at the head");
        assert!(!resumable(&at(10), 0, 10), "past the head");
        assert!(!resumable(&at(i64::MAX), 0, 10));
        assert!(!resumable(&at(-2), 0, 10));
        assert!(!resumable(&at(i64::MIN), 0, 10));
        assert!(
            resumable(&at(-1), 0, 0),
            "an empty partition, from the start"
        );
        assert!(!resumable(&at(0), 0, 0));
        // Offsets below 4 deleted: 4..10 held.
        assert!(resumable(&at(3), 4, 10), "lacks 4 on, all held");
        assert!(!resumable(&at(2), 4, 10), "lacks 3, which is gone");
        assert!(!resumable(&at(-1), 4, 10));
        assert!(resumable(&at(9), 10, 10), "every record gone, none lacked");
        // Only a since that lacks something below the end needs the start.
        assert!(needs_start(&at(3), 10));
        assert!(!needs_start(&at(9), 10));
        assert!(!needs_start(&at(i64::MAX), 10));
        assert!(needs_start(&at(-1), 1));
        assert!(!needs_start(&at(-1), 0));
        // A since the dispatcher has not read up to is checked with the log.
        assert!(beyond(&at(10), 10));
        assert!(beyond(&at(i64::MAX), 10));
        assert!(!beyond(&at(9), 10));
        assert!(!beyond(&at(-1), 0));
        assert!(beyond(&at(0), 0));
        assert!(!beyond(&at(0), u64::MAX));
    }

    #[test]
    fn the_joined_frame_names_the_head() {
        let f = joined_frame("r", 0, "e1", true);
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["type"], "joined");
        assert_eq!(v["position"]["offset"], -1);
        assert_eq!(v["position"]["epoch"], "e1");
        assert_eq!(v["recovered"], true);
        let f = joined_frame("r", 10, "e1", false);
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["position"]["offset"], 9);
        assert_eq!(v["recovered"], false);
    }

    #[test]
    fn a_join_older_than_the_ring_catches_up_to_its_start() {
        // Ring of 2 over offsets 10..15: it starts at 13.
        let st = state(
            10,
            (10..15).map(|o| entry(o, "a", &o.to_string())).collect(),
            15,
            2,
        );
        assert_eq!(plan(&st, "a", 4, 100), Plan::CatchUp { until: 13 });
        assert_eq!(plan(&st, "a", 12, 100), Plan::CatchUp { until: 13 });
    }

    #[test]
    fn a_join_within_the_ring_is_served_the_rooms_share_from_it() {
        let st = state(
            0,
            vec![entry(0, "a", "1"), entry(1, "b", "2"), entry(2, "a", "3")],
            4,
            16,
        );
        assert_eq!(
            plan(&st, "a", 0, 100),
            Plan::FromRing {
                backlog: vec![Frame::from("a/1@0"), Frame::from("a/3@2")]
            }
        );
        assert_eq!(
            plan(&st, "a", 1, 100),
            Plan::FromRing {
                backlog: vec![Frame::from("a/3@2")]
            }
        );
        assert_eq!(plan(&st, "a", 3, 100), Plan::FromRing { backlog: vec![] });
        assert_eq!(plan(&st, "c", 0, 0), Plan::FromRing { backlog: vec![] });
    }

    #[test]
    fn a_ring_share_larger_than_the_queue_is_caught_up_instead() {
        let st = state(
            0,
            (0..5).map(|o| entry(o, "a", &o.to_string())).collect(),
            5,
            16,
        );
        assert_eq!(plan(&st, "a", 2, 2), Plan::CatchUp { until: 5 });
        assert!(matches!(plan(&st, "a", 2, 3), Plan::FromRing { .. }));
    }

    #[test]
    fn a_join_at_or_past_the_read_position_is_live() {
        let st = state(0, vec![entry(0, "a", "1")], 1, 16);
        assert_eq!(plan(&st, "a", 1, 0), Plan::Live);
        assert_eq!(plan(&st, "a", 1000, 0), Plan::Live);
    }
}
