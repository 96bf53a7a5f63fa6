// Device-side reductions over logits rows: greedy argmax, and MoE top-k routing.

// out[r] = argmax of row r (lowest index on ties). Grid: rows; block: 256.
extern "C" __global__ void argmax_rows(u32* out, const float* logits, int vocab) {
    __shared__ float best_v[256];
    __shared__ int best_i[256];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const int oi = best_i[threadIdx.x + s];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)best_i[0];
}

// Softmax over each token's router logits, then the top k experts (k <= 8, experts <= 1024);
// with renormalize the k weights are divided by their sum. Grid: tokens; block: 1 warp.
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
        int bi = 0x7fffffff;
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
        picked[s] = __expf(bv - m) / sum;
        picked_sum += picked[s];
    }
    if (threadIdx.x == 0) {
        for (int s = 0; s < k; ++s) {
            expert_ids[(size_t)blockIdx.x * k + s] = taken[s];
            weights[(size_t)blockIdx.x * k + s] = renormalize ? picked[s] / picked_sum : picked[s];
        }
    }
}
