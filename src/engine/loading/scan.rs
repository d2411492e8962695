//! Lists the checkpoints in a models folder (for example A1111's models/Stable-diffusion):
//! single `.safetensors` files, diffusers folders, and pickles (listed, never loaded). A
//! `.safetensors` file is classified from its header alone (a few KB), so a scan of a folder
//! of multi-GB files is quick.

use std::path::Path;

use crate::engine::{Error, Result};
use crate::protocol::FoundModel;

/// How deep below the scanned folder to look (A1111 users keep sub-folders per family).
const MAX_DEPTH: usize = 4;

/// What a `.safetensors` file holds, judged by its tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A whole model in the original SD layout (`model.diffusion_model.*`).
    Checkpoint,
    /// A VAE alone (`encoder.*` / `decoder.*`, or `first_stage_model.*` only).
    Vae,
    /// Anything else (LoRA, embeddings, a UNet alone, ...).
    Other,
}

/// The tensors (name, shape) in a `.safetensors` header; the data is not read.
pub fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(crate::engine::weights::read_header(path)?
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect())
}

/// The tensor names in a `.safetensors` header.
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    Ok(tensor_shapes(path)?.into_iter().map(|(k, _)| k).collect())
}

/// Classifies a `.safetensors` file by its tensor names.
pub fn classify(path: &Path) -> Result<FileKind> {
    let names = tensor_names(path)?;
    let has = |p: &str| names.iter().any(|n| n.starts_with(p));
    Ok(if has("model.diffusion_model.") {
        FileKind::Checkpoint
    } else if (has("encoder.") && has("decoder.")) || has("first_stage_model.decoder.") {
        FileKind::Vae
    } else {
        FileKind::Other
    })
}

fn is_pickle(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "ckpt" | "pt" | "pth"))
}

/// Every checkpoint under `dir` (sorted by name). VAE files and other safetensors (LoRAs)
/// are listed as not loadable as models; unreadable entries are skipped.
pub fn scan(dir: &Path) -> Result<Vec<FoundModel>> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            what: "models folder".into(),
            path: dir.to_path_buf(),
        });
    }
    let mut out = Vec::new();
    walk(dir, dir, 0, &mut out)?;
    out.sort_by_key(|m| m.name.to_lowercase());
    Ok(out)
}

fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<FoundModel>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))?;
    let name_of = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if path.join("model_index.json").is_file() {
                let bytes = folder_bytes(&path);
                out.push(FoundModel {
                    name: name_of(&path),
                    path,
                    kind: "diffusers folder".into(),
                    bytes,
                    loadable: true,
                });
            } else if depth < MAX_DEPTH {
                walk(root, &path, depth + 1, out)?;
            }
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let (kind, loadable) = match ext.as_deref() {
            Some("safetensors") => match classify(&path) {
                Ok(FileKind::Checkpoint) => ("single file", true),
                Ok(FileKind::Vae) => ("VAE", false),
                Ok(FileKind::Other) => ("not a checkpoint (LoRA or other)", false),
                Err(_) => ("unreadable safetensors", false),
            },
            _ if is_pickle(&path) => ("pickle (refused: convert to .safetensors)", false),
            _ => continue,
        };
        out.push(FoundModel {
            name: name_of(&path),
            path,
            kind: kind.into(),
            bytes: meta.len(),
            loadable,
        });
    }
    Ok(())
}

fn folder_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
