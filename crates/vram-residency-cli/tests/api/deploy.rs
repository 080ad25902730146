//! Deployment (security spec §8, issue 11 item 8): `serve` refuses to run as root unless told to
//! (`--allow-root`), and the recipes in `deploy/` — the hardened systemd unit with its sysusers and
//! tmpfiles files, and the container recipe — are checked against the binary they start and, where
//! the tools are installed, by systemd itself (`systemd-analyze verify`, `systemd-sysusers` and
//! `systemd-tmpfiles` in a scratch root). Building the container image is too heavy for a test: its
//! dry run is documented in deploy/README.md, and its command line is checked here.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::serve::{Home, audit_records};
use crate::support::{bin, bin_path, repo_path, running_as_root, skip, write_secret};

const UNIT: &str = "deploy/systemd/vram-residency.service";
const SYSUSERS: &str = "deploy/systemd/vram-residency.sysusers";
const TMPFILES: &str = "deploy/systemd/vram-residency.tmpfiles";
const CONTAINERFILE: &str = "deploy/container/Containerfile";

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

// ---------------------------------------------------------------------------------------------
// Reading the recipes

/// Lines with `\` continuations joined (the continuation replaced by a space) and comment lines
/// (`#`, and `;` for units) dropped, also inside a continuation, as systemd and Docker do.
fn logical_lines(text: &str, comment: &[char]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with(comment) || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        lines.push(std::mem::take(&mut pending).trim().to_owned());
    }
    assert!(pending.is_empty(), "a continuation runs off the end");
    lines
}

/// A unit file's settings by section, then key: every value of a key, in order (keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    for line in logical_lines(text, &['#', ';']) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!section.is_empty(), "{key} before any section");
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn service() -> BTreeMap<String, Vec<String>> {
    parse_unit(&read(UNIT)).remove("Service").unwrap()
}

/// The one value of `key` (a key set twice is a mistake in this unit, except the list-valued ones
/// that the tests read with `all`).
fn one<'a>(service: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match service.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{UNIT}: {key}= must be set exactly once, found {other:?}"),
    }
}

/// The arguments `ExecStart=` passes to the binary: (binary, arguments).
fn unit_command() -> (String, Vec<String>) {
    let exec = one(&service(), "ExecStart").to_owned();
    assert!(
        !exec.contains(['"', '\'']),
        "the test splits ExecStart on whitespace: {exec}"
    );
    let mut words = exec.split_whitespace().map(str::to_owned);
    let binary = words.next().unwrap();
    (binary, words.collect())
}

/// Containerfile instructions (keyword in upper case, the rest) in order.
fn containerfile() -> Vec<(String, String)> {
    logical_lines(&read(CONTAINERFILE), &['#'])
        .into_iter()
        .map(|line| {
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap();
            (keyword.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// The container's command line: ENTRYPOINT then CMD of the last stage, both in exec (JSON) form.
fn container_command() -> Vec<String> {
    let instructions = containerfile();
    let exec_form = |keyword: &str| -> Vec<String> {
        let lines: Vec<&String> = instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, rest)| rest)
            .collect();
        assert_eq!(lines.len(), 1, "{CONTAINERFILE}: one {keyword}");
        serde_json::from_str(lines[0]).unwrap_or_else(|e| {
            panic!("{CONTAINERFILE}: {keyword} must be in exec (JSON) form: {e}")
        })
    };
    let mut command = exec_form("ENTRYPOINT");
    command.extend(exec_form("CMD"));
    command
}

/// The value after `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} without a value"))
}

/// The arguments after `serve` (which must come first).
fn serve_args(command: &[String]) -> Vec<String> {
    assert_eq!(
        command.get(1).map(String::as_str),
        Some("serve"),
        "{command:?}"
    );
    command[2..].to_vec()
}

// ---------------------------------------------------------------------------------------------
// The systemd unit

#[test]
fn the_systemd_unit_runs_serve_as_a_dedicated_user_with_the_hardening_of_8_1_and_8_2() {
    let service = service();
    let (binary, args) = unit_command();
    assert_eq!(binary, "/usr/local/bin/vram-residency");
    let args = serve_args(&[binary].into_iter().chain(args).collect::<Vec<_>>());

    // §8.1: a dedicated user, never root, no way to gain privileges, no capabilities.
    let user = one(&service, "User");
    assert!(!["root", "0", ""].contains(&user), "User={user}");
    assert!(
        !service.contains_key("DynamicUser"),
        "see the unit's comment"
    );
    assert!(read(SYSUSERS).contains(&format!("u {user} ")), "{SYSUSERS}");
    assert!(!args.iter().any(|a| a == "--allow-root"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictNamespaces", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("DevicePolicy", "closed"),
        ("UMask", "0077"),
        ("LimitCORE", "0"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(&service, key), value, "{UNIT}: {key}=");
    }
    let families: BTreeSet<&str> = one(&service, "RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(
        families,
        BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
        "{UNIT}: RestrictAddressFamilies="
    );
    // Left off on purpose, each with its reason in a comment: PrivateDevices (it hides
    // /dev/nvidia*), ProcSubset=pid (the driver version comes from /proc/driver/nvidia).
    assert!(!service.contains_key("PrivateDevices"));
    assert!(!service.contains_key("ProcSubset"));

    // Devices: the NVIDIA nodes only.
    let devices: Vec<&str> = service["DeviceAllow"].iter().map(String::as_str).collect();
    for device in ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia rw"] {
        assert!(
            devices.contains(&device),
            "DeviceAllow={device}: {devices:?}"
        );
    }
    assert!(devices.iter().all(|d| d.contains("nvidia")), "{devices:?}");

    // §8.2: models read-only, the audit log's directory the only writable path.
    let models = flag_value(&args, "--models-dir");
    assert_eq!(one(&service, "ReadOnlyPaths"), models);
    let audit_log = Path::new(flag_value(&args, "--audit-log"));
    let logs = one(&service, "LogsDirectory");
    assert_eq!(
        audit_log.parent(),
        Some(Path::new("/var/log").join(logs).as_path())
    );
    assert_eq!(one(&service, "LogsDirectoryMode"), "0700");
    assert!(!service.contains_key("ReadWritePaths"));
    assert!(!service.contains_key("StateDirectory"));

    // Secrets: files only (never argv, never Environment=), each 0600 and owned by the user, in a
    // directory of their own that only root may change (the tmpfiles file sets the modes).
    assert!(!args.iter().any(|a| a == "--token"));
    for environment in service.get("Environment").into_iter().flatten() {
        assert!(!environment.contains("TOKEN"), "Environment={environment}");
    }
    let tmpfiles: Vec<Vec<String>> = logical_lines(&read(TMPFILES), &['#'])
        .iter()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let entry = |path: &str| -> Vec<String> {
        tmpfiles
            .iter()
            .find(|fields| fields.get(1).map(String::as_str) == Some(path))
            .unwrap_or_else(|| panic!("{TMPFILES}: no line for {path}"))[..5]
            .to_vec()
    };
    let mut secret_dirs = BTreeSet::new();
    for flag in ["--token-file", "--operator-tokens", "--observer-tokens"] {
        let file = flag_value(&args, flag);
        assert_eq!(entry(file), ["z", file, "0600", user, user], "{flag}");
        secret_dirs.insert(
            Path::new(file)
                .parent()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(secret_dirs.len(), 1, "{secret_dirs:?}");
    let secret_dir = secret_dirs.pop_first().unwrap();
    assert_eq!(entry(&secret_dir), ["d", &secret_dir, "0750", "root", user]);
    assert_eq!(entry(models)[..3], ["d", models, "0750"]);
    assert_eq!(
        entry(models)[3],
        "root",
        "the service must not own its models"
    );
}

/// `serve --help`'s flags.
fn serve_help_flags() -> BTreeSet<String> {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect()
}

#[test]
fn every_flag_the_unit_and_the_container_give_serve_is_a_real_flag_of_the_binary() {
    let help = serve_help_flags();
    assert!(
        help.contains("--models-dir") && help.contains("--allow-root"),
        "{help:?}"
    );
    let (binary, args) = unit_command();
    let container = container_command();
    assert_eq!(container[0], "/usr/local/bin/vram-residency");
    for (recipe, args) in [
        (
            UNIT,
            serve_args(&[binary].into_iter().chain(args).collect::<Vec<_>>()),
        ),
        (CONTAINERFILE, serve_args(&container)),
    ] {
        let flags: Vec<&String> = args.iter().filter(|a| a.starts_with("--")).collect();
        assert!(flags.len() >= 6, "{recipe}: {args:?}");
        for flag in flags {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(name),
                "{recipe}: {name} is not a flag of serve"
            );
        }
        // And the binary parses the whole command line, values included (help stops it there).
        let out = bin()
            .arg("serve")
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `systemd-analyze verify` on a copy of `unit` whose ExecStart runs the built binary (verify
/// requires the program to exist). Returns its output.
fn analyze_verify(dir: &Path, unit: &str) -> Output {
    let path = dir.join("vram-residency.service");
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/vram-residency ",
        &format!("ExecStart={} ", bin_path().display()),
    );
    std::fs::write(&path, unit).unwrap();
    Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_a_word() {
    let test = "systemd_analyze_verify_accepts_the_unit_without_a_word";
    if !tool("systemd-analyze") {
        skip(test, "systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = read(UNIT);
    assert!(unit.contains("ExecStart=/usr/local/bin/vram-residency "));
    let out = analyze_verify(dir.path(), &unit);
    // verify exits 0 on an unknown key or a value it cannot parse (it only warns and ignores the
    // setting), so any output at all is a failure.
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).is_empty(), "{}", text(&out));

    // The check can fail: a misspelt key and a bad value are reported.
    let broken = unit
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
        .replace("DevicePolicy=closed", "DevicePolicy=bogus");
    let out = analyze_verify(dir.path(), &broken);
    let said = text(&out);
    assert!(
        said.contains("ProtectSytem") && said.contains("bogus"),
        "{said}"
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_exposure_low() {
    let test = "systemd_analyze_security_rates_the_unit_exposure_low";
    if !tool("systemd-analyze") {
        skip(test, "systemd-analyze not installed");
        return;
    }
    let help = Command::new("systemd-analyze")
        .args(["security", "--help"])
        .output()
        .unwrap();
    if !text(&help).contains("--offline") {
        skip(
            test,
            "this systemd-analyze has no `security --offline` (systemd < 250)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vram-residency.service");
    std::fs::write(&path, read(UNIT)).unwrap();
    // The scale runs from 0 (everything locked) to 10 (nothing); an unhardened service scores 9.6.
    // --threshold counts in tenths: 30 = 3.0.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "exposure above 3.0: {said}");
    let level: f64 = said
        .split("Overall exposure level for vram-residency.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {said}"));
    assert!(level <= 3.0, "{level}: {said}");
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_give_the_token_files_modes_serve_accepts_8_2() {
    let test =
        "sysusers_and_tmpfiles_create_the_user_and_give_the_token_files_modes_serve_accepts_8_2";
    if !tool("systemd-sysusers") || !tool("systemd-tmpfiles") {
        skip(test, "systemd-sysusers or systemd-tmpfiles not installed");
        return;
    }
    if !running_as_root() {
        skip(test, "not root (systemd-tmpfiles must chown)");
        return;
    }
    // A scratch root: the real /etc is not touched.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc/vram-residency")).unwrap();
    // Token files as an operator might leave them: world-readable.
    for name in ["token", "operator.tokens", "observer.tokens"] {
        let path = root.path().join("etc/vram-residency").join(name);
        write_secret(&path, format!("{}\n", crate::support::TEST_TOKEN));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let run = |command: &mut Command| {
        let out = command.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo_path(SYSUSERS)));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("vram-residency:"))
        .unwrap_or_else(|| panic!("{passwd}"))
        .split(':')
        .collect();
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = user[3].parse().unwrap();
    assert!(uid != 0 && uid < 1000, "a system user: {user:?}");
    assert_eq!(user[6], "/usr/sbin/nologin");

    run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo_path(TMPFILES)));
    let mode = |rel: &str| {
        let meta = std::fs::metadata(root.path().join(rel)).unwrap();
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    };
    assert_eq!(mode("etc/vram-residency"), (0o750, 0, gid));
    for name in ["token", "operator.tokens", "observer.tokens"] {
        assert_eq!(
            mode(&format!("etc/vram-residency/{name}")),
            (0o600, uid, gid),
            "{name}"
        );
    }
    assert_eq!(mode("srv/vram-residency/models"), (0o750, 0, gid));
    // The secret-file check of serve accepts the token file as tmpfiles left it.
    let out = bin()
        .arg("identity")
        .arg("--token-file")
        .arg(root.path().join("etc/vram-residency/token"))
        .env_remove("VRAM_RESIDENCY_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// The container recipe

#[test]
fn the_container_recipe_builds_locked_and_runs_serve_as_a_non_root_user_with_no_secret_inside_8_3()
{
    let instructions = containerfile();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = instructions.split_at(stages[1]);
    assert!(
        build[stages[0]].1.ends_with(" AS build"),
        "{:?}",
        build[stages[0]]
    );
    assert!(
        build
            .iter()
            .any(|(k, rest)| k == "RUN" && rest.contains("cargo build --release --locked")),
        "the build uses the committed Cargo.lock"
    );
    // The runtime stage: the binary from the build stage, and a non-root user.
    assert!(runtime.iter().any(|(k, rest)| k == "COPY"
        && rest.starts_with("--from=build ")
        && rest.ends_with(" /usr/local/bin/vram-residency")));
    let users: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "USER")
        .map(|(_, rest)| rest)
        .collect();
    assert_eq!(users.len(), 1, "{users:?}");
    let uid = users[0].split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|uid| uid != 0), "USER {uid}");
    assert!(
        runtime
            .iter()
            .any(|(k, rest)| k == "RUN" && rest.contains(&format!("--uid {uid} "))),
        "the user is created in the image"
    );

    // No secret baked in: no token in ENV/ARG/LABEL, nothing but the binary copied into the runtime
    // stage, the tokens read from mounted files.
    for (keyword, rest) in &instructions {
        if ["ENV", "ARG", "LABEL"].contains(&keyword.as_str()) {
            assert!(
                !rest.to_ascii_uppercase().contains("TOKEN"),
                "{keyword} {rest}"
            );
        }
    }
    let copies = runtime
        .iter()
        .filter(|(k, _)| k == "COPY" || k == "ADD")
        .count();
    assert_eq!(copies, 1);
    let args = serve_args(&container_command());
    assert!(!args.iter().any(|a| a == "--allow-root" || a == "--token"));
    for flag in ["--token-file", "--operator-tokens", "--observer-tokens"] {
        assert!(
            flag_value(&args, flag).starts_with("/run/secrets/"),
            "{flag}"
        );
    }
    assert_eq!(flag_value(&args, "--models-dir"), "/models");
    assert_eq!(flag_value(&args, "--backend"), "cuda");
    // The audit log lives on the declared volume, the only writable path.
    let audit_log = Path::new(flag_value(&args, "--audit-log"));
    let volume = runtime
        .iter()
        .find(|(k, _)| k == "VOLUME")
        .map(|(_, rest)| serde_json::from_str::<Vec<String>>(rest).unwrap())
        .unwrap();
    assert_eq!(volume, [audit_log.parent().unwrap().to_str().unwrap()]);

    // The build context leaves out build outputs and git's objects.
    let ignore = read(".dockerignore");
    for path in ["target", ".git", "gpu-bundle"] {
        assert!(
            ignore.lines().any(|l| l.trim() == path),
            ".dockerignore: {path}"
        );
    }
}
