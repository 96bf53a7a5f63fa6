//! Every route against every kind of credential.

use std::sync::Arc;

use axum::http::StatusCode;
use llmapi_router::server::Listeners;
use serde_json::{Value, json};

use super::{ADMIN_TOKEN, API_KEY, Answer, METRICS_KEY, http_get as get, start};

/// The credentials a client may present, in the order of the table's columns.
const CREDENTIALS: [(&str, Option<&str>); 7] = [
    ("no key", None),
    ("wrong key", Some("Bearer sk-wrong")),
    ("API key", Some("Bearer sk-api-key")),
    ("API key, lower-case bearer", Some("bearer sk-api-key")),
    ("metrics key", Some("Bearer sk-metrics-key")),
    ("admin token", Some("Bearer admin-token")),
    ("API key, other scheme", Some("Basic sk-api-key")),
];

const OK: u16 = 200;
const NO: u16 = 401;

fn check_401(what: &str, a: &Answer) {
    assert_eq!(
        a.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "{what}: WWW-Authenticate"
    );
    assert_eq!(a.body["error"]["type"], "authentication_error", "{what}");
    assert_eq!(a.body["error"]["code"], 401, "{what}");
    let message = a.body["error"]["message"].as_str().unwrap_or_default();
    for secret in [API_KEY, METRICS_KEY, ADMIN_TOKEN] {
        assert!(!message.contains(secret), "{what}: the 401 names a secret");
    }
}

#[tokio::test]
async fn every_route_needs_its_key_and_only_health_is_open() {
    let h = start(|_| {}).await;
    let worker = h.workers[0].url();
    let completion = json!({"model": "demo", "prompt": "hi", "max_tokens": 1});
    let chat =
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let registered = json!({ "url": worker });
    let unknown = json!({"url": "http://127.0.0.1:1"});
    let api = [NO, NO, OK, OK, NO, NO, NO];
    #[rustfmt::skip]
    let table: Vec<(&str, &str, Option<&Value>, [u16; 7])> = vec![
        ("GET", "/health", None, [OK; 7]),
        ("POST", "/v1/completions", Some(&completion), api),
        ("POST", "/v1/chat/completions", Some(&chat), api),
        ("GET", "/v1/models", None, api),
        ("GET", "/health_generate", None, api),
        ("GET", "/version", None, api),
        ("GET", "/workers", None, api),
        ("GET", "/metrics", None, [NO, NO, OK, OK, OK, NO, NO]),
        // A renewal of a registered worker, and the removal of an unknown one: the admin
        // token gets through (202, 404), nothing else does.
        ("POST", "/workers", Some(&registered), [NO, NO, NO, NO, NO, 202, NO]),
        ("DELETE", "/workers", Some(&unknown), [NO, NO, NO, NO, NO, 404, NO]),
        // Unmatched paths run nothing: 404 whoever asks.
        ("GET", "/v1/no_such_route", None, [404; 7]),
    ];
    for (method, path, body, expected) in table {
        for ((who, auth), want) in CREDENTIALS.iter().zip(expected) {
            let what = format!("{method} {path} with {who}");
            let a = h.send(method, path, body, *auth).await;
            assert_eq!(a.status.as_u16(), want, "{what}: {}", a.body);
            if want == NO {
                check_401(&what, &a);
            }
        }
    }
    assert_eq!(h.state.pool.all().len(), 1, "the pool is unchanged");
}

#[tokio::test]
async fn a_metrics_key_alone_guards_only_metrics() {
    let h = start(|c| c.api_key = None).await;
    let metrics = format!("Bearer {METRICS_KEY}");
    assert_eq!(h.send("GET", "/metrics", None, None).await.status, 401);
    assert_eq!(
        h.send("GET", "/metrics", None, Some("Bearer sk-api-key"))
            .await
            .status,
        401
    );
    assert_eq!(
        h.send("GET", "/metrics", None, Some(&metrics)).await.status,
        200
    );
    for path in ["/v1/models", "/version", "/workers"] {
        assert_eq!(h.send("GET", path, None, None).await.status, 200, "{path}");
    }
}

#[tokio::test]
async fn without_an_admin_token_registration_is_off_for_everyone() {
    let h = start(|c| c.admin_token = None).await;
    let body = json!({"url": h.workers[0].url()});
    for (who, auth) in CREDENTIALS {
        let a = h.send("POST", "/workers", Some(&body), auth).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{who}");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("registration is disabled")),
            "{who}: {}",
            a.body
        );
    }
}

#[tokio::test]
async fn a_job_secret_registers_beside_an_operators_admin_token() {
    // A Slurm job's embedded router with LLMAPI_ADMIN_TOKEN set: the operator's token and the
    // job secret the tasks hold both manage the pool; the API key still does not.
    let h =
        start(|c| c.job_token = llmapi_router::auth::Secret::new("job", "job-secret").ok()).await;
    let body = json!({"url": h.workers[0].url()});
    for (auth, want) in [
        ("Bearer job-secret", 202),
        (&*format!("Bearer {ADMIN_TOKEN}"), 202),
        ("Bearer sk-api-key", 401),
        ("Bearer job-secre", 401),
    ] {
        let a = h.send("POST", "/workers", Some(&body), Some(auth)).await;
        assert_eq!(a.status.as_u16(), want, "{auth}: {}", a.body);
    }
    // The job secret alone (no admin token) is enough to turn registration on.
    let h = start(|c| {
        c.admin_token = None;
        c.job_token = llmapi_router::auth::Secret::new("job", "job-secret").ok();
    })
    .await;
    let a = h
        .send("POST", "/workers", Some(&body), Some("Bearer job-secret"))
        .await;
    assert_eq!(a.status.as_u16(), 202, "{}", a.body);
}

#[tokio::test]
async fn a_metrics_port_serves_metrics_apart_with_the_same_keys() {
    let listeners = Listeners::bind("127.0.0.1", 0, Some(0))
        .await
        .expect("bind");
    let api = listeners.api.local_addr().unwrap();
    let metrics = listeners.metrics.as_ref().unwrap().local_addr().unwrap();
    assert_eq!(
        metrics.ip(),
        api.ip(),
        "the metrics listener binds the API's host"
    );
    let h = start(|c| c.metrics_port = Some(metrics.port())).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(llmapi_router::server::serve(
        listeners,
        Arc::clone(&h.state),
        async move {
            let _ = stopped.await;
        },
    ));
    let key = format!("Bearer {METRICS_KEY}");
    let api_key = format!("Bearer {API_KEY}");
    assert_eq!(get(metrics, "/metrics", None).await, 401);
    assert_eq!(get(metrics, "/metrics", Some("Bearer nope")).await, 401);
    assert_eq!(get(metrics, "/metrics", Some(&key)).await, 200);
    assert_eq!(get(metrics, "/metrics", Some(&api_key)).await, 200);
    assert_eq!(
        get(metrics, "/v1/models", Some(&api_key)).await,
        404,
        "metrics only"
    );
    assert_eq!(
        get(api, "/metrics", Some(&key)).await,
        404,
        "moved off the API port"
    );
    assert_eq!(get(api, "/v1/models", Some(&api_key)).await, 200);
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .expect("joined")
        .expect("served");
    assert!(
        tokio::net::TcpStream::connect(metrics).await.is_err(),
        "the metrics listener stops with the API"
    );
}
