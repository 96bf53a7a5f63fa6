use super::meta::SUPPORTED;
use super::write::{RawTensor, write_gguf};
use super::*;

fn s(v: &str) -> MetaValue {
    MetaValue::Str(v.into())
}

fn u(v: u64) -> MetaValue {
    MetaValue::U64(v)
}

/// A llama-shaped file with a byte-level BPE vocabulary of `a`, `b`, `ab` and two control
/// tokens, and an F32 embedding of 5 x 4; `output.weight` only when `untied`.
pub(crate) fn tiny_llama(dir: &Path, untied: bool) -> PathBuf {
    let path = dir.join("tiny.Q8_0.gguf");
    let strs = |v: &[&str]| MetaValue::Array(v.iter().map(|t| s(t)).collect());
    let meta = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("Tiny")),
        ("general.alignment", u(64)),
        ("llama.block_count", u(1)),
        ("llama.context_length", u(256)),
        ("llama.embedding_length", u(4)),
        ("llama.feed_forward_length", u(8)),
        ("llama.attention.head_count", u(2)),
        ("llama.attention.head_count_kv", u(1)),
        ("llama.rope.freq_base", MetaValue::F64(100000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F64(1e-5),
        ),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            strs(&["<|endoftext|>", "<|im_end|>", "a", "b", "ab"]),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array([3, 3, 1, 1, 1].map(MetaValue::I64).to_vec()),
        ),
        ("tokenizer.ggml.merges", strs(&["a b"])),
        ("tokenizer.ggml.bos_token_id", u(0)),
        ("tokenizer.ggml.eos_token_id", u(0)),
        ("tokenizer.ggml.eot_token_id", u(1)),
        ("tokenizer.chat_template", s("{{ messages[0]['content'] }}")),
    ];
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors = vec![RawTensor {
        name: "token_embd.weight".into(),
        dims: vec![4, 5],
        ggml_type: 0,
        data: f32s(&(0..20).map(|i| i as f32).collect::<Vec<_>>()),
    }];
    if untied {
        tensors.push(RawTensor {
            name: "output.weight".into(),
            dims: vec![4, 5],
            ggml_type: 0,
            data: f32s(&[0.5; 20]),
        });
    }
    write_gguf(&path, &meta, &tensors).unwrap();
    path
}

#[test]
fn reader_returns_metadata_tensors_and_aligned_data() {
    let d = tempfile::tempdir().unwrap();
    let path = tiny_llama(d.path(), true);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("llama.block_count"), Some(&MetaValue::U64(1)));
    assert_eq!(f.token_text(4), Some("ab"));
    let out = f.tensor("output.weight").unwrap();
    assert_eq!(out.shape(), vec![5, 4]);
    // The second tensor starts on the file's 64-byte alignment, not the default 32.
    assert_eq!(out.offset, 128);
    let bytes = f.tensor_bytes(out, 80).unwrap();
    assert_eq!(&bytes[..4], &0.5f32.to_le_bytes());
    let embd = f.tensor("token_embd.weight").unwrap();
    let bytes = f.tensor_bytes(embd, 80).unwrap();
    assert_eq!(&bytes[76..80], &19.0f32.to_le_bytes());
}

#[test]
fn every_value_type_is_read() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("t.gguf");
    // Hand-written: the writer emits u32/i32/f32 only, the format has twelve scalar types.
    let mut b = b"GGUF".to_vec();
    b.extend(2u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let values: Vec<(u32, Vec<u8>, MetaValue)> = vec![
        (0, vec![200], MetaValue::U64(200)),
        (1, vec![0xff], MetaValue::I64(-1)),
        (2, 65535u16.to_le_bytes().to_vec(), MetaValue::U64(65535)),
        (3, (-2i16).to_le_bytes().to_vec(), MetaValue::I64(-2)),
        (4, 7u32.to_le_bytes().to_vec(), MetaValue::U64(7)),
        (5, (-7i32).to_le_bytes().to_vec(), MetaValue::I64(-7)),
        (6, 0.5f32.to_le_bytes().to_vec(), MetaValue::F64(0.5)),
        (7, vec![1], MetaValue::Bool(true)),
        (
            10,
            u64::MAX.to_le_bytes().to_vec(),
            MetaValue::U64(u64::MAX),
        ),
        (
            11,
            i64::MIN.to_le_bytes().to_vec(),
            MetaValue::I64(i64::MIN),
        ),
        (12, 0.25f64.to_le_bytes().to_vec(), MetaValue::F64(0.25)),
    ];
    b.extend((values.len() as u64 + 1).to_le_bytes());
    for (i, (ty, bytes, _)) in values.iter().enumerate() {
        let key = format!("k{i}");
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(bytes);
    }
    // An array of arrays of u8.
    b.extend(3u64.to_le_bytes());
    b.extend(b"arr");
    b.extend(9u32.to_le_bytes());
    b.extend(9u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend([4, 5]);
    std::fs::write(&path, &b).unwrap();
    let f = GgufFile::open(&path).unwrap();
    for (i, (_, _, want)) in values.iter().enumerate() {
        assert_eq!(f.get(&format!("k{i}")), Some(want), "value type of k{i}");
    }
    assert_eq!(
        f.get("arr"),
        Some(&MetaValue::Array(vec![MetaValue::Array(vec![u(4), u(5)])]))
    );
}

#[test]
fn bad_files_get_errors_that_say_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("bad.gguf");
    std::fs::write(&path, b"GGML\x01\0\0\0").unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("magic"), "{e}");
    std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("version 1"), "{e}");
    // A header cut short inside the tensor count.
    std::fs::write(&path, b"GGUF\x03\0\0\0\x01\0").unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("ends early"), "{e}");
}

#[test]
fn locate_finds_a_file_or_the_only_gguf_of_a_directory() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(locate(d.path()).unwrap(), None);
    let path = tiny_llama(d.path(), false);
    assert_eq!(locate(&path).unwrap(), Some(path.clone()));
    assert_eq!(locate(d.path()).unwrap(), Some(path.clone()));
    std::fs::write(d.path().join("other.gguf"), b"").unwrap();
    let e = locate(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("2 .gguf files") && e.contains("other.gguf"),
        "{e}"
    );
    // A Hugging Face directory is never taken for a GGUF one.
    std::fs::write(d.path().join("config.json"), b"{}").unwrap();
    assert_eq!(locate(d.path()).unwrap(), None);
}

#[test]
fn llama_metadata_becomes_a_config_the_engine_reads() {
    let d = tempfile::tempdir().unwrap();
    let f = GgufFile::open(&tiny_llama(d.path(), false)).unwrap();
    let c = crate::model_config::ModelConfig::from_json_str(
        &f.hf_config().unwrap().to_string(),
        &f.path,
    )
    .unwrap();
    assert_eq!(c.architecture.hf_name(), "LlamaForCausalLM");
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (4, 8, 1)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (2, 1, 2)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (5, 256));
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert!(c.tie_word_embeddings, "no output.weight: tied");
    assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
    assert_eq!(f.stop_token_ids(), vec![0, 1]);
    assert_eq!(f.model_name(), "tiny.Q8_0");
    let untied = GgufFile::open(&tiny_llama(d.path(), true)).unwrap();
    assert_eq!(untied.hf_config().unwrap()["tie_word_embeddings"], false);
}

#[test]
fn unsupported_architectures_are_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("x.gguf");
    write_gguf(&path, &[("general.architecture", s("phi3"))], &[]).unwrap();
    let e = GgufFile::open(&path)
        .unwrap()
        .hf_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("'phi3'"), "{e}");
    for (arch, _) in SUPPORTED {
        assert!(e.contains(arch), "{e}");
    }
}

#[test]
fn gpt2_vocabulary_becomes_a_byte_level_bpe_with_control_tokens() {
    let d = tempfile::tempdir().unwrap();
    let f = GgufFile::open(&tiny_llama(d.path(), false)).unwrap();
    let t = f.tokenizer().unwrap();
    let ids = t.encode("ab<|im_end|>a", false).unwrap();
    assert_eq!(ids.get_ids(), &[4, 1, 2]);
    assert_eq!(t.decode(&[4, 1, 2], true).unwrap(), "aba");
    assert_eq!(t.decode(&[4, 1], false).unwrap(), "ab<|im_end|>");
}

#[test]
fn sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("spm.gguf");
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x21>",
        "\u{2581}",
        "h",
        "i",
        "hi",
        "\u{2581}hi",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -0.1];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1];
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", s("llama")),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                MetaValue::Array(scores.iter().map(|&x| MetaValue::F64(x)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                MetaValue::Array(types.iter().map(|&x| MetaValue::I64(x)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", u(1)),
            ("tokenizer.ggml.eos_token_id", u(2)),
            ("tokenizer.ggml.unknown_token_id", u(0)),
        ],
        &[],
    )
    .unwrap();
    let t = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    // BOS added (llama's default), a space prefix, "▁hi" merged, "!" by byte fallback.
    let ids = t.encode("hi!", true).unwrap();
    assert_eq!(ids.get_ids(), &[1, 8, 3]);
    assert_eq!(t.decode(&[8, 3, 8], true).unwrap(), "hi! hi");
}
