//! `presence-load`: what presence across gateways costs. See
//! `benches::presence` and `benches/RESULTS.md`.

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = benches::presence::Args::parse();
    benches::init_tracing();
    // Several threads: the clients' work is not what is measured.
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let path = args.report.clone();
    let report = runtime.block_on(benches::presence::run(args))?;
    print!("{}", benches::presence::summary(&report));
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.empty_after_close {
        eprintln!("presence-load: presence did not return to empty");
        std::process::exit(1);
    }
    Ok(())
}
