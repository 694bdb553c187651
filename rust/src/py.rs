//! Thin PyO3 wrappers: borrow numpy arrays read-only, convert arguments, release the GIL, map errors.
//!
//! No maths and no range checks live here: the kernels check their own arguments and name them in
//! their errors; this layer only rejects what the Rust types cannot hold (a negative int for a
//! `usize`). Long kernels run on a worker thread while the calling thread waits with the
//! GIL released, waking every 100 ms to run Python signal handlers (Ctrl-C cancels the kernel between
//! tiles) and to report progress to an optional callback.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::covariance::SecondMoment;
use crate::error::{CoreError, CoreResult};
use crate::misalign::{misalignment as misalignment_kernel, MisalignParams};
use crate::pool::{self, Control};
use crate::topm::neighbor_lists;

/// Builds an instance of `eamet.errors.<class>` with keyword attributes.
fn eamet_error(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("eamet.errors")?.getattr(class)?;
        let kwargs = PyDict::new(py);
        for (k, v) in attrs {
            kwargs.set_item(*k, v)?;
        }
        Ok(PyErr::from_value(cls.call((message.clone(),), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| PyRuntimeError::new_err(format!("{message} (eamet.errors unavailable: {e})")))
}

fn core_to_py(py: Python<'_>, err: CoreError) -> PyErr {
    let message = err.to_string();
    let arg = |a: &str| ("argument", a.into_pyobject(py).expect("str").into_any().unbind());
    let row = |r: usize| ("row", r.into_pyobject(py).expect("int").into_any().unbind());
    match &err {
        CoreError::Shape { argument, .. } => eamet_error(py, "ShapeError", message, &[arg(argument)]),
        CoreError::Empty { argument, .. } => eamet_error(py, "EmptyError", message, &[arg(argument)]),
        CoreError::DType { argument, .. } => eamet_error(py, "DTypeError", message, &[arg(argument)]),
        CoreError::NonFinite { argument, row: r } => {
            eamet_error(py, "NonFiniteError", message, &[arg(argument), row(*r)])
        }
        CoreError::ZeroNorm { argument, row: r } => {
            eamet_error(py, "ZeroNormError", message, &[arg(argument), row(*r)])
        }
        CoreError::Parameter { argument, .. } => eamet_error(py, "ParameterError", message, &[arg(argument)]),
        CoreError::Cache { path, .. } => eamet_error(
            py,
            "CacheError",
            message,
            &[("path", path.as_str().into_pyobject(py).expect("str").into_any().unbind())],
        ),
        CoreError::Io { path, source } => {
            // OSError(errno, strerror, filename) picks the right subclass (FileNotFoundError, ...).
            let os_error = || -> PyResult<PyErr> {
                let cls = py.import("builtins")?.getattr("OSError")?;
                let inst = match source.raw_os_error() {
                    Some(code) => cls.call1((code, source.to_string(), path.as_str()))?,
                    None => cls.call1((message.clone(),))?,
                };
                Ok(PyErr::from_value(inst))
            };
            os_error().unwrap_or_else(|e| e)
        }
        CoreError::OutOfMemory { .. } => PyMemoryError::new_err(message),
        CoreError::Cancelled => PyKeyboardInterrupt::new_err(message),
        CoreError::Internal(_) => eamet_error(py, "EametError", message, &[]),
    }
}

/// A 2-D float32 or float64 numpy array, borrowed read-only (zero-copy, any strides).
enum FloatMatrix<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

impl<'py> FloatMatrix<'py> {
    fn extract(obj: &Bound<'py, PyAny>, argument: &str) -> PyResult<Self> {
        let py = obj.py();
        let Ok(array) = obj.cast::<PyUntypedArray>() else {
            let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            return Err(core_to_py(
                py,
                CoreError::dtype(argument, format!("expected a numpy array, got {type_name}")),
            ));
        };
        if array.ndim() != 2 {
            return Err(core_to_py(
                py,
                CoreError::shape(
                    argument,
                    format!("expected a 2-D array, got {} dimension(s) {:?}", array.ndim(), array.shape()),
                ),
            ));
        }
        if let Ok(a) = obj.cast::<PyArray2<f32>>() {
            return Ok(Self::F32(a.try_readonly().map_err(|e| PyRuntimeError::new_err(e.to_string()))?));
        }
        if let Ok(a) = obj.cast::<PyArray2<f64>>() {
            return Ok(Self::F64(a.try_readonly().map_err(|e| PyRuntimeError::new_err(e.to_string()))?));
        }
        let dtype = array.dtype().str().map(|s| s.to_string()).unwrap_or_default();
        Err(core_to_py(
            py,
            CoreError::dtype(argument, format!("dtype {dtype} is not supported; pass float32 or float64")),
        ))
    }
}

/// Evaluates `$body` with `$view` bound to the `ArrayView2` of a [`FloatMatrix`], whichever its
/// element type: one generic kernel call, compiled for float32 and float64.
macro_rules! with_view {
    ($matrix:expr, |$view:ident| $body:expr) => {
        match $matrix {
            FloatMatrix::F32(a) => {
                let $view = a.as_array();
                $body
            }
            FloatMatrix::F64(a) => {
                let $view = a.as_array();
                $body
            }
        }
    };
}

/// Runs `work` on the core's pool from a worker thread while this thread waits without the GIL,
/// polling for Ctrl-C and reporting `(done, total)` to `progress` every 100 ms.
fn run_interruptible<R: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Control) -> CoreResult<R> + Send,
) -> PyResult<R> {
    let control = Control::new();
    let (tx, rx) = mpsc::channel();
    let outcome = std::thread::scope(|scope| {
        let ctl = &control;
        scope.spawn(move || {
            let _ = tx.send(pool::run(|| work(ctl)));
        });
        let mut python_error: Option<PyErr> = None;
        let mut rx = rx;
        loop {
            // The receiver is Send but not Sync: move it into the GIL-free wait and back out.
            let (back, received) = py.detach(move || {
                let r = rx.recv_timeout(Duration::from_millis(100));
                (rx, r)
            });
            rx = back;
            match received {
                Ok(result) => return (result, python_error),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return (Err(CoreError::Internal("worker thread vanished".into())), python_error)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if python_error.is_some() {
                continue; // already cancelling; wait for the worker to stop
            }
            let poll = py.check_signals().and_then(|()| match progress {
                Some(cb) => cb.call1(control.progress()).map(|_| ()),
                None => Ok(()),
            });
            if let Err(e) = poll {
                control.cancel();
                python_error = Some(e);
            }
        }
    });
    match outcome {
        (_, Some(python_error)) => Err(python_error),
        (Err(e), None) => Err(core_to_py(py, e)),
        (Ok(value), None) => {
            if let Some(cb) = progress {
                let (_, total) = control.progress();
                cb.call1((total, total))?;
            }
            Ok(value)
        }
    }
}

/// Converts an int argument to the unsigned type a kernel takes. Ints arrive as `i128`, so that
/// negative and oversized values reach this function instead of failing inside PyO3 as a bare
/// OverflowError; the kernel checks the range it needs, this only names `argument` in a
/// ParameterError for a value the type cannot hold.
fn unsigned_arg<T: TryFrom<i128>>(py: Python<'_>, value: i128, argument: &str) -> PyResult<T> {
    T::try_from(value).map_err(|_| {
        let rule = if value < 0 {
            "must not be negative".to_string()
        } else {
            format!("must be below 2**{}", 8 * std::mem::size_of::<T>())
        };
        core_to_py(py, CoreError::parameter(argument, format!("{rule}, got {value}")))
    })
}

/// Fused misalignment kernel; see `eamet.misalignment` for the documented entry point.
#[pyfunction]
#[pyo3(signature = (keys, residuals, *, tau, top_m, progressive, block=0, progress=None))]
#[allow(clippy::too_many_arguments)]
fn misalignment<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    residuals: &Bound<'py, PyAny>,
    tau: f64,
    top_m: i128,
    progressive: bool,
    block: i128,
    progress: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let keys = FloatMatrix::extract(keys, "keys")?;
    let residuals = FloatMatrix::extract(residuals, "residuals")?;
    let params = MisalignParams {
        tau,
        top_m: unsigned_arg(py, top_m, "top_m")?,
        progressive,
        block: unsigned_arg(py, block, "block")?,
    };
    let out = with_view!(&keys, |k| with_view!(&residuals, |r| {
        run_interruptible(py, progress, |c| misalignment_kernel(k, r, &params, c))?
    }));
    let (n, m) = (out.n, out.m);
    let matrix = |v: Vec<i64>| v.into_pyarray(py).reshape([n, m]);
    let matrix32 = |v: Vec<f32>| v.into_pyarray(py).reshape([n, m]);
    let dict = PyDict::new(py);
    dict.set_item("scores", PyArray1::from_vec(py, out.scores))?;
    dict.set_item("reverse_scores", PyArray1::from_vec(py, out.reverse_scores))?;
    dict.set_item("overlap", PyArray1::from_vec(py, out.overlap))?;
    dict.set_item("topm_mse", PyArray1::from_vec(py, out.topm_mse))?;
    dict.set_item("key_neighbors", matrix(out.key_neighbors)?)?;
    dict.set_item("neighbor_key_cos", matrix32(out.neighbor_key_cos)?)?;
    dict.set_item("neighbor_residual_cos", matrix32(out.neighbor_residual_cos)?)?;
    dict.set_item("top_m", m)?;
    Ok(dict)
}

/// `(indices, similarities)`, both N×M.
type NeighborArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// Per-row top-M neighbours by cosine, self excluded (only earlier rows when `progressive`); see
/// `eamet.neighbors`.
#[pyfunction]
#[pyo3(signature = (x, top_m, *, progressive=false, block=0, progress=None))]
fn neighbors<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    top_m: i128,
    progressive: bool,
    block: i128,
    progress: Option<&Bound<'py, PyAny>>,
) -> PyResult<NeighborArrays<'py>> {
    let top_m = unsigned_arg(py, top_m, "top_m")?;
    let block = unsigned_arg(py, block, "block")?;
    let x = FloatMatrix::extract(x, "x")?;
    let out = with_view!(&x, |v| {
        run_interruptible(py, progress, |c| neighbor_lists(v, top_m, progressive, block, c))?
    });
    let (n, m) = (out.n, out.m);
    Ok((out.indices.into_pyarray(py).reshape([n, m])?, out.sims.into_pyarray(py).reshape([n, m])?))
}

/// Streaming Σ x xᵀ accumulator; see `eamet.SecondMoment` for the documented wrapper.
#[pyclass(module = "eamet._core", name = "SecondMoment")]
pub struct PySecondMoment {
    inner: SecondMoment,
}

#[pymethods]
impl PySecondMoment {
    #[new]
    fn new(py: Python<'_>, dim: i128) -> PyResult<Self> {
        let dim = unsigned_arg(py, dim, "dim")?;
        Ok(Self { inner: SecondMoment::new(dim).map_err(|e| core_to_py(py, e))? })
    }

    /// An accumulator from an already-accumulated Σ x xᵀ (upper triangle read) over `count` rows.
    #[staticmethod]
    #[pyo3(signature = (total, count, input_dtype="float32"))]
    fn from_sum(py: Python<'_>, total: &Bound<'_, PyAny>, count: i128, input_dtype: &str) -> PyResult<Self> {
        let count = unsigned_arg(py, count, "count")?;
        let total = FloatMatrix::extract(total, "total")?;
        let result = with_view!(&total, |v| {
            py.detach(|| pool::run(|| SecondMoment::from_sum(v, count, input_dtype)))
        });
        Ok(Self { inner: result.map_err(|e| core_to_py(py, e))? })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    #[getter]
    fn input_dtype(&self) -> &'static str {
        self.inner.input_dtype().as_str()
    }

    fn update(&mut self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<()> {
        let batch = FloatMatrix::extract(batch, "batch")?;
        let inner = &mut self.inner;
        let result = with_view!(&batch, |v| py.detach(|| pool::run(|| inner.update(v))));
        result.map_err(|e| core_to_py(py, e))
    }

    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        // Merging an accumulator into itself doubles it; borrow a copy to avoid aliasing.
        let copy;
        let other_ref;
        let other_inner: &SecondMoment = if slf.is(other) {
            copy = slf.borrow().inner.clone();
            &copy
        } else {
            other_ref = other.borrow();
            &other_ref.inner
        };
        let mut this = slf.borrow_mut();
        let inner = &mut this.inner;
        py.detach(|| pool::run(|| inner.merge(other_inner))).map_err(|e| core_to_py(py, e))
    }

    fn moment<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let dim = self.inner.dim();
        let inner = &self.inner;
        let values = py.detach(|| pool::run(|| inner.moment())).map_err(|e| core_to_py(py, e))?;
        values.into_pyarray(py).reshape([dim, dim])
    }

    #[pyo3(signature = (path, metadata=None))]
    fn save(&self, py: Python<'_>, path: PathBuf, metadata: Option<String>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.save(&path, metadata.as_deref())).map_err(|e| core_to_py(py, e))
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<(Self, Option<String>)> {
        let (inner, metadata) = py.detach(|| SecondMoment::load(&path)).map_err(|e| core_to_py(py, e))?;
        Ok((Self { inner }, metadata))
    }

    fn __repr__(&self) -> String {
        format!(
            "SecondMoment(dim={}, count={}, input_dtype='{}')",
            self.inner.dim(),
            self.inner.count(),
            self.inner.input_dtype()
        )
    }
}

/// Number of threads the kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    pool::num_threads()
}

/// Sets the number of kernel threads; 0 restores the default (`EAMET_NUM_THREADS` or all CPUs).
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: i128) -> PyResult<()> {
    pool::set_num_threads(unsigned_arg(py, n, "n")?);
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(misalignment, m)?)?;
    m.add_function(wrap_pyfunction!(neighbors, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_class::<PySecondMoment>()?;
    Ok(())
}
