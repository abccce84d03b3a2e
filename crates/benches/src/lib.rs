//! Load benchmarks of the ingest tier, and what they compare against.
//!
//! - `chat-load` (binary; [`cli`]): a fleet of WebSocket clients speaking
//!   the client protocol (docs/protocol.md) to any gateway on this machine
//!   ([`fleet`]), open-loop rate control with latency from the intended
//!   send time ([`ids`], [`stats`]), the presets `ingest-max`, `fanout`,
//!   `connections`, `mixed` ([`scenario`], [`run`]), a JSON report
//!   ([`report`]) and an SVG chart ([`chart`]); `chat-load compare` starts
//!   the baseline and `chat serve` one after the other and reports ratios
//!   ([`compare`]); `chat-load flood` measures quiet clients beside a
//!   rate-limited flooder on one `chat serve` with its limits on
//!   ([`flood`]).
//! - `bare-server` (binary; [`bare`]): the baseline, a WebSocket server that
//!   answers like a gateway with no log behind it.
//! - The Kafka-mode baseline ([`kafka`]): a raw rdkafka producer with the
//!   log's settings, running the same scenario against the brokers of
//!   `--log kafka://...` (`compare --baseline kafka-producer`).
//! - `presence-load` (binary; [`presence`]): presence across gateways on
//!   one broker, connections moving between rooms: what the ephemeral
//!   channel carries and what it costs.
//! - Micro-benchmarks (criterion, `benches/`): Avro codec, partitioner,
//!   embedded log append, history store apply.
//!
//! Results and how they were produced: `benches/RESULTS.md` at the root of
//! the repository. Tests check what the tool reports is right (every acked
//! message delivered to every member), never how fast anything is.

pub mod bare;
pub mod chart;
pub mod cli;
pub mod compare;
pub mod fleet;
pub mod flood;
pub mod ids;
pub mod kafka;
pub mod presence;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod target;

/// Logs of a benchmark binary to stderr, `warn` unless `RUST_LOG` says.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
