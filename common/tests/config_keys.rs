//! Every config.json key of the supported architectures, as transformers' config classes
//! define them, has a row in `CONFIG_KEYS`, and the loader does what the row says: a used key
//! changes the parsed config, an ignored one does not, a refused one with a value that would
//! change the math fails the load with a message naming the key and the value. docs/models.md
//! shows the same table.
//!
//! The key lists are those of transformers 5.25.0 (`models/*/configuration_*.py` and the
//! fields of `PreTrainedConfig` that config.json files carry), plus older spellings still
//! found on the Hub (`torch_dtype`, top-level `rope_theta`, `rope_scaling`, `tokenizer_class`)
//! and `quantization_config`, which `from_pretrained` reads.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use llmapi_common::config_keys::{CONFIG_KEYS, Treatment, config_key};
use llmapi_common::model_config::{Architecture, ModelConfig, SUPPORTED_ARCHITECTURES};
use serde_json::{Map, Value, json};

const BASE: &[&str] = &[
    "transformers_version",
    "architectures",
    "model_type",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "dtype",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "_name_or_path",
];

const OLDER_AND_LOADER: &[&str] = &[
    "torch_dtype",
    "rope_theta",
    "rope_scaling",
    "tokenizer_class",
    "quantization_config",
];

const LLAMA: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
];

const MISTRAL: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "sliding_window",
    "attention_dropout",
];

const QWEN2: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
];

const QWEN3: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
];

const MIXTRAL: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "sliding_window",
    "attention_dropout",
    "num_experts_per_tok",
    "num_local_experts",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "rope_parameters",
];

const QWEN2_MOE: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "decoder_sparse_step",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts_per_tok",
    "num_experts",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "mlp_only_layers",
    "qkv_bias",
    "layer_types",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
];

// Qwen3MoeConfig does not declare head_dim, but its modeling reads it (getattr) and the Hub's
// configs carry it (Qwen3-30B-A3B: 128, not hidden_size / heads).
const QWEN3_MOE: &[&str] = &[
    "head_dim",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "use_sliding_window",
    "sliding_window",
    "attention_dropout",
    "decoder_sparse_step",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "num_experts",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "mlp_only_layers",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
];

fn class_keys(arch: Architecture) -> &'static [&'static str] {
    match arch {
        Architecture::Llama => LLAMA,
        Architecture::Mistral => MISTRAL,
        Architecture::Qwen2 => QWEN2,
        Architecture::Qwen3 => QWEN3,
        Architecture::Mixtral => MIXTRAL,
        Architecture::Qwen2Moe => QWEN2_MOE,
        Architecture::Qwen3Moe => QWEN3_MOE,
    }
}

fn archs() -> impl Iterator<Item = Architecture> {
    SUPPORTED_ARCHITECTURES
        .iter()
        .map(|n| Architecture::from_hf_name(n).unwrap())
}

/// Every key a config.json of `arch` may carry.
fn all_keys(arch: Architecture) -> Vec<&'static str> {
    let mut keys: Vec<&str> = BASE.iter().chain(OLDER_AND_LOADER).copied().collect();
    keys.extend(class_keys(arch));
    keys
}

/// A small valid config of `arch`: 2 layers, 64 positions, all windows off.
fn minimal(arch: Architecture) -> Map<String, Value> {
    let mut c = json!({
        "architectures": [arch.hf_name()], "model_type": "m", "vocab_size": 100,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "sliding_window": null,
    });
    let moe = match arch {
        Architecture::Mixtral => json!({"num_local_experts": 4, "num_experts_per_tok": 2}),
        Architecture::Qwen2Moe | Architecture::Qwen3Moe => json!({
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32
        }),
        _ => json!({}),
    };
    let map = c.as_object_mut().unwrap();
    map.extend(moe.as_object().unwrap().clone());
    map.clone()
}

/// Parses `base` with `extra` merged in.
fn load(base: &Map<String, Value>, extra: &Value) -> Result<ModelConfig, String> {
    let mut c = base.clone();
    c.extend(extra.as_object().unwrap().clone());
    let text = Value::Object(c).to_string();
    ModelConfig::from_json_str(&text, Path::new("config.json")).map_err(|e| e.to_string())
}

/// For the window keys, which act only together: the other keys of a window (the context)
/// and a value of `key` that changes which layers are windowed within it.
fn window_change(arch: Architecture, key: &str) -> Option<(Value, Value)> {
    let mistral = matches!(arch, Architecture::Mistral | Architecture::Mixtral);
    // Qwen2 / Qwen3 window layers from max_window_layers on, Qwen2-MoE even ones below it.
    let (none, some) = if arch == Architecture::Qwen2Moe {
        (0, 1)
    } else {
        (2, 0)
    };
    Some(match key {
        "sliding_window" if mistral => (json!({}), json!({"sliding_window": 16})),
        "sliding_window" => (
            json!({"use_sliding_window": true, "max_window_layers": some}),
            json!({"sliding_window": 16}),
        ),
        "use_sliding_window" => (
            json!({"sliding_window": 16, "max_window_layers": some}),
            json!({"use_sliding_window": true}),
        ),
        "max_window_layers" => (
            json!({"sliding_window": 16, "use_sliding_window": true, "max_window_layers": none}),
            json!({"max_window_layers": some}),
        ),
        _ => return None,
    })
}

/// A value of each used key that differs from `minimal`'s (and from the default).
fn changed(key: &str) -> Option<Value> {
    Some(match key {
        "model_type" => json!({"model_type": "other"}),
        "vocab_size" => json!({"vocab_size": 200}),
        "hidden_size" => json!({"hidden_size": 128}),
        "intermediate_size" => json!({"intermediate_size": 256}),
        "num_hidden_layers" => json!({"num_hidden_layers": 3}),
        "num_attention_heads" => json!({"num_attention_heads": 8}),
        "num_key_value_heads" => json!({"num_key_value_heads": 1}),
        "head_dim" => json!({"head_dim": 32}),
        "max_position_embeddings" => json!({"max_position_embeddings": 32}),
        "rms_norm_eps" => json!({"rms_norm_eps": 1e-3}),
        "rope_theta" => json!({"rope_theta": 1e6}),
        "tie_word_embeddings" => json!({"tie_word_embeddings": true}),
        "attention_bias" => json!({"attention_bias": true}),
        "qkv_bias" => json!({"qkv_bias": false}),
        "bos_token_id" => json!({"bos_token_id": 7}),
        "eos_token_id" => json!({"eos_token_id": [7, 8]}),
        "num_local_experts" => json!({"num_local_experts": 8}),
        "num_experts" => json!({"num_experts": 8}),
        "num_experts_per_tok" => json!({"num_experts_per_tok": 1}),
        "norm_topk_prob" => json!({"norm_topk_prob": true}),
        "moe_intermediate_size" => json!({"moe_intermediate_size": 16}),
        "shared_expert_intermediate_size" => json!({"shared_expert_intermediate_size": 64}),
        "decoder_sparse_step" => json!({"decoder_sparse_step": 2}),
        "mlp_only_layers" => json!({"mlp_only_layers": [1]}),
        _ => return None,
    })
}

/// For each refused key: a value the engine implements, and one it refuses, with the
/// strings its message must hold (the key and the value).
fn refused(key: &str) -> (Value, Value, [&'static str; 2]) {
    match key {
        "rope_scaling" => (
            json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            ["rope_scaling", "yarn"],
        ),
        "rope_parameters" => (
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
            ["rope_parameters.partial_rotary_factor", "0.5"],
        ),
        "hidden_act" => (
            json!({"hidden_act": "swish"}),
            json!({"hidden_act": "gelu_pytorch_tanh"}),
            ["hidden_act", "gelu_pytorch_tanh"],
        ),
        "mlp_bias" => (
            json!({"mlp_bias": false}),
            json!({"mlp_bias": true}),
            ["mlp_bias", "true"],
        ),
        "layer_types" => (
            json!({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 16}),
            json!({"layer_types": ["full_attention", "linear_attention"]}),
            ["layer_types", "linear_attention"],
        ),
        "quantization_config" => (
            json!({"quantization_config": null}),
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}),
            ["quantization_config", "fp8"],
        ),
        other => panic!("no refusal sample for `{other}`: add one"),
    }
}

#[test]
fn every_key_of_every_supported_class_has_a_row() {
    let mut listed = std::collections::BTreeSet::new();
    for arch in archs() {
        for key in all_keys(arch) {
            assert!(
                config_key(key).is_some(),
                "{}: `{key}` has no row in CONFIG_KEYS",
                arch.hf_name()
            );
            listed.insert(key);
        }
    }
    for row in CONFIG_KEYS {
        assert!(
            listed.contains(row.key),
            "CONFIG_KEYS row `{}` is no key of a supported class",
            row.key
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    assert!(
        CONFIG_KEYS.iter().all(|r| seen.insert(r.key)),
        "a key has two rows"
    );
}

#[test]
fn used_keys_change_the_parsed_config() {
    for arch in archs() {
        let base = minimal(arch);
        for key in all_keys(arch) {
            let row = config_key(key).unwrap();
            // architectures picks the class; the other tests run every class.
            if row.treatment != Treatment::Used || key == "architectures" {
                continue;
            }
            let (context, extra) = window_change(arch, key).unwrap_or_else(|| {
                let extra = changed(key).unwrap_or_else(|| panic!("no changed value for `{key}`"));
                (json!({}), extra)
            });
            let before = load(&base, &context).unwrap();
            let mut both = context.as_object().unwrap().clone();
            both.extend(extra.as_object().unwrap().clone());
            let c = load(&base, &Value::Object(both))
                .unwrap_or_else(|e| panic!("{}: {key}: {e}", arch.hf_name()));
            assert_ne!(c, before, "{}: `{key}` changed nothing", arch.hf_name());
        }
    }
}

#[test]
fn ignored_keys_leave_the_parsed_config_as_it_was() {
    for arch in archs() {
        let base = minimal(arch);
        let plain = load(&base, &json!({})).unwrap();
        for key in all_keys(arch) {
            if config_key(key).unwrap().treatment != Treatment::Ignored {
                continue;
            }
            let value = match key {
                "dtype" | "torch_dtype" => json!("bfloat16"),
                "is_encoder_decoder" | "use_cache" | "return_dict" => json!(true),
                "id2label" | "label2id" => json!({"0": "a"}),
                _ => json!(3),
            };
            let mut c = load(&base, &json!({ key: value })).unwrap();
            c.dtype = None; // recorded as declared, never applied: see its row
            assert_eq!(
                c,
                plain,
                "{}: ignored `{key}` changed the config",
                arch.hf_name()
            );
        }
    }
}

#[test]
fn refused_keys_fail_the_load_naming_the_key_and_the_value() {
    for arch in archs() {
        let base = minimal(arch);
        for key in all_keys(arch) {
            if config_key(key).unwrap().treatment != Treatment::Refused {
                continue;
            }
            let (ok, bad, names) = refused(key);
            let name = arch.hf_name();
            load(&base, &ok).unwrap_or_else(|e| panic!("{name}: {key} {ok} is implemented: {e}"));
            let e = load(&base, &bad).expect_err(&format!("{name}: {key} {bad} loads"));
            for n in names {
                assert!(e.contains(n), "{name}: message lacks `{n}`: {e}");
            }
        }
    }
}

#[test]
fn sliding_windows_follow_each_class_rule() {
    let window = |arch, extra: Value| {
        let mut c = minimal(arch);
        c.extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json_str(&Value::Object(c).to_string(), Path::new("config.json"))
            .unwrap()
            .sliding_window
            .map(|w| (w.window, w.layers))
    };
    // Qwen2.5 as published: a window that use_sliding_window false turns off.
    let qwen25 =
        json!({"use_sliding_window": false, "sliding_window": 131072, "max_window_layers": 28});
    assert_eq!(window(Architecture::Qwen2, qwen25), None);
    let on = |mwl: u64| json!({"use_sliding_window": true, "sliding_window": 16, "max_window_layers": mwl});
    assert_eq!(window(Architecture::Qwen2, on(1)), Some((16, vec![1])));
    assert_eq!(window(Architecture::Qwen2, on(0)), Some((16, vec![0, 1])));
    assert_eq!(window(Architecture::Qwen2, on(2)), None);
    assert_eq!(window(Architecture::Qwen2Moe, on(2)), Some((16, vec![0])));
    assert_eq!(
        window(Architecture::Qwen3Moe, on(2)),
        Some((16, vec![0, 1]))
    );
    // Mistral v0.1: no switch, and an absent key is the class default.
    assert_eq!(
        window(Architecture::Mistral, json!({"sliding_window": 4096})),
        Some((4096, vec![0, 1]))
    );
    let mut absent = minimal(Architecture::Mistral);
    absent.remove("sliding_window");
    let c = ModelConfig::from_json_str(&Value::Object(absent).to_string(), Path::new("c")).unwrap();
    assert_eq!(c.sliding_window.map(|w| w.window), Some(4096));
    assert_eq!(window(Architecture::Mixtral, json!({})), None);
    assert_eq!(
        window(Architecture::Llama, json!({"sliding_window": 16})),
        None
    );
    // Per layer, as the attention reads it; every layer shares it only on Mistral here.
    let c = load(&minimal(Architecture::Qwen2), &on(1)).unwrap();
    assert_eq!(
        (c.attention_window(0), c.attention_window(1)),
        (None, Some(16))
    );
    assert_eq!(c.window_of_every_layer(), None);
    // Mistral v0.1 loads at its full context; a backend without windowed attention (CUDA)
    // refuses it there and names the max_seq_len that fits.
    let mistral_v01 = json!({"sliding_window": 4096, "max_position_embeddings": 32768});
    let c = load(&minimal(Architecture::Mistral), &mistral_v01).unwrap();
    assert_eq!(c.window_of_every_layer(), Some(4096));
    let e = c.check_full_attention_covers("cuda", 32768).unwrap_err();
    assert!(
        e.contains("max_seq_len is 32768")
            && e.contains("--max_seq_len 4096")
            && e.contains("cuda"),
        "{e}"
    );
    assert!(
        c.check_full_attention_covers("cuda", 4096).is_ok(),
        "a window covering max_seq_len is a no-op"
    );
    // A window of 0 lets a query see nothing (transformers gives NaN): refused where it
    // applies, accepted where use_sliding_window turns it off (Qwen1.5-MoE's published config).
    for (arch, extra) in [
        (Architecture::Mistral, json!({"sliding_window": 0})),
        (
            Architecture::Qwen2,
            json!({"sliding_window": 0, "use_sliding_window": true, "max_window_layers": 0}),
        ),
    ] {
        let e = load(&minimal(arch), &extra).unwrap_err();
        assert!(e.contains("sliding_window 0"), "{e}");
    }
    let off = json!({"sliding_window": 0, "use_sliding_window": false});
    assert_eq!(window(Architecture::Qwen2Moe, off), None);
}

#[test]
fn attention_biases_follow_transformers() {
    let c = load(
        &minimal(Architecture::Qwen3),
        &json!({"attention_bias": true}),
    )
    .unwrap();
    assert!(
        c.qkv_bias && c.o_bias,
        "Qwen3 attention_bias biases o_proj too"
    );
    let c = load(
        &minimal(Architecture::Qwen2Moe),
        &json!({"qkv_bias": false}),
    )
    .unwrap();
    assert!(!c.qkv_bias && !c.o_bias);
    let c = load(
        &minimal(Architecture::Mistral),
        &json!({"attention_bias": true}),
    )
    .unwrap();
    assert!(
        !c.qkv_bias && !c.o_bias,
        "MistralConfig has no attention_bias"
    );
}

#[test]
fn keys_in_no_row_are_collected_for_the_load_log() {
    let c = load(
        &minimal(Architecture::Llama),
        &json!({"auto_map": {"AutoConfig": "x.Config"}, "use_fancy_attention": true}),
    )
    .unwrap();
    let mut keys = c.unknown_keys.clone();
    keys.sort();
    assert_eq!(keys, vec!["auto_map", "use_fancy_attention"]);
}

#[test]
fn docs_models_md_shows_the_table() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/models.md");
    let doc = std::fs::read_to_string(p).expect("docs/models.md exists");
    let mut rows = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == "## config.json keys";
            continue;
        }
        if inside && line.starts_with("| `") {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            rows.push((cells[0].trim_matches('`').to_owned(), cells[1].to_owned()));
        }
    }
    let want: Vec<(String, String)> = CONFIG_KEYS
        .iter()
        .map(|r| (r.key.to_owned(), r.treatment.as_str().to_owned()))
        .collect();
    assert_eq!(
        rows, want,
        "docs/models.md's `## config.json keys` table differs from CONFIG_KEYS (key, treatment, in order)"
    );
}
