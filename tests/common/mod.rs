//! Helpers for end-to-end tests: a real `chat` process on a free port and a
//! real WebSocket client. Every wait has a deadline; nothing sleeps blindly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(30);

/// The environment that turns the rate and connection-count limits off.
pub const UNLIMITED: [(&str, &str); 4] = [
    ("CHAT_SEND_RATE", "0"),
    ("CHAT_USER_SEND_RATE", "0"),
    ("CHAT_MAX_CONNECTIONS_PER_IP", "0"),
    ("CHAT_MAX_CONNECTIONS_PER_USER", "0"),
];

/// A `chat serve` process, killed with SIGKILL when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    log_file: PathBuf,
    status: Option<std::process::ExitStatus>,
}

impl Server {
    /// Starts `chat serve` on a free port of 127.0.0.1 with `data_dir`.
    pub async fn start(data_dir: &Path, partitions: u32) -> Server {
        Self::start_with(data_dir, partitions, &[]).await
    }

    pub async fn start_with(data_dir: &Path, partitions: u32, extra: &[&str]) -> Server {
        Self::start_env(data_dir, partitions, extra, &[]).await
    }

    /// Starts `chat serve` with `extra` flags and `env` variables, without
    /// rate and connection-count limits unless a flag sets them.
    pub async fn start_env(
        data_dir: &Path,
        partitions: u32,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let log_file = data_dir.join(format!("server-{}.log", uuid::Uuid::new_v4().simple()));
        let stderr = std::fs::File::create(&log_file).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(["serve", "--listen", "127.0.0.1:0", "--partitions"])
            .arg(partitions.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // The test broker is a single broker: one replica, one in sync.
            .env("CHAT_LOG_REPLICATION_FACTOR", "1")
            .env("CHAT_LOG_MIN_INSYNC_REPLICAS", "1")
            // Tests send as fast as they can from one user and one address;
            // the tests of the limits set their own with flags.
            .envs(UNLIMITED)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("chat binary starts");
        let mut server = Server {
            child,
            addr: String::new(),
            data_dir: data_dir.to_owned(),
            log_file,
            status: None,
        };
        server.addr = server.wait_for_addr().await;
        server
    }

    async fn wait_for_addr(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            if let Some(rest) = log.split("web page at http://").nth(1) {
                return rest.split('/').next().unwrap().to_owned();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chat serve exited with {status}:\n{log}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit, keeping the server (its data
    /// dir and exit status) for later.
    pub async fn terminate_keep(mut self) -> Server {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                return self;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.status
    }

    /// The value of an unlabelled metric in `/metrics`, 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of every series of metric `name` in `/metrics`, whatever its
    /// labels; 0 when absent.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum()
    }

    /// What metric `name` says, whatever its kind: the sum of its series,
    /// or for a histogram the sum of its `_count`s (samples taken).
    pub async fn metric_text_of(&self, name: &str) -> f64 {
        let counted = self.metric_sum(&format!("{name}_count")).await;
        if counted > 0.0 {
            return counted;
        }
        self.metric_sum(name).await
    }

    /// How many series of metric `name` `/metrics` shows.
    pub async fn metric_series(&self, name: &str) -> usize {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(['{', ' ']))
            })
            .count()
    }

    async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&self.addr, user).await
    }

    /// Connects with `?token=`; the `welcome` must name `user`.
    pub async fn connect_token(&self, token: &str, user: &str) -> Client {
        match Client::open(&self.addr, &format!("token={token}"), None).await {
            Ok(c) => c.welcomed(user).await,
            Err(status) => panic!("upgrade refused with {status}"),
        }
    }

    /// `GET path` with an optional bearer token: the status and the JSON
    /// body (null when the body is not JSON).
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = reqwest::Client::new().get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST /rooms/{room}/messages` of `{id, body}` with an optional bearer
    /// token: the status and the JSON body.
    pub async fn post_as(
        &self,
        room: &str,
        id: &str,
        body: &str,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(self.url(&format!("/rooms/{room}/messages")))
            .json(&json!({"id": id, "body": body}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Every message of `room` in history, walking pages of `limit` back with
    /// `before` cursors; returns them oldest first.
    pub async fn history(&self, room: &str, limit: usize) -> Vec<Value> {
        let http = reqwest::Client::new();
        let mut all: Vec<Value> = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let mut url = self.url(&format!("/rooms/{room}/messages?limit={limit}"));
            if let Some(b) = before {
                url.push_str(&format!("&before={b}"));
            }
            let page: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
            let messages = page["messages"].as_array().unwrap().clone();
            assert!(messages.len() <= limit);
            all.splice(0..0, messages);
            match page["before"].as_i64() {
                Some(b) => before = Some(b),
                None => return all,
            }
        }
    }

    /// Waits until the history of `room` holds `n` messages.
    pub async fn history_with(&self, room: &str, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let h = self.history(room, 50).await;
            if h.len() >= n || tokio::time::Instant::now() > deadline {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// A WebSocket chat client speaking the client protocol (docs/protocol.md).
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
}

impl Client {
    pub async fn connect(addr: &str, user: &str) -> Client {
        match Client::open(addr, &format!("user={user}"), None).await {
            Ok(c) => c.welcomed(user).await,
            Err(status) => panic!("upgrade refused with {status}"),
        }
    }

    /// Upgrades `/ws?{query}`, with an `Authorization: Bearer` header when
    /// `bearer` is given; `Err(status)` when the server refuses the upgrade.
    pub async fn open(addr: &str, query: &str, bearer: Option<&str>) -> Result<Client, u16> {
        let authorization = bearer.map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|value| ("authorization", value.as_str()))
            .collect();
        Client::open_with(addr, query, &headers)
            .await
            .map_err(|(status, _)| status)
    }

    /// Upgrades `/ws?{query}` with extra request `headers`; `Err((status,
    /// body))` when the server refuses the upgrade.
    pub async fn open_with(
        addr: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, (u16, Value)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/ws?{query}")
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                value.parse().unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                user: String::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((response.status().as_u16(), body))
            }
            Err(e) => panic!("websocket connect: {e}"),
        }
    }

    /// Reads the `welcome`, which must name `user`.
    pub async fn welcomed(mut self, user: &str) -> Client {
        let welcome = self.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["user"], user);
        self.user = user.to_owned();
        self
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends a text frame; false when the server had closed the connection
    /// before it was all written.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next frame; panics after the deadline.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(WAIT)
            .await
            .expect("a frame before the deadline")
    }

    /// The next text frame within `wait`, or None.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next()).await.ok()??;
            match msg.expect("websocket read") {
                Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
                Message::Close(frame) => {
                    return Some(json!({"type": "close", "code": frame.map(|f| u16::from(f.code))}))
                }
                _ => continue,
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// Joins `room` (live, or from `since`) and returns the `joined` frame.
    pub async fn join(&mut self, room: &str, since: Option<(i64, &str)>) -> Value {
        let mut frame = json!({"type": "join", "room": room});
        if let Some((offset, epoch)) = since {
            frame["since"] = json!({"offset": offset, "epoch": epoch});
        }
        self.send_json(frame).await;
        let joined = self.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(joined["room"], room);
        joined
    }

    pub async fn send_message(&mut self, room: &str, id: &str, body: &str) {
        self.send_json(json!({"type": "send", "room": room, "id": id, "body": body}))
            .await;
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}
