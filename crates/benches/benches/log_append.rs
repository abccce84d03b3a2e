//! Appends to the embedded log: one `append` call of a batch of records,
//! committed durably (fsync) before it returns. Per-record cost falls with
//! the batch size; that is what group commit buys.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventlog::embedded::EmbeddedLog;
use eventlog::{EventLog, Record};

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let room = format!("room-{}", i % 64);
            let event = schemas::ChatEvent::MessagePosted(schemas::MessagePosted {
                room: room.clone(),
                client_id: format!("id-{i}"),
                user: "alice".into(),
                body: "x".repeat(100),
                ts: 1_763_800_000_000,
            });
            Record {
                key: room.into_bytes(),
                value: schemas::encode(&event),
                ts: 1_763_800_000_000,
            }
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EmbeddedLog::open(dir.path(), "bench", 16).expect("log opens");
    let mut group = c.benchmark_group("embedded_log_append");
    group.sample_size(20);
    for batch in [1, 64, 1024] {
        let input = records(batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &input, |b, input| {
            b.iter(|| runtime.block_on(log.append(input.clone())).expect("append"))
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
