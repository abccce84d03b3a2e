//! `schemas::protocol::parse_client_frame` on any text a client could send.
//!
//! Checks that parsing never panics, on valid UTF-8 and on the lossy
//! conversion of anything else (a WebSocket text frame is UTF-8; the lossy
//! path still reaches the JSON parser with odd input). When a frame is
//! accepted, it must satisfy what the gateway relies on without checking
//! again: a room that passes `valid_room`, a `since` offset of -1 or more, a
//! send's id and body within the protocol limits, a change's id, target,
//! body and emoji within them too; and the frame written back as JSON parses
//! to the same frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use schemas::protocol::{
    check_body, check_emoji, check_id, parse_client_frame, valid_room, ClientFrame, Position,
};
use schemas::Change;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(frame) = parse_client_frame(&text) else {
        return;
    };
    check(&frame);
    let again = parse_client_frame(&to_json(&frame).to_string())
        .unwrap_or_else(|e| panic!("{frame:?} written back is refused: {e:?}"));
    assert_eq!(again, frame, "a frame written back parses to another one");
});

/// The promises of an accepted frame.
fn check(frame: &ClientFrame) {
    let room = match frame {
        ClientFrame::Join { room, since } => {
            if let Some(since) = since {
                assert!(since.offset >= -1, "since below -1 accepted: {frame:?}");
            }
            room
        }
        ClientFrame::Leave { room }
        | ClientFrame::Typing { room }
        | ClientFrame::Presence { room } => room,
        ClientFrame::Read { room, offset } => {
            assert!(*offset >= 0, "a negative read offset accepted: {frame:?}");
            room
        }
        ClientFrame::Send { room, id, body } => {
            assert!(check_id(id).is_ok(), "bad id accepted: {frame:?}");
            assert!(
                check_body(body, Some(id)).is_ok(),
                "bad body accepted: {frame:?}"
            );
            room
        }
        ClientFrame::Change {
            room,
            id,
            target,
            change,
        } => {
            assert!(check_id(id).is_ok(), "bad id accepted: {frame:?}");
            assert!(*target >= 0, "a negative target accepted: {frame:?}");
            match change {
                Change::Edit { body } => assert!(
                    check_body(body, Some(id)).is_ok(),
                    "bad body accepted: {frame:?}"
                ),
                Change::React { emoji } | Change::Unreact { emoji } => assert!(
                    check_emoji(emoji, Some(id)).is_ok(),
                    "bad emoji accepted: {frame:?}"
                ),
                Change::Delete => {}
            }
            room
        }
    };
    assert!(valid_room(room), "bad room accepted: {frame:?}");
}

/// The frame as a client would write it.
fn to_json(frame: &ClientFrame) -> Value {
    match frame {
        ClientFrame::Join { room, since: None } => json!({"type": "join", "room": room}),
        ClientFrame::Join {
            room,
            since: Some(Position { offset, epoch }),
        } => json!({"type": "join", "room": room, "since": {"offset": offset, "epoch": epoch}}),
        ClientFrame::Leave { room } => json!({"type": "leave", "room": room}),
        ClientFrame::Typing { room } => json!({"type": "typing", "room": room}),
        ClientFrame::Presence { room } => json!({"type": "presence", "room": room}),
        ClientFrame::Read { room, offset } => {
            json!({"type": "read", "room": room, "offset": offset})
        }
        ClientFrame::Send { room, id, body } => {
            json!({"type": "send", "room": room, "id": id, "body": body})
        }
        ClientFrame::Change {
            room,
            id,
            target,
            change,
        } => match change {
            Change::Edit { body } => {
                json!({"type": "edit", "room": room, "id": id, "target": target, "body": body})
            }
            Change::Delete => json!({"type": "delete", "room": room, "id": id, "target": target}),
            Change::React { emoji } | Change::Unreact { emoji } => json!({
                "type": "react", "room": room, "id": id, "target": target, "emoji": emoji,
                "remove": matches!(change, Change::Unreact { .. }),
            }),
        },
    }
}
