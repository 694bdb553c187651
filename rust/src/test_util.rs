//! Helpers shared by the unit tests of several modules.

use ndarray::Array2;

/// An `n × d` matrix of values in [-0.5, 0.5) from a seeded linear congruential generator: the same
/// numbers on every platform, without a random-number crate.
pub(crate) fn random(seed: u64, n: usize, d: usize) -> Array2<f64> {
    let mut s = seed;
    Array2::from_shape_fn((n, d), |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    })
}
