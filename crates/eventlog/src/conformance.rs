//! The conformance suite every log backend must pass, written once.
//!
//! A backend provides a [`LogHarness`] and expands [`log_conformance_suite!`]
//! in a test module; each case becomes its own named `#[tokio::test]`, so a
//! failure names the broken promise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::{partitioner, EventLog, LogError, LogRecord, Record, RecordStream};

/// How a backend makes logs for the suite.
#[async_trait]
pub trait LogHarness: Send + Sync {
    /// A new, empty log with `partitions` partitions, and where it lives.
    async fn fresh(&self, partitions: u32) -> (Arc<dyn EventLog>, String);
    /// A new handle on the log at `location`, as a restarted process opens it.
    async fn reopen(&self, location: &str, partitions: u32) -> Result<Arc<dyn EventLog>, LogError>;
}

/// Expands the suite into one `#[tokio::test]` per case; `$harness` is an
/// expression building a [`LogHarness`].
#[macro_export]
macro_rules! log_conformance_suite {
    ($harness:expr) => {
        $crate::log_conformance_suite!(@cases $harness;
            append_places_records_by_key_with_dense_offsets,
            read_returns_records_in_order_with_contents,
            read_from_an_offset_skips_earlier_records,
            read_tails_records_appended_later,
            reads_that_come_and_go_while_records_arrive_miss_nothing,
            a_read_that_is_not_consumed_holds_up_no_other_read,
            end_offset_follows_appends,
            start_offset_is_zero_while_every_record_is_held,
            acked_records_survive_reopen,
            reopen_with_another_partition_count_fails,
            concurrent_appends_keep_each_callers_order,
            consumer_positions_are_stored,
            empty_append_is_a_no_op,
            epochs_differ_between_logs,
            out_of_range_partition_is_an_error,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $harness;
                $crate::conformance::$case(&harness).await;
            }
        )*
    };
}

const WAIT: Duration = Duration::from_secs(30);

fn rec(key: &str, value: &str) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ts: 1_700_000_000_000,
    }
}

/// Reads `n` records from a stream, failing after a deadline.
pub async fn take(stream: &mut RecordStream, n: usize) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n {
        let batch = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived", out.len()))
            .expect("stream ended early")
            .expect("read failed");
        out.extend(batch);
    }
    out
}

pub async fn append_places_records_by_key_with_dense_offsets(h: &impl LogHarness) {
    let (log, _) = h.fresh(4).await;
    let records: Vec<Record> = (0..40)
        .map(|i| rec(&format!("room-{}", i % 7), &i.to_string()))
        .collect();
    let placed = log.append(records.clone()).await.unwrap();
    assert_eq!(placed.len(), records.len());
    let mut next: HashMap<u32, u64> = HashMap::new();
    for (r, a) in records.iter().zip(&placed) {
        assert_eq!(a.partition, partitioner::partition_for(&r.key, 4));
        assert_eq!(a.partition, log.partition_for(&r.key));
        let expected = next.entry(a.partition).or_insert(0);
        assert_eq!(a.offset, *expected, "offsets are dense per partition");
        *expected += 1;
    }
}

pub async fn read_returns_records_in_order_with_contents(h: &impl LogHarness) {
    let (log, _) = h.fresh(2).await;
    let records: Vec<Record> = (0..300)
        .map(|i| rec("same-room", &format!("v{i}")))
        .collect();
    for chunk in records.chunks(50) {
        log.append(chunk.to_vec()).await.unwrap();
    }
    let p = log.partition_for(b"same-room");
    let got = take(&mut log.read(p, 0), 300).await;
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.partition, p);
        assert_eq!(r.key, b"same-room");
        assert_eq!(r.value, format!("v{i}").into_bytes());
        assert_eq!(r.ts, 1_700_000_000_000);
    }
}

pub async fn read_from_an_offset_skips_earlier_records(h: &impl LogHarness) {
    let (log, _) = h.fresh(1).await;
    log.append((0..10).map(|i| rec("k", &i.to_string())).collect())
        .await
        .unwrap();
    let got = take(&mut log.read(0, 7), 3).await;
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
}

pub async fn read_tails_records_appended_later(h: &impl LogHarness) {
    let (log, _) = h.fresh(3).await;
    let p = log.partition_for(b"tail");
    let mut stream = log.read(p, 0);
    let writer = log.clone();
    let appends = tokio::spawn(async move {
        for i in 0..5 {
            writer
                .append(vec![rec("tail", &i.to_string())])
                .await
                .unwrap();
        }
    });
    let got = take(&mut stream, 5).await;
    appends.await.unwrap();
    let values: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).unwrap())
        .collect();
    assert_eq!(values, ["0", "1", "2", "3", "4"]);
}

/// A key of each partition of `log`, by partition.
fn key_per_partition(log: &dyn EventLog) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; log.partitions() as usize];
    for i in 0.. {
        let key = format!("key-{i}");
        let slot = &mut keys[log.partition_for(key.as_bytes()) as usize];
        if slot.is_none() {
            *slot = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().flatten().collect()
}

/// Checks that `got` holds the records of `partition` from `from` on,
/// densely, with the values `expected` (by offset) says.
fn assert_dense(what: &str, got: &[LogRecord], from: u64, expected: &[Vec<u8>]) {
    for (i, r) in got.iter().enumerate() {
        let offset = from + i as u64;
        assert_eq!(r.offset, offset, "{what}: offsets are dense from {from}");
        assert_eq!(
            Some(&r.value),
            expected.get(offset as usize),
            "{what}: the record at {offset}"
        );
    }
    assert_eq!(
        from + got.len() as u64,
        expected.len() as u64,
        "{what}: every record up to the end"
    );
}

/// Reads start and end while records are appended: reads that each stay
/// for the whole test, reads that hop (read a few records, end, start again
/// where they stopped) on partitions that keep another read and on one that
/// does not (so each hop starts reading it anew), and reads that start at
/// the end at some point. Every read gets every record from where it
/// started, in order, none missing (the race a shared reader must not lose
/// records to).
pub async fn reads_that_come_and_go_while_records_arrive_miss_nothing(h: &impl LogHarness) {
    const ROUNDS: usize = 40;
    const PER_ROUND: usize = 25;
    let total = (ROUNDS * PER_ROUND) as u64;
    let (log, _) = h.fresh(3).await;
    let keys = key_per_partition(&*log);
    let writer = {
        let log = log.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut values: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
            for round in 0..ROUNDS {
                let batch: Vec<Record> = (0..PER_ROUND * 3)
                    .map(|i| rec(&keys[i % 3], &format!("{round}:{i}")))
                    .collect();
                let placed = log.append(batch.clone()).await.unwrap();
                for (r, a) in batch.into_iter().zip(placed) {
                    let held = &mut values[a.partition as usize];
                    assert_eq!(a.offset, held.len() as u64);
                    held.push(r.value);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            values
        })
    };
    let followers: Vec<_> = [0u32, 1]
        .into_iter()
        .map(|p| {
            let mut stream = log.read(p, 0);
            tokio::spawn(async move { (p, take(&mut stream, total as usize).await) })
        })
        .collect();
    let hoppers: Vec<_> = (0u32..3)
        .map(|p| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut got: Vec<LogRecord> = Vec::new();
                let mut hop = 1;
                while (got.len() as u64) < total {
                    let next = got.len() as u64;
                    let mut stream = log.read(p, next);
                    // Stops within a batch, so the next hop starts below
                    // what the log has already fetched for the partition.
                    let want = hop.min((total - next) as usize);
                    let mut records = take(&mut stream, want).await;
                    records.truncate(want);
                    got.extend(records);
                    hop = hop % 97 + 13;
                }
                (p, got)
            })
        })
        .collect();
    let latecomers: Vec<_> = (0u32..3)
        .map(|p| {
            let log = log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20 + 15 * u64::from(p))).await;
                let from = log.end_offset(p).await.unwrap();
                let mut stream = log.read(p, from);
                let got = if from < total {
                    take(&mut stream, (total - from) as usize).await
                } else {
                    Vec::new()
                };
                (p, from, got)
            })
        })
        .collect();
    let values = writer.await.unwrap();
    for f in followers {
        let (p, got) = f.await.unwrap();
        assert_dense(&format!("follower of {p}"), &got, 0, &values[p as usize]);
    }
    for hopper in hoppers {
        let (p, got) = hopper.await.unwrap();
        assert_dense(&format!("hopper of {p}"), &got, 0, &values[p as usize]);
    }
    for late in latecomers {
        let (p, from, got) = late.await.unwrap();
        assert_dense(
            &format!("latecomer of {p}"),
            &got,
            from,
            &values[p as usize],
        );
    }
}

/// A read nobody consumes fills its queue; the other reads of its
/// partition go on getting every record, and the stalled one, once
/// consumed, gets every record from where it started too.
pub async fn a_read_that_is_not_consumed_holds_up_no_other_read(h: &impl LogHarness) {
    const RECORDS: usize = 12_000;
    let (log, _) = h.fresh(1).await;
    let mut stalled = log.read(0, 0);
    let mut reader = log.read(0, 0);
    let mut values = Vec::new();
    for chunk in 0..RECORDS / 1000 {
        let batch: Vec<Record> = (0..1000)
            .map(|i| rec("k", &format!("{chunk}:{i}")))
            .collect();
        values.extend(batch.iter().map(|r| r.value.clone()));
        log.append(batch).await.unwrap();
    }
    let got = take(&mut reader, RECORDS).await;
    assert_dense("the consumed read", &got, 0, &values);
    let got = take(&mut stalled, RECORDS).await;
    assert_dense("the stalled read", &got, 0, &values);
}

pub async fn end_offset_follows_appends(h: &impl LogHarness) {
    let (log, _) = h.fresh(2).await;
    let p = log.partition_for(b"e");
    assert_eq!(log.end_offset(p).await.unwrap(), 0);
    log.append(vec![rec("e", "1"), rec("e", "2")])
        .await
        .unwrap();
    assert_eq!(log.end_offset(p).await.unwrap(), 2);
}

pub async fn start_offset_is_zero_while_every_record_is_held(h: &impl LogHarness) {
    let (log, _) = h.fresh(2).await;
    let p = log.partition_for(b"s");
    assert_eq!(log.start_offset(p).await.unwrap(), 0, "empty");
    log.append(vec![rec("s", "1"), rec("s", "2"), rec("s", "3")])
        .await
        .unwrap();
    assert_eq!(log.start_offset(p).await.unwrap(), 0, "nothing deleted");
    assert!(log.start_offset(2).await.is_err(), "out of range");
}

pub async fn acked_records_survive_reopen(h: &impl LogHarness) {
    let (log, location) = h.fresh(3).await;
    let epoch = log.epoch().to_owned();
    let placed = log
        .append((0..20).map(|i| rec(&format!("r{i}"), "x")).collect())
        .await
        .unwrap();
    drop(log);
    let log = h.reopen(&location, 3).await.unwrap();
    assert_eq!(log.epoch(), epoch, "the epoch survives a restart");
    assert_eq!(log.partitions(), 3);
    for p in 0..3 {
        let expected = placed.iter().filter(|a| a.partition == p).count();
        assert_eq!(log.end_offset(p).await.unwrap(), expected as u64);
    }
    // New appends continue after the recovered records.
    let again = log.append(vec![rec("r0", "y")]).await.unwrap();
    let before = placed
        .iter()
        .filter(|a| a.partition == again[0].partition)
        .count();
    assert_eq!(again[0].offset, before as u64);
}

pub async fn reopen_with_another_partition_count_fails(h: &impl LogHarness) {
    let (log, location) = h.fresh(3).await;
    drop(log);
    match h.reopen(&location, 5).await {
        Err(LogError::PartitionMismatch {
            found: 3,
            wanted: 5,
        }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opening with another partition count must fail"),
    }
}

pub async fn concurrent_appends_keep_each_callers_order(h: &impl LogHarness) {
    let (log, _) = h.fresh(2).await;
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                for i in 0..25 {
                    let placed = log
                        .append(vec![rec("shared", &format!("{t}:{i}"))])
                        .await
                        .unwrap();
                    offsets.push(placed[0].offset);
                }
                offsets
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let offsets = task.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "a caller's appends stay in order"
        );
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..500).collect::<Vec<u64>>(),
        "every offset used exactly once"
    );
    let got = take(&mut log.read(log.partition_for(b"shared"), 0), 500).await;
    assert_eq!(got.len(), 500);
}

pub async fn consumer_positions_are_stored(h: &impl LogHarness) {
    let (log, location) = h.fresh(2).await;
    assert_eq!(log.load_position("g", 1).await.unwrap(), None);
    log.store_position("g", 1, 42).await.unwrap();
    log.store_position("g", 1, 43).await.unwrap();
    log.store_position("other", 1, 7).await.unwrap();
    assert_eq!(log.load_position("g", 1).await.unwrap(), Some(43));
    assert_eq!(log.load_position("g", 0).await.unwrap(), None);
    drop(log);
    let log = h.reopen(&location, 2).await.unwrap();
    assert_eq!(log.load_position("g", 1).await.unwrap(), Some(43));
    assert_eq!(log.load_position("other", 1).await.unwrap(), Some(7));
}

pub async fn empty_append_is_a_no_op(h: &impl LogHarness) {
    let (log, _) = h.fresh(1).await;
    assert!(log.append(Vec::new()).await.unwrap().is_empty());
    assert_eq!(log.end_offset(0).await.unwrap(), 0);
}

pub async fn epochs_differ_between_logs(h: &impl LogHarness) {
    let (a, _) = h.fresh(1).await;
    let (b, _) = h.fresh(1).await;
    assert!(!a.epoch().is_empty());
    assert_ne!(a.epoch(), b.epoch());
}

pub async fn out_of_range_partition_is_an_error(h: &impl LogHarness) {
    let (log, _) = h.fresh(2).await;
    assert!(log.end_offset(2).await.is_err());
    let first = log.read(9, 0).next().await.expect("an error, not silence");
    assert!(first.is_err());
}
