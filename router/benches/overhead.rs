//! Router overhead against an instant `ScriptedWorker` (a benchmark: prints figures, never
//! fails on timing).
//!
//! 1. Added latency: a one-token completion through the router (HTTP/1.1 keep-alive, JSON in
//!    and out) minus the same generation sent straight to the worker over gRPC; p50 and p99.
//! 2. SSE relay: tokens per second a streaming completion relays, and tokens per CPU-second of
//!    this whole process (router + worker double + client: an upper bound on the router's cost).
//! 3. With `LLMAPI_BENCH_NGINX=HOST:PORT` (an nginx proxying to the router, which then binds
//!    `LLMAPI_BENCH_ROUTER_ADDR`), the same stream fetched through nginx, for comparison
//!    (docs/bench/router.md has the nginx config).
//!
//! Run: `cargo bench -p llmapi-router --bench overhead`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmapi_proto::v1::worker_client::WorkerClient;
use llmapi_proto::v1::{GenerateRequest, SamplingParams, StoppingParams};
use llmapi_router::codec::ByteCodec;
use llmapi_router::pool::Pool;
use llmapi_router::testing::{Script, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig, server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LATENCY_REQUESTS: usize = 2000;
const STREAM_TOKENS: u32 = 200_000;

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (USER_HZ = 100 on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One HTTP/1.1 request on a kept-alive connection; returns the body.
async fn http_post(conn: &mut BufReader<TcpStream>, path: &str, body: &str) -> String {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.get_mut()
        .write_all(req.as_bytes())
        .await
        .expect("write");
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.expect("read header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut buf = vec![0; len];
    conn.read_exact(&mut buf).await.expect("read body");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Streams one completion of `tokens` tokens via `addr`; returns bytes read.
async fn stream_once(addr: &str, tokens: u32) -> usize {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let body = format!(
        "{{\"model\":\"demo\",\"prompt\":[1,2,3,4],\"max_tokens\":{tokens},\"stream\":true}}"
    );
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = Vec::new();
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
        if tail.windows(12).any(|w| w == b"data: [DONE]") {
            break;
        }
    }
    total
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let script = Script {
        max_seq_len: STREAM_TOKENS + 64,
        vocab_size: 256,
        reply: (97..123).collect(),
        ..Script::default()
    };
    let worker = ScriptedWorker::new(script).spawn().await.expect("worker");
    let pool = Arc::new(Pool::default());
    pool.add(&worker.url()).expect("url");
    let config = RouterConfig {
        served_model_name: "demo".into(),
        ..RouterConfig::default()
    };
    pool.check_all(&config.health).await;
    let state = Arc::new(AppState::new(config, Arc::new(ByteCodec), pool));
    let bind = std::env::var("LLMAPI_BENCH_ROUTER_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(server::serve(listener, state, std::future::pending()));

    // Baseline: straight to the worker.
    let mut client = WorkerClient::connect(worker.url()).await.expect("grpc");
    let mut direct = Vec::with_capacity(LATENCY_REQUESTS);
    for i in 0..LATENCY_REQUESTS + 200 {
        let t = Instant::now();
        let mut s = client
            .generate(GenerateRequest {
                request_id: format!("d{i}"),
                prompt_token_ids: vec![104, 105],
                sampling: Some(SamplingParams {
                    top_p: 1.0,
                    ..Default::default()
                }),
                stopping: Some(StoppingParams {
                    max_tokens: 1,
                    ..Default::default()
                }),
                traceparent: String::new(),
                generated_token_ids: Vec::new(),
                group_id: String::new(),
            })
            .await
            .expect("generate")
            .into_inner();
        while s.message().await.expect("message").is_some() {}
        if i >= 200 {
            direct.push(t.elapsed());
        }
    }
    // Through the router.
    let mut conn = BufReader::new(TcpStream::connect(&addr).await.expect("connect"));
    let _ = conn.get_ref().set_nodelay(true);
    let body = r#"{"model":"demo","prompt":"hi","max_tokens":1}"#;
    let mut routed = Vec::with_capacity(LATENCY_REQUESTS);
    for i in 0..LATENCY_REQUESTS + 200 {
        let t = Instant::now();
        let r = http_post(&mut conn, "/v1/completions", body).await;
        if i >= 200 {
            routed.push(t.elapsed());
        }
        assert!(r.contains("text_completion"), "{r}");
    }
    direct.sort();
    routed.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("one-token request, {LATENCY_REQUESTS} sequential after 200 warm-up:");
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (d, r) = (percentile(&direct, p), percentile(&routed, p));
        println!(
            "  {name}: direct gRPC {:8.1} us | through router {:8.1} us | added {:8.1} us",
            us(d),
            us(r),
            us(r) - us(d)
        );
    }

    for concurrency in [1usize, 4] {
        let tokens = STREAM_TOKENS / concurrency as u32;
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let addr = addr.clone();
                tokio::spawn(async move { stream_once(&addr, tokens).await })
            })
            .collect();
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await.expect("stream task");
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let total = f64::from(tokens) * concurrency as f64;
        println!(
            "SSE relay, {concurrency} stream(s) x {tokens} tokens: {:.0} tokens/s wall, {:.0} tokens per CPU-second (whole process, {cpu:.2} CPU-s), {:.1} MB of SSE",
            total / wall,
            total / cpu.max(1e-9),
            bytes as f64 / 1e6
        );
    }

    if let Ok(nginx) = std::env::var("LLMAPI_BENCH_NGINX") {
        let tokens = STREAM_TOKENS / 4;
        let t = Instant::now();
        let bytes = stream_once(&nginx, tokens).await;
        let wall = t.elapsed().as_secs_f64();
        println!(
            "SSE via nginx -> router, 1 stream x {tokens} tokens: {:.0} tokens/s wall ({:.1} MB)",
            f64::from(tokens) / wall,
            bytes as f64 / 1e6
        );
        let t = Instant::now();
        let _ = stream_once(&addr, tokens).await;
        println!(
            "same stream straight from the router: {:.0} tokens/s wall",
            f64::from(tokens) / t.elapsed().as_secs_f64()
        );
    }
}
