//! The waits between attempts of a read that failed and starts over (a
//! dispatcher re-opening its partition after a log error).
//!
//! Owns the retry policy of the fan-out: an exponential backoff from the
//! first wait (`FanoutConfig::retry`), doubling up to [`MAX_WAIT`], each wait
//! jittered by up to as much again ([`backon::ExponentialBuilder`]), without
//! end: a dispatcher never gives up on its partition. Promises:
//! - after [`Delays::reset`] (call it once an attempt made progress) the next
//!   wait is the first one again;
//! - [`sleep`] returns as soon as its cancellation token is cancelled,
//!   whatever the wait.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The longest wait before jitter.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(5);

/// The waits of a loop that retries by starting over: the next wait, and a
/// reset once it made progress.
pub(crate) struct Delays {
    policy: ExponentialBuilder,
    waits: ExponentialBackoff,
}

impl Delays {
    /// Waits starting at `first` (at most [`MAX_WAIT`]), doubling up to
    /// [`MAX_WAIT`].
    pub(crate) fn new(first: Duration) -> Self {
        let policy = ExponentialBuilder::default()
            .with_min_delay(first.min(MAX_WAIT))
            .with_max_delay(MAX_WAIT)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Delays {
            policy,
            waits: policy.build(),
        }
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // Without a limit on the number of attempts the iterator never
        // ends; the fallback is never taken.
        self.waits.next().unwrap_or(MAX_WAIT)
    }

    /// Starts the waits over from the first one.
    pub(crate) fn reset(&mut self) {
        self.waits = self.policy.build();
    }
}

/// Sleeps `delay`; false when `cancel` was cancelled first.
pub(crate) async fn sleep(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A jittered wait lies in `[base, 2 * base)`, give or take the
    /// rounding of backon's `f32` arithmetic.
    fn assert_jittered(wait: Duration, base: Duration) {
        let slack = Duration::from_millis(1);
        assert!(
            wait + slack >= base && wait < base * 2 + slack,
            "wait {wait:?} outside [{base:?}, {:?})",
            base * 2
        );
    }

    #[test]
    fn waits_double_up_to_the_cap_then_stay() {
        let first = Duration::from_millis(200);
        let mut d = Delays::new(first);
        let mut base = first;
        for _ in 0..20 {
            assert_jittered(d.next_delay(), base);
            base = (base * 2).min(MAX_WAIT);
        }
        assert_eq!(base, MAX_WAIT);
    }

    #[test]
    fn a_reset_starts_over() {
        let first = Duration::from_millis(100);
        let mut d = Delays::new(first);
        for _ in 0..6 {
            d.next_delay();
        }
        d.reset();
        assert_jittered(d.next_delay(), first);
        assert_jittered(d.next_delay(), first * 2);
    }

    #[test]
    fn a_first_wait_above_the_cap_is_capped() {
        let mut d = Delays::new(Duration::from_secs(60));
        assert_jittered(d.next_delay(), MAX_WAIT);
    }

    #[tokio::test]
    async fn a_cancelled_wait_ends_at_once() {
        let mut d = Delays::new(Duration::from_secs(3600));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let waited = tokio::time::timeout(Duration::from_secs(10), sleep(d.next_delay(), &cancel))
            .await
            .expect("a cancelled wait does not sleep");
        assert!(!waited);
    }
}
