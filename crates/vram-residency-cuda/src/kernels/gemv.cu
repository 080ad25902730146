// gemv.cu — the victim of `vram-residency bench --interference`: a memory-bound bf16 GEMV shaped
// like a decode step (y = W x, W rows x cols bf16 row-major, x cols bf16, y rows f32), launched as
// cuBLAS launches GEMV: many blocks in many waves (one warp per row, 8 rows per 256-thread block),
// not one persistent grid-stride wave.
//
//   gemv_bf16(const uint4* w, const uint4* x, float* y, u64 rows, u32 vecs_per_row)
//   grid = ceil(rows / 8), block = 256; vecs_per_row = cols / 8 (16-byte vectors of 8 bf16).

typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

extern "C" __global__ void __launch_bounds__(256)
gemv_bf16(const uint4* __restrict__ w, const uint4* __restrict__ x, float* __restrict__ y,
          u64 rows, u32 vecs_per_row)
{
    const u64 row = (u64)blockIdx.x * 8ull + (threadIdx.x >> 5);
    const u32 lane = threadIdx.x & 31u;
    if (row >= rows) return;
    const uint4* r = w + row * (u64)vecs_per_row;
    float acc = 0.0f;
    for (u32 i = lane; i < vecs_per_row; i += 32u) {
        const uint4 a = __ldg(r + i);
        const uint4 b = __ldg(x + i);
        acc += bf16_lo(a.x) * bf16_lo(b.x) + bf16_hi(a.x) * bf16_hi(b.x)
             + bf16_lo(a.y) * bf16_lo(b.y) + bf16_hi(a.y) * bf16_hi(b.y)
             + bf16_lo(a.z) * bf16_lo(b.z) + bf16_hi(a.z) * bf16_hi(b.z)
             + bf16_lo(a.w) * bf16_lo(b.w) + bf16_hi(a.w) * bf16_hi(b.w);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    if (lane == 0u) y[row] = acc;
}
