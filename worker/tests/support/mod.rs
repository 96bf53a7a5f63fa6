//! Helpers shared by the worker's integration tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use llmapi_worker::backend::{Backend, BackendError, LogitsWanted, SeqChunk};
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tests/golden of this checkout, or $LLMAPI_GOLDEN_DIR (a prebuilt test binary run from
/// another copy of the repository, as scripts/gpu_check.sh does).
pub fn golden_root() -> PathBuf {
    match std::env::var_os("LLMAPI_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"),
    }
}

/// One golden fixture's directory.
pub fn case(name: &str) -> PathBuf {
    golden_root().join(name)
}

/// Prefills `prompt` as a fresh sequence from position 0 whose block table has room for
/// `room` more tokens (blocks numbered from 0), returning the logits `wanted`.
pub fn prefill(
    be: &mut dyn Backend,
    prompt: &[u32],
    tokens_per_block: usize,
    room: usize,
    wanted: LogitsWanted,
) -> Result<Vec<f32>, BackendError> {
    let blocks = (prompt.len() + room).div_ceil(tokens_per_block) as u32;
    let table: Vec<u32> = (0..blocks).collect();
    let mut out = be.forward(&[SeqChunk {
        tokens: prompt,
        start_pos: 0,
        block_table: &table,
        logits: wanted,
    }])?;
    Ok(out.remove(0))
}

/// Runs `world` ranks as scoped threads that meet over a TCP ring on loopback (collectives
/// time out after `timeout`), each calling `rank_fn(rank, ring)`; every rank's result in rank
/// order.
pub fn ring_ranks<T: Send>(
    world: usize,
    token: &str,
    timeout: std::time::Duration,
    rank_fn: impl Fn(usize, TcpRing) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    let rank_fn = &rank_fn;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let ring = TcpRing::join(&RingConfig {
                        rank,
                        world_size: world,
                        group: 0,
                        rendezvous: format!("127.0.0.1:{port}"),
                        bind: std::net::Ipv4Addr::LOCALHOST.into(),
                        token: token.into(),
                        join_timeout: timeout,
                        op_timeout: timeout,
                    })
                    .unwrap();
                    rank_fn(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
