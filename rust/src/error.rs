//! The one error type of the Rust core.
//!
//! Every kernel returns `Result<_, CoreError>`; `py.rs` converts each variant to its own Python class in
//! `eamet.errors` (one place, one mapping). Variants carry the offending argument and row so that the
//! Python exception can name them.

use std::path::Path;

/// Errors raised by the kernels. The Python class each one becomes is given in brackets.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Wrong number of dimensions, mismatched lengths or widths. [`ShapeError`]
    #[error("{argument}: {message}")]
    Shape { argument: String, message: String },

    /// An array or accumulator with nothing in it. [`EmptyError`]
    #[error("{argument}: {message}")]
    Empty { argument: String, message: String },

    /// An unsupported element type. [`DTypeError`]
    #[error("{argument}: {message}")]
    DType { argument: String, message: String },

    /// A NaN or infinite value; `row` is the first row that holds one. [`NonFiniteError`]
    #[error("{argument}: row {row} contains a NaN or infinite value")]
    NonFinite { argument: String, row: usize },

    /// A row whose norm is zero, so its cosine similarity is undefined. [`ZeroNormError`]
    #[error("{argument}: row {row} has zero norm, so its cosine similarity is undefined")]
    ZeroNorm { argument: String, row: usize },

    /// A scalar argument out of range (τ ≤ 0, top_m < 1, ...). [`ParameterError`]
    #[error("{argument}: {message}")]
    Parameter { argument: String, message: String },

    /// A saved file that is not a valid, intact file of the expected kind. [`CacheError`]
    #[error("{path}: {message}")]
    Cache { path: String, message: String },

    /// An operating-system error while reading or writing a file. [`OSError`]
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A buffer too large to allocate. [`MemoryError`]
    #[error("could not allocate {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: usize },

    /// The caller asked the computation to stop (Ctrl-C from Python). [`KeyboardInterrupt`]
    #[error("interrupted")]
    Cancelled,

    /// A bug in the core: a caught panic or a broken invariant. [`EametError`]
    #[error("internal error in eamet._core (please report it): {0}")]
    Internal(String),
}

impl CoreError {
    pub fn shape(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Shape { argument: argument.into(), message: message.into() }
    }

    pub fn empty(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Empty { argument: argument.into(), message: message.into() }
    }

    pub fn dtype(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Self::DType { argument: argument.into(), message: message.into() }
    }

    pub fn parameter(argument: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Parameter { argument: argument.into(), message: message.into() }
    }

    pub fn cache(path: &Path, message: impl Into<String>) -> Self {
        Self::Cache { path: path.display().to_string(), message: message.into() }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

/// Allocates a zeroed vector of `len` elements, reporting failure instead of aborting the process.
pub fn try_zeroed<T: Clone + Default>(len: usize, what: &'static str) -> Result<Vec<T>, CoreError> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| CoreError::OutOfMemory { what, bytes })?;
    v.resize(len, T::default());
    Ok(v)
}

/// `a * b`, or a shape error naming `argument` when the product overflows `usize`.
pub fn checked_len(a: usize, b: usize, argument: &str) -> Result<usize, CoreError> {
    a.checked_mul(b).ok_or_else(|| CoreError::shape(argument, format!("{a} x {b} elements overflow usize")))
}

pub type CoreResult<T> = Result<T, CoreError>;
