//! The store on a ScyllaDB cluster: [`ScyllaStore::connect`] opens a session,
//! creates the keyspace and the tables of its projection version when
//! missing, prepares every statement once, and serves [`HistoryStore`]
//! through [`BucketedStore`] over [`CqlTables`].
//!
//! Routing: every request is a prepared statement whose partition key is
//! bound, and the driver's default load-balancing policy is token-aware and
//! shard-aware, so each request goes to a replica owning the partition, on
//! the shard owning it; an unlogged row batch stays within one partition,
//! and the driver routes a batch by its first statement, so it is token- and
//! shard-aware too.
//!
//! Consistency: the driver's default, LOCAL_QUORUM, for reads and writes, so
//! a projector reads the claims and the position it wrote in earlier batches.
//! Every statement is marked idempotent (each is an upsert or a read), so the
//! driver may retry it after a timeout, and a replayed batch writes the same
//! cells again.
//!
//! Errors: what says the cluster cannot be reached or answer now (no
//! connection, timeouts, unavailable replicas, overload) is
//! [`StoreError::Unavailable`], for the projector to retry; the rest is
//! [`StoreError::Storage`].

use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use schemas::protocol::MessageView;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, IntoRowsResultError, MaybeFirstRowError, NewSessionError,
    NextPageError, NextRowError, PagerExecutionError, PrepareError, RequestAttemptError,
    RequestError, RowsError, SchemaAgreementError, TypeCheckError,
};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::buckets::{Bucketing, ChangeBatch, ChangeRow, Claim, RowBatch};
use super::schema::{keyspace_statement, table_statements, Names, Statements};
use super::store::{BucketedStore, ClaimRow, Tables};
use super::uri::{ScyllaUri, UriError};
use crate::{HistoryStore, StoreError};

/// What can go wrong talking to Scylla.
#[derive(Debug, thiserror::Error)]
pub enum ScyllaError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("{0}")]
    Names(String),
    #[error("connecting: {0}")]
    Connect(#[from] NewSessionError),
    #[error("preparing a statement: {0}")]
    Prepare(#[from] PrepareError),
    #[error("executing a statement: {0}")]
    Execute(#[from] ExecutionError),
    #[error("executing a paged statement: {0}")]
    Pager(#[from] PagerExecutionError),
    #[error("reading a page: {0}")]
    NextRow(#[from] NextRowError),
    #[error("reading rows: {0}")]
    Rows(String),
}

impl From<IntoRowsResultError> for ScyllaError {
    fn from(e: IntoRowsResultError) -> Self {
        ScyllaError::Rows(e.to_string())
    }
}

impl From<TypeCheckError> for ScyllaError {
    fn from(e: TypeCheckError) -> Self {
        ScyllaError::Rows(e.to_string())
    }
}

impl From<RowsError> for ScyllaError {
    fn from(e: RowsError) -> Self {
        ScyllaError::Rows(e.to_string())
    }
}

impl From<MaybeFirstRowError> for ScyllaError {
    fn from(e: MaybeFirstRowError) -> Self {
        ScyllaError::Rows(e.to_string())
    }
}

impl From<scylla::deserialize::DeserializationError> for ScyllaError {
    fn from(e: scylla::deserialize::DeserializationError) -> Self {
        ScyllaError::Rows(e.to_string())
    }
}

/// Whether a failed attempt says "not now" rather than "not this".
fn attempt_unavailable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::RateLimitReached { .. }
        ),
        _ => false,
    }
}

fn request_unavailable(e: &RequestError) -> bool {
    match e {
        RequestError::EmptyPlan
        | RequestError::ConnectionPoolError(_)
        | RequestError::RequestTimeout(_) => true,
        RequestError::LastAttemptError(a) => attempt_unavailable(a),
        _ => false,
    }
}

fn next_page_unavailable(e: &NextPageError) -> bool {
    matches!(e, NextPageError::RequestFailure(r) if request_unavailable(r))
}

fn prepare_unavailable(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_unavailable(first_attempt),
        _ => false,
    }
}

impl ScyllaError {
    /// Whether retrying later may succeed: the cluster is unreachable, busy
    /// or short of replicas.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ScyllaError::Uri(_) | ScyllaError::Names(_) | ScyllaError::Rows(_) => false,
            ScyllaError::Connect(e) => !matches!(
                e,
                NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_)
            ),
            ScyllaError::Prepare(e) => prepare_unavailable(e),
            ScyllaError::Execute(e) => match e {
                ExecutionError::ConnectionPoolError(_)
                | ExecutionError::EmptyPlan
                | ExecutionError::RequestTimeout(_)
                | ExecutionError::MetadataError(_) => true,
                ExecutionError::LastAttemptError(a) => attempt_unavailable(a),
                ExecutionError::PrepareError(p) => prepare_unavailable(p),
                ExecutionError::SchemaAgreementError(s) => schema_agreement_unavailable(s),
                _ => false,
            },
            ScyllaError::Pager(e) => match e {
                PagerExecutionError::PrepareError(p) => prepare_unavailable(p),
                PagerExecutionError::NextPageError(n) => next_page_unavailable(n),
                PagerExecutionError::SchemaAgreementError(s) => schema_agreement_unavailable(s),
                _ => false,
            },
            ScyllaError::NextRow(e) => match e {
                NextRowError::NextPageError(n) => next_page_unavailable(n),
                _ => false,
            },
        }
    }
}

fn schema_agreement_unavailable(e: &SchemaAgreementError) -> bool {
    matches!(
        e,
        SchemaAgreementError::ConnectionPoolError(_) | SchemaAgreementError::Timeout(_)
    )
}

impl From<ScyllaError> for StoreError {
    fn from(e: ScyllaError) -> Self {
        if e.is_unavailable() {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Storage(e.to_string())
        }
    }
}

fn exec(e: ExecutionError) -> StoreError {
    ScyllaError::Execute(e).into()
}

fn rows(e: impl Into<ScyllaError>) -> StoreError {
    e.into().into()
}

/// A log partition as CQL's `int` (partition counts are small).
fn cql_partition(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

/// A log partition read back from CQL's `int`.
fn log_partition(value: i32) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|_| StoreError::Storage(format!("negative log partition {value} stored")))
}

/// Converts a row count bound into CQL's `int`.
fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// The prepared statements of one projection version.
struct Prepared {
    insert_message: PreparedStatement,
    insert_bucket: PreparedStatement,
    insert_claim: PreparedStatement,
    select_claim: PreparedStatement,
    insert_position: PreparedStatement,
    select_position: PreparedStatement,
    select_buckets: PreparedStatement,
    select_rows: PreparedStatement,
    select_positions: PreparedStatement,
    insert_read: PreparedStatement,
    select_read: PreparedStatement,
    select_reads: PreparedStatement,
    insert_member: PreparedStatement,
    select_member_rooms: PreparedStatement,
    erase_body: PreparedStatement,
    insert_change: PreparedStatement,
    select_changes: PreparedStatement,
    erase_edit: PreparedStatement,
    insert_room_change: PreparedStatement,
    select_room_changes: PreparedStatement,
    erase_room_edit: PreparedStatement,
}

/// Prepares `text`, marked idempotent (every write of the store is, so the
/// driver may retry and speculate).
pub(super) async fn prepare_idempotent(
    session: &Session,
    text: &str,
) -> Result<PreparedStatement, ScyllaError> {
    let mut statement = session.prepare(text.to_owned()).await?;
    statement.set_is_idempotent(true);
    Ok(statement)
}

impl Prepared {
    async fn new(session: &Session, texts: &Statements) -> Result<Self, ScyllaError> {
        Ok(Prepared {
            insert_message: prepare_idempotent(session, &texts.insert_message).await?,
            insert_bucket: prepare_idempotent(session, &texts.insert_bucket).await?,
            insert_claim: prepare_idempotent(session, &texts.insert_claim).await?,
            select_claim: prepare_idempotent(session, &texts.select_claim).await?,
            insert_position: prepare_idempotent(session, &texts.insert_position).await?,
            select_position: prepare_idempotent(session, &texts.select_position).await?,
            select_buckets: prepare_idempotent(session, &texts.select_buckets).await?,
            select_rows: prepare_idempotent(session, &texts.select_rows).await?,
            select_positions: prepare_idempotent(session, &texts.select_positions).await?,
            insert_read: prepare_idempotent(session, &texts.insert_read).await?,
            select_read: prepare_idempotent(session, &texts.select_read).await?,
            select_reads: prepare_idempotent(session, &texts.select_reads).await?,
            insert_member: prepare_idempotent(session, &texts.insert_member).await?,
            select_member_rooms: prepare_idempotent(session, &texts.select_member_rooms).await?,
            erase_body: prepare_idempotent(session, &texts.erase_body).await?,
            insert_change: prepare_idempotent(session, &texts.insert_change).await?,
            select_changes: prepare_idempotent(session, &texts.select_changes).await?,
            erase_edit: prepare_idempotent(session, &texts.erase_edit).await?,
            insert_room_change: prepare_idempotent(session, &texts.insert_room_change).await?,
            select_room_changes: prepare_idempotent(session, &texts.select_room_changes).await?,
            erase_room_edit: prepare_idempotent(session, &texts.erase_room_edit).await?,
        })
    }
}

/// The tables of one projection version on a cluster.
pub struct CqlTables {
    session: Arc<Session>,
    prepared: Prepared,
}

/// A change row as `message_changes` and `room_changes` are read (the same
/// columns, in the same order, in both).
type ChangeColumns = (i64, i64, String, String, String, Option<String>, i64);

impl CqlTables {
    /// Writes `batch`, one partition of `message_changes` or `room_changes`
    /// (`insert`: that table's statement, the same columns in both).
    async fn insert_changes(
        &self,
        insert: &PreparedStatement,
        batch: &ChangeBatch,
    ) -> Result<(), StoreError> {
        let values: Vec<_> = batch
            .rows
            .iter()
            .map(|c| {
                let (kind, text) = c.kind_and_text();
                (
                    batch.room.as_str(),
                    batch.bucket,
                    c.target,
                    c.offset,
                    c.id.as_str(),
                    c.user.as_str(),
                    kind,
                    text,
                    c.ts,
                )
            })
            .collect();
        if let [row] = values.as_slice() {
            self.session
                .execute_unpaged(insert, row)
                .await
                .map_err(exec)?;
            return Ok(());
        }
        // One partition, so UNLOGGED, as for messages.
        let mut cql = Batch::new(BatchType::Unlogged);
        for _ in &values {
            cql.append_statement(insert.clone());
        }
        cql.set_is_idempotent(true);
        self.session.batch(&cql, values).await.map_err(exec)?;
        Ok(())
    }

    /// Every row `select` (of `message_changes` or `room_changes`) answers,
    /// page by page.
    async fn select_changes(
        &self,
        select: &PreparedStatement,
        values: (&str, i64, i64, i64),
    ) -> Result<Vec<ChangeRow>, StoreError> {
        let stream = self
            .session
            .execute_iter(select.clone(), values)
            .await
            .map_err(rows)?
            .rows_stream::<ChangeColumns>()
            .map_err(rows)?;
        let found: Vec<ChangeColumns> = stream.try_collect().await.map_err(rows)?;
        found
            .into_iter()
            .map(|(target, offset, id, user, kind, text, ts)| {
                let change = ChangeRow::change_of(&kind, text)
                    .map_err(|e| StoreError::Storage(e.to_string()))?;
                Ok(ChangeRow {
                    target,
                    offset,
                    id,
                    user,
                    change,
                    ts,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Tables for CqlTables {
    async fn position(&self, partition: u32) -> Result<Option<i64>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_position, (cql_partition(partition),))
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        let row = result.maybe_first_row::<(i64,)>().map_err(rows)?;
        Ok(row.map(|(next,)| next))
    }

    async fn positions(&self) -> Result<Vec<i64>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_positions, ())
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        result
            .rows::<(i64,)>()
            .map_err(rows)?
            .map(|row| row.map(|(next,)| next).map_err(rows))
            .collect()
    }

    async fn write_position(&self, partition: u32, next: i64) -> Result<(), StoreError> {
        // The write timestamp is the position itself: a stale write loses.
        self.session
            .execute_unpaged(
                &self.prepared.insert_position,
                (cql_partition(partition), next, next),
            )
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn claim(&self, room: &str, id: &str) -> Result<Option<ClaimRow>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_claim, (room, id))
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        match result.maybe_first_row::<(i64, i64, i32)>().map_err(rows)? {
            Some((offset, ts, partition)) => Ok(Some(ClaimRow {
                offset,
                ts,
                partition: log_partition(partition)?,
            })),
            None => Ok(None),
        }
    }

    async fn write_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.prepared.insert_claim,
                (
                    &claim.room,
                    &claim.id,
                    claim.offset,
                    claim.ts,
                    cql_partition(claim.partition),
                ),
            )
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn write_bucket(
        &self,
        room: &str,
        bucket: i64,
        partition: u32,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.prepared.insert_bucket,
                (room, bucket, cql_partition(partition)),
            )
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn write_rows(&self, batch: &RowBatch) -> Result<(), StoreError> {
        let values: Vec<_> = batch
            .rows
            .iter()
            .map(|m| {
                (
                    batch.room.as_str(),
                    batch.bucket,
                    m.offset,
                    m.id.as_str(),
                    m.user.as_str(),
                    // A message deleted by its author: its body erased.
                    (!m.deleted).then_some(m.body.as_str()),
                    m.ts,
                )
            })
            .collect();
        if let [row] = values.as_slice() {
            self.session
                .execute_unpaged(&self.prepared.insert_message, row)
                .await
                .map_err(exec)?;
            return Ok(());
        }
        // One partition, so UNLOGGED: no batch log, applied atomically by
        // the replicas of that partition.
        let mut cql = Batch::new(BatchType::Unlogged);
        for _ in &values {
            cql.append_statement(self.prepared.insert_message.clone());
        }
        cql.set_is_idempotent(true);
        self.session.batch(&cql, values).await.map_err(exec)?;
        Ok(())
    }

    async fn erase_body(&self, room: &str, bucket: i64, offset: i64) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.erase_body, (room, bucket, offset))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn write_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.insert_changes(&self.prepared.insert_change, batch)
            .await
    }

    async fn changes(
        &self,
        room: &str,
        bucket: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        // Paged: a message with many reactions makes a long answer.
        self.select_changes(&self.prepared.select_changes, (room, bucket, first, last))
            .await
    }

    async fn erase_edit(
        &self,
        room: &str,
        bucket: i64,
        target: i64,
        offset: i64,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.erase_edit, (room, bucket, target, offset))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn write_room_changes(&self, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.insert_changes(&self.prepared.insert_room_change, batch)
            .await
    }

    async fn room_changes(
        &self,
        room: &str,
        bucket: i64,
        from: i64,
        upto: i64,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        // Paged: a bucket of a busy room holds up to 16,384 changes.
        self.select_changes(
            &self.prepared.select_room_changes,
            (room, bucket, from, upto),
        )
        .await
    }

    async fn erase_room_edit(
        &self,
        room: &str,
        bucket: i64,
        offset: i64,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.erase_room_edit, (room, bucket, offset))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn buckets(
        &self,
        room: &str,
        at_most: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Option<u32>), StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.prepared.select_buckets,
                (room, at_most, cql_limit(limit)),
            )
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        let mut buckets = Vec::with_capacity(result.rows_num());
        let mut partition = None;
        for row in result.rows::<(i64, Option<i32>)>().map_err(rows)? {
            let (bucket, static_partition) = row.map_err(rows)?;
            buckets.push(bucket);
            if let Some(p) = static_partition {
                partition = Some(log_partition(p)?);
            }
        }
        Ok((buckets, partition))
    }

    async fn rows(
        &self,
        room: &str,
        bucket: i64,
        before: i64,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.prepared.select_rows,
                (room, bucket, before, cql_limit(limit)),
            )
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        result
            .rows::<(i64, String, String, Option<String>, i64)>()
            .map_err(rows)?
            .map(|row| {
                let (offset, id, user, body, ts) = row.map_err(rows)?;
                Ok(MessageView {
                    room: room.to_owned(),
                    offset,
                    id,
                    user,
                    // A null body was erased: the message is deleted.
                    deleted: body.is_none(),
                    body: body.unwrap_or_default(),
                    ts,
                    ..MessageView::default()
                })
            })
            .collect()
    }

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<i64>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_read, (room, user))
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        let row = result.maybe_first_row::<(i64,)>().map_err(rows)?;
        Ok(row.map(|(offset,)| offset))
    }

    async fn write_read_position(
        &self,
        room: &str,
        user: &str,
        offset: i64,
    ) -> Result<(), StoreError> {
        // The write timestamp is the offset: a lower position loses.
        self.session
            .execute_unpaged(&self.prepared.insert_read, (room, user, offset, offset))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn read_positions(
        &self,
        room: &str,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_reads, (room, cql_limit(limit)))
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        result
            .rows::<(String, i64)>()
            .map_err(rows)?
            .map(|row| row.map_err(rows))
            .collect()
    }

    async fn write_member(&self, user: &str, room: &str) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.prepared.insert_member, (user, room))
            .await
            .map_err(exec)?;
        Ok(())
    }

    async fn user_rooms(&self, user: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.prepared.select_member_rooms, (user, cql_limit(limit)))
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(rows)?;
        result
            .rows::<(String,)>()
            .map_err(rows)?
            .map(|row| row.map(|(room,)| room).map_err(rows))
            .collect()
    }
}

/// The history store on ScyllaDB. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<BucketedStore<CqlTables>>,
    names: Arc<Names>,
}

impl ScyllaStore {
    /// Connects to `uri` (`scylla://HOST:9042[,HOST...]/KEYSPACE[?replication_factor=N&strategy=S]`),
    /// creates the keyspace and the tables of projection version `namespace`
    /// when missing, and prepares the statements.
    ///
    /// Creating tables from several processes at once is safe on Scylla
    /// with Raft-managed schema (the default since 5.4); on older clusters,
    /// apply `schemas/cql/` once before starting several projectors.
    pub async fn connect(uri: &str, namespace: &str) -> Result<Self, StoreError> {
        let target = ScyllaUri::parse(uri).map_err(ScyllaError::from)?;
        Self::open(&target, namespace).await
    }

    /// [`ScyllaStore::connect`] to a parsed URI.
    pub async fn open(target: &ScyllaUri, namespace: &str) -> Result<Self, StoreError> {
        Ok(Self::open_inner(target, namespace).await?)
    }

    async fn open_inner(target: &ScyllaUri, namespace: &str) -> Result<Self, ScyllaError> {
        let names = Names::new(&target.keyspace, namespace).map_err(ScyllaError::Names)?;
        let session = open_session(target).await?;
        Self::on_session(session, names).await
    }

    /// The store of version `names` on `session`: its tables created when
    /// missing, its statements prepared.
    pub(super) async fn on_session(
        session: Arc<Session>,
        names: Names,
    ) -> Result<Self, ScyllaError> {
        for ddl in table_statements(&names) {
            session.query_unpaged(ddl, &[]).await?;
        }
        let prepared = Prepared::new(&session, &Statements::new(&names)).await?;
        tracing::debug!(
            keyspace = names.keyspace,
            namespace = names.namespace,
            "scylla history store version ready"
        );
        Ok(ScyllaStore {
            inner: Arc::new(BucketedStore::new(
                CqlTables { session, prepared },
                Bucketing::default(),
            )),
            names: Arc::new(names),
        })
    }

    /// Records of the log this version covers: the sum of its positions.
    pub async fn records(&self) -> Result<u64, StoreError> {
        self.inner.records().await
    }

    /// The session this store's requests go through.
    pub(super) fn session(&self) -> &Arc<Session> {
        &self.inner.tables().session
    }

    /// A name for this keyspace and projection version: projectors writing
    /// it share one consumer group.
    pub fn id(&self) -> String {
        format!("scylla-{}-{}", self.names.keyspace, self.names.namespace)
    }

    /// Another projection version on the same session (a replay builds it
    /// while this one serves reads); its tables are created when missing.
    pub async fn namespace(&self, namespace: &str) -> Result<Self, StoreError> {
        Ok(self.namespace_inner(namespace).await?)
    }

    async fn namespace_inner(&self, namespace: &str) -> Result<Self, ScyllaError> {
        let names = Names::new(&self.names.keyspace, namespace).map_err(ScyllaError::Names)?;
        Self::on_session(self.session().clone(), names).await
    }
}

/// Connects to the cluster of `target` and creates its keyspace when
/// missing.
pub(super) async fn open_session(target: &ScyllaUri) -> Result<Arc<Session>, ScyllaError> {
    let session = SessionBuilder::new()
        .known_nodes(&target.hosts)
        .build()
        .await?;
    // DDL waits for schema agreement before returning (the driver's
    // default), so what is prepared afterwards is prepared against it.
    session
        .query_unpaged(
            keyspace_statement(&target.keyspace, &target.replication),
            &[],
        )
        .await?;
    tracing::info!(
        hosts = ?target.hosts,
        keyspace = target.keyspace,
        "connected to scylla"
    );
    Ok(Arc::new(session))
}

#[async_trait]
impl HistoryStore for ScyllaStore {
    async fn apply_batch(
        &self,
        partition: u32,
        batch: crate::Batch,
        next: u64,
    ) -> Result<(), StoreError> {
        self.inner.apply_batch(partition, batch, next).await
    }

    async fn position(&self, partition: u32) -> Result<Option<u64>, StoreError> {
        self.inner.position(partition).await
    }

    async fn page(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, StoreError> {
        self.inner.page(room, before, limit).await
    }

    async fn find_id(&self, room: &str, id: &str) -> Result<Option<u64>, StoreError> {
        self.inner.find_id(room, id).await
    }

    async fn read_position(&self, room: &str, user: &str) -> Result<Option<u64>, StoreError> {
        self.inner.read_position(room, user).await
    }

    async fn reads(&self, room: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.reads(room).await
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.inner.user_rooms(user).await
    }

    async fn count_after(
        &self,
        room: &str,
        after: Option<u64>,
        cap: u64,
    ) -> Result<u64, StoreError> {
        self.inner.count_after(room, after, cap).await
    }

    async fn find_ids(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<(u64, i64)>>, StoreError> {
        self.inner.find_ids(keys).await
    }

    async fn message(&self, room: &str, offset: u64) -> Result<Option<MessageView>, StoreError> {
        self.inner.message(room, offset).await
    }

    async fn page_as_of(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        at: crate::AsOf,
    ) -> Result<Vec<crate::PastMessage>, StoreError> {
        self.inner.page_as_of(room, before, limit, at).await
    }

    async fn changes_between(
        &self,
        room: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<crate::ChangeMark>, StoreError> {
        self.inner.changes_between(room, from, upto).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_uri_or_namespace_fails_before_connecting() {
        let e = ScyllaStore::connect("scylla://127.0.0.1:9/Chat", "v1")
            .await
            .err()
            .unwrap();
        assert!(!e.is_retriable(), "{e}");
        assert!(e.to_string().contains("keyspace"), "{e}");
        let e = ScyllaStore::connect("scylla://127.0.0.1:9/chat", "v-1")
            .await
            .err()
            .unwrap();
        assert!(!e.is_retriable(), "{e}");
        assert!(e.to_string().contains("namespace"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_unavailable() {
        // Nothing listens on port 9 of the loopback: the driver's connection
        // is refused at once.
        let e = ScyllaStore::connect("scylla://127.0.0.1:9/chat", "v1")
            .await
            .err()
            .unwrap();
        assert!(e.is_retriable(), "{e}");
    }
}
