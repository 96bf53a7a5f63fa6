//! Mixture-of-experts layers on the GPU: Mixtral, Qwen3-MoE and Qwen2-MoE (with its gated
//! shared expert).
//!
//! A layer runs as: router logits (f32 router weights, as on the CPU) and top-k softmax on the
//! device; the chosen expert ids come back to the host, which groups the routed rows by expert
//! (`RoutePlan`); the device gathers each group's rows into one contiguous block, runs one
//! cuBLAS GEMM pair per active expert over its block, and combines the weighted outputs back
//! into token order, one block per token with no atomics. The expert ids' round trip costs one
//! stream synchronization per MoE layer. Not here: a grouped-GEMM kernel over all experts.

use std::ops::Range;

use cudarc::driver::CudaSlice;

use super::backend::{DevMat, int, upload_mat};
use super::device::{Device, Scratch, ptr, stride_grid};
use crate::backend::BackendError;
use crate::model::{Ffn, Mat, Mlp, WeightData};

/// Most experts per token the routing kernel picks (its per-thread arrays).
pub const MAX_TOP_K: usize = 8;

/// The rows routed to this rank's experts, grouped by expert, for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Per local expert: its first row in the grouped buffers and its number of rows.
    pub groups: Vec<(usize, usize)>,
    /// Token index of each grouped row (the gather's source rows), grouped by expert in
    /// expert order, tokens ascending within a group.
    pub gather: Vec<i32>,
    /// Per (token, slot), `tokens * top_k` entries: the grouped row holding the token's
    /// output for that slot, or -1 when the slot's expert is held by another rank.
    pub slot_rows: Vec<i32>,
}

impl RoutePlan {
    /// Groups `expert_ids` (`tokens * top_k`, token-major, as the routing kernel writes them)
    /// by the experts of `local` (this rank's slice of `0..num_experts`). An id outside
    /// `0..num_experts` (what the kernel writes for a row without a finite logit) or a token
    /// routed twice to one expert is an error.
    pub fn new(
        expert_ids: &[u32],
        top_k: usize,
        num_experts: usize,
        local: Range<usize>,
    ) -> Result<Self, BackendError> {
        if top_k == 0 || !expert_ids.len().is_multiple_of(top_k) {
            return Err(BackendError::InvalidStep(format!(
                "{} routed expert ids are not a whole number of tokens with top_k {top_k}",
                expert_ids.len()
            )));
        }
        if local.end > num_experts || local.is_empty() {
            return Err(BackendError::InvalidStep(format!(
                "local experts {local:?} are not a slice of the {num_experts} experts"
            )));
        }
        let mut counts = vec![0usize; local.len()];
        for (i, tok) in expert_ids.chunks_exact(top_k).enumerate() {
            for (s, &e) in tok.iter().enumerate() {
                let e = e as usize;
                if e >= num_experts {
                    return Err(BackendError::Device(format!(
                        "MoE routing chose expert {e} of {num_experts} for token {i}: its router logits are not finite (NaN or infinite activations)"
                    )));
                }
                if tok[..s].iter().any(|&p| p as usize == e) {
                    return Err(BackendError::Device(format!(
                        "MoE routing chose expert {e} twice for token {i}"
                    )));
                }
                if local.contains(&e) {
                    counts[e - local.start] += 1;
                }
            }
        }
        let mut groups = Vec::with_capacity(counts.len());
        let mut next = Vec::with_capacity(counts.len());
        let mut start = 0;
        for &c in &counts {
            groups.push((start, c));
            next.push(start);
            start += c;
        }
        let mut gather = vec![0i32; start];
        let mut slot_rows = vec![-1i32; expert_ids.len()];
        for (i, tok) in expert_ids.chunks_exact(top_k).enumerate() {
            let token = int(i, "token")?;
            for (s, &e) in tok.iter().enumerate() {
                let e = e as usize;
                if local.contains(&e) {
                    let row = next[e - local.start];
                    next[e - local.start] += 1;
                    gather[row] = token;
                    slot_rows[i * top_k + s] = int(row, "routed row")?;
                }
            }
        }
        Ok(Self {
            groups,
            gather,
            slot_rows,
        })
    }

    /// Rows routed to this rank's experts.
    pub fn routed_rows(&self) -> usize {
        self.gather.len()
    }
}

/// One expert's (or the shared expert's) FFN on the device.
pub(super) struct DevFfn {
    gate_up: DevMat,
    down: DevMat,
}

/// An MoE layer's weights on the device.
pub(super) struct DevMoe {
    /// Router, f32 experts x hidden (all experts, on every rank).
    router: CudaSlice<f32>,
    num_experts: usize,
    /// This rank's experts, `first_expert..first_expert + experts.len()`.
    experts: Vec<DevFfn>,
    first_expert: usize,
    /// Inner width of each local expert (this rank's slice of it).
    inter: usize,
    top_k: usize,
    renormalize: bool,
    /// Shared expert (inner width, FFN) and its f32 gate row.
    shared: Option<(usize, DevFfn, CudaSlice<f32>)>,
}

fn f32_rows(m: &Mat) -> Vec<f32> {
    match &m.data {
        WeightData::F32(v) => v.clone(),
        WeightData::Bf16(_)
        | WeightData::Bf16Panels(_)
        | WeightData::Q8_0 { .. }
        | WeightData::KQuant(_)
        | WeightData::Q4(_) => {
            let mut v = vec![0.0; m.rows * m.cols];
            for r in 0..m.rows {
                m.row_to_f32(r, &mut v[r * m.cols..(r + 1) * m.cols]);
            }
            v
        }
    }
}

fn upload_ffn(dev: &Device, f: &Ffn) -> Result<DevFfn, BackendError> {
    Ok(DevFfn {
        gate_up: upload_mat(dev, &f.gate_up)?,
        down: upload_mat(dev, &f.down)?,
    })
}

impl DevMoe {
    /// Uploads the MoE block `mlp` (which must be `Mlp::Moe`).
    pub(super) fn upload(dev: &Device, mlp: &Mlp) -> Result<Self, BackendError> {
        let Mlp::Moe {
            router,
            experts,
            first_expert,
            top_k,
            norm_topk_prob,
            shared,
        } = mlp
        else {
            return Err(BackendError::Unsupported(
                "a dense MLP is not an MoE layer".into(),
            ));
        };
        let inter = experts.first().map_or(0, |f| f.inter);
        Ok(Self {
            router: dev.upload(&f32_rows(router))?,
            num_experts: router.rows,
            experts: experts
                .iter()
                .map(|f| upload_ffn(dev, f))
                .collect::<Result<_, _>>()?,
            first_expert: *first_expert,
            inter,
            top_k: *top_k,
            renormalize: *norm_topk_prob,
            shared: match shared {
                Some((f, gate)) => {
                    Some((f.inter, upload_ffn(dev, f)?, dev.upload(&f32_rows(gate))?))
                }
                None => None,
            },
        })
    }

    /// Activation width per token this layer needs in the gate|up and SiLU scratch: its
    /// top_k routed rows of the expert width, or one row of the shared expert's width.
    pub(super) fn act_width(&self) -> usize {
        (self.top_k * self.inter).max(self.shared.as_ref().map_or(0, |(si, _, _)| *si))
    }
}

/// Scratch of the MoE layers, sized for the largest step seen.
pub(super) struct MoeScratch {
    /// Router logits, f32 [tokens, experts] (also the shared gate, [tokens]).
    logits: Scratch<f32>,
    /// Chosen experts, [tokens, top_k].
    ids: Scratch<u32>,
    /// Their weights, f32 [tokens, top_k].
    weights: Scratch<f32>,
    /// Gather rows then slot rows, one upload.
    plan: Scratch<i32>,
    /// Grouped input rows, bf16 [routed, hidden].
    xs: Scratch<u16>,
    /// Expert outputs, f32 [routed, hidden] (the shared expert's [tokens, hidden]).
    ys: Scratch<f32>,
    /// Host copy of the chosen ids.
    host_ids: Vec<u32>,
}

impl MoeScratch {
    pub(super) fn new() -> Self {
        Self {
            logits: Scratch::new(),
            ids: Scratch::new(),
            weights: Scratch::new(),
            plan: Scratch::new(),
            xs: Scratch::new(),
            ys: Scratch::new(),
            host_ids: Vec::new(),
        }
    }

    /// Sizes the buffers for steps of `tokens` tokens through `layer`.
    pub(super) fn reserve(
        &mut self,
        dev: &Device,
        layer: &DevMoe,
        tokens: usize,
        hidden: usize,
    ) -> Result<(), BackendError> {
        let routed = tokens * layer.top_k;
        self.logits
            .at_least(dev, tokens * layer.num_experts.max(1))?;
        self.ids.at_least(dev, routed)?;
        self.weights.at_least(dev, routed)?;
        self.plan.at_least(dev, 2 * routed)?;
        self.xs.at_least(dev, routed * hidden)?;
        self.ys.at_least(dev, routed.max(tokens) * hidden)?;
        Ok(())
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.logits.bytes()
            + self.ids.bytes()
            + self.weights.bytes()
            + self.plan.bytes()
            + self.xs.bytes()
            + self.ys.bytes()
    }
}

/// Where an MoE layer reads and writes, for `rows` tokens.
pub(super) struct MoeIo {
    /// Normed input, bf16 [rows, hidden].
    pub xn: u64,
    /// Output, f32 [rows, hidden]: the layer's result is added onto it.
    pub out: u64,
    /// gate|up scratch, f32, at least [rows * top_k, 2 * max_inter].
    pub gate_up: u64,
    /// Activation scratch, bf16, at least [rows * top_k, max_inter].
    pub act: u64,
    /// Tokens.
    pub rows: usize,
    /// Hidden size.
    pub hidden: usize,
}

/// `out += MoE(xn)` for this rank's experts (and its slice of the shared expert).
pub(super) fn run(
    dev: &Device,
    layer: &DevMoe,
    s: &mut MoeScratch,
    io: &MoeIo,
) -> Result<(), BackendError> {
    let st = &dev.stream;
    let (rows, h, k) = (io.rows, io.hidden, layer.top_k);
    let rows_u = u32::try_from(rows)
        .map_err(|_| BackendError::InvalidStep(format!("{rows} rows in one step")))?;
    let hi = int(h, "hidden")?;
    let logits = s.logits.at_least(dev, rows * layer.num_experts)?;
    let ids = s.ids.at_least(dev, rows * k)?;
    let weights = s.weights.at_least(dev, rows * k)?;
    dev.launch("router_logits_f32")?
        .ptr(logits)
        .ptr(io.xn)
        .ptr(ptr(&layer.router, st))
        .i32(hi)
        .i32(int(layer.num_experts, "num_experts")?)
        .run((rows_u, 1), 256, 0, "router logits")?;
    dev.launch("moe_topk_softmax")?
        .ptr(ids)
        .ptr(weights)
        .ptr(logits)
        .i32(int(layer.num_experts, "num_experts")?)
        .i32(int(k, "top_k")?)
        .i32(i32::from(layer.renormalize))
        .run((rows_u, 1), 32, 0, "top-k routing")?;
    s.host_ids.resize(rows * k, 0);
    s.ids.read(dev, &mut s.host_ids)?;
    let local = layer.first_expert..layer.first_expert + layer.experts.len();
    let plan = RoutePlan::new(&s.host_ids, k, layer.num_experts, local)?;
    let routed = plan.routed_rows();
    if routed > 0 {
        let mut meta = plan.gather.clone();
        meta.extend_from_slice(&plan.slot_rows);
        let meta_p = s.plan.at_least(dev, meta.len())?;
        s.plan.write(dev, &meta)?;
        let slot_p = meta_p + 4 * routed as u64;
        let xs = s.xs.at_least(dev, routed * h)?;
        let ys = s.ys.at_least(dev, routed.max(rows) * h)?;
        let routed_u = u32::try_from(routed)
            .map_err(|_| BackendError::InvalidStep(format!("{routed} routed rows")))?;
        dev.launch("gather_rows_bf16")?
            .ptr(xs)
            .ptr(io.xn)
            .ptr(meta_p)
            .i32(hi)
            .run((routed_u, 1), 256, 0, "gather routed rows")?;
        let inter = layer.inter;
        for (e, &(first, n)) in layer.experts.iter().zip(&plan.groups) {
            if n == 0 {
                continue;
            }
            let at = |base: u64, width: usize, bytes: usize| base + (first * width * bytes) as u64;
            dev.gemm(
                at(io.gate_up, 2 * inter, 4),
                at(xs, h, 2),
                mat(&e.gate_up, st),
                n,
                0.0,
            )?;
        }
        dev.launch("silu_mul_bf16")?
            .ptr(io.act)
            .ptr(io.gate_up)
            .i32(int(inter, "moe_intermediate_size")?)
            .usize(routed)
            .run((stride_grid(routed * inter), 1), 256, 0, "expert silu mul")?;
        for (e, &(first, n)) in layer.experts.iter().zip(&plan.groups) {
            if n == 0 {
                continue;
            }
            dev.gemm(
                ys + (first * h * 4) as u64,
                io.act + (first * inter * 2) as u64,
                mat(&e.down, st),
                n,
                0.0,
            )?;
        }
        dev.launch("moe_combine_f32")?
            .ptr(io.out)
            .ptr(ys)
            .ptr(slot_p)
            .ptr(weights)
            .i32(int(k, "top_k")?)
            .i32(hi)
            .run((rows_u, 1), 256, 0, "combine experts")?;
    }
    if let Some((si, f, gate)) = &layer.shared {
        // The routed outputs in `ys` were consumed by the combine above (stream order).
        let ys = s.ys.at_least(dev, rows * h)?;
        dev.gemm(io.gate_up, io.xn, mat(&f.gate_up, st), rows, 0.0)?;
        dev.launch("silu_mul_bf16")?
            .ptr(io.act)
            .ptr(io.gate_up)
            .i32(int(*si, "shared_expert_intermediate_size")?)
            .usize(rows)
            .run(
                (stride_grid(rows * si), 1),
                256,
                0,
                "shared expert silu mul",
            )?;
        dev.gemm(ys, io.act, mat(&f.down, st), rows, 0.0)?;
        dev.launch("router_logits_f32")?
            .ptr(logits)
            .ptr(io.xn)
            .ptr(ptr(gate, st))
            .i32(hi)
            .i32(1)
            .run((rows_u, 1), 32, 0, "shared expert gate")?;
        dev.launch("add_sigmoid_gated_f32")?
            .ptr(io.out)
            .ptr(ys)
            .ptr(logits)
            .i32(hi)
            .run((rows_u, 1), 256, 0, "shared expert")?;
    }
    Ok(())
}

fn mat(m: &DevMat, st: &cudarc::driver::CudaStream) -> (u64, usize, usize) {
    (ptr(&m.data, st), m.rows, m.cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_rows_are_grouped_by_expert_in_token_order() {
        // 3 tokens, top 2 of 4 experts.
        let ids = [2, 0, 0, 3, 2, 1];
        let p = RoutePlan::new(&ids, 2, 4, 0..4).unwrap();
        assert_eq!(p.groups, vec![(0, 2), (2, 1), (3, 2), (5, 1)]);
        assert_eq!(p.gather, vec![0, 1, 2, 0, 2, 1]);
        // Token 0: expert 2 -> row 3, expert 0 -> row 0; token 1: expert 0 -> row 1,
        // expert 3 -> row 5; token 2: expert 2 -> row 4, expert 1 -> row 2.
        assert_eq!(p.slot_rows, vec![3, 0, 1, 5, 4, 2]);
        // Every slot's row gathers its own token.
        for (i, &r) in p.slot_rows.iter().enumerate() {
            assert_eq!(p.gather[r as usize] as usize, i / 2);
        }
    }

    #[test]
    fn experts_of_other_ranks_get_no_rows() {
        let ids = [2, 0, 0, 3, 2, 1];
        let p = RoutePlan::new(&ids, 2, 4, 2..4).unwrap();
        assert_eq!(p.groups, vec![(0, 2), (2, 1)]);
        assert_eq!(p.gather, vec![0, 2, 1]);
        assert_eq!(p.slot_rows, vec![0, -1, -1, 2, 1, -1]);
        assert_eq!(p.routed_rows(), 3);
    }

    #[test]
    fn unused_experts_have_empty_groups() {
        let p = RoutePlan::new(&[1], 1, 3, 0..3).unwrap();
        assert_eq!(p.groups, vec![(0, 0), (0, 1), (1, 0)]);
        let none = RoutePlan::new(&[], 2, 3, 0..3).unwrap();
        assert_eq!(none.routed_rows(), 0);
    }

    #[test]
    fn non_finite_routing_and_bad_shapes_are_errors_not_panics() {
        // The kernel writes num_experts when a row has no finite logit.
        let e = RoutePlan::new(&[0, 4], 2, 4, 0..4).unwrap_err().to_string();
        assert!(
            e.contains("expert 4 of 4") && e.contains("not finite"),
            "{e}"
        );
        let e = RoutePlan::new(&[1, 1], 2, 4, 0..4).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        assert!(RoutePlan::new(&[0, 1, 2], 2, 4, 0..4).is_err());
        assert!(RoutePlan::new(&[0], 0, 4, 0..4).is_err());
        assert!(RoutePlan::new(&[0], 1, 4, 2..6).is_err());
    }
}
