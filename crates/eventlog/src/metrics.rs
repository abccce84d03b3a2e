//! The metrics this crate records, each named once. [`CATALOGUE`] lists them
//! (name, kind, help) for the exporter's descriptions and for the catalogue
//! in `docs/metrics.md`, which a test keeps equal to it.

/// Commits of the embedded log; each is one write and one `fdatasync` of
/// the log file (or one fsync'd transaction of the earlier redb log).
pub const COMMITS_TOTAL: &str = "eventlog_commits_total";
/// Seconds one commit of the embedded file log took to write and sync: the
/// floor of the ack latency, set by the disk.
pub const COMMIT_SECONDS: &str = "eventlog_commit_seconds";
/// Records per commit of the embedded log (group commit batch size).
pub const COMMIT_RECORDS: &str = "eventlog_commit_records";
/// Kafka reads that met a record past the next expected offset, by
/// `outcome`: `read_again` (the fetch is repeated) or `accepted` (the gap is
/// real: compacted or deleted records).
pub const READ_GAPS_TOTAL: &str = "log_read_gaps_total";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        COMMITS_TOTAL,
        "counter",
        "commits of the embedded log, one fsync each",
    ),
    (
        COMMIT_SECONDS,
        "histogram",
        "seconds a commit of the embedded file log took to write and fdatasync",
    ),
    (
        COMMIT_RECORDS,
        "histogram",
        "records per commit of the embedded log",
    ),
    (
        READ_GAPS_TOTAL,
        "counter",
        "Kafka reads that met a record past the next offset, by outcome (read_again, accepted)",
    ),
];
