//! The worker service, tested as a client would: the built binary is started with
//! `serve --backend sim --listen 127.0.0.1:0`, its address read from stdout, and driven over loopback.
//! Every server is killed when its guard drops; every wait is bounded.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TEST_TOKEN, bin, random_bytes, repo_path, write_secret};

/// Longest any single wait in these tests may take.
const BOUND: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// API tokens of the test homes: two operator tokens (a rotation in progress) and one observer token.
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef0123456789";
const OPERATOR_TOKEN_ROTATED: &str = "operator-token-rotated-0123456789abcdef01";
pub const OBSERVER_TOKEN: &str = "observer-token-0123456789abcdef0123456789";

/// Every route that needs a token, with a body where it takes one.
const TOKEN_ROUTES: [(&str, &str, Option<&str>); 8] = [
    ("GET", "/v1/shards", None),
    ("POST", "/v1/shards", Some(r#"{"model":"a.bin","gpu":0}"#)),
    ("GET", "/v1/shards/x", None),
    ("DELETE", "/v1/shards/x", None),
    ("POST", "/v1/shards/x/verify", None),
    ("POST", "/v1/shards/x/attest", Some(r#"{"nonce":"00"}"#)),
    ("GET", "/v1/worker", None),
    ("GET", "/metrics", None),
];

/// A temporary worker home: models, worker token, API token files (all 0600), audit log, the
/// server's stderr.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(models.join("sub")).unwrap();
        std::fs::create_dir_all(models.join("subdir")).unwrap();
        write_secret(dir.path().join("token"), format!("{TEST_TOKEN}\n"));
        // What verifiers hold: the worker's public key (as `vram-residency identity` prints it).
        std::fs::write(
            dir.path().join("worker.pub"),
            crate::support::token().public_key().to_pem(),
        )
        .unwrap();
        write_secret(
            dir.path().join("operator-tokens"),
            format!(
                "# operators; the second is the rotated one\n{OPERATOR_TOKEN}\n\n{OPERATOR_TOKEN_ROTATED}\n"
            ),
        );
        write_secret(
            dir.path().join("observer-tokens"),
            format!("{OBSERVER_TOKEN}\n"),
        );
        std::fs::write(models.join("a.bin"), random_bytes(MIB, 1)).unwrap();
        std::fs::write(models.join("sub/b.bin"), random_bytes(MIB, 2)).unwrap();
        std::fs::write(models.join("empty.bin"), b"").unwrap();
        std::fs::write(dir.path().join("secret.bin"), b"outside the models dir").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.bin"), models.join("escape.bin"))
            .unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn model(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path("models").join(name), bytes).unwrap();
    }

    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.path("audit.log")).unwrap_or_default()
    }

    /// Writes `other.pub`: the public key of another worker (another token), which must verify
    /// nothing this worker signed.
    pub fn write_other_public_key(&self) {
        let other = vram_residency::WorkerToken::from_bytes(
            b"another-token-0123456789abcdef012345".to_vec(),
        )
        .unwrap()
        .public_key();
        std::fs::write(self.path("other.pub"), other.to_pem()).unwrap();
    }

    /// `vram-residency audit verify` on this home's log, with the worker's public key only.
    pub fn audit_verify(&self) -> Output {
        self.audit_verify_with(&self.path("worker.pub"), &[])
    }

    /// `vram-residency audit verify` on this home's log with `public_key` and `extra` arguments.
    pub fn audit_verify_with(&self, public_key: &Path, extra: &[&str]) -> Output {
        bin()
            .args(["audit", "verify"])
            .arg(self.path("audit.log"))
            .arg("--public-key")
            .arg(public_key)
            .args(extra)
            .env_remove("VRAM_RESIDENCY_TOKEN")
            .output()
            .unwrap()
    }

    /// Starts `serve` in this home, with sweeps off unless `extra` says otherwise.
    pub fn start(&self, extra: &[&str]) -> Server {
        self.try_start(extra, &[]).unwrap()
    }

    /// Starts `serve` with this home's operator and observer token files (unless `extra` names
    /// token files itself); `Err` when it exits before printing its address.
    pub fn try_start(&self, extra: &[&str], env: &[(&str, &str)]) -> Result<Server, Refused> {
        self.launch(extra, env, true)
    }

    /// Starts `serve`; with `api_tokens` false, without any API token file of this home. Run as
    /// root, it passes `--allow-root` (see [`Home::launch_without_allow_root`]).
    pub fn launch(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
        api_tokens: bool,
    ) -> Result<Server, Refused> {
        self.spawn(extra, env, api_tokens, true)
    }

    /// Starts `serve` exactly as [`Home::start`] does, but never with `--allow-root`, so that run as
    /// root it must refuse to start.
    pub fn launch_without_allow_root(&self, extra: &[&str]) -> Result<Server, Refused> {
        self.spawn(extra, &[], true, false)
    }

    fn spawn(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
        api_tokens: bool,
        allow_root: bool,
    ) -> Result<Server, Refused> {
        let stderr_path = self.path(&format!("stderr-{}.log", unique()));
        let mut command = bin();
        command
            .arg("serve")
            .args(["--backend", "sim"])
            .env_remove("VRAM_RESIDENCY_OPERATOR_TOKENS")
            .env_remove("VRAM_RESIDENCY_OBSERVER_TOKENS");
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let names_token_files = extra
            .iter()
            .any(|a| *a == "--operator-tokens" || *a == "--observer-tokens");
        if api_tokens && !names_token_files {
            command
                .arg("--operator-tokens")
                .arg(self.path("operator-tokens"))
                .arg("--observer-tokens")
                .arg(self.path("observer-tokens"));
        }
        command
            .arg("--models-dir")
            .arg(self.path("models"))
            .arg("--audit-log")
            .arg(self.path("audit.log"))
            .args(["--sweep-interval", "0"]);
        if !extra.contains(&"--sim-vram") {
            command.args(["--sim-vram", "64MiB"]);
        }
        if allow_root && !extra.contains(&"--allow-root") {
            command.args(crate::support::allow_root());
        }
        if !env.iter().any(|(k, _)| *k == "VRAM_RESIDENCY_TOKEN") {
            command.arg("--token-file").arg(self.path("token"));
        }
        command
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(BOUND).ok().flatten();
        let mut guard = Server {
            child,
            base: String::new(),
            stderr_path,
            agent: agent(),
        };
        match line.and_then(|l| l.strip_prefix("listening on ").map(str::to_owned)) {
            Some(base) => {
                guard.base = base;
                Ok(guard)
            }
            None => {
                // Exited (or hung) before listening: make sure it is gone, then report its stderr.
                let _ = guard.child.kill();
                let status = guard.child.wait().unwrap();
                Err(Refused {
                    status,
                    stderr: guard.stderr(),
                })
            }
        }
    }
}

/// A server that exited (or hung, then was killed) before listening.
#[derive(Debug)]
pub struct Refused {
    pub status: ExitStatus,
    pub stderr: String,
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(BOUND))
        .build()
        .into()
}

/// An HTTPS client that trusts exactly the certificate(s) in `ca_pem` (rustls, ring provider).
fn tls_agent(ca_pem: &[u8]) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots = vec![Certificate::from_pem(ca_pem).unwrap().to_owned()];
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(BOUND))
        .tls_config(
            TlsConfig::builder()
                .provider(TlsProvider::Rustls)
                .root_certs(RootCerts::Specific(Arc::new(roots)))
                .unversioned_rustls_crypto_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .build(),
        )
        .build()
        .into()
}

/// A running server; killed (SIGKILL) when dropped unless it already exited.
pub struct Server {
    child: Child,
    pub base: String,
    stderr_path: PathBuf,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, body as JSON (Null when not JSON), raw text, headers and the media type of
/// `Content-Type` (without parameters; empty when there is none).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub text: String,
    pub headers: String,
    pub media_type: String,
}

impl Server {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `HOST:PORT` to connect to: the listening address, with an unspecified one (`0.0.0.0`)
    /// replaced by loopback, where these tests send their traffic.
    pub fn address(&self) -> String {
        let address = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, rest)| rest);
        match address.strip_prefix("0.0.0.0:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => address.to_owned(),
        }
    }

    /// From now on, calls go to `address()` over HTTPS and trust exactly the certificate(s) in
    /// `ca_pem` (rustls with the ring provider, as the server).
    pub fn trusting(mut self, ca_pem: &[u8]) -> Self {
        self.agent = tls_agent(ca_pem);
        self.base = format!("https://{}", self.address());
        self
    }

    /// Sends a request with the given `Authorization` value (or none).
    pub fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> Reply {
        let url = format!("{}{path}", self.base);
        let auth = auth.unwrap_or("");
        // An empty Authorization value stands for "no header" only when `auth` was None.
        let response = match (method, body) {
            ("GET", _) => header(self.agent.get(&url), auth).call(),
            ("DELETE", _) => header(self.agent.delete(&url), auth).call(),
            ("POST", Some(body)) => header(self.agent.post(&url), auth)
                .content_type("application/json")
                .send(body),
            ("POST", None) => header(self.agent.post(&url), auth).send_empty(),
            other => panic!("unsupported {other:?}"),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let headers = format!("{:?}", response.headers());
        let media_type = response
            .headers()
            .get("content-type")
            .map(|v| {
                v.to_str()
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        let text = response.body_mut().read_to_string().unwrap();
        Reply {
            status: response.status().as_u16(),
            json: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
            headers,
            media_type,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, Some(&bearer()), None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(&bearer()), Some(&body.to_string()))
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.call("DELETE", path, Some(&bearer()), None)
    }

    pub fn commit(&self, model: &str, shard_id: &str) -> Reply {
        self.post(
            "/v1/shards",
            &json!({"model": model, "gpu": 0, "shard_id": shard_id}),
        )
    }

    pub fn used_bytes(&self) -> u64 {
        let worker = self.get("/v1/worker");
        assert_eq!(worker.status, 200, "{}", worker.text);
        worker.json["devices"][0]["used_bytes"].as_u64().unwrap()
    }

    pub fn shard_ids(&self) -> Vec<String> {
        let list = self.get("/v1/shards");
        assert_eq!(list.status, 200, "{}", list.text);
        list.json["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["shard_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = wait_bounded(&mut self.child);
        (exit, self.stderr())
    }
}

fn header<B>(request: ureq::RequestBuilder<B>, auth: &str) -> ureq::RequestBuilder<B> {
    if auth.is_empty() {
        request
    } else {
        request.header("Authorization", auth)
    }
}

fn wait_bounded(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Authorization` value with the (first) operator token.
pub fn bearer() -> String {
    format!("Bearer {OPERATOR_TOKEN}")
}

fn error_code(reply: &Reply) -> &str {
    reply.json["error"]["code"].as_str().unwrap_or("<none>")
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(error_code(reply), code, "{}", reply.text);
    assert!(
        !reply.json["error"]["message"].as_str().unwrap().is_empty(),
        "{}",
        reply.text
    );
}

/// Nothing resident, nothing admitted, no allocation in the audit log.
fn assert_nothing_changed(server: &Server, home: &Home) {
    assert!(server.shard_ids().is_empty());
    assert_eq!(server.used_bytes(), 0);
    assert!(!home.audit_log().contains("\"vram_allocated\""));
}

#[test]
fn serve_api_token_is_required_on_v1_and_metrics_but_not_healthz_unknown_tokens_get_401_ci_006() {
    let home = Home::new();
    let server = home.start(&[]);
    let health = server.call("GET", "/healthz", None, None);
    assert_eq!(health.status, 200);
    assert_eq!(health.json["status"], "running");

    let near_miss = {
        let mut t = OPERATOR_TOKEN.to_owned();
        t.pop();
        t.push('X');
        t
    };
    let wrong = [
        None,
        Some("Bearer".to_owned()),
        Some("Bearer ".to_owned()),
        Some(format!("Bearer {near_miss}")),
        Some(format!("Bearer {OPERATOR_TOKEN}x")),
        Some(format!(
            "Bearer {}",
            &OPERATOR_TOKEN[..OPERATOR_TOKEN.len() - 1]
        )),
        Some(format!("Basic {OPERATOR_TOKEN}")),
        Some(OPERATOR_TOKEN.to_owned()),
        Some(format!("Bearer {}", "u".repeat(40))),
    ];
    for (method, path, body) in TOKEN_ROUTES {
        for auth in &wrong {
            let reply = server.call(method, path, auth.as_deref(), body);
            assert_error(&reply, 401, "unauthorized");
            assert!(
                reply.headers.to_lowercase().contains("www-authenticate"),
                "{}",
                reply.headers
            );
        }
        let ok = server.call(method, path, Some(&bearer()), body);
        assert_ne!(ok.status, 401, "{method} {path}: {}", ok.text);
        // The scheme is case-insensitive (RFC 7235).
        let lower = server.call(
            method,
            path,
            Some(&format!("bearer {OPERATOR_TOKEN}")),
            body,
        );
        assert_ne!(lower.status, 401, "{method} {path}");
    }
    // The two authorised commits above sealed a.bin; nothing unauthorised was.
    assert_eq!(server.shard_ids().len(), 2);
    // Wrong tokens are not the worker token: nothing for the audit log.
    assert!(!home.audit_log().contains("worker_token_refused"));
}

/// The audit records whose event is `name`, as JSON (`entry` of each line).
/// The `entry` of every record of this home's audit log whose event is `name`.
pub fn audit_records(home: &Home, name: &str) -> Vec<Value> {
    home.audit_log()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["entry"].clone())
        .filter(|entry| entry["event"] == name)
        .collect()
}

#[test]
fn serve_refuses_the_worker_token_as_a_credential_with_the_same_401_and_audits_it_critical_ci_006()
{
    let home = Home::new();
    let server = home.start(&[]);
    let unknown = server.call(
        "GET",
        "/v1/worker",
        Some(&format!("Bearer {}", "u".repeat(40))),
        None,
    );
    assert_error(&unknown, 401, "unauthorized");
    let worker_bearer = format!("Bearer {TEST_TOKEN}");
    for (method, path, body) in TOKEN_ROUTES {
        let reply = server.call(method, path, Some(&worker_bearer), body);
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text);
        assert_eq!(reply.text, unknown.text, "the same body as any wrong token");
    }
    // The query string stays out of the record; the token is recognised under any scheme, or none.
    let query = server.call("GET", "/v1/shards?secret=1", Some(&worker_bearer), None);
    assert_error(&query, 401, "unauthorized");
    let bare = server.call("GET", "/v1/worker", Some(TEST_TOKEN), None);
    assert_error(&bare, 401, "unauthorized");
    assert!(
        server.shard_ids().is_empty(),
        "the worker token sealed nothing"
    );
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");

    let refused = audit_records(&home, "worker_token_refused");
    assert_eq!(refused.len(), TOKEN_ROUTES.len() + 2, "{refused:?}");
    for ((method, path, _), record) in TOKEN_ROUTES.iter().zip(&refused) {
        assert_eq!(record["severity"], "critical", "{record}");
        assert_eq!(record["method"], *method, "{record}");
        assert_eq!(record["path"], *path, "{record}");
    }
    assert_eq!(refused[TOKEN_ROUTES.len()]["path"], "/v1/shards");
    assert_eq!(refused[TOKEN_ROUTES.len() + 1]["path"], "/v1/worker");
    let log = home.audit_log();
    assert!(!log.contains(TEST_TOKEN) && !log.contains("secret=1"));
    let verify = home.audit_verify();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && out.starts_with("OK"), "{out}");
}

#[test]
fn serve_observer_may_list_get_attest_and_scrape_but_gets_403_naming_operator_on_commit_evict_verify()
 {
    let home = Home::new();
    let server = home.start(&[]);
    assert_eq!(server.commit("a.bin", "m").status, 201);
    let observer = format!("Bearer {OBSERVER_TOKEN}");
    for (method, path, body) in [
        (
            "POST",
            "/v1/shards",
            Some(r#"{"model":"sub/b.bin","gpu":0,"shard_id":"o"}"#),
        ),
        ("DELETE", "/v1/shards/m", None),
        ("POST", "/v1/shards/m/verify", None),
    ] {
        let reply = server.call(method, path, Some(&observer), body);
        assert_error(&reply, 403, "forbidden");
        assert!(
            reply.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("operator"),
            "{}",
            reply.text
        );
    }
    let nonce = format!(r#"{{"nonce":"{}"}}"#, "5a".repeat(32));
    for (method, path, body) in [
        ("GET", "/v1/shards", None),
        ("GET", "/v1/shards/m", None),
        ("GET", "/v1/worker", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/shards/m/attest", Some(nonce.as_str())),
    ] {
        let reply = server.call(method, path, Some(&observer), body);
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text);
    }
    // Nothing the observer was refused happened.
    assert_eq!(server.shard_ids(), ["m"]);
    let log = home.audit_log();
    assert_eq!(log.matches("\"event\":\"vram_sealed\"").count(), 1);
    assert!(!log.contains("\"event\":\"vram_deallocated\""));
}

#[test]
fn serve_operator_may_call_every_route_with_either_token_of_a_rotation() {
    let home = Home::new();
    let server = home.start(&[]);
    for (i, token) in [OPERATOR_TOKEN, OPERATOR_TOKEN_ROTATED].iter().enumerate() {
        let auth = format!("Bearer {token}");
        let call = |method: &str, path: &str, body: Option<&str>| {
            server.call(method, path, Some(&auth), body)
        };
        let id = format!("r{i}");
        let commit = format!(r#"{{"model":"a.bin","gpu":0,"shard_id":"{id}"}}"#);
        let nonce = format!(r#"{{"nonce":"{}"}}"#, "5a".repeat(32));
        let shard = format!("/v1/shards/{id}");
        for (method, path, body, status) in [
            ("POST", "/v1/shards".to_owned(), Some(commit.as_str()), 201),
            ("GET", "/v1/shards".to_owned(), None, 200),
            ("GET", shard.clone(), None, 200),
            ("GET", "/v1/worker".to_owned(), None, 200),
            ("GET", "/metrics".to_owned(), None, 200),
            ("POST", format!("{shard}/verify"), None, 200),
            ("POST", format!("{shard}/attest"), Some(nonce.as_str()), 200),
            ("DELETE", shard.clone(), None, 200),
        ] {
            let reply = call(method, &path, body);
            assert_eq!(
                reply.status, status,
                "{token}: {method} {path}: {}",
                reply.text
            );
        }
    }
    assert!(server.shard_ids().is_empty());
}

#[test]
fn serve_refuses_to_start_when_a_token_file_is_readable_by_group_or_others_ci_006() {
    use std::os::unix::fs::PermissionsExt as _;
    let home = Home::new();
    for flag in ["--operator-tokens", "--observer-tokens"] {
        let file = home.path("tokens-0644");
        std::fs::write(&file, format!("{OPERATOR_TOKEN}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = home
            .try_start(&[flag, file.to_str().unwrap()], &[])
            .err()
            .expect("a 0644 token file must be refused");
        assert!(!refused.status.success(), "{refused:?}");
        assert!(refused.stderr.contains("chmod 600"), "{refused:?}");
        assert!(!refused.stderr.contains("worker token"), "{refused:?}");
        assert!(!refused.stderr.contains(OPERATOR_TOKEN), "{refused:?}");
    }
}

#[test]
fn serve_refuses_to_start_without_api_tokens_with_the_worker_token_as_one_or_one_in_both_roles() {
    let home = Home::new();
    let none = home
        .launch(&[], &[], false)
        .err()
        .expect("no API token: refused");
    assert!(!none.status.success());
    assert!(
        none.stderr.contains("no API token configured")
            && none.stderr.contains("--operator-tokens"),
        "{none:?}"
    );

    write_secret(home.path("empty"), "# nothing yet\n\n");
    let empty = home
        .try_start(
            &["--operator-tokens", home.path("empty").to_str().unwrap()],
            &[],
        )
        .err()
        .expect("comments only: refused");
    assert!(
        empty.stderr.contains("no API token configured"),
        "{empty:?}"
    );

    write_secret(
        home.path("with-worker"),
        format!("{OPERATOR_TOKEN}\n{TEST_TOKEN}\n"),
    );
    for flag in ["--operator-tokens", "--observer-tokens"] {
        let worker = home
            .try_start(&[flag, home.path("with-worker").to_str().unwrap()], &[])
            .err()
            .expect("the worker token as an API token: refused");
        assert!(!worker.status.success());
        assert!(
            worker
                .stderr
                .contains("an API token must not be the worker token"),
            "{worker:?}"
        );
        assert!(worker.stderr.contains("line 2"), "{worker:?}");
        assert!(!worker.stderr.contains(TEST_TOKEN), "{worker:?}");
    }

    write_secret(
        home.path("shared"),
        format!("{OPERATOR_TOKEN}\n{OBSERVER_TOKEN}\n"),
    );
    let both = home
        .try_start(
            &[
                "--operator-tokens",
                home.path("shared").to_str().unwrap(),
                "--observer-tokens",
                home.path("observer-tokens").to_str().unwrap(),
            ],
            &[],
        )
        .err()
        .expect("one token in both roles: refused");
    assert!(both.stderr.contains("both token files"), "{both:?}");
    assert!(!both.stderr.contains(OBSERVER_TOKEN), "{both:?}");

    write_secret(home.path("short"), "too-short-token\n");
    let short = home
        .try_start(
            &["--observer-tokens", home.path("short").to_str().unwrap()],
            &[],
        )
        .err()
        .expect("a short token: refused");
    assert!(short.stderr.contains("at least 32"), "{short:?}");
    // The refusals came before the audit log was opened.
    assert!(home.audit_log().is_empty());
}

#[test]
fn serve_metrics_without_token_is_opt_in_and_refused_on_a_non_loopback_listen_address() {
    let home = Home::new();
    let closed = home.start(&[]);
    assert_error(
        &closed.call("GET", "/metrics", None, None),
        401,
        "unauthorized",
    );
    drop(closed);

    let open = home.start(&["--metrics-without-token"]);
    let metrics = open.call("GET", "/metrics", None, None);
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    assert!(metrics.text.contains("vram_shards 0"), "{}", metrics.text);
    // Only /metrics opens up.
    assert_error(
        &open.call("GET", "/v1/worker", None, None),
        401,
        "unauthorized",
    );
    assert_eq!(
        open.call(
            "GET",
            "/metrics",
            Some(&format!("Bearer {OBSERVER_TOKEN}")),
            None
        )
        .status,
        200
    );
    drop(open);

    let refused = home
        .try_start(
            &[
                "--metrics-without-token",
                "--listen",
                "0.0.0.0:0",
                "--insecure-plain-http",
            ],
            &[],
        )
        .err()
        .expect("--metrics-without-token on a non-loopback address: refused");
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("--metrics-without-token") && refused.stderr.contains("loopback"),
        "{refused:?}"
    );
}

#[test]
fn serve_refuses_model_paths_outside_the_models_dir_and_changes_nothing_iv_005() {
    let home = Home::new();
    let server = home.start(&[]);
    let outside = home.path("secret.bin").display().to_string();
    let inside_absolute = home.path("models/a.bin").display().to_string();
    for model in [
        "../secret.bin",
        "sub/../../secret.bin",
        "sub/../a.bin",
        outside.as_str(),
        inside_absolute.as_str(),
        "/etc/passwd",
        "escape.bin",
        "subdir",
        ".",
        "",
        "a.bin\u{0}",
    ] {
        let reply = server.post("/v1/shards", &json!({"model": model, "gpu": 0}));
        assert_error(&reply, 400, "invalid_model_path");
        let host = home.dir.path().display().to_string();
        if !model.contains(&host) {
            assert!(
                !reply.text.contains(&host),
                "the reply names a host path: {}",
                reply.text
            );
        }
    }
    let missing = server.post("/v1/shards", &json!({"model": "missing.bin", "gpu": 0}));
    assert_error(&missing, 404, "model_not_found");
    let empty = server.post("/v1/shards", &json!({"model": "empty.bin", "gpu": 0}));
    assert_error(&empty, 422, "empty_model");
    assert_nothing_changed(&server, &home);
    // The same paths inside are fine.
    assert_eq!(server.commit("sub/b.bin", "b").status, 201);
}

#[test]
fn serve_malformed_json_and_invalid_fields_get_400_and_change_nothing_iv_003_iv_004() {
    let home = Home::new();
    let server = home.start(&[]);
    let raw = |body: &str| server.call("POST", "/v1/shards", Some(&bearer()), Some(body));
    for body in [
        "{",
        "",
        "[]",
        "null",
        r#"{"model":5,"gpu":0}"#,
        r#"{"model":"a.bin"}"#,
        r#"{"model":"a.bin","gpu":-1}"#,
        r#"{"model":"a.bin","gpu":0,"vram_ptr":1}"#,
        r#"{"model":"a.bin","gpu":0,"total_shards":"2"}"#,
    ] {
        assert_error(&raw(body), 400, "invalid_json");
    }
    let field_cases = [
        (
            json!({"model":"a.bin","gpu":0,"shard_id":"a/b"}),
            "invalid_shard_id",
        ),
        (
            json!({"model":"a.bin","gpu":0,"shard_id":"../x"}),
            "invalid_shard_id",
        ),
        (
            json!({"model":"a.bin","gpu":0,"shard_id":"a\u{0}b"}),
            "invalid_shard_id",
        ),
        (
            json!({"model":"a.bin","gpu":0,"shard_id":"x".repeat(257)}),
            "invalid_shard_id",
        ),
        (
            json!({"model":"a.bin","gpu":0,"shard_id":""}),
            "invalid_shard_id",
        ),
        (
            json!({"model":"a.bin","gpu":0,"expected_digest":"sha256:xyz"}),
            "invalid_digest",
        ),
        (
            json!({"model":"a.bin","gpu":0,"expected_digest":"md5:00"}),
            "invalid_digest",
        ),
        (json!({"model":"a.bin","gpu":7}), "invalid_gpu"),
        (
            json!({"model":"a.bin","gpu":0,"model_ref":"a\u{0}b"}),
            "invalid_field",
        ),
        (
            json!({"model":"a.bin","gpu":0,"model_ref":"x".repeat(1025)}),
            "invalid_field",
        ),
        (
            json!({"model":"a.bin","gpu":0,"shard_index":2,"total_shards":2}),
            "invalid_field",
        ),
        (
            json!({"model":"a.bin","gpu":0,"total_shards":0}),
            "invalid_field",
        ),
    ];
    for (body, code) in field_cases {
        assert_error(&server.post("/v1/shards", &body), 400, code);
    }
    // Not JSON at all.
    let url = format!("{}/v1/shards", server.base);
    let mut plain = agent()
        .post(&url)
        .header("Authorization", bearer())
        .content_type("text/plain")
        .send(r#"{"model":"a.bin","gpu":0}"#)
        .unwrap();
    assert_eq!(plain.status().as_u16(), 415);
    let text = plain.body_mut().read_to_string().unwrap();
    assert!(text.contains("unsupported_media_type"), "{text}");
    assert_nothing_changed(&server, &home);

    // Attest nonces: hex, 16 to 64 bytes.
    assert_eq!(server.commit("a.bin", "a").status, 201);
    for nonce in ["abc", "zz", &"00".repeat(15), &"00".repeat(65)] {
        let reply = server.post("/v1/shards/a/attest", &json!({ "nonce": nonce }));
        assert_error(&reply, 400, "invalid_field");
    }
    assert_error(
        &server.post("/v1/shards/a/attest", &json!({})),
        400,
        "invalid_json",
    );
    // Unknown routes and methods answer in the same shape.
    assert_error(&server.get("/v1/nope"), 404, "not_found");
    assert_error(
        &server.call("DELETE", "/v1/shards", Some(&bearer()), None),
        405,
        "method_not_allowed",
    );
}

#[test]
fn serve_oversized_bodies_get_413_and_change_nothing() {
    let home = Home::new();
    let server = home.start(&["--max-body", "64KiB"]);
    let huge = json!({"model": "a".repeat(100 * 1024), "gpu": 0});
    assert_error(&server.post("/v1/shards", &huge), 413, "body_too_large");
    let huge_nonce = json!({"nonce": "0".repeat(100 * 1024)});
    assert_error(
        &server.post("/v1/shards/x/attest", &huge_nonce),
        413,
        "body_too_large",
    );

    // A client that announces 10 MB and sends a little: refused on the announcement.
    let address = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    write!(
        stream,
        "POST /v1/shards HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{\"model\":\""
    )
    .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("body_too_large") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_nothing_changed(&server, &home);
}

#[test]
fn serve_unknown_shards_are_404_and_duplicate_ids_409_iv_003() {
    let home = Home::new();
    let server = home.start(&[]);
    let nonce = json!({"nonce": "11".repeat(16)});
    assert_error(&server.get("/v1/shards/ghost"), 404, "shard_not_found");
    assert_error(&server.delete("/v1/shards/ghost"), 404, "shard_not_found");
    assert_error(
        &server.post("/v1/shards/ghost/verify", &json!({})),
        404,
        "shard_not_found",
    );
    assert_error(
        &server.post("/v1/shards/ghost/attest", &nonce),
        404,
        "shard_not_found",
    );
    assert_error(&server.get("/v1/shards/not.valid"), 400, "invalid_shard_id");

    assert_eq!(server.commit("a.bin", "dup").status, 201);
    let used = server.used_bytes();
    assert_error(
        &server.commit("sub/b.bin", "dup"),
        409,
        "duplicate_shard_id",
    );
    assert_eq!(server.used_bytes(), used);
    assert_eq!(server.shard_ids(), ["dup"]);
    // Once evicted, the id is free again.
    assert_eq!(server.delete("/v1/shards/dup").status, 200);
    assert_eq!(server.commit("sub/b.bin", "dup").status, 201);
}

#[test]
fn serve_capacity_exhaustion_is_507_with_an_actionable_message_vp_004_rp_004() {
    let home = Home::new();
    // 3 MiB device, 512 KiB headroom: two 1 MiB models fit, a third does not.
    let server = home.start(&["--sim-vram", "3MiB", "--headroom", "512KiB"]);
    assert_eq!(server.commit("a.bin", "one").status, 201);
    assert_eq!(server.commit("sub/b.bin", "two").status, 201);
    let full = server.commit("a.bin", "three");
    assert_error(&full, 507, "insufficient_vram");
    let message = full.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("evict"), "{message}");
    assert!(message.contains("1048576 bytes needed"), "{message}");
    assert_eq!(server.used_bytes(), 2 * MIB as u64);
    let worker = server.get("/v1/worker");
    assert_eq!(worker.json["devices"][0]["available_bytes"], 512 * 1024);
    assert_eq!(server.delete("/v1/shards/one").status, 200);
    assert_eq!(server.commit("a.bin", "three").status, 201);
    assert_eq!(server.used_bytes(), 2 * MIB as u64);
}

#[test]
fn serve_concurrent_commits_admit_exactly_what_fits_rp_001() {
    let home = Home::new();
    let size = 1_500_000u64;
    home.model("c.bin", &random_bytes(size as usize, 3));
    let capacity = 10 * MIB as u64;
    let server = Arc::new(home.start(&["--sim-vram", "10MiB", "--max-parallel-ops", "8"]));
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let server = Arc::clone(&server);
                s.spawn(move || {
                    let reply = server.commit("c.bin", &format!("c-{i}"));
                    (reply.status, error_code(&reply).to_owned())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted = statuses.iter().filter(|(s, _)| *s == 201).count() as u64;
    for (status, code) in &statuses {
        assert!(
            *status == 201 || (*status == 507 && code == "insufficient_vram"),
            "{status} {code}"
        );
    }
    assert_eq!(admitted, capacity / size, "{statuses:?}");
    assert!(admitted * size <= capacity);
    assert_eq!(server.used_bytes(), admitted * size);
    assert_eq!(server.shard_ids().len() as u64, admitted);
}

#[test]
fn serve_commit_verify_attest_evict_and_check_the_attestation_offline_vp_006_ci_007() {
    let home = Home::new();
    let server = home.start(&[]);
    let expected = vram_residency::digest::digest_bytes(&random_bytes(MIB, 1))
        .unwrap()
        .digest()
        .to_string();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let mismatch = server.post(
        "/v1/shards",
        &json!({"model": "a.bin", "gpu": 0, "shard_id": "m", "expected_digest": wrong}),
    );
    assert_error(&mismatch, 422, "digest_mismatch");
    // The digest is measured in device memory, so this one was allocated, and freed again (audited).
    assert!(server.shard_ids().is_empty());
    assert_eq!(server.used_bytes(), 0);
    let log = home.audit_log();
    assert_eq!(
        log.matches("\"event\":\"vram_allocated\"").count(),
        log.matches("\"event\":\"vram_deallocated\"").count()
    );

    let committed = server.post(
        "/v1/shards",
        &json!({"model": "a.bin", "gpu": 0, "shard_id": "m", "expected_digest": expected,
                "model_ref": "org/model", "shard_index": 1, "total_shards": 2}),
    );
    assert_eq!(committed.status, 201, "{}", committed.text);
    assert_eq!(committed.json["backend"], "sim");
    assert_eq!(committed.json["digest"], expected.as_str());
    assert_eq!(committed.json["vram_bytes"], MIB);
    assert_eq!(committed.json["model_ref"], "org/model");
    assert_eq!(server.get("/v1/shards/m").json, committed.json);

    let verified = server.post("/v1/shards/m/verify", &json!({}));
    assert_eq!(verified.status, 200, "{}", verified.text);
    assert_eq!(verified.json["verified"], true);
    assert_eq!(verified.json["digest"], expected.as_str());

    let nonce = "5a".repeat(32);
    let attested = server.post("/v1/shards/m/attest", &json!({ "nonce": nonce }));
    assert_eq!(attested.status, 200, "{}", attested.text);
    assert_eq!(attested.json["payloadType"], "application/vnd.in-toto+json");
    let statement = statement_of(&attested.json);
    let predicate = &statement["predicate"];
    assert_eq!(statement["subject"][0]["name"], "m");
    assert_eq!(
        statement["subject"][0]["digest"]["fsverity-sha256"],
        expected.trim_start_matches("sha256:")
    );
    assert_eq!(predicate["backend"], "sim");
    assert_eq!(predicate["device"]["driver_version"], "sim");
    assert_eq!(predicate["residency"]["verdict"], "simulated");
    assert_eq!(predicate["seal"]["digest"], expected.as_str());
    assert_eq!(predicate["nonce"], nonce.as_str());
    // The attestation carries the audit head of that moment, and the worker publishes the same kind.
    let head = predicate["audit_head"]["seq"].as_u64().unwrap();
    assert!(head >= 4, "{predicate}");
    let worker = server.get("/v1/worker").json;
    assert!(worker["audit_head"]["seq"].as_u64().unwrap() >= head);
    let file = home.path("attestation.json");
    std::fs::write(&file, &attested.text).unwrap();

    // Verified offline with the public key alone (no token in the environment either).
    let check = |file: &Path, key: &Path, nonce: &str| {
        bin()
            .args(["attest", "verify"])
            .arg(file)
            .arg("--public-key")
            .arg(key)
            .args(["--nonce", nonce])
            .env_remove("VRAM_RESIDENCY_TOKEN")
            .output()
            .unwrap()
    };
    let ok = check(&file, &home.path("worker.pub"), &nonce);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.starts_with("OK"), "{stdout}");
    assert!(stdout.contains("NOT VRAM residency"), "{stdout}");
    assert!(
        stdout.contains(&format!("audit head:   {head}:")),
        "{stdout}"
    );

    let other_nonce = check(&file, &home.path("worker.pub"), &"5b".repeat(32));
    assert!(!other_nonce.status.success());
    assert!(String::from_utf8_lossy(&other_nonce.stdout).contains("nonce"));

    // Another worker's key refuses it.
    home.write_other_public_key();
    let other_key = check(&file, &home.path("other.pub"), &nonce);
    assert!(!other_key.status.success());
    assert!(String::from_utf8_lossy(&other_key.stdout).contains("does not verify"));

    // An edited statement (re-encoded into the envelope, old signature kept) is refused.
    for (from, to) in [
        ("org/model", "org/modeL"),
        ("\"backend\":\"sim\"", "\"backend\":\"cuda\""),
    ] {
        let edited = with_statement(&attested.json, |text| {
            assert!(text.contains(from), "{from}");
            text.replacen(from, to, 1)
        });
        let path = home.path("edited.json");
        std::fs::write(&path, edited.to_string()).unwrap();
        let out = check(&path, &home.path("worker.pub"), &nonce);
        assert!(!out.status.success(), "{from}");
    }

    let evicted = server.delete("/v1/shards/m");
    assert_eq!(evicted.status, 200, "{}", evicted.text);
    assert_eq!(evicted.json["freed_bytes"], MIB);
    assert_eq!(server.used_bytes(), 0);
    assert_error(&server.get("/v1/shards/m"), 404, "shard_not_found");
    let log = home.audit_log();
    for event in ["vram_sealed", "seal_verified", "vram_deallocated"] {
        assert!(log.contains(&format!("\"event\":\"{event}\"")), "{event}");
    }
}

#[test]
fn serve_metrics_report_capacity_operations_and_state() {
    let home = Home::new();
    let server = home.start(&["--sim-vram", "1MiB"]);
    assert_eq!(server.commit("a.bin", "a").status, 201);
    assert_eq!(server.commit("sub/b.bin", "b").status, 507);
    assert_eq!(server.post("/v1/shards/a/verify", &json!({})).status, 200);
    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers.contains("openmetrics-text"),
        "{}",
        metrics.headers
    );
    let text = &metrics.text;
    for line in [
        "vram_total_bytes{gpu=\"0\"} 1048576",
        "vram_used_bytes{gpu=\"0\"} 1048576",
        "vram_available_bytes{gpu=\"0\"} 0",
        "vram_seal_operations_total{result=\"ok\"} 1",
        "vram_seal_operations_total{result=\"insufficient_vram\"} 1",
        "vram_verify_operations_total{result=\"ok\"} 1",
        "vram_seal_duration_seconds_count 1",
        "vram_verify_duration_seconds_count 1",
        "vram_shards 1",
        "vram_worker_stopped 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[test]
fn serve_sigterm_frees_every_shard_and_leaves_a_verifying_audit_log_rp_005() {
    let home = Home::new();
    let server = home.start(&[]);
    for (model, id) in [("a.bin", "s1"), ("sub/b.bin", "s2"), ("a.bin", "s3")] {
        assert_eq!(server.commit(model, id).status, 201);
    }
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(stderr.contains("3 shard(s) freed"), "{stderr}");
    let log = home.audit_log();
    assert_eq!(log.matches("\"event\":\"vram_deallocated\"").count(), 3);
    let last = log.lines().last().unwrap();
    assert!(last.contains("\"event\":\"service_stopped\""), "{last}");
    assert!(last.contains("\"shards_freed\":3"), "{last}");
    let verify = home.audit_verify();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{out}");
    assert!(out.starts_with("OK"), "{out}");

    // A restart continues the same chain.
    let again = home.start(&[]);
    assert_eq!(again.commit("a.bin", "s4").status, 201);
    let (status, _) = again.terminate();
    assert!(status.success());
    let out = String::from_utf8_lossy(&home.audit_verify().stdout).into_owned();
    assert!(out.starts_with("OK"), "{out}");
    assert!(home.audit_log().matches("service_started").count() == 2);
}

#[test]
fn serve_kill_9_during_commits_leaves_at_most_a_torn_tail_in_the_audit_log() {
    let home = Home::new();
    home.model("big.bin", &random_bytes(8 * MIB, 4));
    let server = home.start(&["--sim-vram", "1GiB", "--max-parallel-ops", "4"]);
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (server, stop, done) = (&server, &stop, &done);
            s.spawn(move || {
                let agent = agent();
                for i in 0..200 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let url = format!("{}/v1/shards", server.base);
                    let body =
                        json!({"model": "big.bin", "gpu": 0, "shard_id": format!("k{t}-{i}")});
                    let sent = agent
                        .post(&url)
                        .header("Authorization", bearer())
                        .content_type("application/json")
                        .send(body.to_string());
                    match sent {
                        Ok(r) if r.status().as_u16() == 201 => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        // The server died under us, or capacity ran out: stop this client.
                        _ => break,
                    }
                }
            });
        }
        // Kill while commits are in flight, after a few have completed.
        let deadline = Instant::now() + BOUND;
        while done.load(Ordering::SeqCst) < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Command::new("kill")
            .args(["-KILL", &server.pid().to_string()])
            .status()
            .unwrap();
        stop.store(true, Ordering::SeqCst);
    });
    assert!(done.load(Ordering::SeqCst) >= 6);
    let verify = home.audit_verify();
    let out = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(verify.status.success(), "{out}");
    assert!(out.starts_with("OK"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    let sealed = home
        .audit_log()
        .matches("\"event\":\"vram_sealed\"")
        .count();
    assert!(sealed >= 6, "{sealed}");

    // The lock died with the process: a new worker continues the chain (recovering a torn tail if
    // the kill left one).
    let again = home.start(&[]);
    assert!(again.shard_ids().is_empty(), "nothing survives a kill -9");
    let (status, stderr) = again.terminate();
    assert!(status.success(), "{stderr}");
    let out = String::from_utf8_lossy(&home.audit_verify().stdout).into_owned();
    assert!(out.starts_with("OK"), "{out}");
    assert!(!out.contains("TORN TAIL"), "{out}");
}

#[test]
fn serve_refuses_to_start_on_a_locked_or_tampered_audit_log() {
    let home = Home::new();
    let first = home.start(&[]);
    let second = home
        .try_start(&[], &[])
        .err()
        .expect("a second writer must be refused");
    assert!(second.stderr.contains("locked"), "{second:?}");
    let (status, _) = first.terminate();
    assert!(status.success());

    let log = home.audit_log();
    std::fs::write(
        home.path("audit.log"),
        log.replacen("\"devices\":1", "\"devices\":2", 1),
    )
    .unwrap();
    let tampered = home
        .try_start(&[], &[])
        .err()
        .expect("a tampered log must be refused");
    assert!(
        tampered.stderr.contains("does not verify at line 2"),
        "{tampered:?}"
    );
}

#[test]
fn serve_refuses_to_start_without_a_token_or_with_the_missing_cuda_backend() {
    let home = Home::new();
    let out = bin()
        .arg("serve")
        .args(crate::support::allow_root())
        .arg("--models-dir")
        .arg(home.path("models"))
        .arg("--audit-log")
        .arg(home.path("audit.log"))
        .args(["--backend", "sim"])
        .env_remove("VRAM_RESIDENCY_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    if !vram_residency_cuda::driver_present() {
        let cuda = bin()
            .arg("serve")
            .args(crate::support::allow_root())
            .arg("--models-dir")
            .arg(home.path("models"))
            .arg("--audit-log")
            .arg(home.path("audit.log"))
            .arg("--token-file")
            .arg(home.path("token"))
            .arg("--operator-tokens")
            .arg(home.path("operator-tokens"))
            .args(["--backend", "cuda", "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!cuda.status.success());
        let stderr = String::from_utf8_lossy(&cuda.stderr);
        assert!(stderr.contains("libcuda.so"), "{stderr}");
        assert!(cuda.stdout.is_empty(), "it must not start listening");
    }
    let argv = bin()
        .args(["serve", "--token", TEST_TOKEN])
        .output()
        .unwrap();
    assert!(!argv.status.success());
}

#[test]
fn serve_never_reveals_the_token_a_key_or_a_pointer_ms_001_ci_006() {
    let home = Home::new();
    // Token from the environment this time, and every log line on.
    let server = home
        .try_start(&["-vv"], &[("VRAM_RESIDENCY_TOKEN", TEST_TOKEN)])
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid())).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(TEST_TOKEN) && !cmdline.contains(OPERATOR_TOKEN));

    let mut seen = String::new();
    let mut keep = |reply: Reply| {
        seen.push_str(&reply.headers);
        seen.push_str(&reply.text);
        reply
    };
    keep(server.call("GET", "/v1/worker", None, None));
    keep(server.call(
        "GET",
        "/v1/worker",
        Some(&format!("Bearer {TEST_TOKEN}0")),
        None,
    ));
    // A client that puts a token in the query string: it must not reach the -vv log.
    keep(server.call(
        "GET",
        &format!("/v1/worker?access_token={OPERATOR_TOKEN}"),
        None,
        None,
    ));
    // The worker token itself: refused, and audited without it.
    keep(server.call(
        "GET",
        "/v1/worker",
        Some(&format!("Bearer {TEST_TOKEN}")),
        None,
    ));
    keep(server.call(
        "POST",
        "/v1/shards/leak/verify",
        Some(&format!("Bearer {OBSERVER_TOKEN}")),
        None,
    ));
    keep(server.commit("a.bin", "leak"));
    keep(server.commit("a.bin", "leak"));
    keep(server.commit("../secret.bin", "x"));
    keep(server.post("/v1/shards", &json!({"model": "a.bin", "gpu": 9})));
    keep(server.get("/v1/shards"));
    keep(server.get("/v1/shards/leak"));
    keep(server.post("/v1/shards/leak/verify", &json!({})));
    let attestation =
        keep(server.post("/v1/shards/leak/attest", &json!({"nonce": "ab".repeat(20)})));
    assert_eq!(attestation.status, 200);
    keep(server.get("/v1/worker"));
    keep(server.get("/metrics"));
    keep(server.delete("/v1/shards/leak"));
    let (status, stderr) = server.terminate();
    assert!(status.success());
    seen.push_str(&stderr);
    seen.push_str(&home.audit_log());

    // The worker token, the API tokens, their hashes, and the two derived secrets (the seal key and
    // the Ed25519 seed).
    let mut secrets = Vec::new();
    for token in [
        TEST_TOKEN,
        OPERATOR_TOKEN,
        OPERATOR_TOKEN_ROTATED,
        OBSERVER_TOKEN,
    ] {
        use sha2::Digest as _;
        secrets.push(token.to_owned());
        secrets.push(hex::encode(sha2::Sha256::digest(token.as_bytes())));
    }
    for info in ["seal key v1", "ed25519 identity v1"] {
        let mut key = [0u8; 32];
        vram_residency::keys::hkdf_sha256(
            b"vram-residency/hkdf-salt/v1",
            TEST_TOKEN.as_bytes(),
            format!("vram-residency {info}").as_bytes(),
            &mut key,
        )
        .unwrap();
        secrets.push(hex::encode(key));
    }
    for secret in &secrets {
        assert!(!seen.contains(secret.as_str()), "a secret leaked");
    }
    for token in [TEST_TOKEN, OPERATOR_TOKEN, OBSERVER_TOKEN] {
        assert!(!seen.contains(&token[..16]), "part of a token leaked");
    }
    // No pointer-like value (0x followed by 8+ hex digits) and no pointer field anywhere.
    let lower = seen.to_lowercase();
    for (i, _) in lower.match_indices("0x") {
        let digits = lower[i + 2..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .count();
        assert!(
            digits < 8,
            "pointer-like value near {:?}",
            &lower[i..(i + 20).min(lower.len())]
        );
    }
    for field in ["ptr", "pointer", "address\""] {
        assert!(!lower.contains(field), "{field} appears");
    }
    assert!(
        stderr.contains("DEBUG") || stderr.contains("INFO"),
        "logging was on: {stderr}"
    );
}

#[test]
fn audit_verify_reports_a_torn_tail_as_such_and_tampering_as_failure_with_the_line() {
    let home = Home::new();
    let server = home.start(&[]);
    assert_eq!(server.commit("a.bin", "t").status, 201);
    assert_eq!(server.delete("/v1/shards/t").status, 200);
    let (status, _) = server.terminate();
    assert!(status.success());
    let log = home.audit_log();
    let records = log.lines().count();
    assert!(records >= 5);

    // Torn: half of another line, no newline.
    let mut torn = log.clone();
    let half = log.lines().nth(1).unwrap();
    torn.push_str(&half[..half.len() / 2]);
    std::fs::write(home.path("audit.log"), &torn).unwrap();
    let out = home.audit_verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("OK: "), "{text}");
    assert!(
        text.contains(&format!("{records} record(s) verified")),
        "{text}"
    );
    assert!(
        text.contains(&format!("TORN TAIL: line {}", records + 1)),
        "{text}"
    );

    // Tampered: one character of the first record with a gpu changed (record 3, or 4 when the
    // tests run as root and service_runs_as_root is record 3).
    let lines: Vec<&str> = log.lines().collect();
    let at = lines.iter().position(|l| l.contains("\"gpu\":0")).unwrap();
    assert_eq!(
        at,
        if crate::support::running_as_root() {
            3
        } else {
            2
        }
    );
    let changed = lines[at].replacen("\"gpu\":0", "\"gpu\":1", 1);
    let mut tampered: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    tampered[at] = changed;
    std::fs::write(home.path("audit.log"), tampered.join("\n") + "\n").unwrap();
    let out = home.audit_verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(text.starts_with("FAILED"), "{text}");
    assert!(text.contains(&format!("line {}", at + 1)), "{text}");
    assert!(
        text.contains(&format!("{at} record(s) before it verified")),
        "{text}"
    );

    // A removed record breaks the sequence at the line where it was.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(1);
    std::fs::write(home.path("audit.log"), removed.join("\n") + "\n").unwrap();
    let text = String::from_utf8_lossy(&home.audit_verify().stdout).into_owned();
    assert!(
        text.starts_with("FAILED") && text.contains("line 2"),
        "{text}"
    );

    // Another worker's public key: the first record already fails.
    std::fs::write(home.path("audit.log"), &log).unwrap();
    home.write_other_public_key();
    let text =
        String::from_utf8_lossy(&home.audit_verify_with(&home.path("other.pub"), &[]).stdout)
            .into_owned();
    assert!(
        text.starts_with("FAILED") && text.contains("line 1"),
        "{text}"
    );
}

/// The in-toto Statement inside a DSSE envelope (JSON).
fn statement_of(envelope: &Value) -> Value {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

/// The envelope with its statement's text edited (the signature left as it was).
fn with_statement(envelope: &Value, edit: impl Fn(String) -> String) -> Value {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let payload = engine
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let edited = edit(String::from_utf8(payload).unwrap());
    let mut out = envelope.clone();
    out["payload"] = Value::String(engine.encode(edited));
    out
}

#[test]
fn an_attestation_signature_verifies_with_openssl_and_the_pem_key_and_fails_with_another_key_vp_006()
 {
    if !crate::support::have_tool("openssl") {
        crate::support::skip(
            "an_attestation_signature_verifies_with_openssl",
            "openssl not installed",
        );
        return;
    }
    let home = Home::new();
    let server = home.start(&[]);
    let committed = server.post(
        "/v1/shards",
        &json!({"model": "a.bin", "gpu": 0, "shard_id": "o"}),
    );
    assert_eq!(committed.status, 201, "{}", committed.text);
    let nonce = "11".repeat(16);
    let attested = server.post("/v1/shards/o/attest", &json!({ "nonce": nonce }));
    assert_eq!(attested.status, 200, "{}", attested.text);
    // The bytes openssl checks: DSSE's PAE, built here from the envelope as the DSSE spec says.
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let payload = engine
        .decode(attested.json["payload"].as_str().unwrap())
        .unwrap();
    let payload_type = attested.json["payloadType"].as_str().unwrap();
    let mut pae = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    pae.extend_from_slice(&payload);
    std::fs::write(home.path("pae.bin"), &pae).unwrap();
    let sig = engine
        .decode(attested.json["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    std::fs::write(home.path("sig.bin"), &sig).unwrap();
    let openssl = |key: &str, input: &str| {
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
            .arg(home.path(key))
            .arg("-in")
            .arg(home.path(input))
            .arg("-sigfile")
            .arg(home.path("sig.bin"))
            .output()
            .unwrap()
    };
    let ok = openssl("worker.pub", "pae.bin");
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        ok.status.success() && text.contains("Signature Verified Successfully"),
        "{text}"
    );
    // The key the worker serves is the one `identity` prints.
    let served = server.get("/v1/identity");
    assert_eq!(served.status, 200);
    assert_eq!(
        served.json["public_key_pem"].as_str().unwrap(),
        std::fs::read_to_string(home.path("worker.pub")).unwrap()
    );
    // Another key, or a changed byte of the signed bytes: openssl refuses.
    home.write_other_public_key();
    assert!(!openssl("other.pub", "pae.bin").status.success());
    let mut changed = pae.clone();
    let last = changed.len() - 2;
    changed[last] ^= 1;
    std::fs::write(home.path("changed.bin"), &changed).unwrap();
    assert!(!openssl("worker.pub", "changed.bin").status.success());
}

#[test]
fn audit_verify_expect_head_catches_a_cut_at_a_record_boundary_with_the_public_key_only() {
    let home = Home::new();
    let server = home.start(&[]);
    for id in ["h1", "h2"] {
        let committed = server.post(
            "/v1/shards",
            &json!({"model": "a.bin", "gpu": 0, "shard_id": id}),
        );
        assert_eq!(committed.status, 201, "{}", committed.text);
    }
    let head = server.get("/v1/worker").json["audit_head"]["head"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(server);
    let log = home.audit_log();
    let ok = home.audit_verify_with(&home.path("worker.pub"), &["--expect-head", &head]);
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(ok.status.success(), "{text}");
    assert!(
        text.contains(&format!("expected head {head}: present")),
        "{text}"
    );
    // Cut the last record at its line boundary: still a valid-looking log without a head...
    let lines: Vec<&str> = log.lines().collect();
    let cut: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(home.path("audit.log"), &cut).unwrap();
    let plain = home.audit_verify();
    assert!(plain.status.success());
    // ...but the head the verifier kept catches it.
    let caught = home.audit_verify_with(&home.path("worker.pub"), &["--expect-head", &head]);
    let text = String::from_utf8_lossy(&caught.stdout).into_owned();
    assert!(!caught.status.success(), "{text}");
    assert!(text.contains("were cut off the end"), "{text}");
    // An empty file and a model file are not audit logs.
    for content in [&b""[..], &b"GGUF\x03\x00\x00\x00"[..]] {
        std::fs::write(home.path("audit.log"), content).unwrap();
        let out = home.audit_verify();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !out.status.success() && text.starts_with("FAILED"),
            "{text}"
        );
        let refused = home
            .try_start(&[], &[])
            .err()
            .expect("serve must refuse it");
        assert!(refused.stderr.contains("does not verify"), "{refused:?}");
        assert_eq!(std::fs::read(home.path("audit.log")).unwrap(), content);
    }
}

#[test]
fn openapi_documents_every_route() {
    let spec = std::fs::read_to_string(repo_path("docs/openapi.yaml")).unwrap();
    assert!(spec.starts_with("openapi: 3."));
    for (path, methods) in [
        ("/v1/shards", &["get", "post"][..]),
        ("/v1/shards/{id}", &["get", "delete"]),
        ("/v1/shards/{id}/verify", &["post"]),
        ("/v1/shards/{id}/attest", &["post"]),
        ("/v1/worker", &["get"]),
        ("/metrics", &["get"]),
        ("/v1/identity", &["get"]),
        ("/healthz", &["get"]),
    ] {
        let at = spec
            .find(&format!("\n  {path}:\n"))
            .unwrap_or_else(|| panic!("{path} is not documented"));
        let section: String = spec[at + 1..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        for method in methods {
            assert!(
                section.contains(&format!("\n    {method}:"))
                    || section.starts_with(&format!("    {method}:")),
                "{method} {path} is not documented"
            );
        }
    }
    // Each operation names, in `x-role`, the role the server requires of it.
    for (path, method, role) in [
        ("/v1/shards", "post", "operator"),
        ("/v1/shards", "get", "observer"),
        ("/v1/shards/{id}", "get", "observer"),
        ("/v1/shards/{id}", "delete", "operator"),
        ("/v1/shards/{id}/verify", "post", "operator"),
        ("/v1/shards/{id}/attest", "post", "observer"),
        ("/v1/worker", "get", "observer"),
        ("/metrics", "get", "observer"),
        ("/v1/identity", "get", "none"),
    ] {
        let at = spec.find(&format!("\n  {path}:\n")).unwrap();
        let section = &spec[at + 1..];
        let section = &section[..section.find("\n  /").unwrap_or(section.len())];
        let op = section.find(&format!("\n    {method}:\n")).unwrap();
        let documented = section[op + 1..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("      "))
            .any(|l| l == format!("      x-role: {role}"));
        assert!(documented, "{method} {path} does not say x-role: {role}");
    }
    for code in [
        "unauthorized",
        "forbidden",
        "invalid_json",
        "invalid_model_path",
        "shard_not_found",
        "duplicate_shard_id",
        "body_too_large",
        "body_timeout",
        "digest_mismatch",
        "insufficient_vram",
        "worker_stopped",
    ] {
        assert!(spec.contains(code), "error code {code} is not documented");
    }
}

#[test]
fn serve_a_model_that_claims_a_format_but_does_not_parse_is_422_malformed_model_and_changes_nothing_iv_001()
 {
    let home = Home::new();
    let mut ggux = std::fs::read(repo_path(
        "crates/vram-residency/tests/fixtures/tiny-v3.gguf",
    ))
    .unwrap();
    ggux[3] = b'X';
    home.model("ggux.bin", &ggux);
    home.model("empty-named.gguf", b"");
    let server = home.start(&[]);
    let refused = server.post("/v1/shards", &json!({"model": "ggux.bin", "gpu": 0}));
    assert_error(&refused, 422, "malformed_model");
    assert!(refused.text.contains("magic"), "{}", refused.text);
    assert_nothing_changed(&server, &home);
    let empty = server.post(
        "/v1/shards",
        &json!({"model": "empty-named.gguf", "gpu": 0}),
    );
    assert_eq!(empty.status, 422, "{}", empty.text);
    let bad_choice = server.post(
        "/v1/shards",
        &json!({"model": "ggux.bin", "gpu": 0, "format": "GGUF"}),
    );
    assert_error(&bad_choice, 400, "invalid_field");
    assert_nothing_changed(&server, &home);
    // Named explicitly, the same bytes are sealed as raw.
    let raw = server.post(
        "/v1/shards",
        &json!({"model": "ggux.bin", "gpu": 0, "shard_id": "r", "format": "raw"}),
    );
    assert_eq!(raw.status, 201, "{}", raw.text);
    assert_eq!(raw.json["format"], "raw");
}

#[test]
fn serve_a_fifo_in_the_models_dir_is_refused_at_once_and_holds_no_operation_slot() {
    let home = Home::new();
    let fifo = home.path("models").join("pipe.bin");
    if !Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        crate::support::skip(
            "serve_a_fifo_in_the_models_dir_is_refused_at_once_and_holds_no_operation_slot",
            "mkfifo not available",
        );
        return;
    }
    let server = home.start(&["--max-parallel-ops", "1"]);
    // More commits of the FIFO than there are operation slots: each is refused at once.
    for _ in 0..3 {
        let started = Instant::now();
        let refused = server.post("/v1/shards", &json!({"model": "pipe.bin", "gpu": 0}));
        assert_error(&refused, 400, "invalid_model_path");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The one slot is free: a real commit goes through.
    assert_eq!(server.commit("a.bin", "after-fifo").status, 201);
}

/// The race of the issue: a FIFO renamed over a model file while it is committed again and again
/// (one operation slot). No commit may block: each ends within seconds, sealed (the file) or refused
/// as not a regular file (the FIFO), and the slot is free at the end.
#[test]
fn serve_a_fifo_swapped_in_during_commits_never_blocks_a_slot() {
    let home = Home::new();
    let models = home.path("models");
    if !Command::new("mkfifo")
        .arg(models.join("probe.fifo"))
        .status()
        .is_ok_and(|s| s.success())
    {
        crate::support::skip(
            "serve_a_fifo_swapped_in_during_commits_never_blocks_a_slot",
            "mkfifo not available",
        );
        return;
    }
    let bytes = crate::support::random_bytes(64 << 10, 7);
    std::fs::write(models.join("swap.bin"), &bytes).unwrap();
    let server = home.start(&["--max-parallel-ops", "1"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = std::sync::Arc::clone(&stop);
        let models = models.clone();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let fifo = models.join("next.fifo");
                let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
                assert!(made.success());
                std::fs::rename(&fifo, models.join("swap.bin")).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                std::fs::write(models.join("next.file"), &bytes).unwrap();
                std::fs::rename(models.join("next.file"), models.join("swap.bin")).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                swaps += 2;
            }
            swaps
        })
    };
    let (mut sealed, mut refused, mut slowest) = (0u32, 0u32, Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0u32;
    while (round < 200 || sealed == 0 || refused == 0) && Instant::now() < deadline {
        round += 1;
        let started = Instant::now();
        let reply = server.post(
            "/v1/shards",
            &json!({"model": "swap.bin", "gpu": 0, "shard_id": format!("s{round}"), "format": "raw"}),
        );
        slowest = slowest.max(started.elapsed());
        match reply.status {
            201 => {
                sealed += 1;
                assert_eq!(server.delete(&format!("/v1/shards/s{round}")).status, 200);
            }
            400 => {
                assert_error(&reply, 400, "invalid_model_path");
                refused += 1;
            }
            // The file was replaced while it was read (size/identity changed): refused, not stuck.
            409 | 422 => refused += 1,
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    println!(
        "fifo swaps: {swaps}; commits: {round}, sealed {sealed}, refused {refused}; slowest {slowest:?}"
    );
    assert!(sealed > 0 && refused > 0, "the swap never raced a commit");
    assert!(
        slowest < Duration::from_secs(10),
        "a commit blocked for {slowest:?}"
    );
    // The one slot is free afterwards.
    std::fs::write(
        models.join("after.bin"),
        crate::support::random_bytes(4096, 8),
    )
    .unwrap();
    assert_eq!(server.commit("after.bin", "after-swap").status, 201);
}

// ---- Transport (issue 11, item 4): TLS, the listen policy, timeouts, the connection cap ----

/// Makes a self-signed certificate for `127.0.0.1`/`localhost` with the stock `openssl` CLI:
/// `NAME.crt` and `NAME.key` (mode 0600) in the home; `None` (and a skip line) without openssl.
fn openssl_certificate(home: &Home, name: &str, test: &str) -> Option<(PathBuf, PathBuf)> {
    if !crate::support::have_tool("openssl") {
        crate::support::skip(test, "openssl not installed");
        return None;
    }
    let config = home.path(&format!("{name}.cnf"));
    std::fs::write(
        &config,
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n[dn]\nCN = localhost\n\
         [ext]\nbasicConstraints = critical,CA:FALSE\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n\
         keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    let cert = home.path(&format!("{name}.crt"));
    let key = home.path(&format!("{name}.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-config"])
        .arg(&config)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl req: {made:?}");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some((cert, key))
}

/// Sends `request` on a new connection to `address` and returns the stream (read timeout BOUND).
fn raw_connection(address: &str, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream.write_all(request).unwrap();
    stream
}

/// Reads until the server closes the connection (or BOUND passes: then the test fails).
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) => {}
        // A reset after the answer is a close too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The value of the sample `name` (no labels) in a `/metrics` text; 0 when absent.
fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// Waits (bounded) until the sample `name` of `/metrics` reaches `at_least`.
fn wait_for_metric(server: &Server, name: &str, at_least: u64) {
    let deadline = Instant::now() + BOUND;
    loop {
        let metrics = server.get("/metrics");
        assert_eq!(metrics.status, 200, "{}", metrics.text);
        if metric_value(&metrics.text, name) >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {}", metrics.text);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GET of `/healthz` on a connection that stays open (HTTP/1.1 keep-alive).
fn healthz_request() -> &'static [u8] {
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
}

/// Reads one answer to [`healthz_request`] (its headers and its short JSON body).
fn read_healthz_answer(stream: &mut TcpStream) -> String {
    let mut text = String::new();
    let mut buf = [0_u8; 1024];
    while !text.contains("\r\n\r\n") || !text.trim_end().ends_with('}') {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer was whole: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

#[test]
fn serve_tls_serves_https_with_the_given_certificate_and_refuses_plain_http_and_other_trust() {
    let test = "serve_tls_serves_https_with_the_given_certificate";
    let home = Home::new();
    let Some((cert, key)) = openssl_certificate(&home, "server", test) else {
        return;
    };
    let Some((other_cert, _)) = openssl_certificate(&home, "other", test) else {
        return;
    };
    let server = home.start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let server = server.trusting(&std::fs::read(&cert).unwrap());

    let health = server.call("GET", "/healthz", None, None);
    assert_eq!(health.status, 200, "{}", health.text);
    assert_eq!(health.json["status"], "running");
    let identity = server.call("GET", "/v1/identity", None, None);
    assert_eq!(identity.status, 200);
    assert_eq!(
        identity.json["public_key_pem"].as_str().unwrap(),
        std::fs::read_to_string(home.path("worker.pub")).unwrap()
    );
    let worker = server.get("/v1/worker");
    assert_eq!(worker.status, 200, "{}", worker.text);
    assert_eq!(worker.json["transport"], "https");
    // Over TLS the API is the same API: a commit works.
    assert_eq!(server.commit("a.bin", "over-tls").status, 201);

    // A client that trusts another certificate refuses this server.
    let url = format!("{}/healthz", server.base);
    let distrust = tls_agent(&std::fs::read(&other_cert).unwrap())
        .get(&url)
        .call();
    assert!(distrust.is_err(), "{distrust:?}");
    // Plain HTTP to the TLS port gets no HTTP answer, and the server is none the worse for it.
    let mut plain = raw_connection(&server.address(), healthz_request());
    let answer = read_until_closed(&mut plain);
    assert!(!answer.starts_with("HTTP/"), "{answer:?}");
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
    // Both failed handshakes are counted (the count lands as the handshake task ends).
    wait_for_metric(&server, "vram_tls_handshake_failures_total", 2);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let private_key = std::fs::read_to_string(&key).unwrap();
    let key_body = private_key.lines().nth(1).unwrap();
    assert!(!stderr.contains(key_body), "{stderr}");
}

#[test]
fn serve_refuses_a_tls_key_readable_by_others_a_lone_cert_and_a_key_of_another_certificate() {
    use std::os::unix::fs::PermissionsExt as _;
    let test = "serve_refuses_a_tls_key_readable_by_others";
    let home = Home::new();
    let Some((cert, key)) = openssl_certificate(&home, "server", test) else {
        return;
    };
    let Some((_, other_key)) = openssl_certificate(&home, "other", test) else {
        return;
    };
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_body = key_text.lines().nth(1).unwrap().to_owned();
    let (cert, key, other_key) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );

    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_key = home
        .try_start(&["--tls-cert", cert, "--tls-key", key], &[])
        .err()
        .expect("a 0644 key file must be refused");
    assert!(!open_key.status.success());
    assert!(
        open_key.stderr.contains("chmod 600") && open_key.stderr.contains(key),
        "{open_key:?}"
    );
    assert!(!open_key.stderr.contains(&key_body), "{open_key:?}");
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let lone = home
        .try_start(&["--tls-cert", cert], &[])
        .err()
        .expect("--tls-cert without --tls-key must be refused");
    assert!(lone.stderr.contains("--tls-key"), "{lone:?}");

    let mismatched = home
        .try_start(&["--tls-cert", cert, "--tls-key", other_key], &[])
        .err()
        .expect("a key of another certificate must be refused");
    assert!(
        mismatched.stderr.contains("not a usable pair"),
        "{mismatched:?}"
    );

    let both = home
        .try_start(
            &[
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--insecure-plain-http",
            ],
            &[],
        )
        .err()
        .expect("TLS and --insecure-plain-http together must be refused");
    assert!(both.stderr.contains("--insecure-plain-http"), "{both:?}");
    // Refused before the audit log was opened.
    assert!(home.audit_log().is_empty());
}

#[test]
fn serve_refuses_a_non_loopback_listen_without_tls_or_insecure_plain_http_which_starts_and_warns() {
    let home = Home::new();
    let refused = home
        .try_start(&["--listen", "0.0.0.0:0"], &[])
        .err()
        .expect("plain HTTP on 0.0.0.0 must be refused");
    assert!(!refused.status.success());
    for flag in ["--tls-cert", "--tls-key", "--insecure-plain-http"] {
        assert!(refused.stderr.contains(flag), "{flag}: {refused:?}");
    }
    // Refused before anything was opened.
    assert!(home.audit_log().is_empty());

    let insecure = home.start(&["--listen", "0.0.0.0:0", "--insecure-plain-http"]);
    assert!(
        insecure.base.starts_with("http://0.0.0.0:"),
        "{}",
        insecure.base
    );
    let stderr = insecure.stderr();
    assert!(
        stderr.contains("WARNING: --insecure-plain-http") && stderr.contains("PLAIN HTTP"),
        "{stderr}"
    );
    let worker = {
        let mut loopback = insecure;
        loopback.base = format!("http://{}", loopback.address());
        let health = loopback.call("GET", "/healthz", None, None);
        assert_eq!(health.status, 200);
        loopback.get("/v1/worker")
    };
    assert_eq!(
        worker.json["transport"], "insecure-plain-http",
        "{}",
        worker.text
    );

    // Loopback stays plain HTTP by default, without the warning.
    let plain = home.start(&[]);
    assert!(plain.base.starts_with("http://127.0.0.1:"));
    assert_eq!(plain.get("/v1/worker").json["transport"], "http");
    assert!(!plain.stderr().contains("insecure"), "{}", plain.stderr());
}

#[test]
fn serve_a_body_or_headers_sent_too_slowly_get_408_or_a_close_within_the_timeouts() {
    let home = Home::new();
    let server = home.start(&["--body-timeout", "1s", "--header-timeout", "1s"]);
    let address = server.address();

    // Headers announce 100 bytes of body; one arrives, then nothing.
    let started = Instant::now();
    let mut slow_body = raw_connection(
        &address,
        format!(
            "POST /v1/shards HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \
             {OPERATOR_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    );
    let answer = read_until_closed(&mut slow_body);
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("body_timeout"), "{answer:?}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer:?}"
    );
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");

    // Headers that never end: the connection is closed without an answer being served.
    let started = Instant::now();
    let mut slow_headers =
        raw_connection(&address, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let answer = read_until_closed(&mut slow_headers);
    assert!(!answer.contains("200 OK"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The server still answers, and the trickled commit changed nothing.
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
    assert_nothing_changed(&server, &home);
    let metrics = server.get("/metrics");
    assert!(
        metrics
            .text
            .contains("vram_seal_operations_total{result=\"body_timeout\"} 1"),
        "{}",
        metrics.text
    );
}

#[test]
fn serve_max_connections_leaves_further_connections_waiting_until_one_closes() {
    let home = Home::new();
    // A long header timeout, so that the held idle connections stay open for the whole test.
    let server = home.start(&["--max-connections", "2", "--header-timeout", "60s"]);
    let address = server.address();
    // Two connections, each answered once (so the server has surely accepted them), then held
    // open and idle.
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = raw_connection(&address, healthz_request());
            let answer = read_healthz_answer(&mut stream);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
            stream
        })
        .collect();

    // A third connects (the kernel's backlog takes it) but is not served.
    let mut third = raw_connection(&address, healthz_request());
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0_u8; 64];
    match third.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third connection was served at the cap: {other:?}"),
    }

    // One held connection closes: the third is accepted and answered.
    drop(held.pop());
    third.set_read_timeout(Some(BOUND)).unwrap();
    let answer = read_healthz_answer(&mut third);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    drop(third);

    // Each time the cap was reached is counted (here at least once, before the third).
    wait_for_metric(&server, "vram_connection_limit_reached_total", 1);
    drop(held);
}

#[test]
fn serve_help_and_the_service_guide_name_every_transport_flag_and_its_default() {
    let help = crate::support::bin()
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let guide = std::fs::read_to_string(repo_path("docs/service.md")).unwrap();
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    for (flag, default) in [
        ("--tls-cert", None),
        ("--tls-key", None),
        ("--insecure-plain-http", None),
        ("--header-timeout", Some("10s")),
        ("--body-timeout", Some("30s")),
        ("--max-connections", Some("256")),
    ] {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag}: {help}"
        );
        let row = guide
            .lines()
            .find(|line| line.starts_with(&format!("| `{flag}")))
            .unwrap_or_else(|| panic!("docs/service.md has no row for {flag}"));
        assert!(readme.contains(flag), "README.md does not name {flag}");
        if let Some(default) = default {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{flag}: {help}"
            );
            assert!(
                row.contains(&format!("`{default}`")) || row.contains(&format!("| {default} |")),
                "{row}"
            );
        }
    }
}
