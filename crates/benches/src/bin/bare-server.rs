//! `bare-server`: the baseline WebSocket server of the load benchmarks
//! (`benches::bare`): answers like a gateway, with no log behind it.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "bare-server",
    version,
    about = "A bare WebSocket server answering the client protocol like a gateway, with no log: the baseline of chat-load"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Frames queued per client before it is closed as a slow consumer.
    #[arg(long, default_value_t = 4096)]
    client_queue: usize,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long, default_value_t = benches::bare::BareConfig::default().read_buffer)]
    read_buffer: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match benches::sys::raise_nofile_limit() {
        Ok(l) => tracing::info!(soft = l.soft, hard = l.hard, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!("bare-server listening at http://{addr}/");
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(on_signal(shutdown.clone()));
        let config = benches::bare::BareConfig {
            client_queue: args.client_queue,
            read_buffer: args.read_buffer,
            ..Default::default()
        };
        let served = benches::bare::serve(listener, config, shutdown).await;
        signals.abort();
        served.context("serving")
    })
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn on_signal(shutdown: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        tracing::error!("cannot watch SIGTERM");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
}
