//! The claims of `docs/threat-model.md` ("Roles"), one test each: what an operator-token holder (a
//! compromised orchestrator), a verifier with the public key and a local user without the token file
//! can and cannot do. The observer's limits are tested in `serve.rs`.

use serde_json::{Value, json};

use crate::serve::{Home, OPERATOR_TOKEN};
use crate::support::{TEST_TOKEN, bin, write_secret};

/// The worker token of the attacker's own worker (its API token files are this home's, so it must
/// differ from them: a worker refuses an API token equal to its worker token).
const ROGUE_TOKEN: &str = "attacker-token-0123456789abcdef0123456789";

fn attest_verify(home: &Home, file: &str, nonce: &str) -> (bool, String) {
    let out = bin()
        .args(["attest", "verify"])
        .arg(home.path(file))
        .arg("--public-key")
        .arg(home.path("worker.pub"))
        .args(["--nonce", nonce])
        .env_remove("VRAM_RESIDENCY_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn payload(envelope: &Value) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn with_payload(envelope: &Value, text: &str) -> Value {
    use base64::Engine as _;
    let mut out = envelope.clone();
    out["payload"] = Value::String(base64::engine::general_purpose::STANDARD.encode(text));
    out
}

#[test]
fn an_operator_token_holder_cannot_mint_an_attestation_by_following_the_docs() {
    let home = Home::new();
    let server = home.start(&[]);
    assert_eq!(server.commit("a.bin", "real").status, 201);
    let nonce = "42".repeat(16);
    let real = server.post("/v1/shards/real/attest", &json!({ "nonce": nonce }));
    assert_eq!(real.status, 200, "{}", real.text);
    std::fs::write(home.path("real.json"), &real.text).unwrap();
    assert!(attest_verify(&home, "real.json", &nonce).0);

    // 1. The version-1 recipe: a MAC over the statement keyed by the token the attacker holds.
    //    There is no MAC any more: an Ed25519 signature is expected, and a made-up one fails.
    let statement = payload(&real.json);
    let mut hmac_forgery = real.json.clone();
    hmac_forgery["signatures"][0]["sig"] = Value::String({
        use base64::Engine as _;
        let mac =
            vram_residency::keys::hmac_sha256(OPERATOR_TOKEN.as_bytes(), statement.as_bytes());
        base64::engine::general_purpose::STANDARD.encode([mac, mac].concat())
    });
    std::fs::write(home.path("hmac.json"), hmac_forgery.to_string()).unwrap();
    let (ok, out) = attest_verify(&home, "hmac.json", &nonce);
    assert!(!ok && out.contains("does not verify"), "{out}");

    // 2. A statement about a shard that was never loaded: the real envelope with its subject
    //    edited (the signature kept) is refused.
    let sealed = statement
        .split("\"fsverity-sha256\":\"")
        .nth(1)
        .unwrap()
        .get(..64)
        .unwrap()
        .to_owned();
    let never_loaded = statement.replace(&sealed, &"0".repeat(64));
    std::fs::write(
        home.path("edited.json"),
        with_payload(&real.json, &never_loaded).to_string(),
    )
    .unwrap();
    let (ok, out) = attest_verify(&home, "edited.json", &nonce);
    assert!(!ok && out.contains("does not verify"), "{out}");

    // 3. The attacker runs a worker of its own with a worker token it chose and gets a genuine-looking
    //    attestation for a shard it chose: signed by the wrong key.
    let rogue = Home::new();
    write_secret(rogue.path("token"), ROGUE_TOKEN);
    let rogue_server = rogue.start(&[]);
    assert_eq!(rogue_server.commit("a.bin", "real").status, 201);
    let rogue_att = rogue_server.post("/v1/shards/real/attest", &json!({ "nonce": nonce }));
    assert_eq!(rogue_att.status, 200, "{}", rogue_att.text);
    std::fs::write(home.path("rogue.json"), &rogue_att.text).unwrap();
    let (ok, out) = attest_verify(&home, "rogue.json", &nonce);
    assert!(!ok && out.contains("another worker, or a forgery"), "{out}");

    // 4. Replaying the real one for another verifier's nonce fails.
    let (ok, out) = attest_verify(&home, "real.json", &"43".repeat(16));
    assert!(!ok && out.contains("nonce"), "{out}");
}

#[test]
fn an_operator_token_holder_cannot_rewrite_the_audit_log() {
    let home = Home::new();
    let server = home.start(&[]);
    assert_eq!(server.commit("a.bin", "s").status, 201);
    assert_eq!(server.delete("/v1/shards/s").status, 200);
    let head = server.get("/v1/worker").json["audit_head"]["head"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(server);
    let real = home.audit_log();

    // A log written by the attacker's own worker (its own key), with the same kind of records.
    let rogue = Home::new();
    write_secret(rogue.path("token"), ROGUE_TOKEN);
    let rogue_server = rogue.start(&[]);
    assert_eq!(rogue_server.commit("a.bin", "s").status, 201);
    drop(rogue_server);
    std::fs::write(home.path("audit.log"), rogue.audit_log()).unwrap();
    let out = home.audit_verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() && text.contains("line 1"), "{text}");

    // The real log with its last record dropped: caught with the head the worker published.
    let lines: Vec<&str> = real.lines().collect();
    let cut: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(home.path("audit.log"), cut).unwrap();
    let out = home.audit_verify_with(&home.path("worker.pub"), &["--expect-head", &head]);
    assert!(!out.status.success());
    // A record edited in place (say, the evicted shard's id): caught at that line.
    let edited = real.replacen("\"shard_id\":\"s\"", "\"shard_id\":\"t\"", 1);
    assert_ne!(edited, real);
    std::fs::write(home.path("audit.log"), edited).unwrap();
    assert!(!home.audit_verify().status.success());
}

#[test]
fn a_verifier_with_the_public_key_checks_but_cannot_sign() {
    let home = Home::new();
    let out = bin()
        .args(["identity", "--json", "--token-file"])
        .arg(home.path("token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identity: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pem = identity["public_key_pem"].as_str().unwrap();
    // Only a public key: no private key, no token, no seed in what a verifier is given.
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert_eq!(
        pem,
        std::fs::read_to_string(home.path("worker.pub")).unwrap()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("PRIVATE") && !text.contains(TEST_TOKEN),
        "{text}"
    );
    // The served key is the same, and needs no token.
    let server = home.start(&[]);
    let served = server.call("GET", "/v1/identity", None, None);
    assert_eq!(served.status, 200);
    assert_eq!(served.json["public_key_pem"].as_str().unwrap(), pem);
    assert_eq!(served.json["key_id"], identity["key_id"]);
    // With that key alone (no token anywhere), an attestation verifies; signing is not reachable from
    // any public type (the `compile_fail` doc tests of the core crate pin that).
    assert_eq!(server.commit("a.bin", "v").status, 201);
    let nonce = "99".repeat(16);
    let att = server.post("/v1/shards/v/attest", &json!({ "nonce": nonce }));
    std::fs::write(home.path("att.json"), &att.text).unwrap();
    assert!(attest_verify(&home, "att.json", &nonce).0);
}

#[test]
fn no_command_takes_a_token_on_its_command_line() {
    for command in [
        &["serve"][..],
        &["seal"],
        &["identity"],
        &["audit", "verify"],
        &["attest", "verify"],
    ] {
        let out = bin().args(command).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{command:?}");
        assert!(!help.contains("--token "), "{command:?}: {help}");
        assert!(!help.contains("--api-token "), "{command:?}: {help}");
    }
    let out = bin()
        .args(["identity", "--token", TEST_TOKEN])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(TEST_TOKEN),
        "the refusal must not echo the token: {stderr}"
    );
}
