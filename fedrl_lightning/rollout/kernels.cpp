// CPU decode kernels of the lean decoder (fedrl_lightning/rollout/decoder.py), fp32, x86-64 AVX2 + FMA, built by
// torch.utils.cpp_extension.load (rollout/kernels.py). The kernels below take raw pointers; the functions bound to
// Python at the end take tensors, check them and read their pointers.
//
// skinny_linear: y[M, N] (+)= x[M, K] @ W[N, K]^T + bias, for the few rows (M = sequences decoded together) of a
// decode step. At such M a linear layer is bound by streaming W from memory once, so W is held as
// panels P[ceil(N / 8)][K][8] (8 output columns per panel, k-major, zero-padded), each thread streams a contiguous
// run of panels, and the stream is software-prefetched PREFETCH floats ahead (8 KB: measured best of 1-16 KB).
// Each panel is read from memory once for all M rows (rows go through it 8 at a time, from cache).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h (the whole C++ frontend): a build in 40% of the time

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#ifndef PREFETCH
#define PREFETCH 2048
#endif

namespace raw {

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

void skinny_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias, float* y,
                   int accumulate, int threads) {
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
void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t K, float eps) {
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
void rope_cache(float* qkv, const float* cos, const float* sin, float* kc, float* vc, int64_t B, int64_t H,
                int64_t KVH, int64_t D, int64_t T, int64_t pos) {
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
void attend(const float* qkv, const float* kc, const float* vc, const float* mask, float* out, int64_t B, int64_t H,
            int64_t KVH, int64_t D, int64_t T, int64_t L, int threads) {
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
void silu_mul(const float* gu, float* out, int64_t M, int64_t I) {
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


// pack_low_rank: panels P[n / 8][K][8] = beta * W[n, K] + alpha * B[n, R] @ A[R, K], laid out as skinny_linear reads
// them, in one read of W and one write of P: each 8 x 8 block of W is transposed in registers (8 rows become the 8
// lanes), and the low-rank term is R FMAs per k on the panel's 8 rows of B (held in a small buffer). R = 0: no B, A.
static inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                              __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

void pack_low_rank(const float* W, const float* A, const float* B, float* P, int64_t n, int64_t K, int64_t R,
                   float beta, float alpha, int64_t threads) {
  const int64_t panels = n / 8;
  at::parallel_for(0, panels, std::max<int64_t>(1, panels / std::max<int64_t>(1, threads)), [&](int64_t lo, int64_t hi) {
    std::vector<float> bp(8 * std::max<int64_t>(R, 1));
    const __m256 vbeta = _mm256_set1_ps(beta);
    for (int64_t p = lo; p < hi; ++p) {
      const float* w = W + p * 8 * K;
      float* out = P + p * K * 8;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < 8; ++j) bp[r * 8 + j] = alpha * B[(p * 8 + j) * R + r];
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 c[8];
        for (int j = 0; j < 8; ++j) c[j] = _mm256_loadu_ps(w + j * K + k);
        transpose8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
        for (int kk = 0; kk < 8; ++kk) {
          __m256 acc = _mm256_mul_ps(c[kk], vbeta);
          for (int64_t r = 0; r < R; ++r)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(A[r * K + k + kk]), _mm256_loadu_ps(bp.data() + r * 8), acc);
          _mm256_storeu_ps(out + (k + kk) * 8, acc);
        }
      }
      for (; k < K; ++k)
        for (int64_t j = 0; j < 8; ++j) {
          float acc = beta * w[j * K + k];
          for (int64_t r = 0; r < R; ++r) acc += A[r * K + k] * bp[r * 8 + j];
          out[k * 8 + j] = acc;
        }
    }
  });
}

}  // namespace raw

// The functions bound to Python: each checks its tensors, reads their pointers and calls its kernel above.
namespace {

constexpr int64_t kMaxHeadDim = 1024;  // rope_cache's row buffer
constexpr int64_t kMaxContext = 8192;  // attend's score buffer

// A tensor a kernel reads: fp32 on the CPU, copied into the dense layout the kernel indexes if it is strided.
at::Tensor input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat, "decode kernels read fp32 CPU tensors, got ",
                    name, " ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

// A tensor a kernel writes into in place must already be laid out as it indexes it: writes into a copy would be lost.
void writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                    "decode kernels write into contiguous fp32 CPU tensors, got ", name, " ", t.scalar_type(),
                    " strides ", t.strides());
}

// y[M, N] = x[M, K] @ W^T + bias for packed = pack(W) [ceil(N / 8), K, 8]; with a residual [M, N], added into it and
// the residual returned.
at::Tensor skinny_linear(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t n,
                         const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& residual) {
  const at::Tensor x = input(x_in, "x"), packed = input(packed_in, "packed");
  TORCH_CHECK_VALUE(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == 8 && packed.size(1) == x.size(1) &&
                        packed.size(0) == (n + 7) / 8,
                    "skinny_linear: x ", x.sizes(), " does not fit the panels ", packed.sizes(), " of ", n, " outputs");
  const int64_t m = x.size(0);
  const at::Tensor bias = bias_in ? input(*bias_in, "bias") : at::Tensor();
  TORCH_CHECK_VALUE(!bias.defined() || bias.numel() == n, "skinny_linear: bias of ", bias.sizes(), " for ", n);
  at::Tensor y = residual ? *residual : at::empty({m, n}, x.options());
  writable(y, "residual");
  TORCH_CHECK_VALUE(y.numel() == m * n, "skinny_linear: residual ", y.sizes(), " for ", m, " x ", n);
  raw::skinny_linear(x.data_ptr<float>(), m, x.size(1), packed.data_ptr<float>(), n,
                     bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), residual.has_value(),
                     at::get_num_threads());
  return y;
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const at::Tensor x = input(x_in, "x"), weight = input(weight_in, "weight");
  const int64_t k = x.dim() ? x.size(-1) : 0;
  TORCH_CHECK_VALUE(k > 0 && weight.numel() == k, "rms_norm: x ", x.sizes(), " with weight ", weight.sizes());
  at::Tensor y = at::empty_like(x);
  raw::rms_norm(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.numel() / k, k,
                static_cast<float>(eps));
  return y;
}

void rope_cache(const at::Tensor& qkv, const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& k_cache,
                const at::Tensor& v_cache, int64_t heads, int64_t pos) {
  writable(qkv, "qkv"), writable(k_cache, "k_cache"), writable(v_cache, "v_cache");
  const at::Tensor cos = input(cos_in, "cos"), sin = input(sin_in, "sin");
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "rope_cache: caches ", k_cache.sizes(),
                    " and ", v_cache.sizes());
  const int64_t b = k_cache.size(0), kvh = k_cache.size(1), t = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK_VALUE(d <= kMaxHeadDim && 0 <= pos && pos < t && qkv.numel() == b * (heads + 2 * kvh) * d &&
                        cos.numel() == b * d && sin.numel() == b * d,
                    "rope_cache: qkv ", qkv.sizes(), ", cos ", cos.sizes(), ", caches ", k_cache.sizes(), " at ", pos);
  raw::rope_cache(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                  v_cache.data_ptr<float>(), b, heads, kvh, d, t, pos);
}

at::Tensor attend(const at::Tensor& qkv_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& mask_in,
                  int64_t heads, int64_t length) {
  const at::Tensor qkv = input(qkv_in, "qkv"), k_cache = input(k_in, "k_cache"), v_cache = input(v_in, "v_cache"),
                   mask = input(mask_in, "mask");
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "attend: caches ", k_cache.sizes(),
                    " and ", v_cache.sizes());
  const int64_t b = k_cache.size(0), kvh = k_cache.size(1), t = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK_VALUE(heads > 0 && heads % kvh == 0 && 0 < length && length <= t && length <= kMaxContext &&
                        qkv.numel() == b * (heads + 2 * kvh) * d && mask.numel() == b * t,
                    "attend: qkv ", qkv.sizes(), ", mask ", mask.sizes(), ", caches ", k_cache.sizes(), " over ",
                    length, " positions");
  at::Tensor out = at::empty({b, heads * d}, qkv.options());
  raw::attend(qkv.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), mask.data_ptr<float>(),
              out.data_ptr<float>(), b, heads, kvh, d, t, length, at::get_num_threads());
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = input(gate_up_in, "gate_up");
  TORCH_CHECK_VALUE(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up ", gate_up.sizes());
  const int64_t m = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({m, width}, gate_up.options());
  raw::silu_mul(gate_up.data_ptr<float>(), out.data_ptr<float>(), m, width);
  return out;
}


// out[n / 8, K, 8] = pack(beta * W + alpha * B @ A) (W [n, K], n a multiple of 8; B [n, R] and A [R, K], or both
// None), written in place.
void pack_low_rank(const at::Tensor& w_in, const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& a_in,
                   const at::Tensor& out, double beta, double alpha) {
  const at::Tensor w = input(w_in, "W");
  const at::Tensor b = b_in ? input(*b_in, "B") : at::Tensor(), a = a_in ? input(*a_in, "A") : at::Tensor();
  writable(out, "out");
  const int64_t n = w.size(0), k = w.size(1), r = b.defined() ? b.size(1) : 0;
  TORCH_CHECK_VALUE(w.dim() == 2 && n % 8 == 0 && out.numel() == n * k && b.defined() == a.defined() &&
                        (!b.defined() || (b.size(0) == n && a.size(0) == r && a.size(1) == k)),
                    "pack_low_rank: W ", w.sizes(), ", B ", b.sizes(), ", A ", a.sizes(), " into ", out.sizes());
  raw::pack_low_rank(w.data_ptr<float>(), r ? a.data_ptr<float>() : nullptr, r ? b.data_ptr<float>() : nullptr,
                     out.data_ptr<float>(), n, k, r, static_cast<float>(beta), static_cast<float>(alpha),
                     at::get_num_threads());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, like torch's own ops: other Python threads (loggers, heartbeats) run while a kernel does.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("skinny_linear", &skinny_linear, nogil());
  m.def("rms_norm", &rms_norm, nogil());
  m.def("rope_cache", &rope_cache, nogil());
  m.def("attend", &attend, nogil());
  m.def("silu_mul", &silu_mul, nogil());
  m.def("pack_low_rank", &pack_low_rank, nogil());
}
