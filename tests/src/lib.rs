//! llmapi-tests: helpers for end-to-end tests that run the real binaries on loopback.
//!
//! The binaries (`llmapi-launch`, `llmapi-router`) are found beside the test executable, in the
//! target directory that `cargo test --workspace` builds them into. Every process started here
//! is killed when its handle drops; every wait is bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod balancer;
pub mod chaos;
pub mod cluster;
pub mod deploy_tools;
pub mod dns;
pub mod kv;
pub mod promql;
pub mod sse;

/// Path of a workspace binary built beside the tests; panics with what to run if missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // A test executable lives in target/<profile>/deps, a binary (llmapi-chaos) beside the
    // others in target/<profile>.
    let parent = exe.parent().expect("an executable lives in a directory");
    let dir = if parent.ends_with("deps") {
        parent.parent().unwrap_or(parent)
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing; build it first with `cargo build --workspace` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A loopback TCP port that is free now, outside the range outgoing connections take.
pub fn free_port() -> u16 {
    llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into())
        .expect("a free loopback port")
}

/// The built-in demo model (tiny, fast), written once per build of `llmapi-launch`.
pub fn demo_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_model("demo"))
}

/// The built-in bench model (124M parameters: slow enough on CPU that a long request is
/// still running seconds later), written once per build of `llmapi-launch`.
pub fn bench_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_model("bench"))
}

/// A preset checkpoint kept in the target directory (`<profile>/llmapi-test-models/`) and
/// shared by every test binary, keyed by the `llmapi-launch` build that wrote it. A temp dir
/// held in a static is never dropped, so each test binary used to leave a 240 MB bench model
/// in /tmp behind; copies written by older builds are removed here.
fn cached_model(preset: &str) -> PathBuf {
    let launch = bin("llmapi-launch");
    let stamp = std::fs::metadata(&launch)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let root = launch
        .parent()
        .expect("llmapi-launch lives in a directory")
        .join("llmapi-test-models");
    // The model directory keeps the preset's name: it is the default served model name.
    let name = format!("{preset}-{stamp}");
    let path = root.join(&name).join(preset);
    if path.join("config.json").is_file() {
        return path;
    }
    std::fs::create_dir_all(&root).expect("create the test model directory");
    for old in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let old_name = old.file_name().to_string_lossy().into_owned();
        if old_name.starts_with(&format!("{preset}-")) && old_name != name {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    // Written under a private name, then renamed, so a concurrent test binary never reads a
    // half-written checkpoint.
    let partial = root.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let status = Command::new(&launch)
        .args(["make-model", "--preset", preset, "--out"])
        .arg(partial.join(preset))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run llmapi-launch make-model");
    assert!(status.success(), "make-model --preset {preset} failed");
    if std::fs::rename(&partial, root.join(&name)).is_err() {
        // Another test binary finished the same checkpoint first.
        let _ = std::fs::remove_dir_all(&partial);
        assert!(
            path.join("config.json").is_file(),
            "no test model at {}",
            path.display()
        );
    }
    path
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    /// What was started, for messages.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output appended to a log file in the temp dir.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log =
            std::env::temp_dir().join(format!("llmapi-e2e-{name}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// Waits up to `timeout` for the process to exit on its own; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `llmapi-launch serve MODEL --port PORT` with extra flags and environment; waits for
/// /health.
pub fn serve(model: &Path, port: u16, extra: &[&str], env: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--set", "kv_cache_config.max_tokens=65536"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = Proc::spawn(&format!("serve-{port}"), cmd);
    wait_healthy(port, Duration::from_secs(60));
    p
}

/// Polls GET /health until 200 or `timeout`.
pub fn wait_healthy(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if request(port, "GET", "/health", None, &[]).is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing healthy on port {port} within {timeout:?}");
}

/// An HTTP response read to the end.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The `data:` payloads of an SSE body; `[DONE]` as a JSON string.
    pub fn sse(&self) -> Vec<Value> {
        sse_payloads(&self.body)
    }
}

/// The `data:` payloads of SSE text.
pub fn sse_payloads(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
        .collect()
}

/// Opens a connection and sends a request; the caller reads the response.
pub fn send(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write_request(&mut s, port, method, path, body, headers)?;
    Ok(s)
}

/// Writes one HTTP/1.1 request (`Connection: close`) to `s`.
fn write_request(
    s: &mut impl Write,
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // A server may answer (413) and close before reading a huge body.
        let _ = s.write_all(b);
    }
    s.flush()
}

/// One request over HTTPS to 127.0.0.1:`port`, trusting only the CA certificates in
/// `roots_pem` and verifying the name `server_name`; read to the end.
pub fn https_request(
    port: u16,
    roots_pem: &str,
    server_name: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<HttpResponse> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let bytes = body.map(|b| b.to_string().into_bytes());
    write_request(&mut tls, port, method, path, bytes.as_deref(), &[])?;
    read_response(tls)
}

/// Reads a full response from `stream`.
pub fn read_response(stream: impl Read) -> std::io::Result<HttpResponse> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                break;
            }
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request, read to the end.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    read_response(send(port, method, path, bytes.as_deref(), headers)?)
}

/// POST a JSON body and read the response; panics on I/O errors.
pub fn post(port: u16, path: &str, body: &Value) -> HttpResponse {
    request(port, "POST", path, Some(body), &[]).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// GET and read the response; panics on I/O errors.
pub fn get(port: u16, path: &str) -> HttpResponse {
    request(port, "GET", path, None, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `llmapi-router` for the demo model on 127.0.0.1:`port` with `secret` as its worker and
/// admin token (a job's secret, as its tasks present it), health checks every 200 ms, plus
/// `extra`; waits until it listens (its /workers answers; /health stays 503 until a worker
/// is healthy).
pub fn router_with_secret(port: u16, secret: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("llmapi-router"));
    cmd.arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--health_check_interval_ms", "200"])
        .args(extra)
        .env("LLMAPI_WORKER_TOKEN", secret)
        .env("LLMAPI_ADMIN_TOKEN", secret);
    let p = Proc::spawn(&format!("router-{port}"), cmd);
    assert!(
        wait_until(Duration::from_secs(30), || request(
            port,
            "GET",
            "/workers",
            None,
            &[]
        )
        .is_ok_and(|r| r.status == 200)),
        "the router never listened; see {}",
        p.log.display()
    );
    p
}

/// A worker task (`llmapi-launch serve` of the demo model with `--router_url`) that
/// registers with every router on `routers` (127.0.0.1) using the job secret `secret`.
pub fn fleet_worker(routers: &[u16], secret: &str, name: &str) -> Proc {
    let urls: Vec<String> = routers
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &free_port().to_string()])
        .args(["--set", "kv_cache_config.max_tokens=65536"])
        .args(["--router_url", &urls.join(",")])
        .env("LLMAPI_JOB_TOKEN", secret)
        .env("LLMAPI_ADVERTISE_HOST", "127.0.0.1");
    Proc::spawn(name, cmd)
}

/// The workers a router on `port` lists as healthy (GET /workers), by URL; empty when it does
/// not answer.
pub fn healthy_workers(port: u16) -> std::collections::BTreeSet<String> {
    request(port, "GET", "/workers", None, &[])
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.json())
        .and_then(|v| v["workers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|w| w["healthy"] == true)
        .map(|w| w["url"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
