//! Summary statistics with numpy's exact semantics.
//!
//! benchmark_serving.py reduces every latency list with `np.mean`, `np.median`, `np.std`
//! (population, ddof = 0) and `np.percentile` (linear interpolation between closest ranks), and
//! an empty list counts as `[0]`. These functions reproduce that so the figures agree to the
//! last printed digit. Approximate live figures come from HDR histograms in `progress`, never
//! from here.

/// Arithmetic mean; 0 for an empty slice (numpy on `[] or 0`).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Population standard deviation (numpy's default ddof = 0); 0 for an empty slice.
pub fn std_dev(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = mean(values);
    let var = values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64;
    var.sqrt()
}

/// The `p`-th percentile (0..=100) with numpy's default linear interpolation; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile_sorted(&sorted, p)
}

/// As [`percentile`] on an already ascending slice (saves the sort when several are asked).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            let frac = rank - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

/// Median (the 50th percentile); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Mean, median, standard deviation and the requested percentiles of one metric, in the unit
/// the values were given in.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `np.mean`.
    pub mean: f64,
    /// `np.median`.
    pub median: f64,
    /// `np.std`.
    pub std: f64,
    /// `(p, np.percentile(values, p))` for each requested `p`, in request order.
    pub percentiles: Vec<(f64, f64)>,
}

impl Summary {
    /// Summarises `values`, each multiplied by `scale` (1000 turns seconds into milliseconds).
    pub fn of(values: &[f64], scale: f64, percentiles: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Summary {
            mean: mean(values) * scale,
            median: percentile_sorted(&sorted, 50.0) * scale,
            std: std_dev(values) * scale,
            percentiles: percentiles
                .iter()
                .map(|&p| (p, percentile_sorted(&sorted, p) * scale))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_inputs_reduce_to_zero_like_numpy_on_a_zero_list() {
        assert_eq!(mean(&[]), 0.0);
        assert_eq!(std_dev(&[]), 0.0);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[test]
    fn percentile_interpolates_linearly_between_closest_ranks() {
        // np.percentile([1, 2, 3, 4], 99) = 3 + 0.97 * (4 - 3) = 3.97
        let v = [4.0, 1.0, 3.0, 2.0];
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert!((median(&v) - 2.5).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
    }

    #[test]
    fn std_is_the_population_deviation() {
        // np.std([2, 4, 4, 4, 5, 5, 7, 9]) = 2.0
        let v = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert!((std_dev(&v) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn summary_scales_every_figure() {
        let s = Summary::of(&[0.001, 0.003], 1000.0, &[50.0, 99.0]);
        assert!((s.mean - 2.0).abs() < 1e-9);
        assert!((s.median - 2.0).abs() < 1e-9);
        assert!((s.std - 1.0).abs() < 1e-9);
        assert!((s.percentiles[1].1 - 2.98).abs() < 1e-9);
    }
}
