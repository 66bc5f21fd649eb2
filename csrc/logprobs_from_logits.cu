// Log-probs (+ entropy, logsumexp) of target tokens from materialized logits, one row per block.
//
// Forward, per row n with z = logits[n] / T (fp32 math; T one value, or one per row):
//   lse = logsumexp(z); logp = z[y] - lse; entropy = lse - sum(softmax(z) * z)
//   optional stats (N, 4): sum p^2, mean z, max z, first column holding the max
// Backward, given upstream g_logp, g_ent, g_lse and g_extra = (g_sq, g_const) (each may be absent):
//   dlogits = (g_logp * (onehot(y) - p) - g_ent * p * (z - sum(p z)) + g_lse * p
//              + g_sq * p^2 + g_const) / T
// Bytes: forward reads the logits once (N*V*sizeof(T)); backward reads and writes them once.
// Ignored rows (y == ignore_index) give 0 outputs and 0 gradients and read nothing.
#include "common.cuh"
#include "logprobs_from_logits.h"

#include <cfloat>

namespace prefkern {
namespace {

constexpr int kThreads = 512;

// Online softmax statistics of a set of values z: m = max z, s = sum exp(z - m),
// u = sum exp(z - m) * (z - m), s2 = sum exp(2 (z - m)), sz = sum z, idx = the first column
// holding m. The empty set (or all -inf) is {-inf, 0, 0, 0, sz, kNoColumn}. Keeping u relative
// to m makes entropy = log s - u / s free of the cancellation in lse - sum(p z) for large |z|;
// sum p^2 = s2 / s^2.
constexpr int kNoColumn = 0x7fffffff;

struct SoftmaxStats {
  float m, s, u, s2, sz;
  int idx;
};

// Each thread adds its columns in increasing order: a strict > keeps the first max.
__device__ __forceinline__ void stats_add(SoftmaxStats& a, float z, int col) {
  a.sz += z;
  if (z == -INFINITY) return;  // exp(-inf) = 0 and 0 * -inf must not poison u
  if (z > a.m) {
    if (a.m == -INFINITY) {
      a = {z, 1.0f, 0.0f, 1.0f, a.sz, col};
      return;
    }
    a.idx = col;
    const float scale = expf(a.m - z);
    a.u = scale * (a.u + a.s * (a.m - z));
    a.s = a.s * scale + 1.0f;
    a.s2 = a.s2 * scale * scale + 1.0f;
    a.m = z;
  } else {
    const float e = expf(z - a.m);
    a.s += e;
    a.u += e * (z - a.m);
    a.s2 += e * e;
  }
}

__device__ __forceinline__ SoftmaxStats stats_merge(SoftmaxStats a, SoftmaxStats b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {-INFINITY, 0.0f, 0.0f, 0.0f, a.sz + b.sz, kNoColumn};
  float s = 0.0f, u = 0.0f, s2 = 0.0f;
  if (a.m != -INFINITY) {
    const float w = expf(a.m - m);
    s += a.s * w;
    u += w * (a.u + a.s * (a.m - m));
    s2 += a.s2 * w * w;
  }
  if (b.m != -INFINITY) {
    const float w = expf(b.m - m);
    s += b.s * w;
    u += w * (b.u + b.s * (b.m - m));
    s2 += b.s2 * w * w;
  }
  // the first column holding the max, whichever thread saw it
  const int idx = a.m == b.m ? min(a.idx, b.idx) : (a.m > b.m ? a.idx : b.idx);
  return {m, s, u, s2, a.sz + b.sz, idx};
}

__device__ __forceinline__ SoftmaxStats shfl_stats(const SoftmaxStats& v, int offset) {
  return {__shfl_xor_sync(0xffffffff, v.m, offset), __shfl_xor_sync(0xffffffff, v.s, offset),
          __shfl_xor_sync(0xffffffff, v.u, offset), __shfl_xor_sync(0xffffffff, v.s2, offset),
          __shfl_xor_sync(0xffffffff, v.sz, offset), __shfl_xor_sync(0xffffffff, v.idx, offset)};
}

__device__ SoftmaxStats block_reduce(SoftmaxStats v) {
  __shared__ SoftmaxStats warp_partials[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v = stats_merge(v, shfl_stats(v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_partials[lane]
                             : SoftmaxStats{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f, kNoColumn};
    for (int offset = 16; offset > 0; offset >>= 1) v = stats_merge(v, shfl_stats(v, offset));
    if (lane == 0) warp_partials[0] = v;
  }
  __syncthreads();
  return warp_partials[0];
}

// VEC elements per 16-byte load when rows are aligned; 1 otherwise.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) fwd_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ targets,
    float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ lse_out,
    float* __restrict__ stats, int64_t vocab, float inv_temp_all, const float* __restrict__ inv_temp_rows,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t y = targets[row];
  const float inv_temp = inv_temp_rows ? inv_temp_rows[row] : inv_temp_all;
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      logp[row] = 0.0f;
      if (entropy) entropy[row] = 0.0f;
      if (lse_out) lse_out[row] = 0.0f;
      if (stats) {
        for (int k = 0; k < 3; ++k) stats[4 * row + k] = 0.0f;
        stats[4 * row + 3] = -1.0f;
      }
    }
    return;
  }
  const T* x = logits + row * row_stride;
  SoftmaxStats st{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f, kNoColumn};
  const int64_t n_vec = vocab / VEC;
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    struct alignas(16) Pack { T v[VEC]; };
    const Pack pack = reinterpret_cast<const Pack*>(x)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      stats_add(st, to_float(pack.v[k]) * inv_temp, static_cast<int>(i * VEC + k));
    }
  }
  for (int64_t i = n_vec * VEC + threadIdx.x; i < vocab; i += kThreads) {
    stats_add(st, to_float(x[i]) * inv_temp, static_cast<int>(i));
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const float log_s = logf(st.s);
    const float lse = st.m + log_s;
    const float z_y = to_float(x[y]) * inv_temp;
    logp[row] = z_y - lse;
    if (entropy) entropy[row] = log_s - st.u / st.s;
    if (lse_out) lse_out[row] = lse;
    if (stats) {
      stats[4 * row] = st.s2 / (st.s * st.s);
      stats[4 * row + 1] = st.sz / static_cast<float>(vocab);
      stats[4 * row + 2] = st.m;
      stats[4 * row + 3] = static_cast<float>(st.idx);
    }
  }
}

// grad may be logits itself (in-place backward): neither pointer is __restrict__; each thread
// reads its elements before it writes them.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) bwd_kernel(
    const T* logits, int64_t row_stride, const int64_t* __restrict__ targets,
    const float* __restrict__ lse_in, const float* __restrict__ entropy,
    const float* __restrict__ g_logp, const float* __restrict__ g_ent,
    const float* __restrict__ g_lse, const float* __restrict__ g_extra, T* grad,
    int64_t grad_row_stride,
    int64_t vocab, float inv_temp_all, const float* __restrict__ inv_temp_rows,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t y = targets[row];
  const float inv_temp = inv_temp_rows ? inv_temp_rows[row] : inv_temp_all;
  T* out = grad + row * grad_row_stride;
  const bool ignored = y == ignore_index;
  const float gl = (ignored || !g_logp) ? 0.0f : g_logp[row];
  const float ge = (ignored || !g_ent) ? 0.0f : g_ent[row];
  const float gs = (ignored || !g_lse) ? 0.0f : g_lse[row];
  const float lse = ignored ? 0.0f : lse_in[row];
  const float ent = (ignored || !g_ent) ? 0.0f : entropy[row];
  const float gq = (ignored || !g_extra) ? 0.0f : g_extra[2 * row];
  const float gc = (ignored || !g_extra) ? 0.0f : g_extra[2 * row + 1];
  const T* x = logits + row * row_stride;
  auto dz = [&](float z, int64_t col) -> float {
    if (ignored) return 0.0f;
    const float log_p = z - lse;
    const float p = expf(log_p);
    float d = (col == y ? gl : 0.0f) + (gs - gl) * p + gq * p * p + gc;
    if (p > 0.0f) d -= ge * p * (log_p + ent);  // z - sum(p z) = log p + entropy
    return d * inv_temp;
  };
  const int64_t n_vec = vocab / VEC;
  struct alignas(16) Pack { T v[VEC]; };
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    Pack in;
    if (!ignored) in = reinterpret_cast<const Pack*>(x)[i];
    Pack res;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      res.v[k] = from_float<T>(ignored ? 0.0f : dz(to_float(in.v[k]) * inv_temp, i * VEC + k));
    }
    reinterpret_cast<Pack*>(out)[i] = res;
  }
  for (int64_t i = n_vec * VEC + threadIdx.x; i < vocab; i += kThreads) {
    out[i] = from_float<T>(ignored ? 0.0f : dz(to_float(x[i]) * inv_temp, i));
  }
}

// 16-byte vector loads need 16-byte aligned row starts.
template <typename T>
bool can_vectorize(uintptr_t base, int64_t row_stride) {
  return base % 16 == 0 && (row_stride * sizeof(T)) % 16 == 0;
}

}  // namespace

void logprobs_from_logits_fwd(uintptr_t logits, int64_t row_stride, uintptr_t targets,
                              uintptr_t logp, uintptr_t entropy, uintptr_t lse, uintptr_t stats,
                              int64_t n_rows, int64_t vocab, float inv_temp,
                              uintptr_t inv_temp_rows, int64_t ignore_index, int dtype,
                              uintptr_t stream) {
  if (n_rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    auto cs = reinterpret_cast<cudaStream_t>(stream);
    auto kernel = can_vectorize<T>(logits, row_stride) ? fwd_kernel<T, kVec> : fwd_kernel<T, 1>;
    kernel<<<n_rows, kThreads, 0, cs>>>(
        reinterpret_cast<const T*>(logits), row_stride, reinterpret_cast<const int64_t*>(targets),
        reinterpret_cast<float*>(logp), reinterpret_cast<float*>(entropy),
        reinterpret_cast<float*>(lse), reinterpret_cast<float*>(stats), vocab, inv_temp,
        reinterpret_cast<const float*>(inv_temp_rows), ignore_index);
  });
  check_launch("logprobs_from_logits_fwd");
}

void logprobs_from_logits_bwd(uintptr_t logits, int64_t row_stride, uintptr_t targets,
                              uintptr_t lse, uintptr_t entropy, uintptr_t g_logp, uintptr_t g_ent,
                              uintptr_t g_lse, uintptr_t g_extra, uintptr_t grad,
                              int64_t grad_row_stride, int64_t n_rows, int64_t vocab,
                              float inv_temp, uintptr_t inv_temp_rows, int64_t ignore_index,
                              int dtype, uintptr_t stream) {
  if (n_rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    auto cs = reinterpret_cast<cudaStream_t>(stream);
    const bool vec = can_vectorize<T>(logits, row_stride) && can_vectorize<T>(grad, grad_row_stride);
    auto kernel = vec ? bwd_kernel<T, kVec> : bwd_kernel<T, 1>;
    kernel<<<n_rows, kThreads, 0, cs>>>(
        reinterpret_cast<const T*>(logits), row_stride, reinterpret_cast<const int64_t*>(targets),
        reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(entropy),
        reinterpret_cast<const float*>(g_logp), reinterpret_cast<const float*>(g_ent),
        reinterpret_cast<const float*>(g_lse), reinterpret_cast<const float*>(g_extra),
        reinterpret_cast<T*>(grad), grad_row_stride, vocab,
        inv_temp, reinterpret_cast<const float*>(inv_temp_rows), ignore_index);
  });
  check_launch("logprobs_from_logits_bwd");
}

}  // namespace prefkern
