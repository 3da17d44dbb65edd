#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kTileCols = 4;

// acc[n * 4 + m] holds 16 lane partials of y[m, n]; returns y's 4x4 block, element 4 * m + n.
inline __m512 reduce_4x4(const __m512* acc) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit lanes 0+2 and 1+3: [a01, a23 | b01, b23]
    const __m512 a = acc[2 * i], b = acc[2 * i + 1];
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // lane L = 4 partials of acc[4 * i + L]
    const __m512 a = halves[2 * i], b = halves[2 * i + 1];
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // within lanes: 4 partials -> 2, two vectors interleaved
    const __m512 a = quarters[2 * i], b = quarters[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  // lane L, element i = sum of acc[L + 4 * i]
  return _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88), _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD));
}

// y[0:4, 0:4] = x[0:4] . w[0:4] (+ b), rows K apart; columns [pf_begin, pf_end) of the weight
// rows at `next` (same stride) are prefetched on the way.
inline void tile_4x4(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                     const float* b, const float* next, int64_t pf_begin, int64_t pf_end) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  // NOTE: the masked tail is a separate copy of the loop body on purpose: a mask computed in the
  // main loop costs ~2x at 16+ rows (the accumulators no longer stay in registers).
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[4];
    for (int n = 0; n < 4; ++n) wv[n] = _mm512_loadu_ps(w + n * K + k);
    if (k >= pf_begin && k < pf_end)
      for (int n = 0; n < 4; ++n) _mm_prefetch(reinterpret_cast<const char*>(next + n * K + k), _MM_HINT_T1);
    for (int m = 0; m < 4; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < 4; ++n) acc[n * 4 + m] = _mm512_fmadd_ps(xv, wv[n], acc[n * 4 + m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[4];
    for (int n = 0; n < 4; ++n) wv[n] = _mm512_maskz_loadu_ps(mask, w + n * K + k);
    for (int m = 0; m < 4; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int n = 0; n < 4; ++n) acc[n * 4 + m] = _mm512_fmadd_ps(xv, wv[n], acc[n * 4 + m]);
    }
  }
  __m512 r = reduce_4x4(acc);
  if (b != nullptr) r = _mm512_add_ps(r, _mm512_broadcast_f32x4(_mm_loadu_ps(b)));
  _mm_storeu_ps(y, _mm512_extractf32x4_ps(r, 0));
  _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(r, 3));
}

// Edges: ROWS rows of x times COLS weight rows, each dot product reduced on its own.
template <int ROWS, int COLS>
inline void tile_edge(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                      const float* b) {
  __m512 acc[ROWS][COLS];
  for (int m = 0; m < ROWS; ++m)
    for (int n = 0; n < COLS; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[COLS];
    for (int n = 0; n < COLS; ++n) wv[n] = _mm512_loadu_ps(w + n * K + k);
    for (int m = 0; m < ROWS; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < COLS; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[COLS];
    for (int n = 0; n < COLS; ++n) wv[n] = _mm512_maskz_loadu_ps(mask, w + n * K + k);
    for (int m = 0; m < ROWS; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int n = 0; n < COLS; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int n = 0; n < COLS; ++n) {
      const float s = _mm512_reduce_add_ps(acc[m][n]);
      y[m * ldy + n] = b != nullptr ? s + b[n] : s;
    }
}

// All rows of x against weight rows [n, n + 4) (COLS == 4, prefetching `next`) or one row.
template <int COLS>
inline void column_tile(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, float* y,
                        int64_t ldy, const float* b, const float* next) {
  int64_t m = 0;
  if constexpr (COLS == 4) {
    // Each pass over 4 rows of x prefetches its share of the next weight rows' columns, so the
    // memory stream runs through all passes instead of the first only.
    const int64_t passes = M / 4, share = next == nullptr || passes == 0 ? 0 : ((K + passes - 1) / passes + 15) & ~15;
    for (int64_t p = 0; m + 4 <= M; m += 4, ++p)
      tile_4x4(x + m * ldx, ldx, w, K, y + m * ldy, ldy, b, next, p * share, (p + 1) * share);
  } else {
    for (; m + 4 <= M; m += 4) tile_edge<4, COLS>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, b);
  }
  for (; m < M; ++m) tile_edge<1, COLS>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, b);
}
#endif

void skinny_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "skinny_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "skinny_linear: x must be [M, K] with unit column stride");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "skinny_linear: weight must be a contiguous [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous(),
              "skinny_linear: out must be a contiguous [M, N]");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "skinny_linear: bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
#if defined(__AVX512F__)
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const int64_t full_tiles = N / kTileCols;
  // At least ~64 KB of weight per thread's share: smaller layers are not worth a fork.
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / (kTileCols * std::max<int64_t>(K, 1)));
  at::parallel_for(0, full_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * kTileCols;
      const float* next = t + 1 < full_tiles ? wp + (n + kTileCols) * K : nullptr;
      column_tile<4>(xp, ldx, M, wp + n * K, K, yp + n, N, bp != nullptr ? bp + n : nullptr, next);
    }
  });
  for (int64_t n = full_tiles * kTileCols; n < N; ++n)
    column_tile<1>(xp, ldx, M, wp + n * K, K, yp + n, N, bp != nullptr ? bp + n : nullptr, nullptr);
#else
  TORCH_CHECK(false, "skinny_linear: built without AVX-512");
#endif
}

}  // namespace

TORCH_LIBRARY(pagedserve_cpu_gemm, m) {
  m.def("skinny_linear(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu_gemm, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
