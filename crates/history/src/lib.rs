//! The history of every room, as projected from the log: the store trait
//! and its backends.
//!
//! - [`HistoryStore`]: what a gateway reads (pages, ids) and a projector
//!   writes (batches with the position they reach, atomically).
//! - [`versions`]: projection versions: which ones a store holds, which one
//!   reads use ([`versions::CurrentVersion`] follows a switch).
//! - Backends, each a cargo feature: `embedded` (default; redb files in the
//!   data dir, [`embedded::EmbeddedStore`]) and `scylla` (ScyllaDB,
//!   `scylla::ScyllaStore`). A crate that only reads or writes through the
//!   trait (the gateway) depends on this crate without default features and
//!   builds no backend.
//! - The conformance suite every backend passes is behind the `testing`
//!   feature ([`store_conformance_suite!`]).
//!
//! Promises every backend keeps (checked by the conformance suite): a batch
//! is applied together with the position it reaches, a batch the store
//! already covers is ignored, a message or change id already in a room is
//! not stored twice, and pages show each message as its changes left it
//! ([`fold`]: latest edit, tombstone, reactions).

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod metrics;
#[cfg(feature = "scylla")]
pub mod scylla;
pub mod versions;

use async_trait::async_trait;
use schemas::protocol::{MessageView, Reaction, MAX_REACTION_USERS_LISTED};
use schemas::Change;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now; retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Storage(String),
}

impl StoreError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A user's read position in a room: every offset of the room's partition
/// up to `offset`, inclusive, is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    pub room: String,
    pub user: String,
    pub offset: u64,
}

/// A change to a message (edit, delete, reaction) as the projector hands
/// it to a store: the event at `offset` changes the message at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMark {
    pub room: String,
    /// The change's own log offset; always above `target`.
    pub offset: u64,
    /// The client id of the change: a change whose id is already in its
    /// room (a retry that reached the log twice) is not applied again.
    pub id: String,
    /// Who made it: an edit or delete counts only from the author.
    pub user: String,
    pub target: u64,
    pub change: Change,
    pub ts: i64,
}

/// What one apply stores, all of it from one log partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In offset order.
    pub messages: Vec<MessageView>,
    /// Read positions; a store keeps the highest of each (room, user).
    pub reads: Vec<ReadMark>,
    /// (user, room): rooms to list among the user's rooms (a sender's, both
    /// users' of a direct message, a reader's), each kept once.
    pub members: Vec<(String, String)>,
    /// Changes to messages, in offset order; each applies after every
    /// message of the batch (its target is always at a lower offset).
    pub changes: Vec<ChangeMark>,
}

/// Applies `change` to `message` (which it targets) by the projection's
/// rules, the same in every store: an edit or a delete counts only from the
/// message's author; a deleted message keeps no body, no edit time and no
/// reactions, and takes no further change; a user reacts at most once per
/// emoji (adding again, or removing one never added, changes nothing).
/// Returns whether anything changed.
pub fn fold(message: &mut MessageView, change: &ChangeMark) -> bool {
    if message.deleted {
        return false;
    }
    match &change.change {
        Change::Edit { body } => {
            if change.user != message.user {
                return false;
            }
            message.body.clone_from(body);
            message.edited_ts = Some(change.ts);
        }
        Change::Delete => {
            if change.user != message.user {
                return false;
            }
            message.deleted = true;
            message.body.clear();
            message.edited_ts = None;
            message.reactions.clear();
        }
        Change::React { emoji } => {
            let at = match message.reactions.iter().position(|r| &r.emoji == emoji) {
                Some(at) => at,
                None => {
                    message.reactions.push(Reaction {
                        emoji: emoji.clone(),
                        count: 0,
                        users: Vec::new(),
                    });
                    message.reactions.len() - 1
                }
            };
            let reaction = &mut message.reactions[at];
            if reaction.users.contains(&change.user) {
                return false;
            }
            reaction.users.push(change.user.clone());
            reaction.count = reaction.users.len() as u64;
        }
        Change::Unreact { emoji } => {
            let Some(at) = message.reactions.iter().position(|r| &r.emoji == emoji) else {
                return false;
            };
            let reaction = &mut message.reactions[at];
            let Some(user) = reaction.users.iter().position(|u| u == &change.user) else {
                return false;
            };
            reaction.users.remove(user);
            reaction.count = reaction.users.len() as u64;
            if reaction.users.is_empty() {
                message.reactions.remove(at);
            }
        }
    }
    true
}

/// A moment of a room's history, for [`HistoryStore::page_as_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Everything at log offsets up to this one, inclusive.
    Offset(u64),
    /// Everything stamped at or before this time (milliseconds since the
    /// Unix epoch).
    Time(i64),
}

impl AsOf {
    /// Whether an event at `offset`, stamped `ts`, had happened by then.
    pub fn covers(self, offset: u64, ts: i64) -> bool {
        match self {
            AsOf::Offset(upto) => offset <= upto,
            AsOf::Time(upto) => ts <= upto,
        }
    }
}

/// A message as it stood at a moment ([`HistoryStore::page_as_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastMessage {
    pub message: MessageView,
    /// Set when its body then is no longer in the store (the message was
    /// deleted since: a deleted body stays only in the log): the offset of
    /// the log record that holds it, the message's own or the edit's that
    /// set it. `message.body` is then empty.
    pub body_on_log: Option<u64>,
}

/// `message` as a page shows it: at most [`MAX_REACTION_USERS_LISTED`]
/// users named per reaction (`count` stays exact). Stores keep every user,
/// to apply later changes by the rules of [`fold`].
pub fn listed(mut message: MessageView) -> MessageView {
    for reaction in &mut message.reactions {
        reaction.users.truncate(MAX_REACTION_USERS_LISTED);
    }
    message
}

impl Batch {
    /// A batch of messages alone.
    pub fn messages(messages: Vec<MessageView>) -> Self {
        Batch {
            messages,
            ..Batch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.reads.is_empty()
            && self.members.is_empty()
            && self.changes.is_empty()
    }
}

/// Most rooms [`HistoryStore::user_rooms`] and most readers
/// [`HistoryStore::reads`] answer.
pub const MAX_LISTED: usize = 1000;

/// Unread messages counted per room at most; past it a count says "at
/// least this many".
pub const UNREAD_CAP: u64 = 1000;

/// Counts the messages that `pages` (`before`, `limit` -> up to `limit` of
/// the newest messages below `before`, oldest first, as
/// [`HistoryStore::page`]) holds above `after`, deleted ones left out, up
/// to `cap`: newest first, a page at a time (growing), until below `after`
/// or at `cap`.
pub async fn count_newest_first<F, Fut>(
    after: Option<u64>,
    cap: u64,
    mut pages: F,
) -> Result<u64, StoreError>
where
    F: FnMut(Option<u64>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<MessageView>, StoreError>>,
{
    let mut count = 0;
    let mut before = None;
    let mut limit = 16;
    loop {
        let page = pages(before, limit).await?;
        let Some(oldest) = page.first() else {
            return Ok(count);
        };
        let oldest = oldest.offset as u64;
        count += page
            .iter()
            .filter(|m| !m.deleted && after.is_none_or(|a| m.offset as u64 > a))
            .count() as u64;
        if count >= cap {
            return Ok(cap);
        }
        if page.len() < limit || after.is_some_and(|a| oldest <= a) {
            return Ok(count);
        }
        before = Some(oldest);
        limit = (limit * 4).min(MAX_LISTED);
    }
}

/// The history of every room, as projected from the log.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores `batch` (all from `partition`; messages in offset order) and
    /// records `next` as the partition's position, atomically. A batch whose
    /// `next` is not beyond the stored position is ignored; a message whose
    /// id is already in its room is skipped; a read position lower than the
    /// stored one is ignored; a change whose id is already in its room is
    /// skipped, and the others [`fold`] into their targets in offset order
    /// (a change whose target is no message of its room changes nothing,
    /// but its id is kept).
    async fn apply_batch(&self, partition: u32, batch: Batch, next: u64) -> Result<(), StoreError>;

    /// [`HistoryStore::apply_batch`] of messages alone.
    async fn apply(
        &self,
        partition: u32,
        messages: Vec<MessageView>,
        next: u64,
    ) -> Result<(), StoreError> {
        self.apply_batch(partition, Batch::messages(messages), next)
            .await
    }

    /// The next offset of `partition` to apply, if anything was applied.
    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError>;

    /// Up to `limit` of the newest messages of `room` with an offset below
    /// `before` (all when `None`), oldest first, each as its changes left
    /// it ([`fold`], then [`listed`]).
    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError>;

    /// Like [`HistoryStore::page`], but the room as it stood at `at`: only
    /// messages that were in it then, each with only the changes made by
    /// then ([`fold`]ed in offset order, then [`listed`]).
    async fn page_as_of(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        at: AsOf,
    ) -> Result<Vec<PastMessage>, StoreError>;

    /// The changes of `room` at offsets in `[from, upto)`, in offset order:
    /// what a resume served from the store passes on besides the messages.
    /// Changes skipped as retries are not listed; an edit whose body was
    /// erased (its message was deleted since: the delete follows it) is
    /// left out.
    async fn changes_between(
        &self,
        room: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<ChangeMark>, StoreError>;

    /// The read position of `user` in `room`, if any was stored.
    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError>;

    /// The read positions of `room`, by user name, at most [`MAX_LISTED`].
    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError>;

    /// The rooms listed for `user` (see [`Batch::members`]), sorted by
    /// name, at most [`MAX_LISTED`].
    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError>;

    /// Messages of `room` with an offset above `after` (all when `None`),
    /// counted up to `cap`; deleted messages do not count.
    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        count_newest_first(after, cap, |before, limit| self.page(room, before, limit)).await
    }

    /// The offset of the message of `room` sent with client id `id`.
    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError>;

    /// The message of `room` at `offset`, as a page shows it, if one is
    /// stored there.
    async fn message(&self, room: &str, offset: u64) -> Result<Option<MessageView>, StoreError> {
        Ok(self
            .page(room, Some(offset.saturating_add(1)), 1)
            .await?
            .into_iter()
            .find(|m| m.offset == offset as i64))
    }

    /// For each (room, id), the offset and timestamp of the stored message
    /// or change, if any: how a gateway answers a retry whose first attempt
    /// another node (or an earlier process) appended.
    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for (room, id) in keys {
            let hit = match self.find_id(room, id).await? {
                Some(offset) => self
                    .page(room, Some(offset + 1), 1)
                    .await?
                    .into_iter()
                    .find(|m| m.offset == offset as i64)
                    .map(|m| (offset, m.ts)),
                None => None,
            };
            found.push(hit);
        }
        Ok(found)
    }
}
