//! The job secret under a real Slurm (`.ci/run` starts one, with munged): a job without
//! LLMAPI_JOB_TOKEN forms and serves with a secret shared over MUNGE, or through a 0600 file in
//! the home directory, and a stranger who knows everything `squeue` shows (job id, node list,
//! task count) can neither register a worker, remove one, nor call a worker directly: the
//! workers speak mutual TLS with the job's CA, so a plaintext or foreign-CA call never reaches
//! them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use llmapi_launch::placement::expand_hostlist;
use llmapi_proto::auth::AttachToken;
use llmapi_proto::tls::JobCa;
use llmapi_proto::v1::worker_client::WorkerClient;
use llmapi_proto::v1::{GenerateRequest, HealthRequest};
use serde_json::Value;
use tonic::transport::Endpoint;

mod support;

use support::{free_port, http, http_auth, slurm_available, wait_for, wait_for_healthy_workers};

/// A running `srun -N 2 -n 2 llmapi-launch serve` step; cancelled when dropped.
struct Job {
    name: String,
    port: u16,
    srun: Child,
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = Command::new("scancel").args(["-n", &self.name]).status();
        let _ = self.srun.kill();
        let _ = self.srun.wait();
    }
}

/// Starts a two-node, two-task job serving the demo model, with none of the secret variables
/// set unless `env` sets them.
fn start_job(model: &Path, env: &[(&str, &str)]) -> Job {
    let port = free_port();
    let name = format!("llmapi-secret-test-{port}");
    let mut cmd = Command::new("timeout");
    cmd.args([
        "180",
        "srun",
        "--immediate=60",
        "--kill-on-bad-exit=1",
        "-N",
        "2",
        "-n",
        "2",
    ])
    .arg(format!("--job-name={name}"))
    .arg(env!("CARGO_BIN_EXE_llmapi-launch"))
    .arg("serve")
    .arg(model)
    .args(["--port", &port.to_string(), "--host", "0.0.0.0"])
    .args(["--bootstrap_port", &free_port().to_string()])
    .env_remove("LLMAPI_JOB_TOKEN")
    .env_remove("LLMAPI_JOB_TOKEN_FILE")
    .env_remove("LLMAPI_JOB_SECRET_VIA")
    .env_remove("LLMAPI_ADMIN_TOKEN")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Job {
        name,
        port,
        srun: cmd.spawn().unwrap(),
    }
}

/// What `squeue` shows any user about the job: its id and node list.
fn squeue_facts(job: &str) -> (String, Vec<String>) {
    let out = Command::new("squeue")
        .args(["-h", "-n", job, "-o", "%i|%N"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().expect("squeue lists the job");
    let (id, nodes) = line.trim().split_once('|').unwrap();
    (id.to_owned(), expand_hostlist(nodes).unwrap())
}

/// Tokens a stranger can compute from public facts, starting with the FNV hash the job token
/// used to be (`llmapi-job-` + FNV-1a of "job id|nodes|world size").
fn guessable_tokens(job_id: &str, nodes: &[String], world: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for id in [job_id.to_owned(), format!("{job_id}.0")] {
        let identity = format!("{id}|{}|{world}", nodes.join(","));
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in identity.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        tokens.push(format!("llmapi-job-{h:016x}"));
        tokens.push(id);
    }
    tokens
}

fn worker_urls(workers: &Value) -> Vec<String> {
    let mut urls: Vec<String> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["url"].as_str().unwrap().to_owned())
        .collect();
    urls.sort();
    urls
}

/// A stranger's direct gRPC Health and Generate on the worker at `url`, carrying `token`: the
/// job's workers speak mutual TLS only (`https://`), so the calls fail in plaintext and over
/// TLS with the CA `token` would derive (what a stranger who guessed a secret builds), before
/// they reach the service: never UNAUTHENTICATED, which would mean the token check was all
/// that stood in the way.
fn assert_worker_refuses(url: &str, token: &str) {
    assert!(
        url.starts_with("https://"),
        "the job's workers speak TLS: {url}"
    );
    let plain = url.replacen("https://", "http://", 1);
    let stranger = JobCa::derive(token.as_bytes())
        .unwrap()
        .transport(&[])
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let endpoints = [
            ("in plaintext", Endpoint::from_shared(plain).unwrap()),
            (
                "with a stranger's CA",
                Endpoint::from_shared(url.to_owned())
                    .unwrap()
                    .tls_config(stranger.grpc_client().unwrap())
                    .unwrap(),
            ),
        ];
        for (how, endpoint) in endpoints {
            let endpoint = endpoint
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10));
            let Ok(channel) = endpoint.connect().await else {
                continue; // refused before a single call: the TLS handshake failed
            };
            let mut client =
                WorkerClient::with_interceptor(channel, AttachToken::new(Some(token)).unwrap());
            let err = client
                .health(HealthRequest { probe: true })
                .await
                .unwrap_err();
            assert_ne!(
                err.code(),
                tonic::Code::Unauthenticated,
                "{how}: {url}: {err}"
            );
            let err = client
                .generate(GenerateRequest {
                    request_id: "stranger".into(),
                    prompt_token_ids: vec![5, 6, 7],
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .unwrap_err();
            assert_ne!(
                err.code(),
                tonic::Code::Unauthenticated,
                "{how}: {url}: {err}"
            );
        }
    });
}

/// Everything a stranger with `squeue`'s facts tries on `job`, each refused; the job's own
/// workers stay registered and healthy.
fn stranger_is_refused(job: &Job, workers: &Value) {
    let (job_id, nodes) = squeue_facts(&job.name);
    let urls = worker_urls(workers);
    for token in guessable_tokens(&job_id, &nodes, 2) {
        let rogue = r#"{"url":"http://127.0.0.1:9"}"#;
        let (status, body) = http_auth(
            job.port,
            "POST",
            "/workers",
            Some(rogue),
            Some(&format!("Bearer {token}")),
        )
        .unwrap();
        assert_eq!(
            status, 401,
            "registering a rogue worker with {token}: {body}"
        );
        for url in &urls {
            let real = serde_json::json!({ "url": url }).to_string();
            let (status, body) = http_auth(
                job.port,
                "DELETE",
                "/workers",
                Some(&real),
                Some(&format!("Bearer {token}")),
            )
            .unwrap();
            assert_eq!(status, 401, "removing {url} with {token}: {body}");
            assert_worker_refuses(url, &token);
        }
    }
    let after = wait_for_healthy_workers(job.port, 2, Duration::from_secs(10))
        .expect("both workers still registered and healthy");
    assert_eq!(worker_urls(&after), urls, "the pool is unchanged");
}

fn completion_works(port: u16) {
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        Some(r#"{"model":"demo","prompt":"Hello","max_tokens":3}"#),
    )
    .expect("the router answers");
    assert_eq!(status, 200, "{body}");
}

/// Without LLMAPI_JOB_TOKEN the job forms over MUNGE (munged runs under the CI's Slurm) and
/// serves; the old FNV token and the job id itself open nothing.
#[test]
fn a_stranger_who_knows_what_squeue_shows_cannot_register_remove_or_call_a_worker() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = support::demo_model(dir.path());
    let job = start_job(&model, &[]);
    let workers = wait_for_healthy_workers(job.port, 2, Duration::from_secs(120))
        .expect("both tasks formed the job with a MUNGE-shared secret within 120 s");
    let urls = worker_urls(&workers);
    assert!(
        urls.iter().any(|u| u.contains("c1")) && urls.iter().any(|u| u.contains("c2")),
        "{urls:?}"
    );
    completion_works(job.port);
    stranger_is_refused(&job, &workers);
    completion_works(job.port);
}

/// With LLMAPI_JOB_SECRET_VIA=file (a cluster without MUNGE), rank 0 writes the secret 0600
/// under ~/.llmapi/jobs/, the other rank reads it, the job serves, strangers are refused, and
/// the file is gone once the job ends.
#[test]
fn without_munge_the_secret_is_shared_through_a_private_file_that_is_removed_at_the_end() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = support::demo_model(dir.path());
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_str().unwrap().to_owned();
    let mut job = start_job(
        &model,
        &[("HOME", &home_path), ("LLMAPI_JOB_SECRET_VIA", "file")],
    );
    let workers = wait_for_healthy_workers(job.port, 2, Duration::from_secs(120))
        .expect("both tasks formed the job with a file-shared secret within 120 s");
    let jobs_dir = home.path().join(".llmapi/jobs");
    let files: Vec<_> = std::fs::read_dir(&jobs_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
    assert_eq!(mode(&jobs_dir), 0o700);
    completion_works(job.port);
    stranger_is_refused(&job, &workers);
    let _ = Command::new("scancel").args(["-n", &job.name]).status();
    let ended = wait_for(Duration::from_secs(60), || {
        job.srun.try_wait().ok().flatten()
    });
    assert!(ended.is_some(), "the job ends after SIGTERM");
    assert!(!files[0].exists(), "rank 0 removed the secret file");
}

/// A multi-task job with no secret given, no MUNGE and no home directory refuses to start,
/// naming the three ways to give it one (no Slurm needed: its environment is set by hand).
#[test]
fn a_job_with_no_way_to_share_a_secret_refuses_naming_the_three_ways() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::demo_model(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(&model)
        .args(["--port", &free_port().to_string()])
        .env_clear()
        .env("PATH", "/nonexistent-llmapi-test")
        .envs([
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "0"),
            ("SLURM_JOB_NODELIST", "c[1-2]"),
            ("SLURM_TASKS_PER_NODE", "1(x2)"),
            ("SLURM_JOB_ID", "424242"),
        ])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for way in ["LLMAPI_JOB_TOKEN_FILE", "MUNGE", "home directory"] {
        assert!(err.contains(way), "names {way}: {err}");
    }
}
