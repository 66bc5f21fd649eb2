// Host launcher for the GAE / EGAE scan (gae.cu). Pointers are device addresses, 0 when the
// input is absent: mask (uint8), gammas (fp32 per token), cu_seqlens (int64, packed layout),
// bootstrap (fp32) and truncated (uint8) per sequence. rewards and values share `dtype`, a
// prefkern::DType code; advantages and returns are fp32. `stream` is a cudaStream_t.
#pragma once
#include <cstdint>

namespace prefkern {

void gae_scan(uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t gammas,
              uintptr_t cu_seqlens, uintptr_t bootstrap, uintptr_t truncated,
              uintptr_t advantages, uintptr_t returns, int64_t n_seqs, int64_t seq_len,
              float gamma, float lam, float lam_critic, bool dual, int dtype, uintptr_t stream);

}  // namespace prefkern
