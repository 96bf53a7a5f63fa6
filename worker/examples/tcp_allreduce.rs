//! TCP ring all-reduce bandwidth on loopback against message size.
//!
//! `cargo run --release -p llmapi-worker --example tcp_allreduce [-- WORLD]` prints, per
//! message size, the time of one all-reduce and the bus bandwidth 2 (n-1)/n * bytes / time
//! (the figure NCCL's tests report), with every rank a thread of this process.

use std::time::{Duration, Instant};

use llmapi_worker::dist::Communicator;
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let world: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    println!("TCP ring all-reduce, {world} ranks on loopback (f32 sum)");
    println!(
        "{:>12} {:>10} {:>12} {:>14}",
        "bytes", "iters", "time (us)", "busbw (GB/s)"
    );
    let sizes: Vec<usize> = (10..=26).step_by(2).map(|p| 1usize << p).collect();
    let rows = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let sizes = sizes.clone();
                s.spawn(move || -> Result<Vec<(usize, usize, f64)>, String> {
                    let cfg = RingConfig {
                        rank,
                        world_size: world,
                        rendezvous: format!("127.0.0.1:{port}"),
                        token: "bench".into(),
                        join_timeout: Duration::from_secs(30),
                        op_timeout: Duration::from_secs(30),
                    };
                    let mut ring = TcpRing::join(&cfg).map_err(|e| e.to_string())?;
                    let mut out = Vec::new();
                    for &bytes in &sizes {
                        let mut buf = vec![1.0f32; bytes / 4];
                        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                        // Same iteration count on every rank: derived from the size only.
                        let iters = (64 << 20) / bytes.max(1 << 16) + 5;
                        ring.barrier().map_err(|e| e.to_string())?;
                        let t = Instant::now();
                        for _ in 0..iters {
                            ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                        }
                        out.push((bytes, iters, t.elapsed().as_secs_f64() / iters as f64));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "rank thread panicked".to_string())?)
            .collect::<Result<Vec<_>, String>>()
    })?;
    for (bytes, iters, secs) in &rows[0] {
        let busbw = 2.0 * (world as f64 - 1.0) / world as f64 * *bytes as f64 / secs / 1e9;
        println!("{bytes:>12} {iters:>10} {:>12.1} {busbw:>14.2}", secs * 1e6);
    }
    Ok(())
}
