//! The metrics this crate records, each named once. [`CATALOGUE`] lists them
//! (name, kind, help) for the exporter's descriptions and for the catalogue
//! in `docs/metrics.md`, which a test keeps equal to it. The names keep the
//! `projector_` prefix they had when the store lived in the projector crate.

/// Messages not stored because their id was already in their room.
pub const DUPLICATE_IDS_TOTAL: &str = "projector_duplicate_ids_total";
/// Commits of the embedded history store (one redb transaction each).
pub const STORE_COMMITS_TOTAL: &str = "projector_store_commits_total";
/// Those of them that were durable (an fsync): at most one a second while
/// applies come, the rest commit without one.
pub const STORE_DURABLE_COMMITS_TOTAL: &str = "projector_store_durable_commits_total";
/// Switches of the projection version reads use.
pub const VERSION_SWITCHES_TOTAL: &str = "projector_version_switches_total";

/// Every metric above: (name, kind, help).
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        DUPLICATE_IDS_TOTAL,
        "counter",
        "messages and changes not stored because their id was already in their room",
    ),
    (
        STORE_COMMITS_TOTAL,
        "counter",
        "commits of the embedded history store (transactions)",
    ),
    (
        STORE_DURABLE_COMMITS_TOTAL,
        "counter",
        "durable commits of the embedded history store, one fsync each: at most one a second under load",
    ),
    (
        VERSION_SWITCHES_TOTAL,
        "counter",
        "switches of the projection version that reads use",
    ),
];
