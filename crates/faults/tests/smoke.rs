//! A short bounded run of the fault harness on each backend: processes are
//! killed and stalled under load (and, on Kafka, a node is cut from the
//! broker) while clients abandon requests, and the checker must find no
//! violation. The partition needs root, nftables and cgroup v2
//! (`scripts/test.sh` installs nftables).

use std::path::PathBuf;

/// The `chat` binary of this build (the test script builds it first).
fn chat_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("CHAT_BIN") {
        return bin.into();
    }
    // target/<profile>/deps/smoke-<hash> -> target/<profile>/chat
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("chat");
    assert!(
        bin.exists(),
        "{} missing: build the workspace binaries first",
        bin.display()
    );
    bin
}

async fn run(backend: faults::Backend) {
    let config = faults::Config::smoke(backend, chat_bin());
    let cuts = config.faults.contains(&faults::Fault::Partition);
    let report = faults::run(config).await.unwrap();
    println!("{}", report.summary());
    assert!(
        report.kills.values().sum::<u64>() > 0 && report.stalls.values().sum::<u64>() > 0,
        "kills and stalls were injected"
    );
    assert!(
        !cuts || report.partitions.values().sum::<u64>() > 0,
        "a node was cut from the broker"
    );
    assert!(report.acked > 0, "traffic flowed");
    assert!(report.abandoned_posts > 0, "clients abandoned requests");
    assert!(report.passed(), "violations: {:#?}", report.examples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_sigkills_and_stalls() {
    run(faults::Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_gateways_projectors_and_broker_survive_sigkills_stalls_and_partitions() {
    run(faults::Backend::Kafka).await;
}
