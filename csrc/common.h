// Shared helpers for moca_kernels._C. Torch-free: launchers receive raw device pointers (as integers), sizes,
// strides in elements, a dtype code and a cudaStream_t handle, and return cudaGetLastError() as an int.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace moca {

// Must match moca_kernels/_ext.py DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC elements of T moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T> inline T *as_ptr(std::uintptr_t p) { return reinterpret_cast<T *>(p); }

inline bool aligned16(std::uintptr_t p) { return (p & 15u) == 0; }

// Calls F.template operator()<T>() with T the C++ type of the dtype code; returns cudaErrorInvalidValue on
// an unknown code.
template <typename F> int dispatch_dtype(int code, F &&f) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace moca
