#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_math.h"

namespace {

#if defined(__AVX512F__)
using pagedserve::exp16;
using pagedserve::first_lanes;
#endif

// Rows per parallel chunk: about 16K floats of work, so decode-sized tensors fork at most once.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

void check_rows(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": float32 only");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1 && t.size(1) == width, name,
              ": must be [rows, ", width, "] with unit column stride");
}

#if defined(__AVX512F__)


// out = s * (1 / sqrt(mean(s^2) + eps)) * w with s = x (+ r, also stored to sum): transformers'
// order of operations, float32 throughout.
template <bool kAdd>
inline void norm_row(float* out, float* sum, const float* x, const float* r, const float* w, int64_t H, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < H; k += 16) {
    const __mmask16 m = first_lanes(H - k);
    __m512 s = _mm512_maskz_loadu_ps(m, x + k);
    if constexpr (kAdd) {
      s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, r + k));
      _mm512_mask_storeu_ps(sum + k, m, s);
    }
    acc = _mm512_fmadd_ps(s, s, acc);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(H) + eps);
  const float* src = kAdd ? sum : x;
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < H; k += 16) {
    const __mmask16 m = first_lanes(H - k);
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + k), scale);
    _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + k), s));
  }
}

// out = silu(g) * u, silu(g) = g / (1 + exp(-g)); exp only ever sees -|g| (no overflow).
inline void silu_and_mul_row(float* out, const float* g, const float* u, int64_t D) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t k = 0; k < D; k += 16) {
    const __mmask16 m = first_lanes(D - k);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + k);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));  // exp(-|g|)
    const __mmask16 negative = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    // g >= 0: g / (1 + e); g < 0: g * e / (1 + e)  (both g * sigmoid(g))
    const __m512 numerator = _mm512_mask_mul_ps(gv, negative, gv, e);
    const __m512 act = _mm512_div_ps(numerator, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(act, _mm512_maskz_loadu_ps(m, u + k)));
  }
}
#endif

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t H = weight.numel();
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1,
              "rms_norm: weight must be a contiguous float32 [hidden]");
  check_rows(x, H, "rms_norm: x");
  check_rows(out, H, "rms_norm: out");
  TORCH_CHECK(out.size(0) == x.size(0), "rms_norm: out and x differ in rows");
#if defined(__AVX512F__)
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  at::parallel_for(0, x.size(0), row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      norm_row<false>(op + i * ldo, nullptr, xp + i * ldx, nullptr, wp, H, static_cast<float>(eps));
  });
#else
  TORCH_CHECK(false, "rms_norm: built without AVX-512");
#endif
}

void fused_add_rms_norm(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                        const at::Tensor& weight, double eps) {
  const int64_t H = weight.numel();
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1,
              "fused_add_rms_norm: weight must be a contiguous float32 [hidden]");
  check_rows(x, H, "fused_add_rms_norm: x");
  check_rows(residual, H, "fused_add_rms_norm: residual");
  check_rows(out, H, "fused_add_rms_norm: out");
  check_rows(residual_out, H, "fused_add_rms_norm: residual_out");
  const int64_t M = x.size(0);
  TORCH_CHECK(residual.size(0) == M && out.size(0) == M && residual_out.size(0) == M,
              "fused_add_rms_norm: x, residual and the outputs differ in rows");
#if defined(__AVX512F__)
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = residual_out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldr = residual.stride(0), ldo = out.stride(0), lds = residual_out.stride(0);
  at::parallel_for(0, M, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      norm_row<true>(op + i * ldo, sp + i * lds, xp + i * ldx, rp + i * ldr, wp, H, static_cast<float>(eps));
  });
#else
  TORCH_CHECK(false, "fused_add_rms_norm: built without AVX-512");
#endif
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [rows, 2 * d]");
  const int64_t D = x.size(1) / 2;
  check_rows(x, 2 * D, "silu_and_mul: x");
  check_rows(out, D, "silu_and_mul: out");
  TORCH_CHECK(out.size(0) == x.size(0), "silu_and_mul: out and x differ in rows");
#if defined(__AVX512F__)
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  at::parallel_for(0, x.size(0), row_grain(2 * D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) silu_and_mul_row(op + i * ldo, xp + i * ldx, xp + i * ldx + D, D);
  });
#else
  TORCH_CHECK(false, "silu_and_mul: built without AVX-512");
#endif
}

}  // namespace

TORCH_LIBRARY(pagedserve_cpu_fused, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, Tensor weight, "
        "float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
