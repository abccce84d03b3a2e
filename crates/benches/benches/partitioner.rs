//! Kafka's murmur2 keyed partitioner, as every append and join runs it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn partitioner(c: &mut Criterion) {
    let rooms: Vec<String> = (0..1024).map(|i| format!("room-{i}")).collect();
    let mut group = c.benchmark_group("partitioner");
    group.throughput(Throughput::Elements(rooms.len() as u64));
    group.bench_function("partition_for/1024 rooms/16 partitions", |b| {
        b.iter(|| {
            rooms
                .iter()
                .map(|r| {
                    eventlog::partitioner::partition_for(std::hint::black_box(r.as_bytes()), 16)
                })
                .sum::<u32>()
        })
    });
    group.finish();
}

criterion_group!(benches, partitioner);
criterion_main!(benches);
