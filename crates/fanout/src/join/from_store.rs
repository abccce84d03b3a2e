//! The catch-up of a join from the history store: the room's messages that
//! the store already holds, read by room (the store is indexed by room)
//! instead of scanning the partition in the log.
//!
//! Promises: the member gets the room's messages and changes (edits,
//! deletes, reactions) in `[from, upto)`, in offset order, each once, at its
//! own pace, where `upto` is what the store covers of `[from, until)` (its
//! position for the partition); it is told `upto` so the rest comes from
//! the log. A message comes as the store holds it now (its edits,
//! tombstone and reactions applied), and the change frames of the range
//! follow in their places: applied again, they change nothing. When the store cannot serve
//! (no store, it is behind `from`, it fails, or the room's share is more
//! than [`MOST_HELD`] messages) nothing is sent and `from` comes back: the
//! log serves it all. The store holds one copy per message id, the first,
//! as the dispatcher delivers only the first sighting.

use history::HistoryStore;
use schemas::protocol::MessageView;

use crate::member::Member;
use crate::{message_frame, Fanout, FanoutError};

/// Messages read per store page.
const PAGE: usize = 256;
/// Most messages a catch-up holds from the store before sending them (the
/// store's pages come newest first); a larger share is read from the log.
pub(crate) const MOST_HELD: usize = 16_384;

impl Fanout {
    /// Sends `member` the messages of `room` in `[from, until)` that the
    /// history store covers; returns the offset it sent up to (`from` when
    /// the store served nothing).
    pub(crate) async fn catch_up_from_store(
        &self,
        partition: u32,
        room: &str,
        member: &Member,
        from: u64,
        until: u64,
    ) -> Result<u64, FanoutError> {
        let Some(store) = &self.history else {
            return Ok(from);
        };
        let upto = match store.position(partition).await {
            Ok(Some(position)) => position.min(until),
            Ok(None) => return Ok(from),
            Err(e) => {
                tracing::warn!(partition, error = %e, "history store unavailable for a catch-up: reading the log");
                return Ok(from);
            }
        };
        if upto <= from {
            return Ok(from);
        }
        let Some(messages) = messages_between(&**store, room, from, upto).await else {
            return Ok(from);
        };
        let changes = match store.changes_between(room, from, upto).await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(room, error = %e, "history store failed in a catch-up: reading the log");
                return Ok(from);
            }
        };
        let mut changes = changes.into_iter().peekable();
        for m in &messages {
            while let Some(c) = changes.next_if(|c| (c.offset as i64) < m.offset) {
                member
                    .send_paced(change_frame(&c), self.config.catch_up_stall)
                    .await?;
            }
            member
                .send_paced(message_frame(m), self.config.catch_up_stall)
                .await?;
        }
        for c in changes {
            member
                .send_paced(change_frame(&c), self.config.catch_up_stall)
                .await?;
        }
        ::metrics::counter!(crate::metrics::CATCH_UP_MESSAGES_TOTAL, "source" => "store")
            .increment(messages.len() as u64);
        Ok(upto)
    }
}

/// The live frame of a change the store lists.
fn change_frame(c: &history::ChangeMark) -> crate::Frame {
    let event = schemas::MessageChanged {
        room: c.room.clone(),
        client_id: c.id.clone(),
        user: c.user.clone(),
        target: c.target as i64,
        change: c.change.clone(),
        ts: c.ts,
    };
    crate::Frame::from(schemas::protocol::change_frame(c.offset as i64, &event))
}

/// The messages of `room` with offsets in `[from, upto)`, oldest first, or
/// `None` when the store fails or holds more than [`MOST_HELD`] of them.
pub(crate) async fn messages_between(
    store: &dyn HistoryStore,
    room: &str,
    from: u64,
    upto: u64,
) -> Option<Vec<MessageView>> {
    let mut pages: Vec<Vec<MessageView>> = Vec::new();
    let mut held = 0;
    let mut before = upto;
    loop {
        let page = match store.page(room, Some(before), PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(room, error = %e, "history store failed in a catch-up: reading the log");
                return None;
            }
        };
        let oldest = page.first().map(|m| m.offset);
        let last = page.len() < PAGE || oldest.is_none_or(|o| o <= from as i64);
        held += page.len();
        pages.push(page);
        if last {
            break;
        }
        if held > MOST_HELD {
            return None;
        }
        before = oldest.unwrap_or(0) as u64;
    }
    Some(
        pages
            .into_iter()
            .rev()
            .flatten()
            .filter(|m| m.offset >= from as i64)
            .collect(),
    )
}
