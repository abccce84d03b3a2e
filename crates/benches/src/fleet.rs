//! A fleet of WebSocket clients speaking the client protocol
//! (docs/protocol.md) to one gateway, and the traffic phases it runs.
//!
//! Connection `i` joins room `i % rooms`; the first `senders` connections
//! also send into their room. Each connection has two tasks, both owned by
//! the fleet's tracker: a reader that records every frame it receives, and a
//! writer that runs the send schedule of a phase when told to. Nothing is
//! kept per message: ids carry the intended send time (see [`crate::ids`]).
//!
//! Rate control is open loop: sender `k` of `S` is meant to send its `n`th
//! message of a phase at `start + (k / S + n) * S / rate`. A sender that falls
//! behind (a stalled socket, a busy machine) sends what is due at once, and
//! latency still counts from the intended time, so stalls are not hidden.
//!
//! After a phase's schedule ends, the fleet waits (up to the drain timeout)
//! until every message sent is answered and every acked message has reached
//! every member of its room, then checks exactly that.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ids::MsgId;
use crate::stats::{Counted, Percentiles, Recorder};
use crate::target::{auto_sources, Target};

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// How a fleet connects.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub target: Target,
    pub connections: usize,
    pub rooms: usize,
    /// The first `senders` connections send.
    pub senders: usize,
    /// Loopback source addresses to spread connections over; 0 picks one
    /// per 10,000 connections.
    pub sources: usize,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// Deadline of one connection's TCP connect, upgrade, welcome and join.
    pub connect_timeout: Duration,
    /// Interval of the time series.
    pub interval: Duration,
    /// Server process to read RSS and CPU time from.
    pub server_pid: Option<u32>,
    /// Draw progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Read buffer of each client socket; small, since most clients idle.
    pub read_buffer: usize,
}

/// One traffic phase.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Traffic {
    /// Messages per second offered by all senders together.
    pub rate: f64,
    /// Body size in bytes (1 to 4096).
    pub body: usize,
    /// Sending before the measurement window starts.
    pub warmup_s: f64,
    /// Length of the measurement window.
    pub duration_s: f64,
    /// Longest wait after the schedule for answers and deliveries.
    pub drain_s: f64,
}

/// What the fleet checks after a phase: every message sent was answered,
/// every acked message reached every member of its room once and in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub sent: u64,
    pub acked: u64,
    /// Refused with an `error` frame.
    pub rejected: u64,
    /// Neither acked nor refused by the end of the drain.
    pub unacked: u64,
    /// Deliveries the acks call for: each acked message times its room's
    /// members (the sender included).
    pub expected_deliveries: u64,
    pub delivered: u64,
    /// Acked messages a connected member did not get.
    pub missing: u64,
    /// Acked messages members the server closed (slow consumers) did not
    /// get; the protocol has them resume with `since` (docs/protocol.md).
    pub missing_closed: u64,
    /// Delivered but never acked.
    pub unexpected: u64,
    /// Delivered twice or out of order.
    pub misordered: u64,
    /// Connections the server closed or lost.
    pub disconnected: u64,
    pub ok: bool,
}

impl Check {
    /// What was acked reached every connected member once and in order,
    /// and nothing unacked was delivered. An overloaded phase may still
    /// time out or close slow consumers; it must never break this.
    pub fn correct(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.misordered == 0
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseReport {
    pub phase: u8,
    pub traffic: Option<Traffic>,
    pub connections: usize,
    pub rooms: usize,
    pub senders: usize,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub ack_latency: Percentiles,
    pub e2e_latency: Percentiles,
    pub errors: BTreeMap<String, u64>,
    pub stale_frames: u64,
    pub check: Check,
    /// Cores the server used on average over the measurement window.
    pub server_cpu: Option<f64>,
    /// Cores the load generator used over the measurement window.
    pub client_cpu: f64,
    pub server_rss_bytes: Option<u64>,
}

/// A connection as the fleet sees it.
struct Conn {
    index: u32,
    room: usize,
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    tracks: Mutex<Tracks>,
    /// Why the connection ended, when the server ended it.
    lost: Mutex<Option<String>>,
    closing: AtomicBool,
}

/// Per sender, what this connection received of it in the current phase.
#[derive(Default)]
struct Tracks {
    from: HashMap<u32, Track>,
    misordered: u64,
}

#[derive(Clone, Copy)]
struct Track {
    last_seq: u32,
    count: u64,
}

impl Conn {
    fn reset(&self) {
        self.sent.store(0, Ordering::Relaxed);
        self.acked.store(0, Ordering::Relaxed);
        self.rejected.store(0, Ordering::Relaxed);
        *self.tracks.lock().unwrap() = Tracks::default();
    }

    fn inflight(&self) -> u64 {
        let answered = self.acked.load(Ordering::Relaxed) + self.rejected.load(Ordering::Relaxed);
        self.sent.load(Ordering::Relaxed).saturating_sub(answered)
    }

    fn is_lost(&self) -> bool {
        self.lost.lock().unwrap().is_some()
    }
}

/// A phase's send schedule for one sender.
struct SendPlan {
    phase: u8,
    first: Instant,
    period: Duration,
    end: Instant,
    frame_head: Arc<str>,
    frame_tail: Arc<str>,
}

enum Cmd {
    Traffic(SendPlan, oneshot::Sender<()>),
    Close,
}

/// Connected clients and the tasks that drive them.
pub struct Fleet {
    config: FleetConfig,
    recorder: Arc<Recorder>,
    conns: Vec<Arc<Conn>>,
    cmds: Vec<mpsc::Sender<Cmd>>,
    rooms: Vec<String>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    ticker_stop: CancellationToken,
    connect_failures: BTreeMap<String, u64>,
    phase: u8,
    bar: ProgressBar,
}

/// Frames a client receives; other fields are skipped.
#[derive(Deserialize)]
pub(crate) struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub(crate) id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(crate) code: Option<Cow<'a, str>>,
}

fn bar(enabled: bool, len: u64, template: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

impl Fleet {
    /// Opens every connection (failures are counted, not fatal) and joins
    /// each to its room.
    pub async fn connect(config: FleetConfig, recorder: Arc<Recorder>) -> Fleet {
        let run = recorder.run();
        let rooms: Vec<String> = (0..config.rooms.max(1))
            .map(|r| room_name(run, r))
            .collect();
        let sources = match config.sources {
            0 => auto_sources(config.connections),
            n => n,
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer)
            .max_message_size(Some(1 << 20));
        let mut fleet = Fleet {
            bar: bar(
                config.progress,
                config.connections as u64,
                "connecting {bar:40} {pos}/{len} {msg}",
            ),
            config,
            recorder,
            conns: Vec::new(),
            cmds: Vec::new(),
            rooms,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            ticker_stop: CancellationToken::new(),
            connect_failures: BTreeMap::new(),
            phase: 0,
        };
        let (target, rooms, timeout) = (
            fleet.config.target.clone(),
            fleet.rooms.clone(),
            fleet.config.connect_timeout,
        );
        let opens = futures::stream::iter(0..fleet.config.connections)
            .map(|i| {
                let target = target.clone();
                let room = rooms[i % rooms.len()].clone();
                let source = target.source_for(i, sources);
                async move {
                    let user = format!("load-{run:04x}-{i}");
                    let opened = tokio::time::timeout(
                        timeout,
                        open(&target, source, &user, &room, ws_config),
                    )
                    .await
                    .unwrap_or(Err("timeout"));
                    (i, opened)
                }
            })
            .buffer_unordered(fleet.config.connect_concurrency.max(1));
        let mut opens = std::pin::pin!(opens);
        while let Some((i, opened)) = opens.next().await {
            fleet.bar.inc(1);
            match opened {
                Ok(ws) => fleet.start(i, ws),
                Err(kind) => {
                    *fleet.connect_failures.entry(kind.to_owned()).or_default() += 1;
                }
            }
        }
        fleet.bar.finish_and_clear();
        fleet.spawn_ticker();
        fleet
    }

    /// Spawns the reader and writer of an open connection.
    fn start(&mut self, index: usize, ws: Ws) {
        let conn = Arc::new(Conn {
            index: index as u32,
            room: index % self.rooms.len(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            tracks: Mutex::new(Tracks::default()),
            lost: Mutex::new(None),
            closing: AtomicBool::new(false),
        });
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(2);
        self.tasks.spawn(reader(
            stream,
            conn.clone(),
            self.recorder.clone(),
            self.cancel.clone(),
        ));
        self.tasks.spawn(writer(
            sink,
            conn.clone(),
            self.recorder.clone(),
            rx,
            self.cancel.clone(),
        ));
        self.conns.push(conn);
        self.cmds.push(tx);
    }

    fn spawn_ticker(&mut self) {
        let recorder = self.recorder.clone();
        let stop = self.ticker_stop.clone();
        let interval = self.config.interval;
        let pid = self.config.server_pid;
        let bar = self.bar.clone();
        self.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {
                        let p = recorder.tick(pid);
                        bar.set_message(format!(
                            "acks/s {:.0}  deliveries/s {:.0}  ack p99 {:.1} ms  e2e p99 {:.1} ms",
                            p.acks_per_s, p.deliveries_per_s, p.ack_p99_ms, p.e2e_p99_ms
                        ));
                    }
                }
            }
            recorder.tick(pid);
        });
    }

    /// Connections open (joined to their room).
    pub fn connected(&self) -> usize {
        self.conns.len()
    }

    /// Connections that could not be opened, by what failed.
    pub fn connect_failures(&self) -> &BTreeMap<String, u64> {
        &self.connect_failures
    }

    /// Connections the server closed or lost so far, by reason.
    pub fn disconnects(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in &self.conns {
            if let Some(why) = c.lost.lock().unwrap().clone() {
                *out.entry(why).or_default() += 1;
            }
        }
        out
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    pub fn senders(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| (c.index as usize) < self.config.senders)
            .count()
    }

    /// Waits `hold` with every connection idle, the time series running.
    pub async fn hold(&self, hold: Duration) {
        let bar = bar(
            self.config.progress,
            hold.as_millis() as u64,
            "holding {bar:40} {elapsed}/{duration} {msg}",
        );
        let deadline = tokio::time::Instant::now() + hold;
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.cancel.cancelled() => break,
            }
            bar.set_position(
                hold.as_millis() as u64
                    - (deadline - tokio::time::Instant::now()).as_millis() as u64,
            );
        }
        bar.finish_and_clear();
    }

    /// Runs one traffic phase and checks it.
    pub async fn traffic(&mut self, traffic: &Traffic) -> PhaseReport {
        self.phase = self.phase.wrapping_add(1);
        let phase = self.phase;
        for c in &self.conns {
            c.reset();
        }
        let senders: Vec<usize> = (0..self.conns.len())
            .filter(|&i| {
                (self.conns[i].index as usize) < self.config.senders && !self.conns[i].is_lost()
            })
            .collect();
        let total = traffic.warmup_s + traffic.duration_s;
        // Every sender starts from one base, a little ahead so none is late.
        let base = Instant::now() + Duration::from_millis(100);
        let window_start = base + Duration::from_secs_f64(traffic.warmup_s);
        let end = base + Duration::from_secs_f64(total);
        self.recorder
            .begin_phase(phase, window_start, end, traffic.rate);
        let cpu_at = |pid| crate::sys::cpu_seconds(pid);
        let bar = bar(
            self.config.progress,
            (total * 1000.0) as u64,
            "phase {prefix} {bar:40} {elapsed}/{duration} {msg}",
        );
        bar.set_prefix(format!("{phase} @ {:.0} msg/s", traffic.rate));
        let body = "x".repeat(traffic.body.clamp(1, schemas::protocol::MAX_BODY_BYTES));
        let mut done = Vec::new();
        if traffic.rate > 0.0 && !senders.is_empty() {
            let n = senders.len() as f64;
            let period = Duration::from_secs_f64(n / traffic.rate);
            for (k, &i) in senders.iter().enumerate() {
                let room = &self.rooms[self.conns[i].room];
                let plan = SendPlan {
                    phase,
                    first: base + period.mul_f64(k as f64 / n),
                    period,
                    end,
                    frame_head: format!(r#"{{"type":"send","room":"{room}","id":""#).into(),
                    frame_tail: format!(r#"","body":"{body}"}}"#).into(),
                };
                let (tx, rx) = oneshot::channel();
                if self.cmds[i].send(Cmd::Traffic(plan, tx)).await.is_ok() {
                    done.push(rx);
                }
            }
        }
        // Measure CPU over the window only.
        let pid = self.config.server_pid;
        tokio::time::sleep_until(window_start.into()).await;
        let (server_cpu0, client_cpu0) = (cpu_at(pid), cpu_at(None).unwrap_or(0.0));
        let bar_ticker = {
            let bar = bar.clone();
            let total_ms = (total * 1000.0) as u64;
            let stop = self.cancel.child_token();
            let stop2 = stop.clone();
            self.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            bar.set_position((base.elapsed().as_millis() as u64).min(total_ms));
                        }
                    }
                }
            });
            stop2
        };
        tokio::time::sleep_until(end.into()).await;
        let (server_cpu1, client_cpu1) = (cpu_at(pid), cpu_at(None).unwrap_or(0.0));
        let window = traffic.duration_s.max(1e-6);
        for rx in done {
            let _finished = rx.await;
        }
        self.recorder.schedule_done();
        bar.set_prefix(format!("{phase} draining"));
        self.drain(Duration::from_secs_f64(traffic.drain_s)).await;
        bar_ticker.cancel();
        bar.finish_and_clear();
        let totals = self.recorder.end_phase();
        let check = self.check();
        PhaseReport {
            phase,
            traffic: Some(traffic.clone()),
            connections: self.conns.len(),
            rooms: self.rooms.len(),
            senders: senders.len(),
            acked_per_s: totals.acks_in_window as f64 / window,
            delivered_per_s: totals.deliveries_in_window as f64 / window,
            ack_latency: Percentiles::of(&totals.ack),
            e2e_latency: Percentiles::of(&totals.e2e),
            errors: totals.errors.clone(),
            stale_frames: totals.stale,
            check,
            server_cpu: match (server_cpu0, server_cpu1) {
                (Some(a), Some(b)) => Some((b - a) / window),
                _ => None,
            },
            client_cpu: (client_cpu1 - client_cpu0) / window,
            server_rss_bytes: pid.and_then(|p| crate::sys::rss_bytes(Some(p))),
        }
    }

    /// Waits until nothing is in flight and every acked message is
    /// delivered, or `limit` passes.
    async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let c = self.check();
            let settled = c.unacked == 0
                && c.delivered + c.unexpected + c.missing_closed >= c.expected_deliveries;
            if settled || tokio::time::Instant::now() >= deadline || self.cancel.is_cancelled() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Checks the current phase from what each connection counted.
    fn check(&self) -> Check {
        let mut c = Check::default();
        let mut members: Vec<Vec<&Conn>> = vec![Vec::new(); self.rooms.len()];
        for conn in &self.conns {
            members[conn.room].push(conn);
        }
        for room in &members {
            let senders: Vec<&Conn> = room
                .iter()
                .copied()
                .filter(|s| (s.index as usize) < self.config.senders)
                .collect();
            for s in &senders {
                c.sent += s.sent.load(Ordering::Relaxed);
                c.acked += s.acked.load(Ordering::Relaxed);
                c.rejected += s.rejected.load(Ordering::Relaxed);
                c.unacked += s.inflight();
            }
            for receiver in room {
                let lost = receiver.is_lost();
                let tracks = receiver.tracks.lock().unwrap();
                c.misordered += tracks.misordered;
                for s in &senders {
                    let acked = s.acked.load(Ordering::Relaxed);
                    let got = tracks.from.get(&s.index).map_or(0, |t| t.count);
                    c.expected_deliveries += acked;
                    c.delivered += got.min(acked);
                    if lost {
                        c.missing_closed += acked.saturating_sub(got);
                    } else {
                        c.missing += acked.saturating_sub(got);
                    }
                    c.unexpected += got.saturating_sub(acked);
                }
            }
        }
        c.disconnected = self.conns.iter().filter(|c| c.is_lost()).count() as u64;
        c.ok = c.correct()
            && c.unacked == 0
            && c.missing_closed == 0
            && c.rejected == 0
            && c.disconnected == 0;
        c
    }

    /// Closes every connection (close frame, then waits for the server's
    /// close) and stops every task, within `limit`.
    pub async fn close(self, limit: Duration) {
        for c in &self.conns {
            c.closing.store(true, Ordering::Relaxed);
        }
        for tx in &self.cmds {
            let _queued_or_closing = tx.try_send(Cmd::Close);
        }
        self.ticker_stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not close in time; dropping them");
            self.cancel.cancel();
            self.tasks.wait().await;
        }
    }

    /// Stops everything at once (a deadline passed, Ctrl-C).
    pub fn abort(&self) {
        self.cancel.cancel();
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// The name of room `r` of run `run`; connection `i` joins room `i % rooms`.
pub fn room_name(run: u16, r: usize) -> String {
    format!("load-{run:04x}-{r}")
}

/// Connects from `source`, upgrades, reads `welcome`, joins `room`.
pub(crate) async fn open(
    target: &Target,
    source: Option<std::net::SocketAddr>,
    user: &str,
    room: &str,
    config: WebSocketConfig,
) -> Result<Ws, &'static str> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|_| "socket")?;
    if let Some(source) = source {
        // Reuse lets a port still in TIME_WAIT from an earlier run be bound.
        socket.set_reuseaddr(true).map_err(|_| "socket")?;
        socket.bind(source).map_err(|_| "bind")?;
    }
    let stream = socket.connect(target.addr).await.map_err(|_| "connect")?;
    stream.set_nodelay(true).map_err(|_| "socket")?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(target.ws_url(user), stream, Some(config))
            .await
            .map_err(|_| "upgrade")?;
    expect_frame(&mut ws, "welcome").await?;
    let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
    ws.send(Message::text(join)).await.map_err(|_| "join")?;
    expect_frame(&mut ws, "joined").await?;
    Ok(ws)
}

async fn expect_frame(ws: &mut Ws, kind: &'static str) -> Result<(), &'static str> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Incoming = serde_json::from_str(&text).map_err(|_| kind)?;
                if frame.kind == kind {
                    return Ok(());
                }
                if frame.kind == "error" {
                    return Err(kind);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err(kind),
            Some(Ok(_)) => {}
        }
    }
}

/// One read of a connection: a text frame, another frame, or the end of
/// the connection and why (a close and its code, an error, the end).
pub(crate) enum Read {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Other,
    Ended(String),
}

impl Read {
    pub(crate) fn of(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Read {
        match msg {
            Some(Ok(Message::Text(text))) => Read::Text(text),
            Some(Ok(Message::Close(frame))) => Read::Ended(frame.map_or("close".to_owned(), |f| {
                format!("close {}", u16::from(f.code))
            })),
            Some(Ok(_)) => Read::Other,
            Some(Err(e)) => Read::Ended(format!("read error: {e}")),
            None => Read::Ended("eof".to_owned()),
        }
    }
}

/// Records every frame the connection receives until it closes.
async fn reader(
    mut stream: SplitStream<Ws>,
    conn: Arc<Conn>,
    recorder: Arc<Recorder>,
    cancel: CancellationToken,
) {
    let lost = loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            msg = stream.next() => msg,
        };
        match Read::of(msg) {
            Read::Text(text) => receive(&conn, &recorder, &text),
            Read::Other => {}
            Read::Ended(why) => break why,
        }
    };
    if !conn.closing.load(Ordering::Relaxed) {
        *conn.lost.lock().unwrap() = Some(lost);
    }
}

fn receive(conn: &Conn, recorder: &Recorder, text: &str) {
    let now_us = recorder.now_us();
    let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
        recorder.error("unparsable_frame", None);
        return;
    };
    let id = frame.id.as_deref().and_then(MsgId::decode);
    match frame.kind.as_ref() {
        "ack" => {
            if let Some(id) = id {
                if recorder.ack(&id, now_us) == Counted::Yes {
                    conn.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        "message" => {
            if let Some(id) = id {
                if recorder.delivery(&id, now_us) == Counted::Yes {
                    let mut tracks = conn.tracks.lock().unwrap();
                    let track = tracks.from.get(&id.conn).copied();
                    match track {
                        Some(t) if id.seq <= t.last_seq => tracks.misordered += 1,
                        _ => {
                            let count = track.map_or(0, |t| t.count) + 1;
                            tracks.from.insert(
                                id.conn,
                                Track {
                                    last_seq: id.seq,
                                    count,
                                },
                            );
                        }
                    }
                }
            }
        }
        "error" => {
            let code = frame.code.as_deref().unwrap_or("unknown");
            if recorder.error(code, id.as_ref()) == Counted::Yes && id.is_some() {
                conn.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {}
    }
}

/// Runs send schedules when told, and closes the connection at the end.
async fn writer(
    mut sink: SplitSink<Ws, Message>,
    conn: Arc<Conn>,
    recorder: Arc<Recorder>,
    mut cmds: mpsc::Receiver<Cmd>,
    cancel: CancellationToken,
) {
    loop {
        let cmd = tokio::select! {
            _ = cancel.cancelled() => return,
            cmd = cmds.recv() => cmd,
        };
        match cmd {
            Some(Cmd::Traffic(plan, done)) => {
                let sent = tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = send_schedule(&mut sink, &conn, &recorder, plan) => sent,
                };
                let _receiver_gone = done.send(());
                if sent.is_err() {
                    // The socket is gone; the reader records why.
                    return;
                }
            }
            Some(Cmd::Close) | None => {
                let _sent = sink.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Most messages written before one flush.
const MAX_BURST: usize = 256;

async fn send_schedule(
    sink: &mut SplitSink<Ws, Message>,
    conn: &Conn,
    recorder: &Recorder,
    plan: SendPlan,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let run = recorder.run();
    let mut seq: u32 = 0;
    let intended = |seq: u32| plan.first + plan.period.mul_f64(seq as f64);
    loop {
        let next = intended(seq);
        if next >= plan.end {
            return Ok(());
        }
        if next > Instant::now() {
            tokio::time::sleep_until(next.into()).await;
        }
        // Everything due now goes out in one write.
        let now = Instant::now();
        let mut burst = 0;
        while burst < MAX_BURST {
            let at = intended(seq);
            if at > now || at >= plan.end {
                break;
            }
            let id = MsgId {
                run,
                phase: plan.phase,
                conn: conn.index,
                seq,
                intended_us: recorder.at_us(at),
            }
            .encode();
            let mut text =
                String::with_capacity(plan.frame_head.len() + id.len() + plan.frame_tail.len());
            text.push_str(&plan.frame_head);
            text.push_str(&id);
            text.push_str(&plan.frame_tail);
            sink.feed(Message::text(text)).await?;
            conn.sent.fetch_add(1, Ordering::Relaxed);
            recorder.sent();
            seq += 1;
            burst += 1;
        }
        sink.flush().await?;
    }
}
