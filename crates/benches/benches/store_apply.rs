//! The projector's write: one `HistoryStore::apply` of a batch of messages
//! with the partition position that covers them, one durable transaction;
//! and a batch of reactions to one message that already has many.

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

/// A batch of 64 reactions (new users, one emoji) to a message that has
/// `reactors` already: what a popular message costs the store.
fn reactions(c: &mut Criterion) {
    use history::{Batch, ChangeMark};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("embedded_store_reactions");
    group.sample_size(10);
    const BATCH: u64 = 64;
    for reactors in [0u64, 1_000, 10_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), "bench").expect("store opens");
        let message = MessageView {
            room: "busy".into(),
            offset: 0,
            id: "popular".into(),
            user: "alice".into(),
            body: "x".repeat(100),
            ts: 1_763_800_000_000,
            ..MessageView::default()
        };
        let react = |offset: u64| ChangeMark {
            room: "busy".into(),
            offset,
            id: format!("r{offset}"),
            user: format!("user-{offset}"),
            target: 0,
            change: schemas::Change::React {
                emoji: "👍".into()
            },
            ts: 1_763_800_000_000,
        };
        let seed = Batch {
            messages: vec![message],
            changes: (1..=reactors).map(react).collect(),
            ..Batch::default()
        };
        runtime
            .block_on(store.apply_batch(0, seed, reactors + 1))
            .expect("seed");
        let mut next = reactors + 1;
        group.throughput(Throughput::Elements(BATCH));
        group.bench_function(BenchmarkId::from_parameter(reactors), |b| {
            b.iter_batched(
                || {
                    let batch = Batch {
                        changes: (next..next + BATCH).map(react).collect(),
                        ..Batch::default()
                    };
                    next += BATCH;
                    (batch, next)
                },
                |(batch, upto)| {
                    runtime
                        .block_on(store.apply_batch(0, batch, upto))
                        .expect("apply")
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, apply, reactions);
criterion_main!(benches);
