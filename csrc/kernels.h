// Declarations of every launcher in moca_kernels._C (defined in the .cu files, bound in bindings.cpp).
// Pointers are device addresses passed as integers; strides are in elements; each returns a cudaError_t as int.
#pragma once

#include <cstdint>

namespace moca {

// masked_patch_loss.cu
int masked_patch_loss_fwd(std::uintptr_t pred, std::uintptr_t target, std::uintptr_t mask, std::uintptr_t count,
                          std::uintptr_t grad, std::uintptr_t row_loss, int64_t N, int64_t P, int64_t stride_pred,
                          int64_t stride_target, int64_t stride_grad, int dtype, float eps, bool norm_pix,
                          bool write_grad, std::uintptr_t stream, int variant,
                          float weight);  // variant 1 v1, 2 v2, 3 v2p; weight scales loss and gradient
int masked_patch_loss_scale_grad(std::uintptr_t grad, std::uintptr_t grad_output, std::uintptr_t mask, int64_t N,
                                 int64_t P, int64_t stride_grad, int dtype, std::uintptr_t stream);

// attention_meta.cu: O(T) mask metadata of masked_attention (moca_kernels/attention/metadata.py)
int attention_row_spans(std::uintptr_t cu_seqlens, int64_t n_docs, std::uintptr_t block_ids, int64_t T, bool causal,
                        std::uintptr_t spans, std::uintptr_t scratch, std::uintptr_t stream);
int attention_tile_tables(std::uintptr_t spans, int64_t T, int64_t q_tile, int64_t k_tile, std::uintptr_t tables,
                          std::uintptr_t stream);

}  // namespace moca
