//! llmapi-launch under a real Slurm. `.ci/run` starts one with scripts/slurm-local.sh (two
//! nodes, c1 and c2, on this host) and sets LLMAPI_REQUIRE_SLURM=1; elsewhere these tests
//! print a notice and pass when no Slurm answers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::slurm_available;

/// Runs `srun ARGS llmapi-launch env ...` with a hard time limit; one JSON object per task,
/// sorted by rank.
fn srun_env(srun_args: &[&str], env_args: &[&str]) -> Vec<Value> {
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("90")
        .arg("srun")
        .args(["--immediate=60", "--kill-on-bad-exit=1"])
        .args(srun_args)
        .arg(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("env")
        .args(env_args)
        .output()
        .expect("srun starts");
    assert!(
        out.status.success(),
        "srun failed after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(90));
    let mut rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows.sort_by_key(|r| r["rank"].as_u64());
    rows
}

#[test]
fn two_tasks_on_one_node_form_one_group() {
    if !slurm_available() {
        return;
    }
    let rows = srun_env(&["-N", "1", "-n", "2"], &["--tp_size", "2"]);
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["launcher"], "slurm");
        assert_eq!(r["rank"], i);
        assert_eq!(r["world_size"], 2);
        assert_eq!(r["group"], 0);
        assert_eq!(r["rank_in_group"], i);
        assert_eq!(r["local_rank"], i);
    }
    assert_eq!(rows[0]["rendezvous"], rows[1]["rendezvous"]);
}

#[test]
fn four_overcommitted_tasks_form_two_groups_with_their_own_ports() {
    if !slurm_available() {
        return;
    }
    let rows = srun_env(
        &["-N", "1", "-n", "4", "--overcommit"],
        &["--tp_size", "2", "--rendezvous_port", "31000"],
    );
    let groups: Vec<u64> = rows.iter().map(|r| r["group"].as_u64().unwrap()).collect();
    assert_eq!(groups, [0, 0, 1, 1]);
    let leader = rows[0]["leader_node"].as_str().unwrap().to_owned();
    assert_eq!(rows[0]["rendezvous"], format!("{leader}:31000"));
    assert_eq!(rows[2]["rendezvous"], format!("{leader}:31001"));
    assert_eq!(rows[3]["leader_rank"], 2);
}

#[test]
fn a_group_spans_two_nodes_and_meets_on_the_first() {
    if !slurm_available() {
        return;
    }
    let rows = srun_env(&["-N", "2", "-n", "2"], &["--tp_size", "2"]);
    assert_eq!(rows.len(), 2);
    assert_ne!(rows[0]["node"], rows[1]["node"], "one task per node");
    assert_eq!(rows[1]["leader_node"], rows[0]["node"]);
    assert_eq!(rows[1]["group"], 0);
    assert_eq!(rows[1]["rank_in_group"], 1);
}

/// `srun -N 2 -n 2 llmapi-launch serve DEMO`: one replica per node, rank 0's router in front.
#[test]
fn two_nodes_serve_two_replicas_behind_one_router() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = support::demo_model(dir.path());
    let port = support::free_port();
    let job = format!("llmapi-test-{port}");
    let mut srun = Command::new("timeout")
        .args([
            "180",
            "srun",
            "--immediate=60",
            "--kill-on-bad-exit=1",
            "-N",
            "2",
            "-n",
            "2",
        ])
        .arg(format!("--job-name={job}"))
        .arg(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(&model)
        .args(["--port", &port.to_string(), "--host", "0.0.0.0"])
        .args(["--bootstrap_port", &support::free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let workers = support::wait_for_healthy_workers(port, 2, Duration::from_secs(120));
    let spread = workers
        .as_ref()
        .map(|_| support::spread_of_requests(port, 4));
    let _ = Command::new("scancel").args(["-n", &job]).status();
    let _ = srun.kill();
    let _ = srun.wait();
    let workers = workers.expect("both replicas registered and healthy within 120 s");
    let urls: Vec<&str> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["url"].as_str().unwrap())
        .collect();
    assert!(
        urls.iter().any(|u| u.contains("c1")) && urls.iter().any(|u| u.contains("c2")),
        "{urls:?}"
    );
    let spread = spread.unwrap();
    assert!(
        spread.iter().all(|(_, n)| *n >= 1),
        "both replicas serve: {spread:?}"
    );
}

/// Runs `srun SRUN_ARGS llmapi-launch serve DEMO --tp_size 2`, waits until `groups` workers
/// are healthy behind rank 0's router, sends `requests` completions and returns the router's
/// worker list and the completion bodies; cancels the job step whatever happens.
fn serve_tp2(srun_args: &[&str], groups: usize, requests: usize) -> (Value, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let model = support::demo_model(dir.path());
    let port = support::free_port();
    let rendezvous = support::free_port();
    let job = format!("llmapi-tp-test-{port}");
    let mut srun = Command::new("timeout")
        .args(["180", "srun", "--immediate=60", "--kill-on-bad-exit=1"])
        .args(["--cpus-per-task=1"])
        .args(srun_args)
        .arg(format!("--job-name={job}"))
        .arg(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(&model)
        .args(["--port", &port.to_string(), "--host", "0.0.0.0"])
        .args([
            "--tp_size",
            "2",
            "--rendezvous_port",
            &rendezvous.to_string(),
            "--bootstrap_port",
            &support::free_port().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let workers = support::wait_for_healthy_workers(port, groups, Duration::from_secs(120));
    let answers: Vec<Value> = match &workers {
        Some(_) => (0..requests)
            .map(|_| {
                let (status, body) = support::http(
                    port,
                    "POST",
                    "/v1/completions",
                    Some(r#"{"model":"demo","prompt":"Hello","max_tokens":6,"temperature":0,"ignore_eos":true}"#),
                )
                .expect("the router answers");
                assert_eq!(status, 200, "{body}");
                serde_json::from_str(&body).unwrap()
            })
            .collect(),
        None => Vec::new(),
    };
    let _ = Command::new("scancel").args(["-n", &job]).status();
    let _ = srun.kill();
    let _ = srun.wait();
    let workers = workers.expect("every group's leader registered and healthy within 120 s");
    (workers, answers)
}

fn texts(answers: &[Value]) -> Vec<String> {
    answers
        .iter()
        .map(|a| {
            assert_eq!(a["usage"]["completion_tokens"], 6, "{a}");
            a["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// `srun -n 2 llmapi-launch serve DEMO --tp_size 2`: one replica split over two tasks.
#[test]
fn two_tasks_serve_one_tensor_parallel_replica() {
    if !slurm_available() {
        return;
    }
    let (workers, answers) = serve_tp2(&["-N", "1", "-n", "2"], 1, 2);
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    let t = texts(&answers);
    assert_eq!(t[0], t[1], "greedy answers differ: {t:?}");
}

/// `srun -n 4 --overcommit ... --tp_size 2`: two replicas of two ranks behind one router.
#[test]
fn four_tasks_serve_two_tensor_parallel_replicas_behind_one_router() {
    if !slurm_available() {
        return;
    }
    let (workers, answers) = serve_tp2(&["-N", "1", "-n", "4", "--overcommit"], 2, 6);
    let list = workers["workers"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{workers}");
    let t = texts(&answers);
    assert!(
        t.iter().all(|x| x == &t[0]),
        "the replicas answer differently: {t:?}"
    );
}

/// `srun -N 2 -n 2 ... --tp_size 2`: one replica whose two ranks sit on different nodes.
#[test]
fn one_tensor_parallel_replica_spans_two_nodes() {
    if !slurm_available() {
        return;
    }
    let (workers, answers) = serve_tp2(&["-N", "2", "-n", "2"], 1, 2);
    let list = workers["workers"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{workers}");
    assert_eq!(texts(&answers).len(), 2);
}
