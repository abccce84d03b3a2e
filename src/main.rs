//! `chat`: the command line of the chat pipeline. Parses the command line,
//! sets up tracing, and runs the command ([`chat::cli::run`]).

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = chat::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| cli.default_log_filter().into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(chat::cli::run(cli))
}
