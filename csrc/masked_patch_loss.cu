// masked_patch_loss forward (+ fused gradient) and the backward's grad_output scaling.
//
// Layout: pred, target, grad are [N, P] with unit stride along P and row strides sp, st, sg (elements).
// One warp owns one row. For a counted row it reads pred and target once, optionally normalises the target
// per row (t - mean) / sqrt(var_unbiased + eps), and writes
//     row_loss[row] = weight * sum_p (pred - t)^2 / (count * P)
//     grad[row, p]  = weight * 2 (pred - t) / (count * P)          (when write_grad)
// weight (1 by default) scales the loss inside the same pass (Stage 1's 0.1 * L_MAE costs no extra pass).
// A row that is not counted writes row_loss 0 and a zero gradient row without reading pred or target.
// count = number of counted rows (read from device memory, no host sync), clamped to >= 1.
//
// Rows of up to ITERS * 32 * VEC elements stay in registers (one read of each input); longer rows use a
// looped kernel that re-reads the target for the normalisation statistics.
//
// Variants of the register path (argument `variant` of masked_patch_loss_fwd; Python: impl="cuda:v2" ...):
//   1 (v1)  mpl_fwd_regs: one warp per row, one row per warp, then exit; ITERS rounded up to 1/2/4/6/8.
//   2 (v2)  mpl_fwd_persistent: a grid of at most (SMs x resident blocks) blocks whose warps walk rows
//           w, w + total_warps, ...; exact ITERS; packs stay 16-byte raw words until each value is used;
//           read-once streaming loads and stores; the counted flags of the next 32 rows come in one ballot.
//   3 (v2p) as 2, and each warp issues the loads of its next row before reducing the current one.
// Rows the register path cannot take (unaligned, P % VEC != 0, more than 8 packs per lane) use the looped
// kernel under every variant.
#include <map>
#include <mutex>
#include <utility>

#include "common.h"
#include "kernels.h"

namespace moca {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T, int VEC>
__device__ __forceinline__ void zero_row(T *g, int64_t P, int lane) {
  for (int64_t j = (int64_t)lane * VEC; j < P; j += 32 * VEC) {
    if (j + VEC <= P) {
      Pack<T, VEC> z;
#pragma unroll
      for (int e = 0; e < VEC; ++e) z.v[e] = from_float<T>(0.f);
      *reinterpret_cast<Pack<T, VEC> *>(g + j) = z;
    } else {
      for (int64_t e = j; e < P; ++e) g[e] = from_float<T>(0.f);
    }
  }
}

// Rows held in registers: ITERS packs of VEC elements per lane.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
mpl_fwd_regs(const T *__restrict__ pred, const T *__restrict__ target, const uint8_t *__restrict__ mask,
             const int *__restrict__ count_ptr, T *__restrict__ grad, float *__restrict__ row_loss, int64_t N,
             int64_t P, int64_t sp, int64_t st, int64_t sg, float eps, float weight, bool norm_pix,
             bool write_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);  // int64: N * P can pass 2^31
  if (row >= N) return;
  const float count = mask ? (float)max(*count_ptr, 1) : (float)N;
  const float inv = weight / (count * (float)P);  // weight: the loss's scale factor
  if (mask && mask[row] == 0) {
    if (write_grad) zero_row<T, VEC>(grad + row * sg, P, lane);
    if (lane == 0) row_loss[row] = 0.f;
    return;
  }
  const T *prow = pred + row * sp;
  const T *trow = target + row * st;
  Pack<T, VEC> pp[ITERS], tp[ITERS];
  // Issue every load before the first use.
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t j = ((int64_t)i * 32 + lane) * VEC;
    if (j < P) {  // P % VEC == 0 on this path
      pp[i] = *reinterpret_cast<const Pack<T, VEC> *>(prow + j);
      tp[i] = *reinterpret_cast<const Pack<T, VEC> *>(trow + j);
    }
  }
  float mean = 0.f, rstd = 1.f;
  if (norm_pix) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      if (((int64_t)i * 32 + lane) * VEC < P)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += to_float(tp[i].v[e]);
    mean = warp_sum(s) / (float)P;
    float s2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      if (((int64_t)i * 32 + lane) * VEC < P)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = to_float(tp[i].v[e]) - mean;
          s2 += d * d;
        }
    rstd = rsqrtf(warp_sum(s2) / (float)(P - 1) + eps);  // unbiased variance, as MAE
  }
  float acc = 0.f;
  T *grow = grad + row * sg;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t j = ((int64_t)i * 32 + lane) * VEC;
    if (j < P) {
      Pack<T, VEC> gp;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float t = norm_pix ? (to_float(tp[i].v[e]) - mean) * rstd : to_float(tp[i].v[e]);
        const float diff = to_float(pp[i].v[e]) - t;
        acc += diff * diff;
        gp.v[e] = from_float<T>(2.f * diff * inv);  // d/dpred of (pred - t)^2 / (count * P)
      }
      if (write_grad) *reinterpret_cast<Pack<T, VEC> *>(grow + j) = gp;
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) row_loss[row] = acc * inv;
}

// Any row length: statistics in one pass (sum) plus one (sum of squared deviations), then the loss pass.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
mpl_fwd_looped(const T *__restrict__ pred, const T *__restrict__ target, const uint8_t *__restrict__ mask,
               const int *__restrict__ count_ptr, T *__restrict__ grad, float *__restrict__ row_loss, int64_t N,
               int64_t P, int64_t sp, int64_t st, int64_t sg, float eps, float weight, bool norm_pix,
               bool write_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= N) return;
  const float count = mask ? (float)max(*count_ptr, 1) : (float)N;
  const float inv = weight / (count * (float)P);  // weight: the loss's scale factor
  if (mask && mask[row] == 0) {
    if (write_grad) zero_row<T, 1>(grad + row * sg, P, lane);
    if (lane == 0) row_loss[row] = 0.f;
    return;
  }
  const T *prow = pred + row * sp;
  const T *trow = target + row * st;
  float mean = 0.f, rstd = 1.f;
  if (norm_pix) {
    float s = 0.f;
    for (int64_t j = lane; j < P; j += 32) s += to_float(trow[j]);
    mean = warp_sum(s) / (float)P;
    float s2 = 0.f;
    for (int64_t j = lane; j < P; j += 32) {
      const float d = to_float(trow[j]) - mean;
      s2 += d * d;
    }
    rstd = rsqrtf(warp_sum(s2) / (float)(P - 1) + eps);
  }
  float acc = 0.f;
  T *grow = grad + row * sg;
  for (int64_t j = lane; j < P; j += 32) {
    const float t = norm_pix ? (to_float(trow[j]) - mean) * rstd : to_float(trow[j]);
    const float diff = to_float(prow[j]) - t;
    acc += diff * diff;
    if (write_grad) grow[j] = from_float<T>(2.f * diff * inv);
  }
  acc = warp_sum(acc);
  if (lane == 0) row_loss[row] = acc * inv;
}

// grad *= grad_output on counted rows. grad_output == 1 (the plain loss.backward()) returns at once; a
// non-finite grad_output scales every row, as the unfused product would.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
mpl_scale_grad(T *__restrict__ grad, const float *__restrict__ grad_output, const uint8_t *__restrict__ mask,
               int64_t N, int64_t P, int64_t sg) {
  const float g = *grad_output;
  if (g == 1.f) return;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= N) return;
  if (mask && mask[row] == 0 && isfinite(g)) return;
  T *grow = grad + row * sg;
  for (int64_t j = threadIdx.x & 31; j < P; j += 32) grow[j] = from_float<T>(to_float(grow[j]) * g);
}

// ---------------------------------------------------------------------------------------------------------
// Variants 2 and 3: persistent warps over rows, 16-bit packs kept raw until use.
// ---------------------------------------------------------------------------------------------------------

// 16 bytes read once: no L1 allocation, non-coherent path (pred and target are not written by the kernel).
__device__ __forceinline__ uint4 ld_stream(const void *p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ void st_stream(void *p, uint4 v) { __stcs(reinterpret_cast<uint4 *>(p), v); }

__device__ __forceinline__ uint32_t word(const uint4 &r, int k) {
  return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;  // k is a constant after unrolling
}

// Element e (a constant after unrolling) of a raw 16-byte pack of T, widened to float at its use.
template <typename T> __device__ __forceinline__ float elem(const uint4 &r, int e);
template <> __device__ __forceinline__ float elem<float>(const uint4 &r, int e) { return __uint_as_float(word(r, e)); }
template <> __device__ __forceinline__ float elem<__nv_bfloat16>(const uint4 &r, int e) {
  const uint32_t w = word(r, e >> 1);
  return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
}
template <> __device__ __forceinline__ float elem<__half>(const uint4 &r, int e) {
  const uint32_t w = word(r, e >> 1);
  return __half2float(__ushort_as_half(static_cast<unsigned short>((e & 1) ? (w >> 16) : (w & 0xffffu))));
}

// Two floats rounded to T and packed into one 32-bit word (first in the low half, as in memory).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t *>(&h);
}

template <typename T, int VEC> __device__ __forceinline__ uint4 pack_out(const float (&v)[VEC]) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// Pack i of a row for this lane starts at column (i * 32 + lane) * VEC; only packs below P exist.
template <typename T, int VEC, int ITERS>
__device__ __forceinline__ void load_row(uint4 (&pp)[ITERS], uint4 (&tp)[ITERS], const T *prow, const T *trow,
                                         int64_t P, int lane) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t j = ((int64_t)i * 32 + lane) * VEC;
    if (j < P) {
      pp[i] = ld_stream(prow + j);
      tp[i] = ld_stream(trow + j);
    }
  }
}

// Loss term and (optionally) gradient of one counted row whose packs are in registers.
template <typename T, int VEC, int ITERS>
__device__ __forceinline__ void finish_row(const uint4 (&pp)[ITERS], const uint4 (&tp)[ITERS], T *grow,
                                           float *row_loss_at, int64_t P, int lane, float inv, float eps,
                                           bool norm_pix, bool write_grad) {
  float mean = 0.f, rstd = 1.f;
  if (norm_pix) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      if (((int64_t)i * 32 + lane) * VEC < P)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += elem<T>(tp[i], e);
    mean = warp_sum(s) / (float)P;
    float s2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      if (((int64_t)i * 32 + lane) * VEC < P)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = elem<T>(tp[i], e) - mean;
          s2 += d * d;
        }
    rstd = rsqrtf(warp_sum(s2) / (float)(P - 1) + eps);  // unbiased variance, as MAE
  }
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t j = ((int64_t)i * 32 + lane) * VEC;
    if (j < P) {
      float g[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float t = norm_pix ? (elem<T>(tp[i], e) - mean) * rstd : elem<T>(tp[i], e);
        const float diff = elem<T>(pp[i], e) - t;
        acc += diff * diff;
        g[e] = 2.f * diff * inv;  // d/dpred of (pred - t)^2 / (count * P)
      }
      if (write_grad) st_stream(grow + j, pack_out<T, VEC>(g));
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) *row_loss_at = acc * inv;
}

template <typename T, int VEC, int ITERS>
__device__ __forceinline__ void zero_row_packs(T *grow, int64_t P, int lane) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t j = ((int64_t)i * 32 + lane) * VEC;
    if (j < P) st_stream(grow + j, make_uint4(0u, 0u, 0u, 0u));
  }
}

// Counted flags of rows row, row + stride, ..., row + 31 * stride as bits 0..31 (one ballot for 32 rows).
__device__ __forceinline__ uint32_t counted_bits(const uint8_t *mask, int64_t row, int64_t stride, int64_t N,
                                                 int lane) {
  const int64_t r = row + (int64_t)lane * stride;
  return __ballot_sync(0xffffffffu, r < N && (mask == nullptr || __ldg(mask + r) != 0));
}

// Warp w of the grid owns rows w, w + W, w + 2W, ... (W = total warps). Uncounted rows write zeros and the warp
// moves on. PREFETCH: the loads of a warp's next row are issued before the current row is reduced (two register
// buffers, used alternately, so nothing is copied).
// Resident 256-thread blocks asked of ptxas (sm_90a, ptxas 13.0, no spills unless noted): one row buffer takes
// 4 blocks (<= 64 registers) up to 5 packs per lane (P = 1176 bf16), 3 (<= 80) at 6, 2 beyond; two buffers take
// 2 blocks (<= 128; 8 bytes spilled at 6 packs) up to 6, 1 beyond. Asking more spills.
constexpr int persistent_min_blocks(int iters, bool prefetch) {
  return prefetch ? (iters <= 6 ? 2 : 1) : (iters <= 5 ? 4 : iters <= 6 ? 3 : 2);
}

template <typename T, int VEC, int ITERS, bool PREFETCH>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, persistent_min_blocks(ITERS, PREFETCH))
mpl_fwd_persistent(const T *__restrict__ pred, const T *__restrict__ target, const uint8_t *__restrict__ mask,
                   const int *__restrict__ count_ptr, T *__restrict__ grad, float *__restrict__ row_loss, int64_t N,
                   int64_t P, int64_t sp, int64_t st, int64_t sg, float eps, float weight, bool norm_pix,
                   bool write_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t W = (int64_t)gridDim.x * kWarpsPerBlock;
  int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  const float count = mask ? (float)max(*count_ptr, 1) : (float)N;
  const float inv = weight / (count * (float)P);  // weight: the loss's scale factor
  // bits holds the counted flags of this warp's next up to 32 rows; k indexes the current one.
  uint32_t bits = 0;
  int k = 32;
  auto counted_next = [&](int64_t r) -> bool {  // r is this warp's next row, called in row order
    if (k == 32) {
      bits = counted_bits(mask, r, W, N, lane);
      k = 0;
    }
    return (bits >> k++) & 1u;
  };
  auto finish = [&](int64_t r, bool c, const uint4 (&pp)[ITERS], const uint4 (&tp)[ITERS]) {
    if (c) {
      finish_row<T, VEC, ITERS>(pp, tp, grad + r * sg, row_loss + r, P, lane, inv, eps, norm_pix, write_grad);
    } else {
      if (write_grad) zero_row_packs<T, VEC, ITERS>(grad + r * sg, P, lane);
      if (lane == 0) row_loss[r] = 0.f;
    }
  };
  if constexpr (!PREFETCH) {
    for (; row < N; row += W) {
      const bool c = counted_next(row);
      uint4 pp[ITERS], tp[ITERS];
      if (c) load_row<T, VEC, ITERS>(pp, tp, pred + row * sp, target + row * st, P, lane);
      finish(row, c, pp, tp);
    }
  } else {
    uint4 pa[ITERS], ta[ITERS], pb[ITERS], tb[ITERS];
    if (row >= N) return;
    bool ca = counted_next(row);
    if (ca) load_row<T, VEC, ITERS>(pa, ta, pred + row * sp, target + row * st, P, lane);
    for (;;) {
      const int64_t rb = row + W;  // buffer b: the next row, loaded before buffer a is reduced
      const bool cb = rb < N && counted_next(rb);
      if (cb) load_row<T, VEC, ITERS>(pb, tb, pred + rb * sp, target + rb * st, P, lane);
      finish(row, ca, pa, ta);
      if (rb >= N) break;
      row = rb + W;  // buffer a again
      ca = row < N && counted_next(row);
      if (ca) load_row<T, VEC, ITERS>(pa, ta, pred + row * sp, target + row * st, P, lane);
      finish(rb, cb, pb, tb);
      if (row >= N) break;
    }
  }
}

// Blocks of `kernel` resident per SM times the SM count of the current device (cached per kernel and device).
template <typename Kernel> int resident_blocks(Kernel kernel, int *out) {
  static std::mutex mu;
  static std::map<std::pair<const void *, int>, int> cache;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto key = std::make_pair(reinterpret_cast<const void *>(kernel), dev);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int sms = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarpsPerBlock * 32, 0);
    if (err != cudaSuccess) return static_cast<int>(err);
    it = cache.emplace(key, std::max(1, sms * per_sm)).first;
  }
  *out = it->second;
  return 0;
}

template <typename T, int VEC, int ITERS, bool PREFETCH>
int launch_persistent(int64_t N, cudaStream_t s, const void *pred, const void *target, const uint8_t *mask,
                      const int *count, void *grad, float *row_loss, int64_t P, int64_t sp, int64_t st, int64_t sg,
                      float eps, float weight, bool norm_pix, bool write_grad) {
  auto kernel = mpl_fwd_persistent<T, VEC, ITERS, PREFETCH>;
  int slots = 0;
  if (int err = resident_blocks(kernel, &slots)) return err;
  const int64_t blocks = std::min<int64_t>((N + kWarpsPerBlock - 1) / kWarpsPerBlock, slots);
  kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, s>>>(
      static_cast<const T *>(pred), static_cast<const T *>(target), mask, count, static_cast<T *>(grad), row_loss,
      N, P, sp, st, sg, eps, weight, norm_pix, write_grad);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int VEC, int ITERS>
void launch_regs(dim3 grid, cudaStream_t s, const void *pred, const void *target, const uint8_t *mask,
                 const int *count, void *grad, float *row_loss, int64_t N, int64_t P, int64_t sp, int64_t st,
                 int64_t sg, float eps, float weight, bool norm_pix,
                   bool write_grad) {
  mpl_fwd_regs<T, VEC, ITERS><<<grid, kWarpsPerBlock * 32, 0, s>>>(
      static_cast<const T *>(pred), static_cast<const T *>(target), mask, count, static_cast<T *>(grad), row_loss,
      N, P, sp, st, sg, eps, weight, norm_pix, write_grad);
}

}  // namespace

int masked_patch_loss_fwd(std::uintptr_t pred, std::uintptr_t target, std::uintptr_t mask, std::uintptr_t count,
                          std::uintptr_t grad, std::uintptr_t row_loss, int64_t N, int64_t P, int64_t stride_pred,
                          int64_t stride_target, int64_t stride_grad, int dtype, float eps, bool norm_pix,
                          bool write_grad, std::uintptr_t stream, int variant, float weight) {
  if (N <= 0 || P <= 0 || variant < 1 || variant > 3) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  cudaStream_t s = as_stream(stream);
  const uint8_t *m = as_ptr<const uint8_t>(mask);
  const int *c = as_ptr<const int>(count);
  float *rl = as_ptr<float>(row_loss);
  const void *pp = as_ptr<const void>(pred), *tp = as_ptr<const void>(target);
  void *gp = as_ptr<void>(grad);
  return dispatch_dtype(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    constexpr int VEC = 16 / sizeof(T);
    // 16-byte packs need aligned bases and row strides, and whole packs per row.
    const bool vec_ok = aligned16(pred) && aligned16(target) && (!write_grad || aligned16(grad)) && P % VEC == 0 &&
                        (stride_pred * (int64_t)sizeof(T)) % 16 == 0 && (stride_target * (int64_t)sizeof(T)) % 16 == 0 &&
                        (!write_grad || (stride_grad * (int64_t)sizeof(T)) % 16 == 0);
    const int64_t iters = (P + 32 * VEC - 1) / (32 * VEC);
#define MOCA_MPL_PERSISTENT(IT)                                                                                  \
  return variant == 3 ? launch_persistent<T, VEC, IT, true>(N, s, pp, tp, m, c, gp, rl, P, stride_pred,         \
                                                            stride_target, stride_grad, eps, weight, norm_pix,   \
                                                            write_grad)                                          \
                      : launch_persistent<T, VEC, IT, false>(N, s, pp, tp, m, c, gp, rl, P, stride_pred,        \
                                                             stride_target, stride_grad, eps, weight, norm_pix,  \
                                                             write_grad)
    if (variant >= 2 && vec_ok) {  // exact pack counts (P = 1176 bf16: 147 packs -> 5 per lane)
      switch (iters) {
        case 1: MOCA_MPL_PERSISTENT(1);
        case 2: MOCA_MPL_PERSISTENT(2);
        case 3: MOCA_MPL_PERSISTENT(3);
        case 4: MOCA_MPL_PERSISTENT(4);
        case 5: MOCA_MPL_PERSISTENT(5);
        case 6: MOCA_MPL_PERSISTENT(6);
        case 7:
        case 8: MOCA_MPL_PERSISTENT(8);
        default: break;  // longer rows: the looped kernel below
      }
    }
#undef MOCA_MPL_PERSISTENT
#define MOCA_MPL_REGS(IT)                                                                                        \
  launch_regs<T, VEC, IT>(grid, s, pp, tp, m, c, gp, rl, N, P, stride_pred, stride_target, stride_grad, eps,    \
                          weight, norm_pix, write_grad)
    if (vec_ok && iters <= 1 && variant == 1) MOCA_MPL_REGS(1);
    else if (vec_ok && iters <= 2 && variant == 1) MOCA_MPL_REGS(2);
    else if (vec_ok && iters <= 4 && variant == 1) MOCA_MPL_REGS(4);
    else if (vec_ok && iters <= 6 && variant == 1) MOCA_MPL_REGS(6);
    else if (vec_ok && iters <= 8 && variant == 1) MOCA_MPL_REGS(8);
    else
      mpl_fwd_looped<T><<<grid, kWarpsPerBlock * 32, 0, s>>>(static_cast<const T *>(pp), static_cast<const T *>(tp), m,
                                                              c, static_cast<T *>(gp), rl, N, P, stride_pred,
                                                              stride_target, stride_grad, eps, weight, norm_pix,
                                                              write_grad);
#undef MOCA_MPL_REGS
    return static_cast<int>(cudaGetLastError());
  });
}

int masked_patch_loss_scale_grad(std::uintptr_t grad, std::uintptr_t grad_output, std::uintptr_t mask, int64_t N,
                                 int64_t P, int64_t stride_grad, int dtype, std::uintptr_t stream) {
  if (N <= 0 || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  return dispatch_dtype(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    mpl_scale_grad<T><<<grid, kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
        as_ptr<T>(grad), as_ptr<const float>(grad_output), as_ptr<const uint8_t>(mask), N, P, stride_grad);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace moca
