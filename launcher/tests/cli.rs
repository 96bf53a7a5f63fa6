//! The llmapi-launch command line, run as a real process.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

use clap::Args;
use llmapi_common::args::{CLI_FLAGS, KvCacheDtype, LlmArgs};

fn launch(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .args(args)
        .env("LLMAPI_CACHE_DIR", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("llmapi-launch runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes the demo checkpoint to `dir/m` (`make-model --preset demo`); its path.
fn demo_model_in(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("m");
    let made = launch(
        &[
            "make-model",
            "--preset",
            "demo",
            "--out",
            model.to_str().unwrap(),
        ],
        dir,
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    model
}

#[test]
fn serve_help_lists_every_flag() {
    let d = tempfile::tempdir().unwrap();
    let out = launch(&["serve", "--help"], d.path());
    assert!(out.status.success());
    let help = text(&out.stdout);
    for f in CLI_FLAGS {
        assert!(
            help.contains(&format!("--{}", f.name)),
            "--{} missing from help",
            f.name
        );
        for a in f.aliases {
            assert!(
                help.contains(&format!("--{a}")),
                "alias --{a} missing from help"
            );
        }
    }
    // The embedded router's access, TLS, migration and response-store flags are the router's own (one
    // definition).
    let access = llmapi_router::access::AccessArgs::augment_args(clap::Command::new("access"));
    let tls = llmapi_router::tls::TlsArgs::augment_args(clap::Command::new("tls"));
    let migration =
        llmapi_router::migrate::MigrationArgs::augment_args(clap::Command::new("migration"));
    let responses =
        llmapi_router::responses::ResponsesArgs::augment_args(clap::Command::new("responses"));
    for a in access
        .get_arguments()
        .chain(tls.get_arguments())
        .chain(migration.get_arguments())
        .chain(responses.get_arguments())
    {
        let long = a.get_long().unwrap();
        assert!(
            help.contains(&format!("--{long}")),
            "--{long} missing from help"
        );
    }
    for extra in [
        "--registration_port",
        "--extra_llm_api_options",
        "--config",
        "--set",
        "--print_config",
    ] {
        assert!(help.contains(extra), "{extra} missing from help");
    }
    assert!(
        help.contains("never executes code"),
        "trust_remote_code is explained"
    );
}

#[test]
fn tutorial_start_line_prints_the_merged_configuration() {
    let d = tempfile::tempdir().unwrap();
    let model = demo_model_in(d.path());
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tutorial-start.yml");
    let out = launch(
        &[
            "serve",
            model.to_str().unwrap(),
            "--max_batch_size",
            "1024",
            "--max_num_tokens",
            "2048",
            "--max_seq_len",
            "1024",
            "--kv_cache_free_gpu_memory_fraction",
            "0.9",
            "--tp_size",
            "1",
            "--ep_size",
            "1",
            "--trust_remote_code",
            "--extra_llm_api_options",
            cfg.to_str().unwrap(),
            "--print_config",
        ],
        d.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let args: LlmArgs = serde_saphyr::from_str(&text(&out.stdout)).expect("printed YAML parses");
    assert_eq!(args.max_batch_size, 1024);
    assert_eq!(args.max_seq_len, Some(1024));
    assert_eq!(args.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert!(args.print_iter_log && args.trust_remote_code);
    assert_eq!(args.cuda_graph_config.unwrap().max_batch_size, 1024);
}

#[test]
fn serve_without_model_writes_and_uses_the_demo_model_once() {
    let d = tempfile::tempdir().unwrap();
    let first = launch(&["serve", "--print_config"], d.path());
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("wrote the built-in demo model"));
    let args: LlmArgs = serde_saphyr::from_str(&text(&first.stdout)).unwrap();
    let model = args.model.expect("model path resolved");
    assert!(model.starts_with(d.path().to_str().unwrap()), "{model}");
    assert_eq!(args.max_seq_len, Some(2048), "from the demo config.json");

    let second = launch(&["serve", "--print_config"], d.path());
    assert!(second.status.success());
    assert!(
        !text(&second.stderr).contains("wrote the built-in demo model"),
        "written once"
    );
}

#[test]
fn hub_id_model_gets_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let out = launch(&["serve", "meta-llama/Llama-3.1-70B"], d.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("local directory only"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn kernels_build_refuses_an_arch_it_cannot_read_before_loading_nvrtc() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("kc");
    let args = [
        "kernels",
        "build",
        "--arch",
        "sm_90,hopper",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let out = launch(&args, d.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--arch hopper") && err.contains("sm_90") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing is written for a refused --arch");
}

#[test]
fn make_model_refuses_to_overwrite_without_force() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("m");
    let args = [
        "make-model",
        "--preset",
        "demo",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    assert!(launch(&args, d.path()).status.success());
    let again = launch(&args, d.path());
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("--force"));
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(launch(&forced, d.path()).status.success());
}

#[test]
fn make_model_cuts_a_draft_from_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let model = demo_model_in(d.path());
    let draft = d.path().join("draft");
    let cut = |layers: &str, out: &Path| {
        launch(
            &[
                "make-model",
                "--from",
                model.to_str().unwrap(),
                "--num_layers",
                layers,
                "--out",
                out.to_str().unwrap(),
            ],
            d.path(),
        )
    };
    let made = cut("1", &draft);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(draft.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    assert!(draft.join("tokenizer.json").is_file());
    // More layers than the source has: refused, saying the range, nothing written.
    let bad = cut("9", &d.path().join("bad"));
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("keep between 1 and 2"),
        "{}",
        text(&bad.stderr)
    );
    assert!(!d.path().join("bad").join("config.json").exists());
    // --from without --num_layers is a usage error naming the missing flag.
    let usage = launch(
        &[
            "make-model",
            "--from",
            model.to_str().unwrap(),
            "--out",
            "x",
        ],
        d.path(),
    );
    assert!(!usage.status.success());
    assert!(
        text(&usage.stderr).contains("--num_layers"),
        "{}",
        text(&usage.stderr)
    );
}

#[test]
fn bad_config_exits_with_the_reason_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let out = launch(&["serve", "--set", "kv_cache_config.dtpye=fp8"], d.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("did you mean 'kv_cache_config.dtype'"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_bad_trace_endpoint_is_refused_before_the_model_loads() {
    let d = tempfile::tempdir().unwrap();
    for (endpoint, why) in [
        ("https://collector:4317", "TLS is not supported"),
        ("grpc://collector:4317", "only the http:// scheme"),
    ] {
        let out = launch(&["serve", "--otlp_traces_endpoint", endpoint], d.path());
        assert!(!out.status.success(), "{endpoint} was accepted");
        let err = text(&out.stderr);
        assert!(
            err.contains("--otlp_traces_endpoint") && err.contains(why),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // Refused before the engine starts: no weights were loaded, no port was bound.
        assert!(
            !err.contains("KV cache allocated") && !err.contains("serving at"),
            "{err}"
        );
    }
}

#[test]
fn the_standard_otlp_environment_variable_names_the_endpoint_when_the_flag_is_absent() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .args(["serve"])
        .env("LLMAPI_CACHE_DIR", d.path())
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the https endpoint was accepted");
    let err = text(&out.stderr);
    assert!(
        err.contains("\"https://collector:4317\"") && err.contains("TLS is not supported"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn generation_config_takes_vllms_two_values() {
    let d = tempfile::tempdir().unwrap();
    let out = launch(&["serve", "--generation_config", "bogus"], d.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("generation_config") && err.contains("`auto` or `vllm`"),
        "{err}"
    );
    let out = launch(
        &["serve", "--generation_config", "vllm", "--print_config"],
        d.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("generation_config: vllm"));
}

#[test]
fn config_values_the_engine_does_not_implement_are_refused_before_loading() {
    let d = tempfile::tempdir().unwrap();
    let model = demo_model_in(d.path());
    let config_path = model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    for (edit, names) in [
        // A window of no positions: a query would see no key.
        (
            serde_json::json!({"architectures": ["MistralForCausalLM"], "sliding_window": 0}),
            ["sliding_window 0", "null"],
        ),
        (
            serde_json::json!({"hidden_act": "gelu_new"}),
            ["hidden_act", "gelu_new"],
        ),
    ] {
        let mut config = original.clone();
        config
            .as_object_mut()
            .unwrap()
            .extend(edit.as_object().unwrap().clone());
        std::fs::write(&config_path, config.to_string()).unwrap();
        let out = launch(&["serve", model.to_str().unwrap()], d.path());
        assert!(!out.status.success(), "{edit} was served");
        let err = text(&out.stderr);
        for n in names {
            assert!(err.contains(n), "{edit}: message lacks `{n}`: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !err.contains("KV cache allocated"),
            "refused before loading: {err}"
        );
    }
    // Mistral v0.1's shape, a window shorter than the context: the CPU backend attends over
    // it, the CUDA backend has no windowed attention and refuses it before anything starts.
    let mut config = original.clone();
    config.as_object_mut().unwrap().extend(
        serde_json::json!({"architectures": ["MistralForCausalLM"], "sliding_window": 16})
            .as_object()
            .unwrap()
            .clone(),
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = launch(
        &["serve", model.to_str().unwrap(), "--backend", "cuda"],
        d.path(),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for n in ["sliding_window 16", "--max_seq_len 16", "--backend cpu"] {
        assert!(err.contains(n), "message lacks `{n}`: {err}");
    }
    assert!(!err.contains("libcuda"), "refused before the driver: {err}");
}
