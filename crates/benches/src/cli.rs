//! The command line of `chat-load`.
//!
//! ```text
//! chat-load preset ingest-max --url ws://127.0.0.1:8080 --server-pid PID --report r.json --chart r.svg
//! chat-load run --preset mixed --connections 500 --rate 1000 --url ws://127.0.0.1:8080
//! chat-load compare ingest-max --report r.json --chart r.svg     # bare-server, then chat
//! chat-load compare ingest-max --baseline kafka-producer --log kafka://127.0.0.1:9092   # raw producer, then chat
//! chat-load compare ingest-max --baseline kafka-producer,kafka-fetch --log kafka://127.0.0.1:9092   # both, then chat
//! chat-load flood --quiet-connections 50 --quiet-rate 2 --seconds 30   # quiet clients, then beside a flooder
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::compare::{compare, sibling_binary, Baseline, CompareOptions};
use crate::flood::{flood, FloodOptions, FloodSettings};
use crate::report::Report;
use crate::run::{run, RunOptions};
use crate::scenario::{parse_seconds, Preset, Scenario};

#[derive(Parser)]
#[command(
    name = "chat-load",
    version,
    about = "Load generator for chat gateways (the client protocol over WebSocket): open-loop rate, \
             HDR latency from the intended send time, a JSON report and an SVG chart"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a preset against a running gateway.
    Preset {
        #[arg(value_enum)]
        name: Preset,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run a scenario (a preset's numbers, overridden by flags) against a
    /// running gateway.
    Run {
        #[arg(long, value_enum, default_value = "mixed")]
        preset: Preset,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Start the baseline and then `chat serve` (each on a free port of
    /// 127.0.0.1, stopped by PID afterwards), run the same preset against
    /// both, and report ratios to the baseline.
    Compare {
        #[arg(value_enum)]
        name: Preset,
        #[command(flatten)]
        servers: ServerArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Against one `chat serve` with its default limits on (started on a
    /// free port of 127.0.0.1 and stopped by PID, unless --url names a
    /// running one): (a) quiet clients alone, then (b) the same beside one
    /// connection flooding as fast as it can; passes when the quiet p99 ack
    /// latency at most doubles and no quiet send is refused or lost.
    Flood(FloodArgs),
}

#[derive(Args)]
struct FloodArgs {
    /// A running gateway (loopback only); without it, `chat serve` is
    /// started for the run.
    #[arg(long)]
    url: Option<String>,
    /// With --url: PID of the server, to report its CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The `chat` binary; default: next to this one.
    #[arg(long)]
    chat_bin: Option<PathBuf>,
    /// `--log` for `chat serve`: `embedded`, or kafka://HOST:PORT.
    #[arg(long, default_value = "embedded")]
    log: String,
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// One more argument for `chat serve` (repeat for several); its limits
    /// stay at their defaults unless given here.
    #[arg(long = "chat-arg", allow_hyphen_values = true)]
    chat_args: Vec<String>,
    /// Quiet connections, each its own user, alone in its room.
    #[arg(long, default_value_t = 50)]
    quiet_connections: usize,
    /// Messages per second of each quiet connection (open loop).
    #[arg(long, default_value_t = 2.0)]
    quiet_rate: f64,
    /// Body bytes per message.
    #[arg(long, default_value_t = 128)]
    body: usize,
    /// Measurement window of each phase.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    seconds: f64,
    #[arg(long, value_parser = parse_seconds, default_value = "2")]
    warmup: f64,
    /// Longest wait for answers after each phase.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    drain: f64,
    /// Idle time between the phases.
    #[arg(long, value_parser = parse_seconds, default_value = "1")]
    pause: f64,
    /// Most flood sends unanswered at once.
    #[arg(long, default_value_t = 1000)]
    flood_inflight: usize,
    /// Most flood sends in all.
    #[arg(long, default_value_t = 50_000_000)]
    flood_max_sends: u64,
    /// Highest p99(b) / p99(a) that passes.
    #[arg(long, default_value_t = 2.0)]
    max_ratio: f64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

impl FloodArgs {
    fn options(self, command: String) -> FloodOptions {
        use std::io::IsTerminal;
        FloodOptions {
            settings: FloodSettings {
                quiet_connections: self.quiet_connections,
                quiet_rate: self.quiet_rate,
                body: self.body,
                seconds: self.seconds,
                warmup_s: self.warmup,
                drain_s: self.drain,
                pause_s: self.pause,
                flood_inflight: self.flood_inflight,
                flood_max_sends: self.flood_max_sends,
                max_ratio: self.max_ratio,
                ..FloodSettings::default()
            },
            url: self.url,
            server_pid: self.server_pid,
            chat_bin: self.chat_bin.unwrap_or_else(|| sibling_binary("chat")),
            log: self.log,
            partitions: self.partitions,
            chat_args: self.chat_args,
            progress: !self.no_progress && std::io::stderr().is_terminal(),
            command,
        }
    }
}

#[derive(Args)]
struct TargetArgs {
    /// Gateway URL; must be a loopback address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// PID of the server, to report its RSS (VmRSS) and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// What the report calls the server.
    #[arg(long, default_value = "gateway")]
    label: String,
}

#[derive(Args)]
struct ServerArgs {
    /// The `chat` binary; default: next to this one.
    #[arg(long)]
    chat_bin: Option<PathBuf>,
    /// The `bare-server` binary; default: next to this one.
    #[arg(long)]
    bare_bin: Option<PathBuf>,
    /// What chat is compared with; several, comma-separated, run one after
    /// the other before chat, and chat's ratios to each are reported.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bare")]
    baseline: Vec<Baseline>,
    /// `--log` for `chat serve`: `embedded`, or kafka://HOST:PORT.
    #[arg(long, default_value = "embedded")]
    log: String,
    /// Partitions of chat's topic, and of the kafka-producer baseline's.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Topic of `--baseline kafka-producer` (created when missing);
    /// `kafka-fetch` uses this name with `.fetch` appended.
    #[arg(long, default_value = crate::kafka::DEFAULT_TOPIC)]
    producer_topic: String,
    /// One more argument for `chat serve` (repeat for several).
    #[arg(long = "chat-arg", allow_hyphen_values = true)]
    chat_args: Vec<String>,
}

/// Overrides of the preset's numbers, and the outputs.
#[derive(Args)]
struct CommonArgs {
    /// Start from the seconds-long numbers of the CI smoke run.
    #[arg(long)]
    tiny: bool,
    #[arg(long)]
    connections: Option<usize>,
    #[arg(long)]
    rooms: Option<usize>,
    /// Connections that send (the first ones; a room each in turn).
    #[arg(long)]
    senders: Option<usize>,
    /// Offered msgs/s, all senders together (ingest-max: the first step).
    #[arg(long)]
    rate: Option<f64>,
    /// Body bytes per message.
    #[arg(long)]
    body: Option<usize>,
    #[arg(long, value_parser = parse_seconds)]
    warmup: Option<f64>,
    /// Measurement window of each phase (each step of ingest-max).
    #[arg(long, value_parser = parse_seconds)]
    duration: Option<f64>,
    /// Longest wait for answers and deliveries after a phase.
    #[arg(long, value_parser = parse_seconds)]
    drain: Option<f64>,
    /// Idle hold with every connection open (connections preset).
    #[arg(long, value_parser = parse_seconds)]
    hold: Option<f64>,
    #[arg(long)]
    step_factor: Option<f64>,
    #[arg(long)]
    max_rate: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    refine: Option<usize>,
    /// ingest-max: p99 ack latency bound of a passing step, ms.
    #[arg(long)]
    p99_bound_ms: Option<f64>,
    /// Loopback source addresses to connect from (0: one per 10,000).
    #[arg(long)]
    sources: Option<usize>,
    #[arg(long)]
    connect_concurrency: Option<usize>,
    #[arg(long, value_parser = parse_seconds)]
    connect_timeout: Option<f64>,
    /// Interval of the time series.
    #[arg(long, value_parser = parse_seconds)]
    interval: Option<f64>,
    /// The run stops after this, wherever it is.
    #[arg(long, value_parser = parse_seconds)]
    deadline: Option<f64>,
    /// Read buffer of each client socket, bytes.
    #[arg(long)]
    read_buffer: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the SVG chart here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

impl CommonArgs {
    fn scenario(&self, preset: Preset) -> Scenario {
        let mut s = if self.tiny {
            Scenario::tiny(preset)
        } else {
            Scenario::full(preset)
        };
        macro_rules! set {
            ($($field:ident <- $arg:ident),* $(,)?) => {
                $(if let Some(v) = self.$arg { s.$field = v; })*
            };
        }
        set!(
            connections <- connections,
            rooms <- rooms,
            senders <- senders,
            rate <- rate,
            body <- body,
            warmup_s <- warmup,
            duration_s <- duration,
            drain_s <- drain,
            hold_s <- hold,
            step_factor <- step_factor,
            max_rate <- max_rate,
            max_steps <- max_steps,
            refine <- refine,
            p99_bound_ms <- p99_bound_ms,
            sources <- sources,
            connect_concurrency <- connect_concurrency,
            connect_timeout_s <- connect_timeout,
            interval_s <- interval,
            deadline_s <- deadline,
            read_buffer <- read_buffer,
        );
        // Fewer connections than the preset's senders: every one sends.
        if self.senders.is_none() {
            s.senders = s.senders.min(s.connections);
        }
        s
    }

    fn progress(&self) -> bool {
        use std::io::IsTerminal;
        !self.no_progress && std::io::stderr().is_terminal()
    }
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn warn_if_too_few_files(connections: usize, limit: Option<crate::sys::NofileLimit>) {
    if let Some(l) = limit {
        if connections as u64 + 64 > l.soft {
            tracing::warn!(
                connections,
                limit = l.soft,
                "more connections than open files allowed; some will fail to connect"
            );
        }
    }
}

/// Runs the command line; returns whether every check passed.
pub async fn main(cli: Cli) -> anyhow::Result<bool> {
    let command: Vec<String> = std::env::args().collect();
    let command = command.join(" ");
    let nofile_limit = match crate::sys::raise_nofile_limit() {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            None
        }
    };
    match cli.command {
        Command::Preset {
            name: preset,
            target,
            common,
        }
        | Command::Run {
            preset,
            target,
            common,
        } => {
            let scenario = common.scenario(preset);
            warn_if_too_few_files(scenario.connections, nofile_limit);
            let options = RunOptions {
                url: target.url,
                label: target.label,
                server_pid: target.server_pid,
                progress: common.progress(),
                command,
                nofile_limit,
            };
            let report: Report = run(&scenario, &options).await?;
            print!("{}", report.text());
            if let Some(path) = &common.report {
                write_json(path, &report)?;
            }
            if let Some(path) = &common.chart {
                crate::chart::write_svg(
                    path,
                    &format!("{} against {}", preset.name(), report.label),
                    &[crate::chart::Run {
                        label: &report.label,
                        series: &report.series,
                    }],
                )?;
            }
            Ok(report.ok)
        }
        Command::Compare {
            name: preset,
            servers,
            common,
        } => {
            let scenario = common.scenario(preset);
            warn_if_too_few_files(scenario.connections, nofile_limit);
            let options = CompareOptions {
                chat_bin: servers.chat_bin.unwrap_or_else(|| sibling_binary("chat")),
                bare_bin: servers
                    .bare_bin
                    .unwrap_or_else(|| sibling_binary("bare-server")),
                baselines: servers.baseline,
                log: servers.log,
                partitions: servers.partitions,
                producer_topic: servers.producer_topic,
                chat_args: servers.chat_args,
                progress: common.progress(),
                command,
                nofile_limit,
            };
            let comparison = compare(&scenario, &options).await?;
            print!("{}", comparison.text());
            if let Some(path) = &common.report {
                write_json(path, &comparison)?;
            }
            if let Some(path) = &common.chart {
                let runs: Vec<crate::chart::Run> = comparison
                    .runs
                    .iter()
                    .map(|r| crate::chart::Run {
                        label: &r.label,
                        series: &r.series,
                    })
                    .collect();
                crate::chart::write_svg(
                    path,
                    &format!("{}: {}", preset.name(), comparison.date),
                    &runs,
                )?;
            }
            Ok(comparison.ok)
        }
        Command::Flood(args) => {
            let report_path = args.report.clone();
            let options = args.options(command);
            let report = flood(&options).await?;
            print!("{}", report.text());
            if let Some(path) = &report_path {
                write_json(path, &report)?;
            }
            Ok(report.ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_preset() {
        let cli = Cli::try_parse_from([
            "chat-load",
            "preset",
            "fanout",
            "--tiny",
            "--rate",
            "5",
            "--duration",
            "300ms",
        ])
        .unwrap();
        let Command::Preset { name, common, .. } = cli.command else {
            panic!("preset")
        };
        let s = common.scenario(name);
        assert_eq!(s.rate, 5.0);
        assert_eq!(s.duration_s, 0.3);
        assert_eq!(s.connections, Scenario::tiny(Preset::Fanout).connections);
        let cli = Cli::try_parse_from([
            "chat-load",
            "compare",
            "ingest-max",
            "--chat-arg",
            "--client-queue",
            "--chat-arg",
            "8",
            "--connections",
            "2",
        ])
        .unwrap();
        let Command::Compare {
            servers,
            common,
            name,
        } = cli.command
        else {
            panic!("compare")
        };
        assert_eq!(servers.chat_args, ["--client-queue", "8"]);
        assert_eq!(common.scenario(name).senders, 2);
    }

    #[test]
    fn flood_flags_make_its_settings() {
        let cli = Cli::try_parse_from([
            "chat-load",
            "flood",
            "--quiet-connections",
            "8",
            "--quiet-rate",
            "3",
            "--seconds",
            "1500ms",
            "--chat-arg",
            "--send-rate",
            "--chat-arg",
            "5",
        ])
        .unwrap();
        let Command::Flood(args) = cli.command else {
            panic!("flood")
        };
        let o = args.options("chat-load flood".into());
        assert_eq!(o.settings.quiet_connections, 8);
        assert_eq!(o.settings.quiet_total_rate(), 24.0);
        assert_eq!(o.settings.seconds, 1.5);
        assert_eq!(o.settings.body, 128);
        assert_eq!(o.settings.max_ratio, 2.0);
        assert_eq!(o.chat_args, ["--send-rate", "5"]);
        assert!(o.url.is_none());
        o.settings.validate().unwrap();
    }
}
