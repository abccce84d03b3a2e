//! `chat-load`: the load generator. See `benches::cli` and
//! `benches/RESULTS.md`.

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = benches::cli::Cli::parse();
    benches::init_tracing();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let ok = runtime.block_on(benches::cli::main(cli))?;
    if !ok {
        eprintln!("chat-load: some checks failed (see the report)");
        std::process::exit(1);
    }
    Ok(())
}
