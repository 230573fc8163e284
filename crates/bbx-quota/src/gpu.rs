//! The GPUs of this host, through NVML.
//!
//! NVML is loaded at run time (`libnvidia-ml.so`), so a kernel built here runs on a
//! machine without a GPU and reports a clear "no GPU" state instead of failing.

use bbx_core::quota::{GpuDevice, GpuStatus};
use nvml_wrapper::Nvml;

/// What NVML sees now.
pub fn status() -> GpuStatus {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            return unavailable(format!(
                "NVML cannot be loaded ({e}): no NVIDIA GPU or driver on this host"
            ));
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(e) => return unavailable(format!("NVML cannot count devices: {e}")),
    };
    let mut devices = Vec::new();
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        let memory = device.memory_info().ok();
        devices.push(GpuDevice {
            index,
            name: device.name().unwrap_or_default(),
            uuid: device.uuid().unwrap_or_default(),
            memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
            memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
            utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
        });
    }
    GpuStatus {
        available: !devices.is_empty(),
        reason: devices.is_empty().then(|| "NVML sees no device".to_owned()),
        driver_version: nvml.sys_driver_version().ok(),
        devices,
    }
}

fn unavailable(reason: String) -> GpuStatus {
    GpuStatus {
        available: false,
        reason: Some(reason),
        driver_version: None,
        devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_status_is_consistent_with_or_without_a_gpu() {
        let status = super::status();
        assert_eq!(status.available, !status.devices.is_empty());
        assert_eq!(status.available, status.reason.is_none());
        for device in &status.devices {
            assert!(device.memory_used_bytes <= device.memory_total_bytes);
        }
    }
}
