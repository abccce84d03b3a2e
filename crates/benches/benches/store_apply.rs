//! The projector's write: one `HistoryStore::apply` of a batch of messages
//! with the partition position that covers them, one durable transaction.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use history::embedded::EmbeddedStore;
use history::HistoryStore;
use schemas::protocol::MessageView;

fn apply(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), "bench").expect("store opens");
    let mut next: u64 = 0;
    let mut group = c.benchmark_group("embedded_store_apply");
    group.sample_size(20);
    for batch in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_batched(
                || {
                    let messages: Vec<MessageView> = (0..batch as u64)
                        .map(|i| MessageView {
                            room: format!("room-{}", (next + i) % 64),
                            offset: (next + i) as i64,
                            id: format!("id-{}", next + i),
                            user: "alice".into(),
                            body: "x".repeat(100),
                            ts: 1_763_800_000_000,
                            ..MessageView::default()
                        })
                        .collect();
                    next += batch as u64;
                    (messages, next)
                },
                |(messages, upto)| {
                    runtime
                        .block_on(store.apply(0, messages, upto))
                        .expect("apply")
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
