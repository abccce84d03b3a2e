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
/// Notices this node sent on the ephemeral channel, by kind (rooms,
/// typing, bye).
pub const PRESENCE_NOTICES_SENT_TOTAL: &str = "presence_notices_sent_total";
/// Bytes of the notices this node sent on the ephemeral channel.
pub const PRESENCE_BYTES_SENT_TOTAL: &str = "presence_bytes_sent_total";
/// Notices of other nodes this node read from the ephemeral channel.
pub const PRESENCE_NOTICES_RECEIVED_TOTAL: &str = "presence_notices_received_total";
/// Records of the ephemeral channel this node could not read (skipped).
pub const PRESENCE_NOTICES_UNREADABLE_TOTAL: &str = "presence_notices_unreadable_total";
/// Typing notices dropped because the publisher's queue was full.
pub const PRESENCE_NOTICES_DROPPED_TOTAL: &str = "presence_notices_dropped_total";
/// Seconds from a message's append (its timestamp) to its frame being
/// queued for its members' sockets.
pub const DELIVERY_LAG_SECONDS: &str = "fanout_delivery_lag_seconds";
/// Other nodes whose presence this node holds.
pub const PRESENCE_NODES: &str = "presence_nodes";
/// (room, user) entries present, over every node.
pub const PRESENCE_ENTRIES: &str = "presence_entries";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        DELIVERY_LAG_SECONDS,
        "histogram",
        "seconds from a message's append to its frame queued for the members' sockets",
    ),
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
        "message and change frames handed to members' queues",
    ),
    (
        PRESENCE_NOTICES_SENT_TOTAL,
        "counter",
        "notices this node sent on the ephemeral channel, by kind: rooms, typing, bye",
    ),
    (
        PRESENCE_BYTES_SENT_TOTAL,
        "counter",
        "bytes of the notices this node sent on the ephemeral channel",
    ),
    (
        PRESENCE_NOTICES_RECEIVED_TOTAL,
        "counter",
        "notices of other nodes read from the ephemeral channel, by kind",
    ),
    (
        PRESENCE_NOTICES_UNREADABLE_TOTAL,
        "counter",
        "records of the ephemeral channel this node could not read (skipped)",
    ),
    (
        PRESENCE_NOTICES_DROPPED_TOTAL,
        "counter",
        "typing notices dropped because the publisher's queue was full",
    ),
    (
        PRESENCE_NODES,
        "gauge",
        "other nodes whose presence this node holds",
    ),
    (
        PRESENCE_ENTRIES,
        "gauge",
        "room and user pairs present, over every node",
    ),
];
