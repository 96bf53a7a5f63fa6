//! Two tasks of an MPI-launched job (environment as mpirun sets it) serve two replicas: rank 0
//! runs the router, rank 1 registers its worker with it; with --tp_size 2 the same two tasks
//! form one tensor-parallel replica instead.

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
