//! Token verification: each way a token is refused, and each kind of key
//! that lets a user in.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::jwks::{Jwks, JwksSource};
use super::testing::*;
use super::*;

const SECRET: &[u8] = b"a test secret that is long enough";
const HOUR: Duration = Duration::from_secs(3600);

fn hs_verifier() -> Verifier {
    Verifier::new().with_secret(SECRET).unwrap()
}

fn hs(claims: &token::Claims) -> String {
    sign(Algorithm::HS256, SECRET, None, claims)
}

#[tokio::test]
async fn a_valid_token_names_its_sub() {
    let identity = hs_verifier()
        .verify(&hs(&claims("alice", HOUR)))
        .await
        .unwrap();
    assert_eq!(identity.user, "alice");
    assert_eq!(identity.rooms, None);
    assert!(identity.expires_at.is_some());
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, SECRET, None, &claims("alice", HOUR));
        assert_eq!(hs_verifier().verify(&token).await.unwrap().user, "alice");
    }
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_verify_with_their_public_keys() {
    let verifier = Verifier::new()
        .with_public_pem(RSA_PUB.as_bytes(), "rsa")
        .unwrap()
        .with_public_pem(EC_PUB.as_bytes(), "ec")
        .unwrap()
        .with_public_pem(ED_PUB.as_bytes(), "ed")
        .unwrap();
    for (alg, key) in [
        (Algorithm::RS256, RSA_KEY),
        (Algorithm::RS512, RSA_KEY),
        (Algorithm::ES256, EC_KEY),
        (Algorithm::EdDSA, ED_KEY),
    ] {
        let token = sign(alg, key.as_bytes(), None, &claims("bob", HOUR));
        let got = verifier.verify(&token).await;
        assert_eq!(got.map(|i| i.user), Ok("bob".to_owned()), "{alg:?}");
    }
    let forged = sign(
        Algorithm::RS256,
        OTHER_RSA_KEY.as_bytes(),
        None,
        &claims("bob", HOUR),
    );
    assert_eq!(verifier.verify(&forged).await, Err(AuthError::BadSignature));
}

#[tokio::test]
async fn each_bad_token_is_refused_with_its_reason() {
    let verifier = hs_verifier()
        .with_issuer(Some("https://id.example".into()))
        .with_audience(Some("chat".into()));
    let good = || token::Claims {
        iss: Some("https://id.example".into()),
        aud: Some("chat".into()),
        ..claims("alice", HOUR)
    };
    assert_eq!(verifier.verify(&hs(&good())).await.unwrap().user, "alice");
    // `aud` may be a list (RFC 7519): one of them must be ours.
    let listed = token::Claims {
        aud: Some(token::Audience::Many(vec!["other".into(), "chat".into()])),
        ..good()
    };
    assert_eq!(verifier.verify(&hs(&listed)).await.unwrap().user, "alice");
    let now = jsonwebtoken::get_current_timestamp();
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "bad signature",
            sign(Algorithm::HS256, b"another secret", None, &good()),
            AuthError::BadSignature,
        ),
        (
            "expired",
            hs(&token::Claims {
                exp: now - 3600,
                ..good()
            }),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            hs(&token::Claims {
                nbf: Some(now + 3600),
                ..good()
            }),
            AuthError::NotYetValid,
        ),
        (
            "wrong issuer",
            hs(&token::Claims {
                iss: Some("https://evil.example".into()),
                ..good()
            }),
            AuthError::Issuer,
        ),
        (
            "wrong audience",
            hs(&token::Claims {
                aud: Some("other".into()),
                ..good()
            }),
            AuthError::Audience,
        ),
        (
            "a list of audiences without ours",
            hs(&token::Claims {
                aud: Some(token::Audience::Many(vec!["a".into(), "b".into()])),
                ..good()
            }),
            AuthError::Audience,
        ),
        (
            "no issuer",
            hs(&token::Claims {
                iss: None,
                ..good()
            }),
            AuthError::MissingClaim("iss".into()),
        ),
        // `none` is no algorithm the header parser knows.
        ("alg none", unsigned(&good()), AuthError::Malformed),
        ("not a jwt", "not.a.jwt".to_owned(), AuthError::Malformed),
        ("empty", String::new(), AuthError::Malformed),
        (
            "bad sub",
            hs(&token::Claims {
                sub: "dm:a:b".into(),
                ..good()
            }),
            AuthError::Subject,
        ),
        (
            "bad rooms claim",
            hs(&token::Claims {
                rooms: Some(vec!["a b".into()]),
                ..good()
            }),
            AuthError::Rooms(String::new()),
        ),
        (
            "an RS token with only a secret configured",
            sign(Algorithm::RS256, RSA_KEY.as_bytes(), None, &good()),
            AuthError::Algorithm,
        ),
    ];
    for (what, token, want) in cases {
        let got = verifier.verify(&token).await;
        match (&got, &want) {
            (Err(AuthError::Rooms(_)), AuthError::Rooms(_)) => {}
            _ => assert_eq!(got, Err(want), "{what}"),
        }
    }
    // Within the leeway, an expired token still passes.
    let just_expired = hs(&token::Claims {
        exp: now - 5,
        ..good()
    });
    assert!(verifier.verify(&just_expired).await.is_ok());
}

#[tokio::test]
async fn an_hs_token_signed_with_the_public_key_is_refused() {
    // Algorithm confusion: a server holding an RSA public key must not
    // check an HS256 token with that key's bytes as the HMAC secret.
    let verifier = Verifier::new()
        .with_public_pem(RSA_PUB.as_bytes(), "rsa")
        .unwrap();
    let forged = sign(
        Algorithm::HS256,
        RSA_PUB.as_bytes(),
        None,
        &claims("mallory", HOUR),
    );
    assert_eq!(verifier.verify(&forged).await, Err(AuthError::Algorithm));
}

#[tokio::test]
async fn a_rooms_claim_is_carried_into_the_identity() {
    let token = hs(&token::Claims {
        rooms: Some(vec!["general".into(), "team-a.*".into()]),
        ..claims("alice", HOUR)
    });
    let identity = hs_verifier().verify(&token).await.unwrap();
    assert!(identity.may_use("general"));
    assert!(identity.may_use("team-a.x"));
    assert!(!identity.may_use("random"));
}

#[tokio::test]
async fn a_jwks_file_picks_the_key_by_kid_and_is_reread_for_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[("k1", Algorithm::RS256, RSA_KEY)])).unwrap();
    let set = Jwks::load(JwksSource::File(path.clone())).await.unwrap();
    let verifier = Verifier::new().with_jwks(set);
    let k1 = sign(
        Algorithm::RS256,
        RSA_KEY.as_bytes(),
        Some("k1"),
        &claims("alice", HOUR),
    );
    assert_eq!(verifier.verify(&k1).await.unwrap().user, "alice");
    // A key that signs under a kid the set holds for another key.
    let wrong_key = sign(
        Algorithm::RS256,
        OTHER_RSA_KEY.as_bytes(),
        Some("k1"),
        &claims("alice", HOUR),
    );
    assert_eq!(
        verifier.verify(&wrong_key).await,
        Err(AuthError::BadSignature)
    );
    let no_kid = sign(
        Algorithm::RS256,
        RSA_KEY.as_bytes(),
        None,
        &claims("a", HOUR),
    );
    assert_eq!(verifier.verify(&no_kid).await, Err(AuthError::UnknownKey));
    // The provider rotates in an EC key: the first token naming it rereads
    // the set.
    std::fs::write(
        &path,
        jwks(&[
            ("k1", Algorithm::RS256, RSA_KEY),
            ("k2", Algorithm::ES256, EC_KEY),
        ]),
    )
    .unwrap();
    let k2 = sign(
        Algorithm::ES256,
        EC_KEY.as_bytes(),
        Some("k2"),
        &claims("bob", HOUR),
    );
    assert_eq!(verifier.verify(&k2).await.unwrap().user, "bob");
    let k3 = sign(
        Algorithm::ES256,
        EC_KEY.as_bytes(),
        Some("k3"),
        &claims("bob", HOUR),
    );
    assert_eq!(verifier.verify(&k3).await, Err(AuthError::UnknownKey));
    // A key declared RS256 does not check a PS256 token.
    let ps = sign(
        Algorithm::PS256,
        RSA_KEY.as_bytes(),
        Some("k1"),
        &claims("alice", HOUR),
    );
    assert_eq!(verifier.verify(&ps).await, Err(AuthError::Algorithm));
}

#[tokio::test]
async fn a_jwks_url_is_fetched_at_start_and_refreshed() {
    use axum::routing::get;
    let served = Arc::new(std::sync::Mutex::new(jwks(&[(
        "k1",
        Algorithm::RS256,
        RSA_KEY,
    )])));
    let app = {
        let served = served.clone();
        axum::Router::new().route(
            "/jwks.json",
            get(move || {
                let body = served.lock().unwrap().clone();
                async move { body }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let set = Jwks::load(JwksSource::parse(&url)).await.unwrap();
    let verifier = Verifier::new().with_jwks(set.clone());
    let k1 = sign(
        Algorithm::RS256,
        RSA_KEY.as_bytes(),
        Some("k1"),
        &claims("alice", HOUR),
    );
    assert_eq!(verifier.verify(&k1).await.unwrap().user, "alice");
    // The provider replaces k1 with k2; a periodic refresh drops k1.
    *served.lock().unwrap() = jwks(&[("k2", Algorithm::EdDSA, ED_KEY)]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = tokio::spawn(
        set.clone()
            .refresh_every(Duration::from_millis(50), shutdown.clone()),
    );
    let k2 = sign(
        Algorithm::EdDSA,
        ED_KEY.as_bytes(),
        Some("k2"),
        &claims("bob", HOUR),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while verifier.verify(&k1).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "k1 never dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(verifier.verify(&k2).await.unwrap().user, "bob");
    shutdown.cancel();
    refresher.await.unwrap();
    server.abort();
    // A set that cannot be fetched does not load.
    assert!(Jwks::load(JwksSource::parse("http://127.0.0.1:1/none"))
        .await
        .is_err());
}

#[tokio::test]
async fn a_minted_token_verifies_with_the_same_secret() {
    let token = mint(
        SECRET,
        &Mint {
            user: "carol".into(),
            ttl: HOUR,
            rooms: Some(vec!["dm:*".into()]),
            issuer: None,
            audience: None,
        },
    )
    .unwrap();
    let identity = hs_verifier().verify(&token).await.unwrap();
    assert_eq!(identity.user, "carol");
    assert!(identity.may_use("dm:bob:carol"));
    assert!(!identity.may_use("general"));
}

#[tokio::test]
async fn the_bearer_header_and_the_token_parameter_are_read_in_token_mode_only() {
    let auth = Auth::Tokens(Arc::new(hs_verifier()));
    let token = hs(&claims("alice", HOUR));
    let mut headers = HeaderMap::new();
    let mut query = HashMap::new();
    query.insert("user".to_owned(), "mallory".to_owned());
    assert_eq!(
        auth.identify_ws(&query, &headers).await,
        Err(AuthError::Missing)
    );
    query.insert("token".to_owned(), token.clone());
    assert_eq!(
        auth.identify_ws(&query, &headers).await.unwrap().user,
        "alice"
    );
    // HTTP reads the header only.
    assert_eq!(
        auth.identify_http(&query, &headers).await,
        Err(AuthError::Missing)
    );
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    assert_eq!(
        auth.identify_http(&query, &headers).await.unwrap().user,
        "alice"
    );
    let dev = Auth::Dev;
    assert_eq!(
        dev.identify_ws(&query, &headers).await.unwrap().user,
        "mallory"
    );
    assert_eq!(
        dev.identify_ws(&HashMap::new(), &headers).await,
        Err(AuthError::NoDevUser)
    );
}
