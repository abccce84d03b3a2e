//! `chat`: the command line of the chat pipeline. Parses the command line,
//! sets up tracing, and runs the command ([`chat::cli::run`]).

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = chat::cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| cli.default_log_filter().into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One object per line: the event's fields at the top level, and the
        // spans it happened in (a connection's id and user).
        chat::cli::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        chat::cli::LogFormat::Text => logs.init(),
    }
    // The blocking pool serves short calls only (store and log reads,
    // metadata requests); a cap keeps a storm of them from growing threads.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads((4 * cores).max(8))
        .build()
        .context("starting the runtime")?;
    runtime.block_on(chat::cli::run(cli))
}
