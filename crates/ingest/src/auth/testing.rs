//! Token helpers for tests (feature `testing`): the test keys in
//! `auth/testdata/` (public here, never trust them elsewhere), signing with
//! any of them, and a JWKS holding their public halves.

use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::token::Claims;

pub const RSA_KEY: &str = include_str!("testdata/rsa.key.pem");
pub const RSA_PUB: &str = include_str!("testdata/rsa.pub.pem");
pub const EC_KEY: &str = include_str!("testdata/ec.key.pem");
pub const EC_PUB: &str = include_str!("testdata/ec.pub.pem");
pub const ED_KEY: &str = include_str!("testdata/ed.key.pem");
pub const ED_PUB: &str = include_str!("testdata/ed.pub.pem");
/// Signs tokens that no configured key trusts.
pub const OTHER_RSA_KEY: &str = include_str!("testdata/other-rsa.key.pem");

/// Claims of `user` valid for `ttl` from now, with no other claim.
pub fn claims(user: &str, ttl: Duration) -> Claims {
    let now = jsonwebtoken::get_current_timestamp();
    Claims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs(),
        nbf: None,
        iat: Some(now),
        iss: None,
        aud: None,
        rooms: None,
    }
}

/// The signing key of `alg` from a private PEM (or an HMAC secret).
pub fn encoding_key(alg: Algorithm, key: &[u8]) -> EncodingKey {
    use jsonwebtoken::AlgorithmFamily::*;
    match alg.family() {
        Hmac => EncodingKey::from_secret(key).expect("an HMAC secret"),
        Rsa => EncodingKey::from_rsa_pem(key).expect("an RSA private PEM"),
        Ec => EncodingKey::from_ec_pem(key).expect("an EC private PEM"),
        Ed => EncodingKey::from_ed_pem(key).expect("an Ed25519 private PEM"),
    }
}

/// A token of `claims` signed with `key` (private PEM or secret) under
/// `alg`, naming `kid` when given.
pub fn sign(alg: Algorithm, key: &[u8], kid: Option<&str>, claims: &Claims) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, key)).expect("signs")
}

/// A token whose header says `alg: none`, with an empty signature.
pub fn unsigned(claims: &Claims) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    format!("{header}.{payload}.")
}

/// A JWKS of the public halves of `keys` (kid, alg, private PEM).
pub fn jwks(keys: &[(&str, Algorithm, &str)]) -> String {
    let keys = keys
        .iter()
        .map(|(kid, alg, pem)| {
            let mut jwk =
                Jwk::from_encoding_key(&encoding_key(*alg, pem.as_bytes()), *alg).expect("a JWK");
            jwk.common.key_id = Some((*kid).to_owned());
            jwk
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).expect("a JWKS serializes")
}
