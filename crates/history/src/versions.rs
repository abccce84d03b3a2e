//! Projection versions: several histories built from the same log, side by
//! side in one store (a namespace each), one of them current.
//!
//! - [`Versions`] keeps the bookkeeping of a store: which versions exist,
//!   which one is being built and which is ready, which one reads use (the
//!   pointer), and drops a version nobody reads. A backend implements it next
//!   to its [`HistoryStore`] (the embedded one in [`crate::embedded`]).
//! - [`CurrentVersion`] is what a serving process holds: a [`HistoryStore`]
//!   that answers from the current version, and follows the pointer when it
//!   moves ([`CurrentVersion::switch`] in this process, or
//!   [`CurrentVersion::refresh`], which [`CurrentVersion::follow`] calls
//!   periodically, for a switch made by another process on a shared store).
//!   The projector subscribes to it and resumes each partition from the new
//!   version's own position, so a switch never leaves a gap.
//!
//! Promises: the pointer only names a version that is ready (a replay
//! completed it); the current version is never dropped.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemas::protocol::MessageView;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{HistoryStore, StoreError};

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// A replay is writing it (or was stopped before it finished: replaying
    /// into it again resumes); reads cannot be switched to it.
    Building,
    /// Complete up to the log's head as of its replay; the projector keeps it
    /// current once reads use it.
    Ready,
}

/// What [`Versions::list`] tells about one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub name: String,
    /// Reads are served from it.
    pub current: bool,
    pub state: VersionState,
    /// Creation time, milliseconds since the Unix epoch (0 when unknown).
    pub created_ms: i64,
    /// Where its replay started: `earliest`, or a time.
    pub from: String,
    /// Records of the log it covers: the sum of its partition positions.
    pub records: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("no projection version {0:?}")]
    NotFound(String),
    #[error("projection version {0:?} is the current one")]
    IsCurrent(String),
    #[error("projection version {0:?} is still being built")]
    NotReady(String),
    #[error("bad version name {0:?}: use 1 to 32 of a-z, 0-9 and _")]
    BadName(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VersionError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, VersionError::Store(e) if e.is_retriable())
    }
}

/// Checks a version name: short, lowercase ASCII letters, digits and `_`,
/// so that every backend can put it in a table or keyspace name.
pub fn check_name(name: &str) -> Result<(), VersionError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(VersionError::BadName(name.to_owned()))
    }
}

/// The name after the highest `vN` among `existing`: `v2` after `v1`.
pub fn next_name<'a>(existing: impl IntoIterator<Item = &'a str>) -> String {
    let highest = existing
        .into_iter()
        .filter_map(|n| n.strip_prefix('v')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("v{}", highest + 1)
}

/// The version bookkeeping of one history store.
#[async_trait]
pub trait Versions: Send + Sync + 'static {
    /// The version reads are served from.
    async fn current(&self) -> Result<String, VersionError>;

    /// Points reads at `name`, which must be ready.
    async fn set_current(&self, name: &str) -> Result<(), VersionError>;

    /// Every version, oldest first.
    async fn list(&self) -> Result<Vec<VersionInfo>, VersionError>;

    /// Creates version `name` in state [`VersionState::Building`] (or
    /// reopens it, when a replay into it is resumed) and returns its store.
    async fn create(&self, name: &str, from: &str) -> Result<Arc<dyn HistoryStore>, VersionError>;

    /// Marks version `name` complete: reads may be switched to it.
    async fn mark_ready(&self, name: &str) -> Result<(), VersionError>;

    /// The store of an existing version.
    async fn open(&self, name: &str) -> Result<Arc<dyn HistoryStore>, VersionError>;

    /// Deletes version `name` and its data; never the current one.
    async fn drop_version(&self, name: &str) -> Result<(), VersionError>;
}

/// A version and its store.
#[derive(Clone)]
pub struct Active {
    pub name: Arc<str>,
    pub store: Arc<dyn HistoryStore>,
}

/// The current version of a store, followed as it moves; answers history
/// reads from it. Cheap to clone.
#[derive(Clone)]
pub struct CurrentVersion {
    inner: Arc<Inner>,
}

struct Inner {
    versions: Arc<dyn Versions>,
    active: watch::Sender<Active>,
    /// Serializes pointer changes and refreshes.
    moving: tokio::sync::Mutex<()>,
}

impl CurrentVersion {
    /// Opens the current version of `versions`.
    pub async fn open(versions: Arc<dyn Versions>) -> Result<Self, VersionError> {
        let name = versions.current().await?;
        let store = versions.open(&name).await?;
        let (active, _) = watch::channel(Active {
            name: name.into(),
            store,
        });
        Ok(CurrentVersion {
            inner: Arc::new(Inner {
                versions,
                active,
                moving: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The version reads use now.
    pub fn active(&self) -> Active {
        self.inner.active.borrow().clone()
    }

    /// Yields the active version anew after each switch.
    pub fn subscribe(&self) -> watch::Receiver<Active> {
        self.inner.active.subscribe()
    }

    pub fn versions(&self) -> &Arc<dyn Versions> {
        &self.inner.versions
    }

    /// Re-reads the pointer and follows it; true when it had moved.
    pub async fn refresh(&self) -> Result<bool, VersionError> {
        let _moving = self.inner.moving.lock().await;
        let name = self.inner.versions.current().await?;
        if *self.inner.active.borrow().name == *name {
            return Ok(false);
        }
        let store = self.inner.versions.open(&name).await?;
        tracing::info!(
            version = name,
            "reads switched to another projection version"
        );
        metrics::counter!(crate::metrics::VERSION_SWITCHES_TOTAL).increment(1);
        self.inner.active.send_replace(Active {
            name: name.into(),
            store,
        });
        Ok(true)
    }

    /// Points reads (and the projector) at `name`, which must be ready.
    pub async fn switch(&self, name: &str) -> Result<(), VersionError> {
        {
            let _moving = self.inner.moving.lock().await;
            self.inner.versions.set_current(name).await?;
        }
        self.refresh().await.map(|_| ())
    }

    /// Re-reads the pointer every `every` until `shutdown`: how a process
    /// learns of a switch another process made on a shared store.
    pub async fn follow(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "reading the current projection version failed");
            }
        }
    }
}

#[async_trait]
impl HistoryStore for CurrentVersion {
    async fn apply_batch(
        &self,
        partition: u32,
        batch: crate::Batch,
        next: u64,
    ) -> Result<(), StoreError> {
        self.active()
            .store
            .apply_batch(partition, batch, next)
            .await
    }

    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError> {
        self.active().store.position(partition).await
    }

    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        self.active().store.page(room, before, limit).await
    }

    async fn page_as_of(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        at: crate::AsOf,
    ) -> Result<Vec<crate::PastMessage>, StoreError> {
        self.active()
            .store
            .page_as_of(room, before, limit, at)
            .await
    }

    async fn changes_between(
        &self,
        room: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<crate::ChangeMark>, StoreError> {
        self.active().store.changes_between(room, from, upto).await
    }

    async fn message(&self, room: &str, offset: u64) -> Result<Option<MessageView>, StoreError> {
        self.active().store.message(room, offset).await
    }

    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError> {
        self.active().store.find_id(room, id).await
    }

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError> {
        self.active().store.read_position(room, user).await
    }

    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.active().store.reads(room).await
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.active().store.user_rooms(user).await
    }

    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        self.active().store.count_after(room, after, cap).await
    }

    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        self.active().store.find_ids(keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_numbered() {
        for ok in ["v1", "v12", "rebuild_2026"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "V1", "v-1", "v1;drop", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(next_name([]), "v1");
        assert_eq!(next_name(["v1", "v9", "v10", "custom"]), "v11");
    }
}
