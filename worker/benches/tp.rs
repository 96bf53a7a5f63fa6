//! Decode throughput of one replica split over TP ranks vs one rank, on the "bench" preset
//! (Llama-3 style, 124M parameters, bf16 checkpoint) through the CPU backend.
//!
//! Every rank is a thread of this process with its own compute pool (the machine's cores
//! divided evenly between the ranks) and its shard loaded from the checkpoint; TP ranks talk
//! over the real TCP ring on loopback. Prints decode tok/s at batch 1 and 8 (128-token
//! contexts) for each TP size and the ratio to TP=1. The checkpoint is written to a temp dir
//! unless LLMAPI_BENCH_MODEL names one; LLMAPI_BENCH_TP=1,2 picks the sizes (default 1,2).
//! Run: `cargo bench -p llmapi-worker --bench tp`.

mod support;

use support::{chunk, run};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmapi_common::checkpoint::{Preset, write_checkpoint};
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::{Backend, SeqChunk};
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::dist::{Communicator, SingleRank};
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::{ModelWeights, Shard};

const TPB: usize = 32;
const CTX: usize = 128;

/// Decode tok/s at `batch` after a CTX-token prefill per sequence (rank 0's clock; every
/// rank runs the same steps in lockstep).
fn decode(be: &mut CpuBackend, batch: usize, steps: usize, first_block: u32) -> f64 {
    let per_seq = (CTX + steps).div_ceil(TPB) as u32;
    let tables: Vec<Vec<u32>> = (0..batch as u32)
        .map(|s| (first_block + s * per_seq..first_block + (s + 1) * per_seq).collect())
        .collect();
    let prompt: Vec<u32> = (0..CTX as u32).map(|i| (i * 7 + 1) % 32000).collect();
    let setup: Vec<SeqChunk<'_>> = tables.iter().map(|t| chunk(&prompt, 0, t)).collect();
    run(be, &setup);
    let toks: Vec<[u32; 1]> = (0..batch).map(|s| [s as u32 + 5]).collect();
    let t = Instant::now();
    for step in 0..steps {
        let chunks: Vec<SeqChunk<'_>> = (0..batch)
            .map(|s| chunk(&toks[s], CTX + step, &tables[s]))
            .collect();
        run(be, &chunks);
    }
    (batch * steps) as f64 / t.elapsed().as_secs_f64()
}

/// (batch 1, batch 8) tok/s of a group of `tp` ranks.
fn measure(dir: &Path, tp: usize, cores: usize) -> (f64, f64) {
    let port =
        llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).expect("a free port");
    let threads = (cores / tp).max(1);
    let results: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..tp)
            .map(|rank| {
                s.spawn(move || {
                    let comm: Box<dyn Communicator> = if tp == 1 {
                        Box::new(SingleRank)
                    } else {
                        Box::new(
                            TcpRing::join(&RingConfig {
                                rank,
                                world_size: tp,
                                group: 0,
                                rendezvous: format!("127.0.0.1:{port}"),
                                bind: std::net::Ipv4Addr::LOCALHOST.into(),
                                token: "tp-bench".into(),
                                join_timeout: Duration::from_secs(120),
                                op_timeout: Duration::from_secs(120),
                            })
                            .expect("the ring forms"),
                        )
                    };
                    let shard = Shard::new(rank, tp, tp).expect("shard");
                    let w = ModelWeights::load_shard(dir, shard).expect("the checkpoint loads");
                    let mut be = CpuBackend::new_sharded(w, comm, KvDtype::Bf16, Some(threads))
                        .expect("backend starts");
                    be.init_kv(512, TPB).expect("kv allocates");
                    let b1 = decode(&mut be, 1, 64, 0);
                    let b8 = decode(&mut be, 8, 16, 16);
                    (b1, b8)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    results[0]
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sizes: Vec<usize> = std::env::var("LLMAPI_BENCH_TP")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let tmp;
    let dir: PathBuf = match std::env::var("LLMAPI_BENCH_MODEL") {
        Ok(d) => PathBuf::from(d),
        Err(_) => {
            tmp = tempfile::tempdir().expect("temp dir");
            let preset = Preset::by_name("bench").expect("the bench preset exists");
            write_checkpoint(&preset, tmp.path(), &mut |_, _| {}).expect("checkpoint written");
            tmp.path().to_path_buf()
        }
    };
    println!("cores: {cores}; each rank gets cores / tp compute threads");
    let mut rows = Vec::new();
    for &tp in &sizes {
        let (b1, b8) = measure(&dir, tp, cores);
        println!("tp {tp}: decode batch 1 {b1:.1} tok/s, batch 8 {b8:.1} tok/s");
        rows.push((tp, b1, b8));
    }
    let base = rows.iter().find(|r| r.0 == 1).map(|r| (r.1, r.2));
    println!();
    println!(
        "| tp | threads per rank | batch 1 tok/s | batch 8 tok/s | batch 1 vs tp 1 | batch 8 vs tp 1 |"
    );
    println!("|---|---|---|---|---|---|");
    for (tp, b1, b8) in rows {
        let (r1, r8) = base.map_or(("-".into(), "-".into()), |(x, y)| {
            (format!("{:.2}x", b1 / x), format!("{:.2}x", b8 / y))
        });
        println!(
            "| {tp} | {} | {b1:.1} | {b8:.1} | {r1} | {r8} |",
            (cores / tp).max(1)
        );
    }
}
