//! The catch-up of a join: the room's messages older than the ring (or
//! more than the member's queue takes at once), read back from the log at
//! the member's pace.
//!
//! Owns [`CatchUp`], the record-by-record decisions, pure, and
//! [`Fanout::catch_up`], which feeds it a read of the partition. Promises:
//! the member gets the room's messages in `[from, until)` in offset order,
//! but for copies of a message it has (within [`LOOKBACK`] before `from`),
//! was just sent, or the dispatcher saw first at a lower offset; the
//! catch-up ends at the first record at or after `until - 1`, whatever its
//! room; it waits for room in the member's queue, up to the stall that
//! kicks a member ([`crate::FanoutConfig::catch_up_stall`]); at most
//! [`crate::FanoutConfig::catch_up_reads`] of them read the log at once; it
//! holds no lock across an await.

use eventlog::LogRecord;
use futures::StreamExt;

use crate::member::Member;
use crate::partition::{decode, Entry};
use crate::seen::{SeenIds, LOOKBACK};
use crate::{Fanout, FanoutError};

/// What a catch-up does with one record.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Not for the member: another room's, one it has, a duplicate, or not
    /// a message this build reads.
    Skip,
    /// Send the message.
    Send(Entry),
}

/// The record-by-record decisions of a catch-up of `room` over
/// `[from, until)`, fed the partition's records in offset order from
/// [`CatchUp::read_from`] on.
pub(crate) struct CatchUp<'a> {
    room: &'a str,
    from: u64,
    until: u64,
    /// Identities of the room's messages the member has (read before
    /// `from`) or was sent by this catch-up, with their first offsets.
    sent: SeenIds,
}

impl<'a> CatchUp<'a> {
    /// A catch-up of `room` over `[from, until)`; `from < until`.
    pub(crate) fn new(room: &'a str, from: u64, until: u64) -> Self {
        CatchUp {
            room,
            from,
            until,
            sent: SeenIds::new(usize::MAX),
        }
    }

    /// Where to start reading: a little before `from` too, because a
    /// message the member already has may have been appended again after it
    /// (a retry) and must not be delivered a second time.
    pub(crate) fn read_from(&self) -> u64 {
        self.from.saturating_sub(LOOKBACK)
    }

    /// Decides about `record`, and says whether the catch-up is complete
    /// with it. `seen_before(key, offset)` tells whether the dispatcher
    /// first saw the identity `key` before `offset`. Complete means: the
    /// record is at `until - 1` or later, whatever its room, so a partition
    /// whose last record before `until` is another room's still ends it.
    pub(crate) fn admit(
        &mut self,
        record: &LogRecord,
        seen_before: impl FnOnce(u64, u64) -> bool,
    ) -> (Verdict, bool) {
        if record.offset >= self.until {
            return (Verdict::Skip, true);
        }
        let last = record.offset + 1 >= self.until;
        if record.key != self.room.as_bytes() {
            return (Verdict::Skip, last);
        }
        let e = match decode(record) {
            // A read position is live only: a catch-up leaves it out.
            Ok(e) if e.reader.is_some() => return (Verdict::Skip, last),
            Ok(e) => e,
            // The member is told in the message's place (the dispatcher
            // counted and logged it).
            Err(u) => {
                return match u.notice {
                    Some(notice) if record.offset >= self.from => (Verdict::Send(notice), last),
                    _ => (Verdict::Skip, last),
                }
            }
        };
        if record.offset < self.from {
            // The member has it: remember it, to recognise a later copy.
            self.sent.first_sighting(e.key, e.offset);
            return (Verdict::Skip, last);
        }
        let duplicate = !self.sent.first_sighting(e.key, e.offset) || seen_before(e.key, e.offset);
        if e.room != self.room || duplicate {
            return (Verdict::Skip, last);
        }
        (Verdict::Send(e), last)
    }
}

impl Fanout {
    /// Sends `member` the messages of `room` in `[from, until)`, read back
    /// from the log, waiting for room in its queue (its own pace), without a
    /// duplicate of what it has or of what the dispatcher already saw.
    /// Holds no lock across an await.
    pub(crate) async fn catch_up(
        &self,
        partition: u32,
        room: &str,
        member: &Member,
        from: u64,
        until: u64,
    ) -> Result<(), FanoutError> {
        if from >= until {
            return Ok(());
        }
        let state = self.state_of(partition);
        let seen_before = |key: u64, offset: u64| {
            state
                .as_ref()
                .is_some_and(|st| st.lock().unwrap().seen.seen_before(key, offset))
        };
        // The semaphore is never closed.
        let _reading = self.catch_up_reads.acquire().await.ok();
        let mut catch_up = CatchUp::new(room, from, until);
        let mut stream = self.log.read(partition, catch_up.read_from());
        while let Some(batch) = stream.next().await {
            for record in batch? {
                let (verdict, done) = catch_up.admit(&record, seen_before);
                if let Verdict::Send(e) = verdict {
                    member
                        .send_paced(e.frame, self.config.catch_up_stall)
                        .await?;
                    ::metrics::counter!(crate::metrics::CATCH_UP_MESSAGES_TOTAL, "source" => "log")
                        .increment(1);
                }
                if done {
                    return Ok(());
                }
            }
        }
        Err(FanoutError::Log(eventlog::LogError::Unavailable(
            "log read ended".into(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::record;

    fn log_record(offset: u64, room: &str, id: &str) -> LogRecord {
        let r = record(room, id, "hi");
        LogRecord {
            partition: 0,
            offset,
            key: r.key,
            value: r.value,
            ts: r.ts,
        }
    }

    fn never_seen(_: u64, _: u64) -> bool {
        false
    }

    /// The offset sent (if any) and whether the catch-up is complete.
    fn admit(
        c: &mut CatchUp,
        r: &LogRecord,
        seen_before: fn(u64, u64) -> bool,
    ) -> (Option<u64>, bool) {
        let (v, done) = c.admit(r, seen_before);
        let sent = match v {
            Verdict::Send(e) => Some(e.offset),
            Verdict::Skip => None,
        };
        (sent, done)
    }

    /// An unreadable record of the room in range is sent as its notice;
    /// one the member already had is not.
    #[test]
    fn a_catch_up_sends_the_notice_of_an_unreadable_record() {
        let garbage = |offset: u64| LogRecord {
            value: b"\xffnot avro".to_vec(),
            ..log_record(offset, "a", "x")
        };
        let mut c = CatchUp::new("a", 2, 4);
        assert_eq!(admit(&mut c, &garbage(1), never_seen), (None, false));
        let (v, done) = c.admit(&garbage(2), never_seen);
        let Verdict::Send(notice) = v else {
            panic!("the notice is sent")
        };
        assert!(!done);
        assert_eq!(notice.offset, 2);
        assert!(notice.frame.as_str().contains(r#""code":"unreadable""#));
        assert_eq!(
            admit(&mut c, &log_record(3, "a", "y"), never_seen),
            (Some(3), true)
        );
    }

    #[test]
    fn a_catch_up_sends_its_rooms_messages_in_range() {
        let mut c = CatchUp::new("a", 1, 4);
        assert_eq!(c.read_from(), 0);
        let got: Vec<(Option<u64>, bool)> = [
            log_record(0, "a", "x"),
            log_record(1, "a", "y"),
            log_record(2, "b", "z"),
            log_record(3, "a", "w"),
            log_record(4, "a", "v"),
        ]
        .iter()
        .map(|r| admit(&mut c, r, never_seen))
        .collect();
        assert_eq!(
            got,
            [
                (None, false),
                (Some(1), false),
                (None, false),
                (Some(3), true),
                (None, true)
            ]
        );
    }

    #[test]
    fn another_rooms_last_record_ends_a_catch_up() {
        let mut c = CatchUp::new("a", 0, 3);
        assert_eq!(
            admit(&mut c, &log_record(0, "a", "x"), never_seen),
            (Some(0), false)
        );
        assert_eq!(
            admit(&mut c, &log_record(1, "a", "y"), never_seen),
            (Some(1), false)
        );
        assert_eq!(
            admit(&mut c, &log_record(2, "b", "z"), never_seen),
            (None, true)
        );
    }

    #[test]
    fn an_unreadable_last_record_ends_a_catch_up_with_its_notice() {
        let mut c = CatchUp::new("a", 0, 2);
        let mut junk = log_record(1, "a", "x");
        junk.value = b"not avro".to_vec();
        assert_eq!(
            admit(&mut c, &log_record(0, "a", "w"), never_seen),
            (Some(0), false)
        );
        assert_eq!(admit(&mut c, &junk, never_seen), (Some(1), true));
    }

    #[test]
    fn a_catch_up_skips_copies_of_what_the_member_has_or_was_sent() {
        let mut c = CatchUp::new("a", 2, 10);
        assert_eq!(
            c.read_from(),
            0,
            "the lookback reaches the partition's start"
        );
        // Offsets 0 and 1: the member has them.
        assert_eq!(
            admit(&mut c, &log_record(0, "a", "x"), never_seen),
            (None, false)
        );
        assert_eq!(
            admit(&mut c, &log_record(1, "a", "y"), never_seen),
            (None, false)
        );
        // A retry of x appended again: not sent.
        assert_eq!(
            admit(&mut c, &log_record(2, "a", "x"), never_seen),
            (None, false)
        );
        assert_eq!(
            admit(&mut c, &log_record(3, "a", "z"), never_seen),
            (Some(3), false)
        );
        // A retry of z, just sent: not sent again.
        assert_eq!(
            admit(&mut c, &log_record(4, "a", "z"), never_seen),
            (None, false)
        );
        // The same id in another room is another room's message.
        assert_eq!(
            admit(&mut c, &log_record(5, "b", "z"), never_seen),
            (None, false)
        );
        // One the dispatcher saw first at a lower offset: not sent.
        assert_eq!(
            admit(&mut c, &log_record(6, "a", "q"), |_, _| true),
            (None, false)
        );
        assert_eq!(
            admit(&mut c, &log_record(7, "a", "r"), never_seen),
            (Some(7), false)
        );
    }

    #[test]
    fn a_catch_up_far_from_the_start_looks_back_a_bounded_way() {
        let c = CatchUp::new("a", 10_000, 10_010);
        assert_eq!(c.read_from(), 10_000 - LOOKBACK);
    }
}
