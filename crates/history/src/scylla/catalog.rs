//! Projection versions over the Scylla layout, written once against
//! [`Catalog`]: the `projection_versions` table and the versions' tables on a
//! cluster in production ([`super::ScyllaVersions`]), an in-memory copy in
//! tests. A version is a table suffix (`messages_v2`, ...); its bookkeeping
//! is a row of `projection_versions` (state, creation time, where its replay
//! started), and the pointer to the current version a row of its own
//! (`schemas/cql/versions.cql`). The decisions are pure functions, so they
//! are tested without any table.
//!
//! Promises, per [`crate::versions`]: the pointer only names a ready
//! version; the current version is never dropped; a keyspace from before
//! versions has its default version (`v1`) current and ready.
//!
//! Without lightweight transactions (see `versions.cql` for why), a switch
//! and a drop racing for the same version are kept apart by writing first
//! and checking after: a switch writes the pointer, then reads the version's
//! row again; a drop marks the row `dropping`, then reads the pointer again.
//! At LOCAL_QUORUM at least one of the two sees the other's write, and backs
//! off: the drop puts the row back, or the switch puts the pointer back. A
//! replay into a version (`create`) checks the pointer after writing its row
//! the same way. Two switches racing each other: the last write wins, as two
//! switches in a row would.
//!
//! A drop marks the row, drops the tables, then deletes the row: a drop cut
//! short leaves a `dropping` row, hidden from the listing, that dropping the
//! version again (or replaying into it, which starts from empty tables)
//! completes.

use std::sync::Arc;

use async_trait::async_trait;

use crate::versions::{check_name, VersionError, VersionInfo, VersionState, Versions};
use crate::{HistoryStore, StoreError};

/// Where a version is, as its row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Building,
    Ready,
    /// Its drop started: nothing may use it; dropping it again finishes.
    Dropping,
}

impl RowState {
    /// As stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Building => "building",
            RowState::Ready => "ready",
            RowState::Dropping => "dropping",
        }
    }

    pub fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "building" => Ok(RowState::Building),
            "ready" => Ok(RowState::Ready),
            "dropping" => Ok(RowState::Dropping),
            other => Err(StoreError::Storage(format!(
                "unknown projection version state {other:?} stored"
            ))),
        }
    }

    /// The state a listing shows; none for a version being dropped.
    pub fn listed(self) -> Option<VersionState> {
        match self {
            RowState::Building => Some(VersionState::Building),
            RowState::Ready => Some(VersionState::Ready),
            RowState::Dropping => None,
        }
    }
}

/// The row of one version in the bookkeeping table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub name: String,
    pub state: RowState,
    /// Milliseconds since the Unix epoch, 0 when unknown.
    pub created_ms: i64,
    /// Where its replay started: `earliest`, or a time.
    pub from: String,
}

impl VersionRow {
    /// The row of a version built before the bookkeeping existed: by the
    /// projector, from the start of the log, so ready.
    pub fn found(name: &str) -> Self {
        VersionRow {
            name: name.to_owned(),
            state: RowState::Ready,
            created_ms: 0,
            from: "earliest".to_owned(),
        }
    }

    /// A row read back from its columns (all but the key may be null).
    pub fn from_columns(
        name: String,
        state: Option<&str>,
        created_ms: Option<i64>,
        from: Option<String>,
    ) -> Result<Self, StoreError> {
        let state = state.ok_or_else(|| {
            StoreError::Storage(format!("projection version {name:?} has no state stored"))
        })?;
        Ok(VersionRow {
            state: RowState::parse(state)?,
            created_ms: created_ms.unwrap_or(0),
            from: from.unwrap_or_else(|| "earliest".to_owned()),
            name,
        })
    }

    fn with_state(&self, state: RowState) -> Self {
        VersionRow {
            state,
            ..self.clone()
        }
    }
}

/// The row of `name` if the version exists: a row not being dropped.
pub fn check_exists<'a>(
    name: &str,
    row: Option<&'a VersionRow>,
) -> Result<&'a VersionRow, VersionError> {
    match row {
        Some(row) if row.state != RowState::Dropping => Ok(row),
        _ => Err(VersionError::NotFound(name.to_owned())),
    }
}

/// Whether reads may be pointed at `name`, whose row is `row`: only when it
/// is ready.
pub fn check_switch(name: &str, row: Option<&VersionRow>) -> Result<(), VersionError> {
    match check_exists(name, row)?.state {
        RowState::Ready => Ok(()),
        _ => Err(VersionError::NotReady(name.to_owned())),
    }
}

/// Whether `name` may be dropped while `current` is current: any version
/// with a row (a `dropping` one too: its drop is finished), never the
/// current one.
pub fn check_drop<'a>(
    name: &str,
    current: &str,
    row: Option<&'a VersionRow>,
) -> Result<&'a VersionRow, VersionError> {
    if name == current {
        return Err(VersionError::IsCurrent(name.to_owned()));
    }
    row.ok_or_else(|| VersionError::NotFound(name.to_owned()))
}

/// The row a replay into `name` writes when it starts (or resumes):
/// building, created now unless it was created before (and not dropped
/// since). Never the current version.
pub fn building_row(
    name: &str,
    current: &str,
    existing: Option<&VersionRow>,
    from: &str,
    now_ms: i64,
) -> Result<VersionRow, VersionError> {
    check_name(name)?;
    if name == current {
        return Err(VersionError::IsCurrent(name.to_owned()));
    }
    let created_ms = existing
        .filter(|r| r.state != RowState::Dropping)
        .map_or(now_ms, |r| r.created_ms);
    Ok(VersionRow {
        name: name.to_owned(),
        state: RowState::Building,
        created_ms,
        from: from.to_owned(),
    })
}

/// What [`Versions::list`] reports from the rows and the records each
/// version covers: versions being dropped left out, oldest first (by
/// creation time, then by number: `v2` before `v10`).
pub fn listing(current: &str, rows: Vec<(VersionRow, u64)>) -> Vec<VersionInfo> {
    let mut out: Vec<VersionInfo> = rows
        .into_iter()
        .filter_map(|(row, records)| {
            Some(VersionInfo {
                current: row.name == current,
                state: row.state.listed()?,
                created_ms: row.created_ms,
                from: row.from,
                records,
                name: row.name,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        let number = |n: &str| n.strip_prefix('v').and_then(|d| d.parse::<u64>().ok());
        (a.created_ms, number(&a.name), &a.name).cmp(&(b.created_ms, number(&b.name), &b.name))
    });
    out
}

/// The bookkeeping table and the versions' tables. Each call is one request
/// (or, for `store` and `drop_tables`, a few DDL statements).
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// The version the pointer's row names, if it was ever written.
    async fn pointer(&self) -> Result<Option<String>, StoreError>;
    async fn write_pointer(&self, name: &str) -> Result<(), StoreError>;
    /// Every version's row (not the pointer's), in any order.
    async fn rows(&self) -> Result<Vec<VersionRow>, StoreError>;
    async fn row(&self, name: &str) -> Result<Option<VersionRow>, StoreError>;
    /// Upserts the whole row.
    async fn write_row(&self, row: &VersionRow) -> Result<(), StoreError>;
    async fn delete_row(&self, name: &str) -> Result<(), StoreError>;
    /// The history store of version `name`, its tables created when missing.
    async fn store(&self, name: &str) -> Result<Arc<dyn HistoryStore>, StoreError>;
    /// The records version `name` covers: the sum of its positions (its
    /// tables created when missing).
    async fn records(&self, name: &str) -> Result<u64, StoreError>;
    /// Drops the tables of version `name` that exist.
    async fn drop_tables(&self, name: &str) -> Result<(), StoreError>;
}

/// [`Versions`] over a [`Catalog`].
pub struct CatalogVersions<C> {
    catalog: C,
    default: Arc<str>,
}

impl<C: Catalog> CatalogVersions<C> {
    /// The versions of `catalog`. When no pointer was ever written (a new
    /// keyspace, or one from before versions), `default` becomes current,
    /// and ready if it has no row; the current version's tables are created
    /// when missing.
    pub async fn open(catalog: C, default: &str) -> Result<Self, VersionError> {
        check_name(default)?;
        if catalog.pointer().await?.is_none() {
            catalog.write_pointer(default).await?;
        }
        let versions = CatalogVersions {
            catalog,
            default: default.into(),
        };
        let current = versions.current().await?;
        if current == *versions.default && versions.catalog.row(&current).await?.is_none() {
            versions
                .catalog
                .write_row(&VersionRow::found(&current))
                .await?;
        }
        versions.open(&current).await?;
        Ok(versions)
    }

    pub fn catalog(&self) -> &C {
        &self.catalog
    }
}

#[async_trait]
impl<C: Catalog> Versions for CatalogVersions<C> {
    async fn current(&self) -> Result<String, VersionError> {
        Ok(self
            .catalog
            .pointer()
            .await?
            .unwrap_or_else(|| self.default.to_string()))
    }

    async fn set_current(&self, name: &str) -> Result<(), VersionError> {
        check_switch(name, self.catalog.row(name).await?.as_ref())?;
        let before = self.current().await?;
        if before == name {
            return Ok(());
        }
        self.catalog.write_pointer(name).await?;
        // A drop (or a replay) of `name` may have marked its row meanwhile
        // without seeing the pointer: then this switch backs off.
        if let Err(e) = check_switch(name, self.catalog.row(name).await?.as_ref()) {
            self.catalog.write_pointer(&before).await?;
            return Err(e);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, VersionError> {
        let current = self.current().await?;
        let mut rows = Vec::new();
        for row in self.catalog.rows().await? {
            let records = match row.state {
                RowState::Dropping => 0,
                _ => self.catalog.records(&row.name).await?,
            };
            rows.push((row, records));
        }
        Ok(listing(&current, rows))
    }

    async fn create(&self, name: &str, from: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        check_name(name)?;
        let current = self.current().await?;
        let existing = self.catalog.row(name).await?;
        let row = building_row(name, &current, existing.as_ref(), from, schemas::now_ms())?;
        if existing
            .as_ref()
            .is_some_and(|r| r.state == RowState::Dropping)
        {
            // A drop cut short: finish it, so the replay starts empty.
            self.catalog.drop_tables(name).await?;
        }
        self.catalog.write_row(&row).await?;
        // A switch to `name` may have landed meanwhile: leave it be.
        if self.current().await? == name {
            if let Some(existing) = existing {
                self.catalog.write_row(&existing).await?;
            }
            return Err(VersionError::IsCurrent(name.to_owned()));
        }
        Ok(self.catalog.store(name).await?)
    }

    async fn mark_ready(&self, name: &str) -> Result<(), VersionError> {
        let row = self.catalog.row(name).await?;
        let row = check_exists(name, row.as_ref())?;
        if row.state != RowState::Ready {
            self.catalog
                .write_row(&row.with_state(RowState::Ready))
                .await?;
        }
        Ok(())
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        check_exists(name, self.catalog.row(name).await?.as_ref())?;
        Ok(self.catalog.store(name).await?)
    }

    async fn drop_version(&self, name: &str) -> Result<(), VersionError> {
        let current = self.current().await?;
        let row = self.catalog.row(name).await?;
        let row = check_drop(name, &current, row.as_ref())?.clone();
        self.catalog
            .write_row(&row.with_state(RowState::Dropping))
            .await?;
        // A switch to `name` may have written the pointer meanwhile without
        // seeing the mark: then this drop backs off.
        if self.current().await? == name {
            self.catalog.write_row(&row).await?;
            return Err(VersionError::IsCurrent(name.to_owned()));
        }
        self.catalog.drop_tables(name).await?;
        self.catalog.delete_row(name).await?;
        tracing::info!(version = name, "projection version dropped");
        Ok(())
    }
}

/// The life of versions, as every [`Versions`] over the Scylla layout must
/// go through it: run on the in-memory tables, and on a cluster when
/// `SCYLLA_URI` is set. `versions` is a fresh keyspace whose default
/// version is `v1`.
#[cfg(test)]
pub(crate) async fn lifecycle(versions: &dyn Versions) {
    use crate::conformance::message;
    use crate::versions::next_name;

    // A new keyspace: v1, current and ready.
    assert_eq!(versions.current().await.unwrap(), "v1");
    let list = versions.list().await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].current && list[0].state == VersionState::Ready);
    let v1 = versions.open("v1").await.unwrap();
    v1.apply(0, vec![message("r", 0, "a")], 1).await.unwrap();

    // A replay builds v2 beside it: listed, building, not switchable.
    let next = next_name(list.iter().map(|v| v.name.as_str()));
    assert_eq!(next, "v2");
    let v2 = versions.create("v2", "earliest").await.unwrap();
    assert!(matches!(
        versions.set_current("v2").await,
        Err(VersionError::NotReady(_))
    ));
    v2.apply(0, vec![message("r", 0, "a")], 1).await.unwrap();
    v2.apply(1, vec![message("s", 3, "b")], 4).await.unwrap();
    let list = versions.list().await.unwrap();
    let names: Vec<_> = list.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2"]);
    assert_eq!(list[1].state, VersionState::Building);
    assert_eq!(list[1].from, "earliest");
    assert!(list[1].created_ms > 0);
    // Records: the sum of the version's partition positions.
    assert_eq!((list[0].records, list[1].records), (1, 5));

    // Resuming the replay keeps the data and the creation time.
    let again = versions.create("v2", "2026-11-24T10:00:00Z").await.unwrap();
    assert_eq!(again.position(1).await.unwrap(), Some(4));
    let resumed = versions.list().await.unwrap();
    assert_eq!(resumed[1].created_ms, list[1].created_ms);
    assert_eq!(resumed[1].from, "2026-11-24T10:00:00Z");

    // Ready: switched to; then the current one cannot be rebuilt or dropped.
    versions.mark_ready("v2").await.unwrap();
    versions.set_current("v2").await.unwrap();
    assert_eq!(versions.current().await.unwrap(), "v2");
    assert!(matches!(
        versions.drop_version("v2").await,
        Err(VersionError::IsCurrent(_))
    ));
    assert!(matches!(
        versions.create("v2", "earliest").await,
        Err(VersionError::IsCurrent(_))
    ));
    let list = versions.list().await.unwrap();
    assert_eq!(
        list.iter().map(|v| v.current).collect::<Vec<_>>(),
        [false, true]
    );

    // The old one is dropped: gone from the listing, not openable, and its
    // tables with it (creating it again starts empty).
    versions.drop_version("v1").await.unwrap();
    let names: Vec<_> = versions
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["v2"]);
    assert!(matches!(
        versions.open("v1").await,
        Err(VersionError::NotFound(_))
    ));
    assert!(matches!(
        versions.set_current("v1").await,
        Err(VersionError::NotFound(_))
    ));
    assert!(matches!(
        versions.drop_version("v1").await,
        Err(VersionError::NotFound(_))
    ));
    assert!(matches!(
        versions.mark_ready("v9").await,
        Err(VersionError::NotFound(_))
    ));
    let v1 = versions.create("v1", "earliest").await.unwrap();
    assert_eq!(v1.position(0).await.unwrap(), None);
    assert!(v1.page("r", None, 10).await.unwrap().is_empty());

    // Names are checked before anything is written.
    assert!(matches!(
        versions.create("V-3", "earliest").await,
        Err(VersionError::BadName(_))
    ));
    assert_eq!(versions.current().await.unwrap(), "v2");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, state: RowState, created_ms: i64) -> VersionRow {
        VersionRow {
            name: name.to_owned(),
            state,
            created_ms,
            from: "earliest".to_owned(),
        }
    }

    #[test]
    fn states_round_trip_and_unknown_ones_are_refused() {
        for state in [RowState::Building, RowState::Ready, RowState::Dropping] {
            assert_eq!(RowState::parse(state.as_str()).unwrap(), state);
        }
        assert!(RowState::parse("Ready").is_err());
        assert_eq!(RowState::Dropping.listed(), None);
        let read = VersionRow::from_columns("v3".into(), Some("ready"), None, None).unwrap();
        assert_eq!(read, VersionRow::found("v3"));
        assert!(VersionRow::from_columns("v3".into(), None, Some(1), None).is_err());
    }

    #[test]
    fn only_a_ready_version_can_become_current() {
        check_switch("v2", Some(&row("v2", RowState::Ready, 1))).unwrap();
        assert!(matches!(
            check_switch("v2", Some(&row("v2", RowState::Building, 1))),
            Err(VersionError::NotReady(_))
        ));
        for missing in [None, Some(&row("v2", RowState::Dropping, 1))] {
            assert!(matches!(
                check_switch("v2", missing),
                Err(VersionError::NotFound(_))
            ));
            assert!(check_exists("v2", missing).is_err());
        }
    }

    #[test]
    fn the_current_version_is_never_dropped_nor_rebuilt() {
        let r = row("v1", RowState::Ready, 0);
        assert!(matches!(
            check_drop("v1", "v1", Some(&r)),
            Err(VersionError::IsCurrent(_))
        ));
        assert!(matches!(
            check_drop("v3", "v1", None),
            Err(VersionError::NotFound(_))
        ));
        assert_eq!(check_drop("v1", "v2", Some(&r)).unwrap(), &r);
        // A drop cut short is finished by dropping again.
        let half = row("v1", RowState::Dropping, 0);
        assert_eq!(check_drop("v1", "v2", Some(&half)).unwrap(), &half);
        assert!(matches!(
            building_row("v1", "v1", Some(&r), "earliest", 9),
            Err(VersionError::IsCurrent(_))
        ));
    }

    #[test]
    fn a_replay_keeps_the_creation_time_unless_the_version_was_dropped() {
        let new = building_row("v2", "v1", None, "earliest", 50).unwrap();
        assert_eq!(new, row("v2", RowState::Building, 50));
        let resumed = building_row(
            "v2",
            "v1",
            Some(&row("v2", RowState::Ready, 7)),
            "2026-11-24T10:00:00Z",
            50,
        )
        .unwrap();
        assert_eq!(resumed.created_ms, 7);
        assert_eq!(resumed.state, RowState::Building);
        assert_eq!(resumed.from, "2026-11-24T10:00:00Z");
        let reborn =
            building_row("v2", "v1", Some(&row("v2", RowState::Dropping, 7)), "x", 50).unwrap();
        assert_eq!(reborn.created_ms, 50);
        for bad in ["", "V2", "v-2", "@current"] {
            assert!(matches!(
                building_row(bad, "v1", None, "earliest", 50),
                Err(VersionError::BadName(_))
            ));
        }
    }

    #[test]
    fn the_listing_is_oldest_first_without_dropped_versions() {
        let rows = vec![
            (row("v10", RowState::Building, 30), 0),
            (row("v2", RowState::Ready, 20), 7),
            (row("v3", RowState::Dropping, 25), 0),
            (row("v1", RowState::Ready, 0), 9),
            (row("b", RowState::Ready, 20), 1),
            (row("v9", RowState::Ready, 30), 3),
        ];
        let list = listing("v2", rows);
        let names: Vec<_> = list.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["v1", "b", "v2", "v9", "v10"]);
        let current: Vec<_> = list.iter().filter(|v| v.current).collect();
        assert_eq!(current.len(), 1);
        assert_eq!((current[0].name.as_str(), current[0].records), ("v2", 7));
        assert_eq!(list[4].state, VersionState::Building);
    }
}
