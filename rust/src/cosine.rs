//! Row normalisation and blocked cosine-similarity tiles on the `gemm` crate's micro-kernels.
//!
//! Cosines are dot products of unit rows, so the only large buffer is the normalised copy of the input
//! (N×d float32); similarity matrices exist only as B×B tiles that the caller consumes at once.

use std::ops::Range;

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::error::{checked_len, try_zeroed, CoreError, CoreResult};

/// Row-major float32 matrix whose rows have unit Euclidean norm.
#[derive(Debug, Clone)]
pub struct UnitRows {
    data: Vec<f32>,
    n: usize,
    d: usize,
}

impl UnitRows {
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
}

/// Element types the kernels read directly from numpy (no intermediate copy).
pub trait Element: Copy + Send + Sync + Into<f64> + 'static {}
impl Element for f32 {}
impl Element for f64 {}

#[derive(Clone, Copy)]
enum BadRow {
    NonFinite,
    Zero,
}

/// Normalises every row of `x` (any strides, f32 or f64) into a contiguous float32 copy.
///
/// Norms are computed in float64 and rescaled by the largest magnitude when the plain sum of squares
/// overflows or underflows, so any finite non-zero row normalises. Errors name `argument` and the
/// first offending row: [`CoreError::NonFinite`] for NaN/Inf, [`CoreError::ZeroNorm`] for zero rows.
pub fn normalize_rows<T: Element>(x: ArrayView2<'_, T>, argument: &str) -> CoreResult<UnitRows> {
    let (n, d) = x.dim();
    if d == 0 {
        return Err(CoreError::empty(argument, "rows have 0 columns"));
    }
    let mut data = try_zeroed::<f32>(checked_len(n, d, argument)?, "normalised rows")?;
    let first_bad = data
        .par_chunks_mut(d)
        .enumerate()
        .filter_map(|(i, out)| normalize_row(x.row(i), out).err().map(|kind| (i, kind)))
        .min_by_key(|&(i, _)| i);
    match first_bad {
        None => Ok(UnitRows { data, n, d }),
        Some((row, BadRow::NonFinite)) => Err(CoreError::NonFinite { argument: argument.to_string(), row }),
        Some((row, BadRow::Zero)) => Err(CoreError::ZeroNorm { argument: argument.to_string(), row }),
    }
}

fn normalize_row<T: Element>(row: ndarray::ArrayView1<'_, T>, out: &mut [f32]) -> Result<(), BadRow> {
    let sum_sq = match row.as_slice() {
        Some(values) => sum_of_squares(values),
        None => row.iter().map(|&v| v.into() * v.into()).sum(),
    };
    if sum_sq.is_finite() && sum_sq > f64::MIN_POSITIVE {
        let scale = 1.0 / sum_sq.sqrt();
        for (o, &v) in out.iter_mut().zip(row.iter()) {
            *o = (v.into() * scale) as f32;
        }
        return Ok(());
    }
    // NaN/Inf, all zeros, or a finite row whose squares overflow or underflow float64: divide by the
    // largest magnitude first (dividing, not multiplying by its inverse, which overflows for subnormals).
    let mut max_abs = 0.0f64;
    for &v in row.iter() {
        let v: f64 = v.into();
        if !v.is_finite() {
            return Err(BadRow::NonFinite);
        }
        max_abs = max_abs.max(v.abs());
    }
    if max_abs == 0.0 {
        return Err(BadRow::Zero);
    }
    let rescaled: f64 = row.iter().map(|&v| (v.into() / max_abs).powi(2)).sum();
    let scale = 1.0 / rescaled.sqrt(); // rescaled ∈ [1, d]
    for (o, &v) in out.iter_mut().zip(row.iter()) {
        *o = ((v.into() / max_abs) * scale) as f32;
    }
    Ok(())
}

/// Σ v² in float64 with eight independent partial sums, so the loop vectorises.
fn sum_of_squares<T: Element>(values: &[T]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (acc, &v) in lanes.iter_mut().zip(chunk) {
            let v: f64 = v.into();
            *acc += v * v;
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&v| v.into() * v.into()).sum::<f64>()
}

/// `out[r * cols.len() + c] = <a_{rows.start + r}, b_{cols.start + c}>`: one similarity tile.
///
/// `out` must hold at least `rows.len() * cols.len()` elements; `a` and `b` must have the same width.
pub fn cosine_tile(a: &UnitRows, rows: Range<usize>, b: &UnitRows, cols: Range<usize>, out: &mut [f32]) {
    let (m, n, k) = (rows.len(), cols.len(), a.d);
    assert_eq!(a.d, b.d, "cosine_tile: widths differ");
    assert!(rows.end <= a.n && cols.end <= b.n, "cosine_tile: range out of bounds");
    assert!(out.len() >= m * n, "cosine_tile: output too small");
    if m == 0 || n == 0 {
        return;
    }
    let lhs = &a.data[rows.start * k..rows.end * k];
    let rhs = &b.data[cols.start * k..cols.end * k];
    // SAFETY: the asserts above guarantee every index the kernel touches is inside `lhs` (m×k,
    // row-major), `rhs` (n×k, row-major, read as its k×n transpose) and `out` (m×n, row-major).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,          // dst column stride
            n as isize, // dst row stride
            false,      // do not read dst
            lhs.as_ptr(),
            1,          // lhs column stride (along k)
            k as isize, // lhs row stride
            rhs.as_ptr(),
            k as isize, // rhs column stride (along n): next row of b
            1,          // rhs row stride (along k)
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Tile edge for a triangle of an N×N matrix: `largest` amortises GEMM packing best, but it is halved
/// (down to 64) until there are at least four tiles per thread to share out.
pub fn tile_edge(n: usize, largest: usize, threads: usize) -> usize {
    let mut block = largest.max(1);
    while block > 64 && n.div_ceil(block) * (n.div_ceil(block) + 1) / 2 < 4 * threads {
        block /= 2;
    }
    block
}

/// Square tiles (I, J) of an N×N matrix cut into blocks of `block` rows, in row-major tile order.
///
/// `upper = true` yields I ≤ J (the upper triangle with the diagonal), `false` yields J ≤ I.
pub fn triangle_tiles(n: usize, block: usize, upper: bool) -> Vec<(Range<usize>, Range<usize>)> {
    let blocks: Vec<Range<usize>> = (0..n).step_by(block.max(1)).map(|s| s..(s + block).min(n)).collect();
    let mut tiles = Vec::with_capacity(blocks.len() * (blocks.len() + 1) / 2);
    for (bi, rows) in blocks.iter().enumerate() {
        for (bj, cols) in blocks.iter().enumerate() {
            if (upper && bj >= bi) || (!upper && bj <= bi) {
                tiles.push((rows.clone(), cols.clone()));
            }
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn lcg(seed: u64, len: usize) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn rows_have_unit_norm_for_any_layout_and_type() {
        let x = Array2::from_shape_vec((7, 5), lcg(1, 35)).unwrap();
        let t = x.t(); // non-contiguous 5×7 view
        let u = normalize_rows(t, "x").unwrap();
        for i in 0..5 {
            let norm: f64 = u.row(i).iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6);
            let want = t[(i, 3)] / t.row(i).dot(&t.row(i)).sqrt();
            assert!((u.row(i)[3] as f64 - want).abs() < 1e-6);
        }
        let xf = x.mapv(|v| v as f32);
        let uf = normalize_rows(xf.view(), "x").unwrap();
        assert!((uf.row(2)[1] - normalize_rows(x.view(), "x").unwrap().row(2)[1]).abs() < 1e-6);
    }

    #[test]
    fn extreme_magnitudes_normalise() {
        let x = Array2::from_shape_vec((3, 2), vec![1e300, 1e300, 1e-300, -1e-300, 3e-310, 4e-310]).unwrap();
        let u = normalize_rows(x.view(), "x").unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((u.row(0)[0] - h).abs() < 1e-6 && (u.row(1)[1] + h).abs() < 1e-6);
        assert!((u.row(2)[0] - 0.6).abs() < 1e-6 && (u.row(2)[1] - 0.8).abs() < 1e-6, "subnormal row");
    }

    #[test]
    fn first_bad_row_is_named() {
        let mut x = Array2::<f64>::ones((6, 3));
        x[(4, 1)] = f64::NAN;
        x[(2, 0)] = f64::INFINITY;
        match normalize_rows(x.view(), "keys") {
            Err(CoreError::NonFinite { argument, row }) => assert_eq!((argument.as_str(), row), ("keys", 2)),
            other => panic!("unexpected {other:?}"),
        }
        let mut z = Array2::<f32>::ones((6, 3));
        z.row_mut(5).fill(0.0);
        assert!(matches!(normalize_rows(z.view(), "r"), Err(CoreError::ZeroNorm { row: 5, .. })));
    }

    #[test]
    fn tiles_match_naive_dot_products() {
        let (n, d) = (37, 11);
        let x = Array2::from_shape_vec((n, d), lcg(7, n * d)).unwrap();
        let u = normalize_rows(x.view(), "x").unwrap();
        let mut out = vec![0f32; 13 * 20];
        cosine_tile(&u, 5..18, &u, 17..37, &mut out);
        for r in 0..13 {
            for c in 0..20 {
                let want: f32 = u.row(5 + r).iter().zip(u.row(17 + c)).map(|(a, b)| a * b).sum();
                assert!((out[r * 20 + c] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn triangle_tiles_cover_each_unordered_block_pair_once() {
        let up = triangle_tiles(10, 4, true);
        assert_eq!(up.len(), 6);
        assert!(up.iter().all(|(r, c)| r.start <= c.start));
        let low = triangle_tiles(10, 4, false);
        assert!(low.iter().all(|(r, c)| r.start >= c.start));
        assert_eq!(low.last().unwrap(), &(8..10, 8..10));
    }
}
