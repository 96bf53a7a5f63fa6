//! The Docker and Kubernetes kits of deploy/ as a validator reads them (deploy/README.md): the
//! Dockerfiles under hadolint, the Kubernetes manifests under the Kubernetes schemas
//! (deploy/k8s/validate.py with kubernetes-validate), and the images' health check, the
//! LeaderWorkerSet wrapper and the router and worker pods' commands against the real binaries.
//! The observability kit: observability_kit.rs.
//!
//! A missing tool skips its test with a notice, except where CI requires it:
//! LLMAPI_REQUIRE_DEPLOY_LINT=1 (hadolint and kubernetes-validate, `pip install -r
//! deploy/requirements.txt`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llmapi_tests::deploy_tools::{deploy, hadolint, python_with_validator, read, root, run, text};
use llmapi_tests::{
    Proc, bin, demo_model, free_port, get, post, request, router_with_secret, serve, wait_until,
};
use serde_json::{Value, json};

fn dockerfiles() -> [PathBuf; 2] {
    [
        deploy("docker/cpu.Dockerfile"),
        deploy("docker/cuda.Dockerfile"),
    ]
}

#[test]
fn dockerfiles_are_multi_stage_non_root_and_pass_hadolint() {
    for path in dockerfiles() {
        let file = read(&path);
        let name = path.display();
        let stages: Vec<&str> = file.split("\nFROM ").skip(1).collect();
        assert!(stages.len() >= 2, "{name}: a build and a runtime stage");
        assert!(stages[0].contains("AS build") && stages[0].contains("cargo build --release"));
        let runtime = stages[stages.len() - 1];
        for needed in [
            "USER 10001:10001",
            "HEALTHCHECK",
            "EXPOSE 8000",
            "ENTRYPOINT [\"/usr/local/bin/llmapi-launch\"]",
            "COPY --from=build",
        ] {
            assert!(
                runtime.contains(needed),
                "{name}: runtime stage lacks {needed}"
            );
        }
        assert!(
            !runtime.contains("cargo") && !runtime.contains("rustup"),
            "{name}: the runtime stage holds the binaries only, no toolchain"
        );
    }
    let cuda = read(&deploy("docker/cuda.Dockerfile"));
    assert!(cuda.contains("nvidia/cuda:") && cuda.contains("-runtime-"));
    assert!(cuda.contains("kernels build") && cuda.contains("LLMAPI_KERNEL_CACHE="));
    let ignore = read(&root().join(".dockerignore"));
    for kept_out in ["target/", ".venv/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == kept_out),
            ".dockerignore keeps {kept_out} out of the build context"
        );
    }

    let Some(hadolint) = hadolint() else { return };
    let out = run(
        "hadolint",
        Command::new(&hadolint)
            .arg("--no-color")
            .args(dockerfiles()),
    );
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
    // The linter really reads them: a final stage that runs as root is refused (DL3002).
    let dir = tempfile::tempdir().expect("tempdir");
    let root_image = dir.path().join("Dockerfile");
    let file = read(&deploy("docker/cpu.Dockerfile")).replace("USER 10001:10001", "USER root");
    std::fs::write(&root_image, file).expect("write Dockerfile");
    let out = run(
        "hadolint (root image)",
        Command::new(&hadolint).arg("--no-color").arg(&root_image),
    );
    assert!(
        !out.status.success() && text(&out).contains("DL3002"),
        "hadolint passed an image whose last USER is root:\n{}",
        text(&out)
    );
}

#[test]
fn the_image_health_check_passes_only_on_a_200_from_health() {
    let script = deploy("docker/healthcheck.sh");
    let check = |port: u16| {
        Command::new("bash")
            .arg(&script)
            .env("LLMAPI_HEALTH_PORT", port.to_string())
            .output()
            .expect("run the health check")
    };
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let out = check(port);
    assert!(out.status.success(), "healthy serve: {}", text(&out));

    // A router with no worker answers /health with 503: unhealthy.
    let router_port = free_port();
    let _router = router_with_secret(router_port, "deploy-kits-secret-0123456789abcdef", &[]);
    assert_eq!(get(router_port, "/health").status, 503);
    let out = check(router_port);
    assert!(!out.status.success(), "503 passed the check");
    assert!(
        text(&out).contains("503"),
        "names the status: {}",
        text(&out)
    );

    // Nothing listening: unhealthy.
    assert!(!check(free_port()).status.success());
}

/// `llmapi-launch env --tp_size N` run through deploy/k8s/lws-env.sh with a LeaderWorkerSet
/// pod's variables.
fn lws_placement(size: usize, index: usize) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy("k8s/lws-env.sh"))
        .arg(bin("llmapi-launch"))
        .args(["env", "--tp_size", &size.to_string()])
        .env("LWS_LEADER_ADDRESS", "llmapi-tp-3.llmapi-tp.serving")
        .env("LWS_GROUP_SIZE", size.to_string())
        .env("LWS_WORKER_INDEX", index.to_string());
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") || k.starts_with("OMPI_") || k.starts_with("PMI_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run lws-env.sh")
}

#[test]
fn a_leaderworkerset_pod_becomes_its_rank_of_one_tp_group() {
    for index in 0..4 {
        let out = lws_placement(4, index);
        assert!(out.status.success(), "{}", text(&out));
        let p: Value = serde_json::from_slice(&out.stdout).expect("env prints JSON");
        let node = if index == 0 {
            "llmapi-tp-3.llmapi-tp.serving".to_owned()
        } else {
            format!("llmapi-tp-3-{index}.llmapi-tp.serving")
        };
        assert_eq!(p["rank"], json!(index));
        assert_eq!(p["rank_in_group"], json!(index));
        assert_eq!(p["world_size"], json!(4));
        assert_eq!(p["num_groups"], json!(1));
        assert_eq!(p["node"], json!(node));
        assert_eq!(p["leader_node"], json!("llmapi-tp-3.llmapi-tp.serving"));
        assert_eq!(
            p["rendezvous"],
            json!("llmapi-tp-3.llmapi-tp.serving:29500")
        );
        assert_eq!(p["job_id"], json!("llmapi-tp-3"));
    }
    // Outside a LeaderWorkerSet pod it refuses, naming the variable.
    let out = Command::new("bash")
        .arg(deploy("k8s/lws-env.sh"))
        .arg("true")
        .env_remove("LWS_LEADER_ADDRESS")
        .output()
        .expect("run lws-env.sh");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("LWS_LEADER_ADDRESS is unset"));
    let out = lws_placement(2, 2);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// deploy/k8s/validate.py over `dir`.
fn validate_k8s(python: &Path, dir: &Path) -> Output {
    run(
        "kubernetes-validate (deploy/k8s/validate.py)",
        Command::new(python).arg(deploy("k8s/validate.py")).arg(dir),
    )
}

#[test]
fn kubernetes_manifests_pass_the_schemas_and_agree_with_each_other() {
    let Some(python) = python_with_validator() else {
        return;
    };
    let out = validate_k8s(&python, &deploy("k8s"));
    println!("{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    for kind in [
        "StatefulSet/llmapi-router",
        "HorizontalPodAutoscaler/llmapi-router",
        "StatefulSet/llmapi-worker",
        "NetworkPolicy/llmapi-workers-from-routers",
        "Secret/llmapi-job-secret",
        "LeaderWorkerSet/llmapi-tp: CRD",
    ] {
        assert!(text(&out).contains(kind), "{kind} was not checked");
    }

    // Each check bites: a misspelt field, an autoscaler allowed past the routers the workers
    // know, a Secret the pods mount that is not there, a worker the routers would refuse, a
    // TP size that is not the group's, a misspelt field of the CRD's pod template.
    let broken = [
        (
            "workers.yaml",
            "terminationGracePeriodSeconds: 300",
            "terminationGracePeriodSecond: 300",
            "terminationGracePeriodSecond",
        ),
        (
            "router.yaml",
            "maxReplicas: 4",
            "maxReplicas: 5",
            "must name every router",
        ),
        (
            "tp-groups.yaml",
            "--tp_size=2",
            "--tp_size=4",
            "must equal the group size",
        ),
        (
            "secret.yaml.example",
            "name: llmapi-job-secret",
            "name: llmapi-other-secret",
            "which the kit does not define",
        ),
        (
            "router.yaml",
            "llmapi-worker-1.llmapi-worker,",
            "",
            "--worker_url_allowlist lacks llmapi-worker-1.llmapi-worker",
        ),
        (
            "tp-groups.yaml",
            "command: [\"llmapi-lws-env\"",
            "commands: [\"llmapi-lws-env\"",
            "commands",
        ),
    ];
    for (file, from, to, says) in broken {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(deploy("k8s")).expect("deploy/k8s") {
            let path = entry.expect("entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.ends_with(".yaml") || n.ends_with(".yaml.example")) {
                let mut body = read(&path);
                if path.file_name().is_some_and(|n| n == file) {
                    assert!(body.contains(from), "{file} lacks {from}");
                    body = body.replace(from, to);
                }
                std::fs::write(dir.path().join(path.file_name().expect("name")), body)
                    .expect("write manifest");
            }
        }
        let out = validate_k8s(&python, dir.path());
        assert!(
            !out.status.success() && text(&out).contains(says),
            "{file} with {to} passed or did not say {says}:\n{}",
            text(&out)
        );
    }
}

/// One container of the kit, as `validate.py --containers` prints it.
struct Container {
    resource: String,
    init: bool,
    command: Option<Vec<String>>,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

fn kit_containers(python: &Path) -> Vec<Container> {
    let out = Command::new(python)
        .arg(deploy("k8s/validate.py"))
        .arg("--containers")
        .output()
        .expect("validate.py --containers");
    assert!(out.status.success(), "{}", text(&out));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            Container {
                resource: v["resource"].as_str().unwrap_or_default().to_owned(),
                init: v["init"] == json!(true),
                command: v["command"].is_array().then(|| strings(&v["command"])),
                args: strings(&v["args"]),
                env: v["env"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
            }
        })
        .collect()
}

/// GET /health's status, None while nothing answers.
fn health(port: u16) -> Option<u16> {
    request(port, "GET", "/health", None, &[])
        .ok()
        .map(|r| r.status)
}

/// The router and worker pods of deploy/k8s, run as shipped but for their addresses and
/// paths: the init container's `install` turns a world-readable Secret file into one the
/// binaries accept, the router takes every flag of router.yaml, the worker registers with
/// the one router that runs while the routers the autoscaler has not started refuse
/// connections, serves a request, and on SIGTERM withdraws (the router's /health turns 503).
#[test]
fn the_router_and_worker_pods_run_as_shipped_on_loopback() {
    let Some(python) = python_with_validator() else {
        return;
    };
    let containers = kit_containers(&python);
    let find = |resource: &str, init: bool| {
        containers
            .iter()
            .find(|c| c.resource == resource && c.init == init)
            .unwrap_or_else(|| panic!("no {resource} container (init: {init})"))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_src = dir.path().join("secret-src");
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir_all(&secret_src).expect("mkdir");
    std::fs::create_dir_all(&secret_dir).expect("mkdir");
    let token = secret_src.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("write token");
    {
        use std::os::unix::fs::PermissionsExt;
        // As the Secret volume has it (defaultMode 0444).
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    }
    let model = demo_model().display().to_string();
    let paths = |a: &str| {
        a.replace("/run/llmapi/secret-src", &secret_src.display().to_string())
            .replace("/run/llmapi/secret", &secret_dir.display().to_string())
            .replace("/models/model", &model)
    };

    for resource in ["StatefulSet/llmapi-router", "StatefulSet/llmapi-worker"] {
        let init = find(resource, true);
        let cmd = init.command.clone().expect("the init container's command");
        let _ = std::fs::remove_file(secret_dir.join("token"));
        let out = Command::new(&cmd[0])
            .args(cmd[1..].iter().map(|a| paths(a)))
            .output()
            .expect("run the init container's command");
        assert!(out.status.success(), "{resource} init: {}", text(&out));
    }

    let router_port = free_port();
    let router = find("StatefulSet/llmapi-router", false);
    assert_eq!(
        router.command.as_deref(),
        Some(&["llmapi-router".to_owned()][..])
    );
    let args: Vec<String> = router
        .args
        .iter()
        .map(|a| match a.as_str() {
            "--host=0.0.0.0" => "--host=127.0.0.1".to_owned(),
            "--port=8000" => format!("--port={router_port}"),
            // The pods' names do not resolve here; the worker advertises 127.0.0.1.
            a if a.starts_with("--worker_url_allowlist=") => format!("{a},127.0.0.1"),
            a => paths(a),
        })
        .collect();
    let mut cmd = Command::new(bin("llmapi-router"));
    cmd.args(&args);
    let mut router = Proc::spawn(&format!("k8s-router-{router_port}"), cmd);

    let worker = find("StatefulSet/llmapi-worker", false);
    assert_eq!(
        worker.command, None,
        "the image's ENTRYPOINT, llmapi-launch"
    );
    let absent = free_port();
    let args: Vec<String> = worker
        .args
        .iter()
        .map(|a| {
            if let Some(urls) = a.strip_prefix("--router_url=") {
                // Router 0 runs; the others have not been started by the autoscaler.
                let urls: Vec<String> = urls
                    .split(',')
                    .enumerate()
                    .map(|(i, _)| {
                        let port = if i == 0 { router_port } else { absent };
                        format!("http://127.0.0.1:{port}")
                    })
                    .collect();
                format!("--router_url={}", urls.join(","))
            } else if a == "--backend=cuda" {
                "--backend=cpu".to_owned()
            } else {
                paths(a)
            }
        })
        .collect();
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.args(&args)
        .args(["--set", "kv_cache_config.max_tokens=65536"]);
    for (k, v) in &worker.env {
        let v = if k == "LLMAPI_ADVERTISE_HOST" {
            "127.0.0.1".to_owned()
        } else {
            paths(v)
        };
        cmd.env(k, v);
    }
    let mut worker = Proc::spawn(&format!("k8s-worker-{router_port}"), cmd);
    let mut exited = None;
    let routable = wait_until(std::time::Duration::from_secs(60), || {
        for p in [&mut router, &mut worker] {
            if let Some(status) = p.wait_exit(std::time::Duration::from_millis(1)) {
                exited = Some(format!(
                    "{} exited ({status}); see {}",
                    p.name,
                    p.log.display()
                ));
                return true;
            }
        }
        health(router_port) == Some(200)
    });
    assert_eq!(exited, None);
    assert!(
        routable,
        "the worker never became routable; see {} and {}",
        worker.log.display(),
        router.log.display()
    );
    let r = post(
        router_port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "hello", "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        worker.terminate(std::time::Duration::from_secs(30)),
        "the worker did not stop on SIGTERM"
    );
    assert!(
        wait_until(std::time::Duration::from_secs(10), || health(router_port)
            == Some(503)),
        "the stopped worker is still routable"
    );
}
