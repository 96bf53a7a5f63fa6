//! How large the KV pool is: the memory budget of one replica, line by line.
//!
//! Host memory (the CPU backend): the free memory this replica's node had before it loaded
//! its weights (the smaller of `MemAvailable` and the cgroup's headroom) is split evenly
//! between the node's replicas (as the launcher splits its cores); this replica's weights and
//! step workspaces come out of its share first, and `kv_cache_config.free_gpu_memory_fraction`
//! of the rest, trtllm-serve's "fraction of free memory after the model is loaded", is the
//! pool's budget. Device memory (the CUDA backend) reports what is free after its weights and
//! workspaces itself; the fraction applies to that. Either way the pool never holds more
//! blocks than `max_batch_size` sequences of `max_seq_len` tokens can use at once, unless
//! `kv_cache_config.max_tokens` asks for a size explicitly (then the smaller of it and the
//! memory budget wins).
//!
//! Pure arithmetic over plain numbers: the engine gathers them, this module decides and
//! explains. Not for: reading /proc (`host_memory`) or touching the pool (`commit`).

use super::host_memory::HostMemory;

/// Memory the KV pool may draw from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryPool {
    /// Host memory, shared by `replicas` replicas (or tensor-parallel ranks) on this node.
    Host {
        /// Facts read before this replica loaded its weights.
        before_load: HostMemory,
        /// Facts read after it loaded them, just before sizing.
        now: HostMemory,
        /// Replicas on this node that split its memory.
        replicas: usize,
        /// Bytes of this replica's weights (already loaded).
        weights: u64,
        /// Bytes of this replica's step workspaces (allocated as steps run).
        workspace: u64,
    },
    /// Device memory free after the backend placed its weights and workspaces.
    Device {
        /// The free bytes.
        free: u64,
    },
}

/// What the pool is sized for.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetInputs {
    /// Where the pool lives.
    pub memory: MemoryPool,
    /// `kv_cache_config.free_gpu_memory_fraction`.
    pub fraction: f64,
    /// `kv_cache_config.max_tokens`.
    pub max_tokens: Option<usize>,
    /// KV bytes one token takes on this rank (all layers).
    pub bytes_per_token: usize,
    /// Tokens per KV block.
    pub tokens_per_block: usize,
    /// Most sequences in one step.
    pub max_batch_size: usize,
    /// Longest sequence.
    pub max_seq_len: usize,
}

/// One line of the budget, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLine {
    /// What the line is ("weights", "KV pool", ...).
    pub what: &'static str,
    /// The amount, in bytes where it is memory.
    pub bytes: Option<u64>,
    /// How it was found, in words.
    pub detail: String,
}

/// The pool's size and how it was reached.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPlan {
    /// Blocks in the pool.
    pub blocks: usize,
    /// Tokens the pool holds (`blocks` x tokens per block).
    pub tokens: usize,
    /// Bytes of the pool.
    pub bytes: u64,
    /// Blocks `max_batch_size` full-length sequences can use at once.
    pub cap_blocks: usize,
    /// The budget, one line per step.
    pub lines: Vec<BudgetLine>,
}

impl KvPlan {
    /// Logs the budget, one line per step.
    pub fn log(&self) {
        for l in &self.lines {
            match l.bytes {
                Some(b) => tracing::info!(
                    bytes = b,
                    size = %human(b),
                    detail = %l.detail,
                    "memory budget: {}",
                    l.what
                ),
                None => tracing::info!(detail = %l.detail, "memory budget: {}", l.what),
            }
        }
    }
}

/// Why no pool fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BudgetError(pub String);

/// Bytes as GiB/MiB/KiB with two decimals.
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if bytes >= size {
            return format!("{:.2} {name}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

/// What to change when the pool is too large for the memory there is.
pub const FIX_SMALLER: &str = "lower --kv_cache_free_gpu_memory_fraction, kv_cache_config.max_tokens or --max_batch_size, or raise the memory limit (the cgroup's memory.max)";

/// Sizes the pool; Err when not even the weights and workspaces fit, or no block does.
pub fn plan(inp: &BudgetInputs) -> Result<KvPlan, BudgetError> {
    if !(inp.fraction > 0.0 && inp.fraction <= 1.0) {
        return Err(BudgetError(format!(
            "kv_cache_config.free_gpu_memory_fraction is {}; it must be in (0, 1]",
            inp.fraction
        )));
    }
    let tpb = inp.tokens_per_block.max(1);
    let per_token = inp.bytes_per_token.max(1) as u64;
    let mut lines = Vec::new();
    let mut line = |what, bytes, detail: String| {
        lines.push(BudgetLine {
            what,
            bytes,
            detail,
        })
    };
    let remaining = match &inp.memory {
        MemoryPool::Host {
            before_load,
            now,
            replicas,
            weights,
            workspace,
        } => {
            let replicas = (*replicas).max(1) as u64;
            line(
                "host total",
                Some(before_load.mem_total),
                format!(
                    "MemTotal; MemAvailable {} before the weights loaded",
                    human(before_load.mem_available)
                ),
            );
            let limit = match &before_load.cgroup {
                Some(c) => format!(
                    "memory.max {} of {}, {} in use",
                    human(c.max),
                    c.path.display(),
                    human(c.in_use)
                ),
                None => "none (no memory.max on this process's cgroups)".into(),
            };
            line(
                "cgroup limit",
                before_load.cgroup.as_ref().map(|c| c.max),
                limit,
            );
            let free = before_load.free();
            line(
                "free before loading",
                Some(free),
                "the smaller of MemAvailable and the cgroup's headroom".into(),
            );
            let share = free / replicas;
            line(
                "this replica's share",
                Some(share),
                format!("free / {replicas} replicas (or ranks) on this node"),
            );
            line(
                "weights",
                Some(*weights),
                "this replica's weights, resident".into(),
            );
            line(
                "workspaces",
                Some(*workspace),
                "activations of a max_num_tokens step and max_batch_size logits rows".into(),
            );
            let used = weights + workspace;
            let Some(after_model) = share.checked_sub(used).filter(|&r| r > 0) else {
                return Err(BudgetError(format!(
                    "this replica's share of memory is {} ({} free / {replicas} replicas on this node) \
                     but its weights take {} and its workspaces {}, leaving nothing for the KV cache; \
                     raise the memory limit (the cgroup's memory.max), run fewer replicas per node, \
                     lower --max_num_tokens / --max_batch_size, or use a smaller model or --dtype",
                    human(share),
                    human(free),
                    human(*weights),
                    human(*workspace),
                )));
            };
            // Never more than is free now (after the weights), whatever the share promised.
            let free_now = now.free().saturating_sub(*workspace);
            let remaining = after_model.min(free_now);
            let note = if remaining < after_model {
                format!(
                    "share - weights - workspaces, lowered to the {} free now",
                    human(free_now)
                )
            } else {
                "share - weights - workspaces".into()
            };
            line("free after the model", Some(remaining), note);
            remaining
        }
        MemoryPool::Device { free } => {
            line(
                "free after the model",
                Some(*free),
                "device memory free after the weights and workspaces".into(),
            );
            *free
        }
    };
    let budget = (remaining as f64 * inp.fraction) as u64;
    line(
        "fraction",
        Some(budget),
        format!(
            "kv_cache_config.free_gpu_memory_fraction {} of {}",
            inp.fraction,
            human(remaining)
        ),
    );
    let by_memory = usize::try_from(budget / per_token).unwrap_or(usize::MAX) / tpb;
    let cap_blocks = inp
        .max_batch_size
        .saturating_mul(inp.max_seq_len.div_ceil(tpb));
    let blocks = match inp.max_tokens {
        Some(t) => {
            let asked = t / tpb;
            if by_memory < asked {
                tracing::warn!(
                    max_tokens = t,
                    fits_tokens = by_memory * tpb,
                    "kv_cache_config.max_tokens does not fit the memory budget; the smaller wins"
                );
            }
            line(
                "max_tokens",
                None,
                format!(
                    "kv_cache_config.max_tokens {t}: {asked} blocks asked, {by_memory} fit; the smaller wins"
                ),
            );
            asked.min(by_memory)
        }
        None => {
            line(
                "cap",
                Some((cap_blocks as u64).saturating_mul(tpb as u64 * per_token)),
                format!(
                    "max_batch_size {} x max_seq_len {} = {cap_blocks} blocks at most in use at once; {by_memory} fit",
                    inp.max_batch_size, inp.max_seq_len
                ),
            );
            by_memory.min(cap_blocks)
        }
    };
    let tokens = blocks * tpb;
    let bytes = tokens as u64 * per_token;
    if blocks == 0 {
        return Err(BudgetError(format!(
            "the KV cache budget of {} holds no block of {tpb} tokens ({} bytes each); \
             raise --kv_cache_free_gpu_memory_fraction or kv_cache_config.max_tokens, \
             raise the memory limit, or lower --tokens_per_block",
            human(budget),
            tpb as u64 * per_token
        )));
    }
    line(
        "KV pool",
        Some(bytes),
        format!(
            "{blocks} blocks x {tpb} tokens = {tokens} tokens x {} bytes",
            inp.bytes_per_token
        ),
    );
    Ok(KvPlan {
        blocks,
        tokens,
        bytes,
        cap_blocks,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::host_memory::CgroupMemory;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn host(available: u64, cgroup: Option<(u64, u64)>) -> HostMemory {
        HostMemory {
            mem_total: 64 * GIB,
            mem_available: available,
            cgroup: cgroup.map(|(max, in_use)| CgroupMemory {
                path: "/sys/fs/cgroup/job".into(),
                max,
                in_use,
            }),
        }
    }

    /// One replica, 1 GiB weights, 256 MiB workspaces, 1 MiB per token (so tokens read as
    /// MiB), 32 tokens per block, a cap far away.
    fn inputs(before: HostMemory, replicas: usize) -> BudgetInputs {
        let mut now = before.clone();
        now.mem_available = now.mem_available.saturating_sub(GIB);
        BudgetInputs {
            memory: MemoryPool::Host {
                before_load: before,
                now,
                replicas,
                weights: GIB,
                workspace: 256 * MIB,
            },
            fraction: 0.5,
            max_tokens: None,
            bytes_per_token: MIB as usize,
            tokens_per_block: 32,
            max_batch_size: 1024,
            max_seq_len: 4096,
        }
    }

    #[test]
    fn the_fraction_applies_to_what_is_left_after_weights_and_workspaces() {
        let p = plan(&inputs(host(16 * GIB, None), 1)).unwrap();
        // (16 GiB - 1 GiB - 256 MiB) / 2 = 7.375 GiB = 7552 MiB = 236 blocks of 32.
        assert_eq!((p.blocks, p.tokens), (236, 7552));
        assert_eq!(p.bytes, 7552 * MIB);
    }

    #[test]
    fn a_cgroup_max_below_mem_available_is_the_budget() {
        // The cgroup leaves 6 GiB - 1 GiB = 5 GiB though MemAvailable says 16 GiB.
        let p = plan(&inputs(host(16 * GIB, Some((6 * GIB, GIB))), 1)).unwrap();
        // (5 GiB - 1.25 GiB) / 2 = 1920 MiB = 60 blocks.
        assert_eq!(p.blocks, 60);
        let limit = p.lines.iter().find(|l| l.what == "cgroup limit").unwrap();
        assert_eq!(limit.bytes, Some(6 * GIB));
    }

    #[test]
    fn two_replicas_on_a_node_get_half_of_its_memory_each() {
        let one = plan(&inputs(host(16 * GIB, None), 1)).unwrap();
        let two = plan(&inputs(host(16 * GIB, None), 2)).unwrap();
        // (8 GiB - 1.25 GiB) / 2 = 3456 MiB = 108 blocks.
        assert_eq!(two.blocks, 108);
        assert!(two.blocks < one.blocks / 2 + 1);
        let share = two
            .lines
            .iter()
            .find(|l| l.what == "this replica's share")
            .unwrap();
        assert_eq!(share.bytes, Some(8 * GIB));
    }

    #[test]
    fn the_pool_holds_no_more_blocks_than_max_batch_size_sequences_can_use() {
        let mut inp = inputs(host(16 * GIB, None), 1);
        inp.max_batch_size = 4;
        inp.max_seq_len = 100;
        let p = plan(&inp).unwrap();
        // Each sequence needs ceil(100 / 32) = 4 blocks; 4 sequences 16 blocks.
        assert_eq!((p.cap_blocks, p.blocks, p.tokens), (16, 16, 512));
    }

    #[test]
    fn explicit_max_tokens_is_honoured_up_to_the_memory_budget() {
        let mut inp = inputs(host(16 * GIB, None), 1);
        inp.max_batch_size = 1;
        inp.max_seq_len = 64;
        inp.max_tokens = Some(1000);
        // Beyond the cap (2 blocks): an explicit size is the operator's choice.
        assert_eq!(plan(&inp).unwrap().blocks, 31);
        inp.max_tokens = Some(1 << 20);
        assert_eq!(plan(&inp).unwrap().blocks, 236, "the memory budget wins");
    }

    #[test]
    fn weights_that_do_not_fit_the_share_fail_naming_the_fix() {
        let e = plan(&inputs(host(16 * GIB, Some((2 * GIB, GIB))), 1))
            .unwrap_err()
            .0;
        assert!(e.contains("weights take 1.00 GiB"), "{e}");
        assert!(e.contains("memory.max"), "{e}");
        assert!(e.contains("fewer replicas per node"), "{e}");
    }

    #[test]
    fn the_pool_never_exceeds_what_is_free_now() {
        let mut inp = inputs(host(16 * GIB, None), 1);
        if let MemoryPool::Host { now, .. } = &mut inp.memory {
            // Something else took 10 GiB while the weights loaded.
            now.mem_available = 5 * GIB + 256 * MIB;
        }
        // (5 GiB) / 2 = 2560 MiB = 80 blocks.
        assert_eq!(plan(&inp).unwrap().blocks, 80);
    }

    #[test]
    fn device_memory_takes_the_fraction_of_what_the_backend_reports() {
        let mut inp = inputs(host(0, None), 1);
        inp.memory = MemoryPool::Device {
            free: 64 * 32 * MIB,
        };
        assert_eq!(plan(&inp).unwrap().blocks, 32);
    }

    #[test]
    fn a_budget_below_one_block_and_a_bad_fraction_are_refused() {
        let mut inp = inputs(host(0, None), 1);
        inp.memory = MemoryPool::Device { free: 10 * MIB };
        let e = plan(&inp).unwrap_err().0;
        assert!(e.contains("holds no block"), "{e}");
        inp.fraction = 1.5;
        assert!(plan(&inp).unwrap_err().0.contains("(0, 1]"));
    }

    #[test]
    fn every_step_is_a_line() {
        let p = plan(&inputs(host(16 * GIB, Some((32 * GIB, 0))), 2)).unwrap();
        let whats: Vec<_> = p.lines.iter().map(|l| l.what).collect();
        assert_eq!(
            whats,
            [
                "host total",
                "cgroup limit",
                "free before loading",
                "this replica's share",
                "weights",
                "workspaces",
                "free after the model",
                "fraction",
                "cap",
                "KV pool"
            ]
        );
    }
}
