//! The history store on ScyllaDB: `--store scylla://HOST:9042[,HOST...]/KEYSPACE`.
//!
//! Owns the Scylla layout of the history (the CQL in `schemas/cql/`) and
//! promises exactly the [`crate::HistoryStore`] contract of the embedded
//! store: it passes the same conformance suite.
//!
//! - [`uri`]: the store URI, parsed and checked before anything connects.
//! - [`schema`]: the CQL text (schema from `schemas/cql/`, every statement).
//! - [`buckets`]: the pure layout logic, no I/O: offset buckets, the write
//!   plan of a batch (id dedup, one unlogged batch per partition, what a
//!   delete erases), the cursor walking buckets backwards for a page, and
//!   how a page folds in the changes kept for its messages.
//! - `store`: the algorithm over the tables, written once (bounded
//!   concurrency; the position written after its data).
//! - `cql`: [`ScyllaStore`], the tables on a cluster (prepared statements,
//!   token- and shard-aware routing, error mapping).
//! - [`catalog`]: the projection versions over the same layout, written once
//!   (pure decisions, then the algorithm over the versions table);
//!   `versions`: [`ScyllaVersions`], that table on a cluster.
//!
//! Changes (edits, deletes, reactions) are kept as rows of their own beside
//! their target, never written into the message's row, and folded in when a
//! page reads the message ([`crate::fold`]), so every write stays a blind
//! upsert; only a delete by the author rewrites: it erases the message's
//! body and its edits' bodies (a deleted body stays only in the log; an
//! edit of a message already deleted is written without its body). Each
//! change is also kept by its own offset (`room_changes`, a full copy, its
//! bucket listed in the room index), which is how `changes_between` lists a
//! room's changes in log order for a catch-up served from the store.
//!
//! The same algorithm also runs in tests on an in-memory copy of the
//! tables: under the whole conformance suite, and compared page by page
//! (and change list by change list) with the embedded store on random
//! histories of messages and changes. The
//! conformance suite runs against a real cluster when `SCYLLA_URI` is set,
//! and is reported as skipped otherwise.
//!
//! Namespaces are projection versions: the tables of version `v1` are
//! `messages_v1`, `room_buckets_v1`, `message_ids_v1`, `positions_v1`,
//! `room_reads_v1`, `user_rooms_v1`, `message_changes_v1`, `room_changes_v1`,
//! so a rebuild writes `v2` beside them while `v1` serves reads; the
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
