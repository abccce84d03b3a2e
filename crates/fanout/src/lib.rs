//! Pushes room messages from the log to connected clients.
//!
//! One dispatcher task per partition that has members on this node reads the
//! partition from the log, serializes each message once, and hands the same
//! bytes to every member of its room. A dispatcher starts when the first room
//! of its partition is joined here and stops when the last one is left.
//!
//! Promises:
//! - a member gets its rooms' messages in offset order, each once;
//! - `join` with `since` gives every message after `since`, with no gap and
//!   no duplicate, then live ones: older messages are read back for the
//!   joining client (catch-up: from the history store, by room, as far as
//!   the store covers, then from the log), the newest from the dispatcher's
//!   ring of recent messages, and the hand-over happens under the partition
//!   lock;
//! - every member queue is bounded; a member whose queue is full is a slow
//!   consumer: it is kicked (its `kick` token is cancelled, the gateway closes
//!   it with 4008) and it resumes with `since`. Ephemeral frames (typing) are
//!   dropped for a full queue instead.
//!
//! Layout: this module owns [`Fanout`], the node's set of partitions (which
//! have a dispatcher, starting and stopping them); `member` the client and
//! the slow-consumer policy; `partition` one partition's shared state and
//! the routing of messages to members; `seen` the identities behind
//! duplicate suppression; `dispatcher` the task that tails a partition;
//! `join` joining a room (`join::plan` its pure decisions,
//! `join::from_store` the read back from the history store,
//! `join::catch_up` the read back from the log, the hand-over in `join`
//! itself); `retry` the
//! backoff after log errors; [`metrics`] the metric names. The tests that
//! drive the whole over the embedded log are in `tests`.

mod dispatcher;
mod join;
mod member;
pub mod metrics;
mod partition;
pub mod presence;
mod retry;
mod seen;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use eventlog::EventLog;
use history::HistoryStore;
use schemas::protocol::{MessageView, ServerFrame};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use member::Member;

use dispatcher::Dispatcher;
use partition::PartitionState;

/// A serialized server frame, shared between every socket it goes to.
pub type Frame = Utf8Bytes;

#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Recent messages kept per partition for joins that resume near the head.
    pub ring: usize,
    /// First wait before reading a partition again after a log error; each
    /// next one doubles (jittered) up to 5 s, until a read succeeds.
    pub retry: Duration,
    /// Message identities remembered per partition to drop duplicates.
    pub seen_ids: usize,
    /// Catch-ups reading the log at once, at most; more wait for one to end.
    pub catch_up_reads: usize,
    /// How long a catch-up waits for room in a member's queue before the
    /// member is kicked as a slow consumer.
    pub catch_up_stall: Duration,
    /// Rooms whose members see each other's read positions; in the others
    /// a user's read position reaches only that user's own connections.
    pub shared_reads: Arc<schemas::protocol::RoomPatterns>,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            ring: 4096,
            retry: Duration::from_millis(200),
            seen_ids: 65_536,
            catch_up_reads: 256,
            catch_up_stall: Duration::from_secs(10),
            shared_reads: Arc::new(default_shared_reads()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("log unavailable: {0}")]
    Log(#[from] eventlog::LogError),
    /// The member's queue was full or closed; it has been kicked.
    #[error("member is a slow consumer")]
    Slow,
}

/// A partition with a running dispatcher.
struct Slot {
    state: Arc<Mutex<PartitionState>>,
    stop: CancellationToken,
}

/// The fan-out of one node.
///
/// Locking: `slots` before a partition's state, never the other way round;
/// neither is held across an `.await`.
pub struct Fanout {
    log: Arc<dyn EventLog>,
    /// Where a catch-up reads a room's older messages first, when given.
    history: Option<Arc<dyn HistoryStore>>,
    config: FanoutConfig,
    slots: Mutex<HashMap<u32, Slot>>,
    /// Per partition: held by the one join that starts its dispatcher.
    starting: Vec<tokio::sync::Mutex<()>>,
    /// A permit per catch-up reading the log ([`FanoutConfig::catch_up_reads`]).
    catch_up_reads: tokio::sync::Semaphore,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Serializes a message frame once.
/// The rooms that share read positions unless configured: direct messages.
pub fn default_shared_reads() -> schemas::protocol::RoomPatterns {
    schemas::protocol::RoomPatterns::parse(&["dm:*"]).expect("dm:* is a room pattern")
}

pub fn message_frame(m: &MessageView) -> Frame {
    Frame::from(ServerFrame::Message(m).to_json())
}

impl Fanout {
    pub fn new(log: Arc<dyn EventLog>, config: FanoutConfig) -> Arc<Self> {
        Self::with_history(log, None, config)
    }

    /// A fan-out whose catch-ups read what `history` (the store a projector
    /// of this log writes) holds from it, by room, and the rest from the
    /// log.
    pub fn with_history(
        log: Arc<dyn EventLog>,
        history: Option<Arc<dyn HistoryStore>>,
        config: FanoutConfig,
    ) -> Arc<Self> {
        Arc::new(Fanout {
            history,
            starting: (0..log.partitions())
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            catch_up_reads: tokio::sync::Semaphore::new(config.catch_up_reads.max(1)),
            log,
            config,
            slots: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn epoch(&self) -> &str {
        self.log.epoch()
    }

    /// Partitions this node currently reads.
    pub fn active_partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.slots.lock().unwrap().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Removes `member` from `room`; stops the partition's dispatcher when
    /// that was the last member of its rooms here.
    pub fn leave(&self, room: &str, member: &Member) {
        let partition = self.log.partition_for(room.as_bytes());
        if let Some(state) = self.state_of(partition) {
            state.lock().unwrap().unsubscribe(room, member.id);
        }
        self.release(partition);
    }

    /// Sends an ephemeral frame to the members of `room` on this node;
    /// members with a full queue miss it.
    pub fn broadcast_ephemeral(&self, room: &str, frame: Frame) {
        let partition = self.log.partition_for(room.as_bytes());
        if let Some(state) = self.state_of(partition) {
            let st = state.lock().unwrap();
            for s in st.rooms.get(room).into_iter().flatten() {
                s.member.offer_ephemeral(frame.clone());
            }
        }
    }

    /// Stops and awaits every dispatcher.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The state of the partition's running dispatcher, if any.
    fn state_of(&self, partition: u32) -> Option<Arc<Mutex<PartitionState>>> {
        self.slots
            .lock()
            .unwrap()
            .get(&partition)
            .map(|s| s.state.clone())
    }

    /// The partition's state, starting its dispatcher at `start` if it has
    /// none. Takes the slots lock; never call it holding one.
    fn slot(&self, partition: u32, start: u64) -> Arc<Mutex<PartitionState>> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(&partition) {
            return slot.state.clone();
        }
        let state = Arc::new(Mutex::new(PartitionState::new(start, self.config.seen_ids)));
        let stop = self.shutdown.child_token();
        slots.insert(
            partition,
            Slot {
                state: state.clone(),
                stop: stop.clone(),
            },
        );
        let dispatcher = Dispatcher {
            log: self.log.clone(),
            partition,
            state: state.clone(),
            ring: self.config.ring,
            retry: self.config.retry,
            shared_reads: self.config.shared_reads.clone(),
            stop,
        };
        self.tasks.spawn(dispatcher.run());
        tracing::debug!(partition, from = start, "fanout reads partition");
        state
    }

    /// Stops the partition's dispatcher when no room of it has members.
    fn release(&self, partition: u32) {
        let mut slots = self.slots.lock().unwrap();
        let idle = slots
            .get(&partition)
            .is_some_and(|s| s.state.lock().unwrap().is_idle());
        if idle {
            if let Some(slot) = slots.remove(&partition) {
                slot.stop.cancel();
                tracing::debug!(partition, "fanout stops reading partition");
            }
        }
        ::metrics::gauge!(crate::metrics::PARTITIONS).set(slots.len() as f64);
    }
}
