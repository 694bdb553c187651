//! The file format of [`SecondMoment`]: one safetensors file, written atomically, that describes
//! itself and carries a checksum.
//!
//! Layout (format version 1): a float64 tensor `sum_upper` holding the upper triangle of Σ x xᵀ
//! (diagonal included), packed row by row, and string metadata `format`, `format_version`, `dim`,
//! `count`, `input_dtype`, `accumulator_dtype`, `layout`, `crc32` (of the tensor's bytes) and, when
//! given, `metadata` (the caller's JSON text).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{InputDtype, SecondMoment};
use crate::error::{CoreError, CoreResult};

const FORMAT: &str = "eamet.SecondMoment";
const FORMAT_VERSION: &str = "1";
const TENSOR: &str = "sum_upper";
const LAYOUT: &str = "upper-triangle-packed-row-major";

impl SecondMoment {
    /// Writes the accumulator to `path` atomically (a temporary file in the same folder, fsync,
    /// rename). `user_metadata` (JSON text) is stored beside dim, count, input dtype and a CRC-32.
    pub fn save(&self, path: &Path, user_metadata: Option<&str>) -> CoreResult<()> {
        let packed = self.packed_upper();
        let bytes: Vec<u8> = packed.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("dim".to_string(), self.dim.to_string()),
            ("count".to_string(), self.count.to_string()),
            ("input_dtype".to_string(), self.input_dtype.to_string()),
            ("accumulator_dtype".to_string(), "float64".to_string()),
            ("layout".to_string(), LAYOUT.to_string()),
            ("crc32".to_string(), format!("{:08x}", crc32fast::hash(&bytes))),
        ]);
        if let Some(m) = user_metadata {
            meta.insert("metadata".to_string(), m.to_string());
        }
        let view = TensorView::new(Dtype::F64, vec![packed.len()], &bytes)
            .map_err(|e| CoreError::Internal(format!("safetensors view: {e}")))?;
        let encoded = safetensors::tensor::serialize([(TENSOR, view)], Some(meta))
            .map_err(|e| CoreError::Internal(format!("safetensors serialize: {e}")))?;
        write_atomically(path, &encoded)
    }

    /// Reads a file written by [`SecondMoment::save`]; returns the accumulator and its user metadata.
    /// A file that is truncated, corrupt or of another kind is a [`CoreError::Cache`].
    pub fn load(path: &Path) -> CoreResult<(Self, Option<String>)> {
        let buffer = fs::read(path).map_err(|e| CoreError::io(path, e))?;
        let bad = |msg: String| CoreError::cache(path, msg);
        let tensors = SafeTensors::deserialize(&buffer)
            .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
        let (_, header) =
            SafeTensors::read_metadata(&buffer).map_err(|e| bad(format!("unreadable header ({e})")))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no eamet metadata: not a SecondMoment file".into()))?;
        let field =
            |key: &str| meta.get(key).ok_or_else(|| bad(format!("metadata field '{key}' is missing")));
        if field("format")? != FORMAT {
            return Err(bad(format!("format is '{}', expected '{FORMAT}'", field("format")?)));
        }
        if field("format_version")? != FORMAT_VERSION {
            return Err(bad(format!("unsupported format version '{}'", field("format_version")?)));
        }
        if field("layout")? != LAYOUT {
            return Err(bad(format!("unsupported layout '{}'", field("layout")?)));
        }
        let dim: usize = field("dim")?.parse().map_err(|_| bad("dim is not an integer".into()))?;
        let count: u64 = field("count")?.parse().map_err(|_| bad("count is not an integer".into()))?;
        let input_dtype: InputDtype = field("input_dtype")?.parse().map_err(|e| bad(format!("{e}")))?;
        let tensor = tensors.tensor(TENSOR).map_err(|_| bad(format!("tensor '{TENSOR}' is missing")))?;
        let packed_len =
            dim.checked_mul(dim + 1).map(|v| v / 2).ok_or_else(|| bad(format!("dim {dim} is too large")))?;
        if tensor.dtype() != Dtype::F64 || tensor.shape() != [packed_len] {
            return Err(bad(format!(
                "tensor '{TENSOR}' is {:?} {:?}, expected F64 [{packed_len}] for dim {dim}",
                tensor.dtype(),
                tensor.shape()
            )));
        }
        let data = tensor.data();
        let crc = format!("{:08x}", crc32fast::hash(data));
        if &crc != field("crc32")? {
            return Err(bad(format!(
                "checksum mismatch (stored {}, computed {crc}): the file is corrupt",
                field("crc32")?
            )));
        }
        let mut acc = SecondMoment::new(dim).map_err(|_| bad(format!("invalid dim {dim}")))?;
        let mut values = data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
        for i in 0..dim {
            for (slot, v) in acc.sum[i * dim + i..(i + 1) * dim].iter_mut().zip(&mut values) {
                *slot = v;
            }
        }
        acc.count = count;
        acc.input_dtype = input_dtype;
        Ok((acc, meta.get("metadata").cloned()))
    }

    /// The upper triangle of the sum (diagonal included), row by row: dim·(dim + 1)/2 values.
    fn packed_upper(&self) -> Vec<f64> {
        let dim = self.dim;
        let mut packed = Vec::with_capacity(dim * (dim + 1) / 2);
        for i in 0..dim {
            packed.extend_from_slice(&self.sum[i * dim + i..(i + 1) * dim]);
        }
        packed
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so that a
/// reader sees the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> CoreResult<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| CoreError::parameter("path", format!("'{}' names no file", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CoreError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::random;
    use ndarray::array;

    /// A fresh folder under the system temp dir, unique to this process and `name`.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("eamet-sm-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn save_load_round_trips_and_detects_damage() {
        let dir = scratch_dir("round-trip");
        let path = dir.join("m.safetensors");
        let mut acc = SecondMoment::new(9).unwrap();
        acc.update(random(7, 20, 9).mapv(|v| v as f32).view()).unwrap();
        acc.save(&path, Some("{\"layer\": 3}")).unwrap();
        let (back, meta) = SecondMoment::load(&path).unwrap();
        assert_eq!(back.moment().unwrap(), acc.moment().unwrap());
        assert_eq!(
            (back.count(), back.input_dtype(), meta.as_deref()),
            (20, InputDtype::Float32, Some("{\"layer\": 3}"))
        );

        let bytes = fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        fs::write(&path, &flipped).unwrap();
        assert!(
            matches!(SecondMoment::load(&path), Err(CoreError::Cache { ref message, .. }) if message.contains("checksum"))
        );
        fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        assert!(matches!(SecondMoment::load(&path), Err(CoreError::Cache { .. })));
        fs::write(&path, b"not a file we wrote").unwrap();
        assert!(matches!(SecondMoment::load(&path), Err(CoreError::Cache { .. })));
        assert!(matches!(SecondMoment::load(&dir.join("missing")), Err(CoreError::Io { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Files written by the code before the format module existed (commit 720f270, through
    /// `eamet._core`) still load: a dim-4 accumulator of two float32 rows and one float64 row
    /// (`input_dtype` "mixed", user metadata), and an empty dim-2 one ("none", no metadata).
    #[test]
    fn files_written_by_earlier_builds_still_load() {
        let dir = scratch_dir("fixtures");
        let path = dir.join("v1.safetensors");
        fs::write(&path, include_bytes!("../../testdata/second_moment_v1.safetensors")).unwrap();
        let (acc, meta) = SecondMoment::load(&path).unwrap();
        assert_eq!((acc.dim(), acc.count(), acc.input_dtype()), (4, 3, InputDtype::Mixed));
        assert_eq!(meta.as_deref(), Some("{\"layer\": 3}"));
        // The same rows, summed here: small integers and halves, so every sum is exact, and scaled as
        // `moment` scales (by 1/count), so the comparison can be exact too.
        let rows = array![[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 2.0], [2.0, -1.0, 1.0, 0.5]];
        let want = rows.t().dot(&rows) * (1.0 / 3.0);
        assert_eq!(acc.moment().unwrap(), want.iter().copied().collect::<Vec<_>>());

        fs::write(&path, include_bytes!("../../testdata/second_moment_v1_empty.safetensors")).unwrap();
        let (empty, meta) = SecondMoment::load(&path).unwrap();
        assert_eq!((empty.dim(), empty.count(), empty.input_dtype(), meta), (2, 0, InputDtype::None, None));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_input_dtype_in_a_file_is_a_cache_error() {
        let dir = scratch_dir("bad-dtype");
        let path = dir.join("m.safetensors");
        let bytes = include_bytes!("../../testdata/second_moment_v1.safetensors");
        // Same length, so the header's offsets stay valid: "mixed" becomes "mixes".
        let at = bytes.windows(7).position(|w| w == b"\"mixed\"").unwrap();
        let mut damaged = bytes.to_vec();
        damaged[at..at + 7].copy_from_slice(b"\"mixes\"");
        fs::write(&path, &damaged).unwrap();
        assert!(matches!(
            SecondMoment::load(&path),
            Err(CoreError::Cache { ref message, .. }) if message.contains("unknown input_dtype 'mixes'")
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
