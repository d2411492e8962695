//! Adapters on a loaded model: LoRA files merged into its weights in place (`lora`, `patch`)
//! and textual-inversion embeddings in its prompts (`embedding`); `apply` resolves what a job asks for.
pub mod apply;
pub mod embedding;
pub mod lora;
pub mod patch;

use std::path::{Path, PathBuf};

/// Every file under `dirs`, subfolders searched (8 deep), each folder's entries in name
/// order, the first folder's files first (how LoRA and embedding names resolve).
pub fn files_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                if depth < 8 {
                    walk(&p, depth + 1, out);
                }
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(d, 0, &mut out);
    }
    out
}
