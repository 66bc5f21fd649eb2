// Generalized advantage estimation (+ EGAE bootstrap, + a second lambda) as a reverse affine
// scan: one block per sequence walks it backwards in chunks of kThreads * kItems tokens.
//
// Backwards in time the state (N, G) -- N the value at the next valid token, G the running
// advantage for each lambda -- goes through one map per token:
//   valid t:  N' = V_t,  G' = (r_t - V_t) + g_t N + g_t lam G
//   masked t: N' = N,    G' = G            (verl: observation tokens carry both through)
// Maps (a, b, c, d, e): N -> a N + b, G -> c N + d G + e compose into the same form, so a
// chunk is scanned with warp shuffles (then across the block's warps through shared memory);
// f, the V of the first valid token a map met, is EGAE's default bootstrap (V at the last
// valid token) found in the same pass. Each thread then replays its kItems tokens from its
// exclusive prefix and writes A and returns = A(lam_critic) + V.
// Bytes per token: r, V (+ mask, gamma) read once; advantages and returns written once.
#include "common.cuh"
#include "gae.h"

namespace prefkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // consecutive tokens per thread: a warp reads 128 contiguous tokens
constexpr int kChunk = kThreads * kItems;

template <int L>  // L lambdas: the actor's, and optionally the critic's
struct Affine {
  float a, b, f;
  float c[L], d[L], e[L];
};

template <int L>
__device__ __forceinline__ Affine<L> identity() {
  Affine<L> m;
  m.a = 1.f;
  m.b = 0.f;
  m.f = 0.f;
#pragma unroll
  for (int l = 0; l < L; ++l) {
    m.c[l] = 0.f;
    m.d[l] = 1.f;
    m.e[l] = 0.f;
  }
  return m;
}

// `first` acts first (it covers the later time steps), then `then`.
template <int L>
__device__ __forceinline__ Affine<L> compose(const Affine<L>& first, const Affine<L>& then) {
  Affine<L> m;
  m.a = then.a * first.a;
  m.b = then.a * first.b + then.b;
  m.f = first.a == 0.f ? first.f : then.f;
#pragma unroll
  for (int l = 0; l < L; ++l) {
    m.c[l] = then.c[l] * first.a + then.d[l] * first.c[l];
    m.d[l] = then.d[l] * first.d[l];
    m.e[l] = then.c[l] * first.b + then.d[l] * first.e[l] + then.e[l];
  }
  return m;
}

template <int L>
__device__ __forceinline__ Affine<L> shfl_up(const Affine<L>& x, int delta) {
  Affine<L> y;
  y.a = __shfl_up_sync(0xffffffffu, x.a, delta);
  y.b = __shfl_up_sync(0xffffffffu, x.b, delta);
  y.f = __shfl_up_sync(0xffffffffu, x.f, delta);
#pragma unroll
  for (int l = 0; l < L; ++l) {
    y.c[l] = __shfl_up_sync(0xffffffffu, x.c[l], delta);
    y.d[l] = __shfl_up_sync(0xffffffffu, x.d[l], delta);
    y.e[l] = __shfl_up_sync(0xffffffffu, x.e[l], delta);
  }
  return y;
}

template <typename T, int L>
__global__ void __launch_bounds__(kThreads) gae_kernel(
    const T* __restrict__ rewards, const T* __restrict__ values, const uint8_t* __restrict__ mask,
    const float* __restrict__ gammas, const int64_t* __restrict__ cu_seqlens,
    const float* __restrict__ bootstrap, const uint8_t* __restrict__ truncated,
    float* __restrict__ advantages, float* __restrict__ returns, int64_t seq_len, float gamma,
    float lam, float lam_critic) {
  __shared__ Affine<L> warp_total[kWarps];
  const int64_t seq = blockIdx.x;
  const int64_t start = cu_seqlens ? cu_seqlens[seq] : seq * seq_len;
  const int64_t stop = cu_seqlens ? cu_seqlens[seq + 1] : start + seq_len;
  const float lams[2] = {lam, lam_critic};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float next_value = 0.f;  // N entering the current chunk
  bool searching = false;  // truncated, no bootstrap given: N is V at the last valid token
  if (truncated && truncated[seq]) {
    if (bootstrap) next_value = bootstrap[seq];
    else searching = true;
  }
  float run[L];  // G entering the current chunk
#pragma unroll
  for (int l = 0; l < L; ++l) run[l] = 0.f;

  for (int64_t chunk_stop = stop; chunk_stop > start; chunk_stop -= kChunk) {
    const int64_t first_t = chunk_stop - 1 - static_cast<int64_t>(threadIdx.x) * kItems;
    float r[kItems], v[kItems], g[kItems];
    bool valid[kItems];
    Affine<L> local = identity<L>();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first_t - k;
      const bool inside = t >= start;
      r[k] = inside ? to_float(rewards[t]) : 0.f;
      v[k] = inside ? to_float(values[t]) : 0.f;
      g[k] = inside && gammas ? gammas[t] : gamma;
      valid[k] = inside && (!mask || mask[t]);
      if (valid[k]) {
        Affine<L> el;
        el.a = 0.f;
        el.b = v[k];
        el.f = v[k];
#pragma unroll
        for (int l = 0; l < L; ++l) {
          el.c[l] = g[k];
          el.d[l] = g[k] * lams[l];
          el.e[l] = r[k] - v[k];
        }
        local = compose(local, el);
      }
    }
    Affine<L> inclusive = local;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const Affine<L> other = shfl_up(inclusive, offset);
      if (lane >= offset) inclusive = compose(other, inclusive);
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    Affine<L> before = identity<L>();
    Affine<L> total = identity<L>();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before = compose(before, warp_total[w]);
      total = compose(total, warp_total[w]);
    }
    __syncthreads();  // warp_total is rewritten by the next chunk
    const Affine<L> in_warp = shfl_up(inclusive, 1);
    if (lane > 0) before = compose(before, in_warp);
    if (searching && total.a == 0.f) {
      next_value = total.f;
      searching = false;
    }

    // replay this thread's tokens from its exclusive prefix
    float n = before.a * next_value + before.b;
    float acc[L];
#pragma unroll
    for (int l = 0; l < L; ++l) acc[l] = before.c[l] * next_value + before.d[l] * run[l] + before.e[l];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first_t - k;
      if (t < start) break;
      if (valid[k]) {
#pragma unroll
        for (int l = 0; l < L; ++l) acc[l] = r[k] - v[k] + g[k] * n + g[k] * lams[l] * acc[l];
        n = v[k];
      }
      advantages[t] = acc[0];
      returns[t] = acc[L - 1] + v[k];
    }
#pragma unroll
    for (int l = 0; l < L; ++l) run[l] = total.c[l] * next_value + total.d[l] * run[l] + total.e[l];
    next_value = total.a * next_value + total.b;
  }
}

}  // namespace

void gae_scan(uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t gammas,
              uintptr_t cu_seqlens, uintptr_t bootstrap, uintptr_t truncated,
              uintptr_t advantages, uintptr_t returns, int64_t n_seqs, int64_t seq_len,
              float gamma, float lam, float lam_critic, bool dual, int dtype, uintptr_t stream) {
  if (n_seqs == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto cs = reinterpret_cast<cudaStream_t>(stream);
    auto launch = [&](auto kernel) {
      kernel<<<n_seqs, kThreads, 0, cs>>>(
          reinterpret_cast<const T*>(rewards), reinterpret_cast<const T*>(values),
          reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const float*>(gammas),
          reinterpret_cast<const int64_t*>(cu_seqlens), reinterpret_cast<const float*>(bootstrap),
          reinterpret_cast<const uint8_t*>(truncated), reinterpret_cast<float*>(advantages),
          reinterpret_cast<float*>(returns), seq_len, gamma, lam, lam_critic);
    };
    if (dual) launch(gae_kernel<T, 2>);
    else launch(gae_kernel<T, 1>);
  });
  check_launch("gae_scan");
}

}  // namespace prefkern
