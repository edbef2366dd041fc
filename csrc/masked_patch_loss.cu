// masked_patch_loss forward (+ fused gradient) and the backward's grad_output scaling.
//
// Layout: pred, target, grad are [N, P] with unit stride along P and row strides sp, st, sg (elements).
// One warp owns one row. For a counted row it reads pred and target once, optionally normalises the target
// per row (t - mean) / sqrt(var_unbiased + eps), and writes
//     row_loss[row] = sum_p (pred - t)^2 / (count * P)
//     grad[row, p]  = 2 (pred - t) / (count * P)          (when write_grad)
// A row that is not counted writes row_loss 0 and a zero gradient row without reading pred or target.
// count = number of counted rows (read from device memory, no host sync), clamped to >= 1.
//
// Rows of up to ITERS * 32 * VEC elements stay in registers (one read of each input); longer rows use a
// looped kernel that re-reads the target for the normalisation statistics.
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
             int64_t P, int64_t sp, int64_t st, int64_t sg, float eps, bool norm_pix, bool write_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);  // int64: N * P can pass 2^31
  if (row >= N) return;
  const float count = mask ? (float)max(*count_ptr, 1) : (float)N;
  const float inv = 1.f / (count * (float)P);
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
               int64_t P, int64_t sp, int64_t st, int64_t sg, float eps, bool norm_pix, bool write_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= N) return;
  const float count = mask ? (float)max(*count_ptr, 1) : (float)N;
  const float inv = 1.f / (count * (float)P);
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

template <typename T, int VEC, int ITERS>
void launch_regs(dim3 grid, cudaStream_t s, const void *pred, const void *target, const uint8_t *mask,
                 const int *count, void *grad, float *row_loss, int64_t N, int64_t P, int64_t sp, int64_t st,
                 int64_t sg, float eps, bool norm_pix, bool write_grad) {
  mpl_fwd_regs<T, VEC, ITERS><<<grid, kWarpsPerBlock * 32, 0, s>>>(
      static_cast<const T *>(pred), static_cast<const T *>(target), mask, count, static_cast<T *>(grad), row_loss,
      N, P, sp, st, sg, eps, norm_pix, write_grad);
}

}  // namespace

int masked_patch_loss_fwd(std::uintptr_t pred, std::uintptr_t target, std::uintptr_t mask, std::uintptr_t count,
                          std::uintptr_t grad, std::uintptr_t row_loss, int64_t N, int64_t P, int64_t stride_pred,
                          int64_t stride_target, int64_t stride_grad, int dtype, float eps, bool norm_pix,
                          bool write_grad, std::uintptr_t stream) {
  if (N <= 0 || P <= 0) return static_cast<int>(cudaErrorInvalidValue);
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
#define MOCA_MPL_REGS(IT)                                                                                        \
  launch_regs<T, VEC, IT>(grid, s, pp, tp, m, c, gp, rl, N, P, stride_pred, stride_target, stride_grad, eps,    \
                          norm_pix, write_grad)
    if (vec_ok && iters <= 1) MOCA_MPL_REGS(1);
    else if (vec_ok && iters <= 2) MOCA_MPL_REGS(2);
    else if (vec_ok && iters <= 4) MOCA_MPL_REGS(4);
    else if (vec_ok && iters <= 6) MOCA_MPL_REGS(6);
    else if (vec_ok && iters <= 8) MOCA_MPL_REGS(8);
    else
      mpl_fwd_looped<T><<<grid, kWarpsPerBlock * 32, 0, s>>>(static_cast<const T *>(pp), static_cast<const T *>(tp), m,
                                                              c, static_cast<T *>(gp), rl, N, P, stride_pred,
                                                              stride_target, stride_grad, eps, norm_pix, write_grad);
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
