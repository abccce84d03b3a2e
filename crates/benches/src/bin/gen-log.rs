//! `gen-log`: fills an embedded log with generated chat messages, for the
//! replay and projection benchmarks (`benches/RESULTS.md`). Writes the same
//! files `chat serve --data-dir DIR` reads (`DIR/log/chat.messages.log`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use eventlog::EventLog;

#[derive(Parser)]
#[command(
    name = "gen-log",
    version,
    about = "Appends generated chat messages to the embedded log of a data dir"
)]
struct Args {
    /// Data dir of the embedded log (as `chat serve --data-dir`).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Partitions of the log; must match an existing log.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Messages to append.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Rooms they are spread over.
    #[arg(long, default_value_t = 1000)]
    rooms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(gen_log(args))
}

/// Appends `events` generated messages to the embedded log, in batches.
async fn gen_log(args: Args) -> anyhow::Result<()> {
    let dir = args.data_dir.join("log");
    let log = eventlog::file::FileLog::open(&dir, schemas::MESSAGES_TOPIC, args.partitions)
        .with_context(|| format!("opening the log in {}", dir.display()))?;
    let rooms = args.rooms.max(1);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let began = std::time::Instant::now();
    let mut i = 0;
    while i < args.events {
        let batch: Vec<eventlog::Record> = (i..args.events.min(i + 1000))
            .map(|n| {
                let room = format!("room-{}", n % rooms);
                let event = schemas::ChatEvent::MessagePosted(schemas::MessagePosted {
                    room: room.clone(),
                    client_id: format!("00000000-0000-4000-8000-{n:012x}"),
                    user: format!("user-{}", n % 97),
                    body: format!("generated message {n}, about as long as a chat line"),
                    ts,
                });
                eventlog::Record {
                    key: room.into_bytes(),
                    value: schemas::encode(&event),
                    ts,
                }
            })
            .collect();
        i += batch.len() as u64;
        log.append(batch).await?;
    }
    println!(
        "appended {} events over {rooms} rooms in {:.2} s",
        args.events,
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
