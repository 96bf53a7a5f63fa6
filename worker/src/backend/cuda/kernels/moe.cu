// Mixture-of-experts layers: router logits, top-k routing, gathering the rows routed to each
// expert into one contiguous group per expert (the host lays the groups out from the chosen
// expert ids, see moe.rs), and combining the experts' outputs back into token order.

// out[t, e] = xn[t, :] . w[e, :] (bf16 activations, f32 router weights, f32 sums): the router
// logits, and Qwen2-MoE's shared-expert gate (n_out = 1). Grid: tokens; block: 32 * warps,
// one warp per output at a time.
extern "C" __global__ void router_logits_f32(float* out, const __nv_bfloat16* xn, const float* w,
                                             int hidden, int n_out) {
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const __nv_bfloat16* xr = xn + (size_t)t * hidden;
    for (int e = warp; e < n_out; e += warps) {
        const float* wr = w + (size_t)e * hidden;
        float s = 0.0f;
        for (int i = lane; i < hidden; i += 32) s += __bfloat162float(xr[i]) * wr[i];
        s = warp_sum(s);
        if (lane == 0) out[(size_t)t * n_out + e] = s;
    }
}

// Softmax over each token's router logits, then the top k experts (k <= 8), highest first,
// the lower index first on ties; with renormalize the k weights are divided by their sum
// (Mixtral, Qwen3-MoE), without it they stay softmax probabilities (Qwen2-MoE). A row with no
// finite logit yields expert id n_experts, which the host refuses. Grid: tokens; block: 32.
extern "C" __global__ void moe_topk_softmax(u32* expert_ids, float* weights,
                                            const float* router_logits, int n_experts, int k,
                                            int renormalize) {
    const float* row = router_logits + (size_t)blockIdx.x * n_experts;
    float m = -INFINITY;
    for (int e = threadIdx.x; e < n_experts; e += 32) m = fmaxf(m, row[e]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int e = threadIdx.x; e < n_experts; e += 32) sum += __expf(row[e] - m);
    sum = warp_sum(sum);
    // Selection by repeated warp argmax over the experts not yet taken.
    u32 taken[8];
    float picked[8];
    float picked_sum = 0.0f;
    for (int s = 0; s < k; ++s) {
        float bv = -INFINITY;
        int bi = n_experts;
        for (int e = threadIdx.x; e < n_experts; e += 32) {
            bool used = false;
            for (int p = 0; p < s; ++p) used |= (taken[p] == (u32)e);
            const float v = row[e];
            if (!used && (v > bv || (v == bv && e < bi))) {
                bv = v;
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        taken[s] = (u32)bi;
        picked[s] = bi < n_experts ? __expf(bv - m) / sum : 0.0f;
        picked_sum += picked[s];
    }
    if (threadIdx.x == 0) {
        for (int s = 0; s < k; ++s) {
            expert_ids[(size_t)blockIdx.x * k + s] = taken[s];
            weights[(size_t)blockIdx.x * k + s] =
                renormalize && picked_sum > 0.0f ? picked[s] / picked_sum : picked[s];
        }
    }
}

// out[r, :] = x[rows[r], :] (bf16): the rows routed to the experts, grouped by expert.
// Grid: routed rows; block: any.
extern "C" __global__ void gather_rows_bf16(__nv_bfloat16* out, const __nv_bfloat16* x,
                                            const int* rows, int hidden) {
    const __nv_bfloat16* src = x + (size_t)rows[blockIdx.x] * hidden;
    __nv_bfloat16* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

// out[t, :] += sum over the token's k slots of weights[t, s] * y[slot_rows[t, s], :], slots
// in order (deterministic: one block per token, no atomics). slot_rows[t, s] < 0 marks an
// expert held by another rank. Grid: tokens; block: any.
extern "C" __global__ void moe_combine_f32(float* out, const float* y, const int* slot_rows,
                                           const float* weights, int k, int hidden) {
    const int t = blockIdx.x;
    const int* sr = slot_rows + (size_t)t * k;
    const float* w = weights + (size_t)t * k;
    float* dst = out + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < k; ++s)
            if (sr[s] >= 0) acc += w[s] * y[(size_t)sr[s] * hidden + i];
        dst[i] += acc;
    }
}

// out[t, :] += sigmoid(gate[t]) * y[t, :]: Qwen2-MoE's gated shared expert. Grid: tokens.
extern "C" __global__ void add_sigmoid_gated_f32(float* out, const float* y, const float* gate,
                                                 int hidden) {
    const int t = blockIdx.x;
    const float g = 1.0f / (1.0f + __expf(-gate[t]));
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)t * hidden + i] += g * y[(size_t)t * hidden + i];
}
