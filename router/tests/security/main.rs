//! The router's HTTP front as an untrusted client meets it: which route needs which key
//! (`auth`), what POST /workers accepts and what it tells (`registration`), and the binary's
//! handling of keys given by flag, variable or file (`keys`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod auth;
mod keys;
mod registration;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use llmapi_router::auth::Secret;
use llmapi_router::codec::ByteCodec;
use llmapi_router::pool::{HealthPolicy, Pool};
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::Value;
use tower::ServiceExt;

/// The API key of the test routers.
pub const API_KEY: &str = "sk-api-key";
/// The metrics key of the test routers.
pub const METRICS_KEY: &str = "sk-metrics-key";
/// The admin token of the test routers.
pub const ADMIN_TOKEN: &str = "admin-token";

/// A secret for a test config.
pub fn secret(s: &str) -> Option<Secret> {
    Some(Secret::new("test secret", s).unwrap())
}

/// A router over one healthy scripted worker.
pub struct Harness {
    pub state: Arc<AppState>,
    pub workers: Vec<ScriptedHandle>,
}

/// An answer: status, headers and the body as JSON (Null when not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// A router with one scripted worker, all three secrets set, then `tweak`ed.
pub async fn start(tweak: impl FnOnce(&mut RouterConfig)) -> Harness {
    let mut config = RouterConfig {
        served_model_name: "demo".into(),
        model_path: "/models/demo".into(),
        api_key: secret(API_KEY),
        metrics_api_key: secret(METRICS_KEY),
        admin_token: secret(ADMIN_TOKEN),
        health: HealthPolicy {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            ..HealthPolicy::default()
        },
        ..RouterConfig::default()
    };
    tweak(&mut config);
    let pool = Arc::new(Pool::default());
    let worker = ScriptedWorker::new(Script::default())
        .spawn()
        .await
        .expect("bind loopback");
    pool.add(&worker.url()).expect("valid url");
    pool.check_all(&config.health).await;
    let state = Arc::new(AppState::new(config, Arc::new(ByteCodec), pool));
    Harness {
        state,
        workers: vec![worker],
    }
}

impl Harness {
    /// Sends one request to the router's API application.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        authorization: Option<&str>,
    ) -> Answer {
        call(
            llmapi_router::server::app(self.state.clone()),
            method,
            path,
            body,
            authorization,
        )
        .await
    }

    /// POST /workers {"url": url} with the admin token.
    pub async fn register(&self, url: &str) -> Answer {
        let body = serde_json::json!({ "url": url });
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.send("POST", "/workers", Some(&body), Some(&auth))
            .await
    }
}

/// Sends one request to `app`.
pub async fn call(
    app: axum::Router,
    method: &str,
    path: &str,
    body: Option<&Value>,
    authorization: Option<&str>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// A loopback port nothing listens on, outside the range outgoing connections take (so a
/// router started on it later finds it free).
pub fn closed_port() -> u16 {
    llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

/// One HTTP/1.1 GET over a real socket; returns the status.
pub async fn http_get(addr: std::net::SocketAddr, path: &str, auth: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = auth.map_or_else(String::new, |a| format!("authorization: {a}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line")
}
