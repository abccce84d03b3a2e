//! `chat-faults`: runs the workload under injected faults and checks it.
//! Exits non-zero on any violation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "chat-faults",
    about = "Kill and stall chat processes under load and check that nothing acked is lost, nothing is shown twice, every room keeps its order and every request ends"
)]
struct Args {
    /// embedded (one node) or kafka (a broker, two gateways, two projectors).
    #[arg(long, default_value = "embedded")]
    backend: faults::Backend,
    /// The chat binary (default: next to this one).
    #[arg(long)]
    chat_bin: Option<PathBuf>,
    /// Seconds of traffic under faults.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 6)]
    rooms: usize,
    /// Messages per second per client.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// The faults to inject, taken in turn: kill (SIGKILL, restart), stall
    /// (SIGSTOP, then SIGCONT; the broker too), partition (a node cut from
    /// the broker; Kafka backends, as root, with nftables and cgroup v2).
    /// Default: kill,stall on embedded, kill,stall,partition on Kafka.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<faults::Fault>>,
    /// Shortest and longest stall, in milliseconds.
    #[arg(long, default_value_t = 500)]
    stall_min_ms: u64,
    #[arg(long, default_value_t = 2500)]
    stall_max_ms: u64,
    /// Shortest and longest partition, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    partition_min_ms: u64,
    #[arg(long, default_value_t = 8000)]
    partition_max_ms: u64,
    /// Every this many sends of a client goes as an HTTP POST abandoned
    /// after 1 to 50 ms and retried on the WebSocket; 0: none.
    #[arg(long, default_value_t = 10)]
    post_every: u64,
    /// Shortest and longest time between two faults, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    fault_min_ms: u64,
    #[arg(long, default_value_t = 4000)]
    fault_max_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the full report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep every node's data dir and server log (and the durable broker's
    /// database) in this directory, for a look after the run.
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let chat_bin = match args.chat_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("chat"),
    };
    let smoke = faults::Config::smoke(args.backend, chat_bin);
    let config = faults::Config {
        duration: Duration::from_secs(args.seconds),
        clients: args.clients,
        rooms: args.rooms,
        rate: args.rate,
        fault_every: (
            Duration::from_millis(args.fault_min_ms),
            Duration::from_millis(args.fault_max_ms),
        ),
        faults: args.faults.unwrap_or(smoke.faults.clone()),
        partition_for: (
            Duration::from_millis(args.partition_min_ms),
            Duration::from_millis(args.partition_max_ms),
        ),
        stall_for: (
            Duration::from_millis(args.stall_min_ms),
            Duration::from_millis(args.stall_max_ms),
        ),
        post_every: args.post_every,
        seed: args.seed,
        keep: args.keep,
        ..smoke
    };
    // On SIGINT or SIGTERM the run is dropped, and with it the cluster: its
    // processes are killed and the partition rules and cgroups removed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        report = faults::run(config) => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    };
    if let Some(path) = args.report {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for e in &report.examples {
        eprintln!("  {e}");
    }
    println!("{}", report.summary());
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
