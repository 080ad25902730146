//! `vram-residency devices`: the GPUs, what they are, and the policy verdict on each.

use std::process::ExitCode;

use vram_residency::{BackendKind, DeviceInfo, DeviceVerdict};

use crate::backends;
use crate::cli::DevicesArgs;

pub fn run(args: &DevicesArgs) -> anyhow::Result<ExitCode> {
    let kind = args.backend.backend;
    let backend = backends::open(kind, args.backend.sim(), args.backend.cuda())?;
    let policy = args.backend.manager_config().device_policy;
    let driver = backend.driver_version()?;
    let devices = backend.devices()?;
    let verdicts: Vec<DeviceVerdict> = devices.iter().map(|d| policy.verdict(kind, d)).collect();
    if args.json {
        let list: Vec<serde_json::Value> = devices
            .iter()
            .zip(&verdicts)
            .map(|(device, verdict)| serde_json::json!({ "device": device, "policy": verdict }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "backend": kind.name(),
                "driver": driver,
                "require_ecc": policy.require_ecc,
                "require_no_pageable_access": policy.require_no_pageable_access,
                "devices": list,
            })
        );
    } else {
        println!("backend: {kind}");
        println!("driver: {driver}");
        for (device, verdict) in devices.iter().zip(&verdicts) {
            print_device(device, verdict);
        }
        if kind == BackendKind::Sim {
            println!("(sim: simulated devices in host RAM, NOT VRAM residency)");
        }
    }
    let refused = verdicts
        .iter()
        .any(|v| matches!(v, DeviceVerdict::Refused(_)));
    Ok(if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_device(device: &DeviceInfo, verdict: &DeviceVerdict) {
    let yes_no = |value: Option<bool>, yes: &str, no: &str| match value {
        Some(true) => yes.to_owned(),
        Some(false) => no.to_owned(),
        None => "unknown".to_owned(),
    };
    println!("GPU {}: {}", device.index, device.name);
    println!(
        "  uuid: {}",
        vram_residency::shard::format_uuid(&device.uuid)
    );
    println!(
        "  memory: {} total, {} free",
        crate::bench::human(device.total_bytes),
        crate::bench::human(device.free_bytes)
    );
    println!(
        "  compute capability: {}",
        device.compute_capability.as_deref().unwrap_or("n/a")
    );
    println!(
        "  ECC: {}",
        yes_no(device.ecc_enabled, "enabled", "disabled")
    );
    println!(
        "  integrated: {}",
        yes_no(device.integrated, "yes (refused)", "no (discrete)")
    );
    match &device.unified_memory {
        Some(facts) => {
            let yes = |v: bool| if v { "yes" } else { "no" };
            println!(
                "  unified memory: managed allocations {}, concurrent managed access {}",
                yes(facts.managed_memory),
                yes(facts.concurrent_managed_access)
            );
            println!(
                "  reads pageable host memory directly (HMM/ATS): {}{}",
                yes(facts.pageable_memory_access),
                if facts.pageable_memory_access {
                    if facts.pageable_memory_access_uses_host_page_tables {
                        " (through the host's page tables: ATS)"
                    } else {
                        " (driver-managed: HMM)"
                    }
                } else {
                    ""
                }
            );
        }
        None => println!("  unified memory: unknown"),
    }
    match verdict {
        DeviceVerdict::Accepted => println!("  policy: accepted (weights may live here)"),
        DeviceVerdict::Simulated => println!("  policy: simulated (not residency)"),
        DeviceVerdict::Refused(reason) => println!("  policy: REFUSED: {reason}"),
    }
}
