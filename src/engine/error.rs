//! The engine's one error type. Every variant names what went wrong and where, in one line,
//! so the CLI and the studio can show it as it is.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder the user named is not there.
    #[error("{what} not found: {path}")]
    NotFound { what: String, path: PathBuf },

    /// A file exists but could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },

    /// A config file holds a value we cannot run.
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// Weights we refuse to load (pickle files can run arbitrary code).
    #[error("{path}: refusing to load pickle weights (.ckpt/.bin/.pt can run code when loaded); convert them to .safetensors first")]
    Pickle { path: PathBuf },

    /// Weights that do not fit the architecture the config describes.
    #[error("{component} weights in {path}: {reason}")]
    Weights {
        component: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// A request parameter out of range (size, steps, guidance, ...).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    /// Model lookup on the hub (or in its cache) failed.
    #[error("model `{repo}`: {reason}")]
    Hub { repo: String, reason: String },

    /// Writing an output failed.
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },

    /// The job was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,

    /// A tensor operation failed inside a model (device, shape).
    #[error("{context}: {message}")]
    Tensor { context: String, message: String },

    /// A request refused before it allocates: it would not fit in free memory.
    #[error("{what} needs about {needs} of {place} but {free} is free: {advice}")]
    WontFit {
        what: String,
        needs: String,
        place: &'static str,
        free: String,
        advice: String,
    },

    /// A LoRA or an embedding that cannot be used with the loaded model.
    #[error("{kind} {path}: {reason}")]
    Adapter {
        kind: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// The device ran out of memory.
    #[error("out of memory ({message}): try a smaller batch or image size, or a lower-memory mode (Memory: medvram or lowvram; attention slicing on; tiled VAE decode)")]
    OutOfMemory { message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a short "where" to candle errors: `tensor_op(...).ctx("unet forward")?`.
pub trait Context<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> Context<T> for candle_core::Result<T> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| {
            let message = super::model::candle_msg(&e);
            let lower = message.to_lowercase();
            if lower.contains("out of memory") || lower.contains("out_of_memory") {
                Error::OutOfMemory {
                    message: format!("{context}: {message}"),
                }
            } else {
                Error::Tensor {
                    context: context.to_string(),
                    message,
                }
            }
        })
    }
}

impl Error {
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            reason: reason.into(),
        }
    }
    pub fn read(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::Read {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
