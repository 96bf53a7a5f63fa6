//! The KV pool fits the machine: an engine on the golden `llama` fixture, sized against a fake
//! /proc and cgroup v2 tree, takes its share of the cgroup's limit after its weights and
//! workspaces, never more blocks than its batch can use, and refuses to start (naming the
//! fix) when the weights alone do not fit.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::fake_machine;

use std::path::{Path, PathBuf};

use llmapi_worker::backend::Backend;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::engine::{Engine, EngineConfig, EngineError, KvDtype};
use llmapi_worker::kv::host_memory::MemorySource;
use llmapi_worker::model::ModelWeights;

const MIB: u64 = 1 << 20;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama")
}

fn config(memory_source: MemorySource) -> EngineConfig {
    EngineConfig {
        max_batch_size: 1024,
        max_num_tokens: 256,
        max_seq_len: Some(256),
        tokens_per_block: 4,
        kv_dtype: KvDtype::Float32,
        kv_max_tokens: None,
        kv_memory_fraction: 0.5,
        threads: Some(1),
        memory_source,
        ..Default::default()
    }
}

/// (KV bytes per token, weights + workspaces) of the fixture under `cfg`.
fn footprint(cfg: &EngineConfig) -> (u64, u64) {
    let b = CpuBackend::new(
        ModelWeights::load(&model_dir()).unwrap(),
        cfg.kv_dtype,
        Some(1),
    )
    .unwrap();
    let f = b.host_footprint(cfg.max_num_tokens, cfg.max_batch_size);
    (b.kv_bytes_per_token() as u64, f.weights + f.workspace)
}

/// Bytes of the pool an engine under `cfg` gets.
fn pool_bytes(cfg: EngineConfig) -> u64 {
    let (per_token, _) = footprint(&cfg);
    let tpb = cfg.tokens_per_block as u64;
    let e = Engine::start(&model_dir(), cfg).unwrap();
    let blocks = e.info().kv_capacity_blocks;
    e.shutdown();
    blocks * tpb * per_token
}

#[test]
fn the_pool_takes_the_fraction_of_the_cgroup_limit_left_after_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(fake_machine(dir.path(), &(64 * MIB).to_string()));
    let (per_token, model) = footprint(&cfg);
    let want = (64 * MIB - model) / 2;
    let got = pool_bytes(cfg);
    assert!(
        got <= want && got + 5 * per_token > want,
        "pool {got} bytes; half of 64 MiB less the model's {model} is {want}"
    );
}

#[test]
fn two_replicas_on_the_node_split_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(fake_machine(dir.path(), &(64 * MIB).to_string()));
    cfg.replicas_on_node = 2;
    let (per_token, model) = footprint(&cfg);
    let want = (32 * MIB - model) / 2;
    let got = pool_bytes(cfg);
    assert!(
        got <= want && got + 5 * per_token > want,
        "pool {got} bytes; half of 32 MiB less the model's {model} is {want}"
    );
}

#[test]
fn without_a_limit_the_pool_stops_at_what_the_batch_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(fake_machine(dir.path(), "max"));
    cfg.max_batch_size = 3;
    cfg.max_seq_len = Some(30);
    let e = Engine::start(&model_dir(), cfg).unwrap();
    // 3 sequences x ceil(30 / 4) blocks, though 16 GiB would fit.
    assert_eq!(e.info().kv_capacity_blocks, 3 * 8);
    e.shutdown();
}

#[test]
fn a_limit_below_the_weights_fails_at_start_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(fake_machine(dir.path(), "100000"));
    let err = match Engine::start(&model_dir(), cfg) {
        Err(e) => e,
        Ok(_) => panic!("an engine whose weights exceed memory.max started"),
    };
    assert!(matches!(err, EngineError::InvalidConfig(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("weights take"), "{msg}");
    assert!(msg.contains("memory.max"), "{msg}");
}
