//! Kafka mode: the hook for the raw-producer baseline.
//!
//! The Kafka-mode target is "`ingest-max` against `chat serve --log
//! kafka://...` reaches at least 80% of the msgs/s a raw rdkafka producer
//! gets from the same broker". Running chat in Kafka mode already works
//! (`chat-load compare --log kafka://HOST:PORT ...` passes `--log` through).
//! The baseline does not exist yet: it needs an idempotent `acks=all`
//! producer with the settings of the log's Kafka backend, which belongs with
//! that backend (the lead is building it), so this crate does not take
//! rdkafka on by itself.
//!
//! To add it: a function here, `produce_max(brokers, topic, scenario) ->
//! Report`, that sends `scenario.body`-byte records keyed by
//! `scenario.rooms` room names at the offered rates of `ingest-max`
//! (open loop, latency from the intended send time, as [`crate::fleet`]
//! does), measures delivery-report latency into the same
//! [`crate::stats::Recorder`], and returns a [`crate::report::Report`]
//! labelled `kafka-producer`; then `Baseline::KafkaProducer` in
//! [`crate::compare`] calls it instead of starting `bare-server`.

/// Why `--baseline kafka-producer` stops before starting anything.
pub const PENDING: &str = "the raw rdkafka producer baseline is pending: it comes with the Kafka \
backend of the log (see crates/benches/src/kafka.rs and benches/RESULTS.md); \
use --baseline bare, which works with --log kafka://HOST:PORT too";
