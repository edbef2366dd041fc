// O(T) mask metadata of masked_attention: per-token key spans and per-tile tables, built on the device with
// no host synchronisation. The definitions live in moca_kernels/attention/metadata.py; the torch builder there
// must produce exactly the same integers (a GPU test compares them).
//
//   spans  int32 [2, T]   query i attends to keys [spans[0][i], spans[1][i]) (both rows non-decreasing)
//   tables int32 flat     q_table [nQ, 4] | q_order [nQ] | k_table [nK, 4] | k_order [nK]
//                         rows (span_lo, full_lo, full_hi, span_hi); orders: tiles by decreasing work.
#include <climits>

#include "common.h"
#include "kernels.h"

namespace moca {
namespace {

constexpr int kChunk = 256;         // tokens per block of the span kernels
constexpr int kTableThreads = 1024; // threads of the (single-block) table kernels

// Number of entries of the non-decreasing a[0, n) that are <= x.
__device__ __forceinline__ int count_le(const int *__restrict__ a, int n, int x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// One thread per token i. lo = start of i's document. hi = its end (bidirectional), i + 1 (causal), or the
// first run start after i (causal with blocks; a run start is a document start, a token outside any block, or
// a change of block id). A run that goes past this 256-token chunk gets hi = -1 here and is completed by
// run_end_fixup_kernel from chunk_first_start (the first run start of every chunk, INT_MAX if none).
__global__ void row_spans_kernel(const int *__restrict__ cu, int n_docs, const int *__restrict__ blocks, int T,
                                 bool causal, int *__restrict__ lo_out, int *__restrict__ hi_out,
                                 int *__restrict__ chunk_first_start) {
  __shared__ int is_start[kChunk];
  __shared__ int first_start;
  const int base = blockIdx.x * kChunk;
  const int i = base + threadIdx.x;
  const bool with_blocks = causal && blocks != nullptr;  // uniform over the block
  if (threadIdx.x == 0) first_start = INT_MAX;

  int lo = 0, hi = 0, start = 0;
  if (i < T) {
    const int d = count_le(cu + 1, n_docs, i);  // cu[d] <= i < cu[d + 1]
    lo = cu[d];
    if (!causal) {
      hi = cu[d + 1];
    } else if (!with_blocks) {
      hi = i + 1;
    } else {
      const int b = blocks[i];
      const int prev = i > 0 ? blocks[i - 1] : -1;
      start = (i == lo) || b < 0 || prev < 0 || b != prev;
    }
    lo_out[i] = lo;
  }
  if (with_blocks) {
    is_start[threadIdx.x] = start;
    __syncthreads();  // first_start initialised, flags written
    if (start) atomicMin(&first_start, i);
    if (i < T) {
      const int last = min(base + kChunk, T);
      hi = (last == T) ? T : -1;
      for (int s = i + 1; s < last; ++s) {
        if (is_start[s - base]) {
          hi = s;
          break;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) chunk_first_start[blockIdx.x] = first_start;
  }
  if (i < T) hi_out[i] = hi;
}

// One block per chunk: tokens whose run continues past their chunk end at the first run start of a later
// chunk (or at T). Warp 0 finds that chunk, 32 chunks per step.
__global__ void run_end_fixup_kernel(int T, int n_chunks, const int *__restrict__ chunk_first_start,
                                     int *__restrict__ hi_out) {
  __shared__ int next_start;
  const int c = blockIdx.x;
  if (threadIdx.x < 32) {
    int found = T;
    for (int g = c + 1; g < n_chunks; g += 32) {
      const int c2 = g + static_cast<int>(threadIdx.x);
      const int v = c2 < n_chunks ? chunk_first_start[c2] : INT_MAX;
      const unsigned hit = __ballot_sync(0xffffffffu, v != INT_MAX);
      if (hit) {
        found = __shfl_sync(0xffffffffu, v, __ffs(hit) - 1);
        break;
      }
    }
    if (threadIdx.x == 0) next_start = found;
  }
  __syncthreads();
  const int i = c * kChunk + threadIdx.x;
  if (i < T && hi_out[i] < 0) hi_out[i] = next_start;
}

// Block 0 builds the query-tile table and order, block 1 the key-tile ones (see metadata.py).
__global__ void tile_tables_kernel(const int *__restrict__ lo, const int *__restrict__ hi, int T, int q_tile,
                                   int k_tile, int *__restrict__ out) {
  __shared__ int work_s[kTableThreads];
  const bool is_q = blockIdx.x == 0;
  const int tile = is_q ? q_tile : k_tile;
  const int nq = (T + q_tile - 1) / q_tile;
  const int n = (T + tile - 1) / tile;
  int *table = is_q ? out : out + 5 * nq;
  int *order = table + 4 * n;

  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const long long a0 = static_cast<long long>(t) * tile;
    const int first = static_cast<int>(a0);
    const int last = static_cast<int>(min(a0 + tile, static_cast<long long>(T))) - 1;
    int r0, r1, r2, r3;
    if (is_q) {  // keys of the tile, and keys every query of it sees
      r0 = lo[first];
      r1 = lo[last];
      r2 = hi[first];
      r3 = hi[last];
    } else {     // queries seeing some key of the tile (first(k0), end(kl)), and all of it (first(kl), end(k0))
      r0 = count_le(hi, T, first);
      r1 = count_le(hi, T, last);
      r2 = count_le(lo, T, first);
      r3 = count_le(lo, T, last);
    }
    if (r1 >= r2 || a0 + tile > T) {  // canonical empty full range
      r1 = r3;
      r2 = r3;
    }
    table[4 * t] = r0;
    table[4 * t + 1] = r1;
    table[4 * t + 2] = r2;
    table[4 * t + 3] = r3;
  }
  __syncthreads();

  // order[rank(t)] = t, rank(t) = #{j : w_j > w_t} + #{j < t : w_j == w_t}: a stable descending sort by work.
  for (int pass = 0; pass * kTableThreads < n; ++pass) {
    const int t = pass * kTableThreads + threadIdx.x;
    const int my = t < n ? table[4 * t + 3] - table[4 * t] : 0;
    int rank = 0;
    for (int j0 = 0; j0 < n; j0 += kTableThreads) {
      __syncthreads();
      const int j = j0 + threadIdx.x;
      work_s[threadIdx.x] = j < n ? table[4 * j + 3] - table[4 * j] : 0;
      __syncthreads();
      const int m = min(kTableThreads, n - j0);
      for (int jj = 0; jj < m; ++jj) {
        const int w = work_s[jj];
        rank += (w > my) || (w == my && j0 + jj < t);
      }
    }
    if (t < n) order[rank] = t;
  }
}

}  // namespace

int attention_row_spans(std::uintptr_t cu_seqlens, int64_t n_docs, std::uintptr_t block_ids, int64_t T,
                        bool causal, std::uintptr_t spans, std::uintptr_t scratch, std::uintptr_t stream) {
  if (T <= 0 || T > INT_MAX / 2 || n_docs <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int n = static_cast<int>(T);
  const int n_chunks = (n + kChunk - 1) / kChunk;
  int *lo = as_ptr<int>(spans);
  int *hi = lo + n;
  const int *blocks = block_ids ? as_ptr<const int>(block_ids) : nullptr;
  cudaStream_t s = as_stream(stream);
  row_spans_kernel<<<n_chunks, kChunk, 0, s>>>(as_ptr<const int>(cu_seqlens), static_cast<int>(n_docs), blocks, n,
                                               causal, lo, hi, as_ptr<int>(scratch));
  if (causal && blocks != nullptr && n_chunks > 1)
    run_end_fixup_kernel<<<n_chunks, kChunk, 0, s>>>(n, n_chunks, as_ptr<const int>(scratch), hi);
  return static_cast<int>(cudaGetLastError());
}

int attention_tile_tables(std::uintptr_t spans, int64_t T, int64_t q_tile, int64_t k_tile, std::uintptr_t tables,
                          std::uintptr_t stream) {
  if (T <= 0 || T > INT_MAX / 2 || q_tile <= 0 || k_tile <= 0 || q_tile > INT_MAX / 4 || k_tile > INT_MAX / 4)
    return static_cast<int>(cudaErrorInvalidValue);
  const int n = static_cast<int>(T);
  const int *lo = as_ptr<const int>(spans);
  tile_tables_kernel<<<2, kTableThreads, 0, as_stream(stream)>>>(lo, lo + n, n, static_cast<int>(q_tile),
                                                                   static_cast<int>(k_tile), as_ptr<int>(tables));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moca
