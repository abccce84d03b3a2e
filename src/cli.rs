//! The command line of `chat`: its flags and subcommands, and what each one
//! runs. `src/main.rs` parses a [`Cli`], sets up tracing and calls [`run`].

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
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text` for people, `json` for
    /// a log pipeline (one JSON object per line, with the connection's span:
    /// its id and user). The level filter is `RUST_LOG`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CHAT_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a chat node. With no flags: every role (ingest, fanout, projector)
    /// in one process on the embedded log and history store, with the web
    /// page at `/`.
    Serve(Box<ServeArgs>),
    /// Rebuild the history from the log into a new projection version while
    /// the current one keeps serving reads. When a `chat serve` holds the
    /// data dir, the replay runs inside it (through its control socket);
    /// otherwise this process opens the log and the store itself.
    Replay(ReplayArgs),
    /// List the projection versions, point reads at one, drop one.
    Versions {
        #[command(subcommand)]
        action: VersionsAction,
    },
    /// Pause or resume the projector of the `chat serve` holding the data
    /// dir (store maintenance): paused, it applies nothing, and `/readyz`
    /// turns unready once its history is past the lag bound.
    Projector {
        #[command(subcommand)]
        action: ProjectorAction,
    },
    /// Check the log's topics (partitions, replicas, retention) and the
    /// history store (its projection versions) against what chat needs;
    /// each problem with its fix. Exits non-zero when there is one.
    Doctor(DoctorArgs),
    /// Mint an HS256 token with the configured secret (CHAT_JWT_SECRET or
    /// --jwt-secret-file), for development and tests; prints it.
    Token(TokenArgs),
}

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Print JSON: {"log":…,"findings":[{"subject","ok","what","fix"}],"problems":N}.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum ProjectorAction {
    /// Stop applying the log to the history store; positions stay.
    Pause {
        /// Data dir of the server (its control socket).
        #[arg(long, default_value = "./data", env = "CHAT_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Apply the log again, from where the projector stopped.
    Resume {
        /// Data dir of the server (its control socket).
        #[arg(long, default_value = "./data", env = "CHAT_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// The keys and claim rules tokens are checked with, for `serve` (and the
/// secret, issuer and audience `token` mints with).
#[derive(clap::Args)]
pub struct KeyArgs {
    /// HMAC secret of HS256/384/512 tokens. From the environment only, so
    /// it never shows in a process list.
    #[arg(
        long = "jwt-secret-from-env",
        env = "CHAT_JWT_SECRET",
        hide = true,
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// File holding the HMAC secret of HS256/384/512 tokens (a trailing
    /// newline is not part of it).
    #[arg(long, env = "CHAT_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Required `iss` of every token, when set.
    #[arg(long, env = "CHAT_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` of every token, when set.
    #[arg(long, env = "CHAT_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

impl KeyArgs {
    /// The HMAC secret, if one is configured.
    fn secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.jwt_secret.is_some() && self.jwt_secret_file.is_some() {
            anyhow::bail!("give the JWT secret once: CHAT_JWT_SECRET or --jwt-secret-file");
        }
        if let Some(secret) = &self.jwt_secret {
            return Ok(Some(secret.as_bytes().to_vec()));
        }
        let Some(path) = &self.jwt_secret_file else {
            return Ok(None);
        };
        let mut secret = std::fs::read(path)
            .with_context(|| format!("reading the JWT secret file {}", path.display()))?;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        Ok(Some(secret))
    }
}

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The user the token names (`sub`).
    #[arg(long)]
    user: String,
    /// How long the token is valid: 90s, 30m, 1h, 7d...
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// Rooms the token grants (the `rooms` claim): names and prefix
    /// patterns such as team-a.* or dm:*, comma-separated. Default: no
    /// claim (every public room and the user's direct messages).
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    #[command(flatten)]
    keys: KeyArgs,
}

/// Where the log and the history are, for `replay` and `versions`.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Data dir of the embedded log and history store (and of the control
    /// socket of a `chat serve` running on it).
    #[arg(long, default_value = "./data", env = "CHAT_DATA_DIR")]
    data_dir: PathBuf,
    /// Partitions of the message topic, as the log was created with.
    #[arg(long, default_value_t = 16, env = "CHAT_PARTITIONS")]
    partitions: u32,
    /// The log: `embedded` or kafka://HOST:PORT[,HOST:PORT...]. Default:
    /// the log of the server holding the data dir, else `embedded`.
    #[arg(long, env = "CHAT_LOG")]
    log: Option<crate::LogSpec>,
    /// The history store: `embedded` (in the data dir) or
    /// scylla://HOST:9042[,HOST...]/KEYSPACE. Used when no server holds the
    /// data dir (else the server's store is).
    #[arg(long, default_value = "embedded", env = "CHAT_STORE")]
    store: crate::StoreSpec,
    #[command(flatten)]
    topics: TopicArgs,
}

/// What the topics of a Kafka log must be, for `serve`, `replay` and
/// `versions` alike.
#[derive(clap::Args)]
pub struct TopicArgs {
    /// Kafka log: replication factor of the topics chat creates, and the
    /// fewest replicas an existing topic may have. A single-broker setup
    /// says 1 (and is warned that a broker's loss loses acked messages).
    #[arg(long, default_value_t = crate::KafkaTuning::default().replication, env = "CHAT_LOG_REPLICATION_FACTOR")]
    log_replication_factor: i32,
    /// Kafka log: `min.insync.replicas` of the topics chat creates (with
    /// `acks=all`, the replicas that hold a message before it is acked).
    #[arg(long, default_value_t = crate::KafkaTuning::default().min_insync_replicas, env = "CHAT_LOG_MIN_INSYNC_REPLICAS")]
    log_min_insync_replicas: i32,
    /// Kafka log: use an existing topic that keeps records for a limited
    /// time or size, or has fewer replicas than asked, instead of refusing
    /// it (each shortfall is logged as a warning).
    #[arg(long, env = "CHAT_LOG_ACCEPT_TOPIC_CONFIG")]
    log_accept_topic_config: bool,
}

impl TopicArgs {
    fn tuning(&self) -> crate::KafkaTuning {
        crate::KafkaTuning {
            replication: self.log_replication_factor,
            min_insync_replicas: self.log_min_insync_replicas,
            accept_topic_config: self.log_accept_topic_config,
            ..crate::KafkaTuning::default()
        }
    }
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Where to start: `earliest`, or an RFC 3339 time
    /// (2026-11-24T10:00:00Z): records stamped earlier are left out.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Version to build. Default: the next vN. Naming a version a stopped
    /// replay left resumes it.
    #[arg(long)]
    into: Option<String>,
    /// Point reads at the new version once it has caught up with the head.
    #[arg(long)]
    switch: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// When stderr is not a terminal: seconds between progress lines.
    #[arg(long, default_value_t = 5.0)]
    progress_every: f64,
}

#[derive(Subcommand)]
pub enum VersionsAction {
    /// Every projection version: state, records covered, the current one.
    List {
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Point reads (and the projector) at a version a replay completed.
    Switch {
        name: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Delete a version and its data; never the current one.
    Drop {
        name: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(clap::Args)]
pub struct ServeArgs {
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
    /// The log: `embedded` (an append-only file in the data dir, or the
    /// redb log a data dir made before it holds), `embedded-redb` (redb even
    /// in a new data dir), or kafka://HOST:PORT[,HOST:PORT...] for Kafka or
    /// Redpanda.
    #[arg(long, default_value = "embedded", env = "CHAT_LOG")]
    log: crate::LogSpec,
    /// Kafka log: bound of the producer queue, in KiB. When the brokers
    /// stall, intake stops once it is full.
    #[arg(long, default_value_t = crate::KafkaTuning::default().queue_kbytes)]
    log_queue_kbytes: u32,
    /// Kafka log: how long a send waits for room in a full producer queue
    /// before it is answered `unavailable` (never sent, so retry is safe).
    #[arg(long, default_value_t = crate::KafkaTuning::default().enqueue_timeout.as_millis() as u64)]
    log_enqueue_timeout_ms: u64,
    /// Kafka log: how long the brokers may hold a read that finds nothing
    /// new (`fetch.wait.max.ms`). Kafka and Redpanda answer as soon as a
    /// record arrives; the test broker, tansu, gives up a fetch whose work
    /// takes longer than this, which long partitions need.
    #[arg(long, default_value_t = crate::KafkaTuning::default().fetch_wait.as_millis() as u64, env = "CHAT_LOG_FETCH_WAIT_MS")]
    log_fetch_wait_ms: u64,
    /// How long a send handed to the log waits for the log's answer before
    /// it is answered `unavailable` with `"pending":true`: the append goes
    /// on, and a retry with the same id gets its outcome. 0: no limit.
    #[arg(long, default_value_t = ingest::GatewayConfig::default().send_timeout.as_millis() as u64, env = "CHAT_SEND_TIMEOUT_MS")]
    send_timeout_ms: u64,
    /// How often this node announces its users of every room to the other
    /// nodes (presence heartbeat). A node not heard for three heartbeats
    /// (a SIGKILL, a cut from the broker) is taken as gone: its users leave
    /// everyone's presence within three heartbeats and a second.
    #[arg(long, default_value_t = fanout::presence::PresenceConfig::default().heartbeat.as_millis() as u64, env = "CHAT_PRESENCE_HEARTBEAT_MS")]
    presence_heartbeat_ms: u64,
    /// Rooms whose members see each other's read positions (`read` frames,
    /// `GET /rooms/{room}/reads`): room names and prefix patterns (`team.*`,
    /// `dm:*`, `*`), comma-separated. In the other rooms a user's read
    /// position is the user's own.
    #[arg(
        long,
        default_value = "dm:*",
        value_delimiter = ',',
        env = "CHAT_SHARED_READS"
    )]
    shared_reads: Vec<String>,
    /// Whether this node appends read positions (`read` frames, `POST
    /// /rooms/{room}/reads`). Turn it off while a rolling upgrade from a
    /// release before read positions still runs old projectors or
    /// gateways, which cannot read them (docs/operations.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CHAT_READ_POSITIONS")]
    read_positions: bool,
    /// Whether this node appends edits, deletes and reactions (`edit`,
    /// `delete` and `react` frames and their HTTP equivalents). Turn it off
    /// while a rolling upgrade from a release before them (schema v2)
    /// still runs old projectors or gateways (docs/operations.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CHAT_MESSAGE_CHANGES")]
    message_changes: bool,
    /// On a node that projects: `/readyz` answers 503 while the history of
    /// a partition it projects is more than this many records behind the
    /// log (a paused or stuck projector, a store too slow, a node catching
    /// up).
    #[arg(long, default_value_t = ingest::GatewayConfig::default().ready_max_lag, env = "CHAT_READY_MAX_LAG_RECORDS")]
    ready_max_lag_records: u64,
    #[command(flatten)]
    topics: TopicArgs,
    /// The history store: `embedded` (in the data dir) or
    /// scylla://HOST:9042[,HOST...]/KEYSPACE[?replication_factor=N&strategy=S]
    /// for ScyllaDB (keyspace and tables created when missing; the
    /// replication options only shape a new keyspace, default
    /// NetworkTopologyStrategy with 3 replicas).
    #[arg(long, default_value = "embedded", env = "CHAT_STORE")]
    store: crate::StoreSpec,
    /// Roles of this process, any of ingest,fanout,projector. A gateway is
    /// ingest,fanout; a projector node is projector.
    #[arg(long, default_value = "ingest,fanout,projector", env = "CHAT_ROLES")]
    roles: crate::Roles,
    /// Consumer group of the projector. Default: named after the store (a
    /// Scylla store: its keyspace, chat-projector-scylla-KEYSPACE), so
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
    #[command(flatten)]
    keys: KeyArgs,
    /// PEM public key of RS256/384/512, PS*, ES256/384 or EdDSA tokens;
    /// may be given several times.
    #[arg(long, env = "CHAT_JWT_KEY", value_delimiter = ',')]
    jwt_key: Vec<PathBuf>,
    /// A JWKS (file, or http(s) URL) whose keys check tokens by `kid`; a
    /// URL is fetched again every --jwks-refresh and on an unknown kid.
    #[arg(long, env = "CHAT_JWKS")]
    jwks: Option<String>,
    /// How often a JWKS URL is fetched again: 5m, 1h...
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    jwks_refresh: std::time::Duration,
    /// Run in open dev mode (clients name themselves with ?user=) even on
    /// a non-loopback address. Without a key and without this flag, a
    /// server only starts on a loopback address.
    #[arg(long, env = "CHAT_DEV_AUTH")]
    dev_auth: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

fn limit_defaults() -> ingest::limits::Limits {
    ingest::limits::Limits::default()
}

/// The abuse limits (docs/protocol.md, Limits). Rates are per second; 0
/// turns a rate or a count off.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Abuse limits")]
struct LimitArgs {
    /// Sends (and typing frames) per second of one connection; over it,
    /// `rate_limited` with `retry_after_ms`.
    #[arg(long, default_value_t = limit_defaults().send_rate.per_second, env = "CHAT_SEND_RATE")]
    send_rate: u32,
    /// Sends one connection may make at once before --send-rate applies.
    #[arg(long, default_value_t = limit_defaults().send_rate.burst)]
    send_burst: u32,
    /// Sends per second of one user over all its connections and posts on
    /// this node.
    #[arg(long, default_value_t = limit_defaults().user_send_rate.per_second, env = "CHAT_USER_SEND_RATE")]
    user_send_rate: u32,
    /// Sends one user may make at once before --user-send-rate applies.
    #[arg(long, default_value_t = limit_defaults().user_send_rate.burst)]
    user_send_burst: u32,
    /// Open WebSocket connections from one IP address (429 beyond).
    #[arg(long, default_value_t = limit_defaults().connections_per_ip, env = "CHAT_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: usize,
    /// Open WebSocket connections of one user on this node (429 beyond).
    #[arg(long, default_value_t = limit_defaults().connections_per_user, env = "CHAT_MAX_CONNECTIONS_PER_USER")]
    max_connections_per_user: usize,
    /// Rooms one connection may have joined at once.
    #[arg(long, default_value_t = limit_defaults().rooms_per_connection)]
    max_rooms_per_connection: usize,
    /// Largest WebSocket frame; a larger one closes the connection with
    /// 1009, refused at its header.
    #[arg(long, default_value_t = limit_defaults().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Largest HTTP request body (413 `too_large` beyond).
    #[arg(long, default_value_t = limit_defaults().max_body_bytes)]
    max_body_bytes: usize,
    /// How often the server pings each connection (0s: never).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    ping_every: std::time::Duration,
    /// How long a connection may send nothing, not even a pong, before it
    /// is closed with 4002 (0s: forever).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// A web origin (`https://chat.example.com`) whose pages may open a
    /// WebSocket; repeatable; `*` for any. Default: pages of the same host
    /// only. Requests without an Origin (not from a browser) always may.
    #[arg(long, env = "CHAT_ALLOWED_ORIGIN", value_delimiter = ',')]
    allowed_origin: Vec<String>,
    /// A proxy (CIDR, e.g. 10.0.0.0/8) whose X-Forwarded-For names the
    /// client's address for --max-connections-per-ip; repeatable. Without
    /// one, the TCP peer counts (behind a proxy: the proxy).
    #[arg(long, env = "CHAT_TRUSTED_PROXY", value_delimiter = ',')]
    trusted_proxy: Vec<ipnet::IpNet>,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<ingest::limits::Limits> {
        use ingest::limits::{Limits, Origins, Rate};
        if self.max_frame_bytes == 0 || self.max_body_bytes == 0 {
            anyhow::bail!("--max-frame-bytes and --max-body-bytes must be above 0");
        }
        if !self.idle_timeout.is_zero()
            && (self.ping_every.is_zero() || self.idle_timeout <= self.ping_every)
        {
            anyhow::bail!(
                "--idle-timeout must be longer than --ping-every (a quiet client only shows it is alive by answering pings)"
            );
        }
        Ok(Limits {
            send_rate: Rate {
                per_second: self.send_rate,
                burst: self.send_burst,
            },
            user_send_rate: Rate {
                per_second: self.user_send_rate,
                burst: self.user_send_burst,
            },
            connections_per_ip: self.max_connections_per_ip,
            connections_per_user: self.max_connections_per_user,
            rooms_per_connection: self.max_rooms_per_connection,
            max_frame_bytes: self.max_frame_bytes,
            max_body_bytes: self.max_body_bytes,
            ping_every: self.ping_every,
            idle_timeout: self.idle_timeout,
            origins: Origins::from_flags(&self.allowed_origin),
            trusted_proxies: self.trusted_proxy.clone(),
        })
    }
}

impl ServeArgs {
    /// How the gateway identifies users, from the key flags.
    async fn auth(&self) -> anyhow::Result<ingest::auth::Auth> {
        use ingest::auth::{jwks, Auth, Verifier};
        let mut verifier = Verifier::new()
            .with_issuer(self.keys.jwt_issuer.clone())
            .with_audience(self.keys.jwt_audience.clone());
        if let Some(secret) = self.keys.secret()? {
            verifier = verifier.with_secret(&secret)?;
        }
        for path in &self.jwt_key {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the JWT key {}", path.display()))?;
            verifier = verifier.with_public_pem(&pem, &path.display().to_string())?;
        }
        if let Some(source) = &self.jwks {
            let set = jwks::Jwks::load(jwks::JwksSource::parse(source)).await?;
            verifier = verifier.with_jwks(set);
        }
        if !verifier.is_empty() {
            if self.dev_auth {
                anyhow::bail!("--dev-auth and a JWT key exclude each other");
            }
            tracing::info!(
                "tokens required: clients sign in with a JWT (?token= or Authorization: Bearer)"
            );
            return Ok(Auth::Tokens(std::sync::Arc::new(verifier)));
        }
        if !self.dev_auth && !self.listen.ip().is_loopback() {
            anyhow::bail!(
                "no JWT key is configured and {} is not a loopback address: give CHAT_JWT_SECRET, --jwt-secret-file, --jwt-key or --jwks, or --dev-auth to run open to anyone",
                self.listen
            );
        }
        tracing::warn!("open dev mode: no JWT key, clients name themselves with ?user=<name>");
        Ok(Auth::Dev)
    }
}

impl Cli {
    /// The default log filter: a server logs what it does; a command's own
    /// output is its report.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

/// Runs the parsed command to its end.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Replay(args) => replay(args).await,
        Command::Versions { action } => versions(action).await,
        Command::Projector { action } => projector(action).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Token(args) => token(args),
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = args
        .keys
        .secret()?
        .context("no JWT secret: set CHAT_JWT_SECRET or --jwt-secret-file")?;
    if !schemas::protocol::valid_user(&args.user) {
        anyhow::bail!("user names match ^[A-Za-z0-9_.-]{{1,64}}$");
    }
    if let Some(rooms) = &args.rooms {
        ingest::auth::RoomGrant::parse(rooms).map_err(anyhow::Error::msg)?;
    }
    let token = ingest::auth::mint(
        &secret,
        &ingest::auth::Mint {
            user: args.user,
            ttl: args.ttl,
            rooms: args.rooms,
            issuer: args.keys.jwt_issuer,
            audience: args.keys.jwt_audience,
        },
    )?;
    println!("{token}");
    Ok(())
}

/// Opens the log of `data` for a command running without a server.
async fn open_log(
    data: &DataArgs,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<std::sync::Arc<dyn eventlog::EventLog>> {
    let spec = data.log.clone().unwrap_or(crate::LogSpec::Embedded);
    if matches!(
        spec,
        crate::LogSpec::Embedded | crate::LogSpec::EmbeddedRedb
    ) {
        let dir = data.data_dir.join("log");
        let files = [format!("{topic}.log"), format!("{topic}.redb")];
        if topic == crate::MESSAGES_TOPIC && !files.iter().any(|f| dir.join(f).exists()) {
            anyhow::bail!(
                "no log in {} (no {} or {} in {})",
                data.data_dir.display(),
                files[0],
                files[1],
                dir.display()
            );
        }
    }
    crate::open_log(
        &spec,
        &data.data_dir,
        topic,
        partitions,
        &data.topics.tuning(),
    )
    .await
    .context("is a chat server without a control socket using this data dir?")
}

async fn open_versions(
    data: &DataArgs,
) -> anyhow::Result<std::sync::Arc<dyn history::versions::Versions>> {
    let opened = crate::open_versions(&data.store, &data.data_dir).await;
    let (versions, _) = match data.store {
        crate::StoreSpec::Embedded => {
            opened.context("is a chat server without a control socket using this data dir?")?
        }
        #[cfg(feature = "scylla")]
        crate::StoreSpec::Scylla(_) => opened?,
    };
    Ok(versions)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use projector::control::{ReplayRequest, Reply, Request};
    projector::control::parse_from(&args.from).map_err(anyhow::Error::msg)?;
    if !(args.progress_every > 0.0 && args.progress_every.is_finite()) {
        anyhow::bail!("--progress-every must be a positive number of seconds");
    }
    let style =
        crate::progress::Style::detect(std::time::Duration::from_secs_f64(args.progress_every));
    let request = ReplayRequest {
        from: args.from.clone(),
        into: args.into.clone(),
        switch: args.switch,
    };
    let (progress, watched) = tokio::sync::watch::channel(Default::default());
    let report = if let Some(stream) = projector::control::connect(&args.data.data_dir).await {
        // A server holds the data dir: it replays, next to the version it
        // serves, and streams the progress here.
        let mut replies = projector::control::request(stream, &Request::Replay(request)).await?;
        let mut draw = None;
        let mut outcome = None;
        while let Some(reply) = replies.next().await? {
            match reply {
                Reply::Started { version, log } => {
                    if let Some(asked) = &args.data.log {
                        anyhow::ensure!(
                            crate::log_name(asked) == log,
                            "the server on {} reads {log}, not {}",
                            args.data.data_dir.display(),
                            crate::log_name(asked)
                        );
                    }
                    eprintln!("replaying inside the chat server on {} (log {log}) into {version}; reads keep being served", args.data.data_dir.display());
                    let watched = watched.clone();
                    draw = Some(tokio::spawn(async move {
                        crate::progress::render(&version, watched, style).await
                    }));
                }
                Reply::Progress(p) => {
                    progress.send_replace(p);
                }
                Reply::Done(report) => outcome = Some(Ok(report)),
                Reply::Error(e) => outcome = Some(Err(anyhow::anyhow!(e))),
                other => outcome = Some(Err(anyhow::anyhow!("unexpected reply {other:?}"))),
            }
        }
        drop(progress);
        if let Some(draw) = draw {
            draw.await.context("progress display")?;
        }
        outcome.unwrap_or_else(|| Err(anyhow::anyhow!("the server closed the connection")))?
    } else {
        let log = open_log(&args.data, crate::MESSAGES_TOPIC, args.data.partitions).await?;
        let dlq = open_log(&args.data, projector::DLQ_TOPIC, 1).await?;
        let versions = open_versions(&args.data).await?;
        let target = projector::control::pick_target(&*versions, args.into.as_deref()).await?;
        let shutdown = CancellationToken::new();
        let on_signal = tokio::spawn(on_signal(shutdown.clone()));
        let draw = tokio::spawn({
            let target = target.clone();
            async move { crate::progress::render(&target, watched, style).await }
        });
        let report = projector::control::replay_into(
            log,
            Some(dlq),
            &*versions,
            None,
            &target,
            &request,
            &progress,
            shutdown,
        )
        .await;
        drop(progress);
        draw.await.context("progress display")?;
        on_signal.abort();
        report?
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

/// The projection versions of the store of `data`: from the server holding
/// the data dir when one runs, else from the store itself.
async fn list_versions(data: &DataArgs) -> anyhow::Result<Vec<history::versions::VersionInfo>> {
    use projector::control::{Reply, Request};
    if let Some(stream) = projector::control::connect(&data.data_dir).await {
        let mut replies = projector::control::request(stream, &Request::Versions).await?;
        return match replies
            .next()
            .await?
            .context("the server closed the connection")?
        {
            Reply::Versions(list) => Ok(list),
            Reply::Error(e) => anyhow::bail!("{e}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        };
    }
    Ok(open_versions(data).await?.list().await?)
}

async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    use crate::doctor::{event_findings, version_findings, Finding, Report};
    let log = args.data.log.clone().unwrap_or(crate::LogSpec::Embedded);
    let mut findings = Vec::new();
    match &log {
        crate::LogSpec::Embedded | crate::LogSpec::EmbeddedRedb => {
            let dir = args.data.data_dir.join("log");
            let what = if dir.exists() {
                format!("the embedded log in {}", dir.display())
            } else {
                format!(
                    "no embedded log in {} yet: the first `chat serve` makes it",
                    dir.display()
                )
            };
            findings.push(Finding::ok("log", what));
        }
        #[cfg(feature = "kafka")]
        crate::LogSpec::Kafka(brokers) => {
            use crate::doctor::{topic_findings, TopicFacts, TopicRole};
            let tuning = args.data.topics.tuning();
            let partitions = args.data.partitions;
            for (topic, role) in [
                (schemas::MESSAGES_TOPIC, TopicRole::Messages { partitions }),
                (projector::DLQ_TOPIC, TopicRole::DeadLetters),
                (fanout::presence::EPHEMERAL_TOPIC, TopicRole::Ephemeral),
            ] {
                let config = tuning.config(brokers, topic, partitions);
                match eventlog::kafka::inspect_topic(&config).await {
                    Ok(report) => {
                        let facts = TopicFacts {
                            topic,
                            layout: report
                                .exists
                                .then_some((report.partitions, report.replicas)),
                            retention_ms: report.retention_ms.as_deref(),
                            log_problems: if report.exists {
                                report.problems_as_log(tuning.replication)
                            } else {
                                Vec::new()
                            },
                        };
                        findings.extend(topic_findings(&facts, role, tuning.replication));
                    }
                    Err(e) => findings.push(Finding::problem(
                        topic,
                        format!("the brokers did not describe it: {e}"),
                        format!("check that {brokers} is reachable from here"),
                    )),
                }
            }
        }
    }
    match list_versions(&args.data).await {
        Ok(versions) => findings.extend(version_findings(&versions)),
        Err(e) => findings.push(Finding::problem(
            "store",
            format!("cannot list the projection versions: {e:#}"),
            "check --store (CHAT_STORE) and --data-dir".to_owned(),
        )),
    }
    findings.extend(event_findings());
    let report = Report::new(crate::log_name(&log), findings);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for finding in &report.findings {
            println!("{}", finding.line());
        }
    }
    if report.problems > 0 {
        anyhow::bail!("{} problem(s) found", report.problems);
    }
    Ok(())
}

async fn projector(action: ProjectorAction) -> anyhow::Result<()> {
    use projector::control::{Reply, Request};
    let (data_dir, paused) = match &action {
        ProjectorAction::Pause { data_dir } => (data_dir, true),
        ProjectorAction::Resume { data_dir } => (data_dir, false),
    };
    let stream = projector::control::connect(data_dir)
        .await
        .with_context(|| {
            format!(
                "no chat serve holds {} (no control socket there)",
                data_dir.display()
            )
        })?;
    let mut replies = projector::control::request(stream, &Request::Pause { paused }).await?;
    match replies
        .next()
        .await?
        .context("the server closed the connection")?
    {
        Reply::Ok(text) => {
            println!("{text}");
            Ok(())
        }
        Reply::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

async fn versions(action: VersionsAction) -> anyhow::Result<()> {
    use projector::control::{Reply, Request};
    let (data, request) = match &action {
        VersionsAction::List { data, .. } => (data, Request::Versions),
        VersionsAction::Switch { name, data } => (data, Request::Switch { to: name.clone() }),
        VersionsAction::Drop { name, data } => (
            data,
            Request::Drop {
                version: name.clone(),
            },
        ),
    };
    let reply = if let Some(stream) = projector::control::connect(&data.data_dir).await {
        let mut replies = projector::control::request(stream, &request).await?;
        replies
            .next()
            .await?
            .context("the server closed the connection")?
    } else {
        let versions = open_versions(data).await?;
        let outcome = match &request {
            Request::Versions => versions.list().await.map(Reply::Versions),
            Request::Switch { to } => versions
                .set_current(to)
                .await
                .map(|()| Reply::Ok(format!("reads now use {to}"))),
            Request::Drop { version } => versions
                .drop_version(version)
                .await
                .map(|()| Reply::Ok(format!("dropped {version}"))),
            Request::Replay(_) | Request::Pause { .. } => {
                unreachable!("not a versions request")
            }
        };
        outcome.unwrap_or_else(|e| Reply::Error(e.to_string()))
    };
    match reply {
        Reply::Versions(list) => {
            if matches!(action, VersionsAction::List { json: true, .. }) {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<12} {:<9} {:<8} {:>12}  {:<26} CREATED",
                    "VERSION", "STATE", "CURRENT", "RECORDS", "FROM"
                );
                for v in list {
                    let state = serde_json::to_value(v.state)?;
                    let created = if v.created_ms > 0 {
                        time::OffsetDateTime::from_unix_timestamp_nanos(
                            i128::from(v.created_ms) * 1_000_000,
                        )
                        .ok()
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_default()
                    } else {
                        "-".to_owned()
                    };
                    println!(
                        "{:<12} {:<9} {:<8} {:>12}  {:<26} {created}",
                        v.name,
                        state.as_str().unwrap_or("?"),
                        if v.current { "*" } else { "" },
                        v.records,
                        v.from,
                    );
                }
            }
            Ok(())
        }
        Reply::Ok(message) => {
            println!("{message}");
            Ok(())
        }
        Reply::Error(e) => anyhow::bail!(e),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.partitions == 0 {
        anyhow::bail!("--partitions must be at least 1");
    }
    let metrics = crate::metrics_recorder()?;
    crate::describe_metrics();
    crate::register_metrics();
    // Before binding: a server refused for its auth never listens.
    let auth = args.auth().await?;
    let limits = args.limits.limits()?;
    let shared_reads = schemas::protocol::RoomPatterns::parse(&args.shared_reads)
        .map_err(|e| anyhow::anyhow!("--shared-reads: {e}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening; web page at http://{addr}/");
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let config = crate::ServeConfig {
        data_dir: args.data_dir,
        partitions: args.partitions,
        log: args.log,
        kafka: crate::KafkaTuning {
            queue_kbytes: args.log_queue_kbytes,
            enqueue_timeout: std::time::Duration::from_millis(args.log_enqueue_timeout_ms),
            fetch_wait: std::time::Duration::from_millis(args.log_fetch_wait_ms.max(1)),
            ..args.topics.tuning()
        },
        store: args.store,
        roles: args.roles,
        group: args.group,
        presence: fanout::presence::PresenceConfig::with_heartbeat(
            std::time::Duration::from_millis(args.presence_heartbeat_ms.max(10)),
        ),
        gateway: ingest::GatewayConfig {
            node: args.node,
            client_queue: args.client_queue,
            send_timeout: std::time::Duration::from_millis(args.send_timeout_ms),
            jwks_refresh: args.jwks_refresh,
            limits,
            read_positions: args.read_positions,
            message_changes: args.message_changes,
            ready_max_lag: args.ready_max_lag_records,
            shared_reads: std::sync::Arc::new(shared_reads),
            ..Default::default()
        },
        auth,
    };
    crate::serve(listener, config, Some(metrics), shutdown).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command's flags are unique and well formed (clap checks it
    /// only when a command is parsed, so a bad one would fail at run time).
    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[cfg(feature = "scylla")]
    #[test]
    fn the_store_flag_takes_a_scylla_uri_and_refuses_a_bad_one() {
        // As redpanda/compose.yaml passes it.
        let cli =
            Cli::try_parse_from(["chat", "serve", "--store=scylla://scylla:9042/chat"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert!(matches!(args.store, crate::StoreSpec::Scylla(t) if t.keyspace == "chat"));
        let cli = Cli::try_parse_from(["chat", "versions", "list", "--store", "scylla://a,b/ks"])
            .unwrap();
        assert!(matches!(cli.command, Command::Versions { .. }));
        let e = Cli::try_parse_from(["chat", "serve", "--store", "scylla://bad"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--store") && e.contains("missing /KEYSPACE"),
            "{e}"
        );
    }
}
