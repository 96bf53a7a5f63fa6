// Embedding lookup, RMSNorm, residual add, SiLU-gated MLP activation and casts.
// The residual stream is f32; GEMM inputs are bf16 (cuBLAS: bf16 x bf16 -> f32).

// out[t, :] = table[ids[t] - vocab_start, :] (bf16 table -> f32 residual) for the ids in
// this rank's vocabulary slice [vocab_start, vocab_start + vocab_len), zeros for the others
// (a tensor-parallel group sums the ranks' rows). Grid: tokens; block: any.
extern "C" __global__ void embed_bf16(float* out, const __nv_bfloat16* table, const u32* ids,
                                      int hidden, u32 vocab_start, u32 vocab_len) {
    const int t = blockIdx.x;
    const u32 id = ids[t] - vocab_start;  // wraps to a large value below the slice
    float* dst = out + (size_t)t * hidden;
    if (id >= vocab_len) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0.0f;
        return;
    }
    const __nv_bfloat16* row = table + (size_t)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __bfloat162float(row[i]);
}

// out = x * rsqrt(mean(x^2) + eps) * w, per row. Grid: rows; block: 256.
extern "C" __global__ void rmsnorm_f32_bf16(__nv_bfloat16* out, const float* x,
                                            const __nv_bfloat16* w, int hidden, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)blockIdx.x * hidden + i] =
            __float2bfloat16(xr[i] * inv * __bfloat162float(w[i]));
}

// The same over the rows listed in `rows` (the positions whose logits are wanted): row i of
// `out` is the norm of row rows[i] of x. Grid: number of rows; block: 256.
extern "C" __global__ void rmsnorm_gather_f32_bf16(__nv_bfloat16* out, const float* x,
                                                   const int* rows, const __nv_bfloat16* w,
                                                   int hidden, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)rows[blockIdx.x] * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)blockIdx.x * hidden + i] =
            __float2bfloat16(xr[i] * inv * __bfloat162float(w[i]));
}

// RMSNorm over each head_dim slice of q or k, in place (Qwen3's q/k norm). Token t's heads
// start at x + t * row_stride (q, k and v share one fused row). Grid: (tokens, heads);
// block: 32 * k.
extern "C" __global__ void head_rmsnorm_f32(float* x, const __nv_bfloat16* w, int head_dim,
                                            int row_stride, float eps) {
    __shared__ float scratch[32];
    float* xr = x + (size_t)blockIdx.x * row_stride + (size_t)blockIdx.y * head_dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_sum(ss, scratch) / head_dim + eps);
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x)
        xr[i] = xr[i] * inv * __bfloat162float(w[i]);
}

// x += y (f32), n elements.
extern "C" __global__ void add_f32(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// x[t, :] += bias (f32 bias over rows), for Qwen2's q/k/v bias.
extern "C" __global__ void add_bias_f32(float* x, const __nv_bfloat16* bias, int cols, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += __bfloat162float(bias[i % cols]);
}

// out[t, i] = silu(gate[t, i]) * up[t, i], with gate_up rows laid out [gate | up].
extern "C" __global__ void silu_mul_bf16(__nv_bfloat16* out, const float* gate_up, int inter,
                                         size_t rows) {
    const size_t n = rows * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / inter, j = i % inter;
        const float g = gate_up[t * 2 * inter + j];
        const float u = gate_up[t * 2 * inter + inter + j];
        out[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

extern "C" __global__ void f32_to_bf16(__nv_bfloat16* out, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(x[i]);
}
