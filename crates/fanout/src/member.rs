//! A connected client as the dispatchers see it: its bounded outbound queue
//! and the token that kicks it.
//!
//! Owns the slow-consumer policy. Promises:
//! - [`Member::offer`] never waits: a frame that does not fit (full or closed
//!   queue) kicks the member (cancels its `kick` token, counts one slow
//!   consumer); a kicked member is offered nothing more;
//! - [`Member::send_paced`] is the one path that waits for room in the queue
//!   (a catch-up goes at the client's pace), up to a stall: a client whose
//!   queue stays full that long is kicked too, so a client that stops
//!   reading holds no catch-up for ever;
//! - every member gets an id no other member of this process has.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{FanoutError, Frame};

/// One connected client, as the dispatchers see it.
pub struct Member {
    pub(crate) id: u64,
    user: String,
    tx: mpsc::Sender<Frame>,
    kick: CancellationToken,
}

impl Member {
    /// `tx` is the member's bounded outbound queue; `kick` is cancelled when
    /// the member must be closed as a slow consumer.
    pub fn new(user: &str, tx: mpsc::Sender<Frame>, kick: CancellationToken) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Member {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            user: user.to_owned(),
            tx,
            kick,
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Queues a frame without waiting; false when it was not queued. A full
    /// or closed queue kicks the member.
    pub(crate) fn offer(&self, frame: Frame) -> bool {
        if self.kick.is_cancelled() {
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(_) => {
                ::metrics::counter!(crate::metrics::SLOW_CONSUMERS_TOTAL).increment(1);
                self.kick.cancel();
                false
            }
        }
    }

    /// Queues a frame for an ephemeral broadcast: dropped, without a kick,
    /// when the queue is full.
    pub(crate) fn offer_ephemeral(&self, frame: Frame) {
        let _dropped_when_full = self.tx.try_send(frame);
    }

    /// Queues a frame, waiting for room in the queue (the catch-up's pace)
    /// for up to `stall`; a queue still full then kicks the member.
    /// [`FanoutError::Slow`] when the queue is closed or the member is
    /// kicked (meanwhile, or for this stall).
    pub(crate) async fn send_paced(
        &self,
        frame: Frame,
        stall: Duration,
    ) -> Result<(), FanoutError> {
        let frame = match self.tx.try_send(frame) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(FanoutError::Slow),
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
        };
        tokio::select! {
            sent = self.tx.send(frame) => sent.map_err(|_| FanoutError::Slow),
            _ = self.kick.cancelled() => Err(FanoutError::Slow),
            _ = tokio::time::sleep(stall) => {
                ::metrics::counter!(crate::metrics::SLOW_CONSUMERS_TOTAL).increment(1);
                self.kick.cancel();
                Err(FanoutError::Slow)
            }
        }
    }

    /// Frames the queue can take now without waiting.
    pub(crate) fn free(&self) -> usize {
        self.tx.capacity()
    }

    /// True once the member has been kicked as a slow consumer.
    pub(crate) fn is_kicked(&self) -> bool {
        self.kick.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_kicks_and_nothing_more_is_offered() {
        let (tx, mut rx) = mpsc::channel(1);
        let kick = CancellationToken::new();
        let m = Member::new("u", tx, kick.clone());
        assert!(m.offer(Frame::from("a")));
        assert!(!m.is_kicked());
        assert!(!m.offer(Frame::from("b")), "the queue holds one frame");
        assert!(kick.is_cancelled());
        assert_eq!(rx.try_recv().unwrap().as_str(), "a");
        assert!(!m.offer(Frame::from("c")), "a kicked member gets nothing");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_ephemeral_frame_for_a_full_queue_is_dropped_without_a_kick() {
        let (tx, mut rx) = mpsc::channel(1);
        let kick = CancellationToken::new();
        let m = Member::new("u", tx, kick.clone());
        m.offer_ephemeral(Frame::from("a"));
        m.offer_ephemeral(Frame::from("b"));
        assert!(!kick.is_cancelled());
        assert_eq!(rx.try_recv().unwrap().as_str(), "a");
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_send_waits_for_room_then_kicks_a_member_that_stalls() {
        let (tx, mut rx) = mpsc::channel(1);
        let kick = CancellationToken::new();
        let m = Member::new("u", tx, kick.clone());
        let stall = Duration::from_secs(10);
        m.send_paced(Frame::from("a"), stall).await.unwrap();
        // The queue is full: the send waits until the client reads.
        let (sent, read) = tokio::join!(m.send_paced(Frame::from("b"), stall), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            rx.recv().await
        });
        sent.unwrap();
        assert_eq!(read.unwrap().as_str(), "a");
        assert!(!kick.is_cancelled(), "it read within the stall");
        // Nobody reads any more: the send gives up after the stall, kicked.
        assert!(matches!(
            m.send_paced(Frame::from("c"), stall).await,
            Err(FanoutError::Slow)
        ));
        assert!(kick.is_cancelled());
        assert_eq!(rx.try_recv().unwrap().as_str(), "b");
        assert!(rx.try_recv().is_err(), "c was not queued");
    }

    #[test]
    fn members_get_distinct_ids() {
        let (tx, _rx) = mpsc::channel(1);
        let a = Member::new("u", tx.clone(), CancellationToken::new());
        let b = Member::new("u", tx, CancellationToken::new());
        assert_ne!(a.id, b.id);
        assert_eq!(a.user(), "u");
    }
}
