//! The command line of `chat-load`.
//!
//! ```text
//! chat-load preset ingest-max --url ws://127.0.0.1:8080 --server-pid PID --report r.json --chart r.svg
//! chat-load run --preset mixed --connections 500 --rate 1000 --url ws://127.0.0.1:8080
//! chat-load compare ingest-max --report r.json --chart r.svg     # bare-server, then chat
//! chat-load compare ingest-max --baseline kafka-producer --log kafka://127.0.0.1:9092   # raw producer, then chat
//! chat-load compare ingest-max --baseline kafka-producer,kafka-fetch --log kafka://127.0.0.1:9092   # both, then chat
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::compare::{compare, sibling_binary, Baseline, CompareOptions};
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
}
