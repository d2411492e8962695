//! Textual-inversion embeddings, used as A1111 uses them: a word of the prompt that is an
//! embedding's file name takes that embedding's n vectors at n token positions.
//!
//! Formats (`.safetensors` only; `.pt`/`.bin` are pickles and refused as checkpoints are):
//! A1111/kohya `emb_params` [n, d]; A1111's `string_to_param.*`; diffusers' one key named
//! after its token (`<cat-toy>`) [d] or [n, d]; SDXL's `clip_l` [n, 768] and `clip_g`
//! [n, 1280] (one set per text encoder).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::engine::lora::stem;
use crate::engine::{weights, Error, Result};

/// An embedding, read.
pub struct Embedding {
    pub name: String,
    pub path: PathBuf,
    /// Vectors for the first text encoder and (SDXL) the second: f32 [n, d] on the CPU.
    pub vectors: [Option<Tensor>; 2],
}

fn err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Adapter {
        kind: "embedding",
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Which tensors of a file hold the vectors: (for the first encoder, for the second).
fn pick(names: &[String], path: &Path) -> Result<(Option<String>, Option<String>)> {
    let has = |n: &str| names.iter().any(|k| k == n);
    if has("clip_l") || has("clip_g") {
        return Ok((
            has("clip_l").then(|| "clip_l".into()),
            has("clip_g").then(|| "clip_g".into()),
        ));
    }
    if has("emb_params") {
        return Ok((Some("emb_params".into()), None));
    }
    if let Some(k) = names.iter().find(|k| k.starts_with("string_to_param.")) {
        return Ok((Some(k.clone()), None));
    }
    match names {
        [one] => Ok((Some(one.clone()), None)),
        _ => Err(err(
            path,
            format!(
                "is not an embedding we know (expected emb_params, string_to_param, clip_l/clip_g or one token key; found {})",
                names.join(", ")
            ),
        )),
    }
}

impl Embedding {
    /// Vector counts per encoder from the header alone (for token counting before loading).
    pub fn vector_count(path: &Path) -> Result<usize> {
        check_ext(path)?;
        let header = weights::read_header(path)?;
        let names: Vec<String> = header.iter().map(|t| t.name.clone()).collect();
        let (a, b) = pick(&names, path)?;
        let key = a.or(b).unwrap_or_default();
        let shape = &header
            .iter()
            .find(|t| t.name == key)
            .map(|t| t.shape.clone())
            .unwrap_or_default();
        match shape.as_slice() {
            [_] => Ok(1),
            [n, _] if *n > 0 => Ok(*n),
            s => Err(err(
                path,
                format!("tensor {key} has shape {s:?}, expected [vectors, width]"),
            )),
        }
    }

    pub fn open(path: &Path) -> Result<Self> {
        check_ext(path)?;
        let header = weights::read_header(path)?;
        if let Some(t) = header.iter().find(|t| !weights::is_float(&t.dtype)) {
            return Err(err(
                path,
                format!("tensor {} is stored as {}", t.name, t.dtype),
            ));
        }
        let names: Vec<String> = header.iter().map(|t| t.name.clone()).collect();
        let (a, b) = pick(&names, path)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::read(path, crate::engine::model::candle_msg(&e)))?;
        let get = |k: Option<String>| -> Result<Option<Tensor>> {
            let Some(k) = k else { return Ok(None) };
            let t = tensors
                .get(&k)
                .ok_or_else(|| err(path, format!("no tensor {k}")))?;
            let t = match t.rank() {
                1 => t.unsqueeze(0),
                2 => Ok(t.clone()),
                _ => {
                    return Err(err(
                        path,
                        format!(
                            "tensor {k} has shape {:?}, expected [vectors, width]",
                            t.dims()
                        ),
                    ))
                }
            }
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| err(path, e.to_string()))?;
            let finite = t
                .flatten_all()
                .and_then(|v| v.to_vec1::<f32>())
                .map_err(|e| err(path, e.to_string()))?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(err(
                    path,
                    format!("tensor {k} holds NaN or infinite values"),
                ));
            }
            Ok(Some(t))
        };
        let vectors = [get(a)?, get(b)?];
        if let [Some(x), Some(y)] = &vectors {
            if x.dim(0).ok() != y.dim(0).ok() {
                return Err(err(
                    path,
                    "clip_l and clip_g hold different numbers of vectors",
                ));
            }
        }
        Ok(Self {
            name: stem(path),
            path: path.to_path_buf(),
            vectors,
        })
    }

    /// Number of token positions it takes.
    pub fn len(&self) -> usize {
        self.vectors
            .iter()
            .flatten()
            .next()
            .and_then(|t| t.dim(0).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vectors for encoder `which` (0 or 1) of width `width`, else a clear error.
    pub fn for_encoder(&self, which: usize, width: usize, dual: bool) -> Result<&Tensor> {
        let t = if dual {
            self.vectors[which].as_ref()
        } else {
            self.vectors[0]
                .as_ref()
                .filter(|_| self.vectors[1].is_none())
        };
        let Some(t) = t else {
            return Err(err(
                &self.path,
                if dual {
                    "is for SD 1.x/2.x (one set of vectors); SDXL needs clip_l and clip_g"
                        .to_string()
                } else {
                    "is for SDXL (clip_l/clip_g); the model has one text encoder".to_string()
                },
            ));
        };
        let have = t.dim(1).unwrap_or(0);
        if have != width {
            return Err(err(
                &self.path,
                format!(
                    "its vectors are {have} wide but the text encoder{} takes {width}: an embedding for another model?",
                    if dual { format!(" {}", which + 1) } else { String::new() }
                ),
            ));
        }
        Ok(t)
    }
}

fn check_ext(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if matches!(ext.as_str(), "pt" | "bin" | "ckpt" | "pth") {
        return Err(Error::Pickle {
            path: path.to_path_buf(),
        });
    }
    if !path.is_file() {
        return Err(Error::NotFound {
            what: "embedding".into(),
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Every embedding file in `dirs` (subfolders searched): (name, path), `.safetensors` and
/// pickles both (a pickle is refused only when the prompt uses it).
pub fn list(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for p in super::files_under(dirs) {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if matches!(ext.as_str(), "safetensors" | "pt" | "bin") {
            let name = stem(&p);
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, p));
            }
        }
    }
    out
}

/// A1111's embedding hash ("TI hashes"): the file's sha256, first 12 hex digits.
pub fn hash(path: &Path) -> Result<String> {
    let h = crate::engine::hash::sha256(path, &mut |_| {})?;
    Ok(h[..12].to_string())
}
