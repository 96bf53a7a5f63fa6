//! Cost of the prefix hash (a benchmark: prints figures, never fails on timing): nanoseconds
//! to hash one KV block with `prefix_block_hashes`, the function the router (kv_cache_aware)
//! and the worker's prefix cache both run on every prompt.
//!
//! Run: `cargo bench -p llmapi-common --bench block_hash`.

use std::hint::black_box;
use std::time::Instant;

use llmapi_common::block_hash::prefix_block_hashes;

/// Blocks hashed per repetition.
const BLOCKS: usize = 1024;

fn main() {
    println!("SHA-256 prefix hash, {BLOCKS} blocks per pass, best of 5 passes");
    for tokens_per_block in [16usize, 32, 64, 128] {
        let tokens: Vec<u32> = (0..(tokens_per_block * BLOCKS) as u32)
            .map(|i| i.wrapping_mul(7) + 1)
            .collect();
        let best = (0..5)
            .map(|_| {
                let start = Instant::now();
                black_box(prefix_block_hashes(black_box(&tokens), tokens_per_block));
                start.elapsed().as_nanos() as f64 / BLOCKS as f64
            })
            .fold(f64::INFINITY, f64::min);
        println!(
            "tokens_per_block {tokens_per_block:>3}: {best:>7.0} ns/block, {:>6.1} ns/token",
            best / tokens_per_block as f64
        );
    }
}
