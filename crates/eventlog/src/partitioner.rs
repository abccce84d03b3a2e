//! Kafka's default keyed partitioner, bit for bit.
//!
//! Owns the mapping key → partition. Promise: for every key and partition
//! count, [`partition_for`] returns the partition that the Java client's
//! `BuiltInPartitioner.partitionForKey` (and librdkafka's `murmur2` /
//! `murmur2_random` partitioners) pick for the same key bytes, so the embedded
//! log, Redpanda/Kafka and any Kafka tool agree on where a room lives. The
//! mapping is pure, stable across releases and platforms, and changing it
//! moves every room: treat it as part of the on-disk format.

/// Kafka's `org.apache.kafka.common.utils.Utils.murmur2`: MurmurHash2, 32 bit,
/// seed `0x9747b28c`, read as little-endian words.
///
/// Java has no unsigned ints, so the reference mixes with `>>>` (logical
/// shifts) on `int`; here the same bits flow through `u32` with wrapping
/// multiplication, and the result is reinterpreted as Java's signed `int`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java: `int h = seed ^ length;` (a Java array length always fits an int).
    let mut h: u32 = SEED ^ (data.len() as u32);

    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }

    // Java's fall-through `switch (length % 4)` over the last 1..=3 bytes;
    // each byte is masked with `& 0xff`, i.e. taken unsigned.
    let tail = words.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }

    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;

    h as i32
}

/// Kafka's `Utils.toPositive`: clears the sign bit (not `abs`, which would
/// overflow on `i32::MIN` and map `n` and `-n` together).
pub fn to_positive(n: i32) -> i32 {
    n & 0x7fff_ffff
}

/// The partition Kafka's default partitioner picks for `key`:
/// `toPositive(murmur2(key)) % partitions`.
///
/// # Panics
///
/// If `partitions` is 0: a topic has at least one partition.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    // to_positive yields 0..=i32::MAX, so the cast is lossless.
    (to_positive(murmur2(key)) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// apache/kafka `clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java`,
    /// `testMurmur2`.
    #[test]
    fn matches_kafka_utils_test_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key),
                *expected,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// confluentinc/librdkafka `src/rdmurmur2.c`, `unittest_murmur2`: the
    /// "java_murmur2_results" table (values the Java client produces),
    /// covering every tail length, the empty key, and offsets into the
    /// strings that the C code uses to hit its unaligned path.
    #[test]
    fn matches_librdkafka_java_compat_vectors() {
        let short = b"1234";
        let long = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: &[(&[u8], u32)] = &[
            (b"kafka", 0xd067_cf64),
            (b"giberish123456789", 0x8f55_2b0c),
            (&short[..], 0x9fc9_7b14),
            (&short[1..], 0xe7c0_09ca),
            (&short[2..], 0x8739_30da),
            (&short[3..], 0x5a4b_5ca1),
            (&long[..], 0x7842_4f1c),
            (&long[1..], 0x4a62_b377),
            (&long[2..], 0xe0e4_e09e),
            (&long[3..], 0x62b8_b43f),
            (b"", 0x106e_08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key),
                *expected as i32,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// confluentinc/librdkafka `src/rdmurmur2.c` as first written, the
    /// `unittest_murmurhashneutral2` table: Java's results after `toPositive`
    /// (compare "kafka": 0xd067cf64 above, 0x5067cf64 = 1348980580 here).
    #[test]
    fn matches_librdkafka_positive_vectors() {
        assert_eq!(to_positive(murmur2(b"kafka")), 1_348_980_580);
        assert_eq!(to_positive(murmur2(b"amqp")), 767_747_138);
        assert_eq!(to_positive(murmur2(b"giberish123456789")), 257_239_820);
    }

    /// Key → partition over 1000 partitions, as the Java producer's
    /// partitioner assigns them; from kafka-python's partitioner tests,
    /// `test_murmur2_java_compatibility`
    /// ("compare with output from Kafka's
    /// org.apache.kafka.clients.producer.Partitioner"). Kafka's own
    /// `BuiltInPartitionerTest`/`DefaultPartitionerTest` only check that a
    /// key's partition is stable, not its value.
    #[test]
    fn matches_java_partitioner_assignments() {
        let cases: &[(&[u8], u32)] = &[
            (b"", 681),
            (b"a", 524),
            (b"ab", 434),
            (b"abc", 107),
            (b"123456789", 566),
            (b"\x00 ", 742),
        ];
        for (key, expected) in cases {
            assert_eq!(partition_for(key, 1000), *expected, "key {key:?}");
        }
    }

    #[test]
    fn to_positive_clears_only_the_sign_bit() {
        assert_eq!(to_positive(0), 0);
        assert_eq!(to_positive(5), 5);
        assert_eq!(to_positive(i32::MAX), i32::MAX);
        assert_eq!(to_positive(-1), i32::MAX);
        assert_eq!(to_positive(i32::MIN), 0);
        // Not abs: -973932308 = 0xc5f2_f8ec → 0x45f2_f8ec.
        assert_eq!(to_positive(-973_932_308), 0x45f2_f8ec);
    }

    #[test]
    fn partition_for_uses_the_positive_hash() {
        // murmur2("21") is negative; Kafka masks the sign bit, it does not negate.
        let h = murmur2(b"21");
        assert!(h < 0);
        assert_eq!(partition_for(b"21", 7), (to_positive(h) % 7) as u32);
        assert_eq!(partition_for(b"anything", 1), 0);
    }

    #[test]
    #[should_panic(expected = "at least one partition")]
    fn zero_partitions_is_a_caller_bug() {
        partition_for(b"room", 0);
    }

    proptest! {
        #[test]
        fn partition_is_in_range(
            key in proptest::collection::vec(any::<u8>(), 0..256),
            partitions in 1u32..=u32::MAX,
        ) {
            prop_assert!(partition_for(&key, partitions) < partitions);
        }

        #[test]
        fn partition_agrees_with_java_arithmetic(
            key in proptest::collection::vec(any::<u8>(), 0..64),
            partitions in 1i32..=i32::MAX,
        ) {
            // Java: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions, all int.
            let java = to_positive(murmur2(&key)) % partitions;
            prop_assert_eq!(partition_for(&key, partitions as u32), java as u32);
        }
    }
}
