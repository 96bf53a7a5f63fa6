//! The elastic fleet of deploy/slurm under a real Slurm (`.ci/run` starts one: nodes c1 and
//! c2 on this host): fleet-routers.sbatch runs a router job, fleet-workers.sbatch jobs join it
//! by node, and `scancel` of a worker job withdraws its worker from the router after the
//! requests it holds finish, with no failed request. The batch scripts run as shipped; only
//! their environment knobs (secret file, port, hosts) and PATH are set by the test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod support;

use support::{free_port, http, slurm_available, wait_for, wait_for_healthy_workers};

/// A submitted batch job; cancelled when dropped.
struct BatchJob {
    id: String,
    output: PathBuf,
}

impl Drop for BatchJob {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.id).status();
    }
}

impl BatchJob {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Whether Slurm still lists the job.
    fn listed(&self) -> bool {
        Command::new("squeue")
            .args(["-h", "-j", &self.id, "-o", "%T"])
            .output()
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `sbatch` of deploy/slurm/SCRIPT on `node` with the test's environment; the job's id.
fn sbatch(script: &str, node: &str, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> BatchJob {
    let bins = Path::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = dir.join(format!("{script}-{node}.out"));
    let mut cmd = Command::new("timeout");
    // The scripts ask for real nodes' cores; the test nodes have 4 CPUs each.
    cmd.args([
        "60",
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        "-w",
        node,
    ])
    .arg(format!("--output={}", output.display()))
    .arg(repo().join("deploy/slurm").join(script))
    .args(args)
    .env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "sbatch {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    BatchJob { id, output }
}

fn worker_urls(port: u16) -> Vec<String> {
    let (_, body) = http(port, "GET", "/workers", None).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| w["url"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn worker_jobs_join_the_fleet_by_node_and_scancel_withdraws_one_without_a_failed_request() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = support::demo_model(dir.path());
    let secret = dir.path().join("fleet.secret");
    std::fs::write(&secret, "slurm-fleet-test-secret-31c9e07a5b").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let port_s = port.to_string();
    let secret_s = secret.to_str().unwrap();
    let model_s = model.to_str().unwrap();
    let env = [
        ("LLMAPI_FLEET_SECRET_FILE", secret_s),
        ("LLMAPI_ROUTER_PORT", port_s.as_str()),
        ("LLMAPI_WORKER_HOSTS", "c1,c2"),
    ];
    let routers = sbatch(
        "fleet-routers.sbatch",
        "c1",
        dir.path(),
        &env,
        &[model_s, "--health_check_interval_ms", "200"],
    );
    let router_url = format!("http://127.0.0.1:{port}");
    assert!(
        wait_for(Duration::from_secs(60), || http(
            port, "GET", "/workers", None
        ))
        .is_some(),
        "the router job never listened: {}",
        routers.output()
    );
    assert!(
        routers
            .output()
            .contains(&format!("routers: http://c1:{port}")),
        "{}",
        routers.output()
    );

    // Two worker jobs, one node each: both join and take traffic.
    let first = sbatch(
        "fleet-workers.sbatch",
        "c1",
        dir.path(),
        &env,
        &[model_s, &router_url],
    );
    let second = sbatch(
        "fleet-workers.sbatch",
        "c2",
        dir.path(),
        &env,
        &[model_s, &router_url],
    );
    assert!(
        wait_for_healthy_workers(port, 2, Duration::from_secs(120)).is_some(),
        "the worker jobs never joined: {:?}\n{}\n{}",
        worker_urls(port),
        first.output(),
        second.output()
    );
    // Healthy can come a moment before the workers' model facts reach the router.
    assert!(
        wait_for(Duration::from_secs(30), || http(
            port,
            "POST",
            "/v1/completions",
            Some(r#"{"model":"demo","prompt":"up","max_tokens":1}"#),
        )
        .filter(|(status, _)| *status == 200))
        .is_some(),
        "the router never served"
    );
    let spread = support::spread_of_requests(port, 6);
    assert!(spread.iter().all(|(_, n)| *n >= 1), "{spread:?}");
    let urls = worker_urls(port);
    assert!(
        urls.iter().any(|u| u.contains("//c1:")) && urls.iter().any(|u| u.contains("//c2:")),
        "{urls:?}"
    );

    // A long request in flight, then `scancel` of the job it may run on: the job withdraws
    // its worker and the request still completes; every later request goes to the other.
    let long = std::thread::spawn(move || {
        http(
            port,
            "POST",
            "/v1/completions",
            Some(r#"{"model":"demo","prompt":"a long one","max_tokens":1500,"ignore_eos":true}"#),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("scancel").arg(&second.id).status();
    assert!(
        wait_for(Duration::from_secs(60), || (worker_urls(port).len() == 1)
            .then_some(()))
        .is_some(),
        "the cancelled job's worker is still listed: {:?}\n{}",
        worker_urls(port),
        second.output()
    );
    let (status, body) = long.join().unwrap().expect("the router answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"completion_tokens\":1500"), "{body}");
    assert!(
        worker_urls(port)[0].contains("//c1:"),
        "{:?}",
        worker_urls(port)
    );
    for _ in 0..4 {
        let (status, body) = http(
            port,
            "POST",
            "/v1/completions",
            Some(r#"{"model":"demo","prompt":"after","max_tokens":4}"#),
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        wait_for(Duration::from_secs(60), || (!second.listed()).then_some(())).is_some(),
        "the cancelled job did not end"
    );
    assert!(
        second.output().contains("withdrew from the router"),
        "{}",
        second.output()
    );
}
