//! Log errors: a dispatcher reads again after a failure (backing off), from
//! where it stopped, and a shutdown ends its wait.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use eventlog::{LogError, RecordStream};
use futures::StreamExt;

use super::*;

/// A log whose first `failing` reads fail at once, and whose read number
/// `break_after_batch` (1-based) fails after its first batch.
struct FlakyLog {
    inner: Arc<dyn EventLog>,
    failing: usize,
    break_after_batch: Option<usize>,
    reads: AtomicUsize,
    read_seen: tokio::sync::Notify,
}

impl FlakyLog {
    fn wrap(h: &Harness, failing: usize, break_after_batch: Option<usize>) -> Arc<Self> {
        Arc::new(FlakyLog {
            inner: h.log.clone(),
            failing,
            break_after_batch,
            reads: AtomicUsize::new(0),
            read_seen: tokio::sync::Notify::new(),
        })
    }
}

#[async_trait]
impl EventLog for FlakyLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }
    fn epoch(&self) -> &str {
        self.inner.epoch()
    }
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        self.inner.append(records).await
    }
    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.inner.end_offset(partition).await
    }
    async fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.inner.start_offset(partition).await
    }
    fn read(&self, partition: u32, from: u64) -> RecordStream {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        self.read_seen.notify_one();
        let broken = || LogError::Unavailable("injected".into());
        if n <= self.failing {
            return futures::stream::once(async move { Err(broken()) }).boxed();
        }
        let stream = self.inner.read(partition, from);
        if self.break_after_batch == Some(n) {
            return stream
                .take(1)
                .chain(futures::stream::once(async move { Err(broken()) }))
                .boxed();
        }
        stream
    }
    async fn load_position(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.inner.load_position(group, partition).await
    }
    async fn store_position(&self, group: &str, partition: u32, next: u64) -> Result<(), LogError> {
        self.inner.store_position(group, partition, next).await
    }
}

fn quick_retry() -> FanoutConfig {
    FanoutConfig {
        retry: Duration::from_millis(1),
        ..FanoutConfig::default()
    }
}

#[tokio::test]
async fn a_dispatcher_reads_again_after_log_errors() {
    let h = Harness::new(1, FanoutConfig::default());
    let flaky = FlakyLog::wrap(&h, 3, None);
    let fanout = Fanout::new(flaky.clone(), quick_retry());
    let (m, mut rx, _) = h.member(64);
    within("join", fanout.join("a", &m, None)).await.unwrap();
    expect_joined(&mut rx).await;
    h.append(&[record("a", "m0", "hi")]).await;
    assert_eq!(expect_message(&mut rx).await.id, "m0");
    assert_eq!(
        flaky.reads.load(Ordering::SeqCst),
        4,
        "three failed reads, one good"
    );
    fanout.shutdown().await;
}

#[tokio::test]
async fn a_read_that_fails_midway_resumes_where_it_stopped() {
    let h = Harness::new(1, FanoutConfig::default());
    let flaky = FlakyLog::wrap(&h, 0, Some(1));
    let fanout = Fanout::new(flaky.clone(), quick_retry());
    let (m, mut rx, _) = h.member(64);
    within("join", fanout.join("a", &m, None)).await.unwrap();
    expect_joined(&mut rx).await;
    h.append(&[record("a", "m0", "hi"), record("a", "m1", "hi")])
        .await;
    let got = messages_until(&mut rx, "m1").await;
    // The second read is the dispatcher's re-open after the failure.
    while flaky.reads.load(Ordering::SeqCst) < 2 {
        within("the re-open", flaky.read_seen.notified()).await;
    }
    h.append(&[record("a", "m2", "hi")]).await;
    assert_eq!(expect_message(&mut rx).await.id, "m2");
    assert_eq!(
        got.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [0, 1],
        "nothing twice, nothing lost"
    );
    assert!(rx.try_recv().is_err());
    fanout.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_a_dispatcher_waiting_to_retry() {
    let h = Harness::new(1, FanoutConfig::default());
    let flaky = FlakyLog::wrap(&h, usize::MAX, None);
    let fanout = Fanout::new(
        flaky.clone(),
        FanoutConfig {
            retry: Duration::from_secs(3600),
            ..FanoutConfig::default()
        },
    );
    let (m, mut rx, _) = h.member(64);
    within("join", fanout.join("a", &m, None)).await.unwrap();
    expect_joined(&mut rx).await;
    while flaky.reads.load(Ordering::SeqCst) < 1 {
        within("the first read", flaky.read_seen.notified()).await;
    }
    within("shutdown", fanout.shutdown()).await;
}
