//! The store conformance suite against a real ScyllaDB, named by
//! `SCYLLA_URI` (e.g. `scylla://127.0.0.1:9042/chat_test`). Its cases are
//! `#[ignore]`d so that a run without a cluster reports them as skipped, not
//! passed; `scripts/test.sh` runs them with `--run-ignored only` when
//! `SCYLLA_URI` is set, and then a cluster that cannot be reached fails them.
//!
//! Each store case gets a fresh projection version (a random namespace, so
//! new tables) in the URI's keyspace; drop the keyspace afterwards to clean
//! up. Each versions case gets a keyspace of its own (the URI's name with a
//! random suffix: the versions table is per keyspace) and drops it when it
//! passes.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ScyllaStore, ScyllaUri, ScyllaVersions};
use crate::conformance::StoreHarness;
use crate::versions::{CurrentVersion, VersionState, Versions};
use crate::HistoryStore;

struct Harness {
    uri: String,
}

#[async_trait]
impl StoreHarness for Harness {
    async fn fresh(&self) -> Arc<dyn HistoryStore> {
        let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let store = ScyllaStore::connect(&self.uri, &namespace)
            .await
            .unwrap_or_else(|e| panic!("scylla store at {}: {e}", self.uri));
        Arc::new(store)
    }
}

fn harness() -> Harness {
    let uri = std::env::var("SCYLLA_URI")
        .expect("SCYLLA_URI must name a ScyllaDB, e.g. scylla://127.0.0.1:9042/chat_test");
    Harness { uri }
}

crate::store_conformance_suite!(
    #[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
    harness()
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
async fn pages_cross_production_buckets() {
    // Offsets far apart, so rows land in many buckets of 16,384 offsets.
    let s = harness().fresh().await;
    let all: Vec<_> = (0..120u64)
        .map(|i| crate::conformance::message("r", i * 5_000 + 7, &format!("m{i}")))
        .collect();
    for chunk in all.chunks(25) {
        let next = chunk.last().unwrap().offset as u64 + 1;
        s.apply(0, chunk.to_vec(), next).await.unwrap();
    }
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let page = s.page("r", before, 17).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page[0].offset as u64);
        walked.splice(0..0, page);
    }
    assert_eq!(walked, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
async fn namespaces_are_separate_versions() {
    let uri = harness().uri;
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let v1 = ScyllaStore::connect(&uri, &ns).await.unwrap();
    let v2 = v1.namespace(&format!("{ns}_2")).await.unwrap();
    v1.apply(0, vec![crate::conformance::message("r", 0, "a")], 1)
        .await
        .unwrap();
    assert_eq!(v1.page("r", None, 10).await.unwrap().len(), 1);
    assert!(v2.page("r", None, 10).await.unwrap().is_empty());
    assert_eq!(v2.position(0).await.unwrap(), None);
}

/// The URI of `SCYLLA_URI` with a keyspace of its own.
fn fresh_keyspace() -> ScyllaUri {
    let uri = harness().uri;
    let mut target =
        ScyllaUri::parse(&uri).unwrap_or_else(|e| panic!("SCYLLA_URI is not a store uri: {e}"));
    let base = &target.keyspace[..target.keyspace.len().min(39)];
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    target.keyspace = format!("{base}_{suffix}");
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
async fn versions_live_their_life() {
    let target = fresh_keyspace();
    let versions = ScyllaVersions::connect(&target, "v1").await.unwrap();
    assert_eq!(versions.id(), format!("scylla-{}", target.keyspace));
    super::catalog::lifecycle(&versions).await;
    versions.drop_keyspace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
async fn a_keyspace_from_before_versions_has_v1_current() {
    let target = fresh_keyspace();
    let v1 = ScyllaStore::open(&target, "v1").await.unwrap();
    let batch: Vec<_> = (0..5)
        .map(|o| crate::conformance::message("r", o, &format!("i{o}")))
        .collect();
    v1.apply(2, batch, 5).await.unwrap();
    let versions = ScyllaVersions::connect(&target, "v1").await.unwrap();
    assert_eq!(versions.current().await.unwrap(), "v1");
    let list = versions.list().await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].current && list[0].state == VersionState::Ready);
    assert_eq!((list[0].records, list[0].created_ms), (5, 0));
    let store = versions.open("v1").await.unwrap();
    assert_eq!(store.page("r", None, 10).await.unwrap().len(), 5);
    versions.drop_keyspace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SCYLLA_URI: run with --run-ignored only when a ScyllaDB is given"]
async fn another_process_follows_a_switch() {
    let target = fresh_keyspace();
    // Two processes on one keyspace: each its own session.
    let here = ScyllaVersions::connect(&target, "v1").await.unwrap();
    let there: Arc<dyn Versions> = Arc::new(ScyllaVersions::connect(&target, "v1").await.unwrap());
    let following = CurrentVersion::open(there).await.unwrap();
    let v2 = here.create("v2", "earliest").await.unwrap();
    v2.apply(0, vec![crate::conformance::message("r", 0, "a")], 1)
        .await
        .unwrap();
    here.mark_ready("v2").await.unwrap();
    here.set_current("v2").await.unwrap();
    assert!(following.refresh().await.unwrap());
    assert_eq!(&*following.active().name, "v2");
    assert_eq!(following.page("r", None, 10).await.unwrap().len(), 1);
    here.drop_keyspace().await.unwrap();
}
