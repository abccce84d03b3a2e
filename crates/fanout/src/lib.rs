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
//!   no duplicate, then live ones: older messages are read back from the log
//!   by the joining client (catch-up), the newest from the dispatcher's ring
//!   of recent messages, and the hand-over happens under the partition lock;
//! - every member queue is bounded; a member whose queue is full is a slow
//!   consumer: it is kicked (its `kick` token is cancelled, the gateway closes
//!   it with 4008) and it resumes with `since`. Ephemeral frames (typing) are
//!   dropped for a full queue instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use eventlog::{EventLog, LogRecord};
use futures::StreamExt;
use schemas::protocol::{MessageView, Position, ServerFrame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How far before a starting point fan-out looks for message identities.
const LOOKBACK: u64 = 2048;

/// A serialized server frame, shared between every socket it goes to.
pub type Frame = Utf8Bytes;

#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Recent messages kept per partition for joins that resume near the head.
    pub ring: usize,
    /// Wait before reading a partition again after a log error.
    pub retry: Duration,
    /// Message identities remembered per partition to drop duplicates.
    pub seen_ids: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            ring: 4096,
            retry: Duration::from_millis(200),
            seen_ids: 65_536,
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

/// One connected client, as the dispatchers see it.
pub struct Member {
    id: u64,
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

    /// Queues a frame without waiting; a full queue kicks the member.
    fn offer(&self, frame: Frame) -> bool {
        if self.kick.is_cancelled() {
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(_) => {
                metrics::counter!("fanout_slow_consumers_total").increment(1);
                self.kick.cancel();
                false
            }
        }
    }
}

/// A message as the dispatcher holds it.
struct Entry {
    offset: u64,
    room: String,
    /// Hash of (room, client id): the identity a retried send keeps.
    key: u64,
    frame: Frame,
}

/// The recent message identities of a partition, with the first offset
/// each was seen at, so a retried send appended twice (a retry through
/// another node, or after a crash) is delivered once. Bounded: the oldest
/// identities are forgotten first.
struct SeenIds {
    first: HashMap<u64, u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl SeenIds {
    fn new(capacity: usize) -> Self {
        SeenIds {
            first: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Records `key` at `offset`; false when it was first seen earlier.
    fn first_sighting(&mut self, key: u64, offset: u64) -> bool {
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

    /// True when `key` was first seen before `offset`.
    fn seen_before(&self, key: u64, offset: u64) -> bool {
        self.first.get(&key).is_some_and(|&first| first < offset)
    }
}

fn identity(room: &str, id: &str) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    room.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

/// A member of a room, with the first offset it has not seen yet.
struct Sub {
    member: Arc<Member>,
    from: u64,
}

struct PartitionState {
    /// Members by room.
    rooms: HashMap<String, Vec<Sub>>,
    /// Every message with an offset in `[ring_start, next)`.
    ring: VecDeque<Entry>,
    ring_start: u64,
    /// Next offset the dispatcher will read.
    next: u64,
    seen: SeenIds,
}

struct Slot {
    state: Arc<Mutex<PartitionState>>,
    stop: CancellationToken,
}

/// The fan-out of one node.
pub struct Fanout {
    log: Arc<dyn EventLog>,
    config: FanoutConfig,
    slots: Mutex<HashMap<u32, Slot>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Serializes a message frame once.
pub fn message_frame(m: &MessageView) -> Frame {
    Frame::from(ServerFrame::Message(m).to_json())
}

fn decode(record: &LogRecord) -> Option<Entry> {
    let schemas::ChatEvent::MessagePosted(m) = schemas::decode(&record.value).ok()?;
    let view = MessageView {
        room: m.room,
        offset: record.offset as i64,
        id: m.client_id,
        user: m.user,
        body: m.body,
        ts: m.ts,
    };
    Some(Entry {
        offset: record.offset,
        key: identity(&view.room, &view.id),
        frame: message_frame(&view),
        room: view.room,
    })
}

impl Fanout {
    pub fn new(log: Arc<dyn EventLog>, config: FanoutConfig) -> Arc<Self> {
        Arc::new(Fanout {
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

    /// Adds `member` to `room`. Queues the `joined` frame, then (with `since`
    /// of this epoch) every message after `since`, then live messages.
    pub async fn join(
        &self,
        room: &str,
        member: &Arc<Member>,
        since: Option<&Position>,
    ) -> Result<(), FanoutError> {
        let partition = self.log.partition_for(room.as_bytes());
        let resume = since.filter(|s| s.epoch == self.log.epoch());
        let recovered = since.is_none() || resume.is_some();
        let end = self.log.end_offset(partition).await?;
        let state = self.slot(partition, end);
        let head = end as i64 - 1;
        let joined = Frame::from(
            ServerFrame::Joined {
                room,
                position: Position {
                    offset: head,
                    epoch: self.log.epoch().to_owned(),
                },
                recovered,
            }
            .to_json(),
        );
        // Catch-up state: the last offset the member has.
        let mut have = match resume {
            Some(s) => s.offset.max(-1),
            None => head,
        };
        if !member.offer(joined) {
            self.release(partition);
            return Err(FanoutError::Slow);
        }
        let mut state = state;
        loop {
            let target = {
                let slots = self.slots.lock().unwrap();
                let current = slots.get(&partition).map(|s| &s.state);
                if !current.is_some_and(|c| Arc::ptr_eq(c, &state)) {
                    // A concurrent leave stopped the dispatcher: start another
                    // one at our own position (later joiners filter by theirs).
                    drop(slots);
                    state = self.slot(partition, (have + 1) as u64);
                    continue;
                }
                let mut st = state.lock().unwrap();
                let want = (have + 1) as u64;
                let target = if want >= st.ring_start {
                    let backlog: Vec<Frame> = st
                        .ring
                        .iter()
                        .filter(|e| e.offset >= want && e.room == room)
                        .map(|e| e.frame.clone())
                        .collect();
                    if backlog.len() <= member.tx.capacity() {
                        // Hand-over: the ring holds everything from `want`
                        // on, and the member's queue has room for it.
                        for frame in backlog {
                            if !member.offer(frame) {
                                break;
                            }
                        }
                        st.rooms.entry(room.to_owned()).or_default().push(Sub {
                            member: member.clone(),
                            from: want,
                        });
                        break;
                    }
                    // More than the queue holds: read it back at the
                    // member's pace instead.
                    st.next
                } else {
                    // Older than the ring: read it back from the log.
                    st.ring_start
                };
                target
            };
            if let Err(e) = self.catch_up(partition, room, member, have, target).await {
                self.release(partition);
                return Err(e);
            }
            have = target as i64 - 1;
        }
        metrics::gauge!("fanout_partitions").set(self.slots.lock().unwrap().len() as f64);
        if member.kick.is_cancelled() {
            return Err(FanoutError::Slow);
        }
        Ok(())
    }

    /// Sends the member the messages of `room` in `(have, target)`.
    async fn catch_up(
        &self,
        partition: u32,
        room: &str,
        member: &Member,
        have: i64,
        target: u64,
    ) -> Result<(), FanoutError> {
        let from = (have + 1) as u64;
        if from >= target {
            return Ok(());
        }
        let state = self
            .slots
            .lock()
            .unwrap()
            .get(&partition)
            .map(|s| s.state.clone());
        let mut sent = SeenIds::new(usize::MAX);
        // Read a little before `from` too: a message the member already has
        // may have been appended again after it (a retry), and must not be
        // delivered a second time.
        let mut stream = self.log.read(partition, from.saturating_sub(LOOKBACK));
        while let Some(batch) = stream.next().await {
            for record in batch? {
                if record.offset >= target {
                    return Ok(());
                }
                // Checked for every record, whatever its room: when the
                // partition's last record before `target` is another room's,
                // no later record may ever come to end the catch-up.
                let last = record.offset + 1 >= target;
                if record.key != room.as_bytes() {
                    if last {
                        return Ok(());
                    }
                    continue;
                }
                if record.offset < from {
                    if let Some(e) = decode(&record) {
                        sent.first_sighting(e.key, e.offset);
                    }
                    if last {
                        return Ok(());
                    }
                    continue;
                }
                if let Some(e) = decode(&record) {
                    let duplicate = !sent.first_sighting(e.key, e.offset)
                        || state
                            .as_ref()
                            .is_some_and(|st| st.lock().unwrap().seen.seen_before(e.key, e.offset));
                    if e.room == room && !duplicate {
                        // Catch-up waits for room in the queue (its own pace).
                        member
                            .tx
                            .send(e.frame)
                            .await
                            .map_err(|_| FanoutError::Slow)?;
                        metrics::counter!("fanout_catch_up_messages_total").increment(1);
                    }
                }
                if last {
                    return Ok(());
                }
            }
        }
        Err(FanoutError::Log(eventlog::LogError::Unavailable(
            "log read ended".into(),
        )))
    }

    /// Removes `member` from `room`.
    pub fn leave(&self, room: &str, member: &Member) {
        let partition = self.log.partition_for(room.as_bytes());
        let state = self
            .slots
            .lock()
            .unwrap()
            .get(&partition)
            .map(|s| s.state.clone());
        if let Some(state) = state {
            let mut st = state.lock().unwrap();
            if let Some(members) = st.rooms.get_mut(room) {
                members.retain(|s| s.member.id != member.id);
                if members.is_empty() {
                    st.rooms.remove(room);
                }
            }
        }
        self.release(partition);
    }

    /// Sends an ephemeral frame to the members of `room` on this node;
    /// members with a full queue miss it.
    pub fn broadcast_ephemeral(&self, room: &str, frame: Frame) {
        let partition = self.log.partition_for(room.as_bytes());
        let state = self
            .slots
            .lock()
            .unwrap()
            .get(&partition)
            .map(|s| s.state.clone());
        if let Some(state) = state {
            let st = state.lock().unwrap();
            for s in st.rooms.get(room).into_iter().flatten() {
                let _dropped_when_full = s.member.tx.try_send(frame.clone());
            }
        }
    }

    /// Stops and awaits every dispatcher.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The partition's state, starting its dispatcher at `end` if needed.
    fn slot(&self, partition: u32, end: u64) -> Arc<Mutex<PartitionState>> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.get(&partition) {
            return slot.state.clone();
        }
        let state = Arc::new(Mutex::new(PartitionState {
            rooms: HashMap::new(),
            ring: VecDeque::new(),
            ring_start: end,
            next: end,
            seen: SeenIds::new(self.config.seen_ids),
        }));
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
        };
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = dispatcher.run() => {}
            }
        });
        tracing::debug!(partition, from = end, "fanout reads partition");
        state
    }

    /// Stops the partition's dispatcher when no room of it has members.
    fn release(&self, partition: u32) {
        let mut slots = self.slots.lock().unwrap();
        let idle = slots
            .get(&partition)
            .is_some_and(|s| s.state.lock().unwrap().rooms.is_empty());
        if idle {
            if let Some(slot) = slots.remove(&partition) {
                slot.stop.cancel();
                tracing::debug!(partition, "fanout stops reading partition");
            }
        }
        metrics::gauge!("fanout_partitions").set(slots.len() as f64);
    }
}

struct Dispatcher {
    log: Arc<dyn EventLog>,
    partition: u32,
    state: Arc<Mutex<PartitionState>>,
    ring: usize,
    retry: Duration,
}

impl Dispatcher {
    async fn run(self) {
        self.warm_up().await;
        loop {
            let from = self.state.lock().unwrap().next;
            let mut stream = self.log.read(self.partition, from);
            while let Some(batch) = stream.next().await {
                match batch {
                    Ok(batch) => self.dispatch(&batch),
                    Err(e) => {
                        tracing::warn!(partition = self.partition, error = %e, "fanout read failed");
                        break;
                    }
                }
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// Learns the identities of the messages just before the start, so a
    /// retry appended again after the start is not delivered twice.
    async fn warm_up(&self) {
        let end = self.state.lock().unwrap().next;
        if end == 0 {
            return;
        }
        let mut stream = self.log.read(self.partition, end.saturating_sub(LOOKBACK));
        while let Some(Ok(batch)) = stream.next().await {
            let keys: Vec<(u64, u64)> = batch
                .iter()
                .filter(|r| r.offset < end)
                .filter_map(decode)
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
        let entries: Vec<Entry> = batch.iter().filter_map(decode).collect();
        let mut st = self.state.lock().unwrap();
        let mut delivered = 0u64;
        for e in entries {
            if !st.seen.first_sighting(e.key, e.offset) {
                metrics::counter!("fanout_duplicates_dropped_total").increment(1);
                continue;
            }
            if let Some(members) = st.rooms.get_mut(&e.room) {
                members.retain(|s| {
                    if e.offset < s.from {
                        return true;
                    }
                    let ok = s.member.offer(e.frame.clone());
                    delivered += ok as u64;
                    ok
                });
                if members.is_empty() {
                    st.rooms.remove(&e.room);
                }
            }
            st.ring.push_back(e);
        }
        st.next = last.offset + 1;
        while st.ring.len() > self.ring {
            let dropped = st.ring.pop_front().expect("ring is not empty");
            st.ring_start = dropped.offset + 1;
        }
        if st.ring.is_empty() {
            st.ring_start = st.next;
        }
        metrics::counter!("fanout_deliveries_total").increment(delivered);
    }
}
