//! Decode attention alone, on a bf16 KV pool larger than the L3: the library's decode
//! kernel (`decode_attention.rs`) against the kernel it replaced (kept below as `before`,
//! verbatim), alternated over rounds in one
//! process, best round each. Prints ms per step-equivalent (every layer's attention for
//! one decode step of the batch) by the wall clock and by on-CPU time, the K/V bytes read
//! per step and the GB/s against the read bandwidth measured at start. Also checks both
//! kernels against the tiled kernel on one step.
//!
//! Shape: the bench preset's attention (12 layers, 12 heads, 4 KV heads, head_dim 64,
//! tokens_per_block 32), 32 rows of 128 to 176 tokens (each row's length moves every step),
//! every layer's cache distinct (75 MB in all), so each layer's K/V comes from DRAM as in
//! the engine. Options: LLMAPI_BENCH_ROWS=32, LLMAPI_BENCH_STEPS=20, LLMAPI_BENCH_ROUNDS=5,
//! LLMAPI_BENCH_THREADS=N, LLMAPI_BENCH_SHUFFLE=1 (block tables scattered over the pool
//! instead of each sequence's blocks consecutive), LLMAPI_BENCH_LAYERS=1 (cycle that many
//! layers' caches instead of 12: 1 keeps the cache in L3, the kernels' arithmetic alone).
//! Run: `cargo bench -p llmapi-worker --bench attention`.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use llmapi_common::model_config::ModelConfig;
use llmapi_worker::backend::cpu::kv_store::{Kv, KvStore};
use llmapi_worker::backend::cpu::{attention, decode_attention};
use llmapi_worker::backend::{LogitsWanted, SeqChunk};
use llmapi_worker::engine::KvDtype;
use rayon::prelude::*;
use support::{loadavg, process_cpu_ns, read_bandwidth};

mod support;

const LAYERS: usize = 12;
const NQ: usize = 12;
const NKV: usize = 4;
const D: usize = 64;
const TPB: usize = 32;
const MIN_CTX: usize = 128;
const MAX_CTX: usize = 176;

type Attend =
    fn(&KvStore, usize, &[SeqChunk<'_>], &[(usize, usize)], &[f32], &ModelConfig, &mut [f32]);

fn env_num(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={s}: expected a number");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

fn main() {
    if !std::arch::is_x86_feature_detected!("avx512f")
        || !std::arch::is_x86_feature_detected!("avx512bw")
    {
        println!("decode attention needs avx512f and avx512bw; nothing to measure here");
        return;
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Ok(n) = std::env::var("LLMAPI_BENCH_THREADS") {
        builder = builder.num_threads(env_num("LLMAPI_BENCH_THREADS", 0).max(1));
        let _ = n;
    }
    let pool = builder.build().expect("pool");
    let threads = pool.current_num_threads();
    let rounds = env_num("LLMAPI_BENCH_ROUNDS", 5).max(1);
    let steps = env_num("LLMAPI_BENCH_STEPS", 20).max(1);
    let rows_n = env_num("LLMAPI_BENCH_ROWS", 32).max(1);
    let hot_layers = env_num("LLMAPI_BENCH_LAYERS", LAYERS).clamp(1, LAYERS);
    let shuffle = std::env::var("LLMAPI_BENCH_SHUFFLE").is_ok_and(|v| v == "1");
    let json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{},"head_dim":{D},
        "intermediate_size":64,"num_hidden_layers":{LAYERS},"num_attention_heads":{NQ},
        "num_key_value_heads":{NKV},"vocab_size":32,"rms_norm_eps":1e-5}}"#,
        NQ * D
    );
    let c = ModelConfig::from_json_str(&json, Path::new("bench")).expect("config");
    let per_seq = MAX_CTX.div_ceil(TPB);
    let nblocks = rows_n * per_seq;
    let mut kv = KvStore::new(KvDtype::Bf16, LAYERS, nblocks, NKV, TPB, D)
        .expect("allocate the bench's KV pool");
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    if shuffle {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..ids.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ids.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let tables: Vec<Vec<u32>> = ids.chunks(per_seq).map(|c| c.to_vec()).collect();
    let val = |i: usize| ((i.wrapping_mul(2_654_435_761) % 1000) as f32 / 250.0 - 2.0) * 0.5;
    let mut row = vec![0.0f32; D];
    for l in 0..LAYERS {
        for (s, t) in tables.iter().enumerate() {
            for p in 0..MAX_CTX {
                for g in 0..NKV {
                    for kvi in [Kv::K, Kv::V] {
                        for (e, r) in row.iter_mut().enumerate() {
                            let i = (((l * 64 + s) * 256 + p) * 8 + g * 2 + kvi as usize) * 67;
                            *r = val(i + e);
                        }
                        kv.write(l, kvi, t[p / TPB], p % TPB, g, &row);
                    }
                }
            }
        }
    }
    let qkv_w = (NQ + 2 * NKV) * D;
    let qkv: Vec<f32> = (0..rows_n * qkv_w).map(|i| val(i * 13 + 5)).collect();
    let tokens = [1u32];
    // Row r of step i has MIN_CTX + (7 r + i) % 49 tokens: 128 to 176, moving every step.
    let positions = |step: usize| -> Vec<(usize, usize)> {
        (0..rows_n)
            .map(|r| (r, MIN_CTX - 1 + (r * 7 + step) % (MAX_CTX - MIN_CTX + 1)))
            .collect()
    };
    let chunks = |rows: &[(usize, usize)]| -> Vec<SeqChunk<'_>> {
        rows.iter()
            .map(|&(s, p)| SeqChunk {
                tokens: &tokens,
                start_pos: p,
                block_table: &tables[s],
                logits: LogitsWanted::Last,
            })
            .collect()
    };
    let bw = read_bandwidth(&pool);
    println!(
        "bf16 KV pool {:.1} MB, {rows_n} rows of {MIN_CTX} to {MAX_CTX} tokens, {hot_layers} of \
         {LAYERS} layers' caches cycled, {NQ} heads / {NKV} KV heads, head_dim {D}, \
         {threads} threads, block tables {}",
        (LAYERS * 2 * nblocks * NKV * TPB * D * 2) as f64 / 1e6,
        if shuffle { "scattered" } else { "consecutive" }
    );
    println!("read bandwidth {bw:.1} GB/s; load average {}", loadavg());
    let kernels: [(&str, Attend); 2] = [
        ("before", before::attend as Attend),
        ("decode", decode_attention::attend as Attend),
    ];
    {
        let rows = positions(0);
        let batch = chunks(&rows);
        let mut want = vec![0.0f32; rows_n * NQ * D];
        pool.install(|| attention::attend_tiled(&kv, 3, &batch, &rows, &qkv, &c, &mut want));
        for (name, f) in &kernels {
            let mut got = vec![f32::NAN; rows_n * NQ * D];
            pool.install(|| f(&kv, 3, &batch, &rows, &qkv, &c, &mut got));
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
                .fold(
                    0.0f32,
                    |a, e| if e.is_nan() { f32::INFINITY } else { a.max(e) },
                );
            println!("{name}: largest |difference| / (1 + |tiled|) {err:.1e}");
            if err > 1e-5 {
                eprintln!("{name} disagrees with the tiled kernel");
                std::process::exit(1);
            }
        }
    }
    let mut best = [(f64::MAX, f64::MAX); 2];
    let mut out = vec![0.0f32; rows_n * NQ * D];
    let mut bytes = [0.0f64; 2];
    let mut step = 0;
    for _ in 0..rounds {
        for (ki, (_, f)) in kernels.iter().enumerate() {
            let mut read = 0usize;
            let cpu0 = process_cpu_ns();
            let t = Instant::now();
            for _ in 0..steps {
                let rows = positions(step);
                step += 1;
                read += rows.iter().map(|r| (r.1 + 1) * NKV * D * 4).sum::<usize>() * LAYERS;
                let batch = chunks(&rows);
                pool.install(|| {
                    for l in 0..LAYERS {
                        f(&kv, l % hot_layers, &batch, &rows, &qkv, &c, &mut out);
                    }
                });
            }
            let wall = t.elapsed().as_secs_f64() / steps as f64;
            let cpu = match (cpu0, process_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 / 1e9 / threads as f64 / steps as f64,
                _ => f64::NAN,
            };
            best[ki].0 = best[ki].0.min(wall);
            best[ki].1 = best[ki].1.min(cpu);
            bytes[ki] = read as f64 / steps as f64;
        }
    }
    let per_step = bytes[1];
    println!(
        "K/V read per step {:.1} MB: {:.2} ms at {bw:.1} GB/s",
        per_step / 1e6,
        per_step / bw / 1e6
    );
    println!("| kernel | ms/step (wall) | ms/step (on-CPU) | GB/s (on-CPU) | of read bandwidth |");
    println!("|---|---|---|---|---|");
    for ((name, _), (w, cpu)) in kernels.iter().zip(&best) {
        let gbs = per_step / cpu / 1e9;
        println!(
            "| {name} | {:.3} | {:.3} | {gbs:.1} | {:.0}% |",
            w * 1e3,
            cpu * 1e3,
            gbs / bw * 100.0
        );
    }
    println!(
        "decode / before: {:.2}x by on-CPU time, {:.2}x by the wall clock; load average {}",
        best[0].1 / best[1].1,
        best[0].0 / best[1].0,
        loadavg()
    );
    if let Ok(m) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        for l in m.lines().filter(|l| l.starts_with("AnonHugePages")) {
            println!("{l} (transparent huge pages, KV pool included)");
        }
    }
}

/// The decode kernel before this harness's work (git 4367b2b), for comparison.
#[allow(clippy::all)]
mod before {
    use super::*;
    use llmapi_worker::backend::cpu::vmath::softmax16;

    /// Queries per pass over the keys (four keys each: 16 accumulators).
    const QC: usize = 4;
    /// Queries per pass over the values (four registers each for a 64-wide slab).
    const QV: usize = 6;

    thread_local! {
        /// Per-thread scratch: permuted queries, scores, permuted outputs.
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Lane position of element `e` of a head vector after widening (see the module header).
    fn lane_of(e: usize) -> usize {
        let (b, w) = (e / 32 * 32, e % 32);
        let (lane, i) = (w / 8, w % 8);
        if i < 4 {
            b + 4 * lane + i
        } else {
            b + 16 + 4 * lane + i - 4
        }
    }

    /// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's
    /// sequence, for steps where [`applies`] holds. Same contract as `attention::attend`.
    pub fn attend(
        kv: &KvStore,
        layer: usize,
        batch: &[SeqChunk<'_>],
        rows: &[(usize, usize)],
        qkv: &[f32],
        c: &ModelConfig,
        out: &mut [f32],
    ) {
        let (nq, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let group = nq / nkv;
        let qkv_w = (nq + 2 * nkv) * d;
        let tpb = kv.tokens_per_block();
        let scale = 1.0 / (d as f32).sqrt();
        out[..rows.len() * nq * d]
            .par_chunks_mut(group * d)
            .enumerate()
            .for_each(|(t, o)| {
                let (r, g) = (t / nkv, t % nkv);
                let (chunk, pos) = rows[r];
                let table = batch[chunk].block_table;
                let q = &qkv[r * qkv_w + g * group * d..r * qkv_w + (g + 1) * group * d];
                let len = pos + 1;
                let nblocks = len.div_ceil(tpb);
                // Rows that fail here were checked by the step (block table long enough); an
                // empty slice only happens for a pool that is not bf16, excluded by `applies`.
                let blocks: Vec<(&[u16], &[u16])> = table[..nblocks]
                    .iter()
                    .map(|&b| {
                        let k = kv.bf16_rows(layer, Kv::K, b, g).unwrap_or_default();
                        let v = kv.bf16_rows(layer, Kv::V, b, g).unwrap_or_default();
                        (k, v)
                    })
                    .collect();
                SCRATCH.with(|cell| {
                    let mut s = cell.borrow_mut();
                    let need = 2 * group * d + group * len;
                    if s.len() < need {
                        s.resize(need, 0.0);
                    }
                    let (qp, rest) = s.split_at_mut(group * d);
                    let (op, scores) = rest.split_at_mut(group * d);
                    for (i, &v) in q.iter().enumerate() {
                        qp[i / d * d + lane_of(i % d)] = v;
                    }
                    // SAFETY: `applies` checked avx512f and avx512bw; every block slice holds
                    // tpb * d elements, len <= nblocks * tpb, d is a multiple of 64, and the
                    // scratch slices hold group * d and group * len floats.
                    unsafe {
                        head(
                            &blocks,
                            len,
                            tpb,
                            d,
                            group,
                            scale,
                            qp,
                            &mut scores[..group * len],
                            op,
                        )
                    };
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = op[i / d * d + lane_of(i % d)];
                    }
                });
            });
    }

    /// Widens 32 bf16 at `p` into two vectors in the module's lane order.
    #[inline(always)]
    unsafe fn widen32(p: *const u16) -> (__m512, __m512) {
        // SAFETY: the caller guarantees 32 readable elements at p and the CPU features.
        unsafe {
            let x = _mm512_loadu_si512(p as *const __m512i);
            let z = _mm512_setzero_si512();
            (
                _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, x)),
                _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, x)),
            )
        }
    }

    /// Sums of four vectors, as four lanes.
    #[inline(always)]
    unsafe fn sum4(a: [__m512; 4]) -> __m128 {
        // SAFETY: register-only arithmetic; the caller guarantees the CPU features.
        unsafe {
            let f0 = fold(a[0]);
            let f1 = fold(a[1]);
            let f2 = fold(a[2]);
            let f3 = fold(a[3]);
            let h = _mm256_hadd_ps(_mm256_hadd_ps(f0, f1), _mm256_hadd_ps(f2, f3));
            _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
        }
    }

    /// The upper 256 bits added onto the lower ones.
    #[inline(always)]
    unsafe fn fold(v: __m512) -> __m256 {
        // SAFETY: register-only arithmetic; the caller guarantees the CPU features.
        unsafe {
            _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
            )
        }
    }

    /// Prefetches `elems` bf16 elements at `p` into L1, one line at a time.
    #[inline(always)]
    fn prefetch(p: *const u16, elems: usize) {
        let mut off = 0;
        while off < elems {
            // SAFETY: prefetching is a hint and never faults; the address stays inside the block.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
            off += 32;
        }
    }

    /// One (row, KV head): scores, softmax and the weighted values of `group` queries.
    ///
    /// # Safety
    /// avx512f and avx512bw; every block slice holds `tpb * d` bf16, `len <= blocks.len() * tpb`,
    /// `d % 64 == 0`, `qp` and `op` hold `group * d` and `scores` `group * len` floats.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn head(
        blocks: &[(&[u16], &[u16])],
        len: usize,
        tpb: usize,
        d: usize,
        group: usize,
        scale: f32,
        qp: &[f32],
        scores: &mut [f32],
        op: &mut [f32],
    ) {
        assert!(
            d.is_multiple_of(64)
                && len <= blocks.len() * tpb
                && qp.len() >= group * d
                && op.len() >= group * d
                && scores.len() >= group * len
                && blocks
                    .iter()
                    .all(|(k, v)| k.len() >= tpb * d && v.len() >= tpb * d),
            "decode attention bounds"
        );
        // Scores: four keys by up to QC queries at a time.
        for (bi, (kb, vb)) in blocks.iter().enumerate() {
            if let Some((next, _)) = blocks.get(bi + 1) {
                prefetch(next.as_ptr(), tpb * d);
            }
            prefetch(vb.as_ptr(), tpb * d);
            let n = (len - bi * tpb).min(tpb);
            for s0 in (0..n).step_by(4) {
                let key = |j: usize| kb.as_ptr().wrapping_add((s0 + j).min(n - 1) * d);
                for q0 in (0..group).step_by(QC) {
                    let nq = (group - q0).min(QC);
                    let mut acc = [[_mm512_setzero_ps(); 4]; QC];
                    for c in (0..d).step_by(32) {
                        // SAFETY: keys s0 + j are clamped below n <= tpb, c + 32 <= d.
                        let ks = unsafe {
                            [
                                widen32(key(0).add(c)),
                                widen32(key(1).add(c)),
                                widen32(key(2).add(c)),
                                widen32(key(3).add(c)),
                            ]
                        };
                        for (qi, a) in acc.iter_mut().enumerate().take(nq) {
                            // SAFETY: query q0 + qi < group, c + 32 <= d, inside qp.
                            let (x0, x1) = unsafe {
                                let p = qp.as_ptr().add((q0 + qi) * d + c);
                                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                            };
                            for (aj, kj) in a.iter_mut().zip(&ks) {
                                *aj = _mm512_fmadd_ps(x1, kj.1, _mm512_fmadd_ps(x0, kj.0, *aj));
                            }
                        }
                    }
                    for (qi, a) in acc.iter().enumerate().take(nq) {
                        let mut four = [0.0f32; 4];
                        // SAFETY: four has room for 4 floats.
                        unsafe { _mm_storeu_ps(four.as_mut_ptr(), sum4(*a)) };
                        let base = (q0 + qi) * len + bi * tpb + s0;
                        for (j, v) in four.iter().enumerate().take(n - s0) {
                            scores[base + j] = v * scale;
                        }
                    }
                }
            }
        }
        for qi in 0..group {
            softmax16(&mut scores[qi * len..(qi + 1) * len]);
        }
        // Values: 64-wide slabs of the output in registers, up to QV queries at a time.
        for slab in (0..d).step_by(64) {
            for q0 in (0..group).step_by(QV) {
                let nq = (group - q0).min(QV);
                let mut acc = [[_mm512_setzero_ps(); 4]; QV];
                for (bi, (_, vb)) in blocks.iter().enumerate() {
                    let n = (len - bi * tpb).min(tpb);
                    for s in 0..n {
                        // SAFETY: s < n <= tpb and slab + 64 <= d: inside the block.
                        let (v0, v1, v2, v3) = unsafe {
                            let p = vb.as_ptr().add(s * d + slab);
                            let (a, b) = widen32(p);
                            let (c, e) = widen32(p.add(32));
                            (a, b, c, e)
                        };
                        for (qi, a) in acc.iter_mut().enumerate().take(nq) {
                            let w = _mm512_set1_ps(scores[(q0 + qi) * len + bi * tpb + s]);
                            a[0] = _mm512_fmadd_ps(w, v0, a[0]);
                            a[1] = _mm512_fmadd_ps(w, v1, a[1]);
                            a[2] = _mm512_fmadd_ps(w, v2, a[2]);
                            a[3] = _mm512_fmadd_ps(w, v3, a[3]);
                        }
                    }
                }
                for (qi, a) in acc.iter().enumerate().take(nq) {
                    for (j, v) in a.iter().enumerate() {
                        // SAFETY: (q0 + qi) * d + slab + 16 j + 16 <= group * d.
                        unsafe {
                            _mm512_storeu_ps(op.as_mut_ptr().add((q0 + qi) * d + slab + 16 * j), *v)
                        };
                    }
                }
            }
        }
    }
}
