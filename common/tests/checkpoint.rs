//! The built-in checkpoints load back as Hugging Face model directories.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_common::checkpoint::{BOS, EOT, Preset, write_checkpoint};
use llmapi_common::model_dir::ModelDir;

const UNICODE: &str =
    "Grüße aus München! 大型语言模型 🚀✨ naïve café — こんにちは, Привет.\n\ttabs  and  spaces";

fn write(preset: &str) -> (tempfile::TempDir, Preset) {
    let d = tempfile::tempdir().unwrap();
    let p = Preset::by_name(preset).unwrap();
    let mut calls = 0;
    write_checkpoint(&p, d.path(), &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0, "progress is reported");
    (d, p)
}

fn check_loads_back(preset: &str) {
    let (d, p) = write(preset);
    let m = ModelDir::open(d.path()).unwrap();
    assert_eq!(m.architecture, "LlamaForCausalLM");
    assert_eq!(m.max_position_embeddings, Some(p.max_position_embeddings));
    assert_eq!(m.config["vocab_size"], p.vocab_size);
    assert_eq!(m.config["num_key_value_heads"], p.num_key_value_heads);
    assert!(m.tokenizer_config.chat_template.is_some());

    let tok = m.tokenizer().unwrap();
    assert_eq!(tok.vocab_size(), p.tokenizer_vocab_size);
    let ids = tok.encode(UNICODE, false).unwrap();
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        UNICODE,
        "byte-level round trip"
    );
    let with_bos = tok.encode("hello", true).unwrap();
    assert_eq!(
        Some(with_bos[0]),
        tok.token_to_id(BOS),
        "BOS added by the post-processor"
    );
    let eot = tok.token_to_id(EOT).unwrap();
    assert!(m.eos_token_ids.contains(&eot), "EOS ids include <|eot_id|>");
    assert_eq!(tok.eos().map(|(_, id)| id), Some(eot));

    let bytes = std::fs::read(d.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let expected = p.tensors();
    assert_eq!(st.len(), expected.len());
    for (name, shape) in expected {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    let emb = st.tensor("model.embed_tokens.weight").unwrap();
    let vals: Vec<half::bf16> = bytemuck::pod_collect_to_vec(emb.data());
    let n = vals.len() as f64;
    let var = vals.iter().map(|v| (v.to_f64()).powi(2)).sum::<f64>() / n;
    assert!(
        (var.sqrt() - p.init_std as f64).abs() < 0.002,
        "std {}",
        var.sqrt()
    );
}

#[test]
fn demo_preset_writes_a_loadable_model() {
    check_loads_back("demo");
}

#[test]
fn bench_preset_writes_the_124m_llama3_shape() {
    let p = Preset::by_name("bench").unwrap();
    assert_eq!(
        (
            p.hidden_size,
            p.num_hidden_layers,
            p.num_attention_heads,
            p.num_key_value_heads
        ),
        (768, 12, 12, 4)
    );
    assert_eq!((p.intermediate_size, p.vocab_size), (2048, 32_000));
    let params = p.parameters();
    assert!((124_000_000..125_500_000).contains(&params), "{params}");
    check_loads_back("bench");
}

#[test]
fn checkpoints_are_deterministic() {
    let (a, _) = write("demo");
    let (b, _) = write("demo");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f} differs between two writes"
        );
    }
}

#[test]
fn demo_chat_template_renders_with_the_tokenizer_special_tokens() {
    let (d, _) = write("demo");
    let m = ModelDir::open(d.path()).unwrap();
    let tc = &m.tokenizer_config;
    let t = llmapi_common::chat_template::ChatTemplate::new(
        tc.chat_template.as_deref().unwrap(),
        tc.bos_token.as_deref().unwrap(),
        tc.eos_token.as_deref().unwrap(),
    )
    .unwrap();
    let text = t
        .render(
            &serde_json::json!([{"role": "user", "content": "Hi"}]),
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let tok = m.tokenizer().unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(
        ids[0],
        tok.token_to_id(BOS).unwrap(),
        "special tokens are single ids"
    );
}
