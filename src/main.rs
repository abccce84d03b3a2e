//! `chat`: the command line of the chat pipeline.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "chat",
    version,
    about = "An event-sourced chat pipeline: WebSocket gateways in front of a partitioned log, with live fan-out and a projected history"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a chat node. With no flags: every role (ingest, fanout, projector)
    /// in one process on the embedded log and history store, with the web
    /// page at `/`.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address the WebSocket/HTTP gateway listens on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "CHAT_LISTEN")]
    listen: SocketAddr,
    /// Directory of the embedded log and history store; created when missing.
    #[arg(long, default_value = "./data", env = "CHAT_DATA_DIR")]
    data_dir: PathBuf,
    /// Partitions of the message topic. Fixed when the log is created: a
    /// different value on an existing data dir is refused, since rooms would
    /// move to other partitions.
    #[arg(long, default_value_t = 16, env = "CHAT_PARTITIONS")]
    partitions: u32,
    /// The log: `embedded` (in the data dir) or
    /// kafka://HOST:PORT[,HOST:PORT...] for Kafka or Redpanda.
    #[arg(long, default_value = "embedded", env = "CHAT_LOG")]
    log: chat::LogSpec,
    /// Kafka log: bound of the producer queue, in KiB. When the brokers
    /// stall, intake stops once it is full.
    #[arg(long, default_value_t = chat::KafkaTuning::default().queue_kbytes)]
    log_queue_kbytes: u32,
    /// Kafka log: how long a send waits for room in a full producer queue
    /// before it is answered `unavailable` (never sent, so retry is safe).
    #[arg(long, default_value_t = chat::KafkaTuning::default().enqueue_timeout.as_millis() as u64)]
    log_enqueue_timeout_ms: u64,
    /// The history store: `embedded` (in the data dir).
    #[arg(long, default_value = "embedded", env = "CHAT_STORE")]
    store: chat::StoreSpec,
    /// Roles of this process, any of ingest,fanout,projector. A gateway is
    /// ingest,fanout; a projector node is projector.
    #[arg(long, default_value = "ingest,fanout,projector", env = "CHAT_ROLES")]
    roles: chat::Roles,
    /// Consumer group of the projector. Default: named after the store, so
    /// projectors writing one store share the partitions and a node with its
    /// own embedded store reads all of them.
    #[arg(long, env = "CHAT_GROUP")]
    group: Option<String>,
    /// Name of this node, sent to clients in `welcome`.
    #[arg(long, default_value = "gw-1", env = "CHAT_NODE")]
    node: String,
    /// Frames queued for one client before it is closed as a slow consumer
    /// (close code 4008).
    #[arg(long, default_value_t = 4096)]
    client_queue: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.partitions == 0 {
        anyhow::bail!("--partitions must be at least 1");
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::warn!("open dev mode: no JWT secret, clients name themselves with ?user=<name>");
    tracing::info!(%addr, "listening; web page at http://{addr}/");
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let config = chat::ServeConfig {
        data_dir: args.data_dir,
        partitions: args.partitions,
        log: args.log,
        kafka: chat::KafkaTuning {
            queue_kbytes: args.log_queue_kbytes,
            enqueue_timeout: std::time::Duration::from_millis(args.log_enqueue_timeout_ms),
        },
        store: args.store,
        roles: args.roles,
        group: args.group,
        gateway: ingest::GatewayConfig {
            node: args.node,
            client_queue: args.client_queue,
            ..Default::default()
        },
    };
    chat::serve(listener, config, Some(metrics), shutdown).await
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
