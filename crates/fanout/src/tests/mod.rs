//! Fan-out routing end to end, over the embedded log: members are channels,
//! records are written as the gateway writes them, and every wait is for a
//! condition, bounded by [`DEADLINE`]. This module holds the harness; each
//! submodule one promise of the crate.

mod duplicates;
mod from_store;
mod log_errors;
mod members;
mod resume;
mod routing;

use std::sync::Arc;
use std::time::Duration;

use eventlog::embedded::EmbeddedLog;
use eventlog::{Appended, EventLog, Record};
use schemas::protocol::{MessageView, Position};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Fanout, FanoutConfig, FanoutError, Frame, Member};

/// The longest any awaited condition may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test after [`DEADLINE`].
pub(crate) async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A message record as the gateway appends it.
pub(crate) fn record(room: &str, id: &str, body: &str) -> Record {
    let ts = 1_763_800_000_000;
    let event = schemas::ChatEvent::MessagePosted(schemas::MessagePosted {
        room: room.to_owned(),
        client_id: id.to_owned(),
        user: "alice".to_owned(),
        body: body.to_owned(),
        ts,
    });
    Record {
        key: room.as_bytes().to_vec(),
        value: schemas::encode(&event),
        ts,
    }
}

/// An embedded log in a temporary directory, and a fan-out on it.
pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    /// The log as its own type, for what only tests do to it (deletions).
    pub(crate) embedded: Arc<EmbeddedLog>,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) fanout: Arc<Fanout>,
}

impl Harness {
    pub(crate) fn new(partitions: u32, config: FanoutConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let embedded =
            Arc::new(EmbeddedLog::open(dir.path(), "chat.messages", partitions).unwrap());
        let log: Arc<dyn EventLog> = embedded.clone();
        let fanout = Fanout::new(log.clone(), config);
        Harness {
            _dir: dir,
            embedded,
            log,
            fanout,
        }
    }

    /// A member with a queue of `queue` frames.
    pub(crate) fn member(
        &self,
        queue: usize,
    ) -> (Arc<Member>, mpsc::Receiver<Frame>, CancellationToken) {
        let (tx, rx) = mpsc::channel(queue);
        let kick = CancellationToken::new();
        (Member::new("bob", tx, kick.clone()), rx, kick)
    }

    /// Appends `records` in one batch; their offsets.
    pub(crate) async fn append(&self, records: &[Record]) -> Vec<u64> {
        self.log
            .append(records.to_vec())
            .await
            .unwrap()
            .iter()
            .map(|a: &Appended| a.offset)
            .collect()
    }

    /// `n` room names that live on `partition`.
    pub(crate) fn rooms_on(&self, partition: u32, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("room-{i}"))
            .filter(|r| self.log.partition_for(r.as_bytes()) == partition)
            .take(n)
            .collect()
    }

    /// A `since` of this log's epoch.
    pub(crate) fn since(&self, offset: i64) -> Position {
        Position {
            offset,
            epoch: self.fanout.epoch().to_owned(),
        }
    }

    pub(crate) async fn join(
        &self,
        room: &str,
        member: &Arc<Member>,
        since: Option<i64>,
    ) -> Result<(), FanoutError> {
        let since = since.map(|o| self.since(o));
        within("join", self.fanout.join(room, member, since.as_ref())).await
    }
}

pub(crate) async fn next_frame(rx: &mut mpsc::Receiver<Frame>) -> serde_json::Value {
    let frame = within("a frame", rx.recv())
        .await
        .expect("the member's queue is open");
    serde_json::from_str(frame.as_str()).unwrap()
}

/// The next frame, which must be a `joined` one.
pub(crate) async fn expect_joined(rx: &mut mpsc::Receiver<Frame>) -> serde_json::Value {
    let v = next_frame(rx).await;
    assert_eq!(v["type"], "joined", "{v}");
    v
}

/// The next frame, which must be a message.
pub(crate) async fn expect_message(rx: &mut mpsc::Receiver<Frame>) -> MessageView {
    let v = next_frame(rx).await;
    assert_eq!(v["type"], "message", "{v}");
    serde_json::from_value(v).unwrap()
}

/// Messages up to and including the one with client id `last`.
pub(crate) async fn messages_until(rx: &mut mpsc::Receiver<Frame>, last: &str) -> Vec<MessageView> {
    let mut got = Vec::new();
    loop {
        let m = expect_message(rx).await;
        let done = m.id == last;
        got.push(m);
        if done {
            return got;
        }
    }
}

/// (room, client id) of each message.
pub(crate) fn ids(ms: &[MessageView]) -> Vec<(String, String)> {
    ms.iter().map(|m| (m.room.clone(), m.id.clone())).collect()
}

pub(crate) fn assert_increasing(ms: &[MessageView]) {
    for w in ms.windows(2) {
        assert!(w[0].offset < w[1].offset, "out of order: {ms:?}");
    }
}

/// (room, id) of the records for `rooms`, in order.
pub(crate) fn expected(records: &[Record], rooms: &[&str]) -> Vec<(String, String)> {
    records
        .iter()
        .filter_map(|r| match schemas::decode(&r.value).unwrap() {
            schemas::ChatEvent::MessagePosted(m) => rooms
                .contains(&m.room.as_str())
                .then_some((m.room, m.client_id)),
            schemas::ChatEvent::ReadPositionMoved(_) | schemas::ChatEvent::MessageChanged(_) => {
                None
            }
        })
        .collect()
}

pub(crate) fn small_ring(ring: usize) -> FanoutConfig {
    FanoutConfig {
        ring,
        ..FanoutConfig::default()
    }
}
