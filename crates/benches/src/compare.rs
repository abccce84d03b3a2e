//! `chat-load compare`: runs the same scenario against the baseline, then
//! against `chat serve`, one after the other, and reports the figures side
//! by side with ratios to the baseline. Measuring both in one invocation is
//! what makes the ratio mean something on a shared, noisy machine.
//!
//! A baseline is `bare-server` (WebSocket and JSON, no log), a raw Kafka
//! producer to the brokers of `--log kafka://...` ([`crate::kafka`]), which
//! starts no server, or that producer with raw consumers fetching every
//! partition meanwhile. Several baselines run one after the other, then
//! chat; chat's ratios are given to each. Each server is started on a free port of
//! 127.0.0.1 and stopped by its PID after its run; `chat serve` gets a fresh
//! temporary data dir and `--log` (embedded, or `kafka://...`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::kafka::{produce, ProducerOptions};
use crate::report::{Comparison, Report};
use crate::run::{run, RunOptions};
use crate::scenario::Scenario;

/// What the chat server's figures are divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// `bare-server`: WebSocket and JSON with no log behind it.
    Bare,
    /// A raw rdkafka producer (the log's settings) to the brokers of
    /// `--log kafka://...`, for the Kafka-mode target (chat at least 80% of
    /// its msgs/s); see `crate::kafka`.
    KafkaProducer,
    /// The raw producer while raw consumers fetch every partition of its
    /// topic: the fetch load a gateway with fan-out and a projector puts on
    /// the brokers, without chat; see `crate::kafka`.
    KafkaFetch,
}

/// How to start the servers.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub chat_bin: PathBuf,
    pub bare_bin: PathBuf,
    /// Run in this order before chat; ratios are given to each.
    pub baselines: Vec<Baseline>,
    /// `--log` of `chat serve` (`embedded` or `kafka://HOST:PORT`).
    pub log: String,
    pub partitions: u32,
    /// Topic of the `kafka-producer` baseline.
    pub producer_topic: String,
    /// More arguments for `chat serve`.
    pub chat_args: Vec<String>,
    pub progress: bool,
    pub command: String,
    pub nofile_limit: Option<crate::sys::NofileLimit>,
}

/// A server process started for a run; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    log_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// How long a server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Server {
    /// Starts `program args...` with its output in a log file, and waits for
    /// the line naming its address (`... at http://ADDR/`).
    pub async fn start(program: &Path, args: &[String]) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("chat-load-")
            .tempdir()
            .context("making a temporary dir")?;
        let log_file = dir.path().join("server.log");
        let log = std::fs::File::create(&log_file)?;
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{dir}", &dir.path().display().to_string()))
            .collect();
        let child = Command::new(program)
            .args(&args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("SERVER_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut server = Server {
            child,
            addr: String::new(),
            log_file,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let log = server.log();
            if let Some(rest) = log.split(" at http://").nth(1) {
                server.addr = rest.split('/').next().unwrap_or_default().to_owned();
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{} exited with {status}:\n{log}", program.display());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not start in time:\n{log}", program.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// SIGTERM by PID, then SIGKILL if it has not exited in `grace`.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _already_gone = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(
            pid = self.child.id(),
            "server did not stop in time; killing it"
        );
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _killed = self.child.kill();
            let _reaped = self.child.wait();
        }
    }
}

/// Where a sibling binary of this executable would be (`target/release/chat`
/// next to `target/release/chat-load`).
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `scenario` against the baseline, then against chat.
pub async fn compare(scenario: &Scenario, options: &CompareOptions) -> anyhow::Result<Comparison> {
    scenario.validate()?;
    let mut runs: Vec<Report> = Vec::new();
    for baseline in &options.baselines {
        let fetchers = match baseline {
            Baseline::Bare => {
                runs.push(
                    run_server(
                        scenario,
                        options,
                        "bare",
                        &options.bare_bin,
                        &["--listen".into(), "127.0.0.1:0".into()],
                    )
                    .await?,
                );
                continue;
            }
            Baseline::KafkaProducer => 0,
            Baseline::KafkaFetch => crate::kafka::FETCHERS,
        };
        // Each baseline produces to a topic of its own, so neither fetches
        // from a partition the other one filled (the test broker's fetches
        // slow down as a partition grows).
        let topic = match fetchers {
            0 => options.producer_topic.clone(),
            _ => format!("{}.fetch", options.producer_topic),
        };
        let producer = ProducerOptions {
            brokers: crate::kafka::brokers(&options.log)?,
            topic,
            partitions: options.partitions,
            fetchers,
            command: options.command.clone(),
            nofile_limit: options.nofile_limit,
        };
        tracing::info!(brokers = %producer.brokers, topic = %producer.topic, fetchers, "raw producer baseline");
        let report = produce(scenario, &producer)
            .await
            .with_context(|| format!("running the {} baseline", producer.label()))?;
        if !report.ok {
            tracing::warn!(label = %report.label, "run failed checks");
        }
        runs.push(report);
    }
    let mut chat_args = serve_args(&options.log, options.partitions);
    // The ingest tier's cost, not the abuse limits': one address opens every
    // connection, each sending as fast as the scenario says. A limit given
    // in --chat-arg stays on.
    for flag in [
        "--send-rate",
        "--user-send-rate",
        "--max-connections-per-ip",
        "--max-connections-per-user",
    ] {
        let given = options
            .chat_args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !given {
            chat_args.extend([flag.to_owned(), "0".to_owned()]);
        }
    }
    chat_args.extend(options.chat_args.iter().cloned());
    runs.push(run_server(scenario, options, "chat", &options.chat_bin, &chat_args).await?);
    Ok(Comparison::new(
        options.command.clone(),
        scenario.preset,
        options.baselines.len(),
        runs,
    ))
}

/// `chat serve` on a free port of 127.0.0.1, in a data dir of the run's
/// own (`{dir}`, filled in by [`Server::start`]), on `log`.
pub(crate) fn serve_args(log: &str, partitions: u32) -> Vec<String> {
    [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "{dir}/data",
        "--log",
        log,
        "--partitions",
        &partitions.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts `program` with `args`, runs `scenario` against it as `label`,
/// and stops it.
async fn run_server(
    scenario: &Scenario,
    options: &CompareOptions,
    label: &str,
    program: &Path,
    args: &[String],
) -> anyhow::Result<Report> {
    let server = Server::start(program, args).await?;
    tracing::info!(label, pid = server.pid(), addr = %server.addr, "server started");
    let run_options = RunOptions {
        url: format!("ws://{}/ws", server.addr),
        label: label.to_owned(),
        server_pid: Some(server.pid()),
        progress: options.progress,
        command: options.command.clone(),
        nofile_limit: options.nofile_limit,
    };
    let report = run(scenario, &run_options).await;
    if report.as_ref().map_or(true, |r| !r.ok) {
        // Keep the server's side of the story.
        let log = server.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tracing::warn!(
            label,
            "run failed checks; server log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    server.stop(Duration::from_secs(15)).await?;
    report.with_context(|| format!("running against {label}"))
}
