// fsverity.cu — SHA-256 of 4096-byte blocks, one thread per block, for
// building fs-verity Merkle trees of VRAM-resident data.
//
// ALGORITHM
//   fsverity_hash_blocks(data, data_len, out) splits data[0, data_len) into
//   4096-byte blocks; block i = bytes [4096*i, min(4096*(i+1), data_len)),
//   the last one zero-padded to 4096 bytes (bytes at or beyond data_len are
//   never read).  It writes SHA-256(block i) (32 bytes, standard big-endian
//   digest byte order, == hashlib.sha256(block).digest()) to
//   out[32*i, 32*i+32).  nblocks = ceil(data_len / 4096).
//
//   Every hashed message is exactly 4096 bytes (the partial tail block is
//   zero padded to 4096 before hashing, as fs-verity requires), so every
//   SHA-256 is 64 data compressions followed by one *constant* padding
//   block: 0x80, 55 zero bytes, and the 64-bit big-endian bit length 32768.
//   That block's whole 64-word message schedule is constant, so W[t]+K[t]
//   is precomputed (PAD_WK below) and its compression skips the schedule.
//
//   The same kernel serves every level of the Merkle tree: level 0 hashes
//   the data; level k+1 hashes level k's output, an array of 32-byte hashes
//   (128 per 4096-byte block, last block zero padded), i.e. call it again
//   with data = previous out and data_len = 32 * count, until one hash
//   remains (a single-block input's hash is the root).
//
// IMPLEMENTATION
//   * Full blocks (4096*(i+1) <= data_len), i.e. all but possibly the last:
//     16-byte __ldg loads (read-only path), four per 64-byte chunk; the next
//     chunk's four loads are issued before the current chunk is compressed,
//     so memory latency overlaps compute.  Words are converted to big-endian
//     with __byte_perm(x, 0, 0x0123), rotations use __funnelshift_r
//     (SHF), Ch/Maj are written as single LOP3 expressions, and the round
//     additions go through IMAD (FMA pipe) to offload the integer ALU pipe
//     (see "Pipe balancing" below: +9% measured).
//   * 64 rounds are fully written out (macros below); the 16-word message
//     schedule rolls through 16 scalar registers w0..w15 (no arrays, no
//     local memory).  K constants are immediates.
//   * The tail block (at most one per launch, only if data_len % 4096 != 0)
//     uses byte-wise bounds-checked loads with zero fill, then the same
//     compression code (no separate copy of the rounds: code stays small).
//   * Digest store: two aligned 16-byte stores per thread.
//
// LAUNCH CONTRACT
//   extern "C" __global__ void fsverity_hash_blocks(
//       const u8* __restrict__ data, u64 data_len, u8* __restrict__ out);
//   * blockDim.x <= 256 (__launch_bounds__(256)); 256 recommended, 1-D.
//     70 registers, no local memory (nvcc 13.5, sm_90) -> 3 CTAs/SM.
//   * Any gridDim.x >= 1 works (grid-stride loop over blocks); for full
//     occupancy use e.g. min(ceil(nblocks/256), SMs * blocks-per-SM).
//   * data: 16-byte aligned for fsverity_hash_blocks (cuMemAlloc gives
//     256), 8-byte aligned for fsverity_hash_blocks_a8 (same contract
//     otherwise; 8-byte loads on the fast path).  out: 16-byte
//     aligned at least (32 recommended), room for 32*ceil(data_len/4096)
//     bytes; out must not overlap data.  data_len == 0 -> no output.
//   * All indices are 64-bit: data_len may be far beyond 4 GiB.
//   * Compile with NVRTC, e.g. --gpu-architecture=compute_90 (any >= 3.5
//     works: __ldg, __byte_perm, __funnelshift_r).  No #includes needed.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

#define FSV_BLOCK_SIZE 4096ull

// ---- SHA-256 primitives ----------------------------------------------------

// Pipe balancing.  On sm_80+ IADD3/LOP3/SHF/PRMT all issue to the integer
// ALU pipe (16 lanes per SM sub-partition), which a plain SHA-256 saturates
// while the FMA pipe idles.  IMAD runs on the FMA pipe, so some additions
// are written as mad.lo(x, one, y) (and some shifts/rotates as mul.hi /
// mad.lo by 2^k), with 'one' a run-time 1 the compilers cannot fold.
// Tuning knobs (defaults chosen by measurement on an H100 80GB HBM3, 8 GiB
// input, 256 threads/CTA, NVRTC compute_90; all variants bit-exact):
//   defaults (ADDS=2, rest 0): 67 regs, no local memory, ~875 GB/s
//   all knobs 0 (plain C adds):                           ~800 GB/s
//   ADDS=1: 830; ADDS=2 + SCHED=1: 832; + SHR_MULHI: 742; + ROT_MAD: ~700;
//   __launch_bounds__(256, 4) (64 regs): 810 -- more warps did not help.
// Re-measured on an H200 (2026-12-03; 16 GiB, one launch alone, PTX through
// the driver's JIT as the backend loads it; best of 8 launches):
//   defaults 881 (887 with 'one' in constant memory, below); SCHED=1: 837
//   (859 with the constant 'one'); SCHED=1 + ROT_MAD=1: 721; SCHED=1 + ROT_MAD=2: 753;
//   SCHED=1 + SHR_MULHI: 746; SCHED=1 + ROT_MAD=1 + SHR_MULHI: 700;
//   (256, 4): 818; SCHED=1 + (256, 4): 722.
//   ncu of the defaults (1 GiB): integer ALU pipe 91.7 % busy, FMA-heavy
//   pipe 43.5 %, issue slots 67.9 %.  Every variant that moved more work to
//   the FMA pipe lost (IMAD.HI is slower than SHF; more IMADs lengthen the
//   round's dependency chain), so this kernel is bound by the ALU pipe at
//   about 0.89 TB/s on the H200.
//   FSV_MAD_ADDS  0: plain adds  1: T1 and d via IMAD  2: all round adds via IMAD
//   FSV_MAD_SCHED 0/1: message-schedule adds (and +K) via IMAD
//   FSV_SHR_MULHI 0/1: the >>3 and >>10 of s0/s1 via mul.hi
//   FSV_ROT_MAD   0/1/2: rotates per round done as mul.hi + mad.lo
#ifndef FSV_MAD_ADDS
#define FSV_MAD_ADDS 2
#endif
#ifndef FSV_MAD_SCHED
#define FSV_MAD_SCHED 0
#endif
#ifndef FSV_SHR_MULHI
#define FSV_SHR_MULHI 0
#endif
#ifndef FSV_ROT_MAD
#define FSV_ROT_MAD 0
#endif

__device__ __forceinline__ u32 mad_lo(u32 a, u32 b, u32 c)
{
#ifdef __CUDA_ARCH__
    u32 r;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    return a * b + c;
#endif
}
__device__ __forceinline__ u32 mul_hi(u32 a, u32 b)
{
#ifdef __CUDA_ARCH__
    u32 r;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
#else
    return (u32)(((u64)a * b) >> 32);
#endif
}

// Constants the code needs at run time: one == 1, p<k> == 2^k.
struct Consts { u32 one, p29, p22, p7, p10; };
// The run-time 1 lives in constant memory: an IMAD then takes it as a constant-bank operand and
// reads two registers instead of three (fewer register-bank conflicts).  Measured on the H200
// (2026-12-03, 16 GiB, alone): 887 GB/s against 881 with 'one' in a register; with the schedule
// additions also on IMAD, 859 against 836.  No compiler can fold it: constant memory is writable
// from the host.
__constant__ u32 fsv_one = 1u;

#define ROTR(x, n) __funnelshift_r((x), (x), (n))
// rotr(x, n) == (x >> n) + (x << (32-n)) == mulhi(x, 2^(32-n)) + x * 2^(32-n)
#define ROTR_MAD(x, p) mad_lo((x), (p), mul_hi((x), (p)))
#if FSV_ROT_MAD >= 1
#define BSIG1(x) (ROTR((x), 6) ^ ROTR((x), 11) ^ ROTR_MAD((x), K_.p7))
#else
#define BSIG1(x) (ROTR((x), 6) ^ ROTR((x), 11) ^ ROTR((x), 25))
#endif
#if FSV_ROT_MAD >= 2
#define BSIG0(x) (ROTR((x), 2) ^ ROTR((x), 13) ^ ROTR_MAD((x), K_.p10))
#else
#define BSIG0(x) (ROTR((x), 2) ^ ROTR((x), 13) ^ ROTR((x), 22))
#endif
#if FSV_SHR_MULHI
#define SSIG0(x) (ROTR((x), 7) ^ ROTR((x), 18) ^ mul_hi((x), K_.p29))
#define SSIG1(x) (ROTR((x), 17) ^ ROTR((x), 19) ^ mul_hi((x), K_.p22))
#else
#define SSIG0(x) (ROTR((x), 7) ^ ROTR((x), 18) ^ ((x) >> 3))
#define SSIG1(x) (ROTR((x), 17) ^ ROTR((x), 19) ^ ((x) >> 10))
#endif
#define CH(e, f, g) ((g) ^ ((e) & ((f) ^ (g))))       // one LOP3
#define MAJ(a, b, c) (((a) & (b)) | ((c) & ((a) | (b)))) // one LOP3

#if FSV_MAD_ADDS >= 1
#define ADD_T(x, y) mad_lo((x), K_.one, (y))
#else
#define ADD_T(x, y) ((x) + (y))
#endif
#if FSV_MAD_ADDS >= 2
#define ADD_A(x, y) mad_lo((x), K_.one, (y))
#else
#define ADD_A(x, y) ((x) + (y))
#endif
#if FSV_MAD_SCHED
#define ADD_S(x, y) mad_lo((x), K_.one, (y))
#define ADD_K(w, k) mad_lo(K_.one, (k), (w))
#else
#define ADD_S(x, y) ((x) + (y))
#define ADD_K(w, k) ((w) + (k))
#endif

// One round.  x = W[t] + K[t].  The caller rotates the variable names, so
// the new 'a' lands in h and the new 'e' in d.
#define RND(a, b, c, d, e, f, g, h, x)                                          \
    {                                                                           \
        const u32 t1_ = ADD_T(ADD_T(ADD_T((h), (x)), CH((e), (f), (g))), BSIG1(e)); \
        (d) = ADD_T((d), t1_);                                                  \
        (h) = ADD_A(ADD_A(t1_, BSIG0(a)), MAJ((a), (b), (c)));                  \
    }

// Eight rounds (one full rotation of the names a..h).
#define R8(x0, x1, x2, x3, x4, x5, x6, x7)   \
    RND(a, b, c, d, e, f, g, h, x0)          \
    RND(h, a, b, c, d, e, f, g, x1)          \
    RND(g, h, a, b, c, d, e, f, x2)          \
    RND(f, g, h, a, b, c, d, e, x3)          \
    RND(e, f, g, h, a, b, c, d, x4)          \
    RND(d, e, f, g, h, a, b, c, x5)          \
    RND(c, d, e, f, g, h, a, b, x6)          \
    RND(b, c, d, e, f, g, h, a, x7)

// Rolling schedule: W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16],
// stored in place of W[t-16] (register w(t mod 16)).  Evaluates to W[t].
#define SX(wi, wm2, wm7, wm15) ((wi) = ADD_S(ADD_S(ADD_S((wi), (wm7)), SSIG1(wm2)), SSIG0(wm15)))

// Rounds t = 16j + 0..7 (j >= 1) and 16j + 8..15, schedule included.
#define R8_LO(k0, k1, k2, k3, k4, k5, k6, k7)                                    \
    R8(ADD_K(SX(w0, w14, w9, w1), k0), ADD_K(SX(w1, w15, w10, w2), k1),                 \
       ADD_K(SX(w2, w0, w11, w3), k2), ADD_K(SX(w3, w1, w12, w4), k3),                  \
       ADD_K(SX(w4, w2, w13, w5), k4), ADD_K(SX(w5, w3, w14, w6), k5),                  \
       ADD_K(SX(w6, w4, w15, w7), k6), ADD_K(SX(w7, w5, w0, w8), k7))
#define R8_HI(k0, k1, k2, k3, k4, k5, k6, k7)                                    \
    R8(ADD_K(SX(w8, w6, w1, w9), k0), ADD_K(SX(w9, w7, w2, w10), k1),                   \
       ADD_K(SX(w10, w8, w3, w11), k2), ADD_K(SX(w11, w9, w4, w12), k3),                \
       ADD_K(SX(w12, w10, w5, w13), k4), ADD_K(SX(w13, w11, w6, w14), k5),              \
       ADD_K(SX(w14, w12, w7, w15), k6), ADD_K(SX(w15, w13, w8, w0), k7))

// SHA-256 compression of one 64-byte chunk given as 16 big-endian words.
__device__ __forceinline__ void sha256_compress(
    const Consts& K_, u32 (&st)[8],
    u32 w0, u32 w1, u32 w2, u32 w3, u32 w4, u32 w5, u32 w6, u32 w7,
    u32 w8, u32 w9, u32 w10, u32 w11, u32 w12, u32 w13, u32 w14, u32 w15)
{
    (void)K_; // unused in some FSV_* configurations
    u32 a = st[0], b = st[1], c = st[2], d = st[3];
    u32 e = st[4], f = st[5], g = st[6], h = st[7];

    R8(ADD_K(w0, 0x428a2f98u), ADD_K(w1, 0x71374491u), ADD_K(w2, 0xb5c0fbcfu), ADD_K(w3, 0xe9b5dba5u),
       ADD_K(w4, 0x3956c25bu), ADD_K(w5, 0x59f111f1u), ADD_K(w6, 0x923f82a4u), ADD_K(w7, 0xab1c5ed5u))
    R8(ADD_K(w8, 0xd807aa98u), ADD_K(w9, 0x12835b01u), ADD_K(w10, 0x243185beu), ADD_K(w11, 0x550c7dc3u),
       ADD_K(w12, 0x72be5d74u), ADD_K(w13, 0x80deb1feu), ADD_K(w14, 0x9bdc06a7u), ADD_K(w15, 0xc19bf174u))
    R8_LO(0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu,
          0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau)
    R8_HI(0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
          0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u)
    R8_LO(0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u,
          0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u)
    R8_HI(0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u,
          0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u)
    R8_LO(0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u,
          0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u)
    R8_HI(0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u,
          0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u)

    st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

// Compression of the constant final block of a 4096-byte message:
// 0x80 00..00 | 00000000 00008000 (bit length 32768).  Each argument is the
// precomputed W[t] + K[t] (mod 2^32) of that block's schedule, derived by:
//   W = [0x80000000] + [0]*14 + [32768]
//   for t in 16..63: W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16]
//   PAD_WK[t] = (W[t] + K[t]) & 0xffffffff
// (verified bit-for-bit against hashlib; see the commit message).
__device__ __forceinline__ void sha256_compress_pad4096(const Consts& K_, u32 (&st)[8])
{
    (void)K_; // unused in some FSV_* configurations
    u32 a = st[0], b = st[1], c = st[2], d = st[3];
    u32 e = st[4], f = st[5], g = st[6], h = st[7];

    R8(0xc28a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u,
       0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u)
    R8(0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u,
       0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19c7174u)
    R8(0x649b69c1u, 0x3fbe47a6u, 0x0fe1edc6u, 0x240cc3ccu,
       0x4fe9346fu, 0x5fb484b2u, 0x61b9bf1eu, 0xf6f9e0e2u)
    R8(0x904651d2u, 0xcf776683u, 0xb071aacdu, 0x45598de9u,
       0x6e024795u, 0xe1a53a4cu, 0x01579c54u, 0x7ed2a5d2u)
    R8(0x5543dff8u, 0x24306163u, 0xcbe96064u, 0x088b74ddu,
       0x8cef495fu, 0x27644e60u, 0xfa4494c7u, 0xc85ad905u)
    R8(0xae229301u, 0x3cc6aca8u, 0xced0f30eu, 0x0054346du,
       0xaa185a78u, 0xbf2f214au, 0xc070f8f5u, 0x2bfa9c81u)
    R8(0x2ee7c2f3u, 0x060f5920u, 0x19f02ca9u, 0xf4d1cc5cu,
       0x4368bd9bu, 0xc154267au, 0xec10f2efu, 0xf0bf5abdu)
    R8(0xb1561710u, 0xcc85b5a6u, 0x55e9155cu, 0xeb7ba3e0u,
       0x0f037e93u, 0x2ae3e945u, 0xa2affabfu, 0x694563d1u)

    st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

// ---- loads -------------------------------------------------------------------

__device__ __forceinline__ u32 bswap32(u32 x) { return __byte_perm(x, 0u, 0x0123u); }

// Little-endian 32-bit word at data[off..off+4), bytes at or beyond len
// read as zero (tail block only).
__device__ __forceinline__ u32 load_le32_tail(const u8* __restrict__ data, u64 len, u64 off)
{
    u32 v = 0u;
#pragma unroll
    for (u32 k = 0; k < 4u; ++k) {
        if (off + k < len) v |= (u32)data[off + k] << (8u * k);
    }
    return v;
}

__device__ __forceinline__ uint4 load_v4_tail(const u8* __restrict__ data, u64 len, u64 off)
{
    uint4 r;
    r.x = load_le32_tail(data, len, off);
    r.y = load_le32_tail(data, len, off + 4u);
    r.z = load_le32_tail(data, len, off + 8u);
    r.w = load_le32_tail(data, len, off + 12u);
    return r;
}

// Load 64-byte chunk number 'chunk' (0..63) of the block at byte offset base.
// Fast path: four 16-byte read-only loads (ALIGN16, data 16-byte aligned) or
// eight 8-byte ones (data only 8-byte aligned: a file image placed so that
// its data section, not its first byte, is aligned).  Tail path:
// bounds-checked bytes.
template <bool ALIGN16>
__device__ __forceinline__ void load_chunk(
    bool full, const u8* __restrict__ data, u64 len, u64 base, u32 chunk,
    uint4& q0, uint4& q1, uint4& q2, uint4& q3)
{
    const u64 off = base + 64ull * chunk;
    if (full) {
        if (ALIGN16) {
            const uint4* p = reinterpret_cast<const uint4*>(data + off);
            q0 = __ldg(p + 0);
            q1 = __ldg(p + 1);
            q2 = __ldg(p + 2);
            q3 = __ldg(p + 3);
        } else {
            const uint2* p = reinterpret_cast<const uint2*>(data + off);
            const uint2 a = __ldg(p + 0), b = __ldg(p + 1), c = __ldg(p + 2), d = __ldg(p + 3);
            const uint2 e = __ldg(p + 4), f = __ldg(p + 5), g = __ldg(p + 6), h = __ldg(p + 7);
            q0 = make_uint4(a.x, a.y, b.x, b.y);
            q1 = make_uint4(c.x, c.y, d.x, d.y);
            q2 = make_uint4(e.x, e.y, f.x, f.y);
            q3 = make_uint4(g.x, g.y, h.x, h.y);
        }
    } else {
        q0 = load_v4_tail(data, len, off);
        q1 = load_v4_tail(data, len, off + 16u);
        q2 = load_v4_tail(data, len, off + 32u);
        q3 = load_v4_tail(data, len, off + 48u);
    }
}

// ---- kernel --------------------------------------------------------------------

#ifndef FSV_MIN_BLOCKS_PER_SM
#define FSV_MIN_BLOCKS_PER_SM 1
#endif
template <bool ALIGN16>
__device__ __forceinline__ void hash_blocks(const u8* __restrict__ data, u64 data_len, u8* __restrict__ out)
{
    const u64 nblocks = data_len / FSV_BLOCK_SIZE + ((data_len % FSV_BLOCK_SIZE) != 0ull ? 1ull : 0ull);

    // Run-time constants (see "Pipe balancing"); one == 1, but no compiler can prove it.
    Consts K_;
    K_.one = fsv_one;
    K_.p29 = K_.one << 29;
    K_.p22 = K_.one << 22;
    K_.p7 = K_.one << 7;
    K_.p10 = K_.one << 10;

    for (u64 blk = blockIdx.x * (u64)blockDim.x + threadIdx.x; blk < nblocks;
         blk += (u64)gridDim.x * blockDim.x) {
        const u64 base = blk * FSV_BLOCK_SIZE;
        const bool full = (data_len - base) >= FSV_BLOCK_SIZE; // base < data_len here

        u32 st[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                     0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};

        uint4 n0, n1, n2, n3;
        load_chunk<ALIGN16>(full, data, data_len, base, 0u, n0, n1, n2, n3);

#pragma unroll 1
        for (u32 chunk = 0; chunk < 64u; ++chunk) {
            const uint4 c0 = n0, c1 = n1, c2 = n2, c3 = n3;
            // Prefetch the next chunk before compressing this one.  On the
            // last chunk this re-reads chunk 63 (an L1 hit) instead of
            // branching.
            const u32 next = chunk < 63u ? chunk + 1u : 63u;
            load_chunk<ALIGN16>(full, data, data_len, base, next, n0, n1, n2, n3);

            sha256_compress(K_, st,
                            bswap32(c0.x), bswap32(c0.y), bswap32(c0.z), bswap32(c0.w),
                            bswap32(c1.x), bswap32(c1.y), bswap32(c1.z), bswap32(c1.w),
                            bswap32(c2.x), bswap32(c2.y), bswap32(c2.z), bswap32(c2.w),
                            bswap32(c3.x), bswap32(c3.y), bswap32(c3.z), bswap32(c3.w));
        }
        sha256_compress_pad4096(K_, st);

        uint4 d0, d1;
        d0.x = bswap32(st[0]); d0.y = bswap32(st[1]); d0.z = bswap32(st[2]); d0.w = bswap32(st[3]);
        d1.x = bswap32(st[4]); d1.y = bswap32(st[5]); d1.z = bswap32(st[6]); d1.w = bswap32(st[7]);
        uint4* o = reinterpret_cast<uint4*>(out + blk * 32ull);
        o[0] = d0;
        o[1] = d1;
    }
}

// data 16-byte aligned (every tree level; a data pass over an image without padding).
extern "C" __global__ void __launch_bounds__(256, FSV_MIN_BLOCKS_PER_SM)
fsverity_hash_blocks(const u8* __restrict__ data, u64 data_len, u8* __restrict__ out)
{
    hash_blocks<true>(data, data_len, out);
}

// data only 8-byte aligned (a file image padded so that its data section is aligned).
extern "C" __global__ void __launch_bounds__(256, FSV_MIN_BLOCKS_PER_SM)
fsverity_hash_blocks_a8(const u8* __restrict__ data, u64 data_len, u8* __restrict__ out)
{
    hash_blocks<false>(data, data_len, out);
}
