#!/usr/bin/env python3
"""Load test for `vram-residency serve` (Python standard library only).

N concurrent clients each repeat: commit a model (POST /v1/shards) -> verify -> attest (fresh nonce)
-> evict (DELETE), for a bounded time and a bounded number of requests, then stop by themselves.
Reports throughput, latency percentiles per operation, errors, and whether used VRAM returned to its
starting value.

Safety: the target must be a loopback address (127.0.0.0/8 or ::1); anything else is refused. The run
is bounded by --duration (at most 3600 s) and --max-requests; every request has a timeout.

Authentication: an operator API token (the test commits and evicts), read from --api-token-file
(the first line that is neither blank nor a '#' comment; the file should be mode 0600) or else from
$VRAM_RESIDENCY_API_TOKEN. The worker token is not an API credential: the server refuses it.

Example (sim backend, on this machine; operator.tokens holds one operator token, mode 0600):
    vram-residency serve --backend sim --models-dir models --token-file token \\
        --operator-tokens operator.tokens --audit-log audit.log --listen 127.0.0.1:8470 &
    scripts/load-test.py --url http://127.0.0.1:8470 --api-token-file operator.tokens \\
        --model m.bin --clients 4 --duration 20

On a GPU host, the same against `--backend cuda`. `--create-model SIZE --models-dir DIR` writes a
random model file of SIZE bytes first (DIR must be the server's models directory).
"""

import argparse
import base64
import http.client
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse

MAX_DURATION_S = 3600
OPS = ("commit", "verify", "attest", "evict")


def loopback_only(host):
    """Refuses any host that resolves to a non-loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        sys.exit(f"load-test: cannot resolve {host!r}: {e}")
    addresses = {info[4][0] for info in infos}
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            sys.exit(f"load-test: {host} resolves to {address}, not a loopback address; refusing")


class Client:
    def __init__(self, host, port, token, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = None

    def request(self, method, path, body=None):
        """Returns (status, parsed JSON or None, seconds). Reconnects once on a dropped connection."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                response = self.conn.getresponse()
                raw = response.read()
                elapsed = time.perf_counter() - started
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
                continue
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return response.status, parsed, elapsed
        raise RuntimeError("unreachable")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = {op: [] for op in OPS}
        self.errors = {}
        self.capacity_refusals = 0
        self.requests = 0
        self.iterations = 0

    def record(self, op, status, body, elapsed, expected):
        with self.lock:
            self.requests += 1
            if status == expected:
                self.latency[op].append(elapsed)
                return True
            code = (body or {}).get("error", {}).get("code", "?") if isinstance(body, dict) else "?"
            if op == "commit" and status == 507:
                self.capacity_refusals += 1
            else:
                key = f"{op} {status} {code}"
                self.errors[key] = self.errors.get(key, 0) + 1
            return False

    def take_request_slot(self, budget):
        with self.lock:
            return self.requests < budget


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def api_token(path):
    """The operator API token: the first line of `path` that is neither blank nor a '#' comment, else
    $VRAM_RESIDENCY_API_TOKEN. Never printed."""
    if path:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        token = next((line for line in lines if line and not line.startswith("#")), "")
        if not token:
            sys.exit(f"load-test: {path} holds no token (only blank or '#' lines)")
        return token
    token = os.environ.get("VRAM_RESIDENCY_API_TOKEN", "").strip()
    if not token:
        sys.exit("load-test: no API token: pass --api-token-file FILE (an operator token) or set "
                 "VRAM_RESIDENCY_API_TOKEN")
    return token


def used_bytes(client):
    status, body, _ = client.request("GET", "/v1/worker")
    if status == 401:
        sys.exit("load-test: the API token was refused (401): pass an operator API token (the worker "
                 "token is never accepted)")
    if status != 200:
        sys.exit(f"load-test: GET /v1/worker answered {status}: {body}")
    return sum(d.get("used_bytes") or 0 for d in body["devices"]), body


def worker_loop(args, host, port, token, prefix, index, deadline, stats):
    client = Client(host, port, token, args.timeout)
    iteration = 0
    while time.monotonic() < deadline and stats.take_request_slot(args.max_requests):
        shard_id = f"{prefix}-{index}-{iteration}"
        iteration += 1
        request = {"model": args.model, "gpu": args.gpu, "shard_id": shard_id}
        if args.format:
            request["format"] = args.format
        status, body, elapsed = client.request("POST", "/v1/shards", request)
        if not stats.record("commit", status, body, elapsed, 201):
            if status == 507:
                time.sleep(0.01)  # full: let other clients evict
            continue
        status, body, elapsed = client.request("POST", f"/v1/shards/{shard_id}/verify", {})
        stats.record("verify", status, body, elapsed, 200)
        nonce = secrets.token_hex(32)
        status, body, elapsed = client.request(
            "POST", f"/v1/shards/{shard_id}/attest", {"nonce": nonce}
        )
        if stats.record("attest", status, body, elapsed, 200):
            # A DSSE envelope: the statement is the base64 payload (its signature is checked offline
            # with `vram-residency attest verify --public-key`; here only its content).
            try:
                predicate = json.loads(base64.b64decode(body.get("payload", "")))["predicate"]
            except (ValueError, KeyError, TypeError):
                predicate = {}
            if predicate.get("nonce") != nonce or predicate.get("verification", {}).get("result") != "verified":
                with stats.lock:
                    stats.errors["attest wrong content"] = stats.errors.get("attest wrong content", 0) + 1
        status, body, elapsed = client.request("DELETE", f"/v1/shards/{shard_id}")
        stats.record("evict", status, body, elapsed, 200)
        with stats.lock:
            stats.iterations += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8470")
    parser.add_argument(
        "--api-token-file",
        help="file holding an operator API token (first non-blank, non-# line); else $VRAM_RESIDENCY_API_TOKEN",
    )
    parser.add_argument("--model", required=True, help="model path relative to the server's models dir")
    parser.add_argument(
        "--format",
        choices=["auto", "raw", "gguf", "safetensors"],
        help="the commit's format field (default: left out, i.e. auto); random bytes (as "
        "--create-model writes) almost never claim a model format, pass raw to be sure",
    )
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (max 3600)")
    parser.add_argument("--max-requests", type=int, default=100000)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--create-model", type=int, metavar="SIZE", help="write a random model of SIZE bytes first")
    parser.add_argument("--models-dir", help="the server's models directory (with --create-model)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()

    if not 0 < args.duration <= MAX_DURATION_S:
        sys.exit(f"load-test: --duration must be in (0, {MAX_DURATION_S}]")
    if not 1 <= args.clients <= 256:
        sys.exit("load-test: --clients must be 1..256")
    if args.max_requests < 1:
        sys.exit("load-test: --max-requests must be >= 1")
    url = urllib.parse.urlparse(args.url)
    if url.scheme != "http" or not url.hostname:
        sys.exit("load-test: --url must be http://HOST:PORT")
    loopback_only(url.hostname)
    port = url.port or 80
    token = api_token(args.api_token_file)
    if args.create_model:
        if not args.models_dir:
            sys.exit("load-test: --create-model needs --models-dir")
        path = os.path.join(args.models_dir, args.model)
        with open(path, "wb") as f:
            remaining = args.create_model
            while remaining:
                chunk = min(remaining, 1 << 20)
                f.write(os.urandom(chunk))
                remaining -= chunk

    control = Client(url.hostname, port, token, args.timeout)
    before, worker = used_bytes(control)
    prefix = "load-" + secrets.token_hex(4)
    # An observer token reads fine but may not commit or evict: find out before starting the clients.
    status, _, _ = control.request("DELETE", f"/v1/shards/{prefix}-probe")
    if status == 403:
        sys.exit("load-test: the API token has the observer role; commit and evict need an operator token")
    stats = Stats()
    started = time.monotonic()
    deadline = started + args.duration
    threads = [
        threading.Thread(
            target=worker_loop,
            args=(args, url.hostname, port, token, prefix, i, deadline, stats),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        # Each loop stops at the deadline; one iteration may still be finishing.
        t.join(timeout=args.duration + 4 * args.timeout + 10)
    wall = time.monotonic() - started
    hung = sum(t.is_alive() for t in threads)

    # Evict anything this run left behind (a failed evict, say), so VRAM returns to its start.
    status, body, _ = control.request("GET", "/v1/shards")
    leftovers = [s["shard_id"] for s in (body or {}).get("shards", []) if s["shard_id"].startswith(prefix)]
    for shard_id in leftovers:
        control.request("DELETE", f"/v1/shards/{shard_id}")
    after, worker_after = used_bytes(control)

    ops = {}
    for op in OPS:
        values = stats.latency[op]
        ops[op] = {
            "ok": len(values),
            "p50_ms": None if not values else round(percentile(values, 50) * 1000, 3),
            "p90_ms": None if not values else round(percentile(values, 90) * 1000, 3),
            "p99_ms": None if not values else round(percentile(values, 99) * 1000, 3),
            "max_ms": None if not values else round(max(values) * 1000, 3),
        }
    summary = {
        "target": args.url,
        "backend": worker.get("backend"),
        "model": args.model,
        "clients": args.clients,
        "duration_s": round(wall, 3),
        "requests": stats.requests,
        "cycles": stats.iterations,
        "requests_per_s": round(stats.requests / wall, 2) if wall else None,
        "cycles_per_s": round(stats.iterations / wall, 2) if wall else None,
        "operations": ops,
        "errors": stats.errors,
        "commits_refused_for_capacity": stats.capacity_refusals,
        "leftover_shards_evicted": len(leftovers),
        "hung_clients": hung,
        "used_vram_bytes_before": before,
        "used_vram_bytes_after": after,
        "used_vram_returned": before == after,
        "worker_state_after": worker_after.get("state"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"target {summary['target']} (backend {summary['backend']}), model {args.model}, "
              f"{args.clients} clients, {summary['duration_s']} s")
        print(f"requests {stats.requests} ({summary['requests_per_s']}/s), "
              f"commit-verify-attest-evict cycles {stats.iterations} ({summary['cycles_per_s']}/s)")
        print(f"{'op':8} {'ok':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        for op, s in ops.items():
            cells = [f"{s[k]:9.3f}" if s[k] is not None else f"{'-':>9}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
            print(f"{op:8} {s['ok']:7d} " + " ".join(cells))
        print(f"errors: {stats.errors if stats.errors else 'none'}")
        print(f"commits refused for capacity (507): {stats.capacity_refusals}")
        print(f"used VRAM: before {before} bytes, after {after} bytes -> "
              f"{'returned to start' if before == after else 'DID NOT RETURN'}"
              f"{f' ({len(leftovers)} leftover shard(s) evicted at the end)' if leftovers else ''}")
        print(f"worker state after: {summary['worker_state_after']}")
    failed = stats.errors or before != after or hung or summary["worker_state_after"] != "running"
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
