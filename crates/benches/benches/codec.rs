//! Avro single-object encoding of a chat message, both ways: what ingest
//! pays per message before the append, and fan-out and the projector per
//! message read.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use schemas::{ChatEvent, MessagePosted};

fn event(body: usize) -> ChatEvent {
    ChatEvent::MessagePosted(MessagePosted {
        room: "general".into(),
        client_id: "6f1c2b9e-3c1d-4a55-9a7e-0b8c2d1e4f60".into(),
        user: "alice".into(),
        body: "x".repeat(body),
        ts: 1_763_800_000_000,
    })
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("avro");
    for body in [16, 100, 1000] {
        let e = event(body);
        let bytes = schemas::encode(&e);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", body), &e, |b, e| {
            b.iter(|| schemas::encode(std::hint::black_box(e)))
        });
        group.bench_with_input(BenchmarkId::new("decode", body), &bytes, |b, bytes| {
            b.iter(|| schemas::decode(std::hint::black_box(bytes)).expect("decodes"))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
