//! The metrics this crate records, each named once. [`CATALOGUE`] lists them
//! (name, kind, help) for the exporter's descriptions and for the catalogue
//! in `docs/metrics.md`, which a test keeps equal to it.

/// Members closed as slow consumers (their queue was full), whoever found
/// the queue full: a dispatcher, or the gateway sending a reply.
pub const SLOW_CONSUMERS_TOTAL: &str = "fanout_slow_consumers_total";
/// Partitions with a running dispatcher on this node.
pub const PARTITIONS: &str = "fanout_partitions";
/// Messages a joining member read back from the log (catch-up).
pub const CATCH_UP_MESSAGES_TOTAL: &str = "fanout_catch_up_messages_total";
/// Records dropped because their (room, id) was already delivered.
pub const DUPLICATES_DROPPED_TOTAL: &str = "fanout_duplicates_dropped_total";
/// Records the fan-out could not decode (each counted once, by the
/// dispatcher); their rooms' members get an `unreadable` error instead.
pub const UNREADABLE_RECORDS_TOTAL: &str = "fanout_unreadable_records_total";
/// Message frames handed to members' queues.
pub const DELIVERIES_TOTAL: &str = "fanout_deliveries_total";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        SLOW_CONSUMERS_TOTAL,
        "counter",
        "members closed as slow consumers (close 4008)",
    ),
    (
        PARTITIONS,
        "gauge",
        "partitions with a running dispatcher on this node",
    ),
    (
        CATCH_UP_MESSAGES_TOTAL,
        "counter",
        "messages a join's catch-up sent, by source: store (the history store, by room) or log (the partition read back)",
    ),
    (
        DUPLICATES_DROPPED_TOTAL,
        "counter",
        "records dropped because their room and id were already delivered",
    ),
    (
        UNREADABLE_RECORDS_TOTAL,
        "counter",
        "log records the fan-out could not decode; their rooms' members get an unreadable error",
    ),
    (
        DELIVERIES_TOTAL,
        "counter",
        "message frames handed to members' queues",
    ),
];
