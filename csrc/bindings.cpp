// pybind11 bindings of moca_kernels._C. No torch headers: Python passes data_ptr() integers, sizes, strides,
// dtype codes (moca_kernels/_ext.py) and torch.cuda.current_stream().cuda_stream.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "moca_kernels CUDA C++ kernels (torch-free launchers; see moca_kernels/_ext.py)";

  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); },
        "Text of a cudaError_t code.");
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "CUDA runtime version the extension was built against (e.g. 13000).");

  m.def("masked_patch_loss_fwd", &moca::masked_patch_loss_fwd, py::arg("pred"), py::arg("target"), py::arg("mask"),
        py::arg("count"), py::arg("grad"), py::arg("row_loss"), py::arg("N"), py::arg("P"), py::arg("stride_pred"),
        py::arg("stride_target"), py::arg("stride_grad"), py::arg("dtype"), py::arg("eps"), py::arg("norm_pix"),
        py::arg("write_grad"), py::arg("stream"), py::arg("variant") = 1,
        py::arg("weight") = 1.0f,
        "Per-row masked patch loss (times weight / (count * P)) and optionally the fused gradient of pred. "
        "variant: 1 one warp per row (v1), 2 persistent warps (v2), 3 persistent + next-row prefetch (v2p).");
  m.def("masked_patch_loss_scale_grad", &moca::masked_patch_loss_scale_grad, py::arg("grad"),
        py::arg("grad_output"), py::arg("mask"), py::arg("N"), py::arg("P"), py::arg("stride_grad"),
        py::arg("dtype"), py::arg("stream"), "grad *= grad_output on counted rows (no-op when grad_output == 1).");
  m.def("attention_row_spans", &moca::attention_row_spans, py::arg("cu_seqlens"), py::arg("n_docs"),
        py::arg("block_ids"), py::arg("T"), py::arg("causal"), py::arg("spans"), py::arg("scratch"), py::arg("stream"),
        "masked_attention mask metadata: per-token key spans int32 [2, T] (scratch: int32 [ceil(T / 256)]).");
  m.def("attention_tile_tables", &moca::attention_tile_tables, py::arg("spans"), py::arg("T"), py::arg("q_tile"),
        py::arg("k_tile"), py::arg("tables"), py::arg("stream"),
        "masked_attention mask metadata: per-tile key/query ranges and largest-first orders.");
}
