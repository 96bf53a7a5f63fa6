//! The HTTP front's connection limits on a real loopback listener: a client that drips its
//! headers is disconnected while others are served, an idle kept-alive connection is closed,
//! and connections past `max_connections` are not served until one closes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use llmapi_router::codec::ByteCodec;
use llmapi_router::front::ConnectionLimits;
use llmapi_router::pool::Pool;
use llmapi_router::server;
use llmapi_router::testing::{Script, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const REQUEST: &[u8] = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// A router (no workers: /version needs none) serving on loopback within `limits`; stops
/// when the returned sender drops.
async fn start(limits: ConnectionLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_over(limits, Arc::new(Pool::default())).await
}

/// A router over `pool` serving on loopback within `limits`.
async fn start_over(
    limits: ConnectionLimits,
    pool: Arc<Pool>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = RouterConfig {
        front: limits,
        ..RouterConfig::default()
    };
    pool.check_all(&config.health).await;
    let state = Arc::new(AppState::new(config, Arc::new(ByteCodec), pool));
    let port = llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Reads one response (headers and a Content-Length body); its status.
async fn read_response(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("reading the response");
        assert_eq!(n, 1, "the connection closed mid-response: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("the body");
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code")
}

/// One request on a new connection; its status.
async fn one_request(addr: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .expect("answered in time")
}

/// Whether the server has closed `s` (a read returns end of stream or an error) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(timeout(wait, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_client_dripping_its_headers_is_cut_off_while_others_are_served() {
    let (addr, _stop) = start(ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    })
    .await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /version HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        // One byte every 300 ms, never ending the headers: each byte is activity, so only
        // the header-read timeout can end this.
        while started.elapsed() < Duration::from_secs(15) {
            if slow.write_all(b"a").await.is_err()
                || closed_within(&mut slow, Duration::from_millis(300)).await
            {
                return Some(started.elapsed());
            }
        }
        None
    });
    assert_eq!(one_request(addr).await, 200, "a normal client is served");
    let cut = drip.await.unwrap();
    let cut = cut.expect("the dripping client was never disconnected");
    assert!(
        cut < Duration::from_secs(8),
        "disconnected only after {cut:?} with a 1 s header-read timeout"
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let (addr, _stop) = start(ConnectionLimits {
        header_read_timeout: Duration::from_secs(60),
        keep_alive_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    })
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(REQUEST).await.unwrap();
        assert_eq!(
            read_response(&mut s).await,
            200,
            "kept alive between requests"
        );
    }
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "an idle connection stays open past the 1 s keep-alive timeout"
    );
}

#[tokio::test]
async fn a_request_silent_past_the_keep_alive_timeout_keeps_its_connection() {
    // Three tokens 700 ms apart, answered in one body: the connection is silent for ~2 s.
    let worker = ScriptedWorker::new(Script {
        token_delay: Duration::from_millis(700),
        ..Script::default()
    })
    .spawn()
    .await
    .unwrap();
    let pool = Arc::new(Pool::default());
    pool.add(&worker.url()).unwrap();
    let (addr, _stop) = start_over(
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(1),
            ..ConnectionLimits::default()
        },
        pool,
    )
    .await;
    let body = r#"{"model":"model","prompt":"abc","max_tokens":3}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(request.as_bytes()).await.unwrap();
        let status = timeout(Duration::from_secs(30), read_response(&mut s))
            .await
            .expect("answered");
        assert_eq!(status, 200, "the same connection serves a second request");
    }
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    let (addr, _stop) = start(ConnectionLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(60),
        keep_alive_timeout: Duration::from_secs(60),
    })
    .await;
    // Two kept-alive connections, each served once: both hold a slot.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(REQUEST).await.unwrap();
        assert_eq!(read_response(&mut s).await, 200);
        held.push(s);
    }
    // A third connects (the kernel's backlog takes it) but is not served.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(REQUEST).await.unwrap();
    assert!(
        timeout(Duration::from_millis(1500), read_response(&mut third))
            .await
            .is_err(),
        "a third connection was served with max_connections 2"
    );
    // Once one of the two closes, the waiting connection is accepted and served.
    drop(held.remove(0));
    let status = timeout(Duration::from_secs(10), read_response(&mut third))
        .await
        .expect("the waiting connection is served once a slot frees");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_returns() {
    let config = RouterConfig::default();
    let state = Arc::new(AppState::new(
        config,
        Arc::new(ByteCodec),
        Arc::new(Pool::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(REQUEST).await.unwrap();
    assert_eq!(read_response(&mut idle).await, 200);
    let _ = stop.send(());
    timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns with a kept-alive connection open")
        .unwrap()
        .unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_connection_opened_as_the_server_stops_gets_its_answer_then_new_ones_are_refused() {
    let (addr, stop) = start(ConnectionLimits::default()).await;
    // Connected (and accepted) but its request not sent yet when the server stops: closing it
    // now would leave the request it is about to send unanswered.
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    fresh.write_all(REQUEST).await.unwrap();
    let status = timeout(Duration::from_secs(5), read_response(&mut fresh))
        .await
        .expect("answered in time");
    assert!(status == 200 || status == 503, "status {status}");
    assert!(closed_within(&mut fresh, Duration::from_secs(5)).await);
    // Once served, the listener is closed: a client is refused, not accepted and dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener still accepts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
