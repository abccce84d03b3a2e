//! The metrics this crate records, each named once. [`CATALOGUE`] lists them
//! (name, kind, help) for the exporter's descriptions and for the catalogue
//! in `docs/metrics.md`, which a test keeps equal to it.

/// Failed writes to the history store (each retried).
pub const STORE_ERRORS_TOTAL: &str = "projector_store_errors_total";
/// Records sent to the dead-letter topic, by `consumer` (who met them).
pub const DEAD_LETTERS_TOTAL: &str = "projector_dead_letters_total";
/// Partitions this projector owns now.
pub const PARTITIONS_OWNED: &str = "projector_partitions_owned";
/// Events (messages, read positions) applied to the history store.
pub const EVENTS_TOTAL: &str = "projector_events_total";
/// Seconds one batch took to apply to the store, retries included.
pub const BATCH_SECONDS: &str = "projector_batch_seconds";
/// Records of a `partition` behind its end, as of the last batch applied
/// (checked at most once a second per partition).
pub const LAG_RECORDS: &str = "projector_lag_records";
/// Seconds from the append of the last record applied of a `partition` to
/// its apply.
pub const LAG_SECONDS: &str = "projector_lag_seconds";
/// Next offset to apply, by `partition`.
pub const POSITION: &str = "projector_position";
/// Events a replay applied.
pub const REPLAY_EVENTS_TOTAL: &str = "replay_events_total";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        STORE_ERRORS_TOTAL,
        "counter",
        "failed writes to the history store, each retried",
    ),
    (
        DEAD_LETTERS_TOTAL,
        "counter",
        "records sent to the dead-letter topic, by consumer",
    ),
    (
        PARTITIONS_OWNED,
        "gauge",
        "partitions this projector owns now",
    ),
    (
        EVENTS_TOTAL,
        "counter",
        "events (messages, read positions, edits, deletes, reactions) applied to the history store",
    ),
    (
        BATCH_SECONDS,
        "histogram",
        "seconds one batch took to apply to the store, retries included",
    ),
    (
        LAG_RECORDS,
        "gauge",
        "records of a partition behind its end, as of the last batch applied",
    ),
    (
        LAG_SECONDS,
        "gauge",
        "seconds from the append of a partition's last applied record to its apply",
    ),
    (POSITION, "gauge", "next offset to apply, by partition"),
    (REPLAY_EVENTS_TOTAL, "counter", "events a replay applied"),
];
