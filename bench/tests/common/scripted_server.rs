//! `ScriptedSseServer`: a test double of an OpenAI-compatible server that streams a scripted
//! number of tokens with scripted timings, and can be told to fail in the ways real servers do.
//!
//! It speaks just enough HTTP/1.1 for the client under test: one request per connection,
//! chunked SSE responses, `GET /metrics` in Prometheus text. Token n of every request is the
//! word "tok"; usage is reported unless told otherwise.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Behave.
    None,
    /// Answer every request whose sequence number n (from 0) has n % every == every - 1 with 500.
    Http500Every(u64),
    /// After this many tokens, stop sending but keep the connection open.
    StallAfter(u32),
    /// After this many tokens, close the connection without ending the stream.
    DropAfter(u32),
    /// After this many tokens, send an error event (`data: {"error": ...}`) and `[DONE]`, as
    /// a router does when the worker fails mid-stream.
    InBandErrorAfter(u32),
    /// After this many tokens, end the stream properly (`[DONE]`) with no finish_reason.
    NoFinishAfter(u32),
    /// Stop after this many tokens with finish_reason "stop" (despite ignore_eos) and usage
    /// saying so, fewer than asked.
    ShortAfter(u32),
}

/// The script.
#[derive(Debug, Clone)]
pub struct Script {
    /// Model name accepted; others get 404.
    pub model: String,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub itl: Duration,
    /// Serve /metrics.
    pub metrics: bool,
    /// Report usage.completion_tokens in the last chunk.
    pub usage: bool,
    /// Misbehaviour.
    pub fault: Fault,
    /// Send an SSE comment line (`:`, a keep-alive) before every token.
    pub sse_comments: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            model: "demo".into(),
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            metrics: false,
            usage: true,
            fault: Fault::None,
            sse_comments: false,
        }
    }
}

/// A running scripted server on a free loopback port; it stops when the runtime ends.
pub struct ScriptedSseServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Completion requests received so far.
    pub requests: Arc<AtomicU64>,
}

impl ScriptedSseServer {
    /// Binds 127.0.0.1:0 and serves `script` on the current runtime.
    pub async fn start(script: Script) -> ScriptedSseServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, counter) = (script.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &script, &counter).await;
                });
            }
        });
        ScriptedSseServer { addr, requests }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts a server on its own thread and runtime (for tests that run the real binary).
pub fn start_in_thread(script: Script) -> ScriptedSseServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let server = ScriptedSseServer::start(script).await;
            let _ = tx.send(ScriptedSseServer {
                addr: server.addr,
                requests: server.requests.clone(),
            });
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("server started")
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<(String, String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((method, path, body))
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await
}

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

async fn serve(mut stream: TcpStream, script: &Script, counter: &AtomicU64) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (method, path, body) = read_request(&mut stream).await?;
    if method == "GET" && path == "/metrics" {
        if !script.metrics {
            return respond(&mut stream, "404 Not Found", "text/plain", "no metrics").await;
        }
        let n = counter.load(Ordering::Relaxed);
        let text = format!(
            "# TYPE llmapi_kv_cache_usage_ratio gauge\nllmapi_kv_cache_usage_ratio 0.5\n\
             llmapi_queue_depth {n}\nprocess_cpu_seconds_total 1\n"
        );
        return respond(&mut stream, "200 OK", "text/plain", &text).await;
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("");
    if model != script.model {
        let err = serde_json::json!({"error": {"message": format!("The model `{model}` does not exist."), "type": "NotFoundError", "code": 404}});
        return respond(
            &mut stream,
            "404 Not Found",
            "application/json",
            &err.to_string(),
        )
        .await;
    }
    let seq = counter.fetch_add(1, Ordering::Relaxed);
    if let Fault::Http500Every(every) = script.fault
        && seq % every == every - 1
    {
        let err = serde_json::json!({"error": {"message": "scripted internal error", "code": 500}});
        return respond(
            &mut stream,
            "500 Internal Server Error",
            "application/json",
            &err.to_string(),
        )
        .await;
    }
    let chat = path.ends_with("chat/completions");
    let max_tokens = req["max_tokens"]
        .as_u64()
        .or_else(|| req["max_completion_tokens"].as_u64())
        .unwrap_or(16) as u32;
    let stream_mode = req["stream"].as_bool().unwrap_or(false);
    if !stream_mode {
        tokio::time::sleep(script.ttft + script.itl * max_tokens.saturating_sub(1)).await;
        let text = vec!["tok"; max_tokens as usize].join(" ");
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let body = serde_json::json!({"choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens}});
        return respond(&mut stream, "200 OK", "application/json", &body.to_string()).await;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    if script.sse_comments {
        stream.write_all(&chunk(":\n\n")).await?;
    }
    tokio::time::sleep(script.ttft).await;
    let sent = match script.fault {
        Fault::ShortAfter(k) => k.min(max_tokens),
        _ => max_tokens,
    };
    for i in 0..sent {
        match script.fault {
            Fault::StallAfter(k) if i == k => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Fault::DropAfter(k) if i == k => return Ok(()),
            Fault::InBandErrorAfter(k) if i == k => {
                let err = "data: {\"error\":{\"message\":\"scripted worker failure\",\"type\":\"ServiceUnavailableError\",\"code\":503}}\n\n";
                stream.write_all(&chunk(err)).await?;
                return end_stream(&mut stream).await;
            }
            Fault::NoFinishAfter(k) if i == k => return end_stream(&mut stream).await,
            _ => {}
        }
        if i > 0 && !script.itl.is_zero() {
            tokio::time::sleep(script.itl).await;
        }
        if script.sse_comments && i > 0 {
            stream.write_all(&chunk(": ping\n\n")).await?;
        }
        let text = if i == 0 { "tok" } else { " tok" };
        // The last token's chunk carries the finish_reason, as real servers send it.
        let finish = match script.fault {
            _ if i + 1 < sent => "null",
            Fault::ShortAfter(_) => "\"stop\"",
            _ => "\"length\"",
        };
        let data = if chat {
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":{finish}}}]}}\n\n"
            )
        } else {
            format!(
                "data: {{\"id\":\"c\",\"object\":\"text_completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{text}\",\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        stream.write_all(&chunk(&data)).await?;
    }
    if script.usage {
        let usage = format!(
            "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{sent},\"total_tokens\":{}}}}}\n\n",
            sent + 1
        );
        stream.write_all(&chunk(&usage)).await?;
    }
    end_stream(&mut stream).await
}

/// `data: [DONE]` and the end of the chunked body.
async fn end_stream(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&chunk("data: [DONE]\n\n")).await?;
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}
