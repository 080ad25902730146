//! The manager on the sim backend: the seal / verify / execute / deallocate contract, bad input,
//! capacity, the Stopped state and the audit trail.

use std::sync::Arc;

use vram_residency::audit::{AuditEvent, FailureKind, Severity};
use vram_residency::digest::{LEVEL1_SPAN, digest_bytes};
use vram_residency::{
    BackendKind, ByteRange, ManagerConfig, SealOptions, ShardId, SimBackend, SimConfig, VramError,
    VramManager, WorkerState, WorkerToken,
};

use crate::support::{random_bytes, sim_free, sim_worker, small_worker, token};

fn opts_with_id(id: &str) -> SealOptions {
    SealOptions {
        shard_id: Some(ShardId::new(id).unwrap()),
        ..SealOptions::default()
    }
}

#[test]
fn seal_then_verify_round_trip_records_the_vram_digest_ci_001() {
    let w = small_worker();
    let data = random_bytes(3 * LEVEL1_SPAN + 77, 1);
    let shard = w.manager.seal_model(&data, 1).unwrap();
    assert_eq!(shard.record.digest, digest_bytes(&data).unwrap().digest());
    assert_eq!(shard.record.vram_bytes, data.len() as u64);
    assert_eq!(shard.record.gpu_device, 1);
    assert_eq!(shard.backend(), BackendKind::Sim);
    let report = w.manager.verify_sealed(&shard).unwrap();
    assert_eq!(report.digest, shard.record.digest);
    assert_eq!(w.manager.state(), WorkerState::Running);
}

#[test]
fn execute_verifies_first_then_lends_the_exact_bytes_ci_007() {
    let w = small_worker();
    let data = random_bytes(10_000, 2);
    let shard = w.manager.seal_model(&data, 0).unwrap();
    let seen = w
        .manager
        .execute(&shard, |weights| weights.host_bytes().unwrap().to_vec())
        .unwrap();
    assert_eq!(seen, data);
    let verified = w
        .audit
        .entries()
        .iter()
        .filter(|e| matches!(e.event, AuditEvent::SealVerified { .. }))
        .count();
    assert_eq!(
        verified, 1,
        "execute must verify exactly once before lending"
    );
}

#[test]
fn execute_and_lend_describe_the_sealed_table_and_lend_verifies_first_ci_007() {
    let w = small_worker();
    let path = crate::support::repo_path("crates/vram-residency/tests/fixtures/tiny.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let shard = w
        .manager
        .seal_file(&path, 0, &SealOptions::default())
        .unwrap();
    let table = shard.tensor_table().unwrap().clone();
    // execute: typed views of the table over the exact sealed bytes.
    let views = w
        .manager
        .execute(&shard, |weights| {
            let host = weights.host_bytes().unwrap();
            weights
                .tensors()
                .iter()
                .map(|view| {
                    let start = usize::try_from(view.offset()).unwrap();
                    let end = start + usize::try_from(view.bytes()).unwrap();
                    (
                        view.name().to_owned(),
                        view.layout().unwrap().shape,
                        host[start..end].to_vec(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(views.len(), table.tensors.len());
    for ((name, shape, data), info) in views.iter().zip(&table.tensors) {
        assert_eq!(name, &info.name);
        assert_eq!(
            shape, &info.shape,
            "safetensors shapes are row-major already"
        );
        let start = usize::try_from(info.offset).unwrap();
        assert_eq!(data.as_slice(), &bytes[start..start + data.len()]);
    }
    // lend: verified first, holds the shard until the lease is dropped.
    let shard = Arc::new(shard);
    let lease = w.manager.lend(&shard).unwrap();
    assert_eq!(lease.tensors().len(), table.tensors.len());
    assert!(!lease.location().is_device());
    assert!(!format!("{lease:?}").contains("0x"));
    let shard = Arc::try_unwrap(shard).unwrap_err();
    drop(lease);
    let shard = Arc::new(Arc::try_unwrap(shard).unwrap());
    // A changed byte: lend refuses (it verifies first) and the worker stops.
    w.sim.flip_bit(shard.allocation_id(), 8 * 100).unwrap();
    assert!(matches!(
        w.manager.lend(&shard),
        Err(VramError::Corruption { .. })
    ));
    assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
}

#[test]
fn corruption_is_detected_localised_audited_and_stops_the_worker_worker_4122() {
    let w = small_worker();
    let data = random_bytes(4 * LEVEL1_SPAN, 3);
    let shard = w.manager.seal_model(&data, 0).unwrap();
    let bit = (2 * LEVEL1_SPAN as u64 + 1234) * 8 + 5;
    w.sim.flip_bit(shard.allocation_id(), bit).unwrap();
    match w.manager.verify_sealed(&shard) {
        Err(VramError::Corruption { damaged, .. }) => assert_eq!(
            damaged,
            vec![ByteRange {
                start: 2 * LEVEL1_SPAN as u64,
                end: 3 * LEVEL1_SPAN as u64
            }]
        ),
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
    assert!(matches!(
        w.manager.seal_model(&[1], 0),
        Err(VramError::WorkerStopped { .. })
    ));
    assert!(matches!(
        w.manager.execute(&shard, |_| ()),
        Err(VramError::WorkerStopped { .. })
    ));
    let entries = w.audit.entries();
    assert!(entries.iter().any(|e| e.severity == Severity::Critical
        && matches!(
            e.event,
            AuditEvent::SealVerificationFailed {
                kind: FailureKind::Corruption,
                ..
            }
        )));
    assert!(
        entries
            .iter()
            .any(|e| matches!(e.event, AuditEvent::WorkerStopped { .. }))
    );
}

#[test]
fn edited_public_field_is_forgery_not_corruption_ci_002() {
    let w = small_worker();
    let mut shard = w.manager.seal_model(&random_bytes(5000, 4), 0).unwrap();
    shard.record.vram_bytes += 1;
    assert!(matches!(
        w.manager.verify_sealed(&shard),
        Err(VramError::SealForgery { .. })
    ));
    assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
    assert!(w.audit.entries().iter().any(|e| matches!(
        e.event,
        AuditEvent::SealVerificationFailed {
            kind: FailureKind::Forgery,
            ..
        }
    )));
}

#[test]
fn forgery_error_never_contains_the_expected_tag_ci_003() {
    let w = small_worker();
    let mut shard = w.manager.seal_model(&random_bytes(100, 5), 0).unwrap();
    let genuine = shard.seal_tag().to_hex();
    shard.flip_tag_bit_for_tests(0);
    let err = w.manager.verify_sealed(&shard).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(&genuine), "{shown}");
    for entry in w.audit.entries() {
        assert!(!format!("{entry:?}").contains(&genuine));
    }
}

#[test]
fn shard_from_another_manager_is_refused() {
    let a = small_worker();
    let b = small_worker();
    let shard = a.manager.seal_model(&[1, 2, 3], 0).unwrap();
    assert!(matches!(
        b.manager.verify_sealed(&shard),
        Err(VramError::ForeignShard { .. })
    ));
    assert!(matches!(
        b.manager.deallocate(shard),
        Err(VramError::ForeignShard { .. })
    ));
}

#[test]
fn manager_with_other_token_has_another_identity_and_its_attestations_do_not_verify_ci_005() {
    // Same backend, different worker token: another Ed25519 identity, so an attestation made by one
    // worker does not verify with the other's public key (and handles are bound to their manager).
    let w = small_worker();
    let shard = w.manager.seal_model(&[9; 64], 0).unwrap();
    let other = WorkerToken::from_bytes(b"another-token-0123456789abcdef0123".to_vec()).unwrap();
    assert_ne!(other.public_key(), *w.manager.public_key());
    assert_eq!(token().public_key(), *w.manager.public_key());
    let nonce = [7u8; 16];
    let envelope = w.manager.attest(&shard, &nonce).unwrap();
    assert!(envelope.verify(w.manager.public_key(), &nonce).is_ok());
    let err = envelope.verify(&other.public_key(), &nonce).unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_no_state_change_iv_001_to_005_rp_003() {
    // The size limit is configurable (used below) and 100 GB by default.
    assert_eq!(ManagerConfig::default().max_model_bytes, 100_000_000_000);
    let w = sim_worker(
        1,
        1 << 20,
        ManagerConfig {
            max_model_bytes: 1000,
            headroom_bytes: 0,
            ..ManagerConfig::default()
        },
    );
    let cases: Vec<(Result<_, VramError>, &str)> = vec![
        (w.manager.seal_model(&[], 0), "empty"),
        (
            w.manager.seal_model(&[0; 1001], 0),
            "over the configured maximum",
        ),
        (w.manager.seal_model(&[0; 10], 1), "out of range"),
        (
            w.manager.seal_model_with(
                &[0; 10],
                0,
                &SealOptions {
                    model_ref: "a\0b".to_owned(),
                    ..SealOptions::default()
                },
            ),
            "model_ref",
        ),
        (
            w.manager.seal_model_with(
                &[0; 10],
                0,
                &SealOptions {
                    shard_index: 2,
                    total_shards: 2,
                    ..SealOptions::default()
                },
            ),
            "shard_index",
        ),
    ];
    for (result, needle) in cases {
        let err = result.unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
        assert!(!err.is_fatal());
    }
    for bad_id in ["", "a/b", "..", "a\0b", &"x".repeat(257)] {
        assert!(matches!(
            ShardId::new(bad_id),
            Err(vram_residency::ids::InvalidShardId { .. })
        ));
    }
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    assert_eq!(w.manager.state(), WorkerState::Running);
    assert!(
        w.audit.entries().is_empty(),
        "refused input must not allocate"
    );
}

#[test]
fn insufficient_vram_is_retriable_actionable_and_allocates_nothing_rp_001_rp_004() {
    let w = sim_worker(
        1,
        10_000,
        ManagerConfig {
            max_model_bytes: 1 << 30,
            headroom_bytes: 1_000,
            ..ManagerConfig::default()
        },
    );
    let _a = w.manager.seal_model(&[1; 6_000], 0).unwrap();
    let err = w.manager.seal_model(&[1; 3_001], 0).unwrap_err();
    assert!(matches!(
        err,
        VramError::InsufficientVram {
            gpu: 0,
            needed: 3_001,
            available: 3_000
        }
    ));
    assert!(err.is_retriable());
    assert_eq!(w.manager.used_vram(0).unwrap(), 6_000);
    assert!(w.audit.entries().iter().any(|e| matches!(
        e.event,
        AuditEvent::VramAllocationFailed {
            requested: 3_001,
            ..
        }
    )));
    assert!(w.manager.seal_model(&[1; 3_000], 0).is_ok());
}

#[test]
fn duplicate_shard_id_is_refused_until_the_first_is_deallocated() {
    let w = small_worker();
    let a = w
        .manager
        .seal_model_with(&[1; 10], 0, &opts_with_id("dup"))
        .unwrap();
    assert!(matches!(
        w.manager.seal_model_with(&[1; 10], 1, &opts_with_id("dup")),
        Err(VramError::DuplicateShardId { .. })
    ));
    w.manager.deallocate(a).unwrap();
    assert!(
        w.manager
            .seal_model_with(&[1; 10], 1, &opts_with_id("dup"))
            .is_ok()
    );
}

#[test]
fn deallocate_and_drop_return_capacity_and_deallocate_is_audited_rp_005() {
    let w = small_worker();
    let a = w.manager.seal_model(&[1; 5000], 0).unwrap();
    let b = w.manager.seal_model(&[1; 7000], 0).unwrap();
    assert_eq!(w.manager.used_vram(0).unwrap(), 12_000);
    w.manager.deallocate(a).unwrap();
    assert_eq!(w.manager.used_vram(0).unwrap(), 7000);
    drop(b);
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    let freed = w
        .audit
        .entries()
        .iter()
        .filter(|e| matches!(e.event, AuditEvent::VramDeallocated { bytes: 5000, .. }))
        .count();
    assert_eq!(freed, 1);
}

#[test]
fn a_shard_outliving_its_manager_and_backend_drops_without_panicking_ms_005() {
    // Drop must not panic under any circumstances (MS-005): here the shard's backend and manager
    // are gone first, so its memory's owner can no longer be told; the drop frees what it holds.
    let w = small_worker();
    let shard = w.manager.seal_model(&[3; 5000], 0).unwrap();
    let other = w.manager.seal_model(&[4; 5000], 1).unwrap();
    let crate::support::SimWorker {
        sim,
        manager,
        audit,
    } = w;
    drop(manager);
    drop(sim);
    drop(audit);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        drop(shard);
        drop(other);
    }));
    assert!(dropped.is_ok(), "dropping a shard panicked");
}

#[test]
fn expected_digest_mismatch_seals_nothing() {
    let w = small_worker();
    let wrong = digest_bytes(b"something else").unwrap().digest();
    let err = w
        .manager
        .seal_model_with(
            &[7; 9000],
            0,
            &SealOptions {
                expected_digest: Some(wrong),
                ..SealOptions::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, VramError::DigestMismatch { .. }));
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    let right = digest_bytes(&[7; 9000]).unwrap().digest();
    assert!(
        w.manager
            .seal_model_with(
                &[7; 9000],
                0,
                &SealOptions {
                    expected_digest: Some(right),
                    ..SealOptions::default()
                },
            )
            .is_ok()
    );
}

#[test]
fn seal_file_streams_a_file_and_refuses_directories_and_missing_files() {
    let w = small_worker();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bin");
    let data = random_bytes(2 * LEVEL1_SPAN + 5, 6);
    std::fs::write(&path, &data).unwrap();
    let shard = w
        .manager
        .seal_file(&path, 0, &SealOptions::default())
        .unwrap();
    assert_eq!(shard.record.digest, digest_bytes(&data).unwrap().digest());
    assert!(matches!(
        w.manager.seal_file(dir.path(), 0, &SealOptions::default()),
        Err(VramError::InvalidInput { .. })
    ));
    assert!(matches!(
        w.manager
            .seal_file(&dir.path().join("missing"), 0, &SealOptions::default()),
        Err(VramError::Io { .. })
    ));
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        w.manager.seal_file(&empty, 0, &SealOptions::default()),
        Err(VramError::EmptyModel)
    ));
}

#[test]
fn short_reader_is_source_changed_and_releases_everything() {
    let w = small_worker();
    let data = [5u8; 100];
    let err = w
        .manager
        .seal_reader(&mut &data[..], 200, 0, &SealOptions::default())
        .unwrap_err();
    assert!(matches!(err, VramError::SourceChanged { .. }), "{err}");
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    assert_eq!(sim_free(&w.sim, 0), 64 << 20);
}

#[test]
fn no_pointer_or_secret_in_debug_display_or_json_ms_001_ci_006() {
    let w = small_worker();
    let shard = w.manager.seal_model(&random_bytes(4096, 7), 0).unwrap();
    let outputs = [
        format!("{shard:?}"),
        format!("{shard}"),
        serde_json::to_string(&shard).unwrap(),
        format!("{:?}", w.manager),
        format!("{:?}", w.manager.public_key()),
        format!("{:?}", w.audit.entries()),
    ];
    for text in &outputs {
        assert!(!text.contains("0x7f"), "{text}");
        assert!(!text.to_lowercase().contains("ptr"), "{text}");
        assert!(!text.contains(crate::support::TEST_TOKEN), "{text}");
    }
    let json: serde_json::Value = serde_json::to_value(&shard).unwrap();
    assert_eq!(json["backend"], "sim");
    assert_eq!(json["shard_id"], shard.record.shard_id.as_str());
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert!(
        keys.iter()
            .all(|k| !k.contains("ptr") && !k.contains("addr") && *k != "signature"),
        "{keys:?}"
    );
}

#[test]
fn shards_go_to_the_gpu_they_are_asked_for_iv_002() {
    let w = small_worker();
    let on_one = w.manager.seal_model(&[1; 1000], 1).unwrap();
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    assert_eq!(w.manager.used_vram(1).unwrap(), 1000);
    assert_eq!(sim_free(&w.sim, 1), (64 << 20) - 1000);
    drop(on_one);
}

#[test]
fn backend_without_devices_is_a_clear_error() {
    let sim = SimBackend::new(SimConfig {
        devices: 0,
        bytes_per_device: 0,
    });
    let err = VramManager::new_with_token(&token(), Arc::new(sim)).unwrap_err();
    assert!(matches!(err, VramError::BackendUnavailable { .. }), "{err}");
}

/// A `cuda`-kind backend over simulated memory whose devices report themselves integrated (or
/// without ECC): what the device policy must refuse at start.
struct FakeGpu {
    sim: SimBackend,
    integrated: bool,
    ecc: bool,
}

impl vram_residency::Backend for FakeGpu {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn devices(&self) -> vram_residency::Result<Vec<vram_residency::DeviceInfo>> {
        let mut devices = self.sim.devices()?;
        for device in &mut devices {
            device.integrated = Some(self.integrated);
            device.ecc_enabled = Some(self.ecc);
        }
        Ok(devices)
    }
    fn allocate(
        &self,
        gpu: u32,
        bytes: u64,
        data_offset: u64,
    ) -> vram_residency::Result<Box<dyn vram_residency::DeviceBuffer>> {
        self.sim.allocate(gpu, bytes, data_offset)
    }
}

#[test]
fn a_worker_refuses_to_start_on_an_integrated_gpu_or_without_required_ecc_and_audits_it_worker_4163()
 {
    let sim = || {
        SimBackend::new(SimConfig {
            devices: 1,
            bytes_per_device: 1 << 20,
        })
    };
    for (integrated, ecc, require_ecc, needle) in [
        (true, true, false, "integrated"),
        (false, false, true, "ECC is off"),
    ] {
        let audit = Arc::new(vram_residency::MemoryAuditSink::default());
        let backend = Arc::new(FakeGpu {
            sim: sim(),
            integrated,
            ecc,
        });
        let config = ManagerConfig {
            device_policy: vram_residency::DevicePolicy {
                require_ecc,
                ..vram_residency::DevicePolicy::default()
            },
            ..ManagerConfig::default()
        };
        match VramManager::with_config(&token(), backend, config, audit.clone()) {
            Err(VramError::PolicyViolation { reason }) => {
                assert!(reason.contains(needle), "{reason}")
            }
            other => panic!("expected a policy violation, got {:?}", other.map(|_| ())),
        }
        let entries = audit.entries();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(
            matches!(&entries[0].event, AuditEvent::PolicyViolation { gpu: 0, reason } if reason.contains(needle))
        );
        assert_eq!(entries[0].severity, Severity::Critical);
    }
    // A discrete GPU with ECC passes, also when ECC is required.
    let backend = Arc::new(FakeGpu {
        sim: sim(),
        integrated: false,
        ecc: true,
    });
    let config = ManagerConfig {
        device_policy: vram_residency::DevicePolicy {
            require_ecc: true,
            ..vram_residency::DevicePolicy::default()
        },
        ..ManagerConfig::default()
    };
    assert!(
        VramManager::with_config(
            &token(),
            backend,
            config,
            Arc::new(vram_residency::NoAuditSink)
        )
        .is_ok()
    );
}
