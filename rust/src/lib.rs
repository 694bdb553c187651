//! `eamet._core`: the Rust half of eamet.
//!
//! Plain-Rust kernels on arrays and slices (usable from Rust tests and benches) with one thin PyO3
//! layer on top (`py.rs`). Modules:
//!
//! * [`cosine`] — row normalisation and GEMM similarity tiles;
//! * [`topm`] — bounded top-M selection and the `neighbors` kernel;
//! * [`misalign`] — the fused per-tile misalignment pass;
//! * [`covariance`] — the `SecondMoment` accumulator;
//! * [`pool`] — the fork-safe thread pool and progress/cancellation;
//! * [`error`] — the one error type.

pub mod cosine;
pub mod covariance;
pub mod error;
pub mod misalign;
pub mod pool;
mod py;
mod simd;
pub mod topm;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::register(m)
}
