//! `speculative_config`: trtllm-serve's keys and defaults, and refusals that name what runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_common::args::{ArgsError, Resolved, SpeculativeConfig, resolve, serve_command};

fn run_yaml(text: &str, extra: &[&str]) -> Result<Resolved, ArgsError> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("extra.yml");
    std::fs::write(&p, text).unwrap();
    let path = p.to_string_lossy().into_owned();
    let argv = ["serve", "--extra_llm_api_options", &path]
        .into_iter()
        .chain(extra.iter().copied());
    resolve(&serve_command().try_get_matches_from(argv).unwrap())
}

#[test]
fn ngram_takes_tensorrt_llm_defaults_for_what_is_not_given() {
    let r = run_yaml(
        "speculative_config:\n  decoding_type: NGram\n  max_draft_len: 4\n",
        &[],
    )
    .unwrap();
    assert_eq!(r.args.speculative_config, Some(SpeculativeConfig::ngram(4)));
    let s = r.args.speculative_config.unwrap();
    assert_eq!(s.max_matching_ngram_size, 2);
    assert!(s.is_keep_all && s.is_use_oldest && s.is_public_pool);
}

#[test]
fn every_ngram_key_is_read_and_set_can_tune_the_section() {
    let r = run_yaml(
        "speculative_config:\n  decoding_type: NGram\n  max_draft_len: 3\n  max_matching_ngram_size: 4\n  is_keep_all: false\n  is_use_oldest: false\n  is_public_pool: false\n",
        &["--set", "speculative_config.max_draft_len=6"],
    )
    .unwrap();
    let s = r.args.speculative_config.unwrap();
    assert_eq!((s.max_draft_len, s.max_matching_ngram_size), (Some(6), 4));
    assert!(!s.is_keep_all && !s.is_use_oldest && !s.is_public_pool);
}

#[test]
fn other_decoding_types_are_refused_naming_what_is_supported() {
    for t in ["Eagle3", "MTP", "Draft_Target", "Bogus"] {
        // Keys of the refused type's own section do not hide the reason.
        let e = run_yaml(
            &format!("speculative_config:\n  decoding_type: {t}\n  max_draft_len: 3\n  eagle3_one_model: true\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("decoding_type {t}"))
                && e.contains("supported: NGram, DraftTarget"),
            "{t}: {e}"
        );
    }
}

#[test]
fn ngram_without_a_positive_max_draft_len_is_refused() {
    for body in [
        "  decoding_type: NGram\n",
        "  decoding_type: NGram\n  max_draft_len: 0\n",
    ] {
        let e = run_yaml(&format!("speculative_config:\n{body}"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_draft_len must be > 0"), "{e}");
    }
    let e = run_yaml(
        "speculative_config:\n  decoding_type: NGram\n  max_draft_len: 4\n  max_matching_ngram: 3\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("max_matching_ngram"), "{e}");
}

#[test]
fn draft_target_reads_its_checkpoint_and_needs_one_rank() {
    let yaml = "speculative_config:\n  decoding_type: DraftTarget\n  max_draft_len: 3\n  speculative_model_dir: /models/draft\n";
    let r = run_yaml(yaml, &[]).unwrap();
    assert_eq!(
        r.args.speculative_config,
        Some(SpeculativeConfig::draft_target(3, "/models/draft"))
    );
    // TensorRT-LLM's newer spelling of the key.
    let r = run_yaml(
        &yaml.replace("speculative_model_dir", "speculative_model"),
        &[],
    )
    .unwrap();
    assert_eq!(
        r.args
            .speculative_config
            .unwrap()
            .speculative_model_dir
            .as_deref(),
        Some("/models/draft")
    );
    // A tensor-parallel group runs the draft on rank 0: the section is taken as it is.
    let r = run_yaml(yaml, &["--tp_size", "2"]).unwrap();
    assert_eq!(r.args.tensor_parallel_size, 2);
    assert_eq!(
        r.args.speculative_config,
        Some(SpeculativeConfig::draft_target(3, "/models/draft"))
    );
    let e = run_yaml(
        "speculative_config:\n  decoding_type: DraftTarget\n  max_draft_len: 3\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("speculative_model_dir is required"), "{e}");
    let e = run_yaml(
        "speculative_config:\n  decoding_type: NGram\n  max_draft_len: 3\n  speculative_model_dir: /d\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is for DraftTarget"), "{e}");
}
