//! The event codec from the outside: round trips, hostile input, and the
//! committed fixture every release must keep decoding.

use std::path::PathBuf;

use proptest::prelude::*;
use schemas::event::{
    self, Change, ChatEvent, DecodeError, MessageChanged, MessagePosted, ReadPositionMoved,
};

fn posted(room: &str, client_id: &str, user: &str, body: &str, ts: i64) -> ChatEvent {
    ChatEvent::MessagePosted(MessagePosted {
        room: room.to_owned(),
        client_id: client_id.to_owned(),
        user: user.to_owned(),
        body: body.to_owned(),
        ts,
    })
}

fn arb_event() -> impl Strategy<Value = ChatEvent> {
    prop_oneof![
        (".*", ".*", ".*", ".*", any::<i64>()).prop_map(|(room, client_id, user, body, ts)| {
            ChatEvent::MessagePosted(MessagePosted {
                room,
                client_id,
                user,
                body,
                ts,
            })
        }),
        (".*", ".*", any::<i64>(), any::<i64>()).prop_map(|(room, user, offset, ts)| {
            ChatEvent::ReadPositionMoved(ReadPositionMoved {
                room,
                user,
                offset,
                ts,
            })
        }),
        (".*", ".*", ".*", any::<i64>(), 0u8..4, ".*", any::<i64>()).prop_map(
            |(room, client_id, user, target, kind, text, ts)| {
                let change = match kind {
                    0 => Change::Edit { body: text },
                    1 => Change::Delete,
                    2 => Change::React { emoji: text },
                    _ => Change::Unreact { emoji: text },
                };
                ChatEvent::MessageChanged(MessageChanged {
                    room,
                    client_id,
                    user,
                    target,
                    change,
                    ts,
                })
            }
        ),
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(event in arb_event()) {
        prop_assert_eq!(event::decode(&event::encode(&event)).unwrap(), event);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = event::decode(&bytes);
    }

    #[test]
    fn valid_header_with_random_tail_never_panics(
        tail in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![0xC3, 0x01];
        bytes.extend_from_slice(&event::fingerprint().to_le_bytes());
        bytes.extend_from_slice(&tail);
        if let Ok(decoded) = event::decode(&bytes) {
            // Whatever it read, it reads as exactly these bytes (the header
            // may name an older release that lays the event out the same).
            prop_assert_eq!(&event::encode(&decoded)[10..], &bytes[10..]);
        }
    }

    #[test]
    fn corrupted_records_never_panic(
        event in arb_event(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = event::encode(&event);
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        let _ = event::decode(&bytes);
        let _ = event::decode(&bytes[..cut.index(bytes.len())]);
    }
}

#[test]
fn every_strict_prefix_is_an_error() {
    let bytes = event::encode(&posted("room-1", "id", "ada", "héllo 👋", -5));
    for len in 0..bytes.len() {
        assert!(
            event::decode(&bytes[..len]).is_err(),
            "a {len}-byte prefix decoded"
        );
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut bytes = event::encode(&posted("r", "c", "u", "b", 1));
    bytes.push(0);
    assert!(matches!(
        event::decode(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn bad_headers_are_named() {
    assert!(matches!(event::decode(&[]), Err(DecodeError::BadHeader)));
    assert!(matches!(
        event::decode(&[0xC3, 0x01, 1, 2]),
        Err(DecodeError::BadHeader)
    ));
    let mut bytes = event::encode(&posted("r", "c", "u", "b", 1));
    bytes[1] = 0x02;
    assert!(matches!(event::decode(&bytes), Err(DecodeError::BadHeader)));
}

#[test]
fn unknown_fingerprint_is_reported_not_guessed() {
    let mut bytes = event::encode(&posted("r", "c", "u", "b", 1));
    bytes[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    let err = event::decode(&bytes).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::UnknownFingerprint(0x0123_4567_89ab_cdef)
    ));
    assert_eq!(
        err.to_string(),
        "unknown schema fingerprint 0x0123456789abcdef"
    );
}

/// A string length prefix far beyond the input: an error, fast, without
/// reading (or keeping) what the prefix claims.
#[test]
fn huge_length_prefixes_are_malformed() {
    let header = {
        let mut h = vec![0xC3, 0x01];
        h.extend_from_slice(&event::fingerprint().to_le_bytes());
        h
    };
    // zig-zag varints: i64::MAX, 400 MiB, 2^40, and a negative length.
    let lengths: [&[u8]; 4] = [
        &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[0x80, 0x80, 0x80, 0x90, 0x03],
        &[0x80, 0x80, 0x80, 0x80, 0x80, 0x40],
        &[0x01],
    ];
    for length in lengths {
        let mut bytes = header.clone();
        bytes.push(0); // union branch 0
        bytes.extend_from_slice(length);
        bytes.extend_from_slice(b"short");
        let started = std::time::Instant::now();
        let result = event::decode(&bytes);
        assert!(
            matches!(result, Err(DecodeError::Malformed(_))),
            "{length:?}: {result:?}"
        );
        eprintln!("length {length:?}: {:?} in {:?}", result, started.elapsed());
    }
    // An over-long varint (more than 10 bytes).
    let mut bytes = header.clone();
    bytes.extend_from_slice(&[0xff; 16]);
    assert!(matches!(
        event::decode(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn invalid_utf8_is_malformed() {
    let mut bytes = event::encode(&posted("ab", "c", "u", "b", 1));
    // header, branch, len(2), then "ab": make it an invalid UTF-8 sequence.
    bytes[12] = 0xff;
    assert!(matches!(
        event::decode(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

// The fixture: bytes written by schema v1 and committed, so every later build
// proves it still reads what v1 wrote.

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../schemas/avro/history/v1/fixtures/message_posted.bin")
}

fn fixture_event() -> ChatEvent {
    posted(
        "general",
        "6f1c2a4e-3b5d-4c8e-9f70-1a2b3c4d5e6f",
        "ada",
        "héllo, wörld 👋",
        1_700_000_000_123,
    )
}

/// v1's fingerprint as the fixture header carries it; fixed forever.
const V1_FINGERPRINT: u64 = 0xdca6_4ae9_6418_94f0;

#[test]
fn v1_fixture_still_decodes() {
    let bytes = std::fs::read(fixture_path()).expect("committed fixture");
    assert_eq!(bytes[..2], [0xC3, 0x01]);
    assert_eq!(bytes[2..10], V1_FINGERPRINT.to_le_bytes());
    assert_eq!(event::decode(&bytes).unwrap(), fixture_event());
    if event::fingerprint() == V1_FINGERPRINT {
        // While v1 is current, the encoder must reproduce it byte for byte.
        assert_eq!(event::encode(&fixture_event()), bytes);
    }
}

fn v2_fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../schemas/avro/history/v2/fixtures/read_position_moved.bin")
}

fn v2_fixture_event() -> ChatEvent {
    ChatEvent::ReadPositionMoved(ReadPositionMoved {
        room: "dm:ada:grace".into(),
        user: "grace".into(),
        offset: 41,
        ts: 1_700_000_100_456,
    })
}

/// v2's fingerprint as its fixture's header carries it; fixed forever.
const V2_FINGERPRINT: u64 = 0x641c_e44b_cb4d_b5a7;

#[test]
fn v2_fixture_still_decodes() {
    let bytes = std::fs::read(v2_fixture_path()).expect("committed fixture");
    assert_eq!(bytes[..2], [0xC3, 0x01]);
    assert_eq!(bytes[2..10], V2_FINGERPRINT.to_le_bytes());
    assert_eq!(event::decode(&bytes).unwrap(), v2_fixture_event());
    // Today's encoder still writes v1's message exactly as v1 did, and v2's
    // read position as v2 did: both stay readable by the builds before.
    assert_eq!(
        event::encode(&fixture_event()),
        std::fs::read(fixture_path()).unwrap()
    );
    assert_eq!(event::encode(&v2_fixture_event()), bytes);
}

fn v3_fixtures() -> Vec<(PathBuf, ChatEvent)> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/avro/history/v3/fixtures");
    let change = |change: Change, client_id: &str, user: &str, ts: i64| {
        ChatEvent::MessageChanged(MessageChanged {
            room: "general".into(),
            client_id: client_id.into(),
            user: user.into(),
            target: 17,
            change,
            ts,
        })
    };
    vec![
        (
            dir.join("message_edited.bin"),
            change(
                Change::Edit {
                    body: "héllo, wörld 👋 (edited)".into(),
                },
                "0b6c5c1e-8d0a-4f44-9a8e-2f1d3c4b5a60",
                "ada",
                1_700_000_200_001,
            ),
        ),
        (
            dir.join("message_deleted.bin"),
            change(
                Change::Delete,
                "1c7d6d2f-9e1b-4055-8b9f-3a2e4d5c6b71",
                "ada",
                1_700_000_200_002,
            ),
        ),
        (
            dir.join("reaction_added.bin"),
            change(
                Change::React {
                    emoji: "👍".into()
                },
                "2d8e7e3a-af2c-4166-9ca0-4b3f5e6d7c82",
                "grace",
                1_700_000_200_003,
            ),
        ),
        (
            dir.join("reaction_removed.bin"),
            change(
                Change::Unreact {
                    emoji: "👍".into()
                },
                "3e9f8f4b-b03d-4277-adb1-5c406f7e8d93",
                "grace",
                1_700_000_200_004,
            ),
        ),
    ]
}

/// v3's fingerprint as its fixtures' headers carry it; fixed forever.
const V3_FINGERPRINT: u64 = 0x73ec_18d4_32b9_7e75;

#[test]
fn v3_fixtures_still_decode() {
    for (path, expected) in v3_fixtures() {
        let bytes = std::fs::read(&path).expect("committed fixture");
        assert_eq!(bytes[..2], [0xC3, 0x01]);
        assert_eq!(
            bytes[2..10],
            V3_FINGERPRINT.to_le_bytes(),
            "{}",
            path.display()
        );
        assert_eq!(event::decode(&bytes).unwrap(), expected);
        // Today's encoder writes a change exactly as v3 did.
        assert_eq!(event::encode(&expected), bytes, "{}", path.display());
    }
}

/// Writes the v3 fixtures, once. Fixtures are history: never regenerate one.
#[test]
#[ignore = "run once, when a schema version is released"]
fn write_v3_fixtures() {
    for (path, event) in v3_fixtures() {
        assert!(
            !path.exists(),
            "{} exists; fixtures are immutable",
            path.display()
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, event::encode(&event)).unwrap();
    }
}

/// Writes the v2 fixture, once. Fixtures are history: never regenerate one.
#[test]
#[ignore = "run once, when a schema version is released"]
fn write_v2_fixture() {
    let path = v2_fixture_path();
    assert!(
        !path.exists(),
        "{} exists; fixtures are immutable",
        path.display()
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, event::encode(&v2_fixture_event())).unwrap();
}

/// Writes the v1 fixture, once. Fixtures are history: never regenerate one.
#[test]
#[ignore = "run once, when a schema version is released"]
fn write_v1_fixture() {
    let path = fixture_path();
    assert!(
        !path.exists(),
        "{} exists; fixtures are immutable",
        path.display()
    );
    assert_eq!(
        event::fingerprint(),
        V1_FINGERPRINT,
        "the current schema is not v1"
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, event::encode(&fixture_event())).unwrap();
}
