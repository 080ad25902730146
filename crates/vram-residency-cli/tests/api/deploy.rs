//! Deployment (security spec §8, issue 11 item 8): `serve` refuses to run as root unless told to
//! (`--allow-root`).

use serde_json::Value;

use crate::serve::{Home, audit_records};
use crate::support::{bin, running_as_root, skip};

// ---------------------------------------------------------------------------------------------
// serve and root

#[test]
fn serve_as_root_is_refused_without_allow_root_before_anything_is_read_or_bound_8_1() {
    let home = Home::new();
    if !running_as_root() {
        skip(
            "serve_as_root_is_refused_without_allow_root_before_anything_is_read_or_bound_8_1",
            "not root",
        );
        // What can be checked instead: not root, serve needs no flag to start.
        let server = home
            .launch_without_allow_root(&[])
            .expect("not root, serve starts without --allow-root");
        assert!(!server.stderr().contains("WARNING: running as root"));
        return;
    }
    let refused = home
        .launch_without_allow_root(&[])
        .err()
        .expect("as root without --allow-root, serve must refuse to start");
    assert!(!refused.status.success(), "{refused:?}");
    assert!(refused.stderr.contains("--allow-root"), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("refusing to run as root (effective uid 0)"),
        "{refused:?}"
    );
    // Nothing opened: the audit log (opened after the token, the models directory and the backend,
    // before the listener) was never created, and no listening line was printed (Refused).
    assert!(!home.path("audit.log").exists(), "{refused:?}");
    assert!(!refused.stderr.contains("backend sim"), "{refused:?}");

    // Nothing read either: the check comes before the token file and the models directory, which
    // do not exist here.
    let out = bin()
        .args(["serve", "--backend", "sim"])
        .args(["--models-dir", "/nonexistent/models"])
        .args(["--token-file", "/nonexistent/token"])
        .arg("--audit-log")
        .arg(home.path("audit-2.log"))
        .env_remove("VRAM_RESIDENCY_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it must not start listening");
    assert!(stderr.contains("--allow-root"), "{stderr}");
    assert!(!stderr.contains("/nonexistent"), "{stderr}");
    assert!(!home.path("audit-2.log").exists());
}

#[test]
fn serve_with_allow_root_starts_and_as_root_warns_on_stderr_and_in_the_audit_log_8_1() {
    let home = Home::new();
    let server = home.start(&["--allow-root"]);
    assert_eq!(server.get("/healthz").status, 200);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let records = audit_records(&home, "service_runs_as_root");
    if running_as_root() {
        assert!(
            stderr.contains("WARNING: running as root (effective uid 0) because --allow-root"),
            "{stderr}"
        );
        assert_eq!(records.len(), 1, "{}", home.audit_log());
        assert_eq!(records[0]["severity"], "warning");
        assert!(
            records[0]["note"]
                .as_str()
                .unwrap()
                .contains("--allow-root"),
            "{records:?}"
        );
        // Recorded right after service_started, in the signed chain.
        let events: Vec<String> = home
            .audit_log()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["entry"]["event"].to_string())
            .collect();
        let started = events
            .iter()
            .position(|e| e == "\"service_started\"")
            .unwrap();
        assert_eq!(events[started + 1], "\"service_runs_as_root\"");
    } else {
        // Not root: the flag allows something that does not happen; nothing to warn about.
        assert!(!stderr.contains("running as root"), "{stderr}");
        assert!(records.is_empty(), "{records:?}");
    }
    let verify = home.audit_verify();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
