//! Who a request comes from, and which rooms it may use.
//!
//! A gateway runs in one of two modes, fixed at start:
//! - **Tokens**: a JWT is the only way in: `?token=` or `Authorization:
//!   Bearer` on `/ws`, `Authorization: Bearer` on HTTP. `sub` is the user;
//!   `?user=` and `X-User` are ignored. Keys and claim rules: [`token`],
//!   [`jwks`].
//! - **Open dev mode**: no key is configured; a client names its user with
//!   `?user=` (or `X-User` on HTTP). The binary allows it only on a
//!   loopback address or when asked explicitly (`--dev-auth`), and says so.
//!
//! Either way an [`Identity`] decides which rooms the user may use
//! ([`access`]).

pub mod access;
pub mod jwks;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use schemas::protocol::{valid_user, ErrorCode, FrameError};

pub use access::RoomGrant;
pub use token::{mint, Mint, Verifier};

/// A user, as a token or the dev-mode name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// The token's `rooms` claim; `None`: no claim.
    pub rooms: Option<RoomGrant>,
    /// The token's `exp` (seconds since the Unix epoch); `None` in dev mode.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// A user named without a token (dev mode): every public room and its
    /// own direct messages, never expiring.
    pub fn dev(user: &str) -> Identity {
        Identity {
            user: user.to_owned(),
            rooms: None,
            expires_at: None,
        }
    }

    /// Whether this user may join, send to and read `room`.
    pub fn may_use(&self, room: &str) -> bool {
        access::may_use(&self.user, self.rooms.as_ref(), room)
    }
}

/// Why a request was not let in. Every case is answered 401 (HTTP, or the
/// WebSocket upgrade), or close 4001 on an open connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: ?token= or Authorization: Bearer")]
    Missing,
    #[error(
        "open dev mode: name the user with ?user=<name> (names match ^[A-Za-z0-9_.-]{{1,64}}$)"
    )]
    NoDevUser,
    #[error("the token is not a JWT signed with a supported algorithm (never alg: none)")]
    Malformed,
    #[error("the token's algorithm is not accepted with the configured keys")]
    Algorithm,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not the one configured")]
    Issuer,
    #[error("the token's audience is not the one configured")]
    Audience,
    #[error("the token names a key (kid) this server does not know")]
    UnknownKey,
    #[error("the token lacks the claim {0}")]
    MissingClaim(String),
    #[error("the token's sub is not a valid user name (^[A-Za-z0-9_.-]{{1,64}}$)")]
    Subject,
    #[error("{0}")]
    Rooms(String),
}

impl AuthError {
    /// The `unauthorized` error frame or body for this refusal.
    pub fn to_frame_error(&self) -> FrameError {
        FrameError::new(ErrorCode::Unauthorized, self.to_string(), None)
    }
}

/// How a gateway identifies users.
#[derive(Clone, Default)]
pub enum Auth {
    /// Open dev mode: `?user=` names the user.
    #[default]
    Dev,
    /// Tokens only.
    Tokens(Arc<Verifier>),
}

impl std::fmt::Debug for Auth {
    /// Names the mode only: the keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_dev() {
            "Auth::Dev"
        } else {
            "Auth::Tokens"
        })
    }
}

impl Auth {
    pub fn is_dev(&self) -> bool {
        matches!(self, Auth::Dev)
    }

    /// The JWKS the tokens are checked with, if any.
    pub fn jwks(&self) -> Option<&Arc<jwks::Jwks>> {
        match self {
            Auth::Dev => None,
            Auth::Tokens(verifier) => verifier.jwks(),
        }
    }

    /// The user of a WebSocket upgrade: the token from `?token=` or the
    /// `Authorization` header; in dev mode `?user=`.
    pub async fn identify_ws(
        &self,
        query: &HashMap<String, String>,
        headers: &HeaderMap,
    ) -> Result<Identity, AuthError> {
        match self {
            Auth::Dev => dev_identity(query.get("user").map(String::as_str)),
            Auth::Tokens(verifier) => {
                let token = bearer(headers)
                    .or_else(|| query.get("token").map(String::as_str))
                    .ok_or(AuthError::Missing)?;
                verifier.verify(token).await
            }
        }
    }

    /// The user of an HTTP request: the `Authorization: Bearer` token; in
    /// dev mode `?user=` or `X-User`.
    pub async fn identify_http(
        &self,
        query: &HashMap<String, String>,
        headers: &HeaderMap,
    ) -> Result<Identity, AuthError> {
        match self {
            Auth::Dev => dev_identity(
                query
                    .get("user")
                    .map(String::as_str)
                    .or_else(|| headers.get("x-user")?.to_str().ok()),
            ),
            Auth::Tokens(verifier) => {
                verifier
                    .verify(bearer(headers).ok_or(AuthError::Missing)?)
                    .await
            }
        }
    }
}

fn dev_identity(user: Option<&str>) -> Result<Identity, AuthError> {
    match user {
        Some(user) if valid_user(user) => Ok(Identity::dev(user)),
        _ => Err(AuthError::NoDevUser),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests;
