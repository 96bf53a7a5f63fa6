//! POST /workers: which URLs it refuses, the pool's cap, and that its answer says nothing
//! about whether anything listens at the URL.

use std::time::Duration;

use llmapi_router::testing::{Script, ScriptedWorker};
use serde_json::Value;

use super::{closed_port, start};

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn urls_other_than_plain_http_host_port_are_refused() {
    let h = start(|_| {}).await;
    let port = closed_port();
    for url in [
        format!("ftp://127.0.0.1:{port}"),
        "file:///etc/passwd".to_owned(),
        format!("127.0.0.1:{port}"),
        format!("http://user@127.0.0.1:{port}"),
        format!("http://user:password@127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}@127.0.0.1:1"),
        format!("http://127.0.0.1:{port}/v1/../admin"),
        format!("http://127.0.0.1:{port}?x=1"),
        format!("http://127.0.0.1:{port}#@127.0.0.1:1"),
        "http://127.0.0.1".to_owned(),
    ] {
        let a = h.register(&url).await;
        assert_eq!(a.status, 400, "{url}: {}", a.body);
        assert_eq!(a.body["error"]["param"], "url", "{url}");
    }
    assert_eq!(h.state.pool.all().len(), 1, "nothing was added");
}

#[tokio::test]
async fn a_host_outside_the_allowlist_is_refused_whether_or_not_it_listens() {
    let h = start(|c| c.registration.allowlist = Some(vec!["127.0.0.2".into()])).await;
    // A worker that answers, on a loopback address outside the allowlist, and a closed port
    // on the same address: the two refusals are identical.
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let listening = ScriptedWorker::new(Script::default()).serve(listener);
    let open = h
        .register(&format!("http://127.0.0.3:{}", listening.addr.port()))
        .await;
    let closed = h
        .register(&format!("http://127.0.0.3:{}", closed_port()))
        .await;
    assert_eq!(open.status, 403, "{}", open.body);
    assert_eq!(open.body["error"]["type"], "permission_error");
    assert!(
        message(&open.body).contains("--worker_url_allowlist"),
        "{}",
        open.body
    );
    assert_eq!((open.status, &open.body), (closed.status, &closed.body));
    // Loopback is not implied once an allowlist is given.
    let a = h
        .register(&format!("http://127.0.0.4:{}", closed_port()))
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    // A listed host is accepted.
    let a = h
        .register(&format!("http://127.0.0.2:{}", closed_port()))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(h.state.pool.all().len(), 2);
}

#[tokio::test]
async fn a_full_pool_refuses_new_workers_but_renews_known_ones() {
    let h = start(|c| c.registration.max_workers = 2).await;
    let second = format!("http://127.0.0.1:{}", closed_port());
    assert_eq!(h.register(&second).await.status, 202);
    let third = h
        .register(&format!("http://127.0.0.1:{}", closed_port()))
        .await;
    assert_eq!(third.status, 409, "{}", third.body);
    assert_eq!(third.body["error"]["type"], "conflict_error");
    assert!(
        message(&third.body).contains("--max_workers"),
        "{}",
        third.body
    );
    // Heartbeats of registered workers still pass at the cap.
    assert_eq!(h.register(&h.workers[0].url()).await.status, 202);
    assert_eq!(h.register(&second).await.status, 202);
    assert_eq!(h.state.pool.all().len(), 2);
}

#[tokio::test]
async fn registration_answers_the_same_for_a_worker_that_answers_and_one_that_does_not() {
    let h = start(|_| {}).await;
    let up = ScriptedWorker::new(Script::default())
        .spawn()
        .await
        .unwrap();
    let down = format!("http://127.0.0.1:{}", closed_port());
    let a = h.register(&up.url()).await;
    let b = h.register(&down).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.status, b.status);
    let strip = |v: &Value, url: &str| {
        let mut v = v.clone();
        assert_eq!(v["url"], url);
        v["url"] = Value::Null;
        v
    };
    assert_eq!(strip(&a.body, &up.url()), strip(&b.body, &down));
    // The health checker still finds out, for the router's own use.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let healthy = |url: &str| {
        h.state
            .pool
            .all()
            .iter()
            .any(|w| w.url == url && w.is_healthy())
    };
    while !healthy(&up.url()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(healthy(&up.url()), "the answering worker is admitted");
    assert!(!healthy(&down), "the silent one is not");
}

#[tokio::test]
async fn removal_finds_a_worker_by_the_url_it_registered_with() {
    let h = start(|_| {}).await;
    let url = format!("HTTP://127.0.0.1:{}/", closed_port());
    assert_eq!(h.register(&url).await.status, 202);
    let body = serde_json::json!({ "url": url });
    let auth = format!("Bearer {}", super::ADMIN_TOKEN);
    let a = h.send("DELETE", "/workers", Some(&body), Some(&auth)).await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(h.state.pool.all().len(), 1);
}
