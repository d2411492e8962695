//! File hashes as A1111 writes them ("Model hash", "VAE hash": the first 10 hex digits of
//! the file's sha256), computed once and remembered in a small JSON cache keyed by path,
//! size and modification time (A1111 keeps a cache.json for the same reason: hashing a
//! 4 GB checkpoint takes seconds). The model cache also uses full hashes to find components
//! whose weight files are identical.
//!
//! Files in a Hugging Face hub cache are named by their sha256 already (`blobs/<sha256>`),
//! so those are never read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::engine::metadata::write_atomic;
use crate::engine::{Error, Result};

/// The cache file: `SD_STUDIO_CACHE_DIR`, else `$XDG_CACHE_HOME/sd-studio`, else
/// `~/.cache/sd-studio`, with `hashes.json` inside.
pub fn cache_file() -> Option<PathBuf> {
    let dir = std::env::var_os("SD_STUDIO_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sd-studio")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sd-studio")))?;
    Some(dir.join("hashes.json"))
}

#[derive(serde::Serialize, serde::Deserialize, Clone, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// Serialises cache reads and writes within the process.
static LOCK: Mutex<()> = Mutex::new(());

fn load(file: &Path) -> BTreeMap<String, Entry> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A file's sha256 when it is known without reading the file: a hub blob's name, or the
/// cache's entry for this path, size and modification time.
pub fn known(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    if let Some(h) = hub_blob_hash(&real) {
        return Some(h);
    }
    let meta = std::fs::metadata(&real).ok()?;
    let c = cache_file()?;
    let _g = LOCK.lock();
    load(&c)
        .get(&*real.to_string_lossy())
        .filter(|e| e.size == meta.len() && e.mtime_ns == mtime_ns(&meta))
        .map(|e| e.sha256.clone())
}

/// An identity for a file that costs no reading: its real path, size and modification time
/// (what a large file goes by until its hash is known).
pub fn quick_id(path: &Path) -> Result<String> {
    let real = std::fs::canonicalize(path).map_err(|e| Error::read(path, e))?;
    let meta = std::fs::metadata(&real).map_err(|e| Error::read(path, e))?;
    Ok(format!(
        "file:{}:{}:{}",
        real.display(),
        meta.len(),
        mtime_ns(&meta)
    ))
}

/// A file's sha256 being computed on a thread of its own (so a first load never waits for
/// it): `wait` blocks until it is there, `ready` does not.
pub struct Pending {
    state: Mutex<Option<std::result::Result<String, String>>>,
    done: std::sync::Condvar,
}

impl Pending {
    /// Starts hashing `path` (at once done when the hash is [`known`]).
    pub fn start(path: PathBuf) -> std::sync::Arc<Pending> {
        let p = std::sync::Arc::new(Pending {
            state: Mutex::new(known(&path).map(Ok)),
            done: std::sync::Condvar::new(),
        });
        if p.ready().is_none() {
            let q = p.clone();
            let spawned = std::thread::Builder::new()
                .name("sd-studio hash".into())
                .spawn(move || {
                    let r = sha256(&path, &mut |_| {}).map_err(|e| e.to_string());
                    *q.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    q.done.notify_all();
                });
            if let Err(e) = spawned {
                *p.state.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Err(format!("cannot start hashing: {e}")));
            }
        }
        p
    }

    /// The hash (or why it could not be made), if finished.
    pub fn ready(&self) -> Option<std::result::Result<String, String>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for the hash.
    pub fn wait(&self) -> std::result::Result<String, String> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A file's full sha256 (lowercase hex), from the hub's blob name, the cache, or by reading
/// it (then remembered). `progress` sees the fraction read.
pub fn sha256(path: &Path, progress: &mut dyn FnMut(f32)) -> Result<String> {
    let real = std::fs::canonicalize(path).map_err(|e| Error::read(path, e))?;
    if let Some(h) = hub_blob_hash(&real) {
        return Ok(h);
    }
    let meta = std::fs::metadata(&real).map_err(|e| Error::read(path, e))?;
    let mtime_ns = mtime_ns(&meta);
    let key = real.to_string_lossy().to_string();
    let cache = cache_file();
    if let Some(c) = &cache {
        let _g = LOCK.lock();
        if let Some(e) = load(c).get(&key) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns {
                return Ok(e.sha256.clone());
            }
        }
    }
    let sha = hash_file(&real, meta.len(), progress)?;
    if let Some(c) = &cache {
        let _g = LOCK.lock();
        let mut all = load(c);
        all.insert(
            key,
            Entry {
                size: meta.len(),
                mtime_ns,
                sha256: sha.clone(),
            },
        );
        // A cache that cannot be written only costs time later.
        if let (Some(dir), Ok(bytes)) = (c.parent(), serde_json::to_vec_pretty(&all)) {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = write_atomic(c, &bytes);
            }
        }
    }
    Ok(sha)
}

/// A1111's short form: the first 10 hex digits.
pub fn short(sha256: &str) -> String {
    sha256.chars().take(10).collect()
}

fn hash_file(path: &Path, size: u64, progress: &mut dyn FnMut(f32)) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::read(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        if size > 0 {
            progress(done as f32 / size as f32);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `…/models--org--name/blobs/<64 hex>`: the hub names LFS blobs by their sha256.
fn hub_blob_hash(real: &Path) -> Option<String> {
    let name = real.file_name()?.to_str()?;
    let in_blobs = real.parent()?.file_name()? == "blobs";
    (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pending_hashes_on_its_own_thread_and_remembers() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("SD_STUDIO_CACHE_DIR", dir.path().join("cache"));
        let p = dir.path().join("weights.bin");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(known(&p), None);
        let id = quick_id(&p).unwrap();
        assert!(
            id.starts_with("file:")
                && id.ends_with(&format!(":3:{}", mtime_ns(&std::fs::metadata(&p).unwrap())))
        );
        let h = Pending::start(p.clone());
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(h.wait().unwrap(), want);
        assert_eq!(h.ready().unwrap().unwrap(), want);
        // Remembered: the next start is done at once, from the cache.
        assert_eq!(known(&p).as_deref(), Some(want));
        assert_eq!(Pending::start(p.clone()).ready().unwrap().unwrap(), want);
        // A file that went away: the reason, not a hang.
        let gone = Pending::start(dir.path().join("missing.bin"));
        assert!(gone.wait().is_err());
    }

    #[test]
    fn known_answer_and_hub_blob_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc.bin");
        std::fs::write(&p, b"abc").unwrap();
        let mut fractions = Vec::new();
        let h = hash_file(&p, 3, &mut |f| fractions.push(f)).unwrap();
        // FIPS 180-2 test vector.
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(short(&h), "ba7816bf8f");
        assert_eq!(fractions, vec![1.0]);
        let blob = dir.path().join("blobs");
        std::fs::create_dir(&blob).unwrap();
        let name = "0123456789abcdef".repeat(4);
        assert_eq!(hub_blob_hash(&blob.join(&name)), Some(name.clone()));
        assert_eq!(hub_blob_hash(&dir.path().join(&name)), None);
        assert_eq!(hub_blob_hash(&blob.join("short")), None);
    }
}
