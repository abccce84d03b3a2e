//! `ingest::auth::Verifier::verify` on any text a client could send as a
//! token, and `ingest::auth::RoomGrant::parse` on the same text split into
//! `rooms` claim entries.
//!
//! The verifier trusts what a gateway in token mode would: an HS256 secret,
//! the RSA and the EC (P-256) public keys of crates/ingest/src/auth/testdata/,
//! with an issuer and an audience required. It is built once per process,
//! with a current-thread tokio runtime to drive `verify`.
//!
//! Checks, per crates/ingest/src/auth/token.rs: verifying never panics,
//! whatever the text (bytes that are not UTF-8 go through a lossy
//! conversion). A token it accepts has a `sub` that passes `valid_user`, a
//! header algorithm of a configured key's family (never `none`, never EdDSA:
//! no Ed25519 key is trusted), and a payload, decoded here independently,
//! that names the same user and `exp`, the configured `iss` and `aud`, and
//! an `exp` not past (with the 30 s leeway); the user may not use the
//! direct-message room of two other users. A grant that parses covers each
//! of its entries.
//!
//! The seeds (seeds/token/) are signed with [`SECRET`] and the test keys;
//! their `exp` is 4102444800 (2100-01-01), `iss` [`ISSUER`], `aud`
//! [`AUDIENCE`].

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use ingest::auth::{RoomGrant, Verifier};
use libfuzzer_sys::fuzz_target;
use schemas::protocol::valid_user;
use serde_json::Value;
use tokio::runtime::Runtime;

/// The HMAC secret the seeds' HS tokens are signed with.
const SECRET: &[u8] = b"chat-fuzz-hs256-secret";
const ISSUER: &str = "https://id.example";
const AUDIENCE: &str = "chat";
const RSA_PUB: &str = include_str!("../../crates/ingest/src/auth/testdata/rsa.pub.pem");
const EC_PUB: &str = include_str!("../../crates/ingest/src/auth/testdata/ec.pub.pem");
/// `token::LEEWAY`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Header algorithms of the configured keys (HMAC, RSA, EC).
const ACCEPTABLE_ALGS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384",
];

struct Harness {
    rt: Runtime,
    verifier: Verifier,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let verifier = Verifier::new()
            .with_secret(SECRET)
            .expect("an HMAC secret")
            .with_public_pem(RSA_PUB.as_bytes(), "rsa.pub.pem")
            .expect("the RSA test key")
            .with_public_pem(EC_PUB.as_bytes(), "ec.pub.pem")
            .expect("the EC test key")
            .with_issuer(Some(ISSUER.to_owned()))
            .with_audience(Some(AUDIENCE.to_owned()));
        Harness { rt, verifier }
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let harness = harness();
    if let Ok(identity) = harness.rt.block_on(harness.verifier.verify(&text)) {
        check_accepted(&text, &identity);
    }
    // The same text as the entries of a `rooms` claim.
    let entries: Vec<&str> = text.split(['\n', ',']).collect();
    if let Ok(grant) = RoomGrant::parse(&entries) {
        for entry in &entries {
            let room = entry.strip_suffix('*').unwrap_or(entry);
            assert!(grant.covers(room), "{entries:?} parses but misses {entry:?}");
        }
    }
});

/// The promises of an accepted token.
fn check_accepted(token: &str, identity: &ingest::auth::Identity) {
    assert!(
        valid_user(&identity.user),
        "{token:?} accepted with a bad sub: {identity:?}"
    );
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token:?} accepted without three parts");
    let header = decode_json(parts[0])
        .unwrap_or_else(|| panic!("{token:?} accepted with a header that is not base64 JSON"));
    let alg = header["alg"].as_str().unwrap_or_default();
    assert!(
        ACCEPTABLE_ALGS.contains(&alg),
        "{token:?} accepted with alg {alg:?}: {identity:?}"
    );
    let claims = decode_json(parts[1])
        .unwrap_or_else(|| panic!("{token:?} accepted with claims that are not base64 JSON"));
    assert_eq!(
        claims["sub"].as_str(),
        Some(identity.user.as_str()),
        "{token:?}: the identity is not the token's sub"
    );
    assert_eq!(
        claims["iss"].as_str(),
        Some(ISSUER),
        "{token:?} accepted with another issuer"
    );
    let aud_ok = match &claims["aud"] {
        Value::String(aud) => aud == AUDIENCE,
        Value::Array(auds) => auds.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(aud_ok, "{token:?} accepted with another audience");
    let exp = claims["exp"].as_u64();
    assert_eq!(exp, identity.expires_at, "{token:?}: exp differs");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    assert!(
        exp.is_some_and(|exp| exp.saturating_add(LEEWAY_SECS) >= now),
        "{token:?} accepted though expired"
    );
    let others = ["zz-fuzz-other-1", "zz-fuzz-other-2"];
    if !others.contains(&identity.user.as_str()) {
        let dm = format!("dm:{}:{}", others[0], others[1]);
        assert!(
            !identity.may_use(&dm),
            "{token:?}: {} may use {dm}",
            identity.user
        );
    }
    assert_eq!(
        identity.rooms.is_some(),
        !claims["rooms"].is_null(),
        "{token:?}: the rooms claim is lost or invented"
    );
}

/// A JWT segment (base64url without padding) as JSON, as jsonwebtoken reads
/// it.
fn decode_json(segment: &str) -> Option<Value> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
