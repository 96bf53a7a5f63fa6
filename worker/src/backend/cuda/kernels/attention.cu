// Paged KV cache store and paged attention for prefill and decode.
//
// Cache of one layer: K and V each [num_blocks][tokens_per_block][n_kv_heads][head_dim], in
// bf16, or in fp8 e4m3 with one f32 scale per (slot, kv head) in `*_scale`
// [num_blocks][tokens_per_block][n_kv_heads]. A slot is block * tokens_per_block + offset.

__device__ __forceinline__ float load_kv(const __nv_bfloat16* p, size_t i, const float*, size_t) {
    return __bfloat162float(p[i]);
}

__device__ __forceinline__ float load_kv(const unsigned char* p, size_t i, const float* scale,
                                         size_t si) {
    __nv_fp8_e4m3 v;
    v.__x = p[i];
    return (float)v * scale[si];
}

// Writes the new tokens' K and V into their slots. Grid: (tokens, n_kv_heads); block: 32.
// slot_mapping[t] < 0 skips the token (padding rows).
extern "C" __global__ void kv_store_bf16(__nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                                         const float* k, const float* v, const int* slot_mapping,
                                         int n_kv_heads, int head_dim) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const size_t src = ((size_t)t * n_kv_heads + h) * head_dim;
    const size_t dst = ((size_t)slot * n_kv_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        k_cache[dst + d] = __float2bfloat16(k[src + d]);
        v_cache[dst + d] = __float2bfloat16(v[src + d]);
    }
}

// fp8 variant: per (slot, head) scale = amax / 448 (the e4m3 maximum), values saturate.
// Grid: (tokens, n_kv_heads); block: 32 (one warp).
extern "C" __global__ void kv_store_fp8(unsigned char* k_cache, unsigned char* v_cache,
                                        float* k_scale, float* v_scale, const float* k,
                                        const float* v, const int* slot_mapping, int n_kv_heads,
                                        int head_dim) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const size_t src = ((size_t)t * n_kv_heads + h) * head_dim;
    const size_t dst = ((size_t)slot * n_kv_heads + h) * head_dim;
    float ka = 0.0f, va = 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += 32) {
        ka = fmaxf(ka, fabsf(k[src + d]));
        va = fmaxf(va, fabsf(v[src + d]));
    }
    ka = warp_max(ka);
    va = warp_max(va);
    const float ks = ka > 0.0f ? ka / 448.0f : 1.0f;
    const float vs = va > 0.0f ? va / 448.0f : 1.0f;
    for (int d = threadIdx.x; d < head_dim; d += 32) {
        k_cache[dst + d] = __nv_fp8_e4m3(k[src + d] / ks).__x;
        v_cache[dst + d] = __nv_fp8_e4m3(v[src + d] / vs).__x;
    }
    if (threadIdx.x == 0) {
        k_scale[(size_t)slot * n_kv_heads + h] = ks;
        v_scale[(size_t)slot * n_kv_heads + h] = vs;
    }
}

// One query row attends over the first ctx_len positions of its sequence.
// Grid: (rows, n_heads); block: 128; dynamic shared memory: head_dim floats.
// row_seq[r] picks the sequence's block table (max_blocks entries each); row_ctx[r] is the
// number of visible positions (position + 1 for causal prefill, the sequence length for
// decode). ws holds rows * n_heads * max_ctx floats of scratch for the scores.
template <typename T>
__device__ void paged_attention(float* out, const float* q, const T* k_cache, const T* v_cache,
                                const float* k_scale, const float* v_scale,
                                const int* block_tables, const int* row_seq, const int* row_ctx,
                                float* ws, int max_blocks, int max_ctx, int n_heads,
                                int n_kv_heads, int head_dim, int tokens_per_block,
                                float softmax_scale) {
    extern __shared__ float q_s[];
    __shared__ float scratch[32];
    const int r = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int ctx = row_ctx[r];
    const int* table = block_tables + (size_t)row_seq[r] * max_blocks;
    float* scores = ws + ((size_t)r * n_heads + h) * max_ctx;
    const float* qr = q + ((size_t)r * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = qr[d];
    __syncthreads();

    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        const size_t slot = (size_t)table[j / tokens_per_block] * tokens_per_block +
                            j % tokens_per_block;
        const size_t base = (slot * n_kv_heads + kvh) * head_dim;
        const size_t si = slot * n_kv_heads + kvh;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot += q_s[d] * load_kv(k_cache, base + d, k_scale, si);
        dot *= softmax_scale;
        scores[j] = dot;
        local_max = fmaxf(local_max, dot);
    }
    const float m = block_max(local_max, scratch);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < ctx; j += blockDim.x) {
        const float p = __expf(scores[j] - m);
        scores[j] = p;
        local_sum += p;
    }
    const float inv = 1.0f / block_sum(local_sum, scratch);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < ctx; ++j) {
            const size_t slot = (size_t)table[j / tokens_per_block] * tokens_per_block +
                                j % tokens_per_block;
            acc += scores[j] *
                   load_kv(v_cache, (slot * n_kv_heads + kvh) * head_dim + d, v_scale,
                           slot * n_kv_heads + kvh);
        }
        out[((size_t)r * n_heads + h) * head_dim + d] = acc * inv;
    }
}

extern "C" __global__ void paged_attention_bf16(
    float* out, const float* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
    const int* block_tables, const int* row_seq, const int* row_ctx, float* ws, int max_blocks,
    int max_ctx, int n_heads, int n_kv_heads, int head_dim, int tokens_per_block,
    float softmax_scale) {
    paged_attention<__nv_bfloat16>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables,
                                   row_seq, row_ctx, ws, max_blocks, max_ctx, n_heads, n_kv_heads,
                                   head_dim, tokens_per_block, softmax_scale);
}

extern "C" __global__ void paged_attention_fp8(
    float* out, const float* q, const unsigned char* k_cache, const unsigned char* v_cache,
    const float* k_scale, const float* v_scale, const int* block_tables, const int* row_seq,
    const int* row_ctx, float* ws, int max_blocks, int max_ctx, int n_heads, int n_kv_heads,
    int head_dim, int tokens_per_block, float softmax_scale) {
    paged_attention<unsigned char>(out, q, k_cache, v_cache, k_scale, v_scale, block_tables,
                                   row_seq, row_ctx, ws, max_blocks, max_ctx, n_heads, n_kv_heads,
                                   head_dim, tokens_per_block, softmax_scale);
}
