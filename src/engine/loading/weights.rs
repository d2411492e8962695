//! Safetensors headers read strictly, before any weight is mapped: a file whose header lies
//! (duplicate names, a byte range that does not hold its shape, overlapping or out-of-file
//! ranges, unknown dtypes) is refused with the file and the tensor named, and a weight
//! stored as an integer or boolean type is refused when a model asks for it (converting it
//! to floats would load garbage without a word).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::engine::{Error, Result};

/// Takes this process's resident pages of every read-only mapped `.safetensors` file out of
/// its resident set (`madvise(MADV_DONTNEED)`); returns the bytes of mappings advised.
///
/// Weights are copied (or widened) out of the mapped files while a model is built; the
/// mappings themselves stay open, so that a LoRA's originals can be read back from the file
/// instead of being kept in memory. Their pages are clean page cache, but they count in the
/// process's RSS: 2 GB of f16 files for SD 1.5, on top of the f32 weights. Advised away, the
/// mapping stays valid and a later read faults the page back in from the page cache: on a
/// private read-only mapping nothing can be lost (there are no written copies to discard).
/// Linux only; elsewhere nothing is done.
pub fn release_mapped_pages() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mut advised = 0;
        for line in maps.lines() {
            // "start-end perms offset dev inode path"
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                continue;
            };
            let path = f.nth(3).unwrap_or("");
            if !path.ends_with(".safetensors") || !perms.starts_with("r-") {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            if b <= a {
                continue;
            }
            // SAFETY: [a, b) is a whole mapping of this process, as the kernel lists it: a
            // private mapping of a file without write permission. MADV_DONTNEED only drops
            // its page-table entries; the next read of any byte faults the same file
            // contents back in, so every reference into it stays valid and unchanged.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
            if rc == 0 {
                advised += (b - a) as u64;
            }
        }
        advised
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Headers larger than this are not safetensors headers we want to parse.
pub const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a header, as the file states it.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// The dtype as written (`F16`, `BF16`, `F32`, `I16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub offsets: (u64, u64),
}

/// Bytes per element of a safetensors dtype name; None for names the format does not have.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Whether a dtype holds real numbers a weight can be converted from.
pub fn is_float(dtype: &str) -> bool {
    matches!(
        dtype,
        "F16" | "BF16" | "F32" | "F64" | "F8_E4M3" | "F8_E5M2"
    )
}

/// The header's entries in file order, with duplicate names kept (serde's maps drop them).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads and checks the header of `path`: every tensor's dtype, shape and byte range, and
/// that the ranges tile the data section without overlap and within the file.
pub fn read_header(path: &Path) -> Result<Vec<TensorEntry>> {
    let bad = |reason: String| Error::read(path, reason);
    let mut f = File::open(path).map_err(|e| Error::read(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::read(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER || len + 8 > file_len {
        return Err(bad(format!(
            "not a safetensors file (header of {len} bytes in a file of {file_len})"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated safetensors header ({e})")))?;
    let Entries(raw) =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    let data_len = file_len - 8 - len;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(bad(format!("tensor {name} is listed twice in the header")));
        }
        let tensor_err = |what: &str| bad(format!("tensor {name}: {what}"));
        let dtype = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| tensor_err("no dtype"))?
            .to_string();
        let size =
            dtype_size(&dtype).ok_or_else(|| tensor_err(&format!("unknown dtype {dtype:?}")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| tensor_err("shape is not a list of sizes"))?;
        let offsets = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| match a.as_slice() {
                [b, e] => Some((b.as_u64()?, e.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| tensor_err("data_offsets is not [begin, end]"))?;
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| tensor_err("shape overflows"))?;
        let want = elems
            .checked_mul(size)
            .ok_or_else(|| tensor_err("shape overflows"))?;
        if offsets.1 < offsets.0 || offsets.1 - offsets.0 != want {
            return Err(tensor_err(&format!(
                "{dtype} {shape:?} takes {want} bytes but its data_offsets {:?} span {}",
                [offsets.0, offsets.1],
                offsets.1.saturating_sub(offsets.0)
            )));
        }
        if offsets.1 > data_len {
            return Err(tensor_err(&format!(
                "its data ends at byte {} but the file holds {data_len} (truncated?)",
                offsets.1
            )));
        }
        out.push(TensorEntry {
            name,
            dtype,
            shape,
            offsets,
        });
    }
    let mut ranges: Vec<(u64, u64, &str)> = out
        .iter()
        .map(|t| (t.offsets.0, t.offsets.1, t.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "tensors {} and {} overlap in the file",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(out)
}

/// Tensor `name` of `st` as f32 on the CPU when it is stored as f16 (the usual case: fp16
/// files, an f32 CPU model), converted on every thread straight from the mapped bytes;
/// None for every other combination (candle's single-threaded path then converts).
fn f16_to_f32_cpu(
    st: &MmapedSafetensors,
    name: &str,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !dev.is_cpu() || dtype != DType::F32 {
        return Ok(None);
    }
    let view = st.get(name)?;
    if format!("{:?}", view.dtype()) != "F16" {
        return Ok(None);
    }
    let bytes = view.data();
    let shape = view.shape().to_vec();
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; bytes.len() / 2];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
        let b = &bytes[i * CHUNK * 2..];
        for (j, x) in o.iter_mut().enumerate() {
            *x = half::f16::from_le_bytes([b[2 * j], b[2 * j + 1]]).to_f32();
        }
    });
    Tensor::from_vec(out, shape, dev).map(Some)
}

/// Tensor `name` of `st` (a map of `path`) in `dtype`: f16 widened to f32 on every thread
/// on the CPU, anything else through [`load_float`] and candle's conversion.
pub fn load_as(
    st: &MmapedSafetensors,
    path: &Path,
    name: &str,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    match f16_to_f32_cpu(st, name, dtype, dev)? {
        Some(t) => Ok(t),
        None => load_float(st, path, name, dev)?.to_dtype(dtype),
    }
}

/// Loads tensor `name` from `st` (a map of `path`), refusing non-float storage.
pub fn load_float(
    st: &MmapedSafetensors,
    path: &Path,
    name: &str,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let stored = format!("{:?}", st.get(name)?.dtype());
    if !is_float(&stored) {
        candle_core::bail!(
            "{}: weight {name} is stored as {stored}, not as floating point (the file is corrupt or not a model)",
            path.display()
        );
    }
    st.load(name, dev)
}

/// `t` if it has the shape a model asks for, else an error naming the file and the weight.
pub fn expect_shape(path: &Path, name: &str, t: Tensor, s: &Shape) -> candle_core::Result<Tensor> {
    if t.dims() != s.dims() {
        candle_core::bail!(
            "{}: weight {name} has shape {:?}, expected {:?}",
            path.display(),
            t.dims(),
            s.dims()
        );
    }
    Ok(t)
}

/// Memory-mapped safetensors files whose headers passed [`read_header`], as a VarBuilder
/// backend that refuses integer weights and names the file a bad tensor is in.
pub struct Checked {
    st: MmapedSafetensors,
    /// Tensor name → index into `paths`.
    routing: HashMap<String, usize>,
    paths: Vec<PathBuf>,
}

impl Checked {
    /// Checks every header, then maps the files.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            for t in read_header(p)? {
                routing.insert(t.name, i);
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors loader we rely on
        // no other process truncating them while the model is loaded.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| {
            Error::read(
                paths.first().cloned().unwrap_or_default(),
                crate::engine::model::candle_msg(&e),
            )
        })?;
        Ok(Self {
            st,
            routing,
            paths: paths.to_vec(),
        })
    }

    fn path_of(&self, name: &str) -> &Path {
        self.routing
            .get(name)
            .and_then(|&i| self.paths.get(i))
            .or(self.paths.first())
            .map(|p| p.as_path())
            .unwrap_or(Path::new("?"))
    }
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let path = self.path_of(name);
        if !self.routing.contains_key(name) {
            candle_core::bail!("{}: missing weight {name}", path.display());
        }
        if let Some(t) = f16_to_f32_cpu(&self.st, name, dtype, dev)? {
            return expect_shape(path, name, t, &s);
        }
        expect_shape(path, name, load_float(&self.st, path, name, dev)?, &s)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(t) = f16_to_f32_cpu(&self.st, name, dtype, dev)? {
            return Ok(t);
        }
        load_float(&self.st, self.path_of(name), name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn f16_weights_widen_to_the_same_f32_as_candle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        // Values across the f16 range, subnormals and signed zero included; more than one
        // conversion chunk.
        let n = (1 << 16) + 123;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32) - 30000.0) * 1.7e-3 * if i % 7 == 0 { 1e-4 } else { 1.0 })
            .collect();
        let t = Tensor::from_vec(v, (n,), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let mut m = HashMap::new();
        m.insert("w".to_string(), t.clone());
        candle_core::safetensors::save(&m, &path).unwrap();
        let backend = Checked::open(std::slice::from_ref(&path)).unwrap();
        let got = backend
            .get_unchecked("w", DType::F32, &Device::Cpu)
            .unwrap();
        let want = t.to_dtype(DType::F32).unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap()
        );
        let shaped = backend
            .get(
                Shape::from((n,)),
                "w",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(shaped.dims(), &[n]);
        assert!(backend
            .get(
                Shape::from((n + 1,)),
                "w",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu
            )
            .is_err());
    }
}
