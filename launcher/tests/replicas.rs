//! Two tasks of an MPI-launched job (environment as mpirun sets it) serve two replicas: rank 0
//! runs the router, rank 1 registers its worker with it; with --tp_size 2 the same two tasks
//! form one tensor-parallel replica instead; a task whose engine panics restarts it in place
//! and rank 0's router routes to it again.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{demo_model, free_port, spread_of_requests, wait_for_healthy_workers};

struct Task(Child);

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn task(rank: usize, model: &std::path::Path, port: u16, token: &str) -> Task {
    task_with(rank, model, port, token, &[])
}

fn task_with(rank: usize, model: &std::path::Path, port: u16, token: &str, extra: &[&str]) -> Task {
    let child = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(model)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .args(extra)
        .env("OMPI_COMM_WORLD_RANK", rank.to_string())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_LOCAL_RANK", rank.to_string())
        .env("LLMAPI_JOB_TOKEN", token)
        .env("LLMAPI_ADVERTISE_HOST", "127.0.0.1")
        .env_remove("SLURM_PROCID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Task(child)
}

#[test]
fn two_mpi_tasks_serve_two_replicas_behind_rank_0s_router() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let port = free_port();
    let _rank1 = task(1, &model, port, "secret-1");
    let _rank0 = task(0, &model, port, "secret-1");
    let workers = wait_for_healthy_workers(port, 2, Duration::from_secs(90))
        .expect("both replicas registered and healthy within 90 s");
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2);
    let spread = spread_of_requests(port, 4);
    assert!(
        spread.iter().all(|(_, n)| *n >= 1),
        "both replicas serve: {spread:?}"
    );
}

#[test]
fn a_task_with_another_job_token_is_refused_by_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let port = free_port();
    let _rank0 = task(0, &model, port, "right");
    assert!(wait_for_healthy_workers(port, 1, Duration::from_secs(60)).is_some());
    let mut rank1 = task(1, &model, port, "wrong");
    let status = support::wait_for(Duration::from_secs(60), || {
        rank1.0.try_wait().ok().flatten()
    })
    .expect("the refused task exits instead of waiting forever");
    assert!(!status.success());
    assert!(
        wait_for_healthy_workers(port, 1, Duration::from_secs(5)).is_some(),
        "still one worker"
    );
}

#[test]
fn two_mpi_tasks_with_tp_size_2_serve_one_tensor_parallel_replica() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let port = free_port();
    let rendezvous = free_port().to_string();
    let extra = ["--tp_size", "2", "--rendezvous_port", rendezvous.as_str()];
    let _rank1 = task_with(1, &model, port, "secret-tp", &extra);
    let _rank0 = task_with(0, &model, port, "secret-tp", &extra);
    let workers = wait_for_healthy_workers(port, 1, Duration::from_secs(90))
        .expect("the group's leader is healthy within 90 s");
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    let (status, body) = support::http(
        port,
        "POST",
        "/v1/completions",
        Some(r#"{"model":"demo","prompt":"Hello","max_tokens":5,"ignore_eos":true}"#),
    )
    .expect("the router answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""completion_tokens":5"#), "{body}");
}

#[test]
fn a_task_whose_engine_panics_restarts_it_in_place_and_rank_0s_router_readmits_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let port = free_port();
    let log_path = dir.path().join("rank1.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Rank 1's engine panics at its first step (the debug-build fault hook), once.
    let mut rank1 = Task(
        Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
            .arg("serve")
            .arg(&model)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .env("OMPI_COMM_WORLD_RANK", "1")
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .env("OMPI_COMM_WORLD_LOCAL_RANK", "1")
            .env("LLMAPI_JOB_TOKEN", "secret-restart")
            .env("LLMAPI_ADVERTISE_HOST", "127.0.0.1")
            .env("LLMAPI_FAULT_PANIC_AT_STEP", "1")
            .env_remove("SLURM_PROCID")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let _rank0 = task(0, &model, port, "secret-restart");
    wait_for_healthy_workers(port, 2, Duration::from_secs(90))
        .expect("both replicas registered and healthy within 90 s");
    // Round robin sends one of these to rank 1, whose engine panics before the first token:
    // the router retries it on rank 0, so every request still gets 200.
    let before = spread_of_requests(port, 4);
    let restarted = support::wait_for(Duration::from_secs(60), || {
        let log = std::fs::read_to_string(&log_path).ok()?;
        log.contains("engine restarted").then_some(log)
    })
    .expect("rank 1 logs its engine's restart within 60 s");
    assert!(
        restarted.contains("the engine thread panicked")
            && restarted.contains("the engine failed; restarting it"),
        "{restarted}"
    );
    assert!(
        rank1.0.try_wait().unwrap().is_none(),
        "rank 1 restarted its engine in place instead of exiting"
    );
    wait_for_healthy_workers(port, 2, Duration::from_secs(60))
        .expect("the router re-admits rank 1's worker within 60 s");
    // Requests sent while it restarted may have opened its breaker: after the cooldown a
    // probe request reaches it again, and from then on it serves its share.
    let served = |spread: &[(String, u64)], url: &str| {
        spread.iter().find(|(u, _)| u == url).map_or(0, |(_, n)| *n)
    };
    // Rank 1's worker URL, from its "worker ready" log line (a job's workers speak TLS).
    let rank1_url = restarted
        .lines()
        .find(|l| l.contains("worker ready"))
        .and_then(|l| l.split("https://").nth(1))
        .map(|rest| {
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .unwrap_or(rest.len());
            format!("https://{}", &rest[..end])
        })
        .expect("rank 1 logs its worker's URL");
    let after = support::wait_for(Duration::from_secs(60), || {
        let after = spread_of_requests(port, 2);
        (served(&after, &rank1_url) > served(&before, &rank1_url)).then_some(after)
    });
    assert!(
        after.is_some(),
        "rank 1's restarted worker {rank1_url} served nothing within 60 s (before: {before:?})"
    );
}
