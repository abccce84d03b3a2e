//! The projection versions of a keyspace on a cluster: [`ScyllaVersions`],
//! the [`crate::versions::Versions`] of `--store scylla://.../KEYSPACE`.
//!
//! A version is a table suffix (`messages_v2`, ... on one session); the
//! bookkeeping is the `projection_versions` table of the keyspace
//! (`schemas/cql/versions.cql`), created at start when missing like the
//! rest of the schema. The algorithm is [`super::catalog`]'s; this module
//! only runs its requests: prepared statements on the versions table (one
//! partition, its key bound, so routed like every other request), DDL to
//! create or drop a version's tables.
//!
//! Every process on the keyspace (gateways, projectors, `chat replay`) reads
//! the same pointer: a switch made by one is followed by the others
//! ([`crate::versions::CurrentVersion::follow`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::catalog::{Catalog, CatalogVersions, VersionRow};
use super::cql::{open_session, ScyllaError};
use super::schema::{
    drop_statements, versions_statement, Names, VersionStatements, BOOK, POINTER_ROW,
};
use super::uri::ScyllaUri;
use super::ScyllaStore;
use crate::versions::{VersionError, VersionInfo, Versions};
use crate::{HistoryStore, StoreError};

fn exec(e: scylla::errors::ExecutionError) -> StoreError {
    ScyllaError::Execute(e).into()
}

fn rows(e: impl std::fmt::Display) -> StoreError {
    ScyllaError::Rows(e.to_string()).into()
}

struct Prepared {
    select_book: PreparedStatement,
    select_row: PreparedStatement,
    upsert_version: PreparedStatement,
    upsert_pointer: PreparedStatement,
    delete_row: PreparedStatement,
}

impl Prepared {
    async fn new(session: &Session, texts: &VersionStatements) -> Result<Self, ScyllaError> {
        Ok(Prepared {
            select_book: super::cql::prepare_idempotent(session, &texts.select_book).await?,
            select_row: super::cql::prepare_idempotent(session, &texts.select_row).await?,
            upsert_version: super::cql::prepare_idempotent(session, &texts.upsert_version).await?,
            upsert_pointer: super::cql::prepare_idempotent(session, &texts.upsert_pointer).await?,
            delete_row: super::cql::prepare_idempotent(session, &texts.delete_row).await?,
        })
    }
}

/// A row of `projection_versions`: name, state, created_ms, replay_from,
/// points_to.
type BookRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// The versions table and the versions' tables of one keyspace.
struct CqlCatalog {
    session: Arc<Session>,
    keyspace: String,
    prepared: Prepared,
    /// The stores opened so far (tables created, statements prepared), so a
    /// listing or a switch does not prepare them again. Never held across
    /// an await.
    stores: Mutex<HashMap<String, ScyllaStore>>,
}

impl CqlCatalog {
    fn names(&self, name: &str) -> Result<Names, StoreError> {
        Names::new(&self.keyspace, name).map_err(StoreError::Storage)
    }

    async fn scylla_store(&self, name: &str) -> Result<ScyllaStore, StoreError> {
        if let Some(store) = self
            .stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(store.clone());
        }
        let store = ScyllaStore::on_session(self.session.clone(), self.names(name)?).await?;
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), store.clone());
        Ok(store)
    }

    async fn select(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<BookRow>, StoreError> {
        let result = self
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        result
            .rows::<BookRow>()
            .map_err(rows)?
            .map(|row| row.map_err(rows))
            .collect()
    }
}

fn version_row(row: BookRow) -> Result<VersionRow, StoreError> {
    let (name, state, created_ms, from, _) = row;
    VersionRow::from_columns(name, state.as_deref(), created_ms, from)
}

#[async_trait]
impl Catalog for CqlCatalog {
    async fn pointer(&self) -> Result<Option<String>, StoreError> {
        let found = self
            .select(&self.prepared.select_row, (BOOK, POINTER_ROW))
            .await?;
        Ok(found.into_iter().next().and_then(|row| row.4))
    }

    async fn write_pointer(&self, name: &str) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.upsert_pointer, (BOOK, POINTER_ROW, name))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn rows(&self) -> Result<Vec<VersionRow>, StoreError> {
        self.select(&self.prepared.select_book, (BOOK,))
            .await?
            .into_iter()
            .filter(|row| row.0 != POINTER_ROW)
            .map(version_row)
            .collect()
    }

    async fn row(&self, name: &str) -> Result<Option<VersionRow>, StoreError> {
        if name == POINTER_ROW {
            return Ok(None);
        }
        let found = self.select(&self.prepared.select_row, (BOOK, name)).await?;
        found.into_iter().next().map(version_row).transpose()
    }

    async fn write_row(&self, row: &VersionRow) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.prepared.upsert_version,
                (
                    BOOK,
                    row.name.as_str(),
                    row.state.as_str(),
                    row.created_ms,
                    row.from.as_str(),
                ),
            )
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn delete_row(&self, name: &str) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.delete_row, (BOOK, name))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn store(&self, name: &str) -> Result<Arc<dyn HistoryStore>, StoreError> {
        Ok(Arc::new(self.scylla_store(name).await?))
    }

    async fn records(&self, name: &str) -> Result<u64, StoreError> {
        self.scylla_store(name).await?.records().await
    }

    async fn drop_tables(&self, name: &str) -> Result<(), StoreError> {
        let names = self.names(name)?;
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        for ddl in drop_statements(&names) {
            self.session
                .query_unpaged(ddl, &[])
                .await
                .map_err(ScyllaError::from)?;
        }
        Ok(())
    }
}

/// The projection versions of a keyspace on ScyllaDB. See the module
/// header.
pub struct ScyllaVersions {
    versions: CatalogVersions<CqlCatalog>,
}

impl ScyllaVersions {
    /// Connects to `target`, creates the keyspace and the versions table
    /// when missing, and opens the current version (creating its tables
    /// when missing). A keyspace without a pointer (new, or from before
    /// versions) gets `default` as its current version.
    pub async fn connect(target: &ScyllaUri, default: &str) -> Result<Self, VersionError> {
        Names::new(&target.keyspace, default)
            .map_err(|_| VersionError::BadName(default.to_owned()))?;
        let catalog = Self::catalog(target).await.map_err(StoreError::from)?;
        let versions = CatalogVersions::open(catalog, default).await?;
        Ok(ScyllaVersions { versions })
    }

    async fn catalog(target: &ScyllaUri) -> Result<CqlCatalog, ScyllaError> {
        let session = open_session(target).await?;
        session
            .query_unpaged(versions_statement(&target.keyspace), &[])
            .await?;
        let prepared = Prepared::new(&session, &VersionStatements::new(&target.keyspace)).await?;
        Ok(CqlCatalog {
            session,
            keyspace: target.keyspace.clone(),
            prepared,
            stores: Mutex::new(HashMap::new()),
        })
    }

    pub fn keyspace(&self) -> &str {
        &self.versions.catalog().keyspace
    }

    /// A name for the keyspace, whatever version is current: projectors
    /// writing it share one consumer group, and keep sharing it across a
    /// switch (they follow the pointer, not a version).
    pub fn id(&self) -> String {
        format!("scylla-{}", self.keyspace())
    }

    /// Drops the whole keyspace: for tests that made their own.
    #[cfg(test)]
    pub(super) async fn drop_keyspace(&self) -> Result<(), StoreError> {
        let ddl = format!("DROP KEYSPACE IF EXISTS {}", self.keyspace());
        self.versions
            .catalog()
            .session
            .query_unpaged(ddl, &[])
            .await
            .map_err(ScyllaError::from)?;
        Ok(())
    }
}

#[async_trait]
impl Versions for ScyllaVersions {
    async fn current(&self) -> Result<String, VersionError> {
        self.versions.current().await
    }

    async fn set_current(&self, name: &str) -> Result<(), VersionError> {
        self.versions.set_current(name).await
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, VersionError> {
        self.versions.list().await
    }

    async fn create(&self, name: &str, from: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        self.versions.create(name, from).await
    }

    async fn mark_ready(&self, name: &str) -> Result<(), VersionError> {
        self.versions.mark_ready(name).await
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn HistoryStore>, VersionError> {
        self.versions.open(name).await
    }

    async fn drop_version(&self, name: &str) -> Result<(), VersionError> {
        self.versions.drop_version(name).await
    }
}
