//! A JSON Web Key Set: the public keys of an identity provider, chosen by
//! the token's `kid`.
//!
//! The set comes from a file or an `http(s)://` URL. It is loaded at start
//! (a gateway that cannot load it does not start), reloaded every
//! `refresh` by [`Jwks::refresh_every`] (a task the gateway owns), and
//! reloaded when a token names a `kid` the set lacks, at most once per
//! [`UNKNOWN_KID_RELOAD`], so a flood of made-up `kid`s costs the provider
//! one fetch a few seconds. A failed reload keeps the keys already held.
//! Symmetric (`oct`) keys in a set are ignored: a published set holds
//! public keys only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{AlgorithmFamily, DecodingKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::token::{jwk_algorithms, KeyError, TrustedKey};

/// Fewest time between two reloads caused by unknown `kid`s.
pub const UNKNOWN_KID_RELOAD: Duration = Duration::from_secs(10);
/// How long one fetch of a JWKS URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where a JWKS is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

impl JwksSource {
    /// `http://…` and `https://…` are URLs, anything else a file path.
    pub fn parse(s: &str) -> JwksSource {
        if s.starts_with("http://") || s.starts_with("https://") {
            JwksSource::Url(s.to_owned())
        } else {
            JwksSource::File(PathBuf::from(s))
        }
    }

    fn name(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url(u) => u.clone(),
        }
    }
}

type Keys = Arc<HashMap<String, Arc<TrustedKey>>>;

/// A JWKS held in memory, reloaded from its source.
pub struct Jwks {
    source: JwksSource,
    client: reqwest::Client,
    keys: RwLock<Keys>,
    /// When the last reload for an unknown `kid` started; held while one
    /// runs, so concurrent misses share it.
    last_miss_reload: Mutex<Option<Instant>>,
}

impl Jwks {
    /// Loads the set from `source`; an unreadable or empty set is an error.
    pub async fn load(source: JwksSource) -> Result<Arc<Jwks>, KeyError> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| KeyError::Jwks {
                source_name: source.name(),
                reason: e.to_string(),
            })?;
        let jwks = Jwks {
            source,
            client,
            keys: RwLock::new(Arc::default()),
            last_miss_reload: Mutex::new(None),
        };
        jwks.reload().await?;
        Ok(Arc::new(jwks))
    }

    /// The key named `kid`, reloading the set once when it is not held.
    pub(super) async fn key(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        if let Some(key) = self.held(kid) {
            return Some(key);
        }
        // Claims the reload under the lock, and reloads after letting go of
        // it: a miss that comes while another reload runs, or within
        // UNKNOWN_KID_RELOAD of it, finds no key (the token is refused and
        // its client may retry).
        let due = {
            let mut last = self
                .last_miss_reload
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= UNKNOWN_KID_RELOAD);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "reloading the JWKS for an unknown kid failed");
            }
        }
        self.held(kid)
    }

    fn held(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(kid).cloned()
    }

    /// Reads the set again and replaces the keys held.
    pub async fn reload(&self) -> Result<usize, KeyError> {
        let error = |reason: String| KeyError::Jwks {
            source_name: self.source.name(),
            reason,
        };
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| error(e.to_string()))?,
            JwksSource::Url(url) => {
                let response = self
                    .client
                    .get(url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| error(e.to_string()))?;
                let bytes = response.bytes().await.map_err(|e| error(e.to_string()))?;
                bytes.to_vec()
            }
        };
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(error(format!("larger than {MAX_JWKS_BYTES} bytes")));
        }
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
        let keys = parse_set(&set);
        if keys.is_empty() {
            return Err(error("no usable key with a kid".to_owned()));
        }
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        tracing::debug!(keys = count, source = %self.source.name(), "JWKS loaded");
        Ok(count)
    }

    /// Reloads the set every `every` until `shutdown`.
    pub async fn refresh_every(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "refreshing the JWKS failed; keeping the keys held");
                    }
                }
            }
        }
    }
}

/// The usable keys of a set, by `kid`: asymmetric, with a `kid`, of a
/// supported algorithm.
fn parse_set(set: &JwkSet) -> HashMap<String, Arc<TrustedKey>> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            tracing::warn!(kid, "ignoring a symmetric key in the JWKS");
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            tracing::warn!(kid, "ignoring a JWKS key that cannot be used");
            continue;
        };
        if key.family() == AlgorithmFamily::Hmac {
            continue;
        }
        let declared = match jwk
            .common
            .key_algorithm
            .map(jsonwebtoken::Algorithm::try_from)
        {
            None => None,
            Some(Ok(alg)) => Some(alg),
            Some(Err(_)) => {
                tracing::warn!(kid, "ignoring a JWKS key of an unsupported algorithm");
                continue;
            }
        };
        let algorithms = jwk_algorithms(declared, key.family());
        if algorithms.is_empty() {
            tracing::warn!(kid, "ignoring a JWKS key whose alg does not fit its type");
            continue;
        }
        keys.insert(kid.clone(), Arc::new(TrustedKey { key, algorithms }));
    }
    keys
}
