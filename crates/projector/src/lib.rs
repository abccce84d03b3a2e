//! Builds the queryable history from the log.
//!
//! - [`Projector`]: reads partitions of the log and applies their events to a
//!   [`history::HistoryStore`], resuming after a restart from the position
//!   the store keeps with the data (never from memory, never from the
//!   broker's committed offset). Undecodable records go to [`DLQ_TOPIC`].
//! - [`replay`]: rebuilds a history from the log into a new projection
//!   version.
//! - [`control`]: the control socket of a running server, through which
//!   `chat replay` and `chat versions` run a replay or list, switch and drop
//!   projection versions inside it.
//!
//! Projection is idempotent: a batch is applied together with the position
//! it reaches, a batch the store already covers is ignored, and a message id
//! already in a room is not stored twice.

pub mod control;
pub mod metrics;
pub mod replay;
mod run;

pub use run::{dead_letter, to_message, Projector, ProjectorConfig, ProjectorHandle, DLQ_TOPIC};
