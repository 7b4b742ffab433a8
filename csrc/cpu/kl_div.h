#pragma once
#include <cstdint>

namespace forge {

// KL(softmax(t/T) || softmax(s/T)) per row of raw logits (Hinton et al. 2015), one read of each row
// with a blockwise online softmax (Milakov & Gimelshein 2018). Rows where mask[r] == 0 give 0 (mask may
// be 0: keep all). Writes loss[r], lse_s[r] = logsumexp(s_r/T), lse_t[r] (float32); lse_s and lse_t may be 0
// when only the loss is wanted (no backward to come). Rows are threaded.
void kl_div_forward_cpu(uintptr_t student, uintptr_t teacher, uintptr_t mask, uintptr_t loss, uintptr_t lse_s,
                        uintptr_t lse_t, int64_t rows, int64_t vocab, int64_t s_stride, int64_t t_stride, int dtype,
                        float inv_t, int num_threads);

// grad[r, i] = (exp(s/T - lse_s) - exp(t/T - lse_t)) * row_scale[r], in the logits' dtype; one read of
// each row. grad may be the student itself (each block is read before it is written); rows with
// row_scale 0 get zeros.
void kl_div_backward_cpu(uintptr_t student, uintptr_t teacher, uintptr_t lse_s, uintptr_t lse_t, uintptr_t row_scale,
                         uintptr_t grad, int64_t rows, int64_t vocab, int64_t s_stride, int64_t t_stride,
                         int64_t g_stride, int dtype, float inv_t, int num_threads);

// The reduction of per-row losses (0 on masked rows) into *out: reduction 1 = sum, 2 = mean (over kept rows x
// vocab), 3 = batchmean (over kept rows; mask 0 keeps all). Sums in double in row order (the same value whatever
// the thread count), rounds the sum to float, then divides in float by the divisor (at least 1), which it returns.
double kl_div_reduce_cpu(uintptr_t loss, uintptr_t mask, int64_t rows, int64_t vocab, int reduction, uintptr_t out);

// kl_div_forward_cpu and kl_div_reduce_cpu in one call, for a loss nothing differentiates: the per-row losses
// live in a scratch buffer, *out gets the reduced loss (float32). Returns the divisor.
double kl_div_loss_cpu(uintptr_t student, uintptr_t teacher, uintptr_t mask, int64_t rows, int64_t vocab,
                       int64_t s_stride, int64_t t_stride, int dtype, float inv_t, int reduction, uintptr_t out,
                       int num_threads);

}  // namespace forge
