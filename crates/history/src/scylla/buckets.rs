//! The layout of the history in Scylla's tables, as pure functions: which
//! bucket holds an offset, which writes apply a batch, the cursor that walks
//! buckets backwards to answer a page, and how a page's rows and the changes
//! kept for them make the messages it shows. No I/O: the store runs these
//! plans against the cluster, the tests against an in-memory copy of the
//! tables, and both must agree with the embedded store.
//!
//! Promises:
//! - [`Bucketing::bucket_of`] is monotone: a higher offset is never in a lower
//!   bucket, so "older" is "lower bucket, then lower offset".
//! - [`plan_apply`] stores a message or a change unless its id is already
//!   claimed in its room at another offset (by an earlier batch or earlier in
//!   this one; messages and changes share the ids of a room), the same rule as
//!   the embedded store; replanning the same batch gives the same writes, so a
//!   replay is harmless. A change is kept twice: in the partition of its
//!   target's bucket (`message_changes`), whether or not the target is a
//!   message of the room, folded in when a page reads its target ([`shown`]),
//!   never written into the message's row; and in the partition of its own
//!   offset's bucket (`room_changes`), listed by offset for a catch-up
//!   ([`listed_changes`]). The bucket of its own offset is listed in the room
//!   index too, as a message's is, so a walk of the index finds it.
//! - [`WritePlan::erase`] takes the body of a message its author deletes out
//!   of the tables: the message's body cell and the text of its edits, in
//!   both change tables; [`WritePlan::erase_edits_of`] does the same for the
//!   edits of a message deleted by an earlier batch.
//! - [`PageWalk`] shows only rows below their log partition's stored
//!   position (every row below it is written: the position goes last), so a
//!   batch appears at once although its rows span many Scylla partitions. It
//!   asks only for reads that can hold wanted rows, checks every answer (a
//!   misordered one is an error, never a loop), and ends: each step lowers
//!   its cursor, drops a bucket, or settles the bound. [`shown`] folds only
//!   the changes below that same position.
//! - [`IndexScan`] finds the buckets of a room within an offset range ([`Span`])
//!   from the room index, checking every answer as [`PageWalk`] does, and
//!   [`listed_changes`] lists the changes read from them below the position,
//!   in offset order, leaving out erased edits.

use std::collections::{HashMap, HashSet, VecDeque};

use schemas::protocol::MessageView;
use schemas::Change;

use crate::{fold, listed, AsOf, ChangeMark, PastMessage};

/// Offsets per bucket in production; the arithmetic that chose it is in
/// `schemas/cql/tables.cql`. Changing it needs a new projection version.
pub const BUCKET_SIZE: u64 = 16_384;

/// Buckets read from the room index per request.
pub const INDEX_PAGE: usize = 16;

/// Most rows asked of one bucket per request; a larger page continues in the
/// same bucket below the last offset read.
pub const MAX_ROWS_PER_READ: usize = 1_000;

/// Most rows in one unlogged batch, and most estimated bytes: below Scylla's
/// default batch size warning (128 KiB) whatever the bodies.
pub const MAX_BATCH_ROWS: usize = 64;
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("negative offset {offset} for message {id}")]
    NegativeOffset { offset: i64, id: String },
    #[error("offset {offset} of change {id} out of range")]
    ChangeOffset { offset: u64, id: String },
    #[error("the store answered out of order: {0}")]
    Misordered(&'static str),
    #[error("unknown change kind {kind:?} (text {text:?}) stored")]
    UnknownChange { kind: String, text: Option<String> },
}

/// How offsets map to buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucketing {
    size: u64,
}

impl Default for Bucketing {
    fn default() -> Self {
        Bucketing { size: BUCKET_SIZE }
    }
}

impl Bucketing {
    /// Buckets of `size` offsets (at least 1).
    pub fn new(size: u64) -> Self {
        Bucketing { size: size.max(1) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bucket holding `offset` (`offset >= 0`).
    pub fn bucket_of(&self, offset: i64) -> i64 {
        debug_assert!(offset >= 0);
        (offset.max(0) as u64 / self.size) as i64
    }
}

/// A message id claimed in a room: where the message was first stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub room: String,
    pub id: String,
    pub offset: i64,
    pub ts: i64,
    /// The room's log partition.
    pub partition: u32,
}

/// Whether a row at `offset` of a partition whose stored position is
/// `position` may be shown: only what a completed batch covers.
pub fn is_visible(offset: i64, position: Option<i64>) -> bool {
    position.is_some_and(|p| offset < p)
}

/// Rows of one Scylla partition (room, bucket), newest last, written as one
/// unlogged batch (one statement when alone). A row whose `deleted` is set
/// is written with its body erased (null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBatch {
    pub room: String,
    pub bucket: i64,
    pub rows: Vec<MessageView>,
}

/// A change as `message_changes` keeps it, in the partition (room, bucket of
/// `target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// The offset of the message it changes.
    pub target: i64,
    /// Its own offset.
    pub offset: i64,
    pub id: String,
    pub user: String,
    /// `None`: an edit whose body was erased, because its message was
    /// deleted by its author.
    pub change: Option<Change>,
    pub ts: i64,
}

impl ChangeRow {
    pub fn of(c: &ChangeMark) -> Result<Self, LayoutError> {
        let offset = |o: u64| {
            i64::try_from(o).map_err(|_| LayoutError::ChangeOffset {
                offset: o,
                id: c.id.clone(),
            })
        };
        Ok(ChangeRow {
            target: offset(c.target)?,
            offset: offset(c.offset)?,
            id: c.id.clone(),
            user: c.user.clone(),
            change: Some(c.change.clone()),
            ts: c.ts,
        })
    }

    /// The `kind` and `text` columns: `edit` (body, null once erased),
    /// `delete` (null), `react` or `unreact` (the emoji).
    pub fn kind_and_text(&self) -> (&'static str, Option<&str>) {
        match &self.change {
            None => ("edit", None),
            Some(Change::Edit { body }) => ("edit", Some(body)),
            Some(Change::Delete) => ("delete", None),
            Some(Change::React { emoji }) => ("react", Some(emoji)),
            Some(Change::Unreact { emoji }) => ("unreact", Some(emoji)),
        }
    }

    /// The change from its `kind` and `text` columns.
    pub fn change_of(kind: &str, text: Option<String>) -> Result<Option<Change>, LayoutError> {
        Ok(match (kind, text) {
            ("edit", Some(body)) => Some(Change::Edit { body }),
            ("edit", None) => None,
            ("delete", None) => Some(Change::Delete),
            ("react", Some(emoji)) => Some(Change::React { emoji }),
            ("unreact", Some(emoji)) => Some(Change::Unreact { emoji }),
            (kind, text) => {
                return Err(LayoutError::UnknownChange {
                    kind: kind.to_owned(),
                    text,
                })
            }
        })
    }

    fn is_edit(&self) -> bool {
        matches!(self.change, None | Some(Change::Edit { .. }))
    }

    /// The change as the projector handed it, unless it is an erased edit.
    pub fn mark(&self, room: &str) -> Option<ChangeMark> {
        Some(ChangeMark {
            room: room.to_owned(),
            offset: u64::try_from(self.offset).ok()?,
            id: self.id.clone(),
            user: self.user.clone(),
            target: u64::try_from(self.target).ok()?,
            change: self.change.clone()?,
            ts: self.ts,
        })
    }
}

/// Change rows of one Scylla partition, written as one unlogged batch (one
/// statement when alone): (room, bucket of their targets) in
/// `message_changes`, (room, bucket of their own offsets) in `room_changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    pub room: String,
    pub bucket: i64,
    pub rows: Vec<ChangeRow>,
}

/// A message deleted by a change of the batch, by whom: the store learns
/// the message's author (from the batch, or by reading its row) and the
/// edits kept for it, and calls [`WritePlan::erase`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub room: String,
    pub target: i64,
}

/// A message of an earlier batch (or of none) edited by a change of the
/// batch: the store reads its row and, if its author deleted it, calls
/// [`WritePlan::erase_edits_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    pub room: String,
    pub target: i64,
}

/// The writes that apply one batch. All of them go before the position.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WritePlan {
    pub bucketing: Bucketing,
    /// The log partition of every message of the batch.
    pub partition: u32,
    pub batches: Vec<RowBatch>,
    /// (room, bucket) entries of the room index, each once: the buckets of
    /// the messages and of the changes' own offsets.
    pub buckets: Vec<(String, i64)>,
    pub claims: Vec<Claim>,
    /// The changes, by target (`message_changes`).
    pub changes: Vec<ChangeBatch>,
    /// The same changes, by their own offset (`room_changes`).
    pub room_changes: Vec<ChangeBatch>,
    /// Messages deleted in the batch, each once: see [`WritePlan::erase`].
    pub deletions: Vec<Deletion>,
    /// Messages not in the batch that it edits, each once: see
    /// [`WritePlan::erase_edits_of`].
    pub edited: Vec<Edited>,
    /// Message bodies to erase: (room, bucket, offset) of rows of earlier
    /// batches.
    pub erase_bodies: Vec<(String, i64, i64)>,
    /// Edit bodies to erase: (room, bucket, target, offset) of change rows of
    /// earlier batches.
    pub erase_edits: Vec<(String, i64, i64, i64)>,
    /// The same edit bodies in `room_changes`: (room, bucket of the change,
    /// offset).
    pub erase_room_edits: Vec<(String, i64, i64)>,
    /// Messages and changes not stored because their id was already claimed
    /// elsewhere.
    pub skipped: usize,
}

impl WritePlan {
    /// Number of statements the plan issues (batches count as one).
    pub fn statements(&self) -> usize {
        self.batches.len()
            + self.buckets.len()
            + self.claims.len()
            + self.changes.len()
            + self.room_changes.len()
            + self.erase_bodies.len()
            + self.erase_edits.len()
            + self.erase_room_edits.len()
    }

    /// The message of the batch at `target` in `room`, if the batch stores
    /// one.
    pub fn message(&self, room: &str, target: i64) -> Option<&MessageView> {
        self.batches
            .iter()
            .filter(|b| b.room == room)
            .flat_map(|b| &b.rows)
            .find(|m| m.offset == target)
    }

    /// Erases what a delete takes away, given the author of the message of
    /// `room` at `target` (`None`: no message there) and `stored`: the
    /// change rows already kept for it. Only a delete by the author counts
    /// ([`crate::fold`]); then the message's body and the body of every edit
    /// of it are erased: in this plan's rows, or by erasing the cells of
    /// earlier batches' rows.
    pub fn erase(&mut self, room: &str, target: i64, author: Option<&str>, stored: &[ChangeRow]) {
        let Some(author) = author else {
            return; // no message there: nothing to erase
        };
        let deleted = self
            .changes
            .iter()
            .filter(|b| b.room == room)
            .flat_map(|b| &b.rows)
            .any(|c| {
                c.target == target
                    && c.offset > target
                    && c.user == author
                    && c.change == Some(Change::Delete)
            });
        if !deleted {
            return;
        }
        let bucket = self
            .changes
            .iter()
            .find(|b| b.room == room && b.rows.iter().any(|c| c.target == target))
            .map(|b| b.bucket)
            .unwrap_or_default();
        let mut in_batch = false;
        for m in self
            .batches
            .iter_mut()
            .filter(|b| b.room == room)
            .flat_map(|b| &mut b.rows)
            .filter(|m| m.offset == target)
        {
            m.body.clear();
            m.deleted = true;
            in_batch = true;
        }
        if !in_batch
            && !self
                .erase_bodies
                .contains(&(room.to_owned(), bucket, target))
        {
            self.erase_bodies.push((room.to_owned(), bucket, target));
        }
        self.erase_edits_of(room, target);
        for c in stored {
            let key = (room.to_owned(), bucket, target, c.offset);
            if c.target == target
                && matches!(c.change, Some(Change::Edit { .. }))
                && !self.erase_edits.contains(&key)
            {
                self.erase_edits.push(key);
                let at = (
                    room.to_owned(),
                    self.bucketing.bucket_of(c.offset),
                    c.offset,
                );
                self.erase_room_edits.push(at);
            }
        }
    }

    /// Writes the edits of the message of `room` at `target` in this plan
    /// without their text, in both change tables: the message is deleted by
    /// its author (in this batch, or before: an edit after the delete keeps
    /// no body either).
    pub fn erase_edits_of(&mut self, room: &str, target: i64) {
        for c in self
            .changes
            .iter_mut()
            .chain(self.room_changes.iter_mut())
            .filter(|b| b.room == room)
            .flat_map(|b| &mut b.rows)
            .filter(|c| c.target == target && c.is_edit())
        {
            c.change = None;
        }
    }
}

/// The (room, id) keys whose claims the plan of `messages` and `changes`
/// needs, each once, in first-seen order.
pub fn claim_keys(messages: &[MessageView], changes: &[ChangeMark]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    messages
        .iter()
        .map(|m| (m.room.as_str(), m.id.as_str()))
        .chain(changes.iter().map(|c| (c.room.as_str(), c.id.as_str())))
        .filter(|&key| seen.insert(key))
        .map(|(room, id)| (room.to_owned(), id.to_owned()))
        .collect()
}

/// Estimated size of a row in a batch request.
fn row_bytes(m: &MessageView) -> usize {
    m.room.len() + m.id.len() + m.user.len() + m.body.len() + 3 * 8 + 32
}

/// Estimated size of a change row in a batch request.
fn change_bytes(room: &str, c: &ChangeRow) -> usize {
    let text = c.kind_and_text().1.map_or(0, str::len);
    room.len() + c.id.len() + c.user.len() + text + 8 + 4 * 8 + 32
}

/// Appends `row` to the open batch of its partition in `batches` while that
/// stays within [`MAX_BATCH_ROWS`] and [`MAX_BATCH_BYTES`], else opens one.
fn push_grouped<R>(
    batches: &mut Vec<(String, i64, Vec<R>)>,
    open: &mut HashMap<(String, i64), (usize, usize)>,
    (room, bucket): (&str, i64),
    row: R,
    size: usize,
) {
    let key = (room.to_owned(), bucket);
    match open.get(&key).copied() {
        Some((i, bytes))
            if batches[i].2.len() < MAX_BATCH_ROWS && bytes + size <= MAX_BATCH_BYTES =>
        {
            open.insert(key, (i, bytes + size));
            batches[i].2.push(row);
        }
        _ => {
            open.insert(key, (batches.len(), size));
            batches.push((room.to_owned(), bucket, vec![row]));
        }
    }
}

/// Plans the writes of `messages` and then `changes` (one log partition,
/// each in offset order), given `known`: the offsets of the claims already
/// stored for [`claim_keys`] (missing = none), whether or not a position
/// covers them yet. Deletions are left to [`WritePlan::erase`], edits of
/// messages deleted before to [`WritePlan::erase_edits_of`].
pub fn plan_apply(
    bucketing: Bucketing,
    partition: u32,
    messages: Vec<MessageView>,
    changes: Vec<ChangeMark>,
    known: &HashMap<(String, String), i64>,
) -> Result<WritePlan, LayoutError> {
    let mut plan = WritePlan {
        bucketing,
        partition,
        ..WritePlan::default()
    };
    // Claims made by this batch, on top of `known`.
    let mut claimed: HashMap<(String, String), i64> = HashMap::new();
    let mut claim = |room: &str, id: &str, offset: i64| {
        let key = (room.to_owned(), id.to_owned());
        let first = claimed
            .get(&key)
            .copied()
            .or_else(|| known.get(&key).copied());
        if first.is_some_and(|first| first != offset) {
            return false;
        }
        claimed.insert(key, offset);
        true
    };
    // Partition (room, bucket) -> index of its open batch, and its bytes.
    let mut open = HashMap::new();
    let mut rows = Vec::new();
    let mut indexed: HashSet<(String, i64)> = HashSet::new();
    for m in messages {
        if m.offset < 0 {
            return Err(LayoutError::NegativeOffset {
                offset: m.offset,
                id: m.id,
            });
        }
        if !claim(&m.room, &m.id, m.offset) {
            plan.skipped += 1;
            continue;
        }
        plan.claims.push(Claim {
            room: m.room.clone(),
            id: m.id.clone(),
            offset: m.offset,
            ts: m.ts,
            partition,
        });
        let bucket = bucketing.bucket_of(m.offset);
        if indexed.insert((m.room.clone(), bucket)) {
            plan.buckets.push((m.room.clone(), bucket));
        }
        let size = row_bytes(&m);
        let room = m.room.clone();
        push_grouped(&mut rows, &mut open, (&room, bucket), m, size);
    }
    plan.batches = rows
        .into_iter()
        .map(|(room, bucket, rows)| RowBatch { room, bucket, rows })
        .collect();
    let posted: HashSet<(&str, i64)> = plan
        .batches
        .iter()
        .flat_map(|b| b.rows.iter().map(|m| (b.room.as_str(), m.offset)))
        .collect();
    let mut open = HashMap::new();
    let mut kept = Vec::new();
    let mut open_log = HashMap::new();
    let mut logged = Vec::new();
    let mut deleted: HashSet<(String, i64)> = HashSet::new();
    let mut edited: HashSet<(String, i64)> = HashSet::new();
    for c in changes {
        let row = ChangeRow::of(&c)?;
        if !claim(&c.room, &c.id, row.offset) {
            plan.skipped += 1;
            continue;
        }
        plan.claims.push(Claim {
            room: c.room.clone(),
            id: c.id.clone(),
            offset: row.offset,
            ts: c.ts,
            partition,
        });
        if row.change == Some(Change::Delete)
            && row.target < row.offset
            && deleted.insert((c.room.clone(), row.target))
        {
            plan.deletions.push(Deletion {
                room: c.room.clone(),
                target: row.target,
            });
        }
        if row.is_edit()
            && row.target < row.offset
            && !posted.contains(&(c.room.as_str(), row.target))
            && edited.insert((c.room.clone(), row.target))
        {
            plan.edited.push(Edited {
                room: c.room.clone(),
                target: row.target,
            });
        }
        let own = bucketing.bucket_of(row.offset);
        if indexed.insert((c.room.clone(), own)) {
            plan.buckets.push((c.room.clone(), own));
        }
        let bucket = bucketing.bucket_of(row.target);
        let size = change_bytes(&c.room, &row);
        push_grouped(
            &mut logged,
            &mut open_log,
            (&c.room, own),
            row.clone(),
            size,
        );
        push_grouped(&mut kept, &mut open, (&c.room, bucket), row, size);
    }
    let batches = |grouped: Vec<(String, i64, Vec<ChangeRow>)>| {
        grouped
            .into_iter()
            .map(|(room, bucket, rows)| ChangeBatch { room, bucket, rows })
            .collect()
    };
    plan.changes = batches(kept);
    plan.room_changes = batches(logged);
    Ok(plan)
}

/// A deleted message as every page shows it.
fn tombstone(mut message: MessageView) -> MessageView {
    message.body.clear();
    message.deleted = true;
    message.edited_ts = None;
    message.reactions.clear();
    message
}

/// `row` (a stored message, its body erased if `deleted` is set) as a page
/// shows it: `changes` of it (in offset order) below `position` folded in
/// by [`crate::fold`], then [`crate::listed`]. An erased body, of the
/// message or of an edit, is a delete by the author: the message is a
/// tombstone, whatever else its changes say (which is what folding them
/// all gives once the delete is covered).
pub fn shown<'a>(
    row: MessageView,
    changes: impl IntoIterator<Item = &'a ChangeRow>,
    position: i64,
) -> MessageView {
    if row.deleted {
        return tombstone(row);
    }
    let mut message = row;
    for c in changes {
        if c.offset >= position || c.offset <= message.offset || c.target != message.offset {
            continue;
        }
        let Some(change) = &c.change else {
            return tombstone(message);
        };
        let mark = ChangeMark {
            room: message.room.clone(),
            offset: c.offset as u64,
            id: c.id.clone(),
            user: c.user.clone(),
            target: c.target as u64,
            change: change.clone(),
            ts: c.ts,
        };
        fold(&mut message, &mark);
    }
    listed(message)
}

/// The change reads a page of `rows` (oldest first, below one position)
/// needs: per bucket, (bucket, first target, last target), oldest first.
pub fn change_reads<'a>(
    bucketing: Bucketing,
    rows: impl IntoIterator<Item = &'a MessageView>,
) -> Vec<(i64, i64, i64)> {
    let mut reads: Vec<(i64, i64, i64)> = Vec::new();
    for m in rows {
        let bucket = bucketing.bucket_of(m.offset);
        match reads.last_mut() {
            Some(read) if read.0 == bucket => {
                read.1 = read.1.min(m.offset);
                read.2 = read.2.max(m.offset);
            }
            _ => reads.push((bucket, m.offset, m.offset)),
        }
    }
    reads
}

/// The page of `rows` (oldest first) as readers see it: each row
/// [`shown`] with the `changes` read for it, in offset order, below
/// `position`.
pub fn fold_page(
    rows: Vec<MessageView>,
    changes: Vec<ChangeRow>,
    position: i64,
) -> Vec<MessageView> {
    let by_target = by_target(changes);
    rows.into_iter()
        .map(|m| {
            let changes = by_target.get(&m.offset).map(Vec::as_slice);
            shown(m, changes.unwrap_or_default(), position)
        })
        .collect()
}

/// `changes` by target, each target's in offset order.
fn by_target(changes: Vec<ChangeRow>) -> HashMap<i64, Vec<ChangeRow>> {
    let mut by_target: HashMap<i64, Vec<ChangeRow>> = HashMap::new();
    for c in changes {
        by_target.entry(c.target).or_default().push(c);
    }
    for changes in by_target.values_mut() {
        changes.sort_by_key(|c| c.offset);
    }
    by_target
}

/// `row` (a stored message, its body erased if `deleted` is set) as it
/// stood at `at`: as posted, with its `changes` (in offset order) below
/// `position` and made by `at` folded in, then [`crate::listed`]. A body
/// erased since (the message's, or that of the edit that set it then) is
/// empty, and `body_on_log` names the record that holds it.
pub fn shown_as_of<'a>(
    row: MessageView,
    changes: impl IntoIterator<Item = &'a ChangeRow>,
    position: i64,
    at: AsOf,
) -> PastMessage {
    let offset = row.offset;
    let (body, mut body_on_log) = if row.deleted {
        (String::new(), Some(offset as u64))
    } else {
        (row.body, None)
    };
    let mut message = MessageView {
        body,
        deleted: false,
        edited_ts: None,
        reactions: Vec::new(),
        ..row
    };
    for c in changes {
        if c.offset >= position
            || c.offset <= offset
            || c.target != offset
            || !at.covers(c.offset as u64, c.ts)
        {
            continue;
        }
        let change = c.change.clone().unwrap_or(Change::Edit {
            body: String::new(),
        });
        let mark = ChangeMark {
            room: message.room.clone(),
            offset: c.offset as u64,
            id: c.id.clone(),
            user: c.user.clone(),
            target: c.target as u64,
            change,
            ts: c.ts,
        };
        if fold(&mut message, &mark) {
            match mark.change {
                Change::Edit { .. } => body_on_log = c.change.is_none().then_some(c.offset as u64),
                Change::Delete => body_on_log = None,
                Change::React { .. } | Change::Unreact { .. } => {}
            }
        }
    }
    PastMessage {
        message: listed(message),
        body_on_log,
    }
}

/// [`fold_page`] as of `at` ([`shown_as_of`]).
pub fn fold_page_as_of(
    rows: Vec<MessageView>,
    changes: Vec<ChangeRow>,
    position: i64,
    at: AsOf,
) -> Vec<PastMessage> {
    let by_target = by_target(changes);
    rows.into_iter()
        .map(|m| {
            let changes = by_target.get(&m.offset).map(Vec::as_slice);
            shown_as_of(m, changes.unwrap_or_default(), position, at)
        })
        .collect()
}

/// Offsets `from..upto` of a room's log partition, non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: i64,
    pub upto: i64,
}

impl Span {
    /// `[from, upto)` (offsets beyond `i64::MAX` cannot be stored), or
    /// `None` when empty.
    pub fn new(from: u64, upto: u64) -> Option<Self> {
        let clamp = |o: u64| i64::try_from(o).unwrap_or(i64::MAX);
        let (from, upto) = (clamp(from), clamp(upto));
        (from < upto).then_some(Span { from, upto })
    }

    /// The part of the span below `position` (nothing when `None`): what
    /// a completed batch covers.
    pub fn below(self, position: Option<i64>) -> Option<Self> {
        let upto = self.upto.min(position?);
        (self.from < upto).then_some(Span { upto, ..self })
    }

    pub fn contains(&self, offset: i64) -> bool {
        self.from <= offset && offset < self.upto
    }

    /// The buckets holding the span: (first, last).
    pub fn buckets(&self, bucketing: Bucketing) -> (i64, i64) {
        (
            bucketing.bucket_of(self.from),
            bucketing.bucket_of(self.upto - 1),
        )
    }
}

/// Reads of the room index for the buckets of a [`Span`]: from its last
/// bucket down, [`INDEX_PAGE`] at a time, until below its first. Every
/// answer is checked (a misordered one is an error, never a loop), and each
/// read lowers the cursor, so it ends.
#[derive(Debug)]
pub struct IndexScan {
    first: i64,
    /// Where the next read starts; `None` once done.
    at_most: Option<i64>,
    /// Buckets found, newest first.
    found: Vec<i64>,
    partition: Option<u32>,
}

impl IndexScan {
    pub fn new(bucketing: Bucketing, span: Span) -> Self {
        let (first, last) = span.buckets(bucketing);
        IndexScan {
            first,
            at_most: Some(last),
            found: Vec::new(),
            partition: None,
        }
    }

    /// The next read: buckets at most this, newest first, at most
    /// [`INDEX_PAGE`]; `None` once the span's buckets are all found.
    pub fn next_read(&self) -> Option<i64> {
        self.at_most
    }

    /// Feeds the answer to [`Self::next_read`]: buckets, newest first, and
    /// the room's log partition (known whenever a bucket is listed).
    pub fn on_index(
        &mut self,
        buckets: Vec<i64>,
        partition: Option<u32>,
    ) -> Result<(), LayoutError> {
        let Some(at_most) = self.at_most else {
            return Err(LayoutError::Misordered(
                "index answer without an index read",
            ));
        };
        if buckets.len() > INDEX_PAGE {
            return Err(LayoutError::Misordered("index answer over its limit"));
        }
        if !buckets.is_empty() {
            match (self.partition, partition) {
                (_, None) => {
                    return Err(LayoutError::Misordered("index buckets without a partition"))
                }
                (Some(known), Some(p)) if known != p => {
                    return Err(LayoutError::Misordered("the room changed partition"))
                }
                (_, Some(p)) => self.partition = Some(p),
            }
        }
        let mut bound = at_most.saturating_add(1);
        for &b in &buckets {
            if b >= bound || b < 0 {
                return Err(LayoutError::Misordered("index buckets not descending"));
            }
            bound = b;
        }
        self.at_most = match buckets.last() {
            Some(&last) if buckets.len() == INDEX_PAGE && last > self.first => Some(last - 1),
            _ => None,
        };
        self.found
            .extend(buckets.into_iter().filter(|&b| b >= self.first));
        Ok(())
    }

    /// The buckets found, oldest first, and the room's log partition (when
    /// any bucket is found).
    pub fn finish(mut self) -> (Vec<i64>, Option<u32>) {
        self.found.reverse();
        let partition = self.partition.filter(|_| !self.found.is_empty());
        (self.found, partition)
    }
}

/// The changes of `room` in `span` (already bounded by the position) as a
/// catch-up lists them, from `reads`: per bucket, oldest first, the
/// `room_changes` rows of that bucket in the span, by offset. In offset
/// order; an erased edit (its message was deleted) is left out.
pub fn listed_changes(
    bucketing: Bucketing,
    room: &str,
    span: Span,
    reads: Vec<(i64, Vec<ChangeRow>)>,
) -> Result<Vec<ChangeMark>, LayoutError> {
    let mut listed = Vec::new();
    let mut bound = span.from;
    for (bucket, rows) in reads {
        for c in rows {
            if c.offset < bound
                || !span.contains(c.offset)
                || bucketing.bucket_of(c.offset) != bucket
            {
                return Err(LayoutError::Misordered(
                    "changes not ascending within their span",
                ));
            }
            bound = c.offset.saturating_add(1);
            listed.extend(c.mark(room));
        }
    }
    Ok(listed)
}

/// What a [`PageWalk`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the room index: buckets `<= at_most`, newest first, at most
    /// `limit`, with the room's log partition.
    Index { at_most: i64, limit: usize },
    /// Read the stored position of the room's log partition: rows at or
    /// above it are not shown.
    Position { partition: u32 },
    /// Read `bucket`: rows with offset `< before`, newest first, at most `limit`.
    Rows {
        bucket: i64,
        before: i64,
        limit: usize,
    },
    /// The page is complete: call [`PageWalk::finish`].
    Done,
}

/// The cursor of one history read: the newest `limit` messages below
/// `before`, found by walking the room's buckets from the newest candidate
/// down, and within each bucket from the newest offset down.
#[derive(Debug)]
pub struct PageWalk {
    bucketing: Bucketing,
    limit: usize,
    /// Every row still wanted has an offset below this.
    before: i64,
    /// Buckets listed by the index and not yet exhausted, newest first.
    pending: VecDeque<i64>,
    /// Where the next index read starts; `None` once the index is exhausted.
    index_at_most: Option<i64>,
    /// The room's log partition, once the index named it.
    partition: Option<u32>,
    /// Whether `before` is already bounded by the partition's position.
    bounded: bool,
    /// That position, once read.
    position: Option<i64>,
    /// The read last handed out, to check its answer against.
    asked: Option<Step>,
    newest_first: Vec<MessageView>,
}

impl PageWalk {
    /// A walk for the newest `limit` messages with offset below `before`
    /// (all when `None`).
    pub fn new(bucketing: Bucketing, before: Option<u64>, limit: usize) -> Self {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let index_at_most = (before > 0 && limit > 0).then(|| bucketing.bucket_of(before - 1));
        PageWalk {
            bucketing,
            limit,
            before,
            pending: VecDeque::new(),
            index_at_most,
            partition: None,
            bounded: false,
            position: None,
            asked: None,
            newest_first: Vec::with_capacity(limit.min(MAX_ROWS_PER_READ)),
        }
    }

    fn remaining(&self) -> usize {
        self.limit - self.newest_first.len()
    }

    /// The next read to perform (and feed back with [`Self::on_index`],
    /// [`Self::on_position`] or [`Self::on_rows`]), or [`Step::Done`].
    pub fn next_step(&mut self) -> Step {
        let step = if self.remaining() == 0 {
            Step::Done
        } else if let (false, Some(partition)) = (self.bounded, self.partition) {
            Step::Position { partition }
        } else if let Some(&bucket) = self.pending.front() {
            Step::Rows {
                bucket,
                before: self.before,
                limit: self.remaining().min(MAX_ROWS_PER_READ),
            }
        } else if let Some(at_most) = self.index_at_most {
            Step::Index {
                at_most,
                limit: INDEX_PAGE,
            }
        } else {
            Step::Done
        };
        self.asked = Some(step);
        step
    }

    /// Feeds the answer to a [`Step::Index`]: buckets, newest first, and the
    /// room's log partition (known whenever a bucket is listed).
    pub fn on_index(
        &mut self,
        buckets: Vec<i64>,
        partition: Option<u32>,
    ) -> Result<(), LayoutError> {
        let Some(Step::Index { at_most, limit }) = self.asked.take() else {
            return Err(LayoutError::Misordered(
                "index answer without an index read",
            ));
        };
        if !buckets.is_empty() {
            match (self.partition, partition) {
                (_, None) => {
                    return Err(LayoutError::Misordered("index buckets without a partition"))
                }
                (Some(known), Some(p)) if known != p => {
                    return Err(LayoutError::Misordered("the room changed partition"))
                }
                (_, Some(p)) => self.partition = Some(p),
            }
        }
        let mut bound = at_most.saturating_add(1);
        for &b in &buckets {
            if b >= bound || b < 0 {
                return Err(LayoutError::Misordered("index buckets not descending"));
            }
            bound = b;
        }
        if buckets.len() > limit {
            return Err(LayoutError::Misordered("index answer over its limit"));
        }
        self.index_at_most = match buckets.last() {
            Some(&last) if buckets.len() == limit && last > 0 => Some(last - 1),
            _ => None,
        };
        self.pending.extend(buckets);
        Ok(())
    }

    /// Feeds the answer to a [`Step::Position`]: the stored position of the
    /// room's partition. Rows at or above it are hidden, buckets wholly above
    /// it dropped.
    pub fn on_position(&mut self, position: Option<i64>) -> Result<(), LayoutError> {
        let Some(Step::Position { .. }) = self.asked.take() else {
            return Err(LayoutError::Misordered(
                "position answer without a position read",
            ));
        };
        self.bounded = true;
        self.position = position;
        self.before = self.before.min(position.unwrap_or(0).max(0));
        if self.before == 0 {
            self.pending.clear();
            self.index_at_most = None;
        } else {
            let top = self.bucketing.bucket_of(self.before - 1);
            self.pending.retain(|&b| b <= top);
            self.index_at_most = self.index_at_most.map(|a| a.min(top));
        }
        Ok(())
    }

    /// Feeds the answer to a [`Step::Rows`]: rows of that bucket, newest first.
    pub fn on_rows(&mut self, rows: Vec<MessageView>) -> Result<(), LayoutError> {
        let Some(Step::Rows {
            bucket,
            before,
            limit,
        }) = self.asked.take()
        else {
            return Err(LayoutError::Misordered("rows answer without a rows read"));
        };
        if rows.len() > limit {
            return Err(LayoutError::Misordered("rows answer over its limit"));
        }
        let mut bound = before;
        for m in &rows {
            if m.offset >= bound || m.offset < 0 || self.bucketing.bucket_of(m.offset) != bucket {
                return Err(LayoutError::Misordered(
                    "rows not descending within the bucket",
                ));
            }
            bound = m.offset;
        }
        self.before = bound;
        if rows.len() < limit {
            // The bucket has nothing more below the cursor.
            self.pending.pop_front();
        }
        self.newest_first.extend(rows);
        Ok(())
    }

    /// The stored position of the room's partition, once read: every row
    /// of the page is below it, and so must be every change shown with them.
    pub fn position(&self) -> Option<i64> {
        self.position
    }

    /// The page, oldest first.
    pub fn finish(mut self) -> Vec<MessageView> {
        self.newest_first.reverse();
        self.newest_first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{change, message};

    #[test]
    fn buckets_are_ranges_of_offsets() {
        let b = Bucketing::new(10);
        assert_eq!(b.bucket_of(0), 0);
        assert_eq!(b.bucket_of(9), 0);
        assert_eq!(b.bucket_of(10), 1);
        assert_eq!(Bucketing::default().bucket_of(16_383), 0);
        assert_eq!(Bucketing::default().bucket_of(16_384), 1);
        assert_eq!(Bucketing::new(0).size(), 1);
    }

    #[test]
    fn the_cql_comment_states_the_bucket_size() {
        let cql = include_str!("../../../../schemas/cql/tables.cql");
        assert!(cql.contains(&format!("bucket = log_offset / {BUCKET_SIZE}")));
    }

    #[test]
    fn plan_skips_ids_claimed_at_other_offsets() {
        let known = HashMap::from([(("r".to_owned(), "old".to_owned()), 2)]);
        let batch = vec![
            message("r", 4, "old"),
            message("r", 5, "x"),
            message("r", 6, "x"),
            message("q", 7, "x"),
        ];
        let plan = plan_apply(Bucketing::new(100), 0, batch, Vec::new(), &known).unwrap();
        assert_eq!(plan.skipped, 2);
        let stored: Vec<_> = plan
            .batches
            .iter()
            .flat_map(|b| b.rows.iter().map(|m| m.offset))
            .collect();
        assert_eq!(stored, vec![5, 7]);
        assert_eq!(plan.claims.len(), 2);
    }

    #[test]
    fn plan_rewrites_a_claim_at_its_own_offset() {
        // A replay after a crash between the data and the position.
        let known = HashMap::from([(("r".to_owned(), "a".to_owned()), 3)]);
        let plan = plan_apply(
            Bucketing::new(100),
            0,
            vec![message("r", 3, "a")],
            Vec::new(),
            &known,
        )
        .unwrap();
        assert_eq!(plan.skipped, 0);
        assert_eq!(plan.batches.len(), 1);
    }

    #[test]
    fn plan_groups_rows_by_partition_within_limits() {
        let batch: Vec<_> = (0..200)
            .map(|o| message("r", o, &format!("i{o}")))
            .collect();
        let plan = plan_apply(Bucketing::new(100), 0, batch, Vec::new(), &HashMap::new()).unwrap();
        assert_eq!(plan.buckets, vec![("r".into(), 0), ("r".into(), 1)]);
        assert!(plan.batches.iter().all(|b| b.rows.len() <= MAX_BATCH_ROWS));
        assert!(plan.batches.iter().all(|b| b
            .rows
            .iter()
            .all(|m| m.offset / 100 == b.bucket && m.room == b.room)));
        assert_eq!(
            plan.batches.iter().map(|b| b.rows.len()).sum::<usize>(),
            200
        );

        let mut big = message("r", 0, "big");
        big.body = "x".repeat(4096);
        let batch: Vec<_> = (0..64)
            .map(|o| MessageView {
                offset: o,
                id: format!("b{o}"),
                ..big.clone()
            })
            .collect();
        let plan = plan_apply(Bucketing::new(100), 0, batch, Vec::new(), &HashMap::new()).unwrap();
        assert!(plan.batches.len() > 1);
        assert!(plan
            .batches
            .iter()
            .all(|b| b.rows.iter().map(row_bytes).sum::<usize>() <= MAX_BATCH_BYTES));
    }

    #[test]
    fn plan_refuses_negative_offsets() {
        let err = plan_apply(
            Bucketing::default(),
            0,
            vec![message("r", 0, "a")],
            Vec::new(),
            &HashMap::new(),
        );
        assert!(err.is_ok());
        let mut m = message("r", 0, "a");
        m.offset = -1;
        assert!(plan_apply(
            Bucketing::default(),
            0,
            vec![m],
            Vec::new(),
            &HashMap::new()
        )
        .is_err());
    }

    fn edit(body: &str) -> Change {
        Change::Edit {
            body: body.to_owned(),
        }
    }

    fn react(emoji: &str) -> Change {
        Change::React {
            emoji: emoji.to_owned(),
        }
    }

    #[test]
    fn changes_share_the_ids_of_messages_and_live_in_their_targets_bucket() {
        let known = HashMap::from([(("r".to_owned(), "old".to_owned()), 1)]);
        let plan = plan_apply(
            Bucketing::new(10),
            0,
            vec![message("r", 12, "m")],
            vec![
                change("r", 13, "old", "bob", 2, react("x")),
                change("r", 14, "m", "bob", 2, react("x")),
                change("r", 15, "c", "bob", 2, react("x")),
                change("r", 16, "c", "bob", 2, react("y")),
                change("r", 17, "d", "alice", 12, edit("new")),
            ],
            &known,
        )
        .unwrap();
        assert_eq!(plan.skipped, 3);
        let kept: Vec<_> = plan
            .changes
            .iter()
            .map(|b| {
                (
                    b.bucket,
                    b.rows.iter().map(|c| c.offset).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(kept, vec![(0, vec![15]), (1, vec![17])]);
        // And by their own offset, each bucket of which the index lists.
        let logged: Vec<_> = plan
            .room_changes
            .iter()
            .map(|b| {
                (
                    b.bucket,
                    b.rows.iter().map(|c| c.offset).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(logged, vec![(1, vec![15, 17])]);
        assert_eq!(plan.buckets, vec![("r".into(), 1)]);
        // The edit's target is in the batch: no row to read for it.
        assert!(plan.edited.is_empty());
        let claims: Vec<_> = plan
            .claims
            .iter()
            .map(|c| (c.id.as_str(), c.offset))
            .collect();
        assert_eq!(claims, vec![("m", 12), ("c", 15), ("d", 17)]);
        assert!(plan.deletions.is_empty());
        assert_eq!(
            claim_keys(
                &[message("r", 12, "m")],
                &[change("r", 13, "m", "b", 12, Change::Delete)]
            ),
            vec![("r".into(), "m".into())]
        );
    }

    #[test]
    fn an_authors_delete_erases_the_bodies_and_nobody_elses_does() {
        let b = Bucketing::new(10);
        let marks = vec![
            change("r", 21, "e1", "alice", 3, edit("secret")),
            change("r", 22, "x", "bob", 3, react("x")),
            change("r", 23, "d0", "mallory", 3, Change::Delete),
            change("r", 24, "d1", "alice", 3, Change::Delete),
            change("r", 25, "e2", "alice", 20, edit("kept")),
        ];
        let stored = vec![
            ChangeRow::of(&change("r", 5, "e0", "alice", 3, edit("older"))).unwrap(),
            ChangeRow::of(&change("r", 6, "x0", "bob", 3, react("y"))).unwrap(),
        ];
        // The message is in an earlier batch: its body is erased by a write.
        let mut plan = plan_apply(b, 0, Vec::new(), marks.clone(), &HashMap::new()).unwrap();
        assert_eq!(
            plan.deletions,
            vec![Deletion {
                room: "r".into(),
                target: 3
            }]
        );
        let mut untouched = plan.clone();
        untouched.erase("r", 3, Some("bob"), &stored);
        assert_eq!(untouched, plan, "not the author's delete");
        untouched.erase("r", 3, None, &stored);
        assert_eq!(untouched, plan, "no message there");
        assert_eq!(
            plan.edited,
            vec![
                Edited {
                    room: "r".into(),
                    target: 3
                },
                Edited {
                    room: "r".into(),
                    target: 20
                }
            ]
        );
        plan.erase("r", 3, Some("alice"), &stored);
        assert_eq!(plan.erase_bodies, vec![("r".into(), 0, 3)]);
        assert_eq!(plan.erase_edits, vec![("r".into(), 0, 3, 5)]);
        assert_eq!(plan.erase_room_edits, vec![("r".into(), 0, 5)]);
        for changes in [&plan.changes, &plan.room_changes] {
            let texts: Vec<_> = changes
                .iter()
                .flat_map(|b| &b.rows)
                .map(|c| (c.offset, c.kind_and_text()))
                .collect();
            assert_eq!(
                texts,
                vec![
                    (21, ("edit", None)),
                    (22, ("react", Some("x"))),
                    (23, ("delete", None)),
                    (24, ("delete", None)),
                    (25, ("edit", Some("kept"))),
                ]
            );
        }
        // The message at 20 was deleted by an earlier batch: its edit keeps
        // no body either, in both tables.
        plan.erase_edits_of("r", 20);
        assert!(plan
            .changes
            .iter()
            .chain(&plan.room_changes)
            .flat_map(|b| &b.rows)
            .all(|c| c.kind_and_text().1 != Some("kept")));

        // The message is in the batch: its row is written without a body.
        let mut plan =
            plan_apply(b, 0, vec![message("r", 3, "m")], marks, &HashMap::new()).unwrap();
        assert_eq!(plan.message("r", 3).map(|m| m.user.as_str()), Some("alice"));
        plan.erase("r", 3, Some("alice"), &[]);
        assert!(plan.erase_bodies.is_empty());
        let row = plan.message("r", 3).unwrap();
        assert!(row.deleted && row.body.is_empty(), "{row:?}");
    }

    #[test]
    fn change_kinds_read_back_as_written() {
        for c in [
            Some(edit("b")),
            None,
            Some(Change::Delete),
            Some(react("x")),
            Some(Change::Unreact {
                emoji: "x".to_owned(),
            }),
        ] {
            let row = ChangeRow {
                target: 0,
                offset: 1,
                id: "i".into(),
                user: "u".into(),
                change: c.clone(),
                ts: 0,
            };
            let (kind, text) = row.kind_and_text();
            assert_eq!(ChangeRow::change_of(kind, text.map(str::to_owned)), Ok(c));
        }
        assert!(ChangeRow::change_of("react", None).is_err());
        assert!(ChangeRow::change_of("pin", Some("x".into())).is_err());
    }

    #[test]
    fn a_page_shows_the_changes_below_its_position() {
        let b = Bucketing::new(10);
        let rows = vec![
            message("r", 3, "a"),
            message("r", 8, "b"),
            message("r", 12, "c"),
        ];
        assert_eq!(change_reads(b, &rows), vec![(0, 3, 8), (1, 12, 12)]);
        let row = |m: ChangeMark| ChangeRow::of(&m).unwrap();
        let changes = vec![
            row(change("r", 20, "e2", "alice", 3, edit("late"))),
            row(change("r", 14, "e1", "alice", 3, edit("first"))),
            row(change("r", 15, "x", "bob", 8, react("x"))),
            row(change("r", 30, "y", "bob", 8, react("y"))),
            row(change("r", 16, "d", "alice", 12, Change::Delete)),
        ];
        let page = fold_page(rows.clone(), changes.clone(), 21);
        assert_eq!(page[0].body, "late");
        assert_eq!(
            page[0].edited_ts,
            Some(change("r", 20, "", "", 0, Change::Delete).ts)
        );
        assert_eq!(page[1].reactions.len(), 1, "30 is not covered");
        assert!(page[2].deleted && page[2].body.is_empty());
        let page = fold_page(rows.clone(), changes, 15);
        assert_eq!(page[0].body, "first");
        assert!(page[1].reactions.is_empty() && !page[2].deleted);

        // An erased body, of the message or of an edit, is a tombstone.
        let mut erased = message("r", 3, "a");
        erased.deleted = true;
        assert!(shown(erased, &[], 0).deleted);
        let mut gone = row(change("r", 4, "e", "alice", 3, edit("x")));
        gone.change = None;
        let m = shown(message("r", 3, "a"), [&gone], 5);
        assert!(m.deleted && m.body.is_empty());
    }

    #[test]
    fn a_scan_finds_the_buckets_of_a_span_from_the_index() {
        let b = Bucketing::new(10);
        assert_eq!(Span::new(5, 5), None);
        assert_eq!(Span::new(6, 5), None);
        let span = Span::new(25, u64::MAX).unwrap();
        assert_eq!(span.upto, i64::MAX);
        assert_eq!(span.below(None), None);
        assert_eq!(span.below(Some(25)), None);
        assert_eq!(span.below(Some(40)), Span::new(25, 40));

        // Buckets 2 to 40 of a span over 25..405, the index listing 20
        // buckets in it, a page of INDEX_PAGE at a time.
        let span = Span::new(25, 405).unwrap();
        assert_eq!(span.buckets(b), (2, 40));
        let index: Vec<i64> = (0..=60).rev().step_by(2).collect();
        let mut scan = IndexScan::new(b, span);
        let mut reads = 0;
        while let Some(at_most) = scan.next_read() {
            reads += 1;
            let answer: Vec<i64> = index
                .iter()
                .copied()
                .filter(|&x| x <= at_most)
                .take(INDEX_PAGE)
                .collect();
            scan.on_index(answer, Some(3)).unwrap();
        }
        assert_eq!(reads, 2);
        let (found, partition) = scan.finish();
        assert_eq!(found, (2..=40).step_by(2).collect::<Vec<_>>());
        assert_eq!(partition, Some(3));

        // Nothing listed: no partition; misordered answers are errors.
        let mut scan = IndexScan::new(b, span);
        scan.on_index(Vec::new(), None).unwrap();
        assert_eq!(scan.next_read(), None);
        assert_eq!(scan.finish(), (Vec::new(), None));
        let mut scan = IndexScan::new(b, span);
        assert!(scan.on_index(vec![41], Some(0)).is_err(), "above the read");
        let mut scan = IndexScan::new(b, span);
        assert!(scan.on_index(vec![3, 4], Some(0)).is_err(), "ascending");
        let mut scan = IndexScan::new(b, span);
        assert!(scan.on_index(vec![3], None).is_err(), "no partition");
        let mut scan = IndexScan::new(b, span);
        scan.on_index(vec![1], Some(0)).unwrap();
        assert!(scan.on_index(vec![1], Some(0)).is_err(), "no read asked");
    }

    #[test]
    fn listed_changes_are_ascending_in_their_span_without_erased_edits() {
        let b = Bucketing::new(10);
        let row = |m: ChangeMark| ChangeRow::of(&m).unwrap();
        let (x, e, d) = (
            change("r", 12, "x", "bob", 3, react("x")),
            change("r", 14, "e", "alice", 3, edit("gone")),
            change("r", 21, "d", "alice", 3, Change::Delete),
        );
        let mut erased = row(e);
        erased.change = None;
        let span = Span::new(10, 22).unwrap();
        let reads = vec![(1, vec![row(x.clone()), erased]), (2, vec![row(d.clone())])];
        assert_eq!(
            listed_changes(b, "r", span, reads),
            Ok(vec![x.clone(), d.clone()])
        );
        for reads in [
            vec![(2, vec![row(d.clone())]), (1, vec![row(x.clone())])],
            vec![(1, vec![row(x.clone()), row(x.clone())])],
            vec![(2, vec![row(x.clone())])],
            vec![(2, vec![row(change("r", 25, "y", "bob", 3, react("y")))])],
        ] {
            assert!(
                listed_changes(b, "r", span, reads.clone()).is_err(),
                "{reads:?}"
            );
        }
    }

    #[test]
    fn claim_keys_are_unique_in_first_seen_order() {
        let batch = vec![
            message("r", 0, "a"),
            message("r", 1, "a"),
            message("q", 2, "a"),
        ];
        assert_eq!(
            claim_keys(&batch, &[]),
            vec![("r".into(), "a".into()), ("q".into(), "a".into())]
        );
    }

    #[test]
    fn an_empty_walk_reads_nothing() {
        let b = Bucketing::new(10);
        assert_eq!(PageWalk::new(b, Some(0), 10).next_step(), Step::Done);
        assert_eq!(PageWalk::new(b, None, 0).next_step(), Step::Done);
    }

    #[test]
    fn the_walk_starts_at_the_cursor_bucket_and_steps_down() {
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, Some(25), 3);
        assert_eq!(
            w.next_step(),
            Step::Index {
                at_most: 2,
                limit: INDEX_PAGE
            }
        );
        w.on_index(vec![2, 0], Some(4)).unwrap();
        assert_eq!(w.next_step(), Step::Position { partition: 4 });
        w.on_position(Some(1_000)).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 2,
                before: 25,
                limit: 3
            }
        );
        w.on_rows(vec![message("r", 21, "a")]).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 0,
                before: 21,
                limit: 2
            }
        );
        w.on_rows(vec![message("r", 9, "b"), message("r", 3, "c")])
            .unwrap();
        assert_eq!(w.next_step(), Step::Done);
        let page: Vec<_> = w.finish().iter().map(|m| m.offset).collect();
        assert_eq!(page, vec![3, 9, 21]);
    }

    #[test]
    fn the_walk_hides_what_no_position_covers_yet() {
        // Rows up to 24 are written, but the position says 13: a batch is
        // still being applied, and its rows must not show.
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, None, 10);
        w.next_step();
        w.on_index(vec![2, 1, 0], Some(0)).unwrap();
        assert_eq!(w.next_step(), Step::Position { partition: 0 });
        w.on_position(Some(13)).unwrap();
        assert_eq!(
            w.next_step(),
            Step::Rows {
                bucket: 1,
                before: 13,
                limit: 10
            }
        );
        w.on_rows(vec![message("r", 12, "a")]).unwrap();
        w.next_step();
        w.on_rows(vec![message("r", 5, "b")]).unwrap();
        assert_eq!(w.next_step(), Step::Done);
        assert_eq!(w.finish().len(), 2);

        // Nothing covered yet: nothing shows, and no bucket is read.
        let mut w = PageWalk::new(b, None, 10);
        w.next_step();
        w.on_index(vec![0], Some(0)).unwrap();
        w.next_step();
        w.on_position(None).unwrap();
        assert_eq!(w.next_step(), Step::Done);
        assert!(is_visible(3, Some(4)));
        assert!(!is_visible(4, Some(4)));
        assert!(!is_visible(0, None));
    }

    #[test]
    fn the_walk_refuses_misordered_answers() {
        let b = Bucketing::new(10);
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(w.on_index(vec![1, 3], Some(0)).is_err());
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(
            w.on_index(vec![1], None).is_err(),
            "buckets without partition"
        );
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        w.on_index(vec![3], Some(0)).unwrap();
        w.next_step();
        w.on_position(Some(100)).unwrap();
        w.next_step();
        assert!(
            w.on_rows(vec![message("r", 5, "a")]).is_err(),
            "wrong bucket"
        );
        let mut w = PageWalk::new(b, None, 5);
        w.next_step();
        assert!(w.on_rows(Vec::new()).is_err(), "answer to another read");
    }
}

/// Property tests: random histories, paged through across bucket
/// boundaries, against the embedded store as the oracle.
#[cfg(test)]
mod props {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::conformance::message;
    use crate::embedded::EmbeddedStore;
    use crate::scylla::memory::MemTables;
    use crate::scylla::store::BucketedStore;
    use crate::{AsOf, Batch, HistoryStore};

    const ROOMS: [&str; 3] = ["a", "b", "ab"];
    const USERS: [&str; 3] = ["alice", "bob", "carol"];

    /// One record of the history: its room, the offset gap before it,
    /// whether it reuses one of a few ids (a retry, or the same id in
    /// another room), who sent it, and whether it is a change (its kind,
    /// 0 to 3, and which earlier record it targets, counted back).
    #[derive(Debug, Clone)]
    struct Event {
        room: usize,
        gap: u64,
        reuse: Option<usize>,
        user: usize,
        change: Option<(u8, usize)>,
    }

    #[derive(Debug, Clone)]
    struct Case {
        bucket: u64,
        events: Vec<Event>,
        /// Sizes of the batches the history is applied in (cycled).
        chunks: Vec<usize>,
        /// A batch whose position write fails once, then is applied again.
        crash: Option<usize>,
        /// Page size of the full walks.
        walk: usize,
        /// Extra single pages: room, `before`, limit.
        probes: Vec<(usize, Option<u64>, usize)>,
    }

    fn case() -> impl Strategy<Value = Case> {
        prop_oneof![3 => 1u64..6, 1 => Just(BUCKET_SIZE)].prop_flat_map(|bucket| {
            let gap = prop_oneof![6 => 1u64..3, 1 => 1u64..(3 * bucket.min(20_000))];
            let event = (
                0..ROOMS.len(),
                gap,
                proptest::option::weighted(0.2, 0..4usize),
                0..USERS.len(),
                proptest::option::weighted(0.4, (0..4u8, 1..8usize)),
            )
                .prop_map(|(room, gap, reuse, user, change)| Event {
                    room,
                    gap,
                    reuse,
                    user,
                    change,
                });
            (
                Just(bucket),
                proptest::collection::vec(event, 0..90),
                proptest::collection::vec(1..25usize, 1..5),
                proptest::option::of(0..6usize),
                1..12usize,
                proptest::collection::vec(
                    (
                        0..ROOMS.len(),
                        proptest::option::of(0..2_000u64),
                        0..30usize,
                    ),
                    0..8,
                ),
            )
                .prop_map(|(bucket, events, chunks, crash, walk, probes)| Case {
                    bucket,
                    events,
                    chunks,
                    crash,
                    walk,
                    probes,
                })
        })
    }

    /// A record: a message, or a change.
    #[derive(Debug, Clone)]
    enum Record {
        Message(MessageView),
        Change(ChangeMark),
    }

    impl Record {
        fn offset(&self) -> u64 {
            match self {
                Record::Message(m) => m.offset as u64,
                Record::Change(c) => c.offset,
            }
        }
    }

    fn history(events: &[Event]) -> Vec<Record> {
        let mut offset = 0;
        let mut offsets = Vec::new();
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                offset += e.gap;
                let id = match e.reuse {
                    Some(k) => format!("reused{k}"),
                    None => format!("u{i}"),
                };
                let user = USERS[e.user].to_owned();
                let target = e
                    .change
                    .and_then(|(kind, back)| Some((kind, *offsets.iter().rev().nth(back - 1)?)));
                offsets.push(offset);
                let Some((kind, target)) = target else {
                    let mut m = message(ROOMS[e.room], offset, &id);
                    m.user = user;
                    return Record::Message(m);
                };
                let emoji = ["+1", "ok"][i % 2].to_owned();
                let change = match kind {
                    0 => Change::Edit {
                        body: format!("edit {offset}"),
                    },
                    1 => Change::Delete,
                    2 => Change::React { emoji },
                    _ => Change::Unreact { emoji },
                };
                Record::Change(ChangeMark {
                    room: ROOMS[e.room].to_owned(),
                    offset,
                    id,
                    user,
                    target,
                    change,
                    ts: 1_700_000_000_000 + offset as i64,
                })
            })
            .collect()
    }

    fn batches(all: &[Record], sizes: &[usize]) -> Vec<(Batch, u64)> {
        let mut out = Vec::new();
        let mut rest = all;
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at(n.min(rest.len()));
            let mut batch = Batch::default();
            for r in head {
                match r {
                    Record::Message(m) => batch.messages.push(m.clone()),
                    Record::Change(c) => batch.changes.push(c.clone()),
                }
            }
            out.push((batch, head.last().unwrap().offset() + 1));
            rest = tail;
        }
        out
    }

    /// Everything a reader can see, compared: every page of a full walk of
    /// each room, the probes, and every id lookup.
    async fn compare(store: &impl HistoryStore, oracle: &EmbeddedStore, case: &Case) {
        assert_eq!(
            store.position(0).await.unwrap(),
            oracle.position(0).await.unwrap()
        );
        for room in ROOMS {
            // Every page of a full walk, newest to oldest.
            let mut before = None;
            loop {
                let want = oracle.page(room, before, case.walk).await.unwrap();
                let got = store.page(room, before, case.walk).await.unwrap();
                assert_eq!(
                    got, want,
                    "room {room}, before {before:?}, limit {}",
                    case.walk
                );
                match want.first() {
                    Some(m) => before = Some(m.offset as u64),
                    None => break,
                }
            }
            let ids: Vec<String> = (0..4)
                .map(|k| format!("reused{k}"))
                .chain((0..case.events.len()).map(|i| format!("u{i}")))
                .collect();
            for id in &ids {
                assert_eq!(
                    store.find_id(room, id).await.unwrap(),
                    oracle.find_id(room, id).await.unwrap(),
                    "find_id({room}, {id})"
                );
            }
            let keys: Vec<_> = ids.iter().map(|id| (room.to_owned(), id.clone())).collect();
            assert_eq!(
                store.find_ids(&keys).await.unwrap(),
                oracle.find_ids(&keys).await.unwrap()
            );
            // Every change of the room, in log order.
            assert_eq!(
                store.changes_between(room, 0, u64::MAX).await.unwrap(),
                oracle.changes_between(room, 0, u64::MAX).await.unwrap(),
                "changes_between({room}, all)"
            );
        }
        for &(room, before, limit) in &case.probes {
            let room = ROOMS[room];
            assert_eq!(
                store.page(room, before, limit).await.unwrap(),
                oracle.page(room, before, limit).await.unwrap(),
                "room {room}, before {before:?}, limit {limit}"
            );
            if let Some(upto) = before {
                // The changes of a range ending there, and of one starting
                // there.
                let from = upto.saturating_sub(limit as u64 * 40);
                for (from, upto) in [(from, upto), (upto, upto + limit as u64 * 40)] {
                    assert_eq!(
                        store.changes_between(room, from, upto).await.unwrap(),
                        oracle.changes_between(room, from, upto).await.unwrap(),
                        "changes_between({room}, {from}, {upto})"
                    );
                }
                for at in [
                    AsOf::Offset(upto),
                    AsOf::Time(1_700_000_000_000 + upto as i64),
                ] {
                    assert_eq!(
                        store.page_as_of(room, None, limit, at).await.unwrap(),
                        oracle.page_as_of(room, None, limit, at).await.unwrap(),
                        "room {room}, as of {at:?}, limit {limit}"
                    );
                }
            }
        }
    }

    async fn run(case: Case) {
        let dir = tempfile::tempdir().unwrap();
        let oracle = EmbeddedStore::open(dir.path(), "v1").unwrap();
        let store =
            BucketedStore::with_limits(MemTables::default(), Bucketing::new(case.bucket), 3, 5);
        let all = history(&case.events);
        let batches = batches(&all, &case.chunks);
        for (i, (batch, next)) in batches.iter().enumerate() {
            if case.crash == Some(i) {
                // The rows land, the position does not: readers must still
                // see the store as it was before the batch (but for the
                // tombstones of its deletes: see `store`).
                store.tables().fail_position_writes(1);
                assert!(store.apply_batch(0, batch.clone(), *next).await.is_err());
                if !batch.changes.iter().any(|c| c.change == Change::Delete) {
                    compare(&store, &oracle, &case).await;
                }
            }
            oracle.apply_batch(0, batch.clone(), *next).await.unwrap();
            store.apply_batch(0, batch.clone(), *next).await.unwrap();
        }
        // A covered batch, altered, is ignored by both.
        if let Some((first, next)) = batches.first() {
            let mut altered = first.clone();
            altered
                .messages
                .iter_mut()
                .for_each(|m| m.body = "rewritten".into());
            oracle.apply_batch(0, altered.clone(), *next).await.unwrap();
            store.apply_batch(0, altered, *next).await.unwrap();
        }
        compare(&store, &oracle, &case).await;
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The Scylla layout, in memory, answers every page (now and as of
        /// a moment, with every change folded in), claim and position as the
        /// embedded store does.
        #[test]
        fn scylla_layout_matches_the_embedded_store(case in case()) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(case));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The cursor alone, many more cases: walking sorted offsets through
        /// buckets gives the newest `limit` below `before` and below the
        /// partition position, oldest first.
        #[test]
        fn page_walk_is_a_slice_of_the_history(
            bucket in 1u64..8,
            offsets in proptest::collection::btree_set(0i64..400, 0..120),
            before in proptest::option::of(0u64..420),
            limit in 0usize..40,
            position in proptest::option::of(0i64..420),
        ) {
            let b = Bucketing::new(bucket);
            let mut rows: BTreeMap<i64, BTreeMap<i64, MessageView>> = BTreeMap::new();
            let mut index = BTreeSet::new();
            for &o in &offsets {
                rows.entry(b.bucket_of(o)).or_default().insert(o, message("r", o as u64, "x"));
                index.insert(b.bucket_of(o));
            }
            let mut walk = PageWalk::new(b, before, limit);
            let mut steps = 0;
            let page = loop {
                steps += 1;
                prop_assert!(steps < 10_000, "the walk does not end");
                match walk.next_step() {
                    Step::Index { at_most, limit } => {
                        let answer = index.range(..=at_most).rev().take(limit).copied().collect();
                        walk.on_index(answer, Some(7)).unwrap();
                    }
                    Step::Position { partition } => {
                        prop_assert_eq!(partition, 7);
                        walk.on_position(position).unwrap();
                    }
                    Step::Rows { bucket, before, limit } => {
                        let answer = rows
                            .get(&bucket)
                            .map(|r| r.range(..before).rev().take(limit).map(|(_, m)| m.clone()).collect())
                            .unwrap_or_default();
                        walk.on_rows(answer).unwrap();
                    }
                    Step::Done => break walk.finish(),
                }
            };
            let below: Vec<i64> = offsets
                .iter()
                .copied()
                .filter(|&o| before.is_none_or(|b| (o as u64) < b) && position.is_some_and(|p| o < p))
                .collect();
            let want = &below[below.len().saturating_sub(limit)..];
            let got: Vec<i64> = page.iter().map(|m| m.offset).collect();
            prop_assert_eq!(got, want.to_vec());
        }
    }
}
