// Rotary position embedding in the Hugging Face "rotate half" layout: dimension i pairs with
// i + head_dim / 2. inv_freq (head_dim / 2 values) is computed on the host, with llama3
// scaling already applied.

// Grid: tokens; block: 128. Token t's q heads start at q + t * row_stride and its k heads at
// k + t * row_stride (q, k and v share one fused row of row_stride floats).
extern "C" __global__ void rope_f32(float* q, float* k, const u32* positions,
                                    const float* inv_freq, int n_heads, int n_kv_heads,
                                    int head_dim, int row_stride) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    const int pairs = (n_heads + n_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        float* base = head < n_heads
                          ? q + (size_t)t * row_stride + (size_t)head * head_dim
                          : k + (size_t)t * row_stride + (size_t)(head - n_heads) * head_dim;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const float a = base[i], b = base[i + half];
        base[i] = a * c - b * s;
        base[i + half] = b * c + a * s;
    }
}
