//! Joining a room: the `joined` frame, the catch-up read back from the log,
//! and the hand-over to the partition's dispatcher.
//!
//! A join knows `want`, the first offset its member lacks (from `since`, or
//! the partition's end). It then repeats two steps until handed over:
//! - [`Fanout::hand_over`], under the partition lock: [`plan()`] decides from
//!   the ring and the read position whether the member can be handed over
//!   now (the ring's messages from `want` on are queued, then the member is
//!   subscribed from `want`, all under the lock, so the dispatcher delivers
//!   exactly what follows) or must first catch up to some offset;
//! - without any lock, the catch-up of `[want, until)` at the member's pace:
//!   [`Fanout::catch_up_from_store`] sends what the history store covers of
//!   it, read by room, and [`Fanout::catch_up`] reads the rest back from the
//!   log ([`catch_up::CatchUp`] says which records to send); then
//!   `want = until`.
//!
//! Promises: the member gets every message of the room from `want` on, in
//! offset order, with no gap and no duplicate (within the identities
//! remembered), then the live ones; each step makes progress (`want` grows,
//! or the join ends); no std mutex is held across an `.await`.

mod catch_up;
pub(crate) mod from_store;
mod plan;

use std::sync::{Arc, Mutex};

use schemas::protocol::Position;

use crate::member::Member;
use crate::partition::PartitionState;
use crate::{Fanout, FanoutError};

use plan::{beyond, first_wanted, joined_frame, needs_start, plan, resumable, Plan};

/// What [`Fanout::hand_over`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandOver {
    /// The member is subscribed; the dispatcher delivers from here on.
    Done,
    /// Nothing changed; catch up to `until` first.
    CatchUp { until: u64 },
}

impl Fanout {
    /// Adds `member` to `room`. Queues the `joined` frame, then (with a
    /// `since` that can be honoured) every message after `since`, then live
    /// messages. A `since` of another epoch, past the head, or older than
    /// the partition's first retained offset is answered `recovered: false`
    /// and the member gets live messages only: it must reload the history.
    ///
    /// [`FanoutError::Slow`] when the member was kicked meanwhile (it may be
    /// subscribed: leave the room to clean up); [`FanoutError::Log`] when
    /// the log could not be read (the member is not subscribed).
    pub async fn join(
        &self,
        room: &str,
        member: &Arc<Member>,
        since: Option<&Position>,
    ) -> Result<(), FanoutError> {
        let partition = self.log.partition_for(room.as_bytes());
        let resume = since.filter(|s| s.epoch == self.log.epoch());
        let end = self.end_for_join(partition, resume).await?;
        let start = match resume {
            Some(s) if needs_start(s, end) => match self.log.start_offset(partition).await {
                Ok(start) => start,
                Err(e) => {
                    self.release(partition);
                    return Err(e.into());
                }
            },
            _ => 0,
        };
        let resume = resume.filter(|s| resumable(s, start, end));
        let recovered = since.is_none() || resume.is_some();
        let mut state = self.slot(partition, end);
        if !member.offer(joined_frame(room, end, self.log.epoch(), recovered)) {
            self.release(partition);
            return Err(FanoutError::Slow);
        }
        let mut want = first_wanted(resume, end);
        // An offset the log is known to have reached: `end`, then each
        // catch-up's `until` (a ring start or read position).
        let mut reached = end;
        loop {
            match self.hand_over(partition, &mut state, room, member, want, reached) {
                HandOver::Done => break,
                HandOver::CatchUp { until } => {
                    let caught_up = match self
                        .catch_up_from_store(partition, room, member, want, until)
                        .await
                    {
                        Ok(upto) if upto >= until => Ok(()),
                        Ok(upto) => self.catch_up(partition, room, member, upto, until).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = caught_up {
                        self.release(partition);
                        return Err(e);
                    }
                    want = until;
                    reached = reached.max(until);
                }
            }
        }
        ::metrics::gauge!(crate::metrics::PARTITIONS).set(self.slots.lock().unwrap().len() as f64);
        if member.is_kicked() {
            return Err(FanoutError::Slow);
        }
        Ok(())
    }

    /// The partition's end as a join sees it, starting the partition's
    /// dispatcher when it has none.
    ///
    /// With a dispatcher, its read position: a lower bound of the log's end,
    /// behind it by the records in flight at most, known without asking the
    /// log, so a storm of joins asks the log nothing. Only a `since` at or
    /// past that position asks the log for its end, which may be further.
    /// Without a dispatcher, one join of the partition at a time asks the log
    /// and starts the dispatcher at the end; the joins waiting meanwhile then
    /// use its position.
    async fn end_for_join(
        &self,
        partition: u32,
        resume: Option<&Position>,
    ) -> Result<u64, FanoutError> {
        let known = |next: u64| !resume.is_some_and(|s| beyond(s, next));
        if let Some(next) = self.read_position(partition) {
            return Ok(if known(next) {
                next
            } else {
                self.log.end_offset(partition).await?
            });
        }
        let _one_at_a_time = self.starting[partition as usize].lock().await;
        if let Some(next) = self.read_position(partition) {
            if known(next) {
                return Ok(next);
            }
        }
        let end = self.log.end_offset(partition).await?;
        self.slot(partition, end);
        Ok(end)
    }

    /// The read position of the partition's dispatcher, if it has one.
    fn read_position(&self, partition: u32) -> Option<u64> {
        self.state_of(partition).map(|st| st.lock().unwrap().next)
    }

    /// One hand-over attempt, entirely under the slots and partition locks
    /// (it never awaits). Either subscribes `member` to `room` from `want`
    /// on, after queueing the ring's messages from `want` on
    /// ([`HandOver::Done`]), or changes nothing and says up to where the
    /// member must catch up first. `reached` is an offset the log is known
    /// to have reached.
    ///
    /// When `state` is no longer the partition's (a concurrent leave stopped
    /// its dispatcher), it starts another dispatcher and plans with that
    /// one: at `want` (later joiners filter by their own start), but never
    /// past `reached`: a dispatcher starting beyond the log's end would wait
    /// for records that do not exist yet and hold up the whole partition.
    pub(crate) fn hand_over(
        &self,
        partition: u32,
        state: &mut Arc<Mutex<PartitionState>>,
        room: &str,
        member: &Arc<Member>,
        want: u64,
        reached: u64,
    ) -> HandOver {
        loop {
            let slots = self.slots.lock().unwrap();
            let current = slots.get(&partition).map(|s| &s.state);
            if !current.is_some_and(|c| Arc::ptr_eq(c, state)) {
                drop(slots);
                *state = self.slot(partition, want.min(reached));
                continue;
            }
            let mut st = state.lock().unwrap();
            match plan(&st, room, want, member.free()) {
                Plan::CatchUp { until } => return HandOver::CatchUp { until },
                Plan::Live => {}
                Plan::FromRing { backlog } => {
                    for frame in backlog {
                        if !member.offer(frame) {
                            break;
                        }
                    }
                }
            }
            st.subscribe(room, member.clone(), want);
            return HandOver::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{expect_joined, expect_message, record, Harness, DEADLINE};

    /// A hand-over whose dispatcher was stopped (a concurrent leave) starts
    /// another, never past what the log is known to hold: else the new
    /// dispatcher would wait in its warm-up for offsets that do not exist
    /// yet and deliver nothing to anyone on the partition.
    #[tokio::test]
    async fn a_replaced_dispatcher_never_starts_past_the_log() {
        let h = Harness::new(1, Default::default());
        h.append(&[record("a", "0", "before")]).await;
        // The join of `a` with a `since` past the head saw end 1 and a slot,
        // then a concurrent leave released the partition.
        let mut stale = h.fanout.slot(0, 1);
        h.fanout.release(0);
        assert!(h.fanout.active_partitions().is_empty());
        let (joiner, mut joiner_rx, _) = h.member(16);
        let done = h.fanout.hand_over(0, &mut stale, "a", &joiner, 1000, 1);
        assert_eq!(done, HandOver::Done);
        let next = stale.lock().unwrap().next;
        assert_eq!(next, 1, "the replacement starts at the known end");
        // The partition still works for everyone.
        let (other, mut other_rx, _) = h.member(16);
        tokio::time::timeout(DEADLINE, h.fanout.join("b", &other, None))
            .await
            .expect("the join ends")
            .unwrap();
        expect_joined(&mut other_rx).await;
        let offsets = h.append(&[record("b", "1", "live")]).await;
        let got = expect_message(&mut other_rx).await;
        assert_eq!((got.room.as_str(), got.offset), ("b", offsets[0] as i64));
        // The joiner that claimed offsets up to 999 gets nothing below 1000.
        assert!(joiner_rx.try_recv().is_err());
        h.fanout.shutdown().await;
    }
}
