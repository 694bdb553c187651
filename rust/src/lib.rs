//! `eamet._core`: the Rust half of eamet.
//!
//! Plain-Rust kernels on arrays and slices (usable from Rust tests and benches) with one thin PyO3
//! layer on top (`py.rs`, compiled only with the `python` feature, which maturin turns on). Modules:
//!
//! * [`cosine`] — row normalisation and GEMM similarity tiles;
//! * [`topm`] — bounded top-M selection and the `neighbors` kernel;
//! * [`misalign`] — the fused per-tile misalignment pass;
//! * [`covariance`] — the `SecondMoment` accumulator and its file format;
//! * [`pool`] — the fork-safe thread pool and progress/cancellation;
//! * [`error`] — the one error type.

pub mod cosine;
pub mod covariance;
pub mod error;
pub mod misalign;
pub mod pool;
#[cfg(feature = "python")]
mod py;
mod simd;
#[cfg(test)]
mod test_util;
pub mod topm;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::types::PyModuleMethods;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::register(m)
}
