//! TLS end to end, with the real binaries on loopback: a job's worker (a task of
//! `llmapi-launch serve` registering with an external `llmapi-router`) serves gRPC over mutual
//! TLS with the CA both derive from the job secret; a router presenting another CA's
//! certificate, or speaking plaintext, gets no service; the HTTP front serves HTTPS with the
//! given certificate and nothing in clear; bad certificate files stop the start, naming the
//! file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use llmapi_proto::tls::JobCa;
use llmapi_tests::{
    Proc, bin, demo_model, free_port, get, https_request, post, request, router_with_secret,
    wait_until,
};
use serde_json::{Value, json};

/// The job secret of the test job (its workers' LLMAPI_JOB_TOKEN, the router's worker token).
const SECRET: &str = "tls-test-secret-4b7e1c9d2a0f6e35";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// `llmapi-router` on a free port with the job secret as worker and admin token, plus `extra`.
fn router(extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    (router_with_secret(port, SECRET, extra), port)
}

/// The router's workers as (url, healthy).
fn workers(router: u16) -> Vec<(String, bool)> {
    get(router, "/workers").json()["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["url"].as_str().unwrap_or_default().to_owned(),
                w["healthy"] == true,
            )
        })
        .collect()
}

fn completion(router: u16) -> (u16, Value) {
    let r = post(
        router,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "over TLS", "max_tokens": 3, "ignore_eos": true}),
    );
    let body = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, body)
}

#[test]
fn a_job_worker_serves_its_router_over_mutual_tls_and_no_router_of_another_ca_or_in_clear() {
    let (_router, port) = router(&[]);
    // One task of a job that registers with that router: no certificate files, so it
    // derives the job CA from LLMAPI_JOB_TOKEN, as the router does from its worker token.
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &free_port().to_string()])
        .args(["--set", "kv_cache_config.max_tokens=65536"])
        .args(["--router_url", &format!("http://127.0.0.1:{port}")])
        .env("LLMAPI_JOB_TOKEN", SECRET)
        .env("LLMAPI_ADVERTISE_HOST", "127.0.0.1");
    let worker = Proc::spawn("tls-job-worker", cmd);
    assert!(
        wait_until(Duration::from_secs(60), || workers(port)
            .iter()
            .any(|(_, healthy)| *healthy)),
        "the worker never became healthy behind the router; see {}",
        worker.log.display()
    );
    let listed = workers(port);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let url = listed[0].0.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let (status, body) = completion(port);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");

    // A router with the job secret that trusts the job's CA but presents a certificate of
    // another CA (so only the worker's client check can refuse it), and the same worker
    // addressed in plaintext: neither gets service.
    let dir = tempfile::tempdir().expect("tempdir");
    let job = JobCa::derive(SECRET.as_bytes()).expect("job CA");
    let stranger = JobCa::derive(b"another CA, not this job's 0123")
        .expect("another CA")
        .leaf(&["127.0.0.1".into()])
        .expect("leaf");
    let job_ca = write(dir.path(), "job-ca.pem", job.cert_pem());
    let cert = write(dir.path(), "stranger.pem", stranger.cert_pem());
    let key = write(dir.path(), "stranger.key", stranger.key_pem());
    let plain = url.replacen("https://", "http://", 1);
    let (_bad, bad_port) = router(&[
        "--worker_urls",
        &format!("{url},{plain}"),
        "--tls_cert_file",
        cert.to_str().expect("utf-8"),
        "--tls_key_file",
        key.to_str().expect("utf-8"),
        "--tls_ca_file",
        job_ca.to_str().expect("utf-8"),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        workers(bad_port).iter().filter(|(_, h)| *h).count(),
        0,
        "a foreign certificate or plaintext was served: {:?}",
        workers(bad_port)
    );
    let (status, body) = completion(bad_port);
    assert_ne!(status, 200, "{body}");

    // The same files with a certificate of the job's CA: served (the refusal above was the
    // certificate's).
    let member = job.leaf(&[]).expect("leaf");
    let cert = write(dir.path(), "member.pem", member.cert_pem());
    let key = write(dir.path(), "member.key", member.key_pem());
    let (_good, good_port) = router(&[
        "--worker_urls",
        &url,
        "--tls_cert_file",
        cert.to_str().expect("utf-8"),
        "--tls_key_file",
        key.to_str().expect("utf-8"),
        "--tls_ca_file",
        job_ca.to_str().expect("utf-8"),
    ]);
    assert!(
        wait_until(Duration::from_secs(20), || workers(good_port)
            .iter()
            .any(|(_, h)| *h)),
        "a router with the job CA's certificate was refused"
    );
    assert_eq!(completion(good_port).0, 200);
}

#[test]
fn the_https_front_serves_clients_that_trust_its_certificate_and_nothing_in_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = JobCa::derive(b"the front's test CA 0123456789").expect("CA");
    let leaf = ca.leaf(&["127.0.0.1".into()]).expect("leaf");
    let cert = write(dir.path(), "front.pem", leaf.cert_pem());
    let key = write(dir.path(), "front.key", leaf.key_pem());
    let port = free_port();
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--set", "kv_cache_config.max_tokens=65536"])
        .args(["--ssl_certfile", cert.to_str().expect("utf-8")])
        .args(["--ssl_keyfile", key.to_str().expect("utf-8")]);
    let server = Proc::spawn(&format!("https-{port}"), cmd);
    let https = |method: &str, path: &str, body: Option<&Value>| {
        https_request(port, ca.cert_pem(), "127.0.0.1", method, path, body)
    };
    assert!(
        wait_until(Duration::from_secs(60), || https("GET", "/health", None)
            .is_ok_and(|r| r.status == 200)),
        "no HTTPS answer; see {}",
        server.log.display()
    );
    let r = https(
        "POST",
        "/v1/completions",
        Some(&json!({"model": "demo", "prompt": "hello", "max_tokens": 2, "ignore_eos": true})),
    )
    .expect("an HTTPS completion");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 2, "{}", r.body);

    // Plain HTTP on the same port gets no HTTP answer.
    let plain = request(port, "GET", "/health", None, &[]);
    assert!(
        plain.as_ref().map_or(true, |r| r.status == 0),
        "the front answered in clear: {:?}",
        plain.map(|r| r.status)
    );
    // A client that trusts another CA refuses the front's certificate.
    let other = JobCa::derive(b"some other CA entirely 01234567").expect("CA");
    assert!(https_request(port, other.cert_pem(), "127.0.0.1", "GET", "/health", None).is_err());
}

#[test]
fn bad_certificate_files_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = JobCa::derive(b"the start test's CA 0123456789").expect("CA");
    let (one, two) = (ca.leaf(&[]).expect("leaf"), ca.leaf(&[]).expect("leaf"));
    let cert = write(dir.path(), "one.pem", one.cert_pem());
    let other_key = write(dir.path(), "two.key", two.key_pem());
    let junk = write(dir.path(), "junk.pem", "not a certificate\n");
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "llmapi-launch",
            vec![
                "serve".into(),
                demo_model().to_string_lossy().into_owned(),
                "--ssl_certfile".into(),
                cert.to_string_lossy().into_owned(),
                "--ssl_keyfile".into(),
                other_key.to_string_lossy().into_owned(),
            ],
            vec!["--ssl_keyfile", "two.key", "does not fit"],
        ),
        (
            "llmapi-router",
            vec![
                demo_model().to_string_lossy().into_owned(),
                "--tls_ca_file".into(),
                junk.to_string_lossy().into_owned(),
            ],
            vec!["--tls_ca_file", "junk.pem", "no certificate"],
        ),
    ];
    for (binary, args, expected) in cases {
        let port = free_port();
        let mut cmd = Command::new(bin(binary));
        cmd.args(&args).args(["--port", &port.to_string()]);
        let mut p = Proc::spawn(&format!("bad-tls-{port}"), cmd);
        let status = p.wait_exit(Duration::from_secs(60));
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            status.is_some_and(|s| !s.success()),
            "{binary} {args:?} did not fail: {log}"
        );
        for e in expected {
            assert!(log.contains(e), "{binary}: expected {e:?} in: {log}");
        }
        assert!(!log.contains("panicked"), "{log}");
    }
}
