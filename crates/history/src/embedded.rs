//! The embedded history store: a redb database in the data dir.
//!
//! Every table name carries a namespace, so several projection versions (a
//! replay building a new one while the current one serves reads) live side by
//! side in one file. An `apply` is atomic: its messages and the partition
//! position that covers them commit together, in one transaction that also
//! carries the applies of other partitions waiting at the same time (group
//! commit, see [`Committer`]), at most one commit per [`COMMIT_EVERY`]
//! while applies keep coming. It is durable within [`DURABLE_WITHIN`]: the
//! store is derived from the log, so a crash may roll it back to its last
//! durable commit, rows and positions together, and the projector applies
//! the rest of the log again.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle};
use schemas::protocol::MessageView;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::versions::{check_name, VersionError, VersionInfo, VersionState, Versions};
use crate::{
    fold, listed, AsOf, Batch, ChangeMark, HistoryStore, PastMessage, StoreError, MAX_LISTED,
};
use schemas::protocol::Reaction;
use schemas::Change;

/// What a message row holds besides its key (room, offset): the message as
/// its changes left it (rows written before changes existed read with none).
#[derive(Default, Serialize, Deserialize)]
struct Row {
    id: String,
    user: String,
    body: String,
    ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edited_ts: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    /// Every user of each reaction (pages name at most
    /// [`schemas::protocol::MAX_REACTION_USERS_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reactions: Vec<Reaction>,
    /// The body as posted, once an edit replaced it (for pages as of an
    /// earlier moment); gone when the message is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    original: Option<String>,
}

impl Row {
    fn of(m: &MessageView) -> Row {
        Row {
            id: m.id.clone(),
            user: m.user.clone(),
            body: m.body.clone(),
            ts: m.ts,
            edited_ts: m.edited_ts,
            deleted: m.deleted,
            reactions: m.reactions.clone(),
            original: None,
        }
    }

    /// The row of `m`, taking its fields.
    fn from_view(m: MessageView) -> Row {
        Row {
            id: m.id,
            user: m.user,
            body: m.body,
            ts: m.ts,
            edited_ts: m.edited_ts,
            deleted: m.deleted,
            reactions: m.reactions,
            original: None,
        }
    }

    fn view(self, room: &str, offset: u64) -> MessageView {
        MessageView {
            room: room.to_owned(),
            offset: offset as i64,
            id: self.id,
            user: self.user,
            body: self.body,
            ts: self.ts,
            edited_ts: self.edited_ts,
            deleted: self.deleted,
            reactions: self.reactions,
        }
    }
}

/// A change as the `changes` table keeps it, under (room, target, offset):
/// what a room looked like at an earlier moment is its messages with the
/// changes up to then. The body of an edit is erased when its message is
/// deleted.
#[derive(Serialize, Deserialize)]
struct ChangeRow {
    id: String,
    user: String,
    /// `edit`, `delete`, `react` or `unreact`.
    kind: String,
    /// An edit's body (until the message is deleted), or the emoji.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    ts: i64,
}

impl ChangeRow {
    /// The change as the store was handed it, at `offset` on `target` of
    /// `room`; an erased edit's body reads as empty.
    fn mark(self, room: &str, target: u64, offset: u64) -> ChangeMark {
        let text = self.text.unwrap_or_default();
        let change = match self.kind.as_str() {
            "edit" => Change::Edit { body: text },
            "delete" => Change::Delete,
            "react" => Change::React { emoji: text },
            _ => Change::Unreact { emoji: text },
        };
        ChangeMark {
            room: room.to_owned(),
            offset,
            id: self.id,
            user: self.user,
            target,
            change,
            ts: self.ts,
        }
    }

    fn of(c: &ChangeMark) -> ChangeRow {
        let (kind, text) = match &c.change {
            Change::Edit { body } => ("edit", Some(body.clone())),
            Change::Delete => ("delete", None),
            Change::React { emoji } => ("react", Some(emoji.clone())),
            Change::Unreact { emoji } => ("unreact", Some(emoji.clone())),
        };
        ChangeRow {
            id: c.id.clone(),
            user: c.user.clone(),
            kind: kind.to_owned(),
            text,
            ts: c.ts,
        }
    }
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

struct Tables {
    messages: String,
    ids: String,
    positions: String,
    reads: String,
    members: String,
    changes: String,
    change_at: String,
    deleted: String,
}

impl Tables {
    fn new(namespace: &str) -> Self {
        Tables {
            messages: format!("messages@{namespace}"),
            ids: format!("ids@{namespace}"),
            positions: format!("positions@{namespace}"),
            reads: format!("reads@{namespace}"),
            members: format!("members@{namespace}"),
            changes: format!("changes@{namespace}"),
            change_at: format!("change_at@{namespace}"),
            deleted: format!("deleted@{namespace}"),
        }
    }

    /// (room, target offset, change offset) -> [`ChangeRow`] as JSON.
    fn changes(&self) -> TableDefinition<'_, (&'static str, u64, u64), &'static [u8]> {
        TableDefinition::new(&self.changes)
    }

    /// (room, offset) of each deleted message: what unread counts skip
    /// while they walk the message keys alone.
    fn deleted(&self) -> TableDefinition<'_, (&'static str, u64), ()> {
        TableDefinition::new(&self.deleted)
    }

    /// (room, change offset) -> (target offset, the change's time): the
    /// room's changes in log order (a resume's catch-up), and how a retried
    /// change is answered (its id is in `ids`, like a message's).
    fn change_at(&self) -> TableDefinition<'_, (&'static str, u64), (u64, i64)> {
        TableDefinition::new(&self.change_at)
    }

    /// (room, user) -> the highest read position stored.
    fn reads(&self) -> TableDefinition<'_, (&'static str, &'static str), u64> {
        TableDefinition::new(&self.reads)
    }

    /// (user, room): the rooms listed for a user.
    fn members(&self) -> TableDefinition<'_, (&'static str, &'static str), ()> {
        TableDefinition::new(&self.members)
    }

    fn messages(&self) -> TableDefinition<'_, (&'static str, u64), &'static [u8]> {
        TableDefinition::new(&self.messages)
    }

    fn ids(&self) -> TableDefinition<'_, (&'static str, &'static str), u64> {
        TableDefinition::new(&self.ids)
    }

    fn positions(&self) -> TableDefinition<'_, u32, u64> {
        TableDefinition::new(&self.positions)
    }
}

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Per projection version, its [`VersionMeta`] as JSON.
const VERSIONS: TableDefinition<&str, &str> = TableDefinition::new("versions");
/// Key of [`META`] naming the current version.
const CURRENT: &str = "current";

/// Embedded history store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    tables: Arc<Tables>,
    id: Arc<str>,
    committer: Arc<Committer>,
    /// Bounds the reads in flight on the file, each of which holds one of
    /// the runtime's blocking threads: a storm of reads (resumes reading
    /// their catch-up from here) queues instead of growing threads.
    reads: Arc<tokio::sync::Semaphore>,
}

/// Reads of one store file in flight at most.
const READS: usize = 4;

impl EmbeddedStore {
    /// Opens (or creates) `history.redb` in `dir`, using projection version
    /// `namespace`.
    pub fn open(dir: &Path, namespace: &str) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let db = Database::create(dir.join("history.redb")).map_err(storage)?;
        let reads = Arc::new(tokio::sync::Semaphore::new(READS));
        Self::with_database(Arc::new(db), namespace, reads)
    }

    /// Another projection version in the same database.
    pub fn namespace(&self, namespace: &str) -> Result<Self, StoreError> {
        Self::with_database(self.db.clone(), namespace, self.reads.clone())
    }

    /// A name unique to this store's file and projection version, made at
    /// creation: projectors writing it share one consumer group.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The version bookkeeping of this store's file; `default` is the
    /// current version until another is switched to.
    pub fn versions(&self, default: &str) -> EmbeddedVersions {
        EmbeddedVersions {
            db: self.db.clone(),
            default: default.into(),
            reads: self.reads.clone(),
        }
    }

    fn with_database(
        db: Arc<Database>,
        namespace: &str,
        reads: Arc<tokio::sync::Semaphore>,
    ) -> Result<Self, StoreError> {
        let tables = Tables::new(namespace);
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(tables.messages()).map_err(storage)?;
        txn.open_table(tables.ids()).map_err(storage)?;
        txn.open_table(tables.positions()).map_err(storage)?;
        txn.open_table(tables.reads()).map_err(storage)?;
        txn.open_table(tables.members()).map_err(storage)?;
        txn.open_table(tables.changes()).map_err(storage)?;
        txn.open_table(tables.change_at()).map_err(storage)?;
        txn.open_table(tables.deleted()).map_err(storage)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let existing = meta
                .get("id")
                .map_err(storage)?
                .map(|v| v.value().to_owned());
            match existing {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().simple().to_string();
                    meta.insert("id", id.as_str()).map_err(storage)?;
                    id
                }
            }
        };
        txn.commit().map_err(storage)?;
        let tables = Arc::new(tables);
        Ok(EmbeddedStore {
            committer: Arc::new(Committer::start(db.clone(), tables.clone())?),
            db,
            tables,
            id: format!("{id}-{namespace}").into(),
            reads,
        })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Tables) -> Result<T, StoreError> + Send + 'static,
    {
        let _reading = self.reads.acquire().await.map_err(storage)?;
        let db = self.db.clone();
        let tables = self.tables.clone();
        tokio::task::spawn_blocking(move || f(&db, &tables))
            .await
            .map_err(storage)?
    }
}

/// Writes one apply into `txn`: nothing when the stored position already
/// covers `next`, else the new messages (ids already in their room
/// skipped), read positions (where higher), room listings and the
/// position, together.
fn apply_in(
    txn: &redb::WriteTransaction,
    tables: &Tables,
    partition: u32,
    batch: &Batch,
    next: u64,
) -> Result<(), StoreError> {
    let messages = &batch.messages;
    let mut positions = txn.open_table(tables.positions()).map_err(storage)?;
    let stored = positions
        .get(partition)
        .map_err(storage)?
        .map(|v| v.value());
    if stored.is_some_and(|s| next <= s) {
        return Ok(()); // already applied
    }
    let mut rows = txn.open_table(tables.messages()).map_err(storage)?;
    let mut ids = txn.open_table(tables.ids()).map_err(storage)?;
    for m in messages {
        let offset = u64::try_from(m.offset).map_err(storage)?;
        let key = (m.room.as_str(), m.id.as_str());
        // One descent of the id index instead of a lookup and an insert:
        // insert, and put the first offset back in the rare case of a
        // duplicate.
        let earlier = ids.insert(key, offset).map_err(storage)?.map(|v| v.value());
        if let Some(first) = earlier.filter(|&first| first != offset) {
            ids.insert(key, first).map_err(storage)?;
            metrics::counter!(crate::metrics::DUPLICATE_IDS_TOTAL).increment(1);
            continue;
        }
        let row = serde_json::to_vec(&Row::of(m)).map_err(storage)?;
        rows.insert((m.room.as_str(), offset), row.as_slice())
            .map_err(storage)?;
    }
    if !batch.changes.is_empty() {
        let mut changes = txn.open_table(tables.changes()).map_err(storage)?;
        let mut change_at = txn.open_table(tables.change_at()).map_err(storage)?;
        let mut deleted = txn.open_table(tables.deleted()).map_err(storage)?;
        // The rows the changes apply to, as they become, and whether changed.
        let mut touched: HashMap<(&str, u64), (Row, bool)> = HashMap::new();
        for c in &batch.changes {
            let room = c.room.as_str();
            let key = (room, c.id.as_str());
            let earlier = ids
                .insert(key, c.offset)
                .map_err(storage)?
                .map(|v| v.value());
            if let Some(first) = earlier.filter(|&first| first != c.offset) {
                ids.insert(key, first).map_err(storage)?;
                metrics::counter!(crate::metrics::DUPLICATE_IDS_TOTAL).increment(1);
                continue;
            }
            change_at
                .insert((room, c.offset), (c.target, c.ts))
                .map_err(storage)?;
            let target = if c.target >= c.offset {
                None // a change follows its target in the log
            } else {
                match touched.entry((room, c.target)) {
                    Entry::Occupied(row) => Some(row.into_mut()),
                    Entry::Vacant(slot) => rows
                        .get((room, c.target))
                        .map_err(storage)?
                        .map(|v| serde_json::from_slice::<Row>(v.value()))
                        .transpose()
                        .map_err(storage)?
                        .map(|row| slot.insert((row, false))),
                }
            };
            let mut kept = ChangeRow::of(c);
            if kept.kind == "edit" && target.as_ref().is_some_and(|(row, _)| row.deleted) {
                kept.text = None; // an edit that came after the delete keeps no body either
            }
            let kept = serde_json::to_vec(&kept).map_err(storage)?;
            changes
                .insert((room, c.target, c.offset), kept.as_slice())
                .map_err(storage)?;
            let Some((row, dirty)) = target else {
                continue; // no message of the room there
            };
            if fold_into(row, room, c) {
                *dirty = true;
                if row.deleted {
                    erase_edits(&mut changes, room, c.target)?;
                    deleted.insert((room, c.target), ()).map_err(storage)?;
                }
            }
        }
        // Each row changed once per batch, however many changes it took: a
        // popular message is rewritten once, not once per reaction.
        for ((room, target), (row, dirty)) in touched {
            if dirty {
                let row = serde_json::to_vec(&row).map_err(storage)?;
                rows.insert((room, target), row.as_slice())
                    .map_err(storage)?;
            }
        }
    }
    if !batch.reads.is_empty() {
        let mut reads = txn.open_table(tables.reads()).map_err(storage)?;
        for r in &batch.reads {
            let key = (r.room.as_str(), r.user.as_str());
            let stored = reads.get(key).map_err(storage)?.map(|v| v.value());
            if stored.is_none_or(|s| s < r.offset) {
                reads.insert(key, r.offset).map_err(storage)?;
            }
        }
    }
    if !batch.members.is_empty() {
        let mut members = txn.open_table(tables.members()).map_err(storage)?;
        for (user, room) in &batch.members {
            members
                .insert((user.as_str(), room.as_str()), ())
                .map_err(storage)?;
        }
    }
    positions.insert(partition, next).map_err(storage)?;
    Ok(())
}

/// Applies `c` to `row`, the message of `room` it targets, by
/// [`fold`]'s rules; keeps the body as posted once an edit replaces it.
/// Returns whether the row changed.
fn fold_into(row: &mut Row, room: &str, c: &ChangeMark) -> bool {
    let before = matches!(c.change, Change::Edit { .. }).then(|| row.body.clone());
    let original = row.original.take();
    let mut view = std::mem::take(row).view(room, c.target);
    let changed = fold(&mut view, c);
    *row = Row::from_view(view);
    if !row.deleted {
        // Kept from the first edit on: what the message said as posted.
        row.original = original.or(if row.edited_ts.is_some() {
            before
        } else {
            None
        });
    }
    changed
}

/// Takes the bodies out of the kept edits of a deleted message: a deleted
/// body stays only in the log.
fn erase_edits(
    changes: &mut redb::Table<'_, (&'static str, u64, u64), &'static [u8]>,
    room: &str,
    target: u64,
) -> Result<(), StoreError> {
    let mut edits = Vec::new();
    for entry in changes
        .range((room, target, 0)..=(room, target, u64::MAX))
        .map_err(storage)?
    {
        let (key, value) = entry.map_err(storage)?;
        let mut row: ChangeRow = serde_json::from_slice(value.value()).map_err(storage)?;
        if row.kind == "edit" && row.text.is_some() {
            row.text = None;
            edits.push((key.value().2, row));
        }
    }
    for (offset, row) in edits {
        let bytes = serde_json::to_vec(&row).map_err(storage)?;
        changes
            .insert((room, target, offset), bytes.as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

/// `find_ids` of at most this many ids runs on the async runtime.
const INLINE_LOOKUP_MAX: usize = 64;

/// Applies waiting for the committer; when full, `apply` waits.
const APPLY_QUEUE: usize = 256;
/// Most applies one commit takes.
const MAX_APPLIES_PER_COMMIT: usize = 256;
/// At most one commit per this window while applies keep coming: an apply
/// after a quiet spell commits at once, and those that arrive within the
/// window after a commit wait for its end and commit together. A redb
/// commit costs about half a millisecond of CPU however little it holds
/// (page writes, checksums), so at light load, where every partition's
/// apply carries a message or two, commits per second and not messages
/// set the store's cost (benches/RESULTS.md, "Cost per delivery"). History
/// is not on the ack path: this only delays when a message appears in
/// history pages, by at most the window.
const COMMIT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Applies holding this many messages together commit without waiting for
/// the window's end: a commit's fixed cost is spread thin enough, and a
/// replay's full batches go through at the disk's pace.
const COMMIT_MESSAGES: usize = 1024;

/// One `apply` call, on its way to the committer.
struct Apply {
    partition: u32,
    batch: Batch,
    next: u64,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The thread that commits every apply of one store (group commit): the
/// projector's partitions each apply their own batch, and one durable
/// commit serves all that are waiting, instead of a commit (an fsync, and a
/// turn at redb's one write lock) each. Dropped with the last clone of the
/// store: the queue closes, the thread finishes what it holds and is joined.
struct Committer {
    queue: Option<mpsc::Sender<Apply>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn start(db: Arc<Database>, tables: Arc<Tables>) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::channel(APPLY_QUEUE);
        let thread = std::thread::Builder::new()
            .name(format!("history-{}", tables.positions))
            .spawn(move || commit_loop(&db, &tables, rx))
            .map_err(storage)?;
        Ok(Committer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _joined = thread.join();
        }
    }
}

/// How long a commit of the store may stay undurable: applies commit
/// without an fsync (redb's `Durability::None`: visible to readers, lost by
/// a crash), and at most this long after the first of them a commit makes
/// them all durable at once, with the applies of the moment or alone when
/// none is waiting.
///
/// The store is derived from the log: its rows and the positions that cover
/// them commit in one transaction, so a crash rolls both back to the last
/// durable commit together, and the projector re-applies the log from that
/// position (an apply at or below the stored position is skipped, ids
/// already in their room too). An fsync per commit cost a third of the
/// server's CPU at light load (benches/RESULTS.md, "Cost per delivery"),
/// for a durability the log already gives.
const DURABLE_WITHIN: std::time::Duration = std::time::Duration::from_millis(1000);

fn commit_loop(db: &Database, tables: &Tables, mut rx: mpsc::Receiver<Apply>) {
    // A timer for the wait before a durable commit; nothing else runs here.
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(timer) => timer,
        Err(e) => {
            tracing::error!(error = %e, "history committer cannot start its timer; every commit is durable");
            return commit_loop_durable(db, tables, rx);
        }
    };
    let mut batch = Vec::new();
    let mut last_commit = std::time::Instant::now()
        .checked_sub(COMMIT_EVERY)
        .unwrap_or_else(std::time::Instant::now);
    // When the oldest commit not yet durable was made.
    let mut undurable_since: Option<std::time::Instant> = None;
    loop {
        let first = match undurable_since {
            None => rx.blocking_recv(),
            Some(since) => {
                let due = tokio::time::Instant::from_std(since + DURABLE_WITHIN);
                match timer.block_on(async { tokio::time::timeout_at(due, rx.recv()).await }) {
                    Ok(next) => next,
                    Err(_elapsed) => {
                        // Quiet: make what is committed durable alone.
                        if commit(db, tables, &[], DURABLE).is_ok() {
                            undurable_since = None;
                        }
                        continue;
                    }
                }
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        gather(&timer, &mut rx, &mut batch, last_commit + COMMIT_EVERY);
        let since = *undurable_since.get_or_insert_with(std::time::Instant::now);
        let durable = answer(db, tables, &mut batch, since.elapsed() >= DURABLE_WITHIN);
        if durable {
            undurable_since = None;
        }
        last_commit = std::time::Instant::now();
    }
    if undurable_since.is_some() {
        // The store is closing: what it committed stays.
        if let Err(e) = commit(db, tables, &[], DURABLE) {
            tracing::warn!(error = %e, "history store: last durable commit failed");
        }
    }
}

/// Adds to `batch` the applies that arrive until `until` (none are waited
/// for once it has passed), or until the batch is full
/// ([`MAX_APPLIES_PER_COMMIT`] applies, [`COMMIT_MESSAGES`] messages).
fn gather(
    timer: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<Apply>,
    batch: &mut Vec<Apply>,
    until: std::time::Instant,
) {
    let until = tokio::time::Instant::from_std(until);
    let mut messages: usize = batch.iter().map(|a| a.batch.messages.len()).sum();
    while batch.len() < MAX_APPLIES_PER_COMMIT && messages < COMMIT_MESSAGES {
        let next = match rx.try_recv() {
            Ok(apply) => Some(apply),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) if tokio::time::Instant::now() >= until => None,
            Err(mpsc::error::TryRecvError::Empty) => timer
                .block_on(async { tokio::time::timeout_at(until, rx.recv()).await })
                .ok()
                .flatten(),
        };
        let Some(apply) = next else { break };
        messages += apply.batch.messages.len();
        batch.push(apply);
    }
}

/// The committer without a timer: every commit durable.
fn commit_loop_durable(db: &Database, tables: &Tables, mut rx: mpsc::Receiver<Apply>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_APPLIES_PER_COMMIT {
            match rx.try_recv() {
                Ok(apply) => batch.push(apply),
                Err(_) => break,
            }
        }
        answer(db, tables, &mut batch, DURABLE);
    }
}

/// The `durable` argument of [`commit`] and [`answer`] for an fsync'd commit.
const DURABLE: bool = true;

/// Commits `applies` in one transaction, `durable` (fsync'd) or not.
fn commit(
    db: &Database,
    tables: &Tables,
    applies: &[Apply],
    durable: bool,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    });
    for a in applies {
        apply_in(&txn, tables, a.partition, &a.batch, a.next)?;
    }
    txn.commit().map_err(storage)?;
    metrics::counter!(crate::metrics::STORE_COMMITS_TOTAL).increment(1);
    if durable {
        metrics::counter!(crate::metrics::STORE_DURABLE_COMMITS_TOTAL).increment(1);
    }
    Ok(())
}

/// Commits `batch` together and answers each apply; returns whether what
/// is committed is now durable.
fn answer(db: &Database, tables: &Tables, batch: &mut Vec<Apply>, durable: bool) -> bool {
    match commit(db, tables, batch, durable) {
        Ok(()) => {
            for a in batch.drain(..) {
                let _gone = a.reply.send(Ok(()));
            }
            durable
        }
        // One bad apply must not fail the others: each alone, so the
        // error reaches only the caller it belongs to.
        Err(_) => {
            // A durable commit that succeeds makes every earlier one
            // durable too; a failed one commits nothing.
            let mut any_committed = false;
            for a in batch.drain(..) {
                let alone = commit(db, tables, std::slice::from_ref(&a), durable);
                any_committed |= alone.is_ok();
                let _gone = a.reply.send(alone);
            }
            durable && any_committed
        }
    }
}

#[async_trait]
impl HistoryStore for EmbeddedStore {
    async fn apply_batch(&self, partition: u32, batch: Batch, next: u64) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let queue = self
            .committer
            .queue
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("history store closed".into()))?;
        queue
            .send(Apply {
                partition,
                batch,
                next,
                reply,
            })
            .await
            .map_err(|_| StoreError::Unavailable("history committer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("history committer stopped".into()))?
    }

    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError> {
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let positions = txn.open_table(tables.positions()).map_err(storage)?;
            let value = positions
                .get(partition)
                .map_err(storage)?
                .map(|v| v.value());
            Ok(value)
        })
        .await
    }

    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        let room = room.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let rows = txn.open_table(tables.messages()).map_err(storage)?;
            let end = before.unwrap_or(u64::MAX);
            let mut page = Vec::with_capacity(limit.min(1024));
            for entry in rows
                .range((room.as_str(), 0)..(room.as_str(), end))
                .map_err(storage)?
                .rev()
                .take(limit)
            {
                let (key, value) = entry.map_err(storage)?;
                let row: Row = serde_json::from_slice(value.value()).map_err(storage)?;
                page.push(listed(row.view(&room, key.value().1)));
            }
            page.reverse();
            Ok(page)
        })
        .await
    }

    async fn page_as_of(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        at: AsOf,
    ) -> Result<Vec<PastMessage>, StoreError> {
        let room = room.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let rows = txn.open_table(tables.messages()).map_err(storage)?;
            let changes = txn.open_table(tables.changes()).map_err(storage)?;
            let mut end = before.unwrap_or(u64::MAX);
            if let AsOf::Offset(upto) = at {
                end = end.min(upto.saturating_add(1));
            }
            let mut page = Vec::with_capacity(limit.min(1024));
            for entry in rows
                .range((room.as_str(), 0)..(room.as_str(), end))
                .map_err(storage)?
                .rev()
            {
                if page.len() >= limit {
                    break;
                }
                let (key, value) = entry.map_err(storage)?;
                let offset = key.value().1;
                let row: Row = serde_json::from_slice(value.value()).map_err(storage)?;
                if !at.covers(offset, row.ts) {
                    continue;
                }
                // The message as posted; a deleted one's body is on the log.
                let (body, mut body_on_log) = if row.deleted {
                    (String::new(), Some(offset))
                } else {
                    (row.original.unwrap_or(row.body), None)
                };
                let mut message = MessageView {
                    room: room.clone(),
                    offset: offset as i64,
                    id: row.id,
                    user: row.user,
                    body,
                    ts: row.ts,
                    ..MessageView::default()
                };
                for change in changes
                    .range((room.as_str(), offset, 0)..=(room.as_str(), offset, u64::MAX))
                    .map_err(storage)?
                {
                    let (key, value) = change.map_err(storage)?;
                    let at_offset = key.value().2;
                    let kept: ChangeRow = serde_json::from_slice(value.value()).map_err(storage)?;
                    if at_offset <= offset || !at.covers(at_offset, kept.ts) {
                        continue;
                    }
                    let erased = kept.kind == "edit" && kept.text.is_none();
                    let mark = kept.mark(&room, offset, at_offset);
                    if fold(&mut message, &mark) {
                        match mark.change {
                            Change::Edit { .. } => body_on_log = erased.then_some(at_offset),
                            Change::Delete => body_on_log = None,
                            _ => {}
                        }
                    }
                }
                page.push(PastMessage {
                    message: listed(message),
                    body_on_log,
                });
            }
            page.reverse();
            Ok(page)
        })
        .await
    }

    async fn changes_between(
        &self,
        room: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<ChangeMark>, StoreError> {
        let room = room.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let change_at = txn.open_table(tables.change_at()).map_err(storage)?;
            let changes = txn.open_table(tables.changes()).map_err(storage)?;
            let mut found = Vec::new();
            for entry in change_at
                .range((room.as_str(), from)..(room.as_str(), upto.max(from)))
                .map_err(storage)?
            {
                let (key, value) = entry.map_err(storage)?;
                let (offset, (target, _)) = (key.value().1, value.value());
                let Some(kept) = changes
                    .get((room.as_str(), target, offset))
                    .map_err(storage)?
                    .map(|v| serde_json::from_slice::<ChangeRow>(v.value()))
                    .transpose()
                    .map_err(storage)?
                else {
                    continue;
                };
                if kept.kind == "edit" && kept.text.is_none() {
                    continue; // erased: its message was deleted since
                }
                found.push(kept.mark(&room, target, offset));
            }
            Ok(found)
        })
        .await
    }

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError> {
        let (room, user) = (room.to_owned(), user.to_owned());
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let reads = txn.open_table(tables.reads()).map_err(storage)?;
            let value = reads
                .get((room.as_str(), user.as_str()))
                .map_err(storage)?
                .map(|v| v.value());
            Ok(value)
        })
        .await
    }

    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let room = room.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let reads = txn.open_table(tables.reads()).map_err(storage)?;
            let mut found = Vec::new();
            // Every user name sorts after "" and before "\u{7f}" (names
            // are ASCII letters, digits and `_.-`).
            for entry in reads
                .range((room.as_str(), "")..(room.as_str(), "\u{7f}"))
                .map_err(storage)?
                .take(MAX_LISTED)
            {
                let (key, value) = entry.map_err(storage)?;
                found.push((key.value().1.to_owned(), value.value()));
            }
            Ok(found)
        })
        .await
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let user = user.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let members = txn.open_table(tables.members()).map_err(storage)?;
            let mut rooms = Vec::new();
            for entry in members
                .range((user.as_str(), "")..(user.as_str(), "\u{7f}"))
                .map_err(storage)?
                .take(MAX_LISTED)
            {
                let (key, _) = entry.map_err(storage)?;
                rooms.push(key.value().1.to_owned());
            }
            Ok(rooms)
        })
        .await
    }

    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let room = room.to_owned();
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let rows = txn.open_table(tables.messages()).map_err(storage)?;
            let deleted = txn.open_table(tables.deleted()).map_err(storage)?;
            let from = after.map_or(0, |a| a.saturating_add(1));
            let range = (room.as_str(), from)..=(room.as_str(), u64::MAX);
            // Keys only: the rows' values are never read. The deleted
            // messages (few) are walked beside them, both in offset order.
            let mut gone = deleted.range(range.clone()).map_err(storage)?;
            let mut next_gone = || -> Result<Option<u64>, StoreError> {
                Ok(gone
                    .next()
                    .transpose()
                    .map_err(storage)?
                    .map(|(key, _)| key.value().1))
            };
            let mut gone_at = next_gone()?;
            let mut count = 0;
            for entry in rows.range(range).map_err(storage)? {
                let offset = entry.map_err(storage)?.0.value().1;
                while gone_at.is_some_and(|at| at < offset) {
                    gone_at = next_gone()?;
                }
                if gone_at == Some(offset) {
                    continue;
                }
                count += 1;
                if count >= cap {
                    break;
                }
            }
            Ok(count)
        })
        .await
    }

    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        let lookup = move |db: &Database, tables: &Tables, keys: &[(String, String)]| {
            let txn = db.begin_read().map_err(storage)?;
            let ids = txn.open_table(tables.ids()).map_err(storage)?;
            let rows = txn.open_table(tables.messages()).map_err(storage)?;
            let change_at = txn.open_table(tables.change_at()).map_err(storage)?;
            let mut found = Vec::with_capacity(keys.len());
            for (room, id) in keys {
                let offset = ids
                    .get((room.as_str(), id.as_str()))
                    .map_err(storage)?
                    .map(|v| v.value());
                let hit = match offset {
                    Some(offset) => match rows
                        .get((room.as_str(), offset))
                        .map_err(storage)?
                        .map(|v| serde_json::from_slice::<Row>(v.value()))
                        .transpose()
                        .map_err(storage)?
                    {
                        Some(row) => Some((offset, row.ts)),
                        // Not a message: a change's id.
                        None => change_at
                            .get((room.as_str(), offset))
                            .map_err(storage)?
                            .map(|at| (offset, at.value().1)),
                    },
                    None => None,
                };
                found.push(hit);
            }
            Ok(found)
        };
        if keys.len() <= INLINE_LOOKUP_MAX {
            // Ingest asks this for every batch of sends: a few point reads
            // of recent, cached pages, cheaper here than a round trip
            // through the blocking pool (benches/RESULTS.md).
            return lookup(&self.db, &self.tables, keys);
        }
        let keys = keys.to_vec();
        self.blocking(move |db, tables| lookup(db, tables, &keys))
            .await
    }

    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError> {
        let (room, id) = (room.to_owned(), id.to_owned());
        self.blocking(move |db, tables| {
            let txn = db.begin_read().map_err(storage)?;
            let ids = txn.open_table(tables.ids()).map_err(storage)?;
            let value = ids
                .get((room.as_str(), id.as_str()))
                .map_err(storage)?
                .map(|v| v.value());
            Ok(value)
        })
        .await
    }
}

/// What the embedded store keeps about a version besides its tables.
#[derive(Serialize, Deserialize)]
struct VersionMeta {
    state: VersionState,
    created_ms: i64,
    from: String,
}

/// The projection versions of one embedded store file (see
/// [`crate::versions`]): a version is a namespace of tables, the pointer a
/// key of the `meta` table, so a switch is one durable transaction. Cheap to
/// clone.
#[derive(Clone)]
pub struct EmbeddedVersions {
    db: Arc<Database>,
    default: Arc<str>,
    /// Shared by every store of the file ([`EmbeddedStore::reads`]).
    reads: Arc<tokio::sync::Semaphore>,
}

fn version_exists(txn: &redb::ReadTransaction, name: &str) -> Result<bool, StoreError> {
    let tables = Tables::new(name);
    match txn.open_table(tables.positions()) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(storage(e)),
    }
}

fn version_meta(
    txn: &redb::ReadTransaction,
    name: &str,
) -> Result<Option<VersionMeta>, StoreError> {
    let versions = match txn.open_table(VERSIONS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    let meta = versions.get(name).map_err(storage)?;
    meta.map(|m| serde_json::from_str(m.value()).map_err(storage))
        .transpose()
}

impl EmbeddedVersions {
    /// Opens (or creates) `history.redb` in `dir`. On a new file the
    /// `default` version is created, ready and current.
    pub fn open(dir: &Path, default: &str) -> Result<Self, VersionError> {
        check_name(default)?;
        std::fs::create_dir_all(dir).map_err(storage)?;
        let db = Database::create(dir.join("history.redb")).map_err(storage)?;
        let versions = EmbeddedVersions {
            db: Arc::new(db),
            default: default.into(),
            reads: Arc::new(tokio::sync::Semaphore::new(READS)),
        };
        let txn = versions.db.begin_write().map_err(storage)?;
        let pointed = {
            let meta = txn.open_table(META).map_err(storage)?;
            let pointed = meta.get(CURRENT).map_err(storage)?.is_some();
            pointed
        };
        if !pointed {
            // A new file, or one from before versions: its one version (the
            // default namespace) is current.
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(CURRENT, default).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        versions.store(&Self::current_blocking(&versions.db, default)?)?;
        Ok(versions)
    }

    /// The store of version `name`, created when missing.
    pub fn store(&self, name: &str) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::with_database(self.db.clone(), name, self.reads.clone())
    }

    fn current_blocking(db: &Database, default: &str) -> Result<String, StoreError> {
        let txn = db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let current = meta.get(CURRENT).map_err(storage)?;
        Ok(current.map_or_else(|| default.to_owned(), |v| v.value().to_owned()))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, VersionError>
    where
        T: Send + 'static,
        F: FnOnce(&EmbeddedVersions) -> Result<T, VersionError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| VersionError::Store(storage(e)))?
    }
}

#[async_trait]
impl Versions for EmbeddedVersions {
    async fn current(&self) -> Result<String, VersionError> {
        self.blocking(|v| Ok(Self::current_blocking(&v.db, &v.default)?))
            .await
    }

    async fn set_current(&self, name: &str) -> Result<(), VersionError> {
        let name = name.to_owned();
        self.blocking(move |v| {
            let txn = v.db.begin_write().map_err(storage)?;
            {
                let read = v.db.begin_read().map_err(storage)?;
                if !version_exists(&read, &name)? {
                    return Err(VersionError::NotFound(name));
                }
                if let Some(meta) = version_meta(&read, &name)? {
                    if meta.state != VersionState::Ready {
                        return Err(VersionError::NotReady(name));
                    }
                }
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.insert(CURRENT, name.as_str()).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, VersionError> {
        self.blocking(|v| {
            let current = Self::current_blocking(&v.db, &v.default)?;
            let txn = v.db.begin_read().map_err(storage)?;
            let mut names: Vec<String> = txn
                .list_tables()
                .map_err(storage)?
                .filter_map(|t| t.name().strip_prefix("positions@").map(str::to_owned))
                .collect();
            names.sort_by_key(|n| {
                (
                    n.strip_prefix('v').and_then(|d| d.parse::<u64>().ok()),
                    n.clone(),
                )
            });
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let meta = version_meta(&txn, &name)?;
                let positions = txn
                    .open_table(Tables::new(&name).positions())
                    .map_err(storage)?;
                let mut records = 0;
                for entry in positions.iter().map_err(storage)? {
                    records += entry.map_err(storage)?.1.value();
                }
                out.push(VersionInfo {
                    current: name == current,
                    // A version from before the bookkeeping existed was
                    // built by the projector: ready.
                    state: meta.as_ref().map_or(VersionState::Ready, |m| m.state),
                    created_ms: meta.as_ref().map_or(0, |m| m.created_ms),
                    from: meta.map_or_else(|| "earliest".to_owned(), |m| m.from),
                    records,
                    name,
                });
            }
            out.sort_by_key(|v| v.created_ms);
            Ok(out)
        })
        .await
    }

    async fn create(&self, name: &str, from: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        check_name(name)?;
        let (name, from) = (name.to_owned(), from.to_owned());
        self.blocking(move |v| {
            if Self::current_blocking(&v.db, &v.default)? == name {
                return Err(VersionError::IsCurrent(name));
            }
            let store = v.store(&name)?;
            let txn = v.db.begin_write().map_err(storage)?;
            {
                let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
                let created_ms = versions
                    .get(name.as_str())
                    .map_err(storage)?
                    .and_then(|m| serde_json::from_str::<VersionMeta>(m.value()).ok())
                    .map_or_else(schemas::now_ms, |m| m.created_ms);
                let meta = serde_json::to_string(&VersionMeta {
                    state: VersionState::Building,
                    created_ms,
                    from,
                })
                .map_err(storage)?;
                versions
                    .insert(name.as_str(), meta.as_str())
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(Arc::new(store) as Arc<dyn HistoryStore>)
        })
        .await
    }

    async fn mark_ready(&self, name: &str) -> Result<(), VersionError> {
        let name = name.to_owned();
        self.blocking(move |v| {
            let txn = v.db.begin_write().map_err(storage)?;
            {
                let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
                let meta = versions
                    .get(name.as_str())
                    .map_err(storage)?
                    .map(|m| serde_json::from_str::<VersionMeta>(m.value()))
                    .transpose()
                    .map_err(storage)?;
                let Some(mut meta) = meta else {
                    return Err(VersionError::NotFound(name));
                };
                meta.state = VersionState::Ready;
                let meta = serde_json::to_string(&meta).map_err(storage)?;
                versions
                    .insert(name.as_str(), meta.as_str())
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        let name = name.to_owned();
        self.blocking(move |v| {
            if !version_exists(&v.db.begin_read().map_err(storage)?, &name)? {
                return Err(VersionError::NotFound(name));
            }
            Ok(Arc::new(v.store(&name)?) as Arc<dyn HistoryStore>)
        })
        .await
    }

    async fn drop_version(&self, name: &str) -> Result<(), VersionError> {
        let name = name.to_owned();
        self.blocking(move |v| {
            if Self::current_blocking(&v.db, &v.default)? == name {
                return Err(VersionError::IsCurrent(name));
            }
            if !version_exists(&v.db.begin_read().map_err(storage)?, &name)? {
                return Err(VersionError::NotFound(name));
            }
            let tables = Tables::new(&name);
            let txn = v.db.begin_write().map_err(storage)?;
            txn.delete_table(tables.messages()).map_err(storage)?;
            txn.delete_table(tables.ids()).map_err(storage)?;
            txn.delete_table(tables.positions()).map_err(storage)?;
            {
                let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
                versions.remove(name.as_str()).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
    }

    #[async_trait]
    impl crate::conformance::StoreHarness for Harness {
        async fn fresh(&self) -> Arc<dyn HistoryStore> {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(dir.path(), "v1").unwrap();
            self.dirs.lock().unwrap().push(dir);
            Arc::new(store)
        }
    }

    fn harness() -> Harness {
        Harness {
            dirs: std::sync::Mutex::new(Vec::new()),
        }
    }

    crate::store_conformance_suite!(harness());

    /// A message of room "r" at `offset`.
    fn message(offset: u64) -> MessageView {
        MessageView {
            room: "r".into(),
            offset: offset as i64,
            id: format!("id{offset}"),
            user: "u".into(),
            body: "b".into(),
            ts: 1,
            ..MessageView::default()
        }
    }

    #[tokio::test]
    async fn namespaces_are_separate_versions() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = EmbeddedStore::open(dir.path(), "v1").unwrap();
        let v2 = v1.namespace("v2").unwrap();
        v1.apply(0, vec![message(0)], 1).await.unwrap();
        assert_eq!(v1.page("r", None, 10).await.unwrap().len(), 1);
        assert!(v2.page("r", None, 10).await.unwrap().is_empty());
        assert_eq!(v2.position(0).await.unwrap(), None);
    }

    /// Commits that were not yet durable are made durable when the store
    /// closes: a clean restart re-applies nothing.
    #[tokio::test]
    async fn a_closed_store_keeps_what_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), "v1").unwrap();
        for offset in 0..3u64 {
            store
                .apply(0, vec![message(offset)], offset + 1)
                .await
                .unwrap();
        }
        drop(store);
        let store = EmbeddedStore::open(dir.path(), "v1").unwrap();
        assert_eq!(store.position(0).await.unwrap(), Some(3));
        assert_eq!(store.page("r", None, 10).await.unwrap().len(), 3);
    }

    fn queued(partition: u32, messages: usize) -> Apply {
        Apply {
            partition,
            batch: Batch::messages(vec![message(0); messages]),
            next: 1,
            reply: oneshot::channel().0,
        }
    }

    fn timer() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// Once the window has passed, the applies already waiting join the
    /// commit and nothing more is waited for.
    #[test]
    fn after_the_window_a_commit_takes_what_waits_and_goes() {
        let (tx, mut rx) = mpsc::channel(8);
        for p in 1..4 {
            tx.try_send(queued(p, 1)).unwrap();
        }
        let mut batch = vec![queued(0, 1)];
        // The sender stays open: waiting would never end.
        gather(&timer(), &mut rx, &mut batch, std::time::Instant::now());
        let partitions: Vec<u32> = batch.iter().map(|a| a.partition).collect();
        assert_eq!(partitions, [0, 1, 2, 3]);
        drop(tx);
    }

    /// Within the window, applies that come later join the same commit.
    #[test]
    fn within_the_window_later_applies_join_the_commit() {
        let (tx, mut rx) = mpsc::channel(8);
        let sender = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            for p in 1..3 {
                tx.blocking_send(queued(p, 1)).unwrap();
                // The next one comes only once this one was taken: while
                // the committer waits within the window.
                while tx.capacity() < tx.max_capacity() {
                    assert!(std::time::Instant::now() < deadline, "apply {p} taken");
                    std::thread::yield_now();
                }
            }
            // Closing the queue ends the wait: the store is closing.
        });
        let mut batch = vec![queued(0, 1)];
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        gather(&timer(), &mut rx, &mut batch, far);
        sender.join().unwrap();
        assert_eq!(batch.len(), 3);
    }

    /// Applies that hold enough messages commit without waiting for the
    /// window's end.
    #[test]
    fn a_full_batch_does_not_wait_for_the_window() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(queued(1, COMMIT_MESSAGES / 2)).unwrap();
        tx.try_send(queued(2, 1)).unwrap();
        let mut batch = vec![queued(0, COMMIT_MESSAGES / 2)];
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        gather(&timer(), &mut rx, &mut batch, far);
        assert_eq!(batch.len(), 2, "full at {COMMIT_MESSAGES} messages");
        drop(tx);
    }
}
