//! Property tests, 10 000 cases each (security spec §6.3).

use proptest::prelude::*;
use vram_residency::digest::{LEVEL1_SPAN, digest_bytes};
use vram_residency::{ManagerConfig, SealOptions, ShardId, VramError};

use crate::support::{random_bytes, sim_worker, small_worker};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Mostly small shards, some spanning several 512 KiB level-1 units.
fn shard_len() -> impl Strategy<Value = usize> {
    prop_oneof![9 => 1usize..=8192, 1 => 1usize..=3 * LEVEL1_SPAN]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn seal_then_verify_round_trips_and_digest_is_deterministic(
        len in shard_len(), seed in any::<u64>(), gpu in 0u32..2
    ) {
        let w = small_worker();
        let data = random_bytes(len, seed);
        let shard = w.manager.seal_model(&data, gpu).unwrap();
        prop_assert_eq!(shard.record.digest, digest_bytes(&data).unwrap().digest());
        let report = w.manager.verify_sealed(&shard).unwrap();
        prop_assert_eq!(report.digest, shard.record.digest);
        let again = w.manager.seal_model(&data, 1 - gpu).unwrap();
        prop_assert_eq!(again.record.digest, shard.record.digest);
    }

    #[test]
    fn any_single_bit_flip_is_detected_as_corruption_in_the_right_range(
        len in shard_len(), seed in any::<u64>(), bit_seed in any::<u64>()
    ) {
        let w = small_worker();
        let data = random_bytes(len, seed);
        let shard = w.manager.seal_model(&data, 0).unwrap();
        let bit = bit_seed % (len as u64 * 8);
        w.sim.flip_bit(shard.allocation_id(), bit).unwrap();
        match w.manager.verify_sealed(&shard) {
            Err(VramError::Corruption { damaged, .. }) => {
                let byte = bit / 8;
                prop_assert_eq!(damaged.len(), 1);
                prop_assert!(damaged[0].start <= byte && byte < damaged[0].end);
                prop_assert!(damaged[0].end - damaged[0].start <= LEVEL1_SPAN as u64);
            }
            other => prop_assert!(false, "expected corruption, got {:?}", other),
        }
    }

    #[test]
    fn any_change_to_a_public_field_or_tag_bit_is_forgery_ci_002_ci_003(
        field in 0usize..9, pick in any::<u64>()
    ) {
        let w = small_worker();
        let mut shard = w.manager.seal_model_with(&random_bytes(600, pick), 0, &SealOptions {
            model_ref: "m".to_owned(),
            total_shards: 3,
            shard_index: 1,
            ..SealOptions::default()
        }).unwrap();
        match field {
            0 => shard.record.shard_id = ShardId::new(&format!("other-{pick}")).unwrap(),
            1 => shard.record.gpu_device ^= 1 + (pick as u32 % 7),
            2 => shard.record.vram_bytes ^= 1 << (pick % 64),
            3 => {
                let mut bytes = *shard.record.digest.as_bytes();
                bytes[(pick % 32) as usize] ^= 1 << (pick % 8);
                shard.record.digest = vram_residency::Digest::from_bytes(bytes);
            }
            4 => shard.record.sealed_at_ns += 1 + pick % 1_000_000_000,
            5 => shard.record.model_ref.push(char::from(b'a' + (pick % 26) as u8)),
            6 => shard.record.shard_index ^= 1 << (pick % 32),
            7 => shard.record.total_shards ^= 1 << (pick % 32),
            _ => shard.flip_tag_bit_for_tests((pick % 256) as usize),
        }
        let forged = matches!(w.manager.verify_sealed(&shard), Err(VramError::SealForgery { .. }));
        prop_assert!(forged, "field {} edit was not reported as forgery", field);
    }

    #[test]
    fn admissions_never_exceed_capacity_rp_001_rp_002(
        ops in proptest::collection::vec((0u64..400, any::<bool>(), 0u32..2), 1..40)
    ) {
        let w = sim_worker(2, 1_000, ManagerConfig { max_model_bytes: u64::MAX, headroom_bytes: 100, ..ManagerConfig::default() });
        let mut live = Vec::new();
        for (size, free_one, gpu) in ops {
            if free_one && !live.is_empty() {
                let shard = live.swap_remove(size as usize % live.len());
                w.manager.deallocate(shard).unwrap();
            } else if let Ok(shard) = w.manager.seal_model(&vec![1u8; size as usize], gpu) {
                live.push(shard);
            }
            for g in 0..2u32 {
                let used: u64 = live.iter().filter(|s| s.record.gpu_device == g).map(|s| s.record.vram_bytes).sum();
                let cap = w.manager.capacity(g).unwrap();
                prop_assert_eq!(cap.used, used);
                prop_assert!(cap.used <= cap.total - 100);
            }
        }
    }
}
