// CPU decode kernels of the lean decoder (fedrl_lightning/rollout/decoder.py), fp32, x86-64 AVX2 + FMA.
//
// skinny_linear: y[M, N] (+)= x[M, K] @ W[N, K]^T + bias, for the few rows (M = sequences decoded together) of a
// decode step. At such M a linear layer is bound by streaming W from memory once, so W is held as
// panels P[ceil(N / 8)][K][8] (8 output columns per panel, k-major, zero-padded), each thread streams a contiguous
// run of panels, and the stream is software-prefetched PREFETCH floats ahead (8 KB: measured best of 1-16 KB).
// Each panel is read from memory once for all M rows (rows go through it 8 at a time, from cache).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef PREFETCH
#define PREFETCH 2048
#endif

template <int R>
static inline void panel(const float* __restrict x, int64_t K, const float* __restrict p, float* __restrict y,
                         int64_t ldy, int cols, const float* __restrict bias, bool accumulate) {
  // Every loop over rows is unrolled, so the accumulators live in registers only (without it GCC also stored each
  // one to the stack after every FMA, and the store port, not memory, bounded the kernel).
  float init[R][8] = {};
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) init[r][c] = (bias ? bias[c] : 0.0f) + (accumulate ? y[r * ldy + c] : 0.0f);
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(init[r]);
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + k * 8 + PREFETCH), _MM_HINT_T0);
    const __m256 w = _mm256_loadu_ps(p + k * 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k), w, acc[r]);
  }
  float out[R][8];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, out[r], sizeof(float) * cols);
}

extern "C" void skinny_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N,
                              const float* bias, float* y, int accumulate, int threads) {
  const int64_t panels = (N + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < panels; ++j) {
    const float* p = packed + j * K * 8;
    const float* b = bias ? bias + j * 8 : nullptr;
    const int cols = static_cast<int>(N - j * 8 < 8 ? N - j * 8 : 8);
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) panel<8>(x + m * K, K, p, y + m * N + j * 8, N, cols, b, accumulate);
    const float* xm = x + m * K;
    float* ym = y + m * N + j * 8;
    switch (M - m) {
      case 7: panel<7>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 6: panel<6>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 5: panel<5>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 4: panel<4>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 3: panel<3>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 2: panel<2>(xm, K, p, ym, N, cols, b, accumulate); break;
      case 1: panel<1>(xm, K, p, ym, N, cols, b, accumulate); break;
      default: break;
    }
  }
}

// y[M, K] = x * rsqrt(mean(x^2) + eps) * w, row by row (HF's RMSNorm in fp32).
extern "C" void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t K, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    double ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(xr[k]) * xr[k];
    const float scale = 1.0f / std::sqrt(static_cast<float>(ss / K) + eps);
    for (int64_t k = 0; k < K; ++k) y[m * K + k] = xr[k] * scale * w[k];
  }
}

// One decode position of rotate-half RoPE and the KV-cache write, for qkv[B, (H + 2 KVH), D] as the fused
// projection lays it out: q heads rotated in place, rotated k and plain v written to cache[B, KVH, T, D] at pos.
// cos/sin are [B, D] with sin's first half negated: rope(x)[i] = x[i] cos[i] + x[(i + D/2) % D] sin[i].
extern "C" void rope_cache(float* qkv, const float* cos, const float* sin, float* kc, float* vc, int64_t B,
                           int64_t H, int64_t KVH, int64_t D, int64_t T, int64_t pos) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  float tmp[1024];
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv + b * width;
    const float* c = cos + b * D;
    const float* s = sin + b * D;
    for (int64_t head = 0; head < H + KVH; ++head) {
      float* x = row + head * D;
      for (int64_t i = 0; i < D; ++i) tmp[i] = x[i] * c[i] + x[(i + half) % D] * s[i];
      float* dst = head < H ? x : kc + ((b * KVH + (head - H)) * T + pos) * D;
      std::memcpy(dst, tmp, sizeof(float) * D);
    }
    for (int64_t head = 0; head < KVH; ++head)
      std::memcpy(vc + ((b * KVH + head) * T + pos) * D, row + (H + KVH + head) * D, sizeof(float) * D);
  }
}

// Attention of one new token per sequence over cache positions [0, L): out[B, H * D] from the (scaled, rotated)
// q heads in qkv[B, (H + 2 KVH), D], caches [B, KVH, T, D], an additive key mask[B, T]; grouped-query heads share
// their kv head.
extern "C" void attend(const float* qkv, const float* kc, const float* vc, const float* mask, float* out,
                       int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t T, int64_t L, int threads) {
  const int64_t group = H / KVH, width = (H + 2 * KVH) * D;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, head = bh % H, kv = b * KVH + head / group;
    const float* q = qkv + b * width + head * D;
    const float* keys = kc + kv * T * D;
    const float* values = vc + kv * T * D;
    const float* mrow = mask + b * T;
    float scores[8192];
    float top = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + t * D + i), acc);
      float lanes[8];
      _mm256_storeu_ps(lanes, acc);
      float dot = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
      for (; i < D; ++i) dot += q[i] * keys[t * D + i];
      scores[t] = dot + mrow[t];
      top = scores[t] > top ? scores[t] : top;
    }
    float total = 0;
    for (int64_t t = 0; t < L; ++t) total += (scores[t] = std::exp(scores[t] - top));
    float* __restrict o = out + b * H * D + head * D;
    const float inv = 1.0f / total;
    int64_t i = 0;
    for (; i + 32 <= D; i += 32) {  // four registers of the output head per pass over the values
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < L; ++t) {
        const __m256 w = _mm256_set1_ps(scores[t] * inv);
        const float* v = values + t * D + i;
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
      }
      _mm256_storeu_ps(o + i, a0);
      _mm256_storeu_ps(o + i + 8, a1);
      _mm256_storeu_ps(o + i + 16, a2);
      _mm256_storeu_ps(o + i + 24, a3);
    }
    for (; i < D; ++i) {
      float acc = 0;
      for (int64_t t = 0; t < L; ++t) acc += scores[t] * inv * values[t * D + i];
      o[i] = acc;
    }
  }
}

// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
// below 2e-7, about fp32 rounding), times 2^n built in the exponent bits; inputs clamped to fp32's range.
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 in two parts, for accuracy
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// out[M, I] = silu(gu[:, :I]) * gu[:, I:] for the fused gate/up projection gu[M, 2I].
extern "C" void silu_mul(const float* gu, float* out, int64_t M, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gu + m * 2 * I;
    const float* u = g + I;
    float* o = out + m * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}
