//! Idempotent sends: the gateway remembers recent client message ids, so a
//! `send` retried with the same `id` is answered with the first attempt's ack
//! instead of being appended again.
//!
//! The cache is bounded (oldest finished entries are evicted first) and
//! shared by every connection and the HTTP endpoint of the node. An attempt
//! still in flight makes its retries wait for its outcome (up to the send
//! timeout, then `unavailable` with `pending`); a failed attempt is
//! forgotten, so a retry appends afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use schemas::protocol::{ErrorCode, FrameError};
use tokio::sync::watch;

/// What the client is told when its message is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckInfo {
    pub offset: i64,
    pub ts: i64,
}

pub type Outcome = Result<AckInfo, FrameError>;

/// The answer to a claim on an id.
pub enum Claim {
    /// First time seen: the caller appends, then calls [`Dedup::finish`].
    New,
    /// Already in the log.
    Done(AckInfo),
    /// Another attempt is in flight; its outcome arrives here.
    Pending(watch::Receiver<Option<Outcome>>),
}

enum Entry {
    Done {
        user: String,
        ack: AckInfo,
    },
    Pending {
        user: String,
        tx: watch::Sender<Option<Outcome>>,
    },
}

pub struct Dedup {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<(String, String), Entry>,
    order: VecDeque<(String, String)>,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Dedup {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Claims `id` in `room` for `user`. An id already used by another user
    /// in the room is refused.
    pub fn claim(&self, room: &str, id: &str, user: &str) -> Result<Claim, FrameError> {
        let key = (room.to_owned(), id.to_owned());
        let mut inner = self.inner.lock().unwrap();
        let taken = || {
            FrameError::new(
                ErrorCode::BadFrame,
                "id already used by another user",
                Some(id.to_owned()),
            )
        };
        match inner.entries.get(&key) {
            Some(Entry::Done { user: u, ack }) => {
                return if u == user {
                    Ok(Claim::Done(*ack))
                } else {
                    Err(taken())
                };
            }
            Some(Entry::Pending { user: u, tx }) => {
                return if u == user {
                    Ok(Claim::Pending(tx.subscribe()))
                } else {
                    Err(taken())
                };
            }
            None => {}
        }
        let (tx, _) = watch::channel(None);
        inner.entries.insert(
            key.clone(),
            Entry::Pending {
                user: user.to_owned(),
                tx,
            },
        );
        inner.order.push_back(key);
        while inner.order.len() > self.capacity {
            let oldest = inner.order.pop_front().expect("order is not empty");
            if matches!(inner.entries.get(&oldest), Some(Entry::Pending { .. })) {
                // Still in flight: keep it, try again later.
                inner.order.push_back(oldest);
                break;
            }
            inner.entries.remove(&oldest);
        }
        Ok(Claim::New)
    }

    /// Records the outcome of a [`Claim::New`] and wakes its waiting retries.
    pub fn finish(&self, room: &str, id: &str, outcome: &Outcome) {
        let key = (room.to_owned(), id.to_owned());
        let mut inner = self.inner.lock().unwrap();
        let Some(Entry::Pending { user, tx }) = inner.entries.remove(&key) else {
            return;
        };
        tx.send_replace(Some(outcome.clone()));
        match outcome {
            Ok(ack) => {
                inner.entries.insert(key, Entry::Done { user, ack: *ack });
            }
            Err(_) => inner.order.retain(|k| k != &key),
        }
    }
}

/// Waits for the outcome of an attempt in flight, at most `timeout` (zero:
/// no limit); still in flight then, it is answered `unavailable` with
/// `pending`, and a later retry waits again.
pub async fn wait(
    mut rx: watch::Receiver<Option<Outcome>>,
    id: &str,
    timeout: std::time::Duration,
) -> Outcome {
    let outcome = async move {
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for some"),
            Err(_) => Err(FrameError::new(
                ErrorCode::Unavailable,
                "the first attempt was abandoned; retry",
                Some(id.to_owned()),
            )),
        }
    };
    if timeout.is_zero() {
        return outcome.await;
    }
    tokio::time::timeout(timeout, outcome)
        .await
        .unwrap_or_else(|_| {
            ::metrics::counter!(crate::metrics::SEND_TIMEOUTS_TOTAL).increment(1);
            Err(FrameError::pending(id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn retries_get_the_first_outcome() {
        let d = Dedup::new(10);
        assert!(matches!(d.claim("r", "a", "u").unwrap(), Claim::New));
        let Claim::Pending(rx) = d.claim("r", "a", "u").unwrap() else {
            panic!("in flight")
        };
        assert!(d.claim("r", "a", "mallory").is_err());
        let ack = AckInfo { offset: 4, ts: 9 };
        d.finish("r", "a", &Ok(ack));
        assert_eq!(wait(rx, "a", Duration::ZERO).await.unwrap(), ack);
        assert!(matches!(d.claim("r", "a", "u").unwrap(), Claim::Done(a) if a == ack));
        assert!(matches!(d.claim("other", "a", "u").unwrap(), Claim::New));
    }

    #[test]
    fn failures_are_forgotten_and_capacity_is_bounded() {
        let d = Dedup::new(3);
        assert!(matches!(d.claim("r", "x", "u").unwrap(), Claim::New));
        d.finish(
            "r",
            "x",
            &Err(FrameError::new(ErrorCode::Unavailable, "down", None)),
        );
        assert!(matches!(d.claim("r", "x", "u").unwrap(), Claim::New));
        d.finish("r", "x", &Ok(AckInfo { offset: 1, ts: 1 }));
        for i in 0..10 {
            let id = i.to_string();
            assert!(matches!(d.claim("r", &id, "u").unwrap(), Claim::New));
            d.finish("r", &id, &Ok(AckInfo { offset: i, ts: 1 }));
        }
        let inner = d.inner.lock().unwrap();
        assert!(inner.entries.len() <= 3 && inner.order.len() <= 3);
    }
}
