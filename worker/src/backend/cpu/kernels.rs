//! Small per-row kernels: RMSNorm, rotary embeddings, SiLU gating, softmax.

use llmapi_common::model_config::{ModelConfig, RopeScaling};

/// Sum of squares in 16 independent partial sums (a single running sum is one long chain
/// of dependent additions; the partial sums vectorize).
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out = x / rms(x) * w` for one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = sum_sq(x) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// In-place RMSNorm of one row.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = sum_sq(x) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * inv * g;
    }
}

/// `out[i] = silu(gate[i]) * up[i]` where `gate_up = [gate; up]`.
pub fn silu_mul(gate_up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above).
            unsafe { super::vmath::silu_mul16(gate_up, out) };
            return;
        }
    }
    silu_mul_scalar(gate_up, out);
}

/// [`silu_mul`] one element at a time.
pub fn silu_mul_scalar(gate_up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (gate, up) = gate_up.split_at(n);
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Rotary embedding frequencies of a model (HF `rotate_half` convention).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Frequencies from rope_theta, head_dim and rope_scaling (linear or llama3).
    pub fn new(c: &ModelConfig) -> Self {
        let d = c.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match c.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self { inv_freq }
    }

    /// The frequencies as f32 (head_dim / 2), scaling applied: what a device kernel multiplies
    /// positions by, as `table` does.
    pub fn inv_freq_f32(&self) -> Vec<f32> {
        self.inv_freq.iter().map(|&f| f as f32).collect()
    }

    /// cos and sin tables (head_dim / 2 each) for position `pos`.
    pub fn table(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            // f32 angle as transformers computes it, so large positions round the same way.
            let angle = (pos as f32) * (f as f32);
            cos[i] = angle.cos();
            sin[i] = angle.sin();
        }
    }
}

/// Rotates one head in place: pairs are `(x[i], x[i + d/2])`.
pub fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}
