#!/usr/bin/env python3
"""Timings of the fs-verity kernel and of tree-level layouts on a GPU, with cupy and NVRTC.

Not a test and not part of `bench`: a measurement aid for the verify path (issue 10). It compiles
crates/vram-residency-cuda/src/kernels/fsverity.cu as is and times, with CUDA events, on a 16 GiB
device buffer: the data pass alone, a 1 GiB / 16 GiB tree in four windows on two streams (as
tree.rs did before the upper levels moved to the host), in one window, with a latency-tuned build
for the levels, and with the levels above level 1 on the CPU; and the time of one tree level of
1, 16 and 2048 blocks. Prints JSON (GB/s, or microseconds for `level_*`).

    python3 scripts/gpu-tree-timings.py crates/vram-residency-cuda/src/kernels/fsverity.cu
"""
import sys, time, json, hashlib
import cupy as cp, numpy as np
src = open(sys.argv[1]).read()
sms = cp.cuda.Device(0).attributes['MultiProcessorCount']
def build(defs):
    m = cp.RawModule(code=src, options=('--std=c++17', '-arch=sm_90') + tuple(f'-D{d}' for d in defs))
    return m.get_function('fsverity_hash_blocks')
tput = build([])
lat = build(["FSV_MAD_ADDS=0"])
big = (cp.arange(2<<30, dtype=cp.uint64) * cp.uint64(0x9E3779B97F4A7C15)).view(cp.uint8)
scratch = cp.empty(1<<30, dtype=cp.uint8)
def launch(fn, stream, src_ptr, n, dst):
    nb = (n + 4095)//4096
    fn(((nb+255)//256,), (256,), (src_ptr, cp.uint64(n), dst), stream=stream)
def levels(fn, stream, n_hashes_bytes, src, upto=32):
    # hash levels until one hash remains; returns list of sizes
    cur, n, dst = src, n_hashes_bytes, None
    bufs = [scratch[512<<20:], scratch[768<<20:]]
    i = 0
    while n > 32:
        out = bufs[i % 2]
        launch(fn, stream, cur, n, out)
        n = ((n + 4095)//4096)*32
        cur = out; i += 1
    return i
def one_window(size, fn_lv, cpu_tail=False):
    s = cp.cuda.Stream(non_blocking=True)
    a, b = cp.cuda.Event(), cp.cuda.Event()
    with s:
        a.record(s)
        launch(tput, s, big, size, scratch)
        h = ((size + 4095)//4096)*32
        launch(fn_lv, s, scratch, h, scratch[256<<20:])
        h1 = ((h + 4095)//4096)*32
        if cpu_tail:
            host = cp.asnumpy(scratch[256<<20:(256<<20)+h1], stream=s)
            s.synchronize()
            # CPU upper levels
            data = host.tobytes()
            while len(data) > 32:
                blocks = [data[i:i+4096].ljust(4096, b'\0') for i in range(0, len(data), 4096)]
                data = b''.join(hashlib.sha256(x).digest() for x in blocks)
        else:
            levels(fn_lv, s, h1, scratch[256<<20:])
        b.record(s)
        b.synchronize()
    return cp.cuda.get_elapsed_time(a, b)/1e3
def windows(size, count):
    s = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    w = size // count
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record(s[0])
    for st in s[1:]: st.wait_event(a)
    for k in range(count):
        st = s[k % 2]
        launch(tput, st, big[k*w:], w, scratch[(k%2)*(128<<20):])
        launch(tput, st, scratch[(k%2)*(128<<20):], (w//4096)*32, scratch[(256<<20) + k*(w//4096//128)*32:])
    e = cp.cuda.Event(); e.record(s[1]); s[0].wait_event(e)
    levels(tput, s[0], (size//4096//128)*32, scratch[256<<20:])
    b.record(s[0]); b.synchronize()
    return cp.cuda.get_elapsed_time(a, b)/1e3
res = {}
s0 = cp.cuda.Stream(non_blocking=True)
for size in (1<<30, 16<<30):
    ts = []
    for _ in range(5):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(s0); launch(tput, s0, big, size, scratch); b.record(s0); b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    res[f"{size>>30}GiB_data_pass_alone"] = round(size / min(ts) / 1e9, 1)
for size in (1<<30, 16<<30):
    for name, f in [("windows4", lambda: windows(size, 4)), ("one_window", lambda: one_window(size, tput)),
                    ("one_window_latkernel", lambda: one_window(size, lat)),
                    ("one_window_cpu_tail", lambda: one_window(size, lat, True))]:
        f()
        t = min(f() for _ in range(5))
        res[f"{size>>30}GiB_{name}"] = round(size/t/1e9, 1)
    # kernel alone and a single tiny level (latency of one 4 KiB hash per thread)
s = cp.cuda.Stream(non_blocking=True)
for n in (4096, 64<<10, 8<<20):
    a, b = cp.cuda.Event(), cp.cuda.Event()
    for fn, nm in ((tput, "tput"), (lat, "lat")):
        ts = []
        for _ in range(5):
            a.record(s); launch(fn, s, big, n, scratch); b.record(s); b.synchronize(); ts.append(cp.cuda.get_elapsed_time(a, b)*1e3)
        res[f"level_{n>>10}KiB_{nm}_us"] = round(min(ts), 1)
print(json.dumps(res, indent=0))
