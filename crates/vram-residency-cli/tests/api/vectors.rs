//! Known-answer vectors from the standards, kept as data files in tests/data.

use vram_residency::digest::digest_bytes;
use vram_residency::keys::{hkdf_sha256, hmac_sha256};

use crate::support::{data_rows, pattern};

fn unhex(s: &str) -> Vec<u8> {
    if s == "-" {
        Vec::new()
    } else {
        hex::decode(s).unwrap()
    }
}

#[test]
fn hmac_sha256_matches_rfc_4231_ci_001() {
    let rows = data_rows("hmac-sha256-rfc4231.txt");
    assert_eq!(rows.len(), 6);
    for row in rows {
        let tag = hmac_sha256(&unhex(&row[1]), &unhex(&row[2]));
        assert_eq!(hex::encode(tag), row[3], "RFC 4231 case {}", row[0]);
    }
}

#[test]
fn hkdf_sha256_matches_rfc_5869_ci_005() {
    let rows = data_rows("hkdf-sha256-rfc5869.txt");
    assert_eq!(rows.len(), 3);
    for row in rows {
        let mut okm = vec![0u8; row[4].parse().unwrap()];
        hkdf_sha256(&unhex(&row[2]), &unhex(&row[1]), &unhex(&row[3]), &mut okm).unwrap();
        assert_eq!(hex::encode(okm), row[5], "RFC 5869 case {}", row[0]);
    }
}

#[test]
fn sha256_block_hash_matches_nist_vectors_ci_004() {
    use sha2::Digest as _;
    let rows = data_rows("sha256-nist.txt");
    assert_eq!(rows.len(), 4);
    for row in rows {
        let message = if let Some(h) = row[0].strip_prefix("hex:") {
            unhex(if h.is_empty() { "-" } else { h })
        } else {
            let parts: Vec<&str> = row[0].split(':').collect();
            vec![unhex(parts[2])[0]; parts[1].parse().unwrap()]
        };
        assert_eq!(hex::encode(sha2::Sha256::digest(&message)), row[1]);
    }
}

#[test]
fn fsverity_digests_match_known_answers_from_the_stock_tool() {
    let rows = data_rows("fsverity-kat.txt");
    assert!(rows.len() >= 15);
    for row in rows {
        let size: usize = row[0].parse().unwrap();
        let tree = digest_bytes(&pattern(size)).unwrap();
        assert_eq!(tree.digest().to_string(), row[1], "size {size}");
    }
}
