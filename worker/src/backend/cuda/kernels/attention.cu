// Paged KV cache store and paged attention for prefill and decode.
//
// Cache of one layer: K and V each [num_blocks][tokens_per_block][n_kv_heads][head_dim], in
// bf16, or in fp8 e4m3 with one f32 scale per (slot, kv head) in `*_scale`
// [num_blocks][tokens_per_block][n_kv_heads]. A slot is block * tokens_per_block + offset.
// New K and V come from the fused q/k/v rows: token t's K heads start at k + t * row_stride.

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
                                         int n_kv_heads, int head_dim, int row_stride) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const size_t src = (size_t)t * row_stride + (size_t)h * head_dim;
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
                                        int head_dim, int row_stride) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const size_t src = (size_t)t * row_stride + (size_t)h * head_dim;
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

// Most head_dim / blockDim.x output dimensions one thread accumulates (head_dim <= 512 with
// the 128-thread blocks the backend launches).
#define ATTN_MAX_DIMS_PER_THREAD 4

// One query row attends over the first ctx_len positions of its sequence, with an online
// softmax over tiles of blockDim.x positions (no scratch memory, any context length).
// Grid: (rows, n_heads); block: 128; dynamic shared memory: (head_dim + blockDim.x) floats.
// Row r's q heads start at q + r * q_stride; row_seq[r] picks the sequence's block table
// (max_blocks entries each); row_ctx[r] is the number of visible positions (position + 1:
// causal). out is bf16 [rows][n_heads * head_dim], the input of the o projection.
template <typename T>
__device__ void paged_attention(__nv_bfloat16* out, const float* q, const T* k_cache,
                                const T* v_cache, const float* k_scale, const float* v_scale,
                                const int* block_tables, const int* row_seq, const int* row_ctx,
                                int q_stride, int max_blocks, int n_heads, int n_kv_heads,
                                int head_dim, int tokens_per_block, float softmax_scale) {
    extern __shared__ float smem[];
    float* q_s = smem;
    float* p_s = smem + head_dim;
    __shared__ float scratch[32];
    const int r = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int ctx = row_ctx[r];
    const int* table = block_tables + (size_t)row_seq[r] * max_blocks;
    const float* qr = q + (size_t)r * q_stride + (size_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = qr[d];
    __syncthreads();

    float acc[ATTN_MAX_DIMS_PER_THREAD];
    for (int i = 0; i < ATTN_MAX_DIMS_PER_THREAD; ++i) acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int tile = 0; tile < ctx; tile += blockDim.x) {
        const int j = tile + threadIdx.x;
        float s = -INFINITY;
        if (j < ctx) {
            const size_t slot = (size_t)table[j / tokens_per_block] * tokens_per_block +
                                j % tokens_per_block;
            const size_t si = slot * n_kv_heads + kvh;
            const size_t base = si * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; ++d) dot += q_s[d] * load_kv(k_cache, base + d, k_scale, si);
            s = dot * softmax_scale;
        }
        // The first tile always holds position 0, so m_new is finite from the start.
        const float m_new = fmaxf(m, block_max(s, scratch));
        const float p = j < ctx ? __expf(s - m_new) : 0.0f;
        p_s[threadIdx.x] = p;
        // block_sum synchronizes the block, so every p_s entry is visible after it.
        const float tile_sum = block_sum(p, scratch);
        const float corr = __expf(m - m_new);
        l = l * corr + tile_sum;
        const int n = min((int)blockDim.x, ctx - tile);
        for (int i = 0; i < ATTN_MAX_DIMS_PER_THREAD; ++i) {
            const int d = threadIdx.x + i * blockDim.x;
            if (d >= head_dim) break;
            float a = acc[i] * corr;
            for (int jj = 0; jj < n; ++jj) {
                const int pos = tile + jj;
                const size_t slot = (size_t)table[pos / tokens_per_block] * tokens_per_block +
                                    pos % tokens_per_block;
                const size_t si = slot * n_kv_heads + kvh;
                a += p_s[jj] * load_kv(v_cache, si * head_dim + d, v_scale, si);
            }
            acc[i] = a;
        }
        m = m_new;
        // p_s is rewritten by the next tile.
        __syncthreads();
    }
    const float inv = 1.0f / l;
    for (int i = 0; i < ATTN_MAX_DIMS_PER_THREAD; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d >= head_dim) break;
        out[((size_t)r * n_heads + h) * head_dim + d] = __float2bfloat16(acc[i] * inv);
    }
}

extern "C" __global__ void paged_attention_bf16(
    __nv_bfloat16* out, const float* q, const __nv_bfloat16* k_cache,
    const __nv_bfloat16* v_cache, const int* block_tables, const int* row_seq,
    const int* row_ctx, int q_stride, int max_blocks, int n_heads, int n_kv_heads, int head_dim,
    int tokens_per_block, float softmax_scale) {
    paged_attention<__nv_bfloat16>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables,
                                   row_seq, row_ctx, q_stride, max_blocks, n_heads, n_kv_heads,
                                   head_dim, tokens_per_block, softmax_scale);
}

extern "C" __global__ void paged_attention_fp8(
    __nv_bfloat16* out, const float* q, const unsigned char* k_cache,
    const unsigned char* v_cache, const float* k_scale, const float* v_scale,
    const int* block_tables, const int* row_seq, const int* row_ctx, int q_stride,
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, int tokens_per_block,
    float softmax_scale) {
    paged_attention<unsigned char>(out, q, k_cache, v_cache, k_scale, v_scale, block_tables,
                                   row_seq, row_ctx, q_stride, max_blocks, n_heads, n_kv_heads,
                                   head_dim, tokens_per_block, softmax_scale);
}
