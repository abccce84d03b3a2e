//! End-to-end tests of identity on a real `chat serve` over real sockets:
//! every way a token is refused (401 on the upgrade and on HTTP, nothing
//! appended), every kind of key letting its user in, the `rooms` claim, the
//! `chat token` command, and the dev-mode rules.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{id, Client, Server};
use ingest::auth::testing::{self, claims, sign, unsigned};
use ingest::auth::token::Claims;
use jsonwebtoken::Algorithm;
use serde_json::json;

const SECRET: &str = "an end-to-end test secret";
const ISSUER: &str = "https://id.test";
const AUDIENCE: &str = "chat";
const HOUR: Duration = Duration::from_secs(3600);

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("crates/ingest/src/auth/testdata")
        .join(name)
}

/// Claims this server accepts: its issuer and audience, valid for an hour.
fn good(user: &str) -> Claims {
    Claims {
        iss: Some(ISSUER.into()),
        aud: Some(AUDIENCE.into()),
        ..claims(user, HOUR)
    }
}

fn hs(claims: &Claims) -> String {
    sign(Algorithm::HS256, SECRET.as_bytes(), None, claims)
}

/// A server that trusts the secret, the RSA and EC public keys, and a JWKS
/// holding the Ed25519 key as `ed-1`; it requires the issuer and audience.
async fn server(dir: &std::path::Path) -> Server {
    let jwks = dir.join("jwks.json");
    std::fs::write(
        &jwks,
        testing::jwks(&[("ed-1", Algorithm::EdDSA, testing::ED_KEY)]),
    )
    .unwrap();
    let (rsa, ec) = (testdata("rsa.pub.pem"), testdata("ec.pub.pem"));
    let args = [
        "--jwt-key",
        rsa.to_str().unwrap(),
        "--jwt-key",
        ec.to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ];
    Server::start_env(&dir.join("data"), 4, &args, &[("CHAT_JWT_SECRET", SECRET)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_with_401_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let now = jsonwebtoken::get_current_timestamp();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        (
            "bad signature",
            Some(sign(
                Algorithm::HS256,
                b"not the secret",
                None,
                &good("alice"),
            )),
        ),
        (
            "expired",
            Some(hs(&Claims {
                exp: now - 3600,
                ..good("alice")
            })),
        ),
        (
            "not yet valid",
            Some(hs(&Claims {
                nbf: Some(now + 3600),
                ..good("alice")
            })),
        ),
        (
            "wrong issuer",
            Some(hs(&Claims {
                iss: Some("https://evil.test".into()),
                ..good("alice")
            })),
        ),
        (
            "wrong audience",
            Some(hs(&Claims {
                aud: Some("other".into()),
                ..good("alice")
            })),
        ),
        (
            "unknown kid",
            Some(sign(
                Algorithm::EdDSA,
                testing::ED_KEY.as_bytes(),
                Some("ed-2"),
                &good("alice"),
            )),
        ),
        ("alg none", Some(unsigned(&good("alice")))),
        (
            "HS256 signed with the RSA public key",
            Some(sign(
                Algorithm::HS256,
                testing::RSA_PUB.as_bytes(),
                None,
                &good("alice"),
            )),
        ),
        (
            "RS256 from an unknown key",
            Some(sign(
                Algorithm::RS256,
                testing::OTHER_RSA_KEY.as_bytes(),
                None,
                &good("alice"),
            )),
        ),
    ];
    for (what, token) in &cases {
        let token = token.as_deref();
        let query = token.map_or("user=alice".to_owned(), |t| format!("token={t}"));
        assert_eq!(
            Client::open(&server.addr, &query, None).await.err(),
            Some(401),
            "{what}: ?token="
        );
        if let Some(t) = token {
            assert_eq!(
                Client::open(&server.addr, "", Some(t)).await.err(),
                Some(401),
                "{what}: Authorization header"
            );
        }
        let (status, body) = server.post_as("general", &id(), "sneaky", token).await;
        assert_eq!(status, 401, "{what}: POST {body}");
        assert_eq!(body["code"], "unauthorized", "{what}");
        let (status, _) = server.get_as("/rooms/general/messages", token).await;
        assert_eq!(status, 401, "{what}: GET history");
    }
    // A valid send after all of them is the only message: the history is
    // projected in log order, so had anything been appended before the
    // marker, it would show.
    let marker = id();
    let (status, _) = server
        .post_as("general", &marker, "marker", Some(&hs(&good("alice"))))
        .await;
    assert_eq!(status, 200);
    let alice = hs(&good("alice"));
    let history = history_with(&server, "general", &alice, 1).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["id"], marker.as_str());
}

/// The history of `room` read with `token`, once it holds `n` messages.
async fn history_with(
    server: &Server,
    room: &str,
    token: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (status, page) = server
            .get_as(&format!("/rooms/{room}/messages?limit=100"), Some(token))
            .await;
        assert_eq!(status, 200, "{page}");
        let messages = page["messages"].as_array().unwrap().clone();
        if messages.len() >= n || tokio::time::Instant::now() > deadline {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_rs256_es256_and_jwks_tokens_each_let_their_sub_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let tokens = [
        ("hs", hs(&good("hs-user"))),
        (
            "rs",
            sign(
                Algorithm::RS256,
                testing::RSA_KEY.as_bytes(),
                None,
                &good("rs-user"),
            ),
        ),
        (
            "es",
            sign(
                Algorithm::ES256,
                testing::EC_KEY.as_bytes(),
                None,
                &good("es-user"),
            ),
        ),
        (
            "jwks",
            sign(
                Algorithm::EdDSA,
                testing::ED_KEY.as_bytes(),
                Some("ed-1"),
                &good("jwks-user"),
            ),
        ),
    ];
    for (what, token) in &tokens {
        let user = format!("{what}-user");
        let mut c = server.connect_token(token, &user).await;
        let mid = id();
        c.send_message("general", &mid, what).await;
        let ack = c.recv().await;
        assert_eq!(ack["type"], "ack", "{what}: {ack}");
        // The same token in the header, with a ?user= that is ignored.
        let c = Client::open(&server.addr, "user=mallory", Some(token))
            .await
            .unwrap_or_else(|s| panic!("{what}: refused with {s}"));
        c.welcomed(&user).await;
        let (status, body) = server
            .post_as("general", &id(), "over http", Some(token))
            .await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    // `?user=` alongside a token is ignored, alone it is refused.
    let c = Client::open(
        &server.addr,
        &format!("user=mallory&token={}", tokens[0].1),
        None,
    )
    .await
    .unwrap();
    c.welcomed("hs-user").await;
    assert_eq!(
        Client::open(&server.addr, "user=mallory", None).await.err(),
        Some(401)
    );
    let history = history_with(&server, "general", &tokens[0].1, 8).await;
    let users: Vec<&str> = history
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert!(!users.contains(&"mallory"), "{users:?}");
    assert_eq!(users.len(), 8, "{users:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_claim_limits_joins_sends_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let scoped = hs(&Claims {
        rooms: Some(vec!["team-a.*".into()]),
        ..good("alice")
    });
    let open = hs(&good("bob"));
    let mut alice = server.connect_token(&scoped, "alice").await;
    alice.join("team-a.ops", None).await;
    alice
        .send_json(json!({"type": "join", "room": "general"}))
        .await;
    let e = alice.recv().await;
    assert_eq!(e["code"], "forbidden", "{e}");
    let refused = id();
    alice.send_message("general", &refused, "nope").await;
    let e = alice.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("forbidden"), Some(refused.as_str()))
    );
    let (status, body) = server
        .post_as("general", &id(), "nope", Some(&scoped))
        .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, _) = server
        .get_as("/rooms/general/messages", Some(&scoped))
        .await;
    assert_eq!(status, 403);
    // Inside the grant everything works.
    let ok = id();
    alice.send_message("team-a.ops", &ok, "in scope").await;
    assert_eq!(alice.recv_type("ack").await["id"], ok.as_str());
    let (status, _) = server
        .get_as("/rooms/team-a.ops/messages", Some(&scoped))
        .await;
    assert_eq!(status, 200);
    // Nothing of alice's reached general: bob's marker is all it holds.
    let marker = id();
    assert_eq!(
        server.post_as("general", &marker, "m", Some(&open)).await.0,
        200
    );
    let history = history_with(&server, "general", &open, 1).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["id"], marker.as_str());
}

/// Runs the `chat` binary with `args` and `env` (and no secret from this
/// process's environment): its stdout, or its stderr when it fails.
fn chat(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(args)
        .env_remove("CHAT_JWT_SECRET")
        .env_remove("CHAT_JWT_SECRET_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_token_mints_a_token_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let env = [("CHAT_JWT_SECRET", SECRET)];
    let token = chat(
        &[
            "token",
            "--user",
            "dana",
            "--ttl",
            "10m",
            "--rooms",
            "general,dm:*",
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
        ],
        &env,
    )
    .unwrap();
    // GET /auth tells the page the mode, and checks a token when given one.
    assert_eq!(
        server.get_as("/auth", None).await,
        (200, json!({"mode": "token"}))
    );
    assert_eq!(
        server.get_as("/auth", Some(&token)).await,
        (200, json!({"mode": "token", "user": "dana"}))
    );
    let (status, refused) = server.get_as("/auth", Some(&format!("{token}x"))).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let mut dana = server.connect_token(&token, "dana").await;
    dana.join("general", None).await;
    dana.join("dm:dana:erin", None).await;
    dana.send_json(json!({"type": "join", "room": "random"}))
        .await;
    assert_eq!(dana.recv().await["code"], "forbidden");
    // From a secret file too; without a secret, a clear error.
    let file = dir.path().join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let from_file = chat(
        &[
            "token",
            "--user",
            "erin",
            "--jwt-secret-file",
            file.to_str().unwrap(),
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
        ],
        &[],
    )
    .unwrap();
    server.connect_token(&from_file, "erin").await;
    let e = chat(&["token", "--user", "erin"], &[]).unwrap_err();
    assert!(e.contains("no JWT secret"), "{e}");
    let e = chat(&["token", "--user", "dm:a:b"], &env).unwrap_err();
    assert!(e.contains("user names"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_is_only_on_loopback_or_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    // No key, a non-loopback address: refused before it binds.
    let e = chat(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .unwrap_err();
    assert!(
        e.contains("not a loopback address") && e.contains("--dev-auth"),
        "{e}"
    );
    // A key and --dev-auth exclude each other.
    let e = chat(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--dev-auth",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[("CHAT_JWT_SECRET", SECRET)],
    )
    .unwrap_err();
    assert!(e.contains("exclude"), "{e}");
    // On loopback it runs open and says so, in the log and on /auth.
    let server = Server::start(&dir.path().join("dev"), 2).await;
    assert!(server.log().contains("open dev mode"), "{}", server.log());
    assert_eq!(
        server.get_as("/auth", None).await,
        (200, json!({"mode": "dev"}))
    );
    let token_server = server_in(dir.path()).await;
    assert_eq!(
        token_server.get_as("/auth", None).await,
        (200, json!({"mode": "token"}))
    );
}

async fn server_in(dir: &std::path::Path) -> Server {
    let d = dir.join("tokens");
    std::fs::create_dir_all(&d).unwrap();
    server(&d).await
}
