//! Getting a model: config files, folder/hub/single-file resolution, strict safetensors
//! headers, models-folder scans, content hashes and the model cache.
pub mod cache;
pub mod config;
pub mod controlnet_files;
pub mod hash;
pub mod model;
pub mod scan;
pub mod single_file;
pub mod weights;
