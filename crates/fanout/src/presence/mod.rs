//! Presence and typing across the nodes of one log, over an ephemeral
//! channel that is not the log: on Kafka/Redpanda a topic of its own
//! (`chat.ephemeral`, short retention, never projected or replayed); on the
//! embedded log none is needed, since one process is the whole cluster.
//!
//! Each node tells the others, in [`notice::Notice`]s keyed by its source
//! id (`NODE/RANDOM`, new each start), the users it has in each room: when
//! a room's users change (coalesced over [`PresenceConfig::flush`]), and
//! every room again each [`PresenceConfig::heartbeat`] (a node with no room
//! still sends an empty heartbeat). What a node announced is forgotten
//! [`PresenceConfig::expiry`] after it was last heard, so the users of a
//! node that died (SIGKILL, or cut off from the broker) leave everyone's
//! presence within the expiry plus a second (the sweep). A node that drains
//! says goodbye first, and its users leave at once. A node that hears a
//! source for the first time announces all its rooms within a second, so a
//! new node learns the others without waiting for their heartbeat.
//!
//! Typing: a `typing` reaches the room's members here at once and the other
//! nodes' members through the channel; a user's repeats within
//! [`PresenceConfig::typing_every`] in one room are absorbed, and a notice
//! older than its `ttl` when it arrives is dropped.
//!
//! Tasks: a publisher (it owns the timers) and one reader per partition of
//! the channel, owned by [`Presence`] and stopped by [`Presence::shutdown`],
//! which sends the goodbye. Queues: typing notices wait for the publisher in
//! a bounded queue; a full one drops the notice (counted,
//! `presence_notices_dropped_total`). The state lock is never held across
//! an `.await`.

mod notice;
mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventlog::{EventLog, Record};
use futures::StreamExt;
use schemas::protocol::ServerFrame;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::retry::{self, Delays};
use crate::{Fanout, Frame, Member};
pub use state::Bounds;

use notice::Notice;
use state::State;

/// The topic of the ephemeral channel on Kafka/Redpanda.
pub const EPHEMERAL_TOPIC: &str = "chat.ephemeral";

/// Typing notices waiting for the publisher, at most.
const TYPING_QUEUE: usize = 1024;
/// User names per `rooms` notice, at most: records stay small however many
/// rooms a node has.
const NAMES_PER_NOTICE: usize = 5_000;
/// A node heard for the first time gets every room at most this soon, and
/// no more often than this.
const FULL_AGAIN: Duration = Duration::from_secs(1);
/// How often what other nodes announced is checked against the expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// How often a node announces every room it has users in.
    pub heartbeat: Duration,
    /// How long what a node announced holds without a word from it.
    pub expiry: Duration,
    /// How long changes of this node's rooms gather before they go out.
    pub flush: Duration,
    /// Repeats of a user's `typing` in one room within this are absorbed.
    pub typing_every: Duration,
    /// How long a typing notice holds (the frame's `ttl_ms`).
    pub typing_ttl: Duration,
    /// What other nodes' announcements may hold here.
    pub bounds: Bounds,
}

impl PresenceConfig {
    /// Heartbeats every `heartbeat`, expiry after three missed ones.
    pub fn with_heartbeat(heartbeat: Duration) -> Self {
        PresenceConfig {
            heartbeat,
            expiry: heartbeat * 3,
            ..PresenceConfig::default()
        }
    }

    /// The longest a dead node's users stay in others' presence.
    pub fn leave_bound(&self) -> Duration {
        self.expiry + SWEEP_EVERY
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat: Duration::from_secs(5),
            expiry: Duration::from_secs(15),
            flush: Duration::from_millis(50),
            typing_every: Duration::from_secs(1),
            typing_ttl: Duration::from_secs(3),
            bounds: Bounds {
                users_per_room: 1_000,
                rooms_per_node: 10_000,
                nodes: 256,
            },
        }
    }
}

/// The presence of a node: its own users per room, what the other nodes
/// announce, and the channel between them.
pub struct Presence {
    source: String,
    fanout: Arc<Fanout>,
    bus: Option<Arc<dyn EventLog>>,
    config: PresenceConfig,
    state: Mutex<State>,
    /// When a user of this node last typed in a room (absorbs repeats).
    typed: Mutex<std::collections::HashMap<(String, String), Instant>>,
    /// Wakes the publisher when a room's users changed.
    changed: Notify,
    typing_tx: mpsc::Sender<Notice>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Presence {
    /// The presence of node `node`, whose members are `fanout`'s; `bus` is
    /// the ephemeral channel to the other nodes (`None`: this node is the
    /// only one). Starts its tasks when there is a channel.
    pub fn start(
        fanout: Arc<Fanout>,
        bus: Option<Arc<dyn EventLog>>,
        node: &str,
        config: PresenceConfig,
    ) -> Arc<Self> {
        let (typing_tx, typing_rx) = mpsc::channel(TYPING_QUEUE);
        let random = uuid::Uuid::new_v4().simple().to_string();
        let presence = Arc::new(Presence {
            source: format!("{node}/{}", &random[..12]),
            fanout,
            bus: bus.clone(),
            config,
            state: Mutex::new(State::default()),
            typed: Mutex::new(std::collections::HashMap::new()),
            changed: Notify::new(),
            typing_tx,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        if let Some(bus) = bus {
            presence
                .tasks
                .spawn(presence.clone().publish(bus.clone(), typing_rx));
            for partition in 0..bus.partitions() {
                presence
                    .tasks
                    .spawn(presence.clone().read(bus.clone(), partition));
            }
            tracing::info!(source = %presence.source, "presence announces on the ephemeral channel");
        }
        presence
    }

    /// This node's source id on the channel.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    /// A connection of `member` joined `room`.
    pub fn joined(&self, room: &str, member: &Arc<Member>) {
        let mut st = self.state.lock().unwrap();
        st.joined(room, member);
        set_gauges(&st);
        drop(st);
        self.changed.notify_one();
    }

    /// A connection of `member` left `room` (or closed).
    pub fn left(&self, room: &str, member: &Member) {
        let mut st = self.state.lock().unwrap();
        st.left(room, member);
        set_gauges(&st);
        drop(st);
        self.changed.notify_one();
    }

    /// Answers `member`, who asked for `room`, with a `presence` frame of
    /// the users present now; a member of the room is told every change
    /// after it, until it leaves.
    pub fn ask(&self, room: &str, member: &Arc<Member>, is_member: bool) {
        let most = self.config.bounds.users_per_room;
        let mut st = self.state.lock().unwrap();
        let (users, more) = if is_member {
            st.watch(room, member, most)
        } else {
            st.users(room, most)
        };
        // Queued under the lock, so no change told after it comes before it.
        member.offer(users_frame(room, &users, more));
    }

    /// The users present in `room` (at most the bound) and how many more.
    pub fn users(&self, room: &str) -> (Vec<String>, u64) {
        self.state
            .lock()
            .unwrap()
            .users(room, self.config.bounds.users_per_room)
    }

    /// `user` typed in `room`: its members here get a `typing` frame now,
    /// the other nodes' members through the channel; a repeat within
    /// [`PresenceConfig::typing_every`] is absorbed.
    pub fn typing(&self, room: &str, user: &str) {
        let now = Instant::now();
        {
            let mut typed = self.typed.lock().unwrap();
            let key = (room.to_owned(), user.to_owned());
            if typed
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < self.config.typing_every)
            {
                return;
            }
            if typed.len() >= 10_000 {
                let every = self.config.typing_every;
                typed.retain(|_, t| now.duration_since(*t) < every);
            }
            typed.insert(key, now);
        }
        self.fanout
            .broadcast_ephemeral(room, typing_frame(room, user, self.config.typing_ttl));
        if self.bus.is_some() {
            let notice = Notice::Typing {
                source: self.source.clone(),
                room: room.to_owned(),
                user: user.to_owned(),
            };
            if self.typing_tx.try_send(notice).is_err() {
                metrics::counter!(crate::metrics::PRESENCE_NOTICES_DROPPED_TOTAL).increment(1);
            }
        }
    }

    /// Stops the tasks; the publisher says goodbye first.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The publisher: typing notices as they come, changed rooms after
    /// [`PresenceConfig::flush`], every room each heartbeat, goodbye at the
    /// end.
    async fn publish(self: Arc<Self>, bus: Arc<dyn EventLog>, mut typing: mpsc::Receiver<Notice>) {
        let mut tick = tokio::time::interval(self.config.flush);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_full = Instant::now();
        let mut last_full: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(first) = typing.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        let Ok(n) = typing.try_recv() else { break };
                        batch.push(n);
                    }
                    self.send(&bus, batch).await;
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let notices = {
                        let mut st = self.state.lock().unwrap();
                        if now.duration_since(last_sweep) >= SWEEP_EVERY {
                            st.expire(now, self.config.expiry);
                            set_gauges(&st);
                            last_sweep = now;
                        }
                        let asked = st.want_full
                            && last_full.is_none_or(|t| now.duration_since(t) >= FULL_AGAIN);
                        let most = self.config.bounds.users_per_room;
                        if now >= next_full || asked {
                            st.want_full = false;
                            next_full = now + self.config.heartbeat;
                            last_full = Some(now);
                            Some(st.announcement(true, most))
                        } else if st.dirty.is_empty() {
                            None
                        } else {
                            Some(st.announcement(false, most))
                        }
                    };
                    if let Some(rooms) = notices {
                        let notices = notice::rooms_notices(&self.source, rooms, NAMES_PER_NOTICE);
                        self.send(&bus, notices).await;
                    }
                }
                () = self.changed.notified() => {
                    // The next tick sends the change: changes coalesce.
                }
            }
        }
        let bye = Notice::Bye {
            source: self.source.clone(),
        };
        self.send(&bus, vec![bye]).await;
    }

    /// Appends `notices` to the channel, waiting at most a heartbeat: a
    /// notice is worth nothing later (the next heartbeat says it again).
    async fn send(&self, bus: &Arc<dyn EventLog>, notices: Vec<Notice>) {
        let ts = schemas::now_ms();
        let mut bytes = 0;
        let records: Vec<Record> = notices
            .iter()
            .map(|n| {
                let value = n.encode();
                bytes += value.len();
                metrics::counter!(crate::metrics::PRESENCE_NOTICES_SENT_TOTAL, "kind" => n.kind())
                    .increment(1);
                Record {
                    key: self.source.as_bytes().to_vec(),
                    value,
                    ts,
                }
            })
            .collect();
        match tokio::time::timeout(self.config.heartbeat, bus.append(records)).await {
            Ok(Ok(_)) => {
                metrics::counter!(crate::metrics::PRESENCE_BYTES_SENT_TOTAL)
                    .increment(bytes as u64);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "presence notices not sent"),
            Err(_) => tracing::warn!("presence notices not sent within a heartbeat"),
        }
    }

    /// Reads one partition of the channel from its end, for ever, starting
    /// again after an error.
    async fn read(self: Arc<Self>, bus: Arc<dyn EventLog>, partition: u32) {
        let stop = self.stop.clone();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.read_forever(&bus, partition) => {}
        }
    }

    async fn read_forever(&self, bus: &Arc<dyn EventLog>, partition: u32) {
        let mut delays = Delays::new(Duration::from_millis(200));
        let mut next = loop {
            match bus.end_offset(partition).await {
                Ok(end) => break end,
                Err(e) => {
                    tracing::warn!(error = %e, partition, "ephemeral channel: end unknown");
                    let _stopped = !retry::sleep(delays.next_delay(), &self.stop).await;
                }
            }
        };
        loop {
            let mut records = bus.read(partition, next);
            while let Some(batch) = records.next().await {
                match batch {
                    Ok(batch) => {
                        delays.reset();
                        for r in batch {
                            next = r.offset + 1;
                            self.receive(&r.value, r.ts);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, partition, "ephemeral channel: read failed");
                        break;
                    }
                }
            }
            let _stopped = !retry::sleep(delays.next_delay(), &self.stop).await;
        }
    }

    /// One record of the channel, stamped `ts` by its sender.
    fn receive(&self, value: &[u8], ts: i64) {
        let notice = match Notice::decode(value) {
            Ok(n) => n,
            Err(e) => {
                metrics::counter!(crate::metrics::PRESENCE_NOTICES_UNREADABLE_TOTAL).increment(1);
                tracing::debug!(error = %e, "ephemeral notice not understood, skipped");
                return;
            }
        };
        if notice.source() == self.source {
            return;
        }
        metrics::counter!(crate::metrics::PRESENCE_NOTICES_RECEIVED_TOTAL, "kind" => notice.kind())
            .increment(1);
        let age = Duration::from_millis(schemas::now_ms().saturating_sub(ts).max(0) as u64);
        match notice {
            Notice::Typing { room, user, .. } => {
                if age < self.config.typing_ttl {
                    let ttl = self.config.typing_ttl - age;
                    self.fanout
                        .broadcast_ephemeral(&room, typing_frame(&room, &user, ttl));
                }
            }
            Notice::Rooms { source, rooms } => {
                if age < self.config.expiry {
                    let rooms = rooms.into_iter().map(|r| (r.room, r.users)).collect();
                    let mut st = self.state.lock().unwrap();
                    st.announce(&source, rooms, Instant::now(), self.config.bounds);
                    set_gauges(&st);
                }
            }
            Notice::Bye { source } => {
                let mut st = self.state.lock().unwrap();
                st.bye(&source);
                set_gauges(&st);
            }
        }
    }
}

/// The presence gauges from `st`, under the lock that changed it.
fn set_gauges(st: &State) {
    metrics::gauge!(crate::metrics::PRESENCE_NODES).set(st.nodes() as f64);
    metrics::gauge!(crate::metrics::PRESENCE_ENTRIES).set(st.entries() as f64);
}

fn users_frame(room: &str, users: &[String], more: u64) -> Frame {
    Frame::from(
        ServerFrame::Presence {
            room,
            users: Some(users),
            more,
            join: None,
            leave: None,
        }
        .to_json(),
    )
}

fn typing_frame(room: &str, user: &str, ttl: Duration) -> Frame {
    Frame::from(
        ServerFrame::Typing {
            room,
            user,
            ttl_ms: ttl.as_millis() as u64,
        }
        .to_json(),
    )
}
