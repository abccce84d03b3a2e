//! End-to-end tests of the abuse limits on a real `chat serve` over real
//! sockets: each limit gets its documented answer (docs/protocol.md,
//! Limits), and the log holds nothing of the refused request.
//!
//! "Nothing appended" is shown with a marker: after the refused requests,
//! another user sends a last message to the same room; once the history
//! holds the marker, the projector has applied everything before it in the
//! room's partition, so the history is the log's whole say about the room.
//! (The rate tests of one connection, the rooms limit and the idle timeout
//! run on the production session in `crates/ingest/src/ws/tests.rs`, where
//! the log is read directly.)

mod common;

use common::{id, Client, Server};
use serde_json::{json, Value};

const PARTITIONS: u32 = 4;

/// The bodies of `room`'s history once it holds a marker sent by `marker`,
/// the marker excluded.
async fn bodies_before_marker(server: &Server, room: &str) -> Vec<String> {
    let mut marker = server.connect("marker").await;
    marker.send_message(room, "the-marker", "marker").await;
    assert_eq!(marker.recv_type("ack").await["id"], "the-marker");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let history = loop {
        let history = server.history(room, 1000).await;
        if history.iter().any(|m| m["id"] == "the-marker") {
            break history;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the marker reached the history: {history:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (last, before) = history.split_last().unwrap();
    assert_eq!(last["id"], "the-marker", "the marker is last: {history:?}");
    before
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_closes_with_1009_and_the_server_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), PARTITIONS).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    bob.join("general", None).await;
    alice
        .send_message("general", "before", "before the big one")
        .await;
    assert_eq!(alice.recv_type("ack").await["id"], "before");

    // 2 MiB in one frame: a send whose body would be far over every limit.
    let big = json!({"type": "send", "room": "general", "id": "big", "body": "x".repeat(2 << 20)})
        .to_string();
    // The server may stop reading before the client has written it all.
    let _written = alice.try_send_text(&big).await;
    let close = alice.recv_type("close").await;
    assert_eq!(close["code"], 1009, "{close}");

    // Others are served as before; the big frame was not appended.
    bob.send_message("general", "after", "still serving").await;
    assert_eq!(bob.recv_type("ack").await["id"], "after");
    let mut carol = server.connect("carol").await;
    carol
        .send_message("general", "new", "a new connection too")
        .await;
    assert_eq!(carol.recv_type("ack").await["id"], "new");
    assert_eq!(
        bodies_before_marker(&server, "general").await,
        [
            "before the big one",
            "still serving",
            "a new connection too"
        ]
    );
    assert!(
        server
            .metric("ingest_bad_frames_total{code=\"too_large\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_of_an_address_or_a_user_are_refused_with_429() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        PARTITIONS,
        &[
            "--max-connections-per-ip",
            "3",
            "--max-connections-per-user",
            "2",
        ],
    )
    .await;
    let a1 = server.connect("alice").await;
    let _a2 = server.connect("alice").await;
    let (status, body) = Client::open_with(&server.addr, "user=alice", &[])
        .await
        .err()
        .expect("a third connection of alice is refused");
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("limit_reached"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("alice"),
        "{body}"
    );
    let _b1 = server.connect("bob").await;
    let (status, body) = Client::open_with(&server.addr, "user=carol", &[])
        .await
        .err()
        .expect("a fourth connection from 127.0.0.1 is refused");
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("limit_reached"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );

    assert_eq!(
        server
            .metric("ingest_upgrades_refused_total{code=\"limit_reached\"}")
            .await,
        2.0
    );

    // A closed connection gives its place back once the server has seen
    // the close.
    a1.close().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let mut carol = loop {
        match Client::open_with(&server.addr, "user=carol", &[]).await {
            Ok(client) => break client.welcomed("carol").await,
            Err((429, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(other) => panic!("carol is refused after a close: {other:?}"),
        }
    };
    carol.send_message("general", id().as_str(), "in").await;
    assert_eq!(carol.recv_type("ack").await["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_of_a_page_must_be_the_servers_or_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), PARTITIONS).await;
    let same = format!("http://{}", server.addr);
    let (status, body) = Client::open_with(
        &server.addr,
        "user=alice",
        &[("origin", "http://evil.test")],
    )
    .await
    .err()
    .expect("another site's page is refused");
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        server
            .metric("ingest_upgrades_refused_total{code=\"forbidden\"}")
            .await,
        1.0
    );
    Client::open_with(&server.addr, "user=alice", &[("origin", &same)])
        .await
        .expect("the server's own page may connect")
        .welcomed("alice")
        .await;
    Client::open_with(&server.addr, "user=alice", &[])
        .await
        .expect("a client without Origin (not a browser) may connect")
        .welcomed("alice")
        .await;

    let dir = tempfile::tempdir().unwrap();
    let listed = Server::start_with(
        dir.path(),
        PARTITIONS,
        &["--allowed-origin", "https://app.example.com"],
    )
    .await;
    Client::open_with(
        &listed.addr,
        "user=alice",
        &[("origin", "https://app.example.com")],
    )
    .await
    .expect("a listed origin may connect")
    .welcomed("alice")
    .await;
    let own = format!("http://{}", listed.addr);
    let refused = Client::open_with(&listed.addr, "user=alice", &[("origin", &own)]).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_limit_is_too_large_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), PARTITIONS, &["--max-body-bytes", "1024"]).await;
    let http = reqwest::Client::new();
    let post = |body: String| {
        http.post(server.url("/rooms/general/messages?user=alice"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let small = json!({"id": "small", "body": "fits"}).to_string();
    assert_eq!(post(small).await.unwrap().status(), 200);
    let large = json!({"id": "large", "body": "y".repeat(2000)}).to_string();
    let response = post(large).await.unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "too_large", "{body}");
    assert_eq!(bodies_before_marker(&server, "general").await, ["fits"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_over_a_users_rate_get_429_with_retry_after_and_append_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        PARTITIONS,
        &["--user-send-rate", "1", "--user-send-burst", "2"],
    )
    .await;
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for i in 0..4 {
        let response = http
            .post(server.url("/rooms/general/messages?user=alice"))
            .json(&json!({"id": format!("p{i}"), "body": format!("post {i}")}))
            .send()
            .await
            .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = response.status().as_u16();
        answers.push((status, retry_after, response.json::<Value>().await.unwrap()));
    }
    assert_eq!(
        answers.iter().map(|a| a.0).collect::<Vec<_>>(),
        [200, 200, 429, 429],
        "{answers:?}"
    );
    for (_, retry_after, body) in &answers[2..] {
        assert_eq!(body["code"], "rate_limited", "{body}");
        assert!(body["retry_after_ms"].as_u64().unwrap() >= 1, "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    // The marker user has a bucket of its own.
    assert_eq!(
        bodies_before_marker(&server, "general").await,
        ["post 0", "post 1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        PARTITIONS,
        &[
            "--max-connections-per-ip",
            "1",
            "--trusted-proxy",
            "127.0.0.0/8",
        ],
    )
    .await;
    let via = |client: &'static str| [("x-forwarded-for", client)];
    let _a = Client::open_with(&server.addr, "user=alice", &via("198.51.100.1"))
        .await
        .expect("the first client behind the proxy");
    let _b = Client::open_with(&server.addr, "user=bob", &via("198.51.100.2"))
        .await
        .expect("another client behind the same proxy has its own count");
    let (status, body) = Client::open_with(&server.addr, "user=carol", &via("198.51.100.1"))
        .await
        .err()
        .expect("a second connection of the first client is refused");
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("limit_reached"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("198.51.100.1"),
        "{body}"
    );
}
