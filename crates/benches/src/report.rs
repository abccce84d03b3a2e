//! The JSON report of a run (and of a comparison of runs), and its text
//! summary.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::fleet::PhaseReport;
use crate::scenario::{Preset, Scenario};
use crate::stats::{Percentiles, Point};
use crate::sys::{Machine, NofileLimit};

/// The headline figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Of the headline phase: the best passing step of `ingest-max`, the
    /// one traffic phase of the other presets.
    pub phase: Option<u8>,
    pub offered_per_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub ack_latency: Percentiles,
    pub e2e_latency: Percentiles,
    /// `ingest-max`: highest offered rate that passed.
    pub max_sustained_rate: Option<f64>,
    /// `ingest-max`: lowest offered rate that failed.
    pub first_failed_rate: Option<f64>,
    /// Server RSS before the fleet connected.
    pub server_rss_idle_bytes: Option<u64>,
    /// Server RSS with every connection open and idle (`connections`).
    pub server_rss_connected_bytes: Option<u64>,
    /// `(connected - idle) / connections`.
    pub rss_per_connection_bytes: Option<f64>,
    /// Server CPU over the window, in cores (user + system, every thread).
    pub server_cpu: Option<f64>,
    /// `server_cpu` per delivered message frame (to every member, the
    /// sender included), in microseconds: what one delivery costs.
    #[serde(default)]
    pub server_cpu_us_per_delivery: Option<f64>,
    /// `server_cpu` per acked message, in microseconds.
    #[serde(default)]
    pub server_cpu_us_per_message: Option<f64>,
    pub client_cpu: f64,
}

/// `cores` of CPU spent on `per_s` things a second, in µs each.
pub(crate) fn us_each(cores: Option<f64>, per_s: f64) -> Option<f64> {
    cores.filter(|_| per_s > 0.0).map(|c| c * 1e6 / per_s)
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub date: String,
    pub machine: Machine,
    /// What was measured: `chat`, `bare`, or the URL.
    pub label: String,
    pub target: String,
    pub command: String,
    pub scenario: Scenario,
    pub nofile_limit: Option<NofileLimit>,
    pub connected: usize,
    pub connect_failures: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    pub summary: Summary,
    pub phases: Vec<PhaseReport>,
    pub series: Vec<Point>,
    /// The overall deadline stopped the run.
    pub aborted: bool,
    /// Every connection opened and every phase's check passed; for
    /// `ingest-max`, a step passed and every step delivered correctly what
    /// was acked (steps past capacity may time out or close slow consumers).
    pub ok: bool,
}

/// Runs of one preset against several servers, in one invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub tool: String,
    pub date: String,
    pub machine: Machine,
    pub command: String,
    pub preset: Preset,
    /// Name of the first baseline: the one the plain ratios divide by.
    pub baseline: String,
    /// Names of every baseline, in run order (the first runs).
    #[serde(default)]
    pub baselines: Vec<String>,
    pub runs: Vec<Report>,
    /// Per run (other than the baselines), its figure divided by each
    /// baseline's: `chat.acked_per_s` by the first one's,
    /// `chat/kafka-fetch.acked_per_s` by another one's, and so on.
    pub ratios: BTreeMap<String, f64>,
    pub ok: bool,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

impl Comparison {
    /// The comparison of `runs`, whose first `baselines` runs are the
    /// baselines (at least one).
    pub fn new(command: String, preset: Preset, baselines: usize, runs: Vec<Report>) -> Comparison {
        let baselines = baselines.max(1).min(runs.len());
        let (bases, others) = runs.split_at(baselines);
        let mut ratios = BTreeMap::new();
        for (i, base) in bases.iter().enumerate() {
            let b = &base.summary;
            for run in others {
                let s = &run.summary;
                let figures = [
                    ("acked_per_s", s.acked_per_s, b.acked_per_s),
                    ("delivered_per_s", s.delivered_per_s, b.delivered_per_s),
                    ("ack_p99", s.ack_latency.p99_ms, b.ack_latency.p99_ms),
                    ("e2e_p99", s.e2e_latency.p99_ms, b.e2e_latency.p99_ms),
                    (
                        "max_sustained_rate",
                        s.max_sustained_rate.unwrap_or(0.0),
                        b.max_sustained_rate.unwrap_or(0.0),
                    ),
                    (
                        "cpu_per_delivery",
                        s.server_cpu_us_per_delivery.unwrap_or(0.0),
                        b.server_cpu_us_per_delivery.unwrap_or(0.0),
                    ),
                    (
                        "rss_per_connection",
                        s.rss_per_connection_bytes.unwrap_or(0.0),
                        b.rss_per_connection_bytes.unwrap_or(0.0),
                    ),
                ];
                let name_of = |figure: &str| match i {
                    0 => format!("{}.{figure}", run.label),
                    _ => format!("{}/{}.{figure}", run.label, base.label),
                };
                for (name, ours, theirs) in figures {
                    if let Some(r) = ratio(ours, theirs) {
                        ratios.insert(name_of(name), r);
                    }
                }
            }
        }
        let baseline = bases.first().map(|r| r.label.clone()).unwrap_or_default();
        let baselines = bases.iter().map(|r| r.label.clone()).collect();
        Comparison {
            tool: tool(),
            date: crate::sys::utc_now(),
            machine: Machine::detect(),
            command,
            preset,
            ok: runs.iter().all(|r| r.ok),
            baseline,
            baselines,
            runs,
            ratios,
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for run in &self.runs {
            out.push_str(&run.text());
            out.push('\n');
        }
        let _ = writeln!(out, "ratios to {}:", self.baselines.join(", then to "));
        for (name, r) in &self.ratios {
            let _ = writeln!(out, "  {name:<36} {r:>8.3}");
        }
        out
    }
}

pub fn tool() -> String {
    format!("chat-load {}", env!("CARGO_PKG_VERSION"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Report {
    /// A human summary: the scenario, a line per phase, the headline.
    pub fn text(&self) -> String {
        let s = &self.scenario;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {} against {} ({}): {} connections ({} open), {} rooms, {} senders, body {} B",
            s.preset.name(),
            self.label,
            self.target,
            s.connections,
            self.connected,
            s.rooms,
            s.senders,
            s.body
        );
        write_failures(&mut out, &self.connect_failures, &self.disconnects);
        let _ = writeln!(
            out,
            "{:>5} {:>10} {:>10} {:>12} {:>28} {:>16} {:>8} {:>8} {:>4}",
            "phase",
            "offered/s",
            "acked/s",
            "delivered/s",
            "ack p50/p99/p99.9/max ms",
            "e2e p50/p99 ms",
            "srv cpu",
            "own cpu",
            "ok"
        );
        for p in &self.phases {
            let a = &p.ack_latency;
            let e = &p.e2e_latency;
            let _ = writeln!(
                out,
                "{:>5} {:>10.0} {:>10.0} {:>12.0} {:>28} {:>16} {:>8} {:>8.2} {:>4}",
                p.phase,
                p.traffic.as_ref().map_or(0.0, |t| t.rate),
                p.acked_per_s,
                p.delivered_per_s,
                format!(
                    "{:.1}/{:.1}/{:.1}/{:.1}",
                    a.p50_ms, a.p99_ms, a.p999_ms, a.max_ms
                ),
                format!("{:.1}/{:.1}", e.p50_ms, e.p99_ms),
                p.server_cpu.map_or("-".into(), |c| format!("{c:.2}")),
                p.client_cpu,
                if p.check.ok { "yes" } else { "NO" },
            );
            if !p.check.ok || !p.errors.is_empty() {
                let _ = writeln!(out, "      check: {:?} errors: {:?}", p.check, p.errors);
            }
        }
        let m = &self.summary;
        if let Some(rate) = m.max_sustained_rate {
            let _ = writeln!(
                out,
                "max sustained: {rate:.0} msgs/s offered, {:.0} acked/s, p99 ack {:.1} ms (bound {} ms)",
                m.acked_per_s, m.ack_latency.p99_ms, s.p99_bound_ms
            );
        } else if s.preset == Preset::IngestMax {
            let _ = writeln!(
                out,
                "max sustained: no step passed (bound {} ms)",
                s.p99_bound_ms
            );
        }
        if let (Some(cores), Some(per_delivery)) = (m.server_cpu, m.server_cpu_us_per_delivery) {
            let _ = writeln!(
                out,
                "server CPU: {cores:.3} cores, {per_delivery:.1} µs per delivery, {:.1} µs per message",
                m.server_cpu_us_per_message.unwrap_or(0.0)
            );
        }
        if let Some(per) = m.rss_per_connection_bytes {
            let _ = writeln!(
                out,
                "server RSS: {:.1} MiB idle, {:.1} MiB with {} connections: {:.1} KiB per connection",
                mib(m.server_rss_idle_bytes.unwrap_or(0)),
                mib(m.server_rss_connected_bytes.unwrap_or(0)),
                self.connected,
                per / 1024.0
            );
        }
        let _ = writeln!(
            out,
            "result: {}",
            if self.ok { "ok" } else { "FAILED CHECKS" }
        );
        out
    }
}

/// The lines for connections that failed to open or were lost, by reason;
/// nothing when there were none.
pub(crate) fn write_failures(
    out: &mut String,
    connect_failures: &BTreeMap<String, u64>,
    disconnects: &BTreeMap<String, u64>,
) {
    use std::fmt::Write as _;
    if !connect_failures.is_empty() {
        let _ = writeln!(out, "connect failures: {connect_failures:?}");
    }
    if !disconnects.is_empty() {
        let _ = writeln!(out, "disconnects: {disconnects:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, acked: f64, p99: f64) -> Report {
        Report {
            tool: tool(),
            date: String::new(),
            machine: Machine::detect(),
            label: label.into(),
            target: "ws://127.0.0.1:1/ws".into(),
            command: String::new(),
            scenario: Scenario::tiny(Preset::IngestMax),
            nofile_limit: None,
            connected: 4,
            connect_failures: BTreeMap::new(),
            disconnects: BTreeMap::new(),
            summary: Summary {
                acked_per_s: acked,
                max_sustained_rate: Some(acked),
                ack_latency: Percentiles {
                    p99_ms: p99,
                    ..Default::default()
                },
                ..Default::default()
            },
            phases: Vec::new(),
            series: Vec::new(),
            aborted: false,
            ok: true,
        }
    }

    #[test]
    fn ratios_divide_by_the_first_run() {
        let c = Comparison::new(
            "chat-load compare".into(),
            Preset::IngestMax,
            1,
            vec![report("bare", 1000.0, 2.0), report("chat", 600.0, 5.0)],
        );
        assert_eq!(c.baseline, "bare");
        assert!((c.ratios["chat.acked_per_s"] - 0.6).abs() < 1e-9);
        assert!((c.ratios["chat.max_sustained_rate"] - 0.6).abs() < 1e-9);
        assert!((c.ratios["chat.ack_p99"] - 2.5).abs() < 1e-9);
        assert!(!c.ratios.contains_key("chat.rss_per_connection"));
        assert!(c.ok);
        let text = c.text();
        assert!(text.contains("ratios to bare") && text.contains("max sustained: 600"));
        let json = serde_json::to_string(&c).unwrap();
        let back: Comparison = serde_json::from_str(&json).unwrap();
        assert_eq!(back.runs.len(), 2);
    }

    #[test]
    fn with_two_baselines_chat_gets_ratios_to_each() {
        let c = Comparison::new(
            "chat-load compare".into(),
            Preset::IngestMax,
            2,
            vec![
                report("kafka-producer", 1000.0, 2.0),
                report("kafka-fetch", 500.0, 4.0),
                report("chat", 400.0, 5.0),
            ],
        );
        assert_eq!(c.baseline, "kafka-producer");
        assert_eq!(c.baselines, ["kafka-producer", "kafka-fetch"]);
        assert!((c.ratios["chat.max_sustained_rate"] - 0.4).abs() < 1e-9);
        assert!((c.ratios["chat/kafka-fetch.max_sustained_rate"] - 0.8).abs() < 1e-9);
        assert!(
            !c.ratios.keys().any(|k| k.starts_with("kafka-fetch")),
            "a baseline gets no ratio: {:?}",
            c.ratios
        );
        assert!(c
            .text()
            .contains("ratios to kafka-producer, then to kafka-fetch"));
    }
}
