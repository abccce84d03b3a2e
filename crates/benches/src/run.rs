//! Runs a scenario against one gateway and makes its report.
//!
//! One fleet of connections serves the whole run: `ingest-max` runs one
//! traffic phase per step on it, the other presets one phase (after an idle
//! hold for `connections`). A watchdog cancels the fleet once the scenario's
//! deadline passes; every wait inside is bounded too.

use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{Fleet, FleetConfig, PhaseReport, Traffic};
use crate::report::{tool, Report, Summary};
use crate::scenario::{Preset, Scenario};
use crate::stats::Recorder;
use crate::sys::{Machine, NofileLimit};
use crate::target::Target;

/// How to run, besides the scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub url: String,
    /// What the report calls the server (`chat`, `bare`, ...).
    pub label: String,
    pub server_pid: Option<u32>,
    pub progress: bool,
    /// The command line, for the report.
    pub command: String,
    pub nofile_limit: Option<NofileLimit>,
}

/// A run id that differs between runs against one server, so frames of
/// an earlier run are never counted.
pub(crate) fn run_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(16)) as u16
}

/// Whether an `ingest-max` step held its offered rate within the bound.
pub fn sustained(p: &PhaseReport, scenario: &Scenario) -> bool {
    let offered = p.traffic.as_ref().map_or(0.0, |t| t.rate);
    p.check.ok
        && p.errors.is_empty()
        && p.ack_latency.count > 0
        && p.ack_latency.p99_ms <= scenario.p99_bound_ms
        && p.acked_per_s >= scenario.sustain_ratio * offered
}

/// What runs traffic phases: the WebSocket [`Fleet`], or the raw producer
/// of [`crate::kafka`]. [`ingest_max`] steps either the same way.
pub(crate) trait Phases {
    /// Runs one traffic phase and checks it.
    async fn traffic(&mut self, traffic: &Traffic) -> PhaseReport;
    /// Whether every later phase would fail too (connections lost).
    fn broken(&self) -> bool;
}

impl Phases for Fleet {
    async fn traffic(&mut self, traffic: &Traffic) -> PhaseReport {
        Fleet::traffic(self, traffic).await
    }

    fn broken(&self) -> bool {
        // Lost connections would fail every later step.
        !self.disconnects().is_empty()
    }
}

pub(crate) fn traffic(s: &Scenario, rate: f64) -> Traffic {
    Traffic {
        rate,
        body: s.body,
        warmup_s: s.warmup_s,
        duration_s: s.duration_s,
        drain_s: s.drain_s,
    }
}

/// Runs `scenario` against the gateway at `options.url`.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Report> {
    scenario.validate()?;
    let target = Target::resolve(&options.url).await?;
    let recorder = Arc::new(Recorder::new(
        run_id(),
        (scenario.deadline_s / scenario.interval_s) as usize + 1,
    ));
    let pid = options.server_pid;
    let rss_idle = pid.and_then(|p| crate::sys::rss_bytes(Some(p)));
    let config = FleetConfig {
        target: target.clone(),
        connections: scenario.connections,
        rooms: scenario.rooms,
        senders: scenario.senders,
        sources: scenario.sources,
        connect_concurrency: scenario.connect_concurrency,
        connect_timeout: Duration::from_secs_f64(scenario.connect_timeout_s),
        interval: Duration::from_secs_f64(scenario.interval_s),
        server_pid: pid,
        progress: options.progress,
        read_buffer: scenario.read_buffer,
    };

    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    let aborted = tokio_util::sync::CancellationToken::new();
    let mut fleet = {
        // The watchdog covers connecting too.
        let connect = Fleet::connect(config, recorder.clone());
        tokio::select! {
            fleet = connect => fleet,
            _ = tokio::time::sleep(scenario.deadline()) => anyhow::bail!("connecting took longer than the deadline ({} s)", scenario.deadline_s),
        }
    };
    let cancel = fleet.cancel_token();
    let watchdog = {
        let stop = watchdog_stop.clone();
        let aborted = aborted.clone();
        let deadline = scenario.deadline();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(deadline) => {
                    tracing::warn!("deadline passed; stopping the run");
                    aborted.cancel();
                    cancel.cancel();
                }
            }
        })
    };

    let mut summary = Summary {
        server_rss_idle_bytes: rss_idle,
        ..Summary::default()
    };
    let mut phases = Vec::new();
    match scenario.preset {
        Preset::IngestMax => {
            let (best, failed) = ingest_max(&mut fleet, scenario, &mut phases, &aborted).await;
            headline(&mut summary, &phases, best, failed);
        }
        Preset::Connections => {
            fleet.hold(Duration::from_secs_f64(scenario.hold_s)).await;
            let connected = pid.and_then(|p| crate::sys::rss_bytes(Some(p)));
            summary.server_rss_connected_bytes = connected;
            if let (Some(idle), Some(connected)) = (rss_idle, connected) {
                if fleet.connected() > 0 {
                    summary.rss_per_connection_bytes =
                        Some((connected as f64 - idle as f64) / fleet.connected() as f64);
                }
            }
            let p = fleet.traffic(&traffic(scenario, scenario.rate)).await;
            fill(&mut summary, &p);
            phases.push(p);
        }
        Preset::Fanout | Preset::Mixed | Preset::RoomsLight | Preset::RoomsBusy => {
            let p = fleet.traffic(&traffic(scenario, scenario.rate)).await;
            fill(&mut summary, &p);
            phases.push(p);
        }
    }

    let connected = fleet.connected();
    let connect_failures = fleet.connect_failures().clone();
    let disconnects = fleet.disconnects();
    fleet.close(Duration::from_secs(15)).await;
    watchdog_stop.cancel();
    let _watchdog_ended = watchdog.await;
    let aborted = aborted.is_cancelled();
    let ok = !aborted
        && connected == scenario.connections
        && !phases.is_empty()
        && match scenario.preset {
            // Steps past the server's capacity fail by design; what they
            // delivered must still be right.
            Preset::IngestMax => {
                summary.max_sustained_rate.is_some() && phases.iter().all(|p| p.check.correct())
            }
            _ => disconnects.is_empty() && phases.iter().all(|p| p.check.ok),
        };
    Ok(Report {
        tool: tool(),
        date: crate::sys::utc_now(),
        machine: Machine::detect(),
        label: options.label.clone(),
        target: format!("ws://{}{}", target.authority, target.path),
        command: options.command.clone(),
        scenario: scenario.clone(),
        nofile_limit: options.nofile_limit,
        connected,
        connect_failures,
        disconnects,
        summary,
        phases,
        series: recorder.series(),
        aborted,
        ok,
    })
}

fn phases_rate(p: &PhaseReport) -> f64 {
    p.traffic.as_ref().map_or(0.0, |t| t.rate)
}

/// The summary of an `ingest-max` run: the best passing step, or the first
/// step when none passed.
pub(crate) fn headline(
    summary: &mut Summary,
    phases: &[PhaseReport],
    best: Option<usize>,
    failed: Option<f64>,
) {
    summary.max_sustained_rate = best.map(|i| phases_rate(&phases[i]));
    summary.first_failed_rate = failed;
    if let Some(p) = best.map_or(phases.first(), |i| phases.get(i)) {
        fill(summary, p);
    }
}

pub(crate) fn fill(summary: &mut Summary, p: &PhaseReport) {
    summary.phase = Some(p.phase);
    summary.offered_per_s = phases_rate(p);
    summary.acked_per_s = p.acked_per_s;
    summary.delivered_per_s = p.delivered_per_s;
    summary.ack_latency = p.ack_latency.clone();
    summary.e2e_latency = p.e2e_latency.clone();
    summary.server_cpu = p.server_cpu;
    summary.server_cpu_us_per_delivery = crate::report::us_each(p.server_cpu, p.delivered_per_s);
    summary.server_cpu_us_per_message = crate::report::us_each(p.server_cpu, p.acked_per_s);
    summary.client_cpu = p.client_cpu;
}

/// Steps the rate up by `step_factor` until a step fails, then bisects
/// between the last passing and first failing rate `refine` times. Returns
/// the index of the best passing phase and the lowest failing rate.
pub(crate) async fn ingest_max(
    fleet: &mut impl Phases,
    s: &Scenario,
    phases: &mut Vec<PhaseReport>,
    aborted: &tokio_util::sync::CancellationToken,
) -> (Option<usize>, Option<f64>) {
    let mut best: Option<usize> = None;
    let mut failed: Option<f64> = None;
    let mut rate = s.rate;
    let mut refinements = 0;
    // A step that fails is run once more before it counts: on this shared
    // machine one stall of a neighbour can fail a step the server sustains.
    let mut confirming: Option<f64> = None;
    for step in 0..s.max_steps {
        if aborted.is_cancelled() {
            break;
        }
        if step > 0 {
            // Let the server settle between steps (pacing, not a wait for
            // a condition: the next step measures whatever state it is in).
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let p = fleet.traffic(&traffic(s, rate)).await;
        let pass = sustained(&p, s);
        tracing::info!(
            rate,
            acked_per_s = p.acked_per_s,
            p99_ms = p.ack_latency.p99_ms,
            pass,
            "ingest-max step"
        );
        phases.push(p);
        if pass {
            if best.is_none_or(|b| phases_rate(&phases[b]) < rate) {
                best = Some(phases.len() - 1);
            }
        } else if confirming != Some(rate) && s.confirm_failures {
            confirming = Some(rate);
            if fleet.broken() {
                break;
            }
            continue;
        } else {
            failed = Some(failed.map_or(rate, |f: f64| f.min(rate)));
        }
        confirming = None;
        if fleet.broken() {
            break;
        }
        let best_rate = best.map(|b| phases_rate(&phases[b]));
        rate = match (best_rate, failed) {
            (Some(b), None) => b * s.step_factor,
            (Some(b), Some(f)) => {
                if refinements >= s.refine {
                    break;
                }
                refinements += 1;
                (b + f) / 2.0
            }
            (None, Some(f)) => f / s.step_factor,
            (None, None) => unreachable!("a step either passes or fails"),
        };
        if rate > s.max_rate || rate < 1.0 {
            break;
        }
    }
    (best, failed)
}
