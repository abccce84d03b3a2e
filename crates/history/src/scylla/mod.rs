//! The history store on ScyllaDB: `--store scylla://HOST:9042[,HOST...]/KEYSPACE`.
//!
//! Owns the Scylla layout of the history (the CQL in `schemas/cql/`) and
//! promises exactly the [`crate::HistoryStore`] contract of the embedded
//! store: it passes the same conformance suite.
//!
//! - [`uri`]: the store URI, parsed and checked before anything connects.
//! - [`schema`]: the CQL text (schema from `schemas/cql/`, every statement).
//! - [`buckets`]: the pure layout logic, no I/O: offset buckets, the write
//!   plan of a batch (id dedup, one unlogged batch per partition), and the
//!   cursor walking buckets backwards for a page.
//! - `store`: the algorithm over the tables, written once (bounded
//!   concurrency; the position written after its data).
//! - `cql`: [`ScyllaStore`], the tables on a cluster (prepared statements,
//!   token- and shard-aware routing, error mapping).
//! - [`catalog`]: the projection versions over the same layout, written once
//!   (pure decisions, then the algorithm over the versions table);
//!   `versions`: [`ScyllaVersions`], that table on a cluster.
//!
//! The same algorithm also runs in tests on an in-memory copy of the tables,
//! compared page by page with the embedded store; the conformance suite runs
//! against a real cluster when `SCYLLA_URI` is set, and is reported as
//! skipped otherwise.
//!
//! Namespaces are projection versions: the tables of version `v1` are
//! `messages_v1`, `room_buckets_v1`, `message_ids_v1`, `positions_v1`,
//! `room_reads_v1`, `user_rooms_v1`, so a
//! rebuild writes `v2` beside them while `v1` serves reads; the
//! `projection_versions` table says which versions exist and which one is
//! current.

pub mod buckets;
pub mod catalog;
mod cql;
pub mod schema;
mod store;
pub mod uri;
mod versions;

#[cfg(test)]
mod memory;
#[cfg(test)]
mod tests;

pub use cql::{ScyllaError, ScyllaStore};
pub use uri::{Replication, ScyllaUri, Strategy, UriError};
pub use versions::ScyllaVersions;
