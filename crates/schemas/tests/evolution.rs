//! Schema evolution: records written before a compatible change stay readable
//! after it, and records written after it are readable by a build that knows
//! the new writer schema — by Avro's resolution rules, through the same codec.

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::Schema;
use schemas::event::{self, ChatEvent, DecodeError, Decoder, MessagePosted};

/// Today's schema plus an optional field in `MessagePosted`, as a
/// compatible next release would add it.
fn evolved_text() -> String {
    let mut schema: serde_json::Value =
        serde_json::from_str(include_str!("../../../schemas/avro/chat_event.avsc")).unwrap();
    let posted = schema
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|branch| branch["name"] == "MessagePosted")
        .unwrap();
    posted["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "pinned_ts", "type": ["null", "long"], "default": null}));
    schema.to_string()
}

fn message() -> MessagePosted {
    MessagePosted {
        room: "general".into(),
        client_id: "0b7e3f0a-8a59-4d0e-9d43-5f3c2b1a0e99".into(),
        user: "grace".into(),
        body: "compatible, both ways".into(),
        ts: 1_700_000_000_000,
    }
}

fn single_object(schema: &Schema, datum: Vec<u8>) -> Vec<u8> {
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&event::schema_fingerprint(schema).to_le_bytes());
    bytes.extend(datum);
    bytes
}

fn field<'a>(record: &'a Value, name: &str) -> &'a Value {
    let Value::Union(0, record) = record else {
        panic!("not branch 0: {record:?}");
    };
    let Value::Record(fields) = record.as_ref() else {
        panic!("not a record: {record:?}");
    };
    &fields.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn the_change_is_compatible_both_ways() {
    let evolved = Schema::parse_str(&evolved_text()).unwrap();
    SchemaCompatibility::can_read(event::schema(), &evolved).unwrap();
    SchemaCompatibility::can_read(&evolved, event::schema()).unwrap();
    assert_ne!(event::schema_fingerprint(&evolved), event::fingerprint());
}

/// Old records, new reader: what a v2 build sees reading today's log.
#[test]
fn records_written_today_read_with_the_evolved_schema() {
    let evolved = Schema::parse_str(&evolved_text()).unwrap();
    let m = message();
    let bytes = event::encode(&ChatEvent::MessagePosted(m.clone()));
    // A message is written with the release that added it (v1).
    let v1 = Schema::parse_str(include_str!(
        "../../../schemas/avro/history/v1/chat_event.avsc"
    ))
    .unwrap();
    assert_eq!(bytes[2..10], event::schema_fingerprint(&v1).to_le_bytes());

    let mut datum = &bytes[10..];
    let value = apache_avro::from_avro_datum(event::schema(), &mut datum, Some(&evolved)).unwrap();
    assert!(datum.is_empty());
    assert_eq!(field(&value, "room"), &Value::String(m.room));
    assert_eq!(field(&value, "client_id"), &Value::String(m.client_id));
    assert_eq!(field(&value, "user"), &Value::String(m.user));
    assert_eq!(field(&value, "body"), &Value::String(m.body));
    assert_eq!(field(&value, "ts"), &Value::TimestampMillis(m.ts));
    assert_eq!(
        field(&value, "pinned_ts"),
        &Value::Union(0, Box::new(Value::Null)),
        "the added field takes its default"
    );
}

/// New records, old reader: what today's build sees once a v2 writer is out,
/// given v2's writer schema (as a release or a registry would hand it over).
#[test]
fn records_written_with_the_evolved_schema_read_with_todays() {
    let evolved = Schema::parse_str(&evolved_text()).unwrap();
    let m = message();
    let datum = apache_avro::to_avro_datum(
        &evolved,
        Value::Union(
            0,
            Box::new(Value::Record(vec![
                ("room".into(), Value::String(m.room.clone())),
                ("client_id".into(), Value::String(m.client_id.clone())),
                ("user".into(), Value::String(m.user.clone())),
                ("body".into(), Value::String(m.body.clone())),
                ("ts".into(), Value::TimestampMillis(m.ts)),
                (
                    "pinned_ts".into(),
                    Value::Union(1, Box::new(Value::Long(m.ts + 5_000))),
                ),
            ])),
        ),
    )
    .unwrap();
    let bytes = single_object(&evolved, datum);

    // Without the writer schema: refused by name, not misread.
    let err = event::decode(&bytes).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnknownFingerprint(fp) if fp == event::schema_fingerprint(&evolved)),
        "{err:?}"
    );

    let decoder = Decoder::new().with_writer(evolved);
    assert_eq!(
        decoder.decode(&bytes).unwrap(),
        ChatEvent::MessagePosted(m.clone())
    );
    // The released writers are still accepted by the extended decoder.
    let today = event::encode(&ChatEvent::MessagePosted(m.clone()));
    assert_eq!(decoder.decode(&today).unwrap(), ChatEvent::MessagePosted(m));
}

/// A new event type appended to the union, with a superset of
/// MessagePosted's fields. Today's build must not read it as a MessagePosted
/// (apache-avro's own union resolution, which matches branches by shape,
/// would): union branches resolve by record name.
#[test]
fn a_new_event_type_is_not_mistaken_for_an_old_one() {
    let with_new_branch = Schema::parse_str(
        r#"[
          {"type": "record", "name": "MessagePosted", "namespace": "chat", "fields": [
            {"name": "room", "type": "string"},
            {"name": "client_id", "type": "string"},
            {"name": "user", "type": "string"},
            {"name": "body", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}}
          ]},
          {"type": "record", "name": "MessagePinned", "namespace": "chat", "fields": [
            {"name": "room", "type": "string"},
            {"name": "client_id", "type": "string"},
            {"name": "user", "type": "string"},
            {"name": "body", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}}
          ]}
        ]"#,
    )
    .unwrap();
    let edited = Value::Union(
        1,
        Box::new(Value::Record(vec![
            ("room".into(), Value::String("general".into())),
            ("client_id".into(), Value::String("x".into())),
            ("user".into(), Value::String("grace".into())),
            ("body".into(), Value::String("fixed typo".into())),
            ("ts".into(), Value::TimestampMillis(1)),
        ])),
    );
    let datum = apache_avro::to_avro_datum(&with_new_branch, edited).unwrap();
    let bytes = single_object(&with_new_branch, datum);

    let decoder = Decoder::new().with_writer(with_new_branch.clone());
    let err = decoder.decode(&bytes).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(msg) if msg.contains("chat.MessagePinned")),
        "{err:?}"
    );

    // Its MessagePosted branch still reads fine.
    let posted = Value::Union(
        0,
        Box::new(Value::Record(vec![
            ("room".into(), Value::String("general".into())),
            ("client_id".into(), Value::String("y".into())),
            ("user".into(), Value::String("grace".into())),
            ("body".into(), Value::String("hi".into())),
            ("ts".into(), Value::TimestampMillis(2)),
        ])),
    );
    let datum = apache_avro::to_avro_datum(&with_new_branch, posted).unwrap();
    let bytes = single_object(&with_new_branch, datum);
    assert!(matches!(
        decoder.decode(&bytes).unwrap(),
        ChatEvent::MessagePosted(MessagePosted { ts: 2, .. })
    ));
}
