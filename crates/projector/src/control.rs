//! `chat replay` and `chat versions`: rebuilding the history from the log into
//! a new projection version, switching reads to it, dropping old versions.
//!
//! Where the work runs: the embedded log and store are files one process
//! holds at a time. So a `chat serve` process listens on a control socket in
//! its data dir ([`SOCKET`]); a `chat replay` or `chat versions` pointed at a
//! data dir a server holds sends its request there and the server runs it,
//! next to the current version it keeps serving, streaming progress back
//! ([`Request`], [`Reply`], one JSON object per line). With no server on the
//! data dir, the command opens the log and store itself ([`replay_into`] is
//! the same code either way).
//!
//! A replay is tied to its requester: when the client goes away, the replay
//! stops (what it applied stays, and `--into` the same version resumes it).
//! One replay at a time per server; a version being replayed into cannot be
//! dropped, and reads only switch to a version a replay completed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::replay::{Progress, Replay, ReplayConfig, ReplayError, StartAt, Summary};
use eventlog::EventLog;
use history::versions::{next_name, CurrentVersion, VersionError, VersionInfo, Versions};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Name of the control socket in a server's data dir.
pub const SOCKET: &str = "chat.sock";
/// Connections the control socket serves at once; more wait in the backlog.
const MAX_CONTROL_CONNECTIONS: usize = 8;
/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How often a server sends a replay's progress to its requester.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Parses `--from`: `earliest`, or an RFC 3339 time (`2026-11-24T10:00:00Z`,
/// `2026-11-24T11:00:00+01:00`).
pub fn parse_from(s: &str) -> Result<StartAt, String> {
    if s == "earliest" {
        return Ok(StartAt::Earliest);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected `earliest` or an RFC 3339 time, got {s:?}: {e}"))?;
    Ok(StartAt::Time((t.unix_timestamp_nanos() / 1_000_000) as i64))
}

/// What to replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// `earliest` or an RFC 3339 time.
    pub from: String,
    /// The version to build; default: the next `vN`. Naming one a stopped
    /// replay left resumes it.
    pub into: Option<String>,
    /// Point reads at the new version once it has caught up with the head.
    pub switch: bool,
}

/// What a finished replay did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub version: String,
    #[serde(flatten)]
    pub summary: Summary,
    /// Reads use the new version now.
    pub switched: bool,
}

impl ReplayReport {
    /// The human summary, one line, then the switch.
    pub fn text(&self) -> String {
        let s = &self.summary;
        let rate = if s.seconds > 0.0 {
            s.records as f64 / s.seconds
        } else {
            0.0
        };
        let mut text = format!(
            "replayed into {}: {} events, {} rooms, {} dead-lettered, {} skipped (before --from); {} records in {:.2} s ({:.0} events/s)",
            self.version, s.events, s.rooms, s.dead_lettered, s.skipped, s.records, s.seconds, rate
        );
        if self.switched {
            text.push_str(&format!("\nreads now use {}", self.version));
        } else {
            text.push_str(&format!(
                "\nreads still use the current version; `chat versions switch {}` moves them",
                self.version
            ));
        }
        text
    }
}

/// What went wrong with a control request, or with the replay it ran. The
/// text of each names what was being done; the cause follows as its
/// [`std::error::Error::source`] (and in [`ControlError::chain`]).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bad --from: {0}")]
    BadFrom(String),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("listing versions")]
    List(#[source] VersionError),
    #[error("creating version {target}")]
    Create {
        target: String,
        #[source]
        source: VersionError,
    },
    #[error("replay into {target} stopped; run it again with --into {target} to resume")]
    Replay {
        target: String,
        #[source]
        source: ReplayError,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a reply from the server")]
    Reply(#[source] serde_json::Error),
}

impl ControlError {
    /// The error and each of its causes, `: `-separated, on one line.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ControlError {
    move |source| ControlError::Io { what, source }
}

/// The version a replay builds: `into`, or the next free `vN`.
pub async fn pick_target(
    versions: &dyn Versions,
    into: Option<&str>,
) -> Result<String, ControlError> {
    if let Some(name) = into {
        history::versions::check_name(name)?;
        return Ok(name.to_owned());
    }
    let existing = versions.list().await.map_err(ControlError::List)?;
    Ok(next_name(existing.iter().map(|v| v.name.as_str())))
}

/// Replays `log` into version `target` of `versions`, then marks it ready
/// and, when asked, points reads at it (through `current` when this process
/// serves reads, so they follow at once).
#[allow(clippy::too_many_arguments)]
pub async fn replay_into(
    log: Arc<dyn EventLog>,
    dlq: Option<Arc<dyn EventLog>>,
    versions: &dyn Versions,
    current: Option<&CurrentVersion>,
    target: &str,
    request: &ReplayRequest,
    progress: &watch::Sender<Progress>,
    shutdown: CancellationToken,
) -> Result<ReplayReport, ControlError> {
    let start = parse_from(&request.from).map_err(ControlError::BadFrom)?;
    let store = versions
        .create(target, &request.from)
        .await
        .map_err(|source| ControlError::Create {
            target: target.to_owned(),
            source,
        })?;
    tracing::info!(version = target, from = request.from, "replay starts");
    let summary = Replay::new(log, store, dlq, ReplayConfig::new(start))
        .run(progress, shutdown)
        .await
        .map_err(|source| ControlError::Replay {
            target: target.to_owned(),
            source,
        })?;
    versions.mark_ready(target).await?;
    if request.switch {
        match current {
            Some(current) => current.switch(target).await?,
            None => versions.set_current(target).await?,
        }
        tracing::info!(version = target, "reads switched");
    }
    Ok(ReplayReport {
        version: target.to_owned(),
        summary,
        switched: request.switch,
    })
}

/// A request to a server's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Replay(ReplayRequest),
    Versions,
    Switch {
        to: String,
    },
    Drop {
        version: String,
    },
    /// Pause (`true`) or resume the server's projector.
    Pause {
        paused: bool,
    },
}

/// A line of a server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "body", rename_all = "snake_case")]
pub enum Reply {
    /// The replay into `version` began, on the server's `log`.
    Started {
        version: String,
        log: String,
    },
    Progress(Progress),
    Done(ReplayReport),
    Versions(Vec<VersionInfo>),
    Ok(String),
    Error(String),
}

/// What a server's control socket needs.
pub struct Control {
    pub log: Arc<dyn EventLog>,
    pub dlq: Arc<dyn EventLog>,
    pub current: CurrentVersion,
    /// The log, as `--log` names it.
    pub log_name: String,
    /// The version a replay is building, if one runs.
    replaying: Mutex<Option<String>>,
    /// The server's projector, when it runs one.
    projector: Option<crate::ProjectorHandle>,
}

/// Clears [`Control::replaying`] when the replay ends, however it ends.
struct ReplayingGuard<'a>(&'a Control);

impl Drop for ReplayingGuard<'_> {
    fn drop(&mut self) {
        *self.0.replaying.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Control {
    pub fn new(
        log: Arc<dyn EventLog>,
        dlq: Arc<dyn EventLog>,
        current: CurrentVersion,
        log_name: String,
    ) -> Self {
        Control {
            log,
            dlq,
            current,
            log_name,
            replaying: Mutex::new(None),
            projector: None,
        }
    }

    /// Lets `chat projector pause|resume` reach the server's projector.
    pub fn with_projector(mut self, projector: Option<crate::ProjectorHandle>) -> Self {
        self.projector = projector;
        self
    }

    fn replaying(&self) -> Option<String> {
        self.replaying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Binds the control socket in `data_dir`, replacing a stale one.
pub fn bind(data_dir: &Path) -> std::io::Result<(UnixListener, PathBuf)> {
    let path = data_dir.join(SOCKET);
    if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    Ok((listener, path))
}

/// Serves the control socket until `shutdown`; waits for its connections
/// (a replay in progress stops) before it returns.
pub async fn serve_control(
    listener: UnixListener,
    control: Arc<Control>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (control, stop) = (control.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = handle(stream, &control, stop).await {
                tracing::debug!(error = %e, "control connection ended");
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(
    stream: UnixStream,
    control: &Control,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            send(&mut w, &Reply::Error(format!("bad request: {e}"))).await?;
            return Ok(());
        }
    };
    let versions = control.current.versions().clone();
    let reply = match request {
        Request::Versions => match versions.list().await {
            Ok(list) => Reply::Versions(list),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Switch { to } => match control.current.switch(&to).await {
            Ok(()) => Reply::Ok(format!("reads now use {to}")),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Drop { version } => {
            if control.replaying().as_deref() == Some(version.as_str()) {
                Reply::Error(format!("a replay is building {version}"))
            } else {
                match versions.drop_version(&version).await {
                    Ok(()) => Reply::Ok(format!("dropped {version}")),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }
        }
        Request::Pause { paused } => match &control.projector {
            Some(projector) => {
                let changed = projector.set_paused(paused);
                let state = if paused { "paused" } else { "running" };
                tracing::info!(paused, "projector {state} (control socket)");
                let already = if changed { "" } else { "already " };
                Reply::Ok(format!("the projector is {already}{state}"))
            }
            None => Reply::Error("this server runs no projector".into()),
        },
        Request::Replay(request) => {
            return replay(control, &*versions, request, reader, w, shutdown).await;
        }
    };
    send(&mut w, &reply).await?;
    Ok(())
}

/// Runs a replay for a control client, streaming its progress; stops it when
/// the client goes away or the server shuts down.
async fn replay(
    control: &Control,
    versions: &dyn Versions,
    request: ReplayRequest,
    mut reader: BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let target = match pick_target(versions, request.into.as_deref()).await {
        Ok(t) => t,
        Err(e) => return send(&mut w, &Reply::Error(e.chain())).await,
    };
    let busy = {
        let mut replaying = control.replaying.lock().unwrap_or_else(|p| p.into_inner());
        let busy = replaying.clone();
        if busy.is_none() {
            *replaying = Some(target.clone());
        }
        busy
    };
    if let Some(other) = busy {
        let busy = Reply::Error(format!("a replay into {other} is running"));
        return send(&mut w, &busy).await;
    }
    let _guard = ReplayingGuard(control);
    send(
        &mut w,
        &Reply::Started {
            version: target.clone(),
            log: control.log_name.clone(),
        },
    )
    .await?;
    let (progress, watched) = watch::channel(Progress::default());
    let stop = shutdown.child_token();
    let job = replay_into(
        control.log.clone(),
        Some(control.dlq.clone()),
        versions,
        Some(&control.current),
        &target,
        &request,
        &progress,
        stop.clone(),
    );
    tokio::pin!(job);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut gone = false;
    let mut sink = [0u8; 64];
    let outcome = loop {
        tokio::select! {
            outcome = &mut job => break outcome,
            _ = tick.tick(), if !gone => {
                let snapshot = watched.borrow().clone();
                if send(&mut w, &Reply::Progress(snapshot)).await.is_err() {
                    gone = true;
                    stop.cancel();
                }
            }
            read = reader.read(&mut sink), if !gone => {
                // The client sends nothing more: EOF (or an error) means it left.
                if matches!(read, Ok(0) | Err(_)) {
                    tracing::info!(version = target, "replay client went away; stopping the replay");
                    gone = true;
                    stop.cancel();
                }
            }
        }
    };
    let reply = match outcome {
        Ok(report) => Reply::Done(report),
        Err(e) => Reply::Error(e.chain()),
    };
    if !gone {
        send(&mut w, &reply).await?;
    }
    Ok(())
}

/// A connection to the control socket of the server holding `data_dir`, if
/// one runs.
pub async fn connect(data_dir: &Path) -> Option<UnixStream> {
    let path = data_dir.join(SOCKET);
    if !path.exists() {
        return None;
    }
    UnixStream::connect(&path).await.ok()
}

/// The replies to a request, line by line. Dropping it closes the
/// connection, which stops a replay the request started.
pub struct Replies {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _requester: tokio::net::unix::OwnedWriteHalf,
}

impl Replies {
    /// The next reply; `None` once the server has closed the connection.
    pub async fn next(&mut self) -> Result<Option<Reply>, ControlError> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(io("reading the server"))?;
        line.map(|l| serde_json::from_str(&l).map_err(ControlError::Reply))
            .transpose()
    }
}

/// Sends `request` to a server's control socket.
pub async fn request(stream: UnixStream, request: &Request) -> Result<Replies, ControlError> {
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(ControlError::Reply)?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(io("sending to the server"))?;
    Ok(Replies {
        lines: BufReader::new(r).lines(),
        _requester: w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parses_earliest_and_rfc3339() {
        assert_eq!(parse_from("earliest").unwrap(), StartAt::Earliest);
        assert_eq!(
            parse_from("2026-11-24T10:00:00Z").unwrap(),
            StartAt::Time(1_795_514_400_000)
        );
        assert_eq!(
            parse_from("2026-11-24T11:00:00.250+01:00").unwrap(),
            StartAt::Time(1_795_514_400_250)
        );
        assert!(parse_from("yesterday").is_err());
        assert!(parse_from("2026-11-24").is_err());
    }

    #[test]
    fn requests_and_replies_are_json_lines() {
        let r = Request::Replay(ReplayRequest {
            from: "earliest".into(),
            into: None,
            switch: true,
        });
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let done = Reply::Done(ReplayReport {
            version: "v2".into(),
            summary: Summary {
                events: 3,
                ..Summary::default()
            },
            switched: false,
        });
        let text = serde_json::to_string(&done).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), done);
    }
}
