//! Models of several shards on the sim backend (three simulated GPUs): the model seal
//! (`seal_model_set`), the whole-model verification (`verify_model`, one thread per GPU), the model
//! attestation (`attest_model`) and its offline check (`AttestationEnvelope::verify_model`, and
//! `attest verify` on the command line).

use std::sync::Arc;

use vram_residency::audit::{AuditEvent, FailureKind, Severity};
use vram_residency::digest::LEVEL1_SPAN;
use vram_residency::{
    AttestationEnvelope, ManagerConfig, PublicKey, SealOptions, SealedModel, SealedShard, ShardId,
    VramError, WorkerState,
};

use crate::support::{SimWorker, bin, random_bytes, sim_worker};

const MODEL: &str = "org/model";
const NONCE: [u8; 16] = *b"model-nonce-0001";

fn three_gpus() -> SimWorker {
    sim_worker(3, 64 << 20, ManagerConfig::default())
}

fn opts(model_ref: &str, id: &str, index: u32, total: u32) -> SealOptions {
    SealOptions {
        shard_id: Some(ShardId::new(id).unwrap()),
        model_ref: model_ref.to_owned(),
        shard_index: index,
        total_shards: total,
        ..SealOptions::default()
    }
}

/// A safetensors image of two F32 tensors of 640 KiB each, `layer.0.weight` then `layer.1.weight`:
/// the last 512 KiB range of the file lies inside `layer.1.weight` only.
fn two_tensor_safetensors(seed: u64) -> Vec<u8> {
    const ELEMENTS: usize = 163_840;
    const BYTES: usize = ELEMENTS * 4;
    let mut header = format!(
        r#"{{"layer.0.weight":{{"dtype":"F32","shape":[{ELEMENTS}],"data_offsets":[0,{BYTES}]}},"layer.1.weight":{{"dtype":"F32","shape":[{ELEMENTS}],"data_offsets":[{BYTES},{}]}}}}"#,
        2 * BYTES
    );
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    let mut image = (header.len() as u64).to_le_bytes().to_vec();
    image.extend_from_slice(header.as_bytes());
    image.extend_from_slice(&random_bytes(2 * BYTES, seed));
    image
}

/// Three shards of `MODEL`, shard `i` on GPU `i`, each a two-tensor safetensors file.
fn seal_three(w: &SimWorker) -> Vec<SealedShard> {
    (0..3u32)
        .map(|i| {
            let bytes = two_tensor_safetensors(100 + u64::from(i));
            w.manager
                .seal_model_with(&bytes, i, &opts(MODEL, &format!("model-{i}"), i, 3))
                .unwrap()
        })
        .collect()
}

fn refs(shards: &[SealedShard]) -> Vec<&SealedShard> {
    shards.iter().collect()
}

fn envelope_file(
    dir: &tempfile::TempDir,
    name: &str,
    json: &serde_json::Value,
) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap()).unwrap();
    path
}

#[test]
fn three_shards_on_three_gpus_are_sealed_verified_in_parallel_and_attested_as_one_model_vp_006() {
    let w = three_gpus();
    let shards = seal_three(&w);
    // The order in which they are given does not matter.
    let given = [&shards[2], &shards[0], &shards[1]];
    let model = w.manager.seal_model_set(&given).unwrap();
    assert_eq!(model.model_ref(), MODEL);
    assert_eq!(model.total_shards(), 3);
    for (i, entry) in model.record.shards.iter().enumerate() {
        assert_eq!(entry.shard_index as usize, i);
        assert_eq!(&entry.shard_id, shards[i].shard_id());
        assert_eq!(entry.digest, shards[i].digest());
        assert_eq!(entry.gpu_device as usize, i);
    }
    let sealed_event = w
        .audit
        .entries()
        .into_iter()
        .find_map(|e| match e.event {
            AuditEvent::ModelSealed {
                model_ref,
                total_shards,
                record_digest,
            } => Some((model_ref, total_shards, record_digest)),
            _ => None,
        })
        .expect("model_sealed is audited");
    assert_eq!(
        sealed_event,
        (MODEL.to_owned(), 3, model.record.record_digest().unwrap())
    );

    // Verified: one report per shard by index, one entry per GPU.
    let report = w.manager.verify_model(&model, &given).unwrap();
    assert_eq!(report.model_ref, MODEL);
    assert_eq!(report.shards.len(), 3);
    for (i, shard_report) in report.shards.iter().enumerate() {
        assert_eq!(&shard_report.shard_id, shards[i].shard_id());
        assert_eq!(shard_report.digest, shards[i].digest());
    }
    let total: u64 = shards.iter().map(SealedShard::vram_bytes).sum();
    assert_eq!(report.total_bytes, total);
    let gpus: Vec<(u32, Vec<u32>, u64)> = report
        .per_gpu
        .iter()
        .map(|g| (g.gpu, g.shard_indices.clone(), g.bytes))
        .collect();
    assert_eq!(
        gpus,
        (0..3u32)
            .map(|i| (i, vec![i], shards[i as usize].vram_bytes()))
            .collect::<Vec<_>>()
    );
    assert!(report.elapsed >= report.per_gpu.iter().map(|g| g.elapsed).min().unwrap());

    // Attested; the envelope, as JSON, verifies with the public key alone, for this nonce only.
    let envelope = w.manager.attest_model(&model, &given, &NONCE).unwrap();
    let json = envelope.to_json().to_string();
    let public = PublicKey::from_pem(&w.manager.public_key().to_pem()).unwrap();
    let parsed = AttestationEnvelope::from_json(&json).unwrap();
    let stated = parsed.verify_model(&public, &NONCE).unwrap();
    assert_eq!(stated.model.model_ref, MODEL);
    assert_eq!(stated.shards.len(), 3);
    for (i, shard) in stated.shards.iter().enumerate() {
        assert_eq!(shard.record, shards[i].record);
        assert_eq!(shard.verified_digest, shards[i].digest());
        assert_eq!(shard.device_name, w.manager.devices()[i].name);
    }
    assert_eq!(stated.total_bytes(), total);
    assert!(parsed.verify_model(&public, &[0u8; 16]).is_err());
    // The shard verifier refuses a model statement.
    let err = parsed.verify(&public, &NONCE).unwrap_err().to_string();
    assert!(err.contains("model attestation"), "{err}");

    // A changed payload (old signature kept) does not verify.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let statement = String::from_utf8(parsed.payload().to_vec()).unwrap();
    let edited = statement.replacen("model-1", "model-9", 1);
    assert_ne!(edited, statement);
    value["payload"] = base64_of(edited.as_bytes()).into();
    let tampered = AttestationEnvelope::from_json(&value.to_string()).unwrap();
    let err = tampered
        .verify_model(&public, &NONCE)
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature does not verify"), "{err}");
    assert_eq!(w.manager.state(), WorkerState::Running);
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn attest_verify_checks_a_model_attestation_offline_and_prints_every_shard_vp_006() {
    let w = three_gpus();
    let shards = seal_three(&w);
    let model = w.manager.seal_model_set(&refs(&shards)).unwrap();
    let envelope = w
        .manager
        .attest_model(&model, &refs(&shards), &NONCE)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("worker.pub");
    std::fs::write(&key, w.manager.public_key().to_pem()).unwrap();
    let file = envelope_file(&dir, "model.json", &envelope.to_json());
    let check = |file: &std::path::Path, nonce: &str| {
        bin()
            .args(["attest", "verify"])
            .arg(file)
            .arg("--public-key")
            .arg(&key)
            .args(["--nonce", nonce])
            .env_remove("VRAM_RESIDENCY_TOKEN")
            .output()
            .unwrap()
    };
    let ok = check(&file, &hex::encode(NONCE));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.starts_with("OK"), "{stdout}");
    assert!(stdout.contains("model attestation verified"), "{stdout}");
    assert!(stdout.contains("NOT VRAM residency"), "{stdout}");
    assert!(stdout.contains("\"org/model\""), "{stdout}");
    assert!(stdout.contains("shards:       3"), "{stdout}");
    for shard in &shards {
        let line = stdout
            .lines()
            .find(|l| l.contains(shard.shard_id().as_str()))
            .unwrap_or_else(|| panic!("no line for {}: {stdout}", shard.shard_id()));
        assert!(
            line.contains(&format!("GPU {}", shard.gpu_device())),
            "{line}"
        );
        assert!(line.contains(&shard.digest().to_string()), "{line}");
        assert!(line.ends_with("verified"), "{line}");
    }

    // Another nonce: exit 1, says why.
    let other = check(&file, &"5b".repeat(16));
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stdout).contains("nonce"));

    // A changed payload with the old signature: exit 1.
    let mut value = envelope.to_json();
    let edited = String::from_utf8(envelope.payload().to_vec())
        .unwrap()
        .replacen("\"total_shards\":3", "\"total_shards\":2", 1);
    value["payload"] = base64_of(edited.as_bytes()).into();
    let tampered = envelope_file(&dir, "tampered.json", &value);
    let refused = check(&tampered, &hex::encode(NONCE));
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains("signature does not verify"));

    // A shard attestation still verifies through the same command.
    let single = w.manager.attest(&shards[0], &NONCE).unwrap();
    let single_file = envelope_file(&dir, "shard.json", &single.to_json());
    let ok = check(&single_file, &hex::encode(NONCE));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("shard:        model-0"), "{stdout}");
}

#[test]
fn a_bit_flipped_in_the_shard_on_gpu_1_fails_the_model_naming_shard_and_tensor_and_stops_the_worker_worker_4122()
 {
    let w = three_gpus();
    let shards = seal_three(&w);
    let given = refs(&shards);
    let model = w.manager.seal_model_set(&given).unwrap();
    let last_byte = shards[1].vram_bytes() - 10;
    w.sim
        .flip_bit(shards[1].allocation_id(), last_byte * 8 + 3)
        .unwrap();
    let entries_before = w.audit.entries().len();
    match w.manager.verify_model(&model, &given) {
        Err(VramError::ModelShardFailed {
            model_ref,
            shard_index,
            error,
            others,
        }) => {
            assert_eq!(model_ref, MODEL);
            assert_eq!(shard_index, 1);
            assert!(others.is_empty(), "{others:?}");
            match *error {
                VramError::Corruption {
                    shard_id, tensors, ..
                } => {
                    assert_eq!(shard_id.as_str(), "model-1");
                    assert_eq!(tensors, vec!["layer.1.weight".to_owned()]);
                }
                other => panic!("expected corruption, got {other:?}"),
            }
        }
        other => panic!("expected a failed shard, got {other:?}"),
    }
    assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
    // The failure was audited critical for that shard; the other two were still verified.
    let after: Vec<_> = w.audit.entries().split_off(entries_before);
    assert!(after.iter().any(|e| e.severity == Severity::Critical
        && matches!(&e.event, AuditEvent::SealVerificationFailed { shard_id, gpu: 1, kind: FailureKind::Corruption, .. } if shard_id.as_str() == "model-1")));
    let verified: Vec<u32> = after
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::SealVerified { gpu, .. } => Some(*gpu),
            _ => None,
        })
        .collect();
    assert_eq!(
        {
            let mut v = verified;
            v.sort_unstable();
            v
        },
        vec![0, 2]
    );
    assert!(
        after
            .iter()
            .any(|e| matches!(e.event, AuditEvent::WorkerStopped { .. }))
    );
    // No attestation for a stopped worker.
    assert!(matches!(
        w.manager.attest_model(&model, &given, &NONCE),
        Err(VramError::WorkerStopped { .. })
    ));

    // A second shard damaged: the first by index is the error, the other is not lost.
    w.sim.flip_bit(shards[2].allocation_id(), 8 * 100).unwrap();
    match w.manager.verify_model(&model, &given) {
        Err(error @ VramError::ModelShardFailed { .. }) => {
            assert!(error.is_fatal());
            let text = error.to_string();
            let VramError::ModelShardFailed {
                shard_index,
                others,
                ..
            } = error
            else {
                unreachable!()
            };
            assert_eq!(shard_index, 1);
            assert_eq!(others.len(), 1);
            assert_eq!(others[0].0, 2);
            assert!(
                matches!(&others[0].1, VramError::Corruption { tensors, .. } if tensors.contains(&"(header)".to_owned())),
                "{others:?}"
            );
            assert!(text.contains("also failed: shard 2"), "{text}");
        }
        other => panic!("expected a failed shard, got {other:?}"),
    }
}

#[test]
fn verify_model_refuses_a_swapped_missing_duplicated_or_extra_shard_naming_its_index() {
    let w = three_gpus();
    let shards = seal_three(&w);
    let model = w.manager.seal_model_set(&refs(&shards)).unwrap();
    // Valid shards of their own, that are not this model's shard 1 (or not of it at all).
    let data = random_bytes(LEVEL1_SPAN + 5, 7);
    let other_model = w
        .manager
        .seal_model_with(&data, 1, &opts("org/other", "other-1", 1, 3))
        .unwrap();
    let other_version = w
        .manager
        .seal_model_with(&data, 1, &opts(MODEL, "model-1-v2", 1, 3))
        .unwrap();
    let extra = w
        .manager
        .seal_model_with(&data, 2, &opts(MODEL, "model-3", 3, 4))
        .unwrap();
    let check = |given: &[&SealedShard], what: &str| {
        let error = w.manager.verify_model(&model, given).unwrap_err();
        assert!(
            !error.is_fatal() && !error.is_retriable(),
            "{what}: {error}"
        );
        let text = error.to_string();
        assert!(text.contains("\"org/model\""), "{what}: {text}");
        (error, text)
    };

    let (error, text) = check(&[&shards[0], &other_model, &shards[2]], "another model");
    assert!(
        matches!(error, VramError::ModelShardMismatch { shard_index: 1, .. }),
        "{error:?}"
    );
    assert!(
        text.contains("another model") && text.contains("other-1"),
        "{text}"
    );

    let (error, text) = check(&[&shards[0], &other_version, &shards[2]], "another version");
    assert!(
        matches!(error, VramError::ModelShardMismatch { shard_index: 1, .. }),
        "{error:?}"
    );
    assert!(text.contains("shard id differs"), "{text}");

    let (error, text) = check(&[&shards[0], &shards[2]], "missing");
    assert!(
        matches!(
            error,
            VramError::ModelShardMissing {
                shard_index: 1,
                total_shards: 3,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(text.contains("shard 1 is missing"), "{text}");

    let (error, text) = check(
        &[&shards[0], &shards[1], &shards[1], &shards[2]],
        "duplicated",
    );
    assert!(
        matches!(
            error,
            VramError::ModelShardDuplicated { shard_index: 1, .. }
        ),
        "{error:?}"
    );
    assert!(text.contains("shard 1 is given more than once"), "{text}");

    let (error, text) = check(&[&shards[0], &shards[1], &shards[2], &extra], "extra");
    assert!(
        matches!(
            error,
            VramError::ModelShardExtra {
                shard_index: 3,
                total_shards: 3,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(text.contains("shard 3 is not part of the model"), "{text}");

    // None of these is an incident, and none is attested.
    assert_eq!(w.manager.state(), WorkerState::Running);
    assert!(matches!(
        w.manager
            .attest_model(&model, &[&shards[0], &shards[2]], &NONCE),
        Err(VramError::ModelShardMissing { shard_index: 1, .. })
    ));
    assert!(w.manager.verify_model(&model, &refs(&shards)).is_ok());
}

#[test]
fn an_edited_model_seal_is_forgery_audited_critical_and_stops_the_worker_ci_003_worker_4122() {
    for edit in 0..3 {
        let w = three_gpus();
        let shards = seal_three(&w);
        let mut model: SealedModel = w.manager.seal_model_set(&refs(&shards)).unwrap();
        let genuine = model.seal_tag().to_hex();
        match edit {
            0 => model.record.shards[2].vram_bytes += 1,
            1 => {
                model.record.shards.pop();
            }
            _ => model.flip_tag_bit_for_tests(77),
        }
        let given: Vec<&SealedShard> = shards.iter().take(model.total_shards()).collect();
        let error = w.manager.verify_model(&model, &given).unwrap_err();
        assert!(
            matches!(&error, VramError::ModelSealForgery { model_ref } if model_ref == MODEL),
            "edit {edit}: {error:?}"
        );
        assert!(error.is_fatal());
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(&genuine), "{shown}");
        assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
        let entries = w.audit.entries();
        assert!(entries.iter().any(|e| e.severity == Severity::Critical
            && matches!(&e.event, AuditEvent::ModelSealVerificationFailed { model_ref, .. } if model_ref == MODEL)));
        for entry in &entries {
            assert!(!format!("{entry:?}").contains(&genuine));
        }
        // Nothing was re-hashed after the forgery was found.
        assert!(
            !entries
                .iter()
                .any(|e| matches!(e.event, AuditEvent::SealVerified { .. }))
        );
    }
}

#[test]
fn seal_model_set_refuses_an_incomplete_or_mixed_set_and_a_forged_shard() {
    let w = three_gpus();
    let shards = seal_three(&w);
    assert!(matches!(
        w.manager.seal_model_set(&[]),
        Err(VramError::InvalidInput {
            field: "shards",
            ..
        })
    ));
    assert!(matches!(
        w.manager.seal_model_set(&[&shards[0], &shards[2]]),
        Err(VramError::ModelShardMissing { shard_index: 1, .. })
    ));
    assert!(matches!(
        w.manager
            .seal_model_set(&[&shards[0], &shards[1], &shards[0], &shards[2]]),
        Err(VramError::ModelShardDuplicated { shard_index: 0, .. })
    ));
    let other = w
        .manager
        .seal_model_with(
            &random_bytes(100, 9),
            1,
            &opts("org/other", "other-1", 1, 3),
        )
        .unwrap();
    let error = w
        .manager
        .seal_model_set(&[&shards[0], &other, &shards[2]])
        .unwrap_err();
    assert!(
        matches!(error, VramError::ModelShardMismatch { shard_index: 1, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("\"org/other\""), "{error}");
    let four = w
        .manager
        .seal_model_with(&random_bytes(100, 10), 0, &opts(MODEL, "four-0", 0, 4))
        .unwrap();
    assert!(matches!(
        w.manager.seal_model_set(&[&shards[0], &four]),
        Err(VramError::ModelShardMismatch { shard_index: 0, .. })
    ));
    assert_eq!(w.manager.state(), WorkerState::Running);
    assert!(
        !w.audit
            .entries()
            .iter()
            .any(|e| matches!(e.event, AuditEvent::ModelSealed { .. }))
    );

    // A shard whose own seal does not verify is forgery: the worker stops, no model seal is made.
    let mut shards = shards;
    shards[1].flip_tag_bit_for_tests(5);
    assert!(matches!(
        w.manager.seal_model_set(&refs(&shards)),
        Err(VramError::SealForgery { .. })
    ));
    assert!(matches!(w.manager.state(), WorkerState::Stopped { .. }));
    assert!(matches!(
        w.manager.seal_model_set(&refs(&shards)),
        Err(VramError::WorkerStopped { .. })
    ));
}

#[test]
fn shards_sharing_a_gpu_are_verified_one_after_another_in_index_order() {
    let w = sim_worker(2, 64 << 20, ManagerConfig::default());
    let shards: Vec<Arc<SealedShard>> = (0..4u32)
        .map(|i| {
            Arc::new(
                w.manager
                    .seal_model_with(
                        &random_bytes(1000 + i as usize, u64::from(i)),
                        i % 2,
                        &opts(MODEL, &format!("s-{i}"), i, 4),
                    )
                    .unwrap(),
            )
        })
        .collect();
    let given: Vec<&SealedShard> = shards.iter().map(AsRef::as_ref).collect();
    let model = w.manager.seal_model_set(&given).unwrap();
    let entries_before = w.audit.entries().len();
    let report = w.manager.verify_model(&model, &given).unwrap();
    let per_gpu: Vec<(u32, Vec<u32>)> = report
        .per_gpu
        .iter()
        .map(|g| (g.gpu, g.shard_indices.clone()))
        .collect();
    assert_eq!(per_gpu, vec![(0, vec![0, 2]), (1, vec![1, 3])]);
    assert_eq!(
        report.per_gpu[0].bytes,
        shards[0].vram_bytes() + shards[2].vram_bytes()
    );
    // Per GPU, the audit records of the verifications are in index order.
    let order: Vec<(u32, String)> = w.audit.entries()[entries_before..]
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::SealVerified { gpu, shard_id, .. } => Some((*gpu, shard_id.to_string())),
            _ => None,
        })
        .collect();
    for gpu in 0..2 {
        let ids: Vec<&str> = order
            .iter()
            .filter(|(g, _)| *g == gpu)
            .map(|(_, id)| id.as_str())
            .collect();
        let expected: Vec<String> = (0..4)
            .filter(|i| i % 2 == gpu)
            .map(|i| format!("s-{i}"))
            .collect();
        assert_eq!(ids, expected);
    }
}

/// One process per GPU (as under `torch.distributed`): two managers of one worker (the same worker
/// token, separate backends), each holding one shard. Rank 0 seals the model from the gathered seal
/// records and tags, then makes one model attestation from the ranks' fresh shard attestations; it
/// verifies offline with the public key alone. A missing rank, another nonce and a record from
/// another worker are refused.
#[test]
fn ranks_of_one_worker_seal_and_attest_one_model_from_gathered_records_and_attestations_vp_006() {
    let rank0 = sim_worker(2, 64 << 20, ManagerConfig::default());
    let rank1 = sim_worker(2, 64 << 20, ManagerConfig::default());
    let shard0 = rank0
        .manager
        .seal_model_with(
            &two_tensor_safetensors(200),
            0,
            &opts("org/tp2", "tp-0", 0, 2),
        )
        .unwrap();
    let shard1 = rank1
        .manager
        .seal_model_with(
            &two_tensor_safetensors(201),
            1,
            &opts("org/tp2", "tp-1", 1, 2),
        )
        .unwrap();
    // What each rank sends to rank 0: its seal record's canonical bytes and its tag.
    let gathered: Vec<_> = [&shard0, &shard1]
        .iter()
        .map(|s| {
            let record = vram_residency::SealRecord::decode(&s.record.encode().unwrap()).unwrap();
            let tag = vram_residency::Tag::from_public_bytes(*s.seal_tag().as_bytes());
            (record, tag)
        })
        .collect();
    let model = rank0.manager.seal_model_records(&gathered).unwrap();
    assert_eq!(model.total_shards(), 2);
    assert_eq!(model.record.shards[1].gpu_device, 1);

    let envelopes = [
        rank0.manager.attest(&shard0, &NONCE).unwrap(),
        rank1.manager.attest(&shard1, &NONCE).unwrap(),
    ];
    let combined = rank0
        .manager
        .attest_model_gathered(&model, &envelopes, &NONCE)
        .unwrap();
    let public = PublicKey::from_pem(&rank1.manager.public_key().to_pem()).unwrap();
    let attested = combined.verify_model(&public, &NONCE).unwrap();
    assert_eq!(attested.shards.len(), 2);
    assert_eq!(attested.shards[1].record.shard_id.as_str(), "tp-1");
    assert_eq!(attested.shards[1].verified_digest, shard1.record.digest);

    // A rank missing, a rank that attested for another nonce.
    assert!(matches!(
        rank0
            .manager
            .attest_model_gathered(&model, &envelopes[..1], &NONCE),
        Err(VramError::ModelShardMissing { shard_index: 1, .. })
    ));
    let stale = rank1.manager.attest(&shard1, b"another-nonce-16").unwrap();
    let refused = rank0
        .manager
        .attest_model_gathered(&model, &[envelopes[0].clone(), stale], &NONCE)
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("gathered attestation 1 does not verify"),
        "{refused}"
    );
    assert_eq!(rank0.manager.state(), WorkerState::Running);

    // A shard sealed by another worker (another token): its tag does not verify here. Forgery.
    let other = vram_residency::VramManager::new_with_token(
        &vram_residency::WorkerToken::from_bytes(
            b"another-worker-token-of-32-bytes-or-more".to_vec(),
        )
        .unwrap(),
        Arc::new(vram_residency::SimBackend::new(
            vram_residency::SimConfig::default(),
        )),
    )
    .unwrap();
    let foreign = other
        .seal_model_with(
            &two_tensor_safetensors(202),
            0,
            &opts("org/tp2", "tp-1", 1, 2),
        )
        .unwrap();
    let mixed = vec![
        gathered[0].clone(),
        (foreign.record.clone(), *foreign.seal_tag()),
    ];
    assert!(matches!(
        rank0.manager.seal_model_records(&mixed),
        Err(VramError::SealForgery { .. })
    ));
    assert!(matches!(rank0.manager.state(), WorkerState::Stopped { .. }));
    for (w, shard) in [(&rank0, shard0), (&rank1, shard1)] {
        w.manager.deallocate(shard).unwrap();
    }
    other.deallocate(foreign).unwrap();
}
