// Host launchers for the logits -> log-prob kernels. Pointers are device addresses, `stream` a
// cudaStream_t, `dtype` a prefkern::DType code; optional outputs/inputs are 0 (inv_temp_rows: per-row
// temperature factors, used instead of inv_temp when nonzero; stats: (N, 4) fp32 extra row
// statistics; g_extra: (N, 2) fp32 [g_sq, g_const] of their gradient).
#pragma once
#include <cstdint>

namespace prefkern {

void logprobs_from_logits_fwd(uintptr_t logits, int64_t row_stride, uintptr_t targets,
                              uintptr_t logp, uintptr_t entropy, uintptr_t lse, uintptr_t stats,
                              int64_t n_rows, int64_t vocab, float inv_temp,
                              uintptr_t inv_temp_rows, int64_t ignore_index, int dtype,
                              uintptr_t stream);

void logprobs_from_logits_bwd(uintptr_t logits, int64_t row_stride, uintptr_t targets,
                              uintptr_t lse, uintptr_t entropy, uintptr_t g_logp, uintptr_t g_ent,
                              uintptr_t g_lse, uintptr_t g_extra, uintptr_t grad,
                              int64_t grad_row_stride, int64_t n_rows, int64_t vocab,
                              float inv_temp, uintptr_t inv_temp_rows, int64_t ignore_index,
                              int dtype, uintptr_t stream);

}  // namespace prefkern
