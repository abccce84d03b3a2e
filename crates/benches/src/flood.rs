//! `chat-load flood`: does a client flooding the gateway, rate-limited,
//! slow down the quiet clients beside it? (Issue 16, abuse limits: the
//! quiet clients' p99 ack latency may at most double.)
//!
//! One invocation, one `chat serve` with its default limits on (started
//! here on a free port of 127.0.0.1 with a temporary data dir and stopped
//! by its PID, or a running one given by `--url`), two traffic phases with
//! the same quiet load on one [`Fleet`]:
//!
//! - (a) the quiet clients alone: N connections, each its own user alone in
//!   its room, sending open loop at R msg/s each, latency from the intended
//!   send time (as every preset);
//! - (b) the same, with one more connection of its own user sending as fast
//!   as it can: up to `flood_inflight` sends unanswered at any time, never
//!   waiting for an ack otherwise, counting acks and `rate_limited` errors.
//!
//! The flooder runs on a thread and runtime of its own, as another client
//! process would: its frames never queue behind the quiet readers' tasks on
//! this tool's runtime (they still share the machine's cores). It stops at
//! the end of phase (b) and waits (up to the drain) for the answers to what
//! it has in flight.
//!
//! The verdict ([`verdict`]): p99(b) / p99(a) at most `max_ratio`, every
//! quiet send of both phases acked (none refused, none lost), and the flood
//! was actually rate-limited (else the limits were off and nothing was
//! measured).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::compare::Server;
use crate::fleet::{open, room_name, Fleet, FleetConfig, Incoming, PhaseReport, Read, Traffic, Ws};
use crate::ids::MsgId;
use crate::report::{tool, write_failures};
use crate::stats::{Percentiles, Point, Recorder};
use crate::sys::Machine;
use crate::target::Target;

/// The numbers of a flood run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloodSettings {
    /// Quiet connections, each its own user, alone in its room.
    pub quiet_connections: usize,
    /// Messages per second of each quiet connection.
    pub quiet_rate: f64,
    /// Body bytes of every message, quiet or flood.
    pub body: usize,
    /// Measurement window of each phase.
    pub seconds: f64,
    /// Sending before each window opens (the flooder floods through it).
    pub warmup_s: f64,
    /// Longest wait for answers after each phase.
    pub drain_s: f64,
    /// Idle time between the phases.
    pub pause_s: f64,
    /// Most flood sends unanswered at once. The gateway closes a client
    /// with 4096 frames queued for it, so this stays well under that.
    pub flood_inflight: usize,
    /// Most flood sends in all.
    pub flood_max_sends: u64,
    /// Highest p99(b) / p99(a) that passes.
    pub max_ratio: f64,
    pub connect_timeout_s: f64,
    /// Interval of the time series.
    pub interval_s: f64,
}

impl Default for FloodSettings {
    fn default() -> Self {
        FloodSettings {
            quiet_connections: 50,
            quiet_rate: 2.0,
            body: 128,
            seconds: 30.0,
            warmup_s: 2.0,
            drain_s: 10.0,
            pause_s: 1.0,
            flood_inflight: 1000,
            flood_max_sends: 50_000_000,
            max_ratio: 2.0,
            connect_timeout_s: 30.0,
            interval_s: 0.5,
        }
    }
}

/// Highest `flood_inflight`: under the gateway's 4096-frame client queue.
pub const MAX_FLOOD_INFLIGHT: usize = 3000;

impl FloodSettings {
    /// Checks the numbers make a bounded, valid run.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.quiet_connections == 0
            || self.quiet_connections >= crate::ids::MsgId::MAX_CONN as usize
        {
            bail!(
                "quiet connections must be 1 to {}",
                crate::ids::MsgId::MAX_CONN - 1
            );
        }
        if !(1..=schemas::protocol::MAX_BODY_BYTES).contains(&self.body) {
            bail!(
                "body must be 1 to {} bytes",
                schemas::protocol::MAX_BODY_BYTES
            );
        }
        for (name, v) in [
            ("quiet rate", self.quiet_rate),
            ("seconds", self.seconds),
            ("max ratio", self.max_ratio),
            ("interval", self.interval_s),
            ("connect timeout", self.connect_timeout_s),
        ] {
            if !v.is_finite() || v <= 0.0 {
                bail!("{name} must be a finite number > 0");
            }
        }
        for (name, v) in [
            ("warmup", self.warmup_s),
            ("drain", self.drain_s),
            ("pause", self.pause_s),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} must be a finite number >= 0");
            }
        }
        if !(1..=MAX_FLOOD_INFLIGHT).contains(&self.flood_inflight) {
            bail!("flood in-flight must be 1 to {MAX_FLOOD_INFLIGHT}");
        }
        if self.flood_max_sends == 0 {
            bail!("the flooder needs at least one send");
        }
        let quiet = self.quiet_rate * self.quiet_connections as f64 * self.phase_s();
        if quiet > 1e9 {
            bail!("a phase would send {quiet:.0} quiet messages; at most 1e9");
        }
        Ok(())
    }

    /// Rate of all quiet connections together.
    pub fn quiet_total_rate(&self) -> f64 {
        self.quiet_rate * self.quiet_connections as f64
    }

    /// Sending time of a phase, warm-up included.
    fn phase_s(&self) -> f64 {
        self.warmup_s + self.seconds
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            rate: self.quiet_total_rate(),
            body: self.body,
            warmup_s: self.warmup_s,
            duration_s: self.seconds,
            drain_s: self.drain_s,
        }
    }

    /// The run stops after this, wherever it is.
    pub fn deadline(&self) -> Duration {
        let phases = 2.0 * (self.phase_s() + self.drain_s) + self.pause_s;
        Duration::from_secs_f64(phases + 2.0 * self.connect_timeout_s + 60.0)
    }
}

/// Where to run.
#[derive(Debug, Clone)]
pub struct FloodOptions {
    pub settings: FloodSettings,
    /// A running gateway; None starts `chat serve`.
    pub url: Option<String>,
    /// With `url`: its PID, for its CPU time.
    pub server_pid: Option<u32>,
    pub chat_bin: PathBuf,
    /// `--log` of `chat serve`.
    pub log: String,
    pub partitions: u32,
    /// More arguments for `chat serve`; its limits are its defaults unless
    /// given here.
    pub chat_args: Vec<String>,
    pub progress: bool,
    pub command: String,
}

/// What the flooder did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FlooderReport {
    pub user: String,
    pub sent: u64,
    pub acked: u64,
    pub rate_limited: u64,
    /// Other `error` frames answering its sends, by code.
    pub other_errors: BTreeMap<String, u64>,
    /// Sent but neither acked nor refused by the end of its drain.
    pub unanswered: u64,
    /// `message` frames of its own room it received.
    pub deliveries: u64,
    /// From its first send to its last.
    pub send_seconds: f64,
    pub sent_per_s: f64,
    /// Why the gateway ended its connection, when it did.
    pub lost: Option<String>,
}

/// Whether a run passed, and why not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// p99 ack latency of the quiet clients, phase (b) over phase (a).
    pub p99_ratio: Option<f64>,
    pub max_ratio: f64,
    /// Every quiet send of both phases acked and delivered, none refused.
    pub quiet_ok: bool,
    /// The gateway refused some of the flood with `rate_limited`.
    pub flood_limited: bool,
    pub pass: bool,
    /// What failed, in words; empty when it passed.
    pub failures: Vec<String>,
}

/// Quiet sends of a phase neither acked nor refused, or acked and not
/// delivered.
pub fn quiet_lost(p: &PhaseReport) -> u64 {
    p.check.unacked + p.check.missing + p.check.missing_closed
}

/// The verdict of phases `a` (quiet only) and `b` (quiet and the flooder).
pub fn verdict(
    a: &PhaseReport,
    b: &PhaseReport,
    flooder: &FlooderReport,
    max_ratio: f64,
) -> Verdict {
    let mut failures = Vec::new();
    for (name, p) in [("a", a), ("b", b)] {
        let c = &p.check;
        if c.sent == 0 || p.ack_latency.count == 0 {
            failures.push(format!("phase {name}: no quiet send measured"));
        }
        if c.rejected > 0 {
            failures.push(format!("phase {name}: {} quiet sends refused", c.rejected));
        }
        if quiet_lost(p) > 0 {
            failures.push(format!("phase {name}: {} quiet sends lost", quiet_lost(p)));
        }
        if c.disconnected > 0 {
            failures.push(format!(
                "phase {name}: {} quiet connections lost",
                c.disconnected
            ));
        }
        if !c.ok && failures.is_empty() {
            failures.push(format!("phase {name}: check failed: {c:?}"));
        }
        if !p.errors.is_empty() {
            failures.push(format!("phase {name}: quiet errors {:?}", p.errors));
        }
    }
    let quiet_ok = failures.is_empty();
    let (pa, pb) = (a.ack_latency.p99_ms, b.ack_latency.p99_ms);
    let p99_ratio = (pa > 0.0 && pb.is_finite() && a.ack_latency.count > 0).then(|| pb / pa);
    match p99_ratio {
        Some(r) if r <= max_ratio => {}
        Some(r) => failures.push(format!(
            "quiet p99 ack rose {r:.2}x with the flooder (at most {max_ratio})"
        )),
        None => failures.push("no p99 of phase a to compare with".to_owned()),
    }
    let flood_limited = flooder.rate_limited > 0;
    if !flood_limited {
        failures.push(format!(
            "the flooder was never rate-limited ({} sent, {} acked): are the limits off?",
            flooder.sent, flooder.acked
        ));
    }
    if let Some(why) = &flooder.lost {
        failures.push(format!("the flooder's connection ended: {why}"));
    }
    Verdict {
        p99_ratio,
        max_ratio,
        quiet_ok,
        flood_limited,
        pass: failures.is_empty(),
        failures,
    }
}

/// Everything a flood run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodReport {
    pub tool: String,
    pub date: String,
    pub machine: Machine,
    pub command: String,
    pub target: String,
    /// `chat serve` was started by this run (its default limits unless
    /// `chat_args` say otherwise).
    pub started_server: bool,
    pub chat_args: Vec<String>,
    pub settings: FloodSettings,
    pub connected: usize,
    pub connect_failures: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    /// Phase (a): the quiet clients alone.
    pub quiet_only: PhaseReport,
    /// Phase (b): the same quiet load beside the flooder.
    pub with_flooder: PhaseReport,
    pub flooder: FlooderReport,
    pub verdict: Verdict,
    pub series: Vec<Point>,
    pub ok: bool,
}

fn ms3(p: &Percentiles) -> String {
    format!("{:.2}/{:.2}/{:.2}", p.p50_ms, p.p99_ms, p.max_ms)
}

impl FloodReport {
    /// A human summary: the settings, a line per phase, the verdict.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let s = &self.settings;
        let f = &self.flooder;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== flood against {}{}: {} quiet connections ({} open), each its own user alone in its room, \
             {} msg/s each ({} msg/s), body {} B; phases of {} s (+{} s warm-up); \
             flooder: 1 connection, up to {} sends in flight",
            self.target,
            if self.started_server { " (chat serve started here)" } else { "" },
            s.quiet_connections,
            self.connected,
            s.quiet_rate,
            s.quiet_total_rate(),
            s.body,
            s.seconds,
            s.warmup_s,
            s.flood_inflight,
        );
        write_failures(&mut out, &self.connect_failures, &self.disconnects);
        let _ = writeln!(
            out,
            "{:<20} {:>24} {:>26} {:>30} {:>8} {:>8}",
            "phase",
            "quiet ack p50/p99/max ms",
            "quiet sent/acked/ref/lost",
            "flooder sent/acked/limited",
            "srv cpu",
            "own cpu"
        );
        let line =
            |out: &mut String, name: &str, p: &PhaseReport, flood: Option<&FlooderReport>| {
                let c = &p.check;
                let _ = writeln!(
                    out,
                    "{:<20} {:>24} {:>26} {:>30} {:>8} {:>8.2}",
                    name,
                    ms3(&p.ack_latency),
                    format!("{}/{}/{}/{}", c.sent, c.acked, c.rejected, quiet_lost(p)),
                    flood.map_or("-".to_owned(), |f| format!(
                        "{}/{}/{}",
                        f.sent, f.acked, f.rate_limited
                    )),
                    p.server_cpu.map_or("-".into(), |c| format!("{c:.2}")),
                    p.client_cpu,
                );
            };
        line(&mut out, "a quiet only", &self.quiet_only, None);
        line(&mut out, "b quiet + flooder", &self.with_flooder, Some(f));
        let _ = writeln!(
            out,
            "flooder {}: {} sent in {:.1} s ({:.0}/s), {} acked, {} rate_limited, other errors {:?}, {} unanswered, {} delivered back{}",
            f.user,
            f.sent,
            f.send_seconds,
            f.sent_per_s,
            f.acked,
            f.rate_limited,
            f.other_errors,
            f.unanswered,
            f.deliveries,
            f.lost.as_ref().map_or(String::new(), |w| format!(", connection ended: {w}")),
        );
        let v = &self.verdict;
        let _ = writeln!(
            out,
            "quiet p99 ack, b / a: {} (at most {}): {}",
            v.p99_ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
            v.max_ratio,
            if v.pass { "PASS" } else { "FAIL" }
        );
        for why in &v.failures {
            let _ = writeln!(out, "  {why}");
        }
        out
    }
}

/// Runs the two phases against `options.url`, or against a `chat serve`
/// started for the run.
pub async fn flood(options: &FloodOptions) -> anyhow::Result<FloodReport> {
    options.settings.validate()?;
    let server = match &options.url {
        Some(_) => None,
        None => {
            let mut args = crate::compare::serve_args(&options.log, options.partitions);
            args.extend(options.chat_args.iter().cloned());
            let server = Server::start(&options.chat_bin, &args).await?;
            tracing::info!(pid = server.pid(), addr = %server.addr, "chat serve started");
            Some(server)
        }
    };
    let (url, pid) = match (&options.url, &server) {
        (Some(url), _) => (url.clone(), options.server_pid),
        (None, Some(s)) => (format!("ws://{}/ws", s.addr), Some(s.pid())),
        (None, None) => unreachable!("a server is started when no URL is given"),
    };
    let deadline = options.settings.deadline();
    let report = match tokio::time::timeout(deadline, measure(options, &url, pid)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the run took longer than its deadline ({} s)",
            deadline.as_secs()
        )),
    };
    if let Some(server) = server {
        if report.as_ref().map_or(true, |r| !r.ok) {
            let log = server.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            tracing::warn!(
                "flood run failed; server log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        server.stop(Duration::from_secs(15)).await?;
    }
    report
}

async fn measure(
    options: &FloodOptions,
    url: &str,
    pid: Option<u32>,
) -> anyhow::Result<FloodReport> {
    let s = &options.settings;
    let target = Target::resolve(url).await?;
    let run = crate::run::run_id();
    let points = (s.deadline().as_secs_f64() / s.interval_s) as usize + 1;
    let recorder = Arc::new(Recorder::new(run, points));
    let n = s.quiet_connections;
    let config = FleetConfig {
        target: target.clone(),
        connections: n,
        rooms: n,
        senders: n,
        sources: 0,
        connect_concurrency: 64,
        connect_timeout: Duration::from_secs_f64(s.connect_timeout_s),
        interval: Duration::from_secs_f64(s.interval_s),
        server_pid: pid,
        progress: options.progress,
        read_buffer: 8 * 1024,
    };
    let mut fleet = Fleet::connect(config, recorder.clone()).await;
    let traffic = s.traffic();
    tracing::info!(connected = fleet.connected(), "phase a: quiet clients only");
    let quiet_only = fleet.traffic(&traffic).await;
    tokio::time::sleep(Duration::from_secs_f64(s.pause_s)).await;

    let flood_plan = FlooderPlan {
        target: target.clone(),
        user: format!("flood-{run:04x}"),
        room: room_name(run, n),
        run,
        conn: n as u32,
        body: s.body,
        inflight: s.flood_inflight as u64,
        max_sends: s.flood_max_sends,
        drain: Duration::from_secs_f64(s.drain_s),
        connect_timeout: Duration::from_secs_f64(s.connect_timeout_s),
    };
    let mut flooder = match Flooder::start(flood_plan).await {
        Ok(f) => f,
        Err(e) => {
            fleet.close(Duration::from_secs(15)).await;
            return Err(e.context("starting the flooder"));
        }
    };
    // The fleet's schedule starts 100 ms after it is told; so does the
    // flood, and both end together.
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(s.phase_s());
    flooder.go(start, end);
    tracing::info!("phase b: quiet clients and the flooder");
    let with_flooder = fleet.traffic(&traffic).await;
    let flooder_report = flooder
        .finish(Duration::from_secs_f64(s.drain_s) + Duration::from_secs(30))
        .await;

    let connected = fleet.connected();
    let connect_failures = fleet.connect_failures().clone();
    let disconnects = fleet.disconnects();
    fleet.close(Duration::from_secs(15)).await;
    let flooder_report = flooder_report?;
    let mut verdict = verdict(&quiet_only, &with_flooder, &flooder_report, s.max_ratio);
    if connected < n {
        verdict
            .failures
            .push(format!("only {connected} of {n} quiet connections opened"));
        verdict.pass = false;
        verdict.quiet_ok = false;
    }
    Ok(FloodReport {
        tool: tool(),
        date: crate::sys::utc_now(),
        machine: Machine::detect(),
        command: options.command.clone(),
        target: format!("ws://{}{}", target.authority, target.path),
        started_server: options.url.is_none(),
        chat_args: options.chat_args.clone(),
        settings: s.clone(),
        connected,
        connect_failures,
        disconnects,
        quiet_only,
        with_flooder,
        flooder: flooder_report,
        ok: verdict.pass,
        verdict,
        series: recorder.series(),
    })
}

/// What the flooder is to do.
#[derive(Debug, Clone)]
struct FlooderPlan {
    target: Target,
    user: String,
    room: String,
    run: u16,
    /// Its connection index in message ids (none of the quiet ones).
    conn: u32,
    body: usize,
    inflight: u64,
    max_sends: u64,
    drain: Duration,
    connect_timeout: Duration,
}

/// The flooder's thread, connected and waiting for [`Flooder::go`].
struct Flooder {
    go: Option<oneshot::Sender<(Instant, Instant)>>,
    result: oneshot::Receiver<FlooderReport>,
    thread: std::thread::JoinHandle<()>,
}

impl Flooder {
    /// Starts the thread and its runtime, and connects.
    async fn start(plan: FlooderPlan) -> anyhow::Result<Flooder> {
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let (go_tx, go_rx) = oneshot::channel::<(Instant, Instant)>();
        let (result_tx, result_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("flooder".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _gone = ready_tx.send(Err(format!("runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let ws_config = WebSocketConfig::default().max_message_size(Some(1 << 20));
                    let source = plan.target.source_for(0, 1);
                    let opened = tokio::time::timeout(
                        plan.connect_timeout,
                        open(&plan.target, source, &plan.user, &plan.room, ws_config),
                    )
                    .await
                    .unwrap_or(Err("timeout"));
                    let ws = match opened {
                        Ok(ws) => ws,
                        Err(what) => {
                            let _gone = ready_tx.send(Err(format!("connecting: {what}")));
                            return;
                        }
                    };
                    if ready_tx.send(Ok(())).is_err() {
                        return;
                    }
                    let Ok((start, end)) = go_rx.await else {
                        return;
                    };
                    let report = run_flood(ws, &plan, start, end).await;
                    let _gone = result_tx.send(report);
                });
            })
            .context("starting the flooder's thread")?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Flooder {
                go: Some(go_tx),
                result: result_rx,
                thread,
            }),
            Ok(Err(e)) => bail!("the flooder could not start: {e}"),
            Err(_) => bail!("the flooder's thread ended before connecting"),
        }
    }

    /// Floods from `start` to `end` (once).
    fn go(&mut self, start: Instant, end: Instant) {
        if let Some(go) = self.go.take() {
            let _thread_gone = go.send((start, end));
        }
    }

    /// Waits (up to `limit`) for the flooder's report.
    async fn finish(self, limit: Duration) -> anyhow::Result<FlooderReport> {
        let report = tokio::time::timeout(limit, self.result).await;
        let thread = self.thread;
        let _joined = tokio::task::spawn_blocking(move || thread.join()).await;
        match report {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => bail!("the flooder's thread ended without a report"),
            Err(_) => bail!("the flooder did not finish in time"),
        }
    }
}

/// Counters shared by the flooder's reader and writer.
#[derive(Default)]
struct FloodCounts {
    acked: AtomicU64,
    rate_limited: AtomicU64,
    /// Acks and errors with an id: answers to sends.
    answered: AtomicU64,
    deliveries: AtomicU64,
    other_errors: Mutex<BTreeMap<String, u64>>,
    lost: Mutex<Option<String>>,
}

/// Most flood sends written before one flush.
const FLOOD_BURST: u64 = 256;

/// Floods from `start` to `end`, then waits for the answers in flight (up
/// to the drain) and closes.
async fn run_flood(ws: Ws, plan: &FlooderPlan, start: Instant, end: Instant) -> FlooderReport {
    let (mut sink, mut stream) = ws.split();
    let counts = Arc::new(FloodCounts::default());
    let answers = Arc::new(Notify::new());
    let gone = CancellationToken::new();
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (counts, answers, gone, closing) = (
            counts.clone(),
            answers.clone(),
            gone.clone(),
            closing.clone(),
        );
        tokio::spawn(async move {
            let why = loop {
                match Read::of(stream.next().await) {
                    Read::Text(text) => {
                        flood_receive(&counts, &text);
                        answers.notify_one();
                    }
                    Read::Other => {}
                    Read::Ended(why) => break why,
                }
            };
            if !closing.load(Ordering::Relaxed) {
                *counts.lost.lock().unwrap() = Some(why);
            }
            gone.cancel();
        })
    };

    let body = "x".repeat(plan.body.clamp(1, schemas::protocol::MAX_BODY_BYTES));
    let head = format!(r#"{{"type":"send","room":"{}","id":""#, plan.room);
    let tail = format!(r#"","body":"{body}"}}"#);
    tokio::time::sleep_until(start.into()).await;
    let first = Instant::now();
    let mut sent: u64 = 0;
    let mut write_error = None;
    'flood: while sent < plan.max_sends && Instant::now() < end && !gone.is_cancelled() {
        let inflight = sent.saturating_sub(counts.answered.load(Ordering::Relaxed));
        if inflight >= plan.inflight {
            tokio::select! {
                _ = answers.notified() => {}
                _ = tokio::time::sleep_until(end.into()) => {}
                _ = gone.cancelled() => {}
            }
            continue;
        }
        let batch = (plan.inflight - inflight)
            .min(FLOOD_BURST)
            .min(plan.max_sends - sent);
        for _ in 0..batch {
            let id = MsgId {
                run: plan.run,
                phase: 0,
                conn: plan.conn,
                seq: sent as u32,
                intended_us: 0,
            }
            .encode();
            let mut text = String::with_capacity(head.len() + id.len() + tail.len());
            text.push_str(&head);
            text.push_str(&id);
            text.push_str(&tail);
            if let Err(e) = sink.feed(Message::text(text)).await {
                write_error = Some(format!("write error: {e}"));
                break 'flood;
            }
            sent += 1;
        }
        if let Err(e) = sink.flush().await {
            write_error = Some(format!("write error: {e}"));
            break;
        }
        // Let the reader in on this one-thread runtime.
        tokio::task::yield_now().await;
    }
    let send_seconds = first.elapsed().as_secs_f64();

    // The answers to what is in flight.
    let drain_until = tokio::time::Instant::now() + plan.drain;
    while counts.answered.load(Ordering::Relaxed) < sent && !gone.is_cancelled() {
        tokio::select! {
            _ = answers.notified() => {}
            _ = tokio::time::sleep_until(drain_until) => break,
            _ = gone.cancelled() => {}
        }
    }
    closing.store(true, Ordering::Relaxed);
    let _closed =
        tokio::time::timeout(Duration::from_secs(5), sink.send(Message::Close(None))).await;
    let _reader_ended = tokio::time::timeout(Duration::from_secs(5), reader).await;

    let answered = counts.answered.load(Ordering::Relaxed);
    let lost = counts.lost.lock().unwrap().clone().or(write_error);
    let other_errors = counts.other_errors.lock().unwrap().clone();
    FlooderReport {
        user: plan.user.clone(),
        sent,
        acked: counts.acked.load(Ordering::Relaxed),
        rate_limited: counts.rate_limited.load(Ordering::Relaxed),
        other_errors,
        unanswered: sent.saturating_sub(answered),
        deliveries: counts.deliveries.load(Ordering::Relaxed),
        send_seconds,
        sent_per_s: sent as f64 / send_seconds.max(1e-6),
        lost,
    }
}

/// Counts one frame the flooder received.
fn flood_receive(counts: &FloodCounts, text: &str) {
    let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
        *counts
            .other_errors
            .lock()
            .unwrap()
            .entry("unparsable_frame".to_owned())
            .or_default() += 1;
        return;
    };
    match frame.kind.as_ref() {
        "ack" => {
            counts.acked.fetch_add(1, Ordering::Relaxed);
            counts.answered.fetch_add(1, Ordering::Relaxed);
        }
        "error" => {
            // An error without an id answers no send.
            if frame.id.is_some() {
                counts.answered.fetch_add(1, Ordering::Relaxed);
            }
            match frame.code.as_deref() {
                Some("rate_limited") if frame.id.is_some() => {
                    counts.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                code => {
                    *counts
                        .other_errors
                        .lock()
                        .unwrap()
                        .entry(code.unwrap_or("unknown").to_owned())
                        .or_default() += 1;
                }
            }
        }
        "message" => {
            counts.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Check;

    fn phase(p99_ms: f64, sent: u64) -> PhaseReport {
        PhaseReport {
            ack_latency: Percentiles {
                count: sent,
                p99_ms,
                ..Default::default()
            },
            check: Check {
                sent,
                acked: sent,
                ok: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn limited() -> FlooderReport {
        FlooderReport {
            sent: 100_000,
            acked: 700,
            rate_limited: 99_300,
            ..Default::default()
        }
    }

    #[test]
    fn the_ratio_passes_up_to_the_bound() {
        let v = verdict(&phase(4.0, 3000), &phase(8.0, 3000), &limited(), 2.0);
        assert_eq!(v.p99_ratio, Some(2.0));
        assert!(v.pass && v.quiet_ok && v.flood_limited, "{v:?}");
        assert!(v.failures.is_empty());
        let v = verdict(&phase(4.0, 3000), &phase(8.4, 3000), &limited(), 2.0);
        assert!((v.p99_ratio.unwrap() - 2.1).abs() < 1e-9);
        assert!(!v.pass && v.quiet_ok);
        assert!(v.failures[0].contains("2.10x"), "{v:?}");
        // Faster with the flooder is fine.
        assert!(verdict(&phase(4.0, 10), &phase(1.0, 10), &limited(), 2.0).pass);
    }

    #[test]
    fn a_refused_or_lost_quiet_send_fails_whatever_the_ratio() {
        let mut b = phase(4.0, 3000);
        b.check.rejected = 1;
        b.check.acked -= 1;
        b.check.ok = false;
        b.errors.insert("rate_limited".into(), 1);
        let v = verdict(&phase(4.0, 3000), &b, &limited(), 2.0);
        assert!(!v.pass && !v.quiet_ok);
        assert!(v
            .failures
            .iter()
            .any(|f| f.contains("1 quiet sends refused")));

        let mut a = phase(4.0, 3000);
        a.check.unacked = 2;
        a.check.missing = 1;
        a.check.ok = false;
        assert_eq!(quiet_lost(&a), 3);
        let v = verdict(&a, &phase(4.0, 3000), &limited(), 2.0);
        assert!(!v.pass && !v.quiet_ok);
        assert!(v.failures.iter().any(|f| f.contains("3 quiet sends lost")));
    }

    #[test]
    fn a_flood_never_limited_or_no_baseline_fails() {
        let unlimited = FlooderReport {
            sent: 5000,
            acked: 5000,
            ..Default::default()
        };
        let v = verdict(&phase(4.0, 3000), &phase(4.0, 3000), &unlimited, 2.0);
        assert!(!v.pass && v.quiet_ok && !v.flood_limited);
        assert!(v.failures[0].contains("limits off"), "{v:?}");
        let v = verdict(&phase(0.0, 0), &phase(4.0, 3000), &limited(), 2.0);
        assert_eq!(v.p99_ratio, None);
        assert!(!v.pass && !v.quiet_ok);
        let mut lost = limited();
        lost.lost = Some("close 4008".into());
        assert!(!verdict(&phase(4.0, 10), &phase(4.0, 10), &lost, 2.0).pass);
    }

    #[test]
    fn flood_frames_are_counted_by_what_they_answer() {
        let c = FloodCounts::default();
        let id = MsgId {
            run: 1,
            phase: 0,
            conn: 50,
            seq: 3,
            intended_us: 0,
        }
        .encode();
        flood_receive(
            &c,
            &format!(r#"{{"type":"ack","id":"{id}","room":"r","offset":1,"epoch":"e"}}"#),
        );
        flood_receive(
            &c,
            &format!(
                r#"{{"type":"error","code":"rate_limited","message":"slow down","id":"{id}","retry_after_ms":50}}"#
            ),
        );
        flood_receive(
            &c,
            r#"{"type":"error","code":"bad_frame","message":"no id"}"#,
        );
        flood_receive(
            &c,
            &format!(r#"{{"type":"message","id":"{id}","room":"r","body":"x"}}"#),
        );
        flood_receive(&c, "not json");
        assert_eq!(c.acked.load(Ordering::Relaxed), 1);
        assert_eq!(c.rate_limited.load(Ordering::Relaxed), 1);
        assert_eq!(c.answered.load(Ordering::Relaxed), 2);
        assert_eq!(c.deliveries.load(Ordering::Relaxed), 1);
        let other = c.other_errors.lock().unwrap().clone();
        assert_eq!(other["bad_frame"], 1);
        assert_eq!(other["unparsable_frame"], 1);
    }

    #[test]
    fn settings_are_bounded() {
        let s = FloodSettings::default();
        s.validate().unwrap();
        assert_eq!(s.quiet_total_rate(), 100.0);
        assert!(s.deadline() > Duration::from_secs(64));
        for bad in [
            FloodSettings {
                quiet_connections: 0,
                ..s.clone()
            },
            FloodSettings {
                quiet_rate: 0.0,
                ..s.clone()
            },
            FloodSettings {
                flood_inflight: MAX_FLOOD_INFLIGHT + 1,
                ..s.clone()
            },
            FloodSettings {
                body: 5000,
                ..s.clone()
            },
            FloodSettings {
                seconds: f64::INFINITY,
                ..s.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
