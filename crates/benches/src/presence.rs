//! `presence-load`: what presence costs. Starts a Kafka-protocol test
//! broker (tansu; or uses `--broker`) and `--gateways` `chat serve`
//! gateways on it, opens `--connections` WebSocket connections spread over
//! them, one user each, in `--rooms` rooms, each watching its room's
//! presence; then for `--seconds` every connection moves to another room
//! after a random dwell in `--dwell-ms`. Measures, per second of churn:
//! room changes, notices and bytes the gateways put on the ephemeral
//! channel, presence frames the clients got, and the CPU of the gateways
//! and the broker. Then closes every connection and checks that presence
//! returns to empty on every gateway (the `presence_entries` gauge, and
//! `GET /rooms/{room}/presence` of every room), within `--settle`.
//!
//! Bounded: a fixed number of connections, a fixed churn time, a settle
//! deadline; every process it starts is killed by PID at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::compare::Server;
use crate::sys;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "presence-load", about = "Measures presence across gateways")]
pub struct Args {
    /// The chat binary (default: next to this one).
    #[arg(long)]
    pub chat_bin: Option<PathBuf>,
    /// An existing broker (kafka://HOST:PORT); default: start tansu
    /// (TANSU_BIN) on a free port.
    #[arg(long)]
    pub broker: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    #[arg(long, default_value_t = 200)]
    pub rooms: usize,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// A connection stays in a room between these many milliseconds
    /// (uniform), then moves to another one.
    #[arg(long, default_value = "2000..8000", value_parser = parse_range)]
    pub dwell_ms: (u64, u64),
    /// Longest wait for presence to be empty after the connections close.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub settle: Duration,
    /// Where to write the report as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, got {s:?}"))?;
    let (a, b): (u64, u64) = (
        a.parse().map_err(|e| format!("{a:?}: {e}"))?,
        b.parse().map_err(|e| format!("{b:?}: {e}"))?,
    );
    if a == 0 || b < a {
        return Err(format!("{s:?}: need 0 < MIN <= MAX"));
    }
    Ok((a, b))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: sys::Machine,
    pub gateways: usize,
    pub connections: usize,
    pub rooms: usize,
    pub seconds: f64,
    pub dwell_ms: (u64, u64),
    /// Room changes (a leave and a join) the clients made, per second.
    pub moves_per_s: f64,
    /// Presence changes (join or leave frames) the clients received, per second.
    pub change_frames_per_s: f64,
    /// Notices all gateways sent on the ephemeral channel, per second.
    pub notices_per_s: f64,
    /// Bytes of those notices, per second.
    pub bytes_per_s: f64,
    /// Notices all gateways read from the channel, per second.
    pub notices_read_per_s: f64,
    /// CPU of each gateway, in cores (CPU seconds per second).
    pub gateway_cores: Vec<f64>,
    /// CPU of the broker, in cores (when this run started it).
    pub broker_cores: Option<f64>,
    /// Microseconds of gateway CPU per room change, all gateways together.
    pub gateway_cpu_us_per_move: f64,
    /// Most (room, user) entries a gateway held during the churn.
    pub entries_during: f64,
    /// Whether every gateway's presence was empty after the connections
    /// closed, and how long that took.
    pub empty_after_close: bool,
    pub settle_s: f64,
}

struct Counters {
    moves: AtomicU64,
    changes: AtomicU64,
}

/// The sum of the samples of `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET path` of `addr` (HTTP/1.0, so the body ends with the connection).
async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .context("an HTTP answer has a head")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// (sent, bytes, read) notices and the presence entries of a gateway.
async fn scrape(addr: &str) -> anyhow::Result<[f64; 4]> {
    let text = get(addr, "/metrics").await?;
    Ok([
        metric_sum(&text, fanout::metrics::PRESENCE_NOTICES_SENT_TOTAL),
        metric_sum(&text, fanout::metrics::PRESENCE_BYTES_SENT_TOTAL),
        metric_sum(&text, fanout::metrics::PRESENCE_NOTICES_RECEIVED_TOTAL),
        metric_sum(&text, fanout::metrics::PRESENCE_ENTRIES),
    ])
}

/// A small deterministic generator per connection (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn room(r: u64) -> String {
    format!("p{r}")
}

/// One connection: joins, watches, moves until `until`, then closes.
async fn client(
    addr: String,
    i: usize,
    args: Arc<Args>,
    until: tokio::time::Instant,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let url = format!("ws://{addr}/ws?user=u{i}");
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("connecting {url}"))?;
    let (mut tx, mut rx) = ws.split();
    let reader = {
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(t) = msg {
                    if t.contains(r#""type":"presence""#)
                        && (t.contains(r#""join":"#) || t.contains(r#""leave":"#))
                    {
                        counters.changes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
    let mut current = (i % args.rooms) as u64;
    let join = |r: u64| {
        [
            serde_json::json!({"type": "join", "room": room(r)}).to_string(),
            serde_json::json!({"type": "presence", "room": room(r)}).to_string(),
        ]
    };
    for f in join(current) {
        tx.send(Message::Text(f.into())).await?;
    }
    let (lo, hi) = args.dwell_ms;
    loop {
        let dwell = Duration::from_millis(lo + rng.below(hi - lo + 1));
        if tokio::time::Instant::now() + dwell >= until {
            break;
        }
        tokio::time::sleep(dwell).await;
        let next = (current + 1 + rng.below(args.rooms as u64 - 1)) % args.rooms as u64;
        let leave = serde_json::json!({"type": "leave", "room": room(current)}).to_string();
        tx.send(Message::Text(leave.into())).await?;
        for f in join(next) {
            tx.send(Message::Text(f.into())).await?;
        }
        current = next;
        counters.moves.fetch_add(1, Ordering::Relaxed);
    }
    tokio::time::sleep_until(until).await;
    let _closed = tx.send(Message::Close(None)).await;
    let _done = tokio::time::timeout(Duration::from_secs(5), reader).await;
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.rooms < 2 || args.connections == 0 || args.gateways == 0 {
        bail!("need at least 2 rooms, 1 connection and 1 gateway");
    }
    let chat_bin = args
        .chat_bin
        .clone()
        .unwrap_or_else(|| crate::compare::sibling_binary("chat"));
    let started = match &args.broker {
        Some(_) => None,
        // It waits for the broker to listen, on a thread of its own.
        None => Some(
            tokio::task::spawn_blocking(|| eventlog::kafka::testing::Broker::start(None))
                .await
                .context("starting the test broker")?,
        ),
    };
    let broker = args
        .broker
        .clone()
        .or_else(|| started.as_ref().map(|b| b.url()))
        .context("a broker")?;
    let mut gateways = Vec::new();
    for g in 0..args.gateways {
        let flags: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "{dir}",
            "--log",
            &broker,
            "--node",
            &format!("gw-{g}"),
            "--log-replication-factor",
            "1",
            "--log-min-insync-replicas",
            "1",
            "--max-connections-per-ip",
            "0",
            "--max-connections-per-user",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        gateways.push(Server::start(&chat_bin, &flags).await?);
    }
    let addrs: Vec<String> = gateways.iter().map(|g| g.addr.clone()).collect();
    let pids: Vec<u32> = gateways.iter().map(Server::pid).collect();
    let broker_pid = started.as_ref().map(|b| b.pid());

    let args = Arc::new(args);
    let counters = Arc::new(Counters {
        moves: AtomicU64::new(0),
        changes: AtomicU64::new(0),
    });
    let before: Vec<[f64; 4]> =
        futures::future::try_join_all(addrs.iter().map(|a| scrape(a))).await?;
    let cpu_before: Vec<f64> = pids
        .iter()
        .map(|p| sys::cpu_seconds(Some(*p)).unwrap_or(0.0))
        .collect();
    let broker_before = broker_pid.and_then(|p| sys::cpu_seconds(Some(p)));
    let start = tokio::time::Instant::now();
    let until = start + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let addr = addrs[i % addrs.len()].clone();
        tasks.spawn(client(addr, i, args.clone(), until, counters.clone()));
    }
    // The most entries a gateway holds, sampled each second of the churn.
    let mut entries_during: f64 = 0.0;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for a in &addrs {
            if let Ok(m) = scrape(a).await {
                entries_during = entries_during.max(m[3]);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after: Vec<[f64; 4]> =
        futures::future::try_join_all(addrs.iter().map(|a| scrape(a))).await?;
    let cpu_after: Vec<f64> = pids
        .iter()
        .map(|p| sys::cpu_seconds(Some(*p)).unwrap_or(0.0))
        .collect();
    let broker_after = broker_pid.and_then(|p| sys::cpu_seconds(Some(p)));
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} connections failed");
    }

    // Every connection is closed: presence must drain to nothing.
    let settle_start = tokio::time::Instant::now();
    let empty_after_close = loop {
        let mut empty = true;
        for a in &addrs {
            empty &= scrape(a).await.is_ok_and(|m| m[3] == 0.0);
        }
        if empty {
            for a in &addrs {
                for r in 0..args.rooms as u64 {
                    let body = get(a, &format!("/rooms/{}/presence", room(r))).await?;
                    empty &= body.contains(r#""users":[]"#);
                }
            }
        }
        if empty || settle_start.elapsed() > args.settle {
            break empty;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settle_s = settle_start.elapsed().as_secs_f64();

    let sum = |k: usize| -> f64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a[k] - b[k])
            .sum::<f64>()
            / elapsed
    };
    let gateway_cores: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| (a - b) / elapsed)
        .collect();
    let moves_per_s = counters.moves.load(Ordering::Relaxed) as f64 / elapsed;
    let report = Report {
        date: sys::utc_now(),
        machine: sys::Machine::detect(),
        gateways: args.gateways,
        connections: args.connections,
        rooms: args.rooms,
        seconds: elapsed,
        dwell_ms: args.dwell_ms,
        moves_per_s,
        change_frames_per_s: counters.changes.load(Ordering::Relaxed) as f64 / elapsed,
        notices_per_s: sum(0),
        bytes_per_s: sum(1),
        notices_read_per_s: sum(2),
        broker_cores: broker_before
            .zip(broker_after)
            .map(|(b, a)| (a - b) / elapsed),
        gateway_cpu_us_per_move: gateway_cores.iter().sum::<f64>() / moves_per_s.max(1e-9) * 1e6,
        gateway_cores,
        entries_during,
        empty_after_close,
        settle_s,
    };
    for g in gateways {
        g.stop(Duration::from_secs(10)).await?;
    }
    drop(started);
    Ok(report)
}

/// The report as lines of text.
pub fn summary(r: &Report) -> String {
    let cores: Vec<String> = r.gateway_cores.iter().map(|c| format!("{c:.3}")).collect();
    format!(
        "presence-load {date}: {g} gateways, {c} connections in {rooms} rooms, {s:.0} s of churn (dwell {lo}..{hi} ms)\n\
         room changes            {moves:.1}/s\n\
         change frames to clients {changes:.1}/s\n\
         ephemeral notices sent  {n:.1}/s, {b:.0} bytes/s; read {nr:.1}/s\n\
         gateway CPU             [{cores}] cores; {us:.0} us per room change\n\
         broker CPU              {broker}\n\
         entries during churn    {e:.0} at most per gateway\n\
         empty after close       {empty} (after {settle:.1} s)\n",
        date = r.date,
        g = r.gateways,
        c = r.connections,
        rooms = r.rooms,
        s = r.seconds,
        lo = r.dwell_ms.0,
        hi = r.dwell_ms.1,
        moves = r.moves_per_s,
        changes = r.change_frames_per_s,
        n = r.notices_per_s,
        b = r.bytes_per_s,
        nr = r.notices_read_per_s,
        cores = cores.join(", "),
        us = r.gateway_cpu_us_per_move,
        broker = r
            .broker_cores
            .map_or("not measured (external broker)".to_owned(), |c| format!("{c:.3} cores")),
        e = r.entries_during,
        empty = r.empty_after_close,
        settle = r.settle_s,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines_are_summed_over_labels() {
        let text = "# HELP presence_notices_sent_total x\n\
                    presence_notices_sent_total{kind=\"rooms\"} 3\n\
                    presence_notices_sent_total{kind=\"typing\"} 4\n\
                    presence_notices_sent_totalx 100\n\
                    presence_entries 7\n";
        assert_eq!(metric_sum(text, "presence_notices_sent_total"), 7.0);
        assert_eq!(metric_sum(text, "presence_entries"), 7.0);
        assert_eq!(metric_sum(text, "absent"), 0.0);
    }

    #[test]
    fn dwell_ranges_parse() {
        assert_eq!(parse_range("2000..8000"), Ok((2000, 8000)));
        assert!(parse_range("8..2").is_err());
        assert!(parse_range("0..2").is_err());
        assert!(parse_range("5").is_err());
    }
}
