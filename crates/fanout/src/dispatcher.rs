//! The dispatcher of one partition: the task that tails the partition from
//! the log and routes each batch through [`PartitionState::dispatch`].
//!
//! Promises:
//! - it reads the partition from its state's `next` on, in offset order, and
//!   never reads a record twice into the state (after a log error it
//!   re-opens the read at `next`);
//! - before its first read it learns the identities of the messages just
//!   before its start (a warm-up, [`LOOKBACK`] records), so a retry appended
//!   again after the start is not delivered twice;
//! - after a log error, or a read that ended, it waits ([`Delays`]: an
//!   exponential backoff from `FanoutConfig::retry`, reset by every batch
//!   read) and starts over, forever, until `stop` is cancelled; every wait
//!   ends at once when `stop` is cancelled.
//!
//! It holds the partition lock only in code that never awaits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventlog::{EventLog, LogRecord};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::partition::{decode, Entry, PartitionState};
use crate::retry::{self, Delays};
use crate::seen::LOOKBACK;

pub(crate) struct Dispatcher {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) partition: u32,
    pub(crate) state: Arc<Mutex<PartitionState>>,
    /// Most messages the ring keeps.
    pub(crate) ring: usize,
    /// First wait after a log error.
    pub(crate) retry: Duration,
    /// Rooms whose members see each other's read positions.
    pub(crate) shared_reads: Arc<schemas::protocol::RoomPatterns>,
    /// Cancelled when the dispatcher must stop (its partition was released,
    /// or the fan-out shuts down).
    pub(crate) stop: CancellationToken,
}

impl Dispatcher {
    /// Reads and dispatches until `stop` is cancelled.
    pub(crate) async fn run(self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.read_forever() => {}
        }
    }

    async fn read_forever(&self) {
        self.warm_up().await;
        let mut delays = Delays::new(self.retry);
        loop {
            let error = self.read_until_failure(&mut delays).await;
            let delay = delays.next_delay();
            tracing::warn!(
                partition = self.partition,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "fanout read failed"
            );
            if !retry::sleep(delay, &self.stop).await {
                return;
            }
        }
    }

    /// Reads from `next` on and dispatches every batch (each resets
    /// `delays`), until the read fails or ends; returns why.
    async fn read_until_failure(&self, delays: &mut Delays) -> eventlog::LogError {
        let from = self.state.lock().unwrap().next;
        let mut stream = self.log.read(self.partition, from);
        while let Some(batch) = stream.next().await {
            match batch {
                Ok(batch) => {
                    self.dispatch(&batch);
                    delays.reset();
                }
                Err(e) => return e,
            }
        }
        eventlog::LogError::Unavailable("log read ended".into())
    }

    /// Learns the identities of the messages just before the start, so a
    /// retry appended again after the start is not delivered twice. Best
    /// effort: a log error ends it early.
    async fn warm_up(&self) {
        let end = self.state.lock().unwrap().next;
        if end == 0 {
            return;
        }
        let mut stream = self.log.read(self.partition, end.saturating_sub(LOOKBACK));
        while let Some(batch) = stream.next().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(partition = self.partition, error = %e, "fanout warm-up failed");
                    return;
                }
            };
            let keys: Vec<(u64, u64)> = batch
                .iter()
                .filter(|r| r.offset < end)
                .filter_map(|r| decode(r).ok())
                .filter(|e| e.reader.is_none())
                .map(|e| (e.key, e.offset))
                .collect();
            let mut st = self.state.lock().unwrap();
            for (key, offset) in keys {
                st.seen.first_sighting(key, offset);
            }
            if batch.last().is_none_or(|r| r.offset + 1 >= end) {
                return;
            }
        }
    }

    fn dispatch(&self, batch: &[LogRecord]) {
        let Some(last) = batch.last() else { return };
        // Serialize outside the lock.
        let entries: Vec<Entry> = batch
            .iter()
            .filter_map(|record| match decode(record) {
                Ok(mut e) => {
                    if let Some(reader) = &mut e.reader {
                        reader.shared = self.shared_reads.covers(&e.room);
                    }
                    Some(e)
                }
                Err(u) => {
                    // Never a silent gap: counted, logged, and the room's
                    // members are told in the message's place.
                    ::metrics::counter!(crate::metrics::UNREADABLE_RECORDS_TOTAL).increment(1);
                    tracing::warn!(
                        partition = self.partition,
                        offset = record.offset,
                        room = %String::from_utf8_lossy(&record.key),
                        error = %u.error,
                        "fanout cannot read a record; its room's members get `unreadable`"
                    );
                    u.notice
                }
            })
            .collect();
        let delivered = self
            .state
            .lock()
            .unwrap()
            .dispatch(entries, last.offset + 1, self.ring);
        ::metrics::counter!(crate::metrics::DELIVERIES_TOTAL).increment(delivered);
    }
}
