//! `schemas::decode` on any bytes a log record could hold.
//!
//! Checks the codec's promises (crates/schemas/src/event.rs): decoding never
//! panics, whatever the bytes; an event it returns survives a round trip
//! (`encode` then `decode` gives the same event), and `encode` is canonical
//! (re-encoding that event gives the same bytes).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = schemas::decode(data) else {
        return;
    };
    let bytes = schemas::encode(&event);
    let again = schemas::decode(&bytes)
        .unwrap_or_else(|e| panic!("{event:?} encoded does not decode: {e}"));
    assert_eq!(again, event, "an event does not survive encode and decode");
    assert_eq!(schemas::encode(&again), bytes, "encode is not canonical");
});
