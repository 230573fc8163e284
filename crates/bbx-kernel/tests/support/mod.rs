//! A kernel on a scratch data directory, and its administrator.

#![allow(dead_code)] // each test binary uses a different part of the harness

use bbx_core::config::{ConfigLayer, KernelConfig};
use bbx_kernel::{Caller, Kernel};
use std::path::Path;
use std::sync::Arc;

/// Opens a kernel on `dir` with `over`'s settings (its data directory set to
/// `dir`), and authenticates its administrator key.
pub async fn open_with(dir: &Path, over: ConfigLayer) -> (Arc<Kernel>, Caller) {
    let over = ConfigLayer {
        data_dir: Some(dir.to_path_buf()),
        ..over
    };
    let config = KernelConfig::resolve(ConfigLayer::default(), over).unwrap();
    let kernel = Kernel::open(config).await.unwrap().kernel;
    let token = std::fs::read_to_string(dir.join(bbx_kernel::ADMIN_KEY_FILE)).unwrap();
    let admin = kernel.authenticate(token.trim()).unwrap();
    (kernel, admin)
}

pub async fn open(dir: &Path) -> (Arc<Kernel>, Caller) {
    open_with(dir, ConfigLayer::default()).await
}
