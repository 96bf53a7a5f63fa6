//! Configuration rules: precedence, deep merge, unknown keys, legacy spellings, refusals.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use llmapi_common::args::{
    ArgsError, KvCacheDtype, LlmArgs, NoticeLevel, Resolved, cuda_graph_batch_sizes, resolve,
    serve_command,
};

fn run(argv: &[&str]) -> Result<Resolved, ArgsError> {
    let m = serve_command()
        .try_get_matches_from(std::iter::once("serve").chain(argv.iter().copied()))
        .expect("command line parses");
    resolve(&m)
}

fn yaml(text: &str) -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("extra.yml");
    std::fs::write(&p, text).unwrap();
    (d, p.to_string_lossy().into_owned())
}

fn err(argv: &[&str]) -> String {
    run(argv).unwrap_err().to_string()
}

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    p.to_string_lossy().into_owned()
}

#[test]
fn no_flags_gives_the_defaults_with_generated_graph_sizes() {
    let r = run(&[]).unwrap();
    let mut expected = LlmArgs::default();
    expected.cuda_graph_config.as_mut().unwrap().max_batch_size = 128;
    expected.cuda_graph_config.as_mut().unwrap().batch_sizes =
        Some(cuda_graph_batch_sizes(128, false));
    assert_eq!(r.args, expected);
    assert_eq!(r.args.host, "localhost");
    assert_eq!(r.args.port, 8000);
    assert_eq!(r.args.max_batch_size, 2048);
    assert_eq!(r.args.max_num_tokens, 8192);
    assert_eq!(r.args.kv_cache_config.free_gpu_memory_fraction, 0.9);
    assert!(r.notices.is_empty(), "{:?}", r.notices);
}

#[test]
fn cli_flags_and_their_aliases_set_keys() {
    let r = run(&[
        "/m",
        "--tensor_parallel_size",
        "2",
        "--free_gpu_memory_fraction",
        "0.5",
        "--trust_remote_code",
        "--max_seq_len",
        "512",
    ])
    .unwrap();
    assert_eq!(r.args.model.as_deref(), Some("/m"));
    assert_eq!(r.args.tensor_parallel_size, 2);
    assert_eq!(r.args.kv_cache_config.free_gpu_memory_fraction, 0.5);
    assert!(r.args.trust_remote_code);
    assert_eq!(r.args.max_seq_len, Some(512));
}

#[test]
fn yaml_overrides_cli_and_says_so() {
    let (_d, p) = yaml("max_batch_size: 64\n");
    let r = run(&["--max_batch_size", "1024", "--extra_llm_api_options", &p]).unwrap();
    assert_eq!(r.args.max_batch_size, 64);
    let n = r
        .notices
        .iter()
        .find(|n| n.message.contains("--max_batch_size 1024"))
        .expect("the override is logged");
    assert!(n.message.contains("max_batch_size = 64"), "{}", n.message);
}

#[test]
fn yaml_sections_merge_key_by_key() {
    let (_d, p) = yaml("kv_cache_config:\n  dtype: fp8\n");
    let r = run(&["--kv_cache_free_gpu_memory_fraction", "0.5", "--config", &p]).unwrap();
    assert_eq!(r.args.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert_eq!(r.args.kv_cache_config.free_gpu_memory_fraction, 0.5);
    assert!(r.args.kv_cache_config.enable_block_reuse, "default kept");
}

#[test]
fn set_overrides_yaml() {
    let (_d, p) = yaml("kv_cache_config:\n  tokens_per_block: 64\n");
    let r = run(&[
        "--config",
        &p,
        "--set",
        "kv_cache_config.tokens_per_block=16",
        "--set",
        "print_iter_log=true",
    ])
    .unwrap();
    assert_eq!(r.args.kv_cache_config.tokens_per_block, 16);
    assert!(r.args.print_iter_log);
}

#[test]
fn unknown_key_names_file_path_and_closest_key() {
    let (_d, p) = yaml("kv_cache_config:\n  dtpye: fp8\n");
    let e = err(&["--config", &p]);
    assert!(e.contains(&p), "{e}");
    assert!(e.contains("'kv_cache_config.dtpye'"), "{e}");
    assert!(e.contains("did you mean 'kv_cache_config.dtype'"), "{e}");
}

#[test]
fn unknown_key_in_the_wrong_section_points_to_the_right_one() {
    let (_d, p) = yaml("tokens_per_block: 64\n");
    let e = err(&["--config", &p]);
    assert!(
        e.contains("did you mean 'kv_cache_config.tokens_per_block'"),
        "{e}"
    );
}

#[test]
fn unknown_key_through_set_is_refused() {
    let e = err(&["--set", "max_batch_sise=4"]);
    assert!(e.contains("--set max_batch_sise=4"), "{e}");
    assert!(e.contains("did you mean 'max_batch_size'"), "{e}");
}

fn warned(r: &Resolved, needle: &str) -> bool {
    r.notices
        .iter()
        .any(|n| n.level == NoticeLevel::Warn && n.message.contains(needle))
}

#[test]
fn legacy_padding_enabled_is_read_as_enable_padding() {
    let (_d, p) = yaml("cuda_graph_config:\n  padding_enabled: true\n");
    let r = run(&["--config", &p]).unwrap();
    assert!(r.args.cuda_graph_config.unwrap().enable_padding);
    assert!(warned(&run(&["--config", &p]).unwrap(), "padding_enabled"));
}

#[test]
fn legacy_top_level_kv_cache_dtype_is_read_as_kv_cache_config_dtype() {
    let (_d, p) = yaml("kv_cache_dtype: fp8\n");
    let r = run(&["--config", &p]).unwrap();
    assert_eq!(r.args.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert!(warned(&r, "kv_cache_dtype"));
}

#[test]
fn legacy_attention_backend_is_read_as_attn_backend() {
    let (_d, p) = yaml("attention_backend: FLASHINFER\n");
    let r = run(&["--config", &p]).unwrap();
    assert_eq!(r.args.attn_backend, "FLASHINFER");
    assert!(warned(&r, "attention_backend"));
}

#[test]
fn legacy_pytorch_backend_config_maps_onto_current_keys() {
    let (_d, p) = yaml(
        "pytorch_backend_config:\n  cuda_graph_batch_sizes: [1, 2, 8]\n  kv_cache_dtype: fp8\n  enable_overlap_scheduler: true\n",
    );
    let r = run(&["--config", &p]).unwrap();
    let cg = r.args.cuda_graph_config.clone().unwrap();
    assert_eq!(cg.batch_sizes, Some(vec![1, 2, 8]));
    assert_eq!(cg.max_batch_size, 8);
    assert_eq!(r.args.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert!(warned(&r, "enable_overlap_scheduler is ignored"));

    let (_d2, p2) = yaml("pytorch_backend_config:\n  use_cuda_graph: false\n");
    assert_eq!(
        run(&["--config", &p2]).unwrap().args.cuda_graph_config,
        None
    );

    let (_d3, p3) = yaml("pytorch_backend_config:\n  made_up: 1\n");
    assert!(err(&["--config", &p3]).contains("pytorch_backend_config.made_up"));
}

#[test]
fn legacy_and_current_spelling_that_disagree_are_refused() {
    let (_d, p) = yaml("kv_cache_dtype: fp8\nkv_cache_config:\n  dtype: bf16\n");
    let e = err(&["--config", &p]);
    assert!(e.contains("contradicts"), "{e}");
}

#[test]
fn the_prefill_token_budget_is_unset_by_default_and_settable() {
    assert_eq!(
        run(&[]).unwrap().args.scheduler_config.prefill_token_budget,
        None
    );
    let set = run(&["--set", "scheduler_config.prefill_token_budget=1024"]).unwrap();
    assert_eq!(set.args.scheduler_config.prefill_token_budget, Some(1024));
}

#[test]
fn the_worker_queue_bound_is_unset_by_default_and_settable() {
    assert_eq!(
        run(&[]).unwrap().args.scheduler_config.max_queued_requests,
        None
    );
    let set = run(&["--set", "scheduler_config.max_queued_requests=0"]).unwrap();
    assert_eq!(set.args.scheduler_config.max_queued_requests, Some(0));
}

#[test]
fn null_cuda_graph_config_disables_graphs() {
    let (_d, p) = yaml("cuda_graph_config: null\n");
    assert_eq!(run(&["--config", &p]).unwrap().args.cuda_graph_config, None);
}

#[test]
fn refused_values_say_what_to_change() {
    let cases: &[(&[&str], &str)] = &[
        (&["--max_beam_width", "4"], "beam search is not implemented"),
        (&["--pp_size", "2"], "pipeline parallelism is not supported"),
        (
            &["--kv_cache_free_gpu_memory_fraction", "1.5"],
            "expected a fraction in (0, 1]",
        ),
        (
            &["--set", "kv_cache_config.tokens_per_block=48"],
            "power of two",
        ),
        (
            &["--set", "stream_interval=0"],
            "stream_interval must be greater than 0",
        ),
        (
            &["--set", "scheduler_config.prefill_token_budget=0"],
            "scheduler_config.prefill_token_budget must be greater than 0",
        ),
        (
            &["--set", "kv_cache_config.dtype=fp4"],
            "kv_cache_config.dtype",
        ),
        (&["--log_level", "loud"], "expected one of trace"),
        (
            &["--tp_size", "2", "--ep_size", "3"],
            "--ep_size 3 must divide --tp_size 2",
        ),
        (&["--backend", "tensorrt"], "backend"),
        (&["--max_batch_size", "many"], "expected a whole number"),
        (&["--set", "max_batch_size"], "expected KEY.PATH=VALUE"),
        (
            &["--set", "moe_config.backend=FAST"],
            "moe_config.backend FAST",
        ),
        (
            &[
                "--set",
                "cuda_graph_config.batch_sizes=[1,2]",
                "--set",
                "cuda_graph_config.max_batch_size=8",
            ],
            "must equal max(cuda_graph_config.batch_sizes)",
        ),
    ];
    for (argv, needle) in cases {
        let e = err(argv);
        assert!(e.contains(needle), "{argv:?}: {e}");
    }
    let e = err(&["--set", "kv_cache_config.dtype=fp4"]);
    assert!(e.contains("fp8"), "lists the valid dtypes: {e}");
}

#[test]
fn dtype_accepts_tensorrt_llm_names_and_usual_aliases() {
    use llmapi_common::args::ModelDtype;
    assert_eq!(run(&[]).unwrap().args.dtype, ModelDtype::Auto);
    for (value, want) in [
        ("auto", ModelDtype::Auto),
        ("float32", ModelDtype::Float32),
        ("fp32", ModelDtype::Float32),
        ("bfloat16", ModelDtype::Bfloat16),
        ("bf16", ModelDtype::Bfloat16),
        ("float16", ModelDtype::Float16),
        ("fp16", ModelDtype::Float16),
    ] {
        assert_eq!(
            run(&["--dtype", value]).unwrap().args.dtype,
            want,
            "{value}"
        );
    }
    let (_d, p) = yaml("dtype: bf16\n");
    let r = run(&["--dtype", "float32", "--config", &p]).unwrap();
    assert_eq!(
        r.args.dtype,
        ModelDtype::Bfloat16,
        "YAML overrides the flag"
    );
    let e = err(&["--dtype", "int8"]);
    assert!(e.contains("dtype") && e.contains("bfloat16"), "{e}");
}

#[test]
fn float16_is_refused_on_the_cpu_backend_with_what_to_use() {
    let e = err(&["--backend", "cpu", "--dtype", "float16"]);
    assert!(
        e.contains("float16") && e.contains("--dtype bfloat16"),
        "{e}"
    );
    // On auto or cuda the choice is the backend's: the CPU backend refuses it at start-up.
    assert!(run(&["--backend", "cuda", "--dtype", "fp16"]).is_ok());
}

#[test]
fn backend_pytorch_is_read_as_auto_with_a_note() {
    let r = run(&["--backend", "pytorch"]).unwrap();
    assert_eq!(r.args.backend, llmapi_common::args::Backend::Auto);
    assert!(r.notices.iter().any(|n| n.message.contains("pytorch")));
}

#[test]
fn cuda_graph_sizes_are_generated_like_tensorrt_llm() {
    assert_eq!(
        cuda_graph_batch_sizes(1024, true),
        vec![
            1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 256, 512,
            1024
        ]
    );
    let no_pad = cuda_graph_batch_sizes(200, false);
    assert_eq!(no_pad.len(), 31 + 3 + 1);
    assert_eq!(&no_pad[29..], &[30, 31, 32, 64, 128, 200]);
    assert_eq!(cuda_graph_batch_sizes(4, true), vec![1, 2, 4]);
}

#[test]
fn tutorial_start_config_and_flag_line_merge() {
    let cfg = repo_file("configs/tutorial-start.yml");
    let r = run(&[
        "/path/to/model",
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
        &cfg,
    ])
    .unwrap();
    let a = &r.args;
    assert_eq!(
        (a.max_batch_size, a.max_num_tokens, a.max_seq_len),
        (1024, 2048, Some(1024))
    );
    assert_eq!(a.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert!(a.print_iter_log && !a.enable_attention_dp);
    let cg = a.cuda_graph_config.clone().unwrap();
    assert!(cg.enable_padding);
    assert_eq!(cg.max_batch_size, 1024);
    assert_eq!(cg.batch_sizes, Some(cuda_graph_batch_sizes(1024, true)));
}

#[test]
fn tutorial_switches_config_loads_with_legacy_warnings() {
    let r = run(&["--config", &repo_file("configs/tutorial-switches.yml")]).unwrap();
    assert!(r.args.cuda_graph_config.unwrap().enable_padding);
    assert_eq!(r.args.kv_cache_config.dtype, KvCacheDtype::Fp8);
    assert!(r.args.enable_attention_dp);
    assert!(warned_any(&r.notices, "padding_enabled"));
    assert!(warned_any(&r.notices, "kv_cache_dtype"));
    assert!(warned_any(&r.notices, "enable_attention_dp"));
}

fn warned_any(n: &[llmapi_common::args::Notice], needle: &str) -> bool {
    n.iter()
        .any(|n| n.level == NoticeLevel::Warn && n.message.contains(needle))
}

#[test]
fn printed_config_reads_back_as_the_same_configuration() {
    let (_d, p) = yaml("kv_cache_config:\n  dtype: fp8\n  max_tokens: 4096\n");
    let r = run(&["/m", "--config", &p, "--max_seq_len", "256"]).unwrap();
    let text = r.args.to_yaml();
    assert!(text.contains("dtype: fp8"), "{text}");
    let (_d2, p2) = yaml(&text);
    let again = run(&["--config", &p2]).unwrap();
    assert_eq!(again.args, r.args);
}

#[test]
fn max_seq_len_comes_from_the_model_and_is_bounded_by_it() {
    let mut a = LlmArgs::default();
    a.resolve_max_seq_len(Some(4096)).unwrap();
    assert_eq!(a.max_seq_len, Some(4096));
    let mut b = LlmArgs {
        max_seq_len: Some(8192),
        ..LlmArgs::default()
    };
    let e = b.resolve_max_seq_len(Some(4096)).unwrap_err().to_string();
    assert!(
        e.contains("exceeds the model's max_position_embeddings 4096"),
        "{e}"
    );
}

#[test]
fn guided_decoding_backend_takes_llguidance_and_xgrammar_with_a_note() {
    for (name, noted) in [("llguidance", false), ("xgrammar", true)] {
        let (_d, p) = yaml(&format!("guided_decoding_backend: {name}\n"));
        let r = run(&["--config", &p]).unwrap();
        assert_eq!(r.args.guided_decoding_backend.as_deref(), Some(name));
        let note = r.notices.iter().any(|n| {
            n.message.contains("served by llguidance")
                || n.message.contains("enforces structured outputs")
        });
        assert_eq!(note, noted, "{name}: {:?}", r.notices);
    }
    let (_d, p) = yaml("guided_decoding_backend: outlines\n");
    let e = err(&["--config", &p]);
    assert!(
        e.contains("outlines") && e.contains("llguidance or xgrammar"),
        "{e}"
    );
}
