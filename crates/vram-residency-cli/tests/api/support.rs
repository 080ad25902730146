//! Shared helpers for the integration tests.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vram_residency::{
    ManagerConfig, MemoryAuditSink, SimBackend, SimConfig, VramManager, WorkerToken,
};

/// The token used by the tests (32+ bytes, no whitespace).
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef0123456789";

pub fn token() -> WorkerToken {
    WorkerToken::from_bytes(TEST_TOKEN.as_bytes().to_vec()).unwrap()
}

/// Writes a secret file (a worker token, API tokens) readable and writable by its owner only (0600),
/// as `serve` and the token readers require; `std::fs::write` would create it 0644 (with umask 022).
pub fn write_secret(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
    let path = path.as_ref();
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(contents.as_ref()).unwrap();
    // An existing file keeps its mode on open: set it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The known-answer pattern: byte i = (i * 0x9E3779B97F4A7C15 mod 2^64) >> 56.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

/// Fast deterministic pseudo-random bytes (splitmix64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    // Model files claim their format by their first bytes (`format` module docs): keep random test
    // data from claiming one by chance (1 in 256 would have `{` at byte 8), so it seals as raw.
    if out.get(8) == Some(&b'{') {
        out[8] = b'}';
    }
    if out.len() >= 4 && out[..4].iter().zip(b"GGUF").filter(|(a, b)| a == b).count() >= 3 {
        out[0] = 0;
        out[1] = 0;
    }
    out
}

pub struct SimWorker {
    pub sim: SimBackend,
    pub manager: VramManager,
    pub audit: Arc<MemoryAuditSink>,
}

pub fn sim_worker(devices: u32, bytes_per_device: u64, config: ManagerConfig) -> SimWorker {
    let sim = SimBackend::new(SimConfig {
        devices,
        bytes_per_device,
    });
    let audit = Arc::new(MemoryAuditSink::default());
    let manager =
        VramManager::with_config(&token(), Arc::new(sim.clone()), config, audit.clone()).unwrap();
    SimWorker {
        sim,
        manager,
        audit,
    }
}

pub fn small_worker() -> SimWorker {
    sim_worker(2, 64 << 20, ManagerConfig::default())
}

/// A path in the repository, given relative to the repository root (`"docs/seal-record.md"`).
///
/// The root is `$VRAM_RESIDENCY_REPO` when set (test binaries copied to another machine, see
/// `scripts/gpu-test`), else the checkout these tests were compiled from.
pub fn repo_path(rel: &str) -> PathBuf {
    let root = std::env::var_os("VRAM_RESIDENCY_REPO").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        PathBuf::from,
    );
    root.join(rel)
}

/// The CLI binary under test: `$VRAM_RESIDENCY_BIN` when set, else the one cargo built.
pub fn bin() -> Command {
    Command::new(bin_path())
}

/// The path of the CLI binary under test (see [`bin`]).
pub fn bin_path() -> PathBuf {
    std::env::var_os("VRAM_RESIDENCY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vram-residency").into())
        .into()
}

/// Whether these tests run as root (effective uid 0), as CI and the GPU host do: `serve` then refuses
/// to start unless it is given `--allow-root`.
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// What every test that starts `serve` adds to its command line: `--allow-root` when the tests run
/// as root, nothing otherwise (only the tests of the root check itself leave it out).
pub fn allow_root() -> &'static [&'static str] {
    if running_as_root() {
        &["--allow-root"]
    } else {
        &[]
    }
}

/// A file of this crate's `tests/data/`.
pub fn data_file(name: &str) -> PathBuf {
    repo_path("crates/vram-residency-cli/tests/data").join(name)
}

/// Reports that `test` could not run here and why, as the line `skipped: {reason}: {test}` on the
/// process's stderr; the caller then returns. `scripts/test` and `scripts/gpu-test` count these lines
/// as skipped, not passed. Written straight to the stderr handle, which libtest does not capture
/// (`eprintln!` it does), in one write that starts with a newline: with `--test-threads=1` or `-q`
/// libtest's own `test NAME ... ` / `.` is still on the line.
pub fn skip(test: &str, reason: &str) {
    let line = format!("\nskipped: {reason}: {test}\n");
    // Best effort: a test that cannot report its skip has nothing better to do than return.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Lines of a data file without comments and blank lines, split on whitespace.
pub fn data_rows(name: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(data_file(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Whether the stock `fsverity` tool is installed. Missing is a failure (CI installs it), unless
/// VRAM_RESIDENCY_SKIP_ORACLE=1, which reports the calling test as skipped (see [`skip`]).
pub fn fsverity_oracle() -> bool {
    let present = Command::new("fsverity")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return true;
    }
    if std::env::var("VRAM_RESIDENCY_SKIP_ORACLE").as_deref() == Ok("1") {
        // libtest names each test's thread after the test.
        let test = std::thread::current()
            .name()
            .unwrap_or("fsverity oracle")
            .to_owned();
        skip(&test, "fsverity (fsverity-utils) not installed");
        return false;
    }
    panic!(
        "the stock fsverity tool is required as a test oracle: apt-get install -y fsverity \
         (or set VRAM_RESIDENCY_SKIP_ORACLE=1 to skip these tests explicitly)"
    );
}

/// `fsverity digest FILE` → the `sha256:...` field.
pub fn fsverity_digest(path: &Path) -> String {
    let out = Command::new("fsverity")
        .arg("digest")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fsverity digest failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Free bytes of a simulated device, as the backend itself reports them.
pub fn sim_free(sim: &SimBackend, gpu: usize) -> u64 {
    use vram_residency::Backend as _;
    sim.devices().unwrap()[gpu].free_bytes
}

/// Serialises the tests that use a real GPU (in this process or through a CLI child process), so
/// each sees the device to itself and free-VRAM checks are not disturbed by another test.
pub fn gpu_serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// True when `tool` runs here (`tool version` exits 0): for oracles such as `openssl`.
pub fn have_tool(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("version")
        .output()
        .is_ok_and(|out| out.status.success())
}
