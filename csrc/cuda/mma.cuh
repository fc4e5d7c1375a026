// Warp-level tensor-core building blocks (sm_80+): cp.async tile loads, ldmatrix, mma.sync
// m16n8k16 with fp32 accumulation, and the tile geometry shared by the attention kernels.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major), 4 x b32: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 8+2t..), a3 = (g+8, 8+2t..)
//   B (16x8, "col"),      2 x b32: b0 = (k 2t..2t+1, n g), b1 = (k 8+2t.., n g)
//   C (16x8, fp32),       4 x f32: c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// So the C fragments of two adjacent 16x8 tiles are, once packed to 16 bits, the A fragment
// of a 16x16 tile: a score tile feeds the next product straight from registers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dalle3_fast {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i holds
// (row lane/4, cols 2*(lane%4)..+1) of matrix i (of its transpose with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one b32 of 16-bit values, `lo` in the low half (the lower column).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// A fragment of the 16x16 tile made of accumulator tiles c[0] (cols 0-7) and c[1] (cols 8-15).
template <class T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Shared-memory tile of `ROWS` rows of DP (head dim padded to 16) 16-bit elements. Rows are
// padded by 16 bytes: the row pitch is an odd number of 16-byte units, so the 8 row addresses
// of an ldmatrix phase fall in 8 distinct bank groups.
template <int DP>
struct TileGeom {
  static constexpr int kPitch = DP + 8;  // elements
  static constexpr int kChunks = DP / 8; // 16-byte chunks per row
  static_assert(DP % 16 == 0, "padded head dim must be a multiple of 16");
  static_assert((kPitch / 8) % 2 == 1, "row pitch must be an odd number of 16-byte units");
};

// Copies rows [row0, row0 + ROWS) of a (rows_total, H, D) slab (row stride `stride` elements)
// into a padded shared tile; rows >= row_limit and columns >= D are zero-filled.
template <class T, int ROWS, int D, int DP, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* __restrict__ gmem, int64_t stride, int row0,
                                                int row_limit) {
  using G = TileGeom<DP>;
  constexpr int kTotal = ROWS * G::kChunks;
#pragma unroll
  for (int i0 = 0; i0 < kTotal; i0 += NTHREADS) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    if (kTotal % NTHREADS == 0 || i < kTotal) {
      const int r = i / G::kChunks, c = i % G::kChunks;
      const bool valid = row0 + r < row_limit && c * 8 < D;
      const T* src = valid ? gmem + static_cast<int64_t>(row0 + r) * stride + c * 8 : gmem;
      cp_async_16(smem_addr(smem + r * G::kPitch + c * 8), src, valid);
    }
  }
}

// Address of this lane's row for an ldmatrix_x4 that yields the A fragment of the 16x16 block
// at (row0, col0) of a padded tile.
template <int DP>
__device__ __forceinline__ uint32_t a_frag_addr(const void* tile, int row0, int col0, int lane) {
  const int r = row0 + (lane & 15), c = col0 + (lane >> 4) * 8;
  return smem_addr(static_cast<const uint16_t*>(tile) + r * TileGeom<DP>::kPitch + c);
}
// ldmatrix_x4 (non-trans) of rows n0..n0+15 (the n index), cols k0..k0+15 (the k index) of a tile
// stored n-major: gives {b0, b1} of n-tile n0 in r[0], r[1] and of n-tile n0+8 in r[2], r[3].
template <int DP>
__device__ __forceinline__ uint32_t b_frag_addr(const void* tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + ((lane >> 4) << 3), c = k0 + ((lane >> 3) & 1) * 8;
  return smem_addr(static_cast<const uint16_t*>(tile) + r * TileGeom<DP>::kPitch + c);
}
// ldmatrix_x4_trans of rows k0..k0+15 (the k index), cols n0..n0+15 (the n index) of a tile
// stored k-major: gives {b0, b1} of n-tile n0 in r[0], r[1] and of n-tile n0+8 in r[2], r[3].
template <int DP>
__device__ __forceinline__ uint32_t bt_frag_addr(const void* tile, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + (lane >> 4) * 8;
  return smem_addr(static_cast<const uint16_t*>(tile) + r * TileGeom<DP>::kPitch + c);
}

// Writes a warp's 16 x DP fp32 accumulator rows (scaled by row_scale[0] for row g and
// row_scale[1] for row g+8) as T into rows row0.. of a padded tile.
template <class T, int DP>
__device__ __forceinline__ void acc_rows_to_smem(T* tile, int row0, const float (&acc)[DP / 8][4], float s_lo,
                                                 float s_hi, int lane) {
  const int g = lane >> 2, t = lane & 3;
  uint32_t* base = reinterpret_cast<uint32_t*>(tile);
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    base[((row0 + g) * TileGeom<DP>::kPitch + col) / 2] = pack2<T>(acc[nt][0] * s_lo, acc[nt][1] * s_lo);
    base[((row0 + g + 8) * TileGeom<DP>::kPitch + col) / 2] = pack2<T>(acc[nt][2] * s_hi, acc[nt][3] * s_hi);
  }
}

// Copies 16 rows of a padded tile (first D columns) to global rows row0.. (stride elements),
// skipping rows >= row_limit. One warp.
template <class T, int D, int DP>
__device__ __forceinline__ void smem_rows_to_global(T* __restrict__ gmem, int64_t stride, const T* tile, int trow0,
                                                    int row0, int row_limit, int lane) {
  constexpr int kChunks = D / 8;
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks, c = i % kChunks;
    if (row0 + r < row_limit) {
      *reinterpret_cast<uint4*>(gmem + static_cast<int64_t>(row0 + r) * stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + (trow0 + r) * TileGeom<DP>::kPitch + c * 8);
    }
  }
}

}  // namespace cuda
}  // namespace dalle3_fast
