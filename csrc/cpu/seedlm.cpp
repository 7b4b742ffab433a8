#include "cpu/seedlm.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common.h"

namespace forge {
namespace {

// 16 float lanes (one AVX-512 register; GCC splits it into narrower ones on older ISAs).
constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

constexpr int kMaxC = 32, kMaxP = 8;
constexpr int kSeedChunk = 64;  // bases and pseudo-inverses of 64 seeds at a time stay in L1

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FORGE_NO_CLONES)
#define FORGE_SEEDLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FORGE_SEEDLM_CLONES
#endif

inline uint32_t lfsr_step(uint32_t state, uint32_t taps_mask, int K) {
  uint32_t bk = static_cast<uint32_t>(__builtin_parity(state & taps_mask));
  return (state >> 1) | (bk << (K - 1));
}

inline float normalize_state(uint32_t v, int K) {
  double half = static_cast<double>(1u << (K - 1));
  return static_cast<float>((static_cast<double>(v) - half) / (half - 1.0));
}

// U^+ = R^-1 Q^T from a modified Gram-Schmidt QR of U (C x P, row-major) in float64; false if U is
// rank-deficient (a diagonal of R below 1e-9 of its column's norm) or the result is not finite.
bool pseudo_inverse(const float* u, int C, int P, float* pinv) {
  double q[kMaxP][kMaxC], r[kMaxP][kMaxP] = {};
  for (int p = 0; p < P; ++p) {
    double norm0 = 0.0;
    for (int c = 0; c < C; ++c) {
      q[p][c] = u[c * P + p];
      norm0 += q[p][c] * q[p][c];
    }
    for (int j = 0; j < p; ++j) {
      double d = 0.0;
      for (int c = 0; c < C; ++c) d += q[j][c] * q[p][c];
      r[j][p] = d;
      for (int c = 0; c < C; ++c) q[p][c] -= d * q[j][c];
    }
    double norm = 0.0;
    for (int c = 0; c < C; ++c) norm += q[p][c] * q[p][c];
    norm = std::sqrt(norm);
    if (!(norm > 1e-9 * std::sqrt(norm0))) return false;
    r[p][p] = norm;
    for (int c = 0; c < C; ++c) q[p][c] /= norm;
  }
  for (int c = 0; c < C; ++c) {  // solve R x = Q^T e_c by back substitution, column c of U^+
    double x[kMaxP];
    for (int p = P - 1; p >= 0; --p) {
      double s = q[p][c];
      for (int j = p + 1; j < P; ++j) s -= r[p][j] * x[j];
      x[p] = s / r[p][p];
      pinv[p * C + c] = static_cast<float>(x[p]);
      if (!std::isfinite(pinv[p * C + c])) return false;
    }
  }
  return true;
}

// The bases of up to kSeedChunk consecutive seeds of the walk, generated from the LFSR as the walk goes on.
struct SeedChunk {
  int count = 0;
  uint32_t state[kSeedChunk];
  bool valid[kSeedChunk];
  float u[kSeedChunk][kMaxC * kMaxP];
  float pinv[kSeedChunk][kMaxP * kMaxC];
};

class Walker {
 public:
  // Invariant at the start of a chunk that begins at walk index i0: seed_ = walk[i0] and positions
  // [0, CP) of raw_/norm_ hold walk[i0 + 1 .. i0 + CP], the window (basis) of seed walk[i0].
  Walker(int C, int P, int K, uint32_t taps, int64_t start)
      : C_(C), P_(P), cp_(C * P), K_(K), taps_(taps), raw_(kSeedChunk + cp_), norm_(kSeedChunk + cp_) {
    for (int64_t i = 0; i < start; ++i) state_ = lfsr_step(state_, taps_, K_);
    seed_ = state_;  // walk[start]
    for (int i = 0; i < cp_; ++i) push(i);
  }
  void fill(SeedChunk& chunk, int count) {
    for (int j = 0; j < count; ++j) {
      chunk.state[j] = j == 0 ? seed_ : raw_[j - 1];
      std::memcpy(chunk.u[j], &norm_[j], sizeof(float) * cp_);
      chunk.valid[j] = pseudo_inverse(chunk.u[j], C_, P_, chunk.pinv[j]);
      push(cp_ + j);
    }
    seed_ = raw_[count - 1];
    std::memmove(raw_.data(), raw_.data() + count, sizeof(uint32_t) * cp_);
    std::memmove(norm_.data(), norm_.data() + count, sizeof(float) * cp_);
    chunk.count = count;
  }

 private:
  void push(int at) {
    state_ = lfsr_step(state_, taps_, K_);
    raw_[at] = state_;
    norm_[at] = normalize_state(state_, K_);
  }
  int C_, P_, cp_, K_;
  uint32_t taps_, state_ = 1, seed_ = 1;
  std::vector<uint32_t> raw_;
  std::vector<float> norm_;
};

}  // namespace
}  // namespace forge

namespace forge {
namespace {

__attribute__((always_inline)) inline vf splat(float x) { return vf{} + x; }
__attribute__((always_inline)) inline vi splat_i(int32_t x) { return vi{} + x; }
__attribute__((always_inline)) inline vf abs_v(vf x) { return (vf)((vi)x & 0x7fffffff); }

// Shared exponent e = ceil(log2(amax / 7.5)) clamped to [-8, 7], read exactly from amax's bits (no division,
// no log): with amax = m 2^k, m in [1, 2), amax / 7.5 = (m / 1.875) 2^(k-2), so e = k - 2 + (m > 1.875).
// amax = 0 (or subnormal) gives e = -8. Equals frexp's rule in forge/ops/seedlm.py bit for bit.
__attribute__((always_inline)) inline vi shared_exponent(vf amax) {
  vi bits = (vi)amax;
  vi e = ((bits >> 23) & 0xff) - 129 - ((bits & 0x7fffff) > 0x700000);  // a true comparison is -1
  e = e < splat_i(-8) ? splat_i(-8) : e;
  return e > splat_i(7) ? splat_i(7) : e;
}

// round half to even of x in [-8, 7] (the magic-number trick; exact for |x| < 2^22 without -ffast-math).
__attribute__((always_inline)) inline vf round_even(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  return (x + magic) - magic;
}

struct Best {  // the best seed so far of each block, lane-major: [vector][lane], q as [vector][p][lane]
  float* err;
  int32_t* state;
  float* q;
  int32_t* e;
};

// One chunk of seeds against nv vectors of 16 blocks (wt: [vector][c][lane]). Per (seed, block):
//   t = U^+ w ; e = shared exponent ; q = round(clamp(t 2^-e, -8, 7)) ; err = ||w - U (q 2^e)||^2
// and the block keeps the seed if err is strictly lower (ties keep the earlier seed of the walk).
template <int CT, int PT>
__attribute__((always_inline)) inline void search_chunk(const float* __restrict wt, int64_t nv, int C_rt, int P_rt,
                                                        const SeedChunk& ch, Best best) {
  const int C = CT ? CT : C_rt, P = PT ? PT : P_rt;
  for (int64_t v = 0; v < nv; ++v) {
    vf w[CT ? CT : kMaxC], bq[PT ? PT : kMaxP], be;
    vi bs, bexp;
    for (int c = 0; c < C; ++c) std::memcpy(&w[c], wt + (v * C + c) * kLanes, sizeof(vf));
    std::memcpy(&be, best.err + v * kLanes, sizeof(vf));
    std::memcpy(&bs, best.state + v * kLanes, sizeof(vi));
    std::memcpy(&bexp, best.e + v * kLanes, sizeof(vi));
    for (int p = 0; p < P; ++p) std::memcpy(&bq[p], best.q + (v * P + p) * kLanes, sizeof(vf));
    for (int j = 0; j < ch.count; ++j) {
      if (!ch.valid[j]) continue;
      const float* pinv = ch.pinv[j];
      const float* u = ch.u[j];
      vf t[PT ? PT : kMaxP], amax = {};
      for (int p = 0; p < P; ++p) {
        vf acc = pinv[p * C] * w[0];
        for (int c = 1; c < C; ++c) acc += pinv[p * C + c] * w[c];
        t[p] = acc;
        vf a = abs_v(acc);
        amax = a > amax ? a : amax;
      }
      vi e = shared_exponent(amax);
      vf inv_scale = (vf)((splat_i(127) - e) << 23), scale = (vf)((e + 127) << 23);
      vf q[PT ? PT : kMaxP], th[PT ? PT : kMaxP];
      for (int p = 0; p < P; ++p) {
        vf x = t[p] * inv_scale;
        x = x < splat(-8.0f) ? splat(-8.0f) : x;
        x = x > splat(7.0f) ? splat(7.0f) : x;
        q[p] = round_even(x);
        th[p] = q[p] * scale;
      }
      vf err = {};
      for (int c = 0; c < C; ++c) {
        vf r = w[c];
        for (int p = 0; p < P; ++p) r -= u[c * P + p] * th[p];
        err += r * r;
      }
      vi better = err < be;
      be = better ? err : be;
      bs = better ? splat_i(static_cast<int32_t>(ch.state[j])) : bs;
      bexp = better ? e : bexp;
      for (int p = 0; p < P; ++p) bq[p] = better ? q[p] : bq[p];
    }
    std::memcpy(best.err + v * kLanes, &be, sizeof(vf));
    std::memcpy(best.state + v * kLanes, &bs, sizeof(vi));
    std::memcpy(best.e + v * kLanes, &bexp, sizeof(vi));
    for (int p = 0; p < P; ++p) std::memcpy(best.q + (v * P + p) * kLanes, &bq[p], sizeof(vf));
  }
}

// One vectorized clone per shape (target_clones does not apply to templates): the paper's two
// configurations with C and P known at compile time, and any other shape.
#define FORGE_SEEDLM_SEARCH(NAME, CT, PT)                                                               \
  FORGE_SEEDLM_CLONES void NAME(const float* wt, int64_t nv, int C, int P, const SeedChunk& ch, Best b) { \
    search_chunk<CT, PT>(wt, nv, C, P, ch, b);                                                          \
  }
FORGE_SEEDLM_SEARCH(search_8x3, 8, 3)
FORGE_SEEDLM_SEARCH(search_12x4, 12, 4)
FORGE_SEEDLM_SEARCH(search_any, 0, 0)

using SearchFn = void (*)(const float*, int64_t, int, int, const SeedChunk&, Best);

SearchFn pick_search(int C, int P) {
  if (C == 8 && P == 3) return search_8x3;
  if (C == 12 && P == 4) return search_12x4;
  return search_any;
}

// Blocks [v0 * 16, v1 * 16) of (n, C) as [vector][c][lane], the lanes past n zero.
std::vector<float> transpose_blocks(const float* w, int64_t n, int C, int64_t v0, int64_t v1) {
  std::vector<float> wt(static_cast<size_t>((v1 - v0) * C * kLanes), 0.0f);
  for (int64_t v = v0; v < v1; ++v)
    for (int lane = 0; lane < kLanes; ++lane) {
      int64_t b = v * kLanes + lane;
      if (b >= n) break;
      for (int c = 0; c < C; ++c) wt[((v - v0) * C + c) * kLanes + lane] = w[b * C + c];
    }
  return wt;
}

// The search of one range of the walk [i0, i1) against all blocks; the results land in `best`.
void search_range(const float* wt, int64_t nv, int C, int P, int K, uint32_t taps, int64_t i0, int64_t i1,
                  Best best) {
  const SearchFn search = pick_search(C, P);
  auto chunk = std::make_unique<SeedChunk>();
  Walker walker(C, P, K, taps, i0);
  for (int64_t i = i0; i < i1; i += kSeedChunk) {
    walker.fill(*chunk, static_cast<int>(std::min<int64_t>(kSeedChunk, i1 - i)));
    search(wt, nv, C, P, *chunk, best);
  }
}

}  // namespace

// Threads split the seeds (each walks its own stretch of the LFSR, so every basis and pseudo-inverse is
// built once whatever the thread count), then the per-thread winners merge in walk order.
void seedlm_search_cpu(uintptr_t blocks, int64_t n, int C, int P, int K, uint32_t taps_mask, int64_t num_seeds,
                       uintptr_t seeds, uintptr_t q, uintptr_t e, uintptr_t err, int num_threads) {
  const int64_t nv = (n + kLanes - 1) / kLanes, lanes = nv * kLanes;
  const std::vector<float> wt = transpose_blocks(reinterpret_cast<const float*>(blocks), n, C, 0, nv);
  const int64_t chunks = (num_seeds + kSeedChunk - 1) / kSeedChunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks));
  const int64_t per = (chunks + threads - 1) / threads * kSeedChunk;
  std::vector<float> best_err(threads * lanes, INFINITY), best_q(threads * lanes * P, 0.0f);
  std::vector<int32_t> best_state(threads * lanes, 0), best_e(threads * lanes, -8);
  parallel_for(threads, num_threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Best best{&best_err[t * lanes], &best_state[t * lanes], &best_q[t * lanes * P], &best_e[t * lanes]};
      search_range(wt.data(), nv, C, P, K, taps_mask, std::min(num_seeds, t * per),
                   std::min(num_seeds, (t + 1) * per), best);
    }
  });
  for (int64_t b = 0; b < n; ++b) {
    const int64_t v = b / kLanes, lane = b % kLanes;
    int64_t win = 0;  // strictly lower error only: a tie keeps the earlier stretch of the walk
    for (int64_t t = 1; t < threads; ++t)
      if (best_err[t * lanes + b] < best_err[win * lanes + b]) win = t;
    const int64_t at = win * lanes + b;
    reinterpret_cast<int32_t*>(seeds)[b] = best_state[at];
    reinterpret_cast<int8_t*>(e)[b] = static_cast<int8_t>(best_e[at]);
    reinterpret_cast<float*>(err)[b] = best_err[at];
    for (int p = 0; p < P; ++p)
      reinterpret_cast<int8_t*>(q)[b * P + p] =
          static_cast<int8_t>(best_q[win * lanes * P + (v * P + p) * kLanes + lane]);
  }
}

namespace {

// Block b = U(seed) . (q * 2^e), U(seed) = walk[position[seed] + 1 ...] as C x P row-major.
inline void decode_block(const float* walk, const int32_t* position, const int32_t* seeds, const int8_t* q,
                         const int8_t* e, int64_t b, int C, int P, float* out) {
  const float* u = walk + position[seeds[b]] + 1;
  const float scale = std::ldexp(1.0f, e[b]);
  float th[kMaxP];
  for (int p = 0; p < P; ++p) th[p] = static_cast<float>(q[b * P + p]) * scale;
  for (int c = 0; c < C; ++c) {
    float acc = 0.0f;
    for (int p = 0; p < P; ++p) acc += u[c * P + p] * th[p];
    out[c] = acc;
  }
}

FORGE_SEEDLM_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float total = 0.0f;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace

float dot_f32(const float* a, const float* b, int64_t n) { return dot(a, b, n); }

void seedlm_decode_cpu(uintptr_t seeds, uintptr_t q, uintptr_t e, int64_t n, int C, int P, uintptr_t walk,
                       uintptr_t position, uintptr_t out, int num_threads) {
  parallel_for(n, num_threads, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      decode_block(reinterpret_cast<const float*>(walk), reinterpret_cast<const int32_t*>(position),
                   reinterpret_cast<const int32_t*>(seeds), reinterpret_cast<const int8_t*>(q),
                   reinterpret_cast<const int8_t*>(e), b, C, P, reinterpret_cast<float*>(out) + b * C);
  });
}

void seedlm_linear_cpu(uintptr_t x, int64_t m, int64_t k, int64_t n_out, uintptr_t seeds, uintptr_t q, uintptr_t e,
                       int C, int P, uintptr_t walk, uintptr_t position, uintptr_t y, int num_threads) {
  constexpr int64_t kRows = 16;  // output rows rebuilt at a time: 16 x k floats stay in L1/L2
  const float* xs = reinterpret_cast<const float*>(x);
  float* ys = reinterpret_cast<float*>(y);
  const int64_t tiles = (n_out + kRows - 1) / kRows;
  parallel_for(tiles, num_threads, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, k * kRows)),
               [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(static_cast<size_t>(kRows * k));
    float block[kMaxC];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRows, r1 = std::min(n_out, r0 + kRows), lo = r0 * k, hi = r1 * k;
      for (int64_t b = lo / C; b * C < hi; ++b) {
        decode_block(reinterpret_cast<const float*>(walk), reinterpret_cast<const int32_t*>(position),
                     reinterpret_cast<const int32_t*>(seeds), reinterpret_cast<const int8_t*>(q),
                     reinterpret_cast<const int8_t*>(e), b, C, P, block);
        for (int c = 0; c < C; ++c) {
          const int64_t idx = b * C + c;
          if (idx >= lo && idx < hi) tile[idx - lo] = block[c];
        }
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = r0; r < r1; ++r) ys[i * n_out + r] = dot(xs + i * k, tile.data() + (r - r0) * k, k);
    }
  });
}

}  // namespace forge
