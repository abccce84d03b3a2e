//! The metrics this crate records, each named once. [`CATALOGUE`] lists them
//! (name, kind, help) for the exporter's descriptions and for the catalogue
//! in `docs/metrics.md`, which a test keeps equal to it. A slow consumer
//! found by the gateway counts in fan-out's
//! [`fanout::metrics::SLOW_CONSUMERS_TOTAL`].

/// Open WebSocket connections.
pub const CONNECTIONS: &str = "ingest_connections";
/// Frames received from WebSocket clients.
pub const FRAMES_TOTAL: &str = "ingest_frames_total";
/// Frames refused, by error `code`.
pub const BAD_FRAMES_TOTAL: &str = "ingest_bad_frames_total";
/// WebSocket upgrades refused, by error `code` (unauthorized, forbidden,
/// limit_reached).
pub const UPGRADES_REFUSED_TOTAL: &str = "ingest_upgrades_refused_total";
/// Appends to the log (one per batch of sends).
pub const APPENDS_TOTAL: &str = "ingest_appends_total";
/// Appends to the log that failed.
pub const APPEND_ERRORS_TOTAL: &str = "ingest_append_errors_total";
/// Sends answered with an `ack`.
pub const MESSAGES_ACKED_TOTAL: &str = "ingest_messages_acked_total";
/// Sends (first attempts and retries) whose outcome the log did not give
/// within the send timeout, answered `unavailable` with `pending`.
pub const SEND_TIMEOUTS_TOTAL: &str = "ingest_send_timeouts_total";
/// Read positions appended to the log.
pub const READS_TOTAL: &str = "ingest_reads_total";
/// Seconds from a send's arrival to its `ack` (or the HTTP answer).
pub const ACK_SECONDS: &str = "ingest_ack_seconds";
/// Seconds a history store read of a gateway took, by `op` (page, ids,
/// reads, rooms).
pub const STORE_READ_SECONDS: &str = "ingest_store_read_seconds";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (CONNECTIONS, "gauge", "open WebSocket connections"),
    (
        FRAMES_TOTAL,
        "counter",
        "frames received from WebSocket clients",
    ),
    (BAD_FRAMES_TOTAL, "counter", "frames refused, by error code"),
    (
        UPGRADES_REFUSED_TOTAL,
        "counter",
        "WebSocket upgrades refused before the upgrade, by error code",
    ),
    (
        APPENDS_TOTAL,
        "counter",
        "appends to the log, one per batch of sends",
    ),
    (
        APPEND_ERRORS_TOTAL,
        "counter",
        "appends to the log that failed",
    ),
    (
        MESSAGES_ACKED_TOTAL,
        "counter",
        "sends answered with an ack",
    ),
    (
        SEND_TIMEOUTS_TOTAL,
        "counter",
        "sends the log did not answer within the send timeout (answered unavailable, pending)",
    ),
    (READS_TOTAL, "counter", "read positions appended to the log"),
    (
        ACK_SECONDS,
        "histogram",
        "seconds from a send's arrival to its ack",
    ),
    (
        STORE_READ_SECONDS,
        "histogram",
        "seconds a history store read of the gateway took, by op (page, as_of, ids, reads, rooms; position and message: the target of an edit, delete or react)",
    ),
];
