//! `SecondMoment`: streaming Σ x xᵀ in float64 with a symmetric (upper-triangle) update and merge.
//!
//! Only the blocks on and above the diagonal are computed, which halves the GEMM work of a plain
//! `XᵀX`. Float32 batches are multiplied in float32 in chunks of at most [`CHUNK_ROWS`] rows (the
//! rounding of one chunk's dot products, like a float32 `XᵀX`), and every chunk is added into the
//! float64 sum, so the error does not grow with the number of samples. Float64 batches are
//! multiplied and accumulated in float64.
//!
//! Submodules: `strips` (the GEMM strips, the accumulator's only unsafe code) and `file` (the
//! checksummed safetensors file of [`SecondMoment::save`] and [`SecondMoment::load`]).

mod file;
mod strips;

use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayView1, ArrayView2};
use rayon::prelude::*;

use crate::cosine::Element;
use crate::error::{checked_len, try_zeroed, CoreError, CoreResult};

/// Rows multiplied in one float32 GEMM before the result is added into the float64 sum.
pub const CHUNK_ROWS: usize = 2048;

/// Largest row count an accumulator may be given: counts stay within a signed 64-bit integer, the
/// integer type of numpy and torch.
pub const MAX_COUNT: u64 = i64::MAX as u64;

/// The element types of the batches an accumulator has seen; written as "none", "float32",
/// "float64" or "mixed" (the Python attribute and the file's `input_dtype` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputDtype {
    /// No batch yet.
    #[default]
    None,
    Float32,
    Float64,
    /// Batches of both types.
    Mixed,
}

impl InputDtype {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Float32 => "float32",
            Self::Float64 => "float64",
            Self::Mixed => "mixed",
        }
    }

    /// The element types of two sets of batches together: `None` adds nothing, two different
    /// types make `Mixed`.
    #[must_use]
    pub const fn merge(self, other: Self) -> Self {
        match (self, other) {
            (Self::None, x) | (x, Self::None) => x,
            (Self::Float32, Self::Float32) => Self::Float32,
            (Self::Float64, Self::Float64) => Self::Float64,
            _ => Self::Mixed,
        }
    }
}

impl fmt::Display for InputDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is none of "none", "float32", "float64" and "mixed".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown input_dtype '{0}'")]
pub struct UnknownInputDtype(pub String);

impl FromStr for InputDtype {
    type Err = UnknownInputDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::None, Self::Float32, Self::Float64, Self::Mixed]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownInputDtype(s.to_string()))
    }
}

/// Element types a batch may have, and how a tile of their products reaches the float64 sum.
pub trait BatchElement: Element {
    /// What `SecondMoment::input_dtype` records once a batch of this type was added.
    const INPUT_DTYPE: InputDtype;
    const ZERO: Self;
    const ONE: Self;
}

impl BatchElement for f32 {
    const INPUT_DTYPE: InputDtype = InputDtype::Float32;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl BatchElement for f64 {
    const INPUT_DTYPE: InputDtype = InputDtype::Float64;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// Streaming accumulator of Σ x xᵀ over rows x of dimension `dim`.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    dim: usize,
    count: u64,
    /// dim×dim row-major; entries with column ≥ row hold the sum, the rest is scratch.
    sum: Vec<f64>,
    /// The element types of the batches accumulated.
    input_dtype: InputDtype,
}

impl SecondMoment {
    /// An empty accumulator for rows of dimension `dim` (≥ 1); allocates dim² float64.
    pub fn new(dim: usize) -> CoreResult<Self> {
        if dim == 0 {
            return Err(CoreError::parameter("dim", "must be at least 1, got 0"));
        }
        Ok(Self {
            dim,
            count: 0,
            sum: try_zeroed(checked_len(dim, dim, "dim")?, "the second-moment sum")?,
            input_dtype: InputDtype::None,
        })
    }

    /// An accumulator holding an already-accumulated sum `total` = Σ x xᵀ (dim×dim, any strides) over
    /// `count` rows (1 ≤ count ≤ [`MAX_COUNT`]) whose element type was `input_dtype` ("float32",
    /// "float64" or "mixed"), e.g. one summed on a GPU. Only the upper triangle (diagonal included) is
    /// read, as `update` keeps it; the whole matrix must be finite.
    pub fn from_sum<T: Element>(total: ArrayView2<'_, T>, count: u64, input_dtype: &str) -> CoreResult<Self> {
        let (rows, cols) = total.dim();
        if rows != cols {
            return Err(CoreError::shape("total", format!("must be square, got {rows}x{cols}")));
        }
        if rows == 0 {
            return Err(CoreError::empty("total", "is 0x0"));
        }
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(CoreError::parameter("count", format!("must be in [1, 2**63), got {count}")));
        }
        let input_dtype = match input_dtype.parse() {
            Ok(InputDtype::None) | Err(_) => {
                return Err(CoreError::parameter(
                    "input_dtype",
                    format!("must be 'float32', 'float64' or 'mixed', got '{input_dtype}'"),
                ))
            }
            Ok(known) => known,
        };
        let first_bad = (0..rows).into_par_iter().filter(|&i| !row_is_finite(total.row(i))).min();
        if let Some(row) = first_bad {
            return Err(CoreError::NonFinite { argument: "total".into(), row });
        }
        let mut acc = Self::new(rows)?;
        acc.sum.par_chunks_mut(rows).enumerate().for_each(|(i, out)| {
            for (o, &v) in out[i..].iter_mut().zip(total.row(i).slice(ndarray::s![i..])) {
                *o = v.into();
            }
        });
        acc.count = count;
        acc.input_dtype = input_dtype;
        Ok(acc)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows accumulated so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The element types of the batches accumulated.
    pub fn input_dtype(&self) -> InputDtype {
        self.input_dtype
    }

    /// Adds Σ x xᵀ over the rows of `batch` (n×dim, any strides). An empty batch changes nothing; a
    /// batch with NaN/Inf is rejected, naming its first bad row, before anything is added.
    pub fn update<T: BatchElement>(&mut self, batch: ArrayView2<'_, T>) -> CoreResult<()> {
        let (rows, cols) = batch.dim();
        if cols != self.dim {
            return Err(CoreError::shape(
                "batch",
                format!("has {cols} columns but the accumulator has dim {}", self.dim),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let first_bad = (0..rows).into_par_iter().filter(|&i| !row_is_finite(batch.row(i))).min();
        if let Some(row) = first_bad {
            return Err(CoreError::NonFinite { argument: "batch".into(), row });
        }
        let mut contiguous: Vec<T> = Vec::new();
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let chunk = batch.slice(ndarray::s![start..(start + CHUNK_ROWS).min(rows), ..]);
            let data: &[T] = match chunk.as_slice() {
                Some(s) => s,
                None => {
                    contiguous.clear();
                    contiguous.extend(chunk.iter().copied());
                    &contiguous
                }
            };
            strips::add_strips(&mut self.sum, self.dim, data, chunk.nrows())?;
        }
        self.count += rows as u64;
        self.input_dtype = self.input_dtype.merge(T::INPUT_DTYPE);
        Ok(())
    }

    /// Adds another accumulator of the same dimension into this one.
    pub fn merge(&mut self, other: &SecondMoment) -> CoreResult<()> {
        if other.dim != self.dim {
            return Err(CoreError::shape(
                "other",
                format!("has dim {} but this accumulator has dim {}", other.dim, self.dim),
            ));
        }
        self.sum.par_iter_mut().zip(other.sum.par_iter()).for_each(|(a, b)| *a += *b);
        self.count += other.count;
        self.input_dtype = self.input_dtype.merge(other.input_dtype);
        Ok(())
    }

    /// Σ x xᵀ / count as a full symmetric dim×dim row-major matrix.
    pub fn moment(&self) -> CoreResult<Vec<f64>> {
        if self.count == 0 {
            return Err(CoreError::empty("SecondMoment", "no rows have been accumulated"));
        }
        let dim = self.dim;
        let inv = 1.0 / self.count as f64;
        let mut out = try_zeroed::<f64>(dim * dim, "the moment matrix")?;
        out.par_chunks_mut(dim).enumerate().for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                let (a, b) = if j >= i { (i, j) } else { (j, i) };
                *v = self.sum[a * dim + b] * inv;
            }
        });
        Ok(out)
    }
}

/// `false` if the row holds a NaN or an infinity (`v · 0` is NaN exactly for those).
fn row_is_finite<T: Element>(row: ArrayView1<'_, T>) -> bool {
    match row.as_slice() {
        Some(values) => {
            let mut lanes = [0f64; 8];
            let chunks = values.chunks_exact(8);
            let tail_ok = chunks.remainder().iter().all(|&v| v.into().is_finite());
            for chunk in chunks {
                for (acc, &v) in lanes.iter_mut().zip(chunk) {
                    let v: f64 = v.into();
                    *acc += v * 0.0;
                }
            }
            tail_ok && lanes.iter().all(|&l| l == 0.0)
        }
        None => row.iter().all(|&v| v.into().is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::random;
    use ndarray::Array2;

    fn naive(x: &Array2<f64>) -> Array2<f64> {
        x.t().dot(x) / x.nrows() as f64
    }

    #[test]
    fn float64_batches_match_xtx_exactly_enough() {
        let x = random(1, 300, 70);
        let mut acc = SecondMoment::new(70).unwrap();
        acc.update(x.view()).unwrap();
        let got = Array2::from_shape_vec((70, 70), acc.moment().unwrap()).unwrap();
        assert!((&got - &naive(&x)).iter().all(|v| v.abs() < 1e-13));
        assert_eq!(acc.input_dtype(), InputDtype::Float64);
    }

    #[test]
    fn float32_batches_strided_and_chunked_match() {
        let x = random(2, CHUNK_ROWS + 37, 300);
        let xf = x.mapv(|v| v as f32);
        let mut acc = SecondMoment::new(300).unwrap();
        acc.update(xf.t().t()).unwrap(); // contiguous
        let mut strided = SecondMoment::new(300).unwrap();
        let fortran = xf.t().as_standard_layout().to_owned();
        strided.update(fortran.t()).unwrap(); // non-contiguous view of the same data
        let want = naive(&xf.mapv(|v| v as f64));
        for a in [&acc, &strided] {
            let got = Array2::from_shape_vec((300, 300), a.moment().unwrap()).unwrap();
            assert!((&got - &want).iter().all(|v| v.abs() < 1e-6));
            assert_eq!(a.count(), (CHUNK_ROWS + 37) as u64);
        }
    }

    #[test]
    fn merge_of_splits_equals_one_pass() {
        let x = random(3, 200, 33);
        let mut whole = SecondMoment::new(33).unwrap();
        whole.update(x.view()).unwrap();
        let mut a = SecondMoment::new(33).unwrap();
        let mut b = SecondMoment::new(33).unwrap();
        a.update(x.slice(ndarray::s![..71, ..])).unwrap();
        b.update(x.slice(ndarray::s![71.., ..]).mapv(|v| v as f32).view()).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 200);
        assert_eq!(a.input_dtype(), InputDtype::Mixed);
        let (ma, mw) = (a.moment().unwrap(), whole.moment().unwrap());
        assert!(ma.iter().zip(&mw).all(|(p, q)| (p - q).abs() < 1e-7));
        assert!(matches!(a.merge(&SecondMoment::new(4).unwrap()), Err(CoreError::Shape { .. })));
    }

    #[test]
    fn bad_batches_leave_the_sum_untouched() {
        let mut acc = SecondMoment::new(3).unwrap();
        acc.update(random(4, 5, 3).view()).unwrap();
        let before = acc.moment().unwrap();
        let mut x = random(5, 6, 3);
        x[(4, 2)] = f64::NAN;
        assert!(matches!(acc.update(x.view()), Err(CoreError::NonFinite { row: 4, .. })));
        assert!(matches!(acc.update(random(6, 2, 4).view()), Err(CoreError::Shape { .. })));
        assert_eq!(acc.moment().unwrap(), before);
        assert_eq!(acc.count(), 5);
        assert!(matches!(SecondMoment::new(2).unwrap().moment(), Err(CoreError::Empty { .. })));
    }

    #[test]
    fn from_sum_equals_update_and_reads_the_upper_triangle() {
        let x = random(8, 40, 7);
        let mut streamed = SecondMoment::new(7).unwrap();
        streamed.update(x.view()).unwrap();
        let mut total = x.t().dot(&x);
        for i in 1..7 {
            total[(i, 0)] = 1e9; // the lower triangle is ignored
        }
        let acc = SecondMoment::from_sum(total.view(), 40, "float64").unwrap();
        let (got, want) = (acc.moment().unwrap(), streamed.moment().unwrap());
        assert!(got.iter().zip(&want).all(|(p, q)| (p - q).abs() <= 1e-12 * q.abs().max(1e-3)));
        assert_eq!((acc.count(), acc.input_dtype()), (40, InputDtype::Float64));
        let single = total.mapv(|v| v as f32);
        let strided = SecondMoment::from_sum(single.t(), 3, "mixed").unwrap();
        assert_eq!((strided.dim(), strided.input_dtype()), (7, InputDtype::Mixed));
        assert_eq!(strided.moment().unwrap()[7], (total[(1, 0)] as f32) as f64 / 3.0, "transposed view");

        total[(5, 6)] = f64::INFINITY;
        assert!(matches!(
            SecondMoment::from_sum(total.view(), 40, "float64"),
            Err(CoreError::NonFinite { row: 5, .. })
        ));
        let ok = x.t().dot(&x);
        assert!(matches!(SecondMoment::from_sum(ok.view(), 0, "float64"), Err(CoreError::Parameter { .. })));
        assert!(matches!(SecondMoment::from_sum(ok.view(), 1, "none"), Err(CoreError::Parameter { .. })));
        assert!(matches!(SecondMoment::from_sum(x.view(), 1, "float32"), Err(CoreError::Shape { .. })));
        let empty = Array2::<f64>::zeros((0, 0));
        assert!(matches!(SecondMoment::from_sum(empty.view(), 1, "float32"), Err(CoreError::Empty { .. })));
    }

    #[test]
    fn from_sum_names_count_and_input_dtype() {
        let eye = Array2::<f64>::eye(2);
        let argument = |r: CoreResult<SecondMoment>| match r {
            Err(CoreError::Parameter { argument, .. }) => argument,
            other => panic!("expected a parameter error, got {other:?}"),
        };
        assert_eq!(SecondMoment::from_sum(eye.view(), MAX_COUNT, "float32").unwrap().count(), MAX_COUNT);
        assert_eq!(argument(SecondMoment::from_sum(eye.view(), MAX_COUNT + 1, "float32")), "count");
        assert_eq!(argument(SecondMoment::from_sum(eye.view(), 0, "float32")), "count");
        for bad in ["none", "Float32", "float16", ""] {
            assert_eq!(argument(SecondMoment::from_sum(eye.view(), 1, bad)), "input_dtype", "{bad:?}");
        }
    }

    #[test]
    fn input_dtype_strings_round_trip_and_merge() {
        use InputDtype::*;
        for d in [None, Float32, Float64, Mixed] {
            assert_eq!(d.to_string().parse::<InputDtype>(), Ok(d));
            assert_eq!(d.to_string(), d.as_str());
            assert_eq!((d.merge(None), None.merge(d), d.merge(d), d.merge(Mixed)), (d, d, d, Mixed));
        }
        assert_eq!(
            ["none", "float32", "float64", "mixed"].map(|s| s.parse::<InputDtype>().unwrap()),
            [None, Float32, Float64, Mixed]
        );
        assert_eq!((Float32.merge(Float64), Float64.merge(Float32)), (Mixed, Mixed));
        assert_eq!("Float32".parse::<InputDtype>(), Err(UnknownInputDtype("Float32".into())));
    }
}
