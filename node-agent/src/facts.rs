//! Device facts the agent reports: architecture, cores, memory, accelerators, power
//! source and battery, OS, agent version and the configured labels.

use std::collections::BTreeMap;
use std::path::Path;

use nanofleet_proto::v1::{Accelerator, DeviceFacts, PowerSource};

/// Reads the facts of this device now.
pub fn collect(labels: &BTreeMap<String, String>) -> DeviceFacts {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let (power_source, battery_percent, charging) = power(Path::new("/sys/class/power_supply"));
    DeviceFacts {
        arch: std::env::consts::ARCH.to_owned(),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_total_bytes: system.total_memory(),
        memory_available_bytes: system.available_memory(),
        accelerators: nvidia_gpus(Path::new("/proc/driver/nvidia/gpus")),
        power_source: power_source as i32,
        battery_percent,
        charging,
        os: sysinfo::System::name().unwrap_or_else(|| std::env::consts::OS.to_owned()),
        os_version: sysinfo::System::os_version().unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        labels: labels.clone().into_iter().collect(),
        // Filled in by the session from the loaded training data and the model host.
        training_examples: 0,
        inference_device: String::new(),
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Power source from the kernel's power-supply class: a battery that is present makes
/// a battery device (charging when plugged in); otherwise mains.
pub(crate) fn power(dir: &Path) -> (PowerSource, Option<f32>, bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (PowerSource::Mains, None, false);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if read_trimmed(&path.join("type")).as_deref() != Some("Battery") {
            continue;
        }
        if read_trimmed(&path.join("present")).as_deref() == Some("0") {
            continue;
        }
        let percent = read_trimmed(&path.join("capacity")).and_then(|c| c.parse::<f32>().ok());
        let status = read_trimmed(&path.join("status")).unwrap_or_default();
        let charging = matches!(status.as_str(), "Charging" | "Full");
        return (PowerSource::Battery, percent, charging);
    }
    (PowerSource::Mains, None, false)
}

/// NVIDIA GPUs as the kernel driver lists them (no driver library needed).
fn nvidia_gpus(dir: &Path) -> Vec<Accelerator> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut gpus: Vec<Accelerator> = entries
        .flatten()
        .filter_map(|entry| read_trimmed(&entry.path().join("information")))
        .map(|info| {
            let name = info
                .lines()
                .find_map(|line| line.strip_prefix("Model:"))
                .map(|m| m.trim().to_owned())
                .unwrap_or_else(|| "NVIDIA GPU".to_owned());
            Accelerator {
                kind: "cuda".to_owned(),
                name,
                memory_bytes: 0,
            }
        })
        .collect();
    gpus.sort_by(|a, b| a.name.cmp(&b.name));
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn battery_device_reports_charge_and_charging() {
        let dir = tempfile::tempdir().unwrap();
        let bat = dir.path().join("BAT0");
        std::fs::create_dir(&bat).unwrap();
        std::fs::write(bat.join("type"), "Battery\n").unwrap();
        std::fs::write(bat.join("capacity"), "73\n").unwrap();
        std::fs::write(bat.join("status"), "Charging\n").unwrap();
        assert_eq!(power(dir.path()), (PowerSource::Battery, Some(73.0), true));
    }

    #[test]
    fn no_battery_means_mains() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(power(dir.path()), (PowerSource::Mains, None, false));
        assert_eq!(
            power(&dir.path().join("missing")),
            (PowerSource::Mains, None, false)
        );
    }

    #[test]
    fn gpus_come_from_the_driver_listing() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = dir.path().join("0000:01:00.0");
        std::fs::create_dir(&gpu).unwrap();
        std::fs::write(
            gpu.join("information"),
            "Model: \t NVIDIA H100 80GB HBM3\nIRQ: 1\n",
        )
        .unwrap();
        let gpus = nvidia_gpus(dir.path());
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
    }

    #[test]
    fn collected_facts_describe_this_machine() {
        let facts = collect(&BTreeMap::from([("site".to_owned(), "lab".to_owned())]));
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(facts.cpu_cores >= 1);
        assert!(facts.memory_total_bytes > 0);
        assert_eq!(facts.labels["site"], "lab");
    }
}
