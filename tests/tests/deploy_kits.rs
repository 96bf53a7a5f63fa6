//! The deploy kits of deploy/ as a validator reads them (deploy/README.md): the Dockerfiles
//! under hadolint, the Kubernetes manifests under the Kubernetes schemas
//! (deploy/k8s/validate.py with kubernetes-validate), the alert rules under `promtool check
//! rules` and `promtool test rules`, a live `/metrics` under `promtool check metrics`, and every
//! PromQL expression of the rules and the Grafana dashboard against the metric and label names
//! a live `llmapi-launch serve` exposes. Also the images' health check and LeaderWorkerSet
//! wrapper against the real binaries.
//!
//! A missing tool skips its test with a notice, except where CI requires it:
//! LLMAPI_REQUIRE_DEPLOY_LINT=1 (hadolint and kubernetes-validate, `pip install -r
//! deploy/requirements.txt`) and LLMAPI_REQUIRE_PROMTOOL=1 (Debian's `prometheus` package).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use llmapi_tests::{
    Proc, bin, demo_model, free_port, get, post, request, router_with_secret, serve, wait_until,
};
use serde_json::{Value, json};

/// The histograms and gauges that the router's metrics are gaining (docs/serving.md,
/// "Metrics") and that the rules and dashboard already read; allowed in the queries before a
/// live scrape shows them.
const ANNOUNCED: &[&str] = &[
    "llmapi_router_time_to_first_token_seconds",
    "llmapi_router_inter_token_latency_seconds",
    "llmapi_router_e2e_request_latency_seconds",
    "llmapi_router_request_queue_time_seconds",
    "llmapi_router_request_prompt_tokens",
    "llmapi_router_request_generation_tokens",
    "llmapi_worker_kv_cache_usage_ratio",
    "llmapi_worker_prefix_cache_hit_ratio",
];

/// Labels Prometheus attaches to every scraped series (the target's), not the exporter.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, printing how long it took.
fn run(what: &str, cmd: &mut Command) -> Output {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// Skips (None) or, when `require` is set, fails: what is missing and how to install it.
fn missing(require: &str, what: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os(require).is_none(),
        "{what} and {require} is set"
    );
    println!("SKIPPED: {what}");
    None
}

/// A Python with kubernetes-validate and PyYAML: LLMAPI_PYTHON, the workspace's .venv, python3.
fn python_with_validator() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("LLMAPI_PYTHON").map(PathBuf::from),
        Some(root().join(".venv/bin/python3")),
        Some(PathBuf::from("python3")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|py| {
            Command::new(py)
                .args(["-c", "import kubernetes_validate, yaml"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .or_else(|| {
            missing(
                "LLMAPI_REQUIRE_DEPLOY_LINT",
                "no python3 with kubernetes-validate (pip install -r deploy/requirements.txt)",
            )
        })
}

/// hadolint on PATH or beside the Python that has the validators (a virtualenv's bin/).
fn hadolint() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("hadolint")];
    for py in [
        std::env::var_os("LLMAPI_PYTHON").map(PathBuf::from),
        Some(root().join(".venv/bin/python3")),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(dir) = py.parent() {
            candidates.push(dir.join("hadolint"));
        }
    }
    candidates
        .into_iter()
        .find(|h| {
            Command::new(h)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .or_else(|| {
            missing(
                "LLMAPI_REQUIRE_DEPLOY_LINT",
                "hadolint is not installed (pip install -r deploy/requirements.txt)",
            )
        })
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some(PathBuf::from("promtool"))
    } else {
        missing(
            "LLMAPI_REQUIRE_PROMTOOL",
            "promtool is not installed (apt-get install --no-install-recommends prometheus)",
        )
    }
}

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

#[test]
fn alert_rules_pass_promtool_and_fire_on_their_conditions() {
    let Some(promtool) = promtool() else { return };
    let rules = deploy("observability/alerts.yaml");
    let out = run(
        "promtool check rules",
        Command::new(&promtool).args(["check", "rules"]).arg(&rules),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "promtool test rules",
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(deploy("observability/alerts_test.yaml")),
    );
    assert!(out.status.success(), "{}", text(&out));

    // A rule that does not parse is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("alerts.yaml");
    std::fs::write(
        &bad,
        read(&rules).replace(
            "up{job=\"llmapi-router\"} == 0",
            "up{job=\"llmapi-router\" == 0",
        ),
    )
    .expect("write rules");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&bad)
        .output()
        .expect("promtool");
    assert!(!out.status.success(), "a broken expression passed");
}

/// What a scrape exposes: metric family (TYPE) names and, per series name, its label names.
#[derive(Default)]
struct Scrape {
    families: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn parse_scrape(body: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                s.families.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = s.labels.entry(line[..end].to_owned()).or_default();
        if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
            let mut inside = &line[open + 1..close];
            while let Some(eq) = inside.find('=') {
                labels.insert(inside[..eq].trim().trim_start_matches(',').to_owned());
                // Skip the quoted value (escapes included).
                let rest = &inside[eq + 1..];
                let mut chars = rest.char_indices().skip(1);
                let mut end = rest.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                inside = rest[end..].trim_start_matches(',');
            }
        }
    }
    s
}

/// The metric selectors of a PromQL expression: (metric name, label names it matches on).
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregations, which may take `by (...)` before their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    let mut skip_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            // A range or subquery duration.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
        } else if c == '$' {
            while i + 1 < chars.len() && ident(chars[i + 1]) {
                i += 1;
            }
            i += 1;
        } else if ident(c) && !c.is_ascii_digit() && (i == 0 || !ident(chars[i - 1])) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            if KEYWORDS.contains(&word.to_lowercase().as_str()) {
                // by (...), on (...): label lists, not metrics.
                skip_list = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                continue;
            }
            skip_list = false;
            if chars.get(after) == Some(&'(') {
                continue; // a function
            }
            let mut labels = Vec::new();
            if chars.get(after) == Some(&'{') {
                let mut j = after + 1;
                while j < chars.len() && chars[j] != '}' {
                    if chars[j] == '"' {
                        j += 1;
                        while j < chars.len() && chars[j] != '"' {
                            j += if chars[j] == '\\' { 2 } else { 1 };
                        }
                        j += 1;
                    } else if ident(chars[j]) {
                        let s = j;
                        while j < chars.len() && ident(chars[j]) {
                            j += 1;
                        }
                        labels.push(chars[s..j].iter().collect());
                    } else {
                        j += 1;
                    }
                }
                i = j + 1;
            }
            out.push((word, labels));
        } else if c == '(' && skip_list {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_list = false;
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr:` of a Prometheus rule file (one line, or a `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(at) = line.find("expr:") else {
            continue;
        };
        if !line[..at].trim().trim_start_matches('-').trim().is_empty() {
            continue;
        }
        let value = line[at + 5..].trim();
        if value == "|" || value == ">" {
            // The block: the lines indented deeper than the key.
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > at)
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(value.to_owned());
        }
    }
    out
}

fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn a_live_scrape_passes_promtool_and_names_every_metric_the_kits_query() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "hello", "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let metrics = get(port, "/metrics");
    assert_eq!(metrics.status, 200);
    let scrape = parse_scrape(&metrics.body);
    assert!(scrape.families.contains_key("llmapi_router_requests_total"));

    // Every metric the rules and the dashboard query is exposed (or announced, above), and
    // every label they match on is one its series carry.
    let mut exprs = rule_exprs(&read(&deploy("observability/alerts.yaml")));
    assert!(exprs.len() >= 10, "the rule file's expressions: {exprs:?}");
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("observability/grafana-dashboard.json")))
            .expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let before = exprs.len();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > before + 20, "the dashboard's queries");
    let mut unknown = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for expr in &exprs {
        let found = selectors(expr);
        assert!(!found.is_empty(), "no metric in {expr}");
        for (name, labels) in found {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| {
                    ANNOUNCED.contains(b)
                        || scrape.families.get(*b).is_some_and(|t| t == "histogram")
                })
                .unwrap_or(&name)
                .to_owned();
            let known = base == "up"
                || scrape.families.contains_key(&base)
                || ANNOUNCED.contains(&base.as_str());
            if !known {
                unknown.insert(name.clone());
                continue;
            }
            checked.insert(name.clone());
            if let Some(served) = scrape.labels.get(&name) {
                for l in labels {
                    assert!(
                        served.contains(&l) || TARGET_LABELS.contains(&l.as_str()),
                        "{expr}: {name} has no label {l} (it has {served:?})"
                    );
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the kits query metrics nothing exposes: {unknown:?} (exposed: {:?})",
        scrape.families.keys().collect::<Vec<_>>()
    );
    println!(
        "{} metric names in {} queries checked",
        checked.len(),
        exprs.len()
    );

    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(metrics.body.as_bytes())
            .expect("write the scrape to promtool");
    }
    let out = child.wait_with_output().expect("promtool check metrics");
    let report = text(&out);
    // A family without `# HELP` is reported but is only a missing description; anything else
    // (a parse error, a counter not named *_total, a unit not in base units) fails.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with(" no help text"))
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics on a live scrape:\n{report}"
    );
    let no_help = report
        .lines()
        .filter(|l| l.ends_with(" no help text"))
        .count();
    if no_help > 0 {
        println!("NOTICE: promtool check metrics: {no_help} metric families have no # HELP line");
    }
}

#[test]
fn the_query_scanner_finds_metrics_and_their_labels_only() {
    let found = selectors(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{route!~"/x{1}", status="5"}[5m]))) / on (instance) group_left b > bool 3 or up{job="r"} unless $value"#,
    );
    assert_eq!(
        found,
        vec![
            (
                "a_bucket".to_owned(),
                vec!["route".to_owned(), "status".to_owned()]
            ),
            ("b".to_owned(), vec![]),
            ("up".to_owned(), vec!["job".to_owned()]),
        ]
    );
    let exprs = rule_exprs(
        "  - expr: a > 1\n    for: 1m\n  - expr: |\n      b\n      or c\n    labels: {}\n",
    );
    assert_eq!(
        exprs,
        vec!["a > 1".to_owned(), "      b\n      or c".to_owned()]
    );
    let s = parse_scrape("# TYPE x counter\nx{a=\"1,b=\\\"2\",c=\"3\"} 1\n");
    assert_eq!(
        s.labels["x"],
        ["a", "c"].iter().map(|s| s.to_string()).collect()
    );
}
