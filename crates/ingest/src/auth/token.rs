//! JWT verification and minting.
//!
//! A [`Verifier`] holds the keys a gateway trusts: an HMAC secret
//! (HS256/384/512), PEM public keys (RS256/384/512 and PS*, ES256/384,
//! EdDSA) and a JWKS ([`super::jwks`], keys chosen by `kid`). A token is
//! checked only against keys of its header's algorithm family, so an HS
//! token is never checked with a public key used as a secret (algorithm
//! confusion), and `alg: none` is no algorithm at all. `exp` is required,
//! `nbf` checked when present, both with a small leeway; `iss` and `aud`
//! when configured. `sub` is the user and must be a valid user name.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::access::RoomGrant;
use super::jwks::Jwks;
use super::{AuthError, Identity};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// The claims a gateway reads; others are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Room names and prefix patterns the user may use; absent: every
    /// public room and the user's direct messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// The `aud` claim: one audience, or a list of them (RFC 7519 allows
/// both, and identity providers send either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(aud: &str) -> Self {
        Audience::One(aud.to_owned())
    }
}

impl From<String> for Audience {
    fn from(aud: String) -> Self {
        Audience::One(aud)
    }
}

/// A key with the algorithms it may check.
pub(super) struct TrustedKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

impl TrustedKey {
    /// A key that checks every algorithm of its family.
    fn of_family(key: DecodingKey) -> TrustedKey {
        let algorithms = key.family().algorithms().to_vec();
        TrustedKey { key, algorithms }
    }
}

/// The keys and claim rules of a gateway that requires tokens.
pub struct Verifier {
    keys: Vec<TrustedKey>,
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the JWT secret is empty")]
    EmptySecret,
    #[error("{what} is not a PEM RSA, EC (P-256/P-384) or Ed25519 public key")]
    BadPem { what: String },
    #[error("the JWKS {source_name}: {reason}")]
    Jwks { source_name: String, reason: String },
}

impl Verifier {
    /// A verifier with no key yet; add some before use.
    pub fn new() -> Verifier {
        Verifier {
            keys: Vec::new(),
            jwks: None,
            issuer: None,
            audience: None,
            leeway: LEEWAY,
        }
    }

    /// Trusts HS256/384/512 tokens signed with `secret`.
    pub fn with_secret(mut self, secret: &[u8]) -> Result<Verifier, KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        let key = DecodingKey::from_secret(secret).map_err(|_| KeyError::EmptySecret)?;
        self.keys.push(TrustedKey::of_family(key));
        Ok(self)
    }

    /// Trusts tokens signed by the private half of a PEM public key (RSA,
    /// EC or Ed25519); `what` names it in errors.
    pub fn with_public_pem(mut self, pem: &[u8], what: &str) -> Result<Verifier, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem)
            .or_else(|_| DecodingKey::from_ec_pem(pem))
            .or_else(|_| DecodingKey::from_ed_pem(pem))
            .map_err(|_| KeyError::BadPem {
                what: what.to_owned(),
            })?;
        self.keys.push(TrustedKey::of_family(key));
        Ok(self)
    }

    /// Trusts the keys of a JWKS, chosen by the token's `kid`.
    pub fn with_jwks(mut self, jwks: Arc<Jwks>) -> Verifier {
        self.jwks = Some(jwks);
        self
    }

    /// Requires `iss` to be `issuer`.
    pub fn with_issuer(mut self, issuer: Option<String>) -> Verifier {
        self.issuer = issuer;
        self
    }

    /// Requires `aud` to hold `audience`.
    pub fn with_audience(mut self, audience: Option<String>) -> Verifier {
        self.audience = audience;
        self
    }

    /// True when no key was added.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.jwks.is_none()
    }

    /// The JWKS this verifier reads, if any (its owner refreshes it).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Checks `token` and returns who it names and what it grants.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                AuthError::Algorithm
            }
            _ => AuthError::Malformed,
        })?;
        let family = header.alg.family();
        let jwks_key;
        let candidates: Vec<&TrustedKey> = match (&header.kid, &self.jwks) {
            (Some(kid), Some(jwks)) => {
                jwks_key = jwks.key(kid).await.ok_or(AuthError::UnknownKey)?;
                vec![&*jwks_key]
            }
            _ => {
                let keys: Vec<&TrustedKey> = self
                    .keys
                    .iter()
                    .filter(|k| k.key.family() == family)
                    .collect();
                if keys.is_empty() {
                    // A JWKS holds every key this gateway trusts by kid: a
                    // token without one cannot name its key.
                    return Err(if self.jwks.is_some() && header.kid.is_none() {
                        AuthError::UnknownKey
                    } else {
                        AuthError::Algorithm
                    });
                }
                keys
            }
        };
        let mut last = AuthError::BadSignature;
        for key in candidates {
            if !key.algorithms.contains(&header.alg) {
                last = AuthError::Algorithm;
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(header.alg)) {
                Ok(data) => return Identity::from_claims(data.claims),
                Err(e) => {
                    last = AuthError::from_jwt(e.kind());
                    // Only a bad signature can go right with another key.
                    if !matches!(last, AuthError::BadSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".to_owned());
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".to_owned());
            }
            None => v.validate_aud = false,
        }
        v
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new()
    }
}

impl AuthError {
    fn from_jwt(kind: &ErrorKind) -> AuthError {
        match kind {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
            ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
            _ => AuthError::Malformed,
        }
    }
}

impl Identity {
    fn from_claims(claims: Claims) -> Result<Identity, AuthError> {
        if !schemas::protocol::valid_user(&claims.sub) {
            return Err(AuthError::Subject);
        }
        let rooms = match &claims.rooms {
            None => None,
            Some(entries) => Some(RoomGrant::parse(entries).map_err(AuthError::Rooms)?),
        };
        Ok(Identity {
            user: claims.sub,
            rooms,
            expires_at: Some(claims.exp),
        })
    }
}

/// What a minted token says.
#[derive(Debug, Clone)]
pub struct Mint {
    pub user: String,
    pub ttl: Duration,
    pub rooms: Option<Vec<String>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Signs an HS256 token for `mint` with `secret` (`chat token`, tests).
pub fn mint(secret: &[u8], mint: &Mint) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: mint.user.clone(),
        exp: now + mint.ttl.as_secs(),
        nbf: None,
        iat: Some(now),
        iss: mint.issuer.clone(),
        aud: mint.audience.clone().map(Audience::One),
        rooms: mint.rooms.clone(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret)?,
    )
}

/// The algorithms of a JWK: the one it declares, else its family's.
pub(super) fn jwk_algorithms(
    declared: Option<Algorithm>,
    family: AlgorithmFamily,
) -> Vec<Algorithm> {
    match declared {
        Some(alg) if alg.family() == family => vec![alg],
        Some(_) => Vec::new(),
        None => family.algorithms().to_vec(),
    }
}
