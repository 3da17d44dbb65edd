// GGUF weights used in place: y = x @ W.T with W in its packed ggml block layout.
//
// Ops (namespace pagedserve_gguf):
//   gguf_linear(out, x, weights[], types[], bias?)  out[M, sum N_i] = x[M, K] @ concat_i(W_i)[.., K].T
//   gguf_dequantize(out, weight, type)               out[N, K] float32 = W
//   gguf_embedding(out, ids, weight, type)           out[T, K] = W[ids]
//
// A weight is a uint8 tensor [N, row_bytes] (rows may be strided: a column slice of a larger
// tensor) holding ggml blocks of `type`: F32, F16, BF16 (plain values), Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0 (32 values a block), Q4_K, Q5_K, Q6_K (256-value super-blocks of 32- or 16-value
// sub-blocks). Several weights of one linear (q/k/v, gate/up) may have different types; their
// outputs land side by side in `out`.
//
// Block-quantized weights meet int16 activations: each row of x is quantized in blocks of 32
// (a float scale d_a = max|x| / 32767 and 32 int16: 2^-16 relative error, against llama.cpp's
// int8 and its 2^-8, which moved SmolLM2's logprobs by up to 0.4), and a 32-value weight
// sub-block contributes
//
//     d_w * d_a * sum(q_w * q_a)  +  m_w * (d_a * sum(q_a))
//
// with q_w the block's integers (0..15, 0..31, signed for Q8_0; Q6_K's q - 32 pre-multiplied
// by its per-16 scales) and m_w the block's offset (-8 d, the Q4_1 min, the K-quant -dmin * m,
// ...). The integer dot is two vpmaddwd (int16 pairs -> int32) per 32 values, weights widened
// to int16 once per tile. Plain weights meet float32 x with FMAs.
//
// TRAP: the int32 block sum is exact for every type but Q6_K, whose pre-scaled values reach
// |4096|: it wraps only if most of a block's 32 weights and activations sit near their extremes
// with matching signs. Every path wraps alike, so batch invariance holds regardless.
//
// NOTE: int8 activations stay out on numerics and on speed. Rounding only the activations to int8
// per block of 32 moves the first-step top-5 logprobs by 0.26 (SmolLM2 Q4_1) and 0.10
// (Qwen2.5-Coder-0.5B) against the 0.05 our tests allow (10 bits: 0.05, 12 bits: 0.01). Without
// VNNI, vpmaddubsw needs a vpmaddwd to widen its sums: no fewer multiplies per value than int16.
// The tiles are bound by unpacking and horizontal sums, not by multiplies.
//
// Below kPanelMinRows rows of x, tiles unpack the weights for every 4 rows of x and sum each
// 32-value block horizontally; from kPanelMinRows on, panels unpack 16 weight rows once into a
// column-interleaved layout that every row of x shares (see "Panels" below). Within each of the
// two, every (row of x, row of W) dot product runs the same instruction sequence whatever M, the
// thread count or the other rows are, so results do not depend on the batch; across the two they
// differ in the last bits. Work is split over output rows only.
//
// Without AVX2 (or on another architecture) a scalar path dequantizes each weight row and takes
// float dot products with unquantized x: slower, and slightly more exact.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "gguf_gemm.h"

namespace {

enum GgmlType : int64_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};

struct TypeInfo {
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};

TypeInfo type_info(int64_t type) {
  switch (type) {
    case kF32: return {1, 4};
    case kF16: return {1, 2};
    case kBF16: return {1, 2};
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "gguf: unsupported ggml type ", type);
  }
  return {0, 0};
}

bool is_plain(int64_t type) { return type == kF32 || type == kF16 || type == kBF16; }

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes.
//   bytes 0-3: scale j (low 6 bits), bits 6-7 = high bits of scale j+4
//   bytes 4-7: min j   (low 6 bits), bits 6-7 = high bits of min j+4
//   bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4
inline void k_scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar dequantization of one row (K values): the reference every other path must agree with.
// The float operations and their order follow gguf-py's dequantize, so results are identical.

void dequantize_row(const uint8_t* w, int64_t type, int64_t K, float* out) {
  switch (type) {
    case kF32:
      std::memcpy(out, w, K * sizeof(float));
      return;
    case kF16:
      for (int64_t i = 0; i < K; ++i) out[i] = fp16(w + 2 * i);
      return;
    case kBF16:
      for (int64_t i = 0; i < K; ++i) out[i] = bf16(w + 2 * i);
      return;
    default:
      break;
  }
  const TypeInfo info = type_info(type);
  for (int64_t b = 0; b < K / info.block; ++b, w += info.bytes, out += info.block) {
    switch (type) {
      case kQ4_0: {
        const float d = fp16(w);
        for (int i = 0; i < 16; ++i) {
          out[i] = d * static_cast<float>((w[2 + i] & 0x0F) - 8);
          out[i + 16] = d * static_cast<float>((w[2 + i] >> 4) - 8);
        }
        break;
      }
      case kQ4_1: {
        const float d = fp16(w), m = fp16(w + 2);
        for (int i = 0; i < 16; ++i) {
          out[i] = d * static_cast<float>(w[4 + i] & 0x0F) + m;
          out[i + 16] = d * static_cast<float>(w[4 + i] >> 4) + m;
        }
        break;
      }
      case kQ5_0:
      case kQ5_1: {
        const bool has_min = type == kQ5_1;
        const float d = fp16(w), m = has_min ? fp16(w + 2) : 0.0f;
        uint32_t qh;
        std::memcpy(&qh, w + (has_min ? 4 : 2), 4);
        const uint8_t* qs = w + (has_min ? 8 : 6);
        for (int i = 0; i < 32; ++i) {
          const int low = i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
          const int q = low | (((qh >> i) & 1) << 4);
          out[i] = has_min ? d * static_cast<float>(q) + m : d * static_cast<float>(q - 16);
        }
        break;
      }
      case kQ8_0: {
        const float d = fp16(w);
        for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(static_cast<int8_t>(w[2 + i])) * d;
        break;
      }
      case kQ4_K:
      case kQ5_K: {
        const bool five = type == kQ5_K;
        const float d = fp16(w), dmin = fp16(w + 2);
        const uint8_t* scales = w + 4;
        const uint8_t* qh = w + 16;
        const uint8_t* qs = w + (five ? 48 : 16);
        for (int j = 0; j < 8; ++j) {
          int sc, mn;
          k_scale_min(scales, j, &sc, &mn);
          const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
          const uint8_t* chunk = qs + 32 * (j / 2);
          for (int l = 0; l < 32; ++l) {
            int q = (j % 2) ? (chunk[l] >> 4) : (chunk[l] & 0x0F);
            if (five) q |= ((qh[l] >> j) & 1) << 4;
            out[32 * j + l] = dl * static_cast<float>(q) - ml;
          }
        }
        break;
      }
      case kQ6_K: {
        const uint8_t* ql = w;
        const uint8_t* qh = w + 128;
        const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
        const float d = fp16(w + 208);
        for (int e = 0; e < 256; ++e) {
          const int h = e / 128, r = e % 128, s = r / 32, l = r % 32;
          const uint8_t lbyte = ql[64 * h + (r % 64)];
          const int low = r < 64 ? (lbyte & 0x0F) : (lbyte >> 4);
          const int high = (qh[32 * h + l] >> (2 * s)) & 3;
          const int q = (low | (high << 4)) - 32;
          out[e] = (d * static_cast<float>(scales[e / 16])) * static_cast<float>(q);
        }
        break;
      }
      default:
        TORCH_CHECK(false, "gguf: unsupported ggml type ", type);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Activations quantized in blocks of 32 (pagedserve::GgufActivations).

using QuantizedX = pagedserve::GgufActivations;

constexpr float kActMax = 32767.0f;

// One block: d = max|x| / 32767, q = round-half-even(x / d); returns sum(q).
inline int quantize_block_scalar(const float* x, int16_t* q, float* d_out) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / kActMax;
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;
  int sum = 0;
  for (int i = 0; i < 32; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));
    q[i] = static_cast<int16_t>(std::min(32767, std::max(-32767, v)));
    sum += q[i];
  }
  *d_out = d;
  return sum;
}

#if defined(PAGEDSERVE_AVX2)
// The same as quantize_block_scalar, 8 lanes at a time (vcvtps2dq rounds half to even too).
inline int quantize_block(const float* x, int16_t* q, float* d_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float d = _mm_cvtss_f32(h) / kActMax;
  const __m256 inv = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  // vpackssdw interleaves 128-bit lanes; the 64-bit permute restores value order
  for (int i = 0; i < 2; ++i) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[2 * i], i32[2 * i + 1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * i), packed);
  }
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *d_out = d;
  return _mm_cvtsi128_si32(t);
}
#else
inline int quantize_block(const float* x, int16_t* q, float* d_out) { return quantize_block_scalar(x, q, d_out); }
#endif

}  // namespace

namespace pagedserve {

void GgufActivations::resize(int64_t num_rows, int64_t num_columns) {
  K = num_columns;
  blocks = num_columns / 32;
  padded_blocks = (blocks + 7) / 8 * 8;  // whole groups of 8: the padding stays zero
  q.resize(num_rows * K);
  ds.resize(2 * num_rows * blocks);
  d.assign(num_rows * padded_blocks, 0.0f);
  s.assign(num_rows * padded_blocks, 0.0f);
}

void gguf_quantize_rows(const float* x, int64_t ldx, int64_t m_begin, int64_t m_end, GgufActivations* qx) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t b = 0; b < qx->blocks; ++b) {
      float d;
      const int sum = quantize_block(x + m * ldx + 32 * b, qx->q.data() + m * qx->K + 32 * b, &d);
      const float s = d * static_cast<float>(sum);
      qx->ds[2 * (m * qx->blocks + b)] = d;
      qx->ds[2 * (m * qx->blocks + b) + 1] = s;
      qx->d[m * qx->padded_blocks + b] = d;
      qx->s[m * qx->padded_blocks + b] = s;
    }
  }
}

}  // namespace pagedserve

namespace {

#if defined(PAGEDSERVE_AVX2)

inline float fp16_fast(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i widen_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Entry b, int16 lane j: 16 if bit j of b is set, else 0 (Q5 fifth bits, 8 values a lookup).
struct FifthBitTable {
  alignas(16) int16_t lanes[256][8];
  FifthBitTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) lanes[b][j] = static_cast<int16_t>(((b >> j) & 1) * 16);
  }
};
const FifthBitTable kFifthBits;

// 16 bits of `bits` -> 16 in lane i where bit i is set, else 0. Two table loads: the compare
// and mask sequence it replaces cost 5 vector ops per 16 values, a third of a Q5_0 block's work.
inline __m256i fifth_bits_16(uint32_t bits) {
  const __m128i low = _mm_load_si128(reinterpret_cast<const __m128i*>(kFifthBits.lanes[bits & 0xFF]));
  const __m128i high = _mm_load_si128(reinterpret_cast<const __m128i*>(kFifthBits.lanes[(bits >> 8) & 0xFF]));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
}

// 32 weight values as two int16 vectors (values 0-15, 16-31) and w = dw * q + mw as the pair
// (dw, mw) in lanes 0-1 of `wm`: one multiply by x's (d, d * sum(q)) gives both terms' factors.
struct Sub {
  __m256i lo, hi;
  __m128 wm;
};

// Two floats at p -> lanes 0, 1. (Through the integer load, whose pointer type may alias: a
// double* load of floats breaks strict aliasing, and GCC then reads before the floats are stored.)
inline __m128 load_pair(const float* p) { return _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// Two fp16 values at p -> lanes 0, 1.
inline __m128 fp16x2(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits)));
}

// (d, offset * d) for the types whose offset is a fixed multiple of d.
inline __m128 scale_with_offset(const uint8_t* p, float offset) {
  return _mm_mul_ps(_mm_set1_ps(fp16_fast(p)), _mm_setr_ps(1.0f, offset, 0.0f, 0.0f));
}

// Per type: values and bytes per block, 32-value sub-blocks per block, prepare(block) once per
// block and unpack(block, j, prepared) per sub-block.
template <int64_t T>
struct QBlock;

struct NoScales {};

// Q4_0 / Q4_1: 16 bytes, values 0-15 in the low nibbles, 16-31 in the high ones.
inline void nibbles(const uint8_t* p, __m256i* lo, __m256i* hi) {
  const __m256i bytes = widen_u8(p);
  *lo = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
  *hi = _mm256_srli_epi16(bytes, 4);
}

template <>
struct QBlock<kQ4_0> {
  static constexpr int64_t kValues = 32, kBytes = 18, kSubs = 1;
  using Scales = NoScales;
  static Scales prepare(const uint8_t*) { return {}; }
  static Sub unpack(const uint8_t* w, int, const Scales&) {
    Sub s;
    nibbles(w + 2, &s.lo, &s.hi);
    s.wm = scale_with_offset(w, -8.0f);
    return s;
  }
};

template <>
struct QBlock<kQ4_1> {
  static constexpr int64_t kValues = 32, kBytes = 20, kSubs = 1;
  using Scales = NoScales;
  static Scales prepare(const uint8_t*) { return {}; }
  static Sub unpack(const uint8_t* w, int, const Scales&) {
    Sub s;
    nibbles(w + 4, &s.lo, &s.hi);
    s.wm = fp16x2(w);
    return s;
  }
};

template <int64_t T>
struct QBlock5 {  // Q5_0, Q5_1: Q4 nibbles plus bit i of a 32-bit word as bit 4 of value i
  static constexpr bool kMin = T == kQ5_1;
  static constexpr int64_t kValues = 32, kBytes = kMin ? 24 : 22, kSubs = 1;
  using Scales = NoScales;
  static Scales prepare(const uint8_t*) { return {}; }
  static Sub unpack(const uint8_t* w, int, const Scales&) {
    Sub s;
    nibbles(w + (kMin ? 8 : 6), &s.lo, &s.hi);
    uint32_t qh;
    std::memcpy(&qh, w + (kMin ? 4 : 2), 4);
    s.lo = _mm256_or_si256(s.lo, fifth_bits_16(qh & 0xFFFF));
    s.hi = _mm256_or_si256(s.hi, fifth_bits_16(qh >> 16));
    s.wm = kMin ? fp16x2(w) : scale_with_offset(w, -16.0f);
    return s;
  }
};

template <>
struct QBlock<kQ5_0> : QBlock5<kQ5_0> {};
template <>
struct QBlock<kQ5_1> : QBlock5<kQ5_1> {};

template <>
struct QBlock<kQ8_0> {
  static constexpr int64_t kValues = 32, kBytes = 34, kSubs = 1;
  using Scales = NoScales;
  static Scales prepare(const uint8_t*) { return {}; }
  static Sub unpack(const uint8_t* w, int, const Scales&) {
    Sub s;
    s.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2)));
    s.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 18)));
    s.wm = _mm_set_ss(fp16_fast(w));
    return s;
  }
};

// The 8 sub-blocks' (d * scale, -dmin * min) of a Q4_K / Q5_K super-block, as (dw, mw) pairs.
struct KScales {
  alignas(32) float wm[16];  // pair j at wm[2j]
  __m256 dw, mw;             // the same, as 8-lane vectors
};

template <int64_t T>
struct QBlockK {  // Q4_K, Q5_K: sub-block j is the low (even j) or high nibbles of 32 bytes
  static constexpr bool kFive = T == kQ5_K;
  static constexpr int64_t kValues = 256, kBytes = kFive ? 176 : 144, kSubs = 8;
  using Scales = KScales;
  // The 12 scale bytes as three words u0, u1, u2 (see k_scale_min for the layout): the eight 6-bit
  // scales are the bytes of u0 & 0x3F.. and of (u2 & 0x0F..) | (top 2 bits of u0's bytes) << 4,
  // the mins likewise from u1 and u2's high nibbles. Widened and scaled 8 at a time.
  static Scales prepare(const uint8_t* w) {
    uint32_t u[3];
    std::memcpy(u, w + 4, 12);
    const uint64_t scales = (u[0] & 0x3F3F3F3Fu) |
                            static_cast<uint64_t>((u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4)) << 32;
    const uint64_t mins = (u[1] & 0x3F3F3F3Fu) |
                          static_cast<uint64_t>(((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4)) << 32;
    auto widen = [](uint64_t bytes) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes))));
    };
    const __m128 d_dmin = fp16x2(w);
    const __m256 dw = _mm256_mul_ps(widen(scales), _mm256_set1_ps(_mm_cvtss_f32(d_dmin)));
    const __m256 mw = _mm256_mul_ps(widen(mins), _mm256_set1_ps(-_mm_cvtss_f32(_mm_movehdup_ps(d_dmin))));
    // pairs (dw_j, mw_j): unpacklo holds j = 0, 1 | 4, 5, unpackhi j = 2, 3 | 6, 7
    const __m256 lo = _mm256_unpacklo_ps(dw, mw), hi = _mm256_unpackhi_ps(dw, mw);
    Scales out;
    _mm256_store_ps(out.wm, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_store_ps(out.wm + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    out.dw = dw;
    out.mw = mw;
    return out;
  }
  static Sub unpack(const uint8_t* w, int j, const Scales& scales) {
    const uint8_t* chunk = w + (kFive ? 48 : 16) + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    Sub s;
    s.lo = _mm256_and_si256(_mm256_srli_epi16(widen_u8(chunk), shift), low4);
    s.hi = _mm256_and_si256(_mm256_srli_epi16(widen_u8(chunk + 16), shift), low4);
    if constexpr (kFive) {
      const __m256i one = _mm256_set1_epi16(1);
      s.lo = _mm256_or_si256(s.lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(w + 16), j), one), 4));
      s.hi = _mm256_or_si256(s.hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(w + 32), j), one), 4));
    }
    s.wm = load_pair(scales.wm + 2 * j);
    return s;
  }
};

template <>
struct QBlock<kQ4_K> : QBlockK<kQ4_K> {};
template <>
struct QBlock<kQ5_K> : QBlockK<kQ5_K> {};

template <>
struct QBlock<kQ6_K> {
  static constexpr int64_t kValues = 256, kBytes = 210, kSubs = 8;
  using Scales = NoScales;
  static Scales prepare(const uint8_t*) { return {}; }
  // Sub-block j = 4h + s of half h: low 4 bits from 32 bytes of ql (s odd: the second 32; low
  // nibbles for s < 2, high for s >= 2), bits 4-5 from qh bits 2s, 2s + 1. The int16 lanes
  // hold (q - 32) * scale (at most 32 * 128 in magnitude), so dw is d alone.
  static Sub unpack(const uint8_t* w, int j, const Scales&) {
    const int h = j / 4, s4 = j % 4;
    const uint8_t* ql = w + 64 * h + 32 * (s4 % 2);
    const uint8_t* qh = w + 128 + 32 * h;
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const __m256i low4 = _mm256_set1_epi16(0x0F), two = _mm256_set1_epi16(3), m32 = _mm256_set1_epi16(32);
    const int lshift = s4 < 2 ? 0 : 4;
    Sub s;
    for (int half = 0; half < 2; ++half) {
      const __m256i low = _mm256_and_si256(_mm256_srli_epi16(widen_u8(ql + 16 * half), lshift), low4);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(widen_u8(qh + 16 * half), 2 * s4), two);
      const __m256i q = _mm256_sub_epi16(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), m32);
      (half ? s.hi : s.lo) = _mm256_mullo_epi16(q, _mm256_set1_epi16(scales[2 * j + half]));
    }
    s.wm = _mm_set_ss(fp16_fast(w + 208));
    return s;
  }
};

// ---------------------------------------------------------------------------------------------
// One weight row against one row of x, 8 sub-blocks at a time (M = 1: a decode of one request).
// Each sub-block's integer dot stays an int32 vector until 8 of them are summed across lanes at
// once; then one vector of 8 float factors multiplies them. Per 32 values that leaves the
// unpacking, two vpmaddwd and about one instruction of scale handling, instead of seven.

// [sum(a), sum(b)] lane-wise partial: hadd of two int32x8 (sums of adjacent lane pairs).
inline __m256i hadd_pairs(__m256i a, __m256i b) { return _mm256_hadd_epi32(a, b); }

// Eight int32x8 vectors given as hadd_pairs of (0,1), (2,3), (4,5), (6,7) -> their 8 sums in order.
inline __m256i finish_hsum8x8(__m256i h01, __m256i h23, __m256i h45, __m256i h67) {
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  // a = [0 1 2 3 (lanes 0-3 halves) | 0 1 2 3 (lanes 4-7 halves)], b likewise for 4-7
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Scales of 8 consecutive blocks of `bytes` bytes from w: the fp16 at offset 0 of each (d), and
// when `with_second`, the fp16 at offset 2 (Q4_1 / Q5_1's min).
template <int64_t bytes, bool with_second>
inline void gather_block_scales(const uint8_t* w, __m256* d, __m256* m) {
  // NOTE: eight scalar loads, not vpgatherdd: the gather costs more than the rest of the group on
  // AMD Zen 3 (measured: a Q4_1 GEMV 1.6x slower with it).
  uint32_t words[8];
  for (int b = 0; b < 8; ++b) std::memcpy(&words[b], w + b * bytes, 4);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  // the low (d) or high (m) halfword of each word, packed into the low 64 bits of each lane ...
  const __m256i low = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                       0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
  // ... and the two lanes' 64 bits side by side
  *d = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, low), 0x08)));
  if constexpr (with_second) {
    const __m256i high = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                          2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    *m = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, high), 0x08)));
  }
}

template <int64_t T>
struct Group;  // per type: bytes of 8 sub-blocks, their factors (dw, mw), sub-block j's values

template <int64_t T>
struct GroupLegacy {  // Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 8 blocks
  using B = QBlock<T>;
  static constexpr int64_t kGroupBytes = 8 * B::kBytes;
  static constexpr bool kHasMin = T != kQ8_0;
  static void factors(const uint8_t* w, __m256* dw, __m256* mw) {
    if constexpr (T == kQ4_1 || T == kQ5_1) {
      gather_block_scales<B::kBytes, true>(w, dw, mw);
    } else {
      gather_block_scales<B::kBytes, false>(w, dw, nullptr);
      if constexpr (T == kQ4_0) *mw = _mm256_mul_ps(*dw, _mm256_set1_ps(-8.0f));
      if constexpr (T == kQ5_0) *mw = _mm256_mul_ps(*dw, _mm256_set1_ps(-16.0f));
    }
  }
  static Sub unpack(const uint8_t* w, int j) { return B::unpack(w + j * B::kBytes, 0, {}); }
};

template <int64_t T>
struct GroupK {  // Q4_K, Q5_K: one super-block
  using B = QBlock<T>;
  static constexpr int64_t kGroupBytes = B::kBytes;
  static constexpr bool kHasMin = true;
  static void factors(const uint8_t* w, __m256* dw, __m256* mw) {
    const KScales scales = B::prepare(w);
    *dw = scales.dw;
    *mw = scales.mw;
  }
  static Sub unpack(const uint8_t* w, int j) { return B::unpack(w, j, KScales{}); }
};

template <>
struct Group<kQ4_0> : GroupLegacy<kQ4_0> {};
template <>
struct Group<kQ4_1> : GroupLegacy<kQ4_1> {};
template <>
struct Group<kQ5_0> : GroupLegacy<kQ5_0> {};
template <>
struct Group<kQ5_1> : GroupLegacy<kQ5_1> {};
template <>
struct Group<kQ8_0> : GroupLegacy<kQ8_0> {};
template <>
struct Group<kQ4_K> : GroupK<kQ4_K> {};
template <>
struct Group<kQ5_K> : GroupK<kQ5_K> {};

template <>
struct Group<kQ6_K> {  // one super-block; its per-16 scales are folded into the int16 values
  static constexpr int64_t kGroupBytes = 210;
  static constexpr bool kHasMin = false;
  static void factors(const uint8_t* w, __m256* dw, __m256*) { *dw = _mm256_set1_ps(fp16_fast(w + 208)); }
  static Sub unpack(const uint8_t* w, int j) { return QBlock<kQ6_K>::unpack(w, j, {}); }
};

// The int32 dot of sub-block j of a group (32 values) with the matching 32 quantized x values.
inline __m256i sub_dot(const Sub& s, const int16_t* a) {
  const __m256i* v = reinterpret_cast<const __m256i*>(a);
  return _mm256_add_epi32(_mm256_madd_epi16(s.lo, _mm256_loadu_si256(v)), _mm256_madd_epi16(s.hi, _mm256_loadu_si256(v + 1)));
}

// One group's 8 dots (as hadd_pairs of 0-1, 2-3, 4-5, 6-7) into the accumulators. Both tile
// shapes call exactly this: a row's result never depends on how many rows run beside it.
template <bool kHasMin>
inline void accumulate_group(__m256i h01, __m256i h23, __m256i h45, __m256i h67, __m256 dw, __m256 mw, const float* da,
                             const float* sa, __m256& acc, __m256& mins) {
  const __m256 sums = _mm256_cvtepi32_ps(finish_hsum8x8(h01, h23, h45, h67));
  acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_loadu_ps(da)), acc);
  if constexpr (kHasMin) mins = _mm256_fmadd_ps(mw, _mm256_loadu_ps(sa), mins);
}

// A block past the last whole group of a legacy-type row, alone.
template <int64_t T>
inline float tail_block(const uint8_t* w, const int16_t* a, const float* ds) {
  const Sub s = QBlock<T>::unpack(w, 0, {});
  const __m128 factors = _mm_mul_ps(s.wm, load_pair(ds));  // (dw * d, mw * s)
  return pagedserve::hsum8(_mm256_cvtepi32_ps(sub_dot(s, a))) * _mm_cvtss_f32(factors) +
         _mm_cvtss_f32(_mm_shuffle_ps(factors, factors, 1));
}

inline float finish_row(__m256 acc, __m256 mins, float tail) {
  return pagedserve::hsum8(acc) + pagedserve::hsum8(mins) + tail;
}

// Part g of `groups` of the row at `row` + prefetch (row_bytes, the tail blocks past the last whole
// group included): every cache line it touches, so that the next tile finds its whole rows in L1.
// NOTE: prefetching whole groups only left the tail's lines (and a group's last partial line) to
// the hardware prefetcher, which loses interleaved row streams: 2 of the 15 lines of a Q8_0 row
// of 896 values (4 tail blocks past 3 groups).
template <int64_t T>
void prefetch_part(const uint8_t* row, int64_t prefetch, int64_t g, int64_t groups, int64_t row_bytes) {
  if (prefetch == 0) return;
  const uintptr_t next = reinterpret_cast<uintptr_t>(row) + prefetch;
  const uintptr_t end = next + (g + 1 == groups ? row_bytes : (g + 1) * Group<T>::kGroupBytes);
  for (uintptr_t line = (next + g * Group<T>::kGroupBytes) & ~static_cast<uintptr_t>(63); line < end; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

// `prefetch`: rows w[i] + prefetch are the next tile's; each group prefetches its counterpart
// there. Short rows (SmolLM2's 576 columns: 612 bytes of Q8_0) otherwise stream at half the
// bandwidth of long ones: the hardware prefetcher loses the two interleaved row streams.
// One weight row against one row of x (RW = RA = 1): the group's dots stay in registers.
template <int64_t T>
void quant_row_grouped(const uint8_t* w, int64_t prefetch, int64_t K, const QuantizedX& qx, int64_t m0, float* y) {
  using G = Group<T>;
  const int16_t* qa = qx.row_q(m0);
  const float* da = qx.row_d(m0);
  const float* sa = qx.row_s(m0);
  const int64_t subs = K / 32, groups = subs / 8, row_bytes = K / QBlock<T>::kValues * QBlock<T>::kBytes;
  __m256 acc = _mm256_setzero_ps(), mins = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * G::kGroupBytes;
    prefetch_part<T>(w, prefetch, g, groups, row_bytes);
    __m256 dw, mw = _mm256_setzero_ps();
    G::factors(p, &dw, &mw);
    const int16_t* a = qa + 256 * g;
    auto dot = [&](int j) { return sub_dot(G::unpack(p, j), a + 32 * j); };
    const __m256i h01 = hadd_pairs(dot(0), dot(1)), h23 = hadd_pairs(dot(2), dot(3));
    const __m256i h45 = hadd_pairs(dot(4), dot(5)), h67 = hadd_pairs(dot(6), dot(7));
    accumulate_group<G::kHasMin>(h01, h23, h45, h67, dw, mw, da + 8 * g, sa + 8 * g, acc, mins);
  }
  float tail = 0.0f;
  if constexpr (QBlock<T>::kSubs == 1) {
    for (int64_t b = 8 * groups; b < subs; ++b)
      tail += tail_block<T>(w + b * QBlock<T>::kBytes, qa + 32 * b, qx.row_ds(m0) + 2 * b);
  }
  y[0] = finish_row(acc, mins, tail);
}

// RW weight rows (w[i]) against RA rows of quantized x from row m0: y[i * RA + r]. The same
// arithmetic as quant_row_grouped for every (weight row, x row) pair; the dots wait on the stack
// (they are too many for the registers) until their group is summed.
template <int64_t T, int RW, int RA>
void quant_tile(const uint8_t* const* w, int64_t prefetch, int64_t K, const QuantizedX& qx, int64_t m0, float* y) {
  using G = Group<T>;
  const int64_t subs = K / 32, groups = subs / 8, row_bytes = K / QBlock<T>::kValues * QBlock<T>::kBytes;
  __m256 acc[RW][RA], mins[RW][RA];
  float tail[RW][RA];
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RA; ++r) {
      acc[i][r] = mins[i][r] = _mm256_setzero_ps();
      tail[i][r] = 0.0f;
    }
  __m256i dots[RW][RA][8];
  for (int64_t g = 0; g < groups; ++g) {
    __m256 dw[RW], mw[RW];
    for (int i = 0; i < RW; ++i) {
      const uint8_t* p = w[i] + g * G::kGroupBytes;
      prefetch_part<T>(w[i], prefetch, g, groups, row_bytes);
      mw[i] = _mm256_setzero_ps();
      G::factors(p, &dw[i], &mw[i]);
    }
    for (int j = 0; j < 8; ++j) {
      Sub s[RW];
      for (int i = 0; i < RW; ++i) s[i] = G::unpack(w[i] + g * G::kGroupBytes, j);
      for (int r = 0; r < RA; ++r) {
        const int16_t* a = qx.row_q(m0 + r) + 256 * g + 32 * j;
        for (int i = 0; i < RW; ++i) dots[i][r][j] = sub_dot(s[i], a);
      }
    }
    for (int i = 0; i < RW; ++i)
      for (int r = 0; r < RA; ++r) {
        const __m256i* d = dots[i][r];
        accumulate_group<G::kHasMin>(hadd_pairs(d[0], d[1]), hadd_pairs(d[2], d[3]), hadd_pairs(d[4], d[5]),
                                     hadd_pairs(d[6], d[7]), dw[i], mw[i], qx.row_d(m0 + r) + 8 * g,
                                     qx.row_s(m0 + r) + 8 * g, acc[i][r], mins[i][r]);
      }
  }
  if constexpr (QBlock<T>::kSubs == 1) {
    for (int64_t b = 8 * groups; b < subs; ++b)
      for (int i = 0; i < RW; ++i)
        for (int r = 0; r < RA; ++r)
          tail[i][r] += tail_block<T>(w[i] + b * QBlock<T>::kBytes, qx.row_q(m0 + r) + 32 * b, qx.row_ds(m0 + r) + 2 * b);
  }
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RA; ++r) y[i * RA + r] = finish_row(acc[i][r], mins[i][r], tail[i][r]);
}

// ---------------------------------------------------------------------------------------------
// Panels (M >= kPanelMinRows): 16 weight rows are unpacked once into int16 pairs stored column-
// interleaved -- for block b and value pair p, one vector holds that pair of 8 weight rows -- so
// that vpmaddwd against a broadcast pair of x values gives 8 output columns' partial dots at
// once. No horizontal sums, and each unpacked weight vector serves 4 rows of x. Block factors are
// applied per block in float: acc += float(int dot) * (dw * d_a) + mw * s_a.
// NOTE: a different summation order than the tiles above: a row's result differs in the last bits
// between batches below and above kPanelMinRows (as it does across kDequantMinRows).

constexpr int kPanelColumns = 16;  // weight rows per panel: two vectors of 8 output columns
constexpr int64_t kPanelSliceRows = 256;

struct Panel {
  std::vector<int32_t> q;     // [blocks][16 pairs][16 columns]: an int16 pair per int32
  std::vector<float> dw, mw;  // [blocks][16 columns]
  void resize(int64_t blocks) {
    q.resize(blocks * 16 * kPanelColumns);
    dw.resize(blocks * kPanelColumns);
    mw.resize(blocks * kPanelColumns);
  }
};

// r[i] (8 int32 lanes each) -> r[j] lane i = old r[i] lane j.
inline void transpose8x8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// rows[c] (16 weight rows of type T, K values each) -> the panel's layout. Each group also
// prefetches its counterpart in next[c] (the next panel's rows; null: none): 16 interleaved row
// streams are more than the hardware prefetcher follows, and packing waited on memory.
template <int64_t T>
void pack_panel(const uint8_t* const* rows, const uint8_t* const* next, int64_t K, Panel& panel) {
  using G = Group<T>;
  using B = QBlock<T>;
  const int64_t blocks = K / 32, groups = blocks / 8;
  alignas(32) int32_t block[kPanelColumns][16];  // column c's 16 pairs of one block
  alignas(32) float dw[8], mw[8];
  auto store_block = [&](int64_t b) {
    for (int half = 0; half < 2; ++half) {    // columns 0-7, 8-15
      for (int pairs = 0; pairs < 2; ++pairs) {  // pairs 0-7, 8-15
        __m256i r[8];
        for (int c = 0; c < 8; ++c)
          r[c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(&block[8 * half + c][8 * pairs]));
        transpose8x8(r);
        __m256i* out = reinterpret_cast<__m256i*>(panel.q.data() + (b * 16 + 8 * pairs) * kPanelColumns + 8 * half);
        for (int p = 0; p < 8; ++p) _mm256_storeu_si256(out + 2 * p, r[p]);
      }
    }
  };
  const int64_t row_bytes = blocks * 32 / B::kValues * B::kBytes;
  for (int64_t g = 0; g < groups; ++g) {
    if (next != nullptr)
      for (int c = 0; c < kPanelColumns; ++c) prefetch_part<T>(rows[c], next[c] - rows[c], g, groups, row_bytes);
    for (int c = 0; c < kPanelColumns; ++c) {
      const uint8_t* p = rows[c] + g * G::kGroupBytes;
      __m256 d, m = _mm256_setzero_ps();
      G::factors(p, &d, &m);
      _mm256_store_ps(dw, d);
      _mm256_store_ps(mw, m);
      for (int j = 0; j < 8; ++j) {
        panel.dw[(8 * g + j) * kPanelColumns + c] = dw[j];
        panel.mw[(8 * g + j) * kPanelColumns + c] = mw[j];
      }
    }
    for (int j = 0; j < 8; ++j) {
      for (int c = 0; c < kPanelColumns; ++c) {
        const Sub sub = G::unpack(rows[c] + g * G::kGroupBytes, j);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&block[c][0]), sub.lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&block[c][8]), sub.hi);
      }
      store_block(8 * g + j);
    }
  }
  if constexpr (B::kSubs == 1) {  // blocks past the last whole group
    for (int64_t b = 8 * groups; b < blocks; ++b) {
      for (int c = 0; c < kPanelColumns; ++c) {
        const Sub sub = B::unpack(rows[c] + b * B::kBytes, 0, {});
        _mm256_store_si256(reinterpret_cast<__m256i*>(&block[c][0]), sub.lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&block[c][8]), sub.hi);
        alignas(16) float wm[4];
        _mm_store_ps(wm, sub.wm);
        panel.dw[b * kPanelColumns + c] = wm[0];
        panel.mw[b * kPanelColumns + c] = wm[1];
      }
      store_block(b);
    }
  }
}

using PackFn = void (*)(const uint8_t* const*, const uint8_t* const*, int64_t, Panel&);

PackFn pack_for(int64_t type) {
  switch (type) {
    case kQ4_0: return &pack_panel<kQ4_0>;
    case kQ4_1: return &pack_panel<kQ4_1>;
    case kQ5_0: return &pack_panel<kQ5_0>;
    case kQ5_1: return &pack_panel<kQ5_1>;
    case kQ8_0: return &pack_panel<kQ8_0>;
    case kQ4_K: return &pack_panel<kQ4_K>;
    case kQ5_K: return &pack_panel<kQ5_K>;
    case kQ6_K: return &pack_panel<kQ6_K>;
    default: TORCH_CHECK(false, "gguf: no panel for ggml type ", type);
  }
  return nullptr;
}

// Blocks [b_begin, b_end) of a packed panel against R rows of x from m0, added to f[r * 16 + c].
// NOTE: noinline: inlined into gguf_gemm_rows, GCC keeps the accumulators on the stack.
template <int R>
__attribute__((noinline)) void panel_blocks(const Panel& panel, int64_t b_begin, int64_t b_end, const QuantizedX& qx,
                                            int64_t m0, float* f) {
  const int32_t* xq[R];  // x's int16 pairs
  const float* da[R];
  const float* sa[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = reinterpret_cast<const int32_t*>(qx.row_q(m0 + r));
    da[r] = qx.row_d(m0 + r);
    sa[r] = qx.row_s(m0 + r);
  }
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  // One vpdpwssd per pair and row of x covers all 16 columns. Two accumulators per row (even and
  // odd pairs): R chains of dependent vpdpwssd (5 cycles each) would idle the multipliers. The
  // integer sums are the AVX2 loop's, and the float code below works lane by lane as it does,
  // so results are the same bit for bit.
  for (int64_t b = b_begin; b < b_end; ++b) {
    __m512i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const __m512i* w = reinterpret_cast<const __m512i*>(panel.q.data() + b * 16 * kPanelColumns);
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      const __m512i wp = _mm512_loadu_si512(w + p);
      for (int r = 0; r < R; ++r)
        acc[r][p % 2] = _mm512_dpwssd_epi32(acc[r][p % 2], wp, _mm512_set1_epi32(xq[r][16 * b + p]));
    }
    const __m512 dw = _mm512_loadu_ps(panel.dw.data() + b * kPanelColumns);
    const __m512 mw = _mm512_loadu_ps(panel.mw.data() + b * kPanelColumns);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(da[r][b]), s = _mm512_set1_ps(sa[r][b]);
      float* fr = f + r * kPanelColumns;
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][0], acc[r][1]));
      const __m512 v = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, d), _mm512_loadu_ps(fr));
      _mm512_storeu_ps(fr, _mm512_fmadd_ps(mw, s, v));
    }
  }
#else
  for (int64_t b = b_begin; b < b_end; ++b) {
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const __m256i* w = reinterpret_cast<const __m256i*>(panel.q.data() + b * 16 * kPanelColumns);
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      const __m256i w0 = _mm256_loadu_si256(w + 2 * p), w1 = _mm256_loadu_si256(w + 2 * p + 1);
      for (int r = 0; r < R; ++r) {
        const __m256i xb = _mm256_set1_epi32(xq[r][16 * b + p]);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, xb));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, xb));
        // TRAP: without this GCC reassociates the unrolled integer sums: it keeps every product
        // on the stack and adds them up after the loop, at 60% of this speed.
        asm("" : "+x"(acc[r][0]), "+x"(acc[r][1]));
      }
    }
    const float* dwb = panel.dw.data() + b * kPanelColumns;
    const float* mwb = panel.mw.data() + b * kPanelColumns;
    const __m256 dw[2] = {_mm256_loadu_ps(dwb), _mm256_loadu_ps(dwb + 8)};
    const __m256 mw[2] = {_mm256_loadu_ps(mwb), _mm256_loadu_ps(mwb + 8)};
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_broadcast_ss(da[r] + b), s = _mm256_broadcast_ss(sa[r] + b);
      for (int h = 0; h < 2; ++h) {
        float* fr = f + r * kPanelColumns + 8 * h;
        const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), _mm256_mul_ps(dw[h], d), _mm256_loadu_ps(fr));
        _mm256_storeu_ps(fr, _mm256_fmadd_ps(mw[h], s, v));
      }
    }
  }
#endif
}

// Columns [local_begin, local_end) of block-quantized shard `sh` for all M rows of x, one panel
// at a time; y points at the output column of local_begin.
void panel_columns(const pagedserve::GgufShard& sh, int64_t local_begin, int64_t local_end, int64_t K,
                   const QuantizedX& qx, int64_t M, float* y, int64_t ldy) {
  // (References taken once: in a shared library each use of a thread_local calls __tls_get_addr.)
  thread_local Panel thread_panel;
  thread_local std::vector<float> thread_sums;
  Panel& panel = thread_panel;
  std::vector<float>& sums = thread_sums;
  const int64_t blocks = K / 32;
  panel.resize(blocks);
  const PackFn pack = pack_for(sh.type);
  // Rows of x in slices of kPanelSliceRows, each over every panel (packed again per slice): a
  // slice's quantized x (<= 2.5 MB at K = 4864) stays in cache while the panels pass.
  for (int64_t m0 = 0; m0 < M; m0 += kPanelSliceRows) {
    const int64_t rows_x = std::min(kPanelSliceRows, M - m0);
    for (int64_t n = local_begin; n < local_end; n += kPanelColumns) {
      const int columns = static_cast<int>(std::min<int64_t>(kPanelColumns, local_end - n));
      const int64_t next_n = n + kPanelColumns;  // the next panel's first row, if any
      const int next_columns = static_cast<int>(std::min<int64_t>(kPanelColumns, local_end - next_n));
      const uint8_t* rows[kPanelColumns];
      const uint8_t* next[kPanelColumns];
      for (int c = 0; c < kPanelColumns; ++c) {
        rows[c] = sh.data + (n + std::min(c, columns - 1)) * sh.row_stride;
        if (next_columns > 0) next[c] = sh.data + (next_n + std::min(c, next_columns - 1)) * sh.row_stride;
      }
      pack(rows, next_columns > 0 ? next : nullptr, K, panel);
      // 8 blocks (8 KB of panel, in L1) at a time pass every row of x; the rows' float sums wait in
      // `sums` (16 floats a row).
      sums.assign(rows_x * kPanelColumns, 0.0f);
      for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
        const int64_t b1 = std::min(blocks, b0 + 8);
        int64_t m = 0;
        for (; m + 4 <= rows_x; m += 4) panel_blocks<4>(panel, b0, b1, qx, m0 + m, sums.data() + m * kPanelColumns);
        switch (rows_x - m) {
          case 3: panel_blocks<3>(panel, b0, b1, qx, m0 + m, sums.data() + m * kPanelColumns); break;
          case 2: panel_blocks<2>(panel, b0, b1, qx, m0 + m, sums.data() + m * kPanelColumns); break;
          case 1: panel_blocks<1>(panel, b0, b1, qx, m0 + m, sums.data() + m * kPanelColumns); break;
          default: break;
        }
      }
      float* yn = y + m0 * ldy + (n - local_begin);
      for (int64_t m = 0; m < rows_x; ++m)
        std::memcpy(yn + m * ldy, sums.data() + m * kPanelColumns, columns * sizeof(float));
    }
  }
}

// Plain weights (F32 / F16 / BF16) against float32 rows of x: 8 values a step.
template <int64_t T>
inline __m256 load8(const uint8_t* w) {
  if constexpr (T == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(w));
  } else if constexpr (T == kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

template <int64_t T>
inline float load1(const uint8_t* w) {
  if constexpr (T == kF32) {
    float f;
    std::memcpy(&f, w, 4);
    return f;
  } else if constexpr (T == kF16) {
    return fp16_fast(w);
  } else {
    return bf16(w);
  }
}

template <int64_t T, int RW, int RA>
void plain_tile(const uint8_t* const* w, int64_t K, const float* x, int64_t ldx, float* y) {
  constexpr int64_t size = T == kF32 ? 4 : 2;
  __m256 acc[RW][RA];
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RA; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[RW];
    for (int i = 0; i < RW; ++i) wv[i] = load8<T>(w[i] + k * size);
    for (int r = 0; r < RA; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int i = 0; i < RW; ++i) acc[i][r] = _mm256_fmadd_ps(wv[i], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RA; ++r) {
      float sum = pagedserve::hsum8(acc[i][r]);
      for (int64_t t = k; t < K; ++t) sum += load1<T>(w[i] + t * size) * x[r * ldx + t];
      y[i * RA + r] = sum;
    }
}

// One call of a tile over RW weight rows and RA rows of x, into y[RW * RA].
struct TileArgs {
  const uint8_t* const* w;
  int64_t prefetch;  // bytes from each weight row to the row to prefetch (0: none)
  int64_t K;
  const QuantizedX* qx;
  const float* x;  // float32 rows of x from m0 (plain types)
  int64_t ldx, m0;
  float* y;
};
using TileFn = void (*)(const TileArgs&);

template <int64_t T, int RW, int RA>
void run_tile(const TileArgs& a) {
  if constexpr (T == kF32 || T == kF16 || T == kBF16) {
    plain_tile<T, RW, RA>(a.w, a.K, a.x, a.ldx, a.y);
  } else {
    if constexpr (RW == 1 && RA == 1) {
      quant_row_grouped<T>(a.w[0], a.prefetch, a.K, *a.qx, a.m0, a.y);
    } else {
      quant_tile<T, RW, RA>(a.w, a.prefetch, a.K, *a.qx, a.m0, a.y);
    }
  }
}

template <int64_t T, int RW>
TileFn tile_for_ra(int ra) {
  switch (ra) {
    case 1: return &run_tile<T, RW, 1>;
    case 2: return &run_tile<T, RW, 2>;
    case 3: return &run_tile<T, RW, 3>;
    default: return &run_tile<T, RW, 4>;
  }
}

template <int64_t T>
TileFn tile_for_shape(int rw, int ra) {
  return rw == 2 ? tile_for_ra<T, 2>(ra) : tile_for_ra<T, 1>(ra);
}

TileFn tile_for(int64_t type, int rw, int ra) {
  switch (type) {
    case kF32: return tile_for_shape<kF32>(rw, ra);
    case kF16: return tile_for_shape<kF16>(rw, ra);
    case kBF16: return tile_for_shape<kBF16>(rw, ra);
    case kQ4_0: return tile_for_shape<kQ4_0>(rw, ra);
    case kQ4_1: return tile_for_shape<kQ4_1>(rw, ra);
    case kQ5_0: return tile_for_shape<kQ5_0>(rw, ra);
    case kQ5_1: return tile_for_shape<kQ5_1>(rw, ra);
    case kQ8_0: return tile_for_shape<kQ8_0>(rw, ra);
    case kQ4_K: return tile_for_shape<kQ4_K>(rw, ra);
    case kQ5_K: return tile_for_shape<kQ5_K>(rw, ra);
    case kQ6_K: return tile_for_shape<kQ6_K>(rw, ra);
    default: TORCH_CHECK(false, "gguf: unsupported ggml type ", type);
  }
  return nullptr;
}

#endif  // PAGEDSERVE_AVX2

void check_weight(const at::Tensor& w, int64_t type, int64_t K, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2, op,
              ": a weight must be a CPU uint8 tensor [rows, row_bytes]");
  TORCH_CHECK(w.stride(1) == 1, op, ": weight bytes must be contiguous within a row");
  const TypeInfo info = type_info(type);
  TORCH_CHECK(K % info.block == 0, op, ": K=", K, " is not a whole number of blocks of ", info.block);
  TORCH_CHECK(w.size(1) == K / info.block * info.bytes, op, ": a row of type ", type, " and K=", K, " has ",
              K / info.block * info.bytes, " bytes, got ", w.size(1));
}

}  // namespace

namespace pagedserve {

std::vector<GgufShard> gguf_shards(at::TensorList weights, at::IntArrayRef types, int64_t K, const char* op) {
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), op, ": one type per weight");
  std::vector<GgufShard> shards;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], types[i], K, op);
    shards.push_back({weights[i].data_ptr<uint8_t>(), weights[i].stride(0), types[i], weights[i].size(0)});
  }
  return shards;
}

int64_t gguf_total_rows(const std::vector<GgufShard>& shards) {
  int64_t rows = 0;
  for (const GgufShard& s : shards) rows += s.rows;
  return rows;
}

// Weight rows dequantized at a time (M >= kDequantMinRows): a buffer of about 4 MB.
constexpr int64_t kDequantBufferBytes = 4 << 20;

}  // namespace pagedserve

namespace {

// y[:, rows] = x @ W[rows]^T for large M: each shard's rows go through a float32 buffer (plain
// float32 weights are used in place) and at::mm_out, which runs MKL on all torch threads.
void dequant_gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const std::vector<pagedserve::GgufShard>& shards,
                  float* y, int64_t ldy) {
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, {ldx, 1}, f32);
  const int64_t chunk = std::max<int64_t>(16, pagedserve::kDequantBufferBytes / (K * 4));
  std::vector<float> buffer;
  int64_t column = 0;
  for (const pagedserve::GgufShard& s : shards) {
    for (int64_t r0 = 0; r0 < s.rows; r0 += chunk) {
      const int64_t rows = std::min(chunk, s.rows - r0);
      const uint8_t* w = s.data + r0 * s.row_stride;
      at::Tensor wt;
      if (s.type == kF32 && s.row_stride % 4 == 0) {
        wt = at::from_blob(const_cast<uint8_t*>(w), {rows, K}, {s.row_stride / 4, 1}, f32);
      } else {
        buffer.resize(rows * K);
        at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) dequantize_row(w + r * s.row_stride, s.type, K, buffer.data() + r * K);
        });
        wt = at::from_blob(buffer.data(), {rows, K}, f32);
      }
      at::Tensor out = at::from_blob(y + column, {M, rows}, {ldy, 1}, f32);
      at::mm_out(out, xt, wt.t());
      column += rows;
    }
  }
}

}  // namespace

namespace pagedserve {

bool all_block_quantized(const std::vector<GgufShard>& shards) {
  for (const GgufShard& s : shards)
    if (is_plain(s.type)) return false;
  return true;
}

bool gguf_needs_activations(const std::vector<GgufShard>& shards) {
  for (const GgufShard& s : shards)
    if (!is_plain(s.type)) return true;
  return false;
}

int64_t gguf_row_bytes(const std::vector<GgufShard>& shards, int64_t K) {
  int64_t total_bytes = 0, rows = 0;
  for (const GgufShard& s : shards) {
    total_bytes += s.rows * K / type_info(s.type).block * type_info(s.type).bytes;
    rows += s.rows;
  }
  return std::max<int64_t>(1, total_bytes / std::max<int64_t>(rows, 1));
}

// Whether several rows of x meet two weight rows per tile (unpacking shared by both) or one.
// NOTE: measured on Zen 3 (AVX2), rows of x 2-16: the heavier types (Q8_0 1.06, Q6_K 0.82, Q5_K
// 0.69 bytes a value) run faster one row at a time once their weights come from L3 or memory:
// 1.5-3x on Q8_0 LM heads (SmolLM2, Qwen2.5-0.5B) and on Qwen2.5-1.5B's Q6_K gate/up-sized
// matrices at 2-8 rows; the two rows' interleaved streams defeat the prefetchers. The lighter
// types measure alike either way (in cache, two rows are a little ahead).
inline bool two_row_tiles(int64_t type) { return type != kQ8_0 && type != kQ6_K && type != kQ5_K; }

void gguf_gemm_rows(const float* x, int64_t ldx, const GgufActivations& qx, int64_t M, int64_t K,
                    const std::vector<GgufShard>& shards, int64_t n_begin, int64_t n_end, const float* bias, float* y,
                    int64_t ldy) {
  if (n_begin >= n_end || M == 0) return;
  // the shard holding row n: rows [first_row[s], first_row[s] + shards[s].rows)
  size_t s = 0;
  int64_t first_row = 0;
  auto seek = [&](int64_t n) {
    while (n >= first_row + shards[s].rows) first_row += shards[s++].rows;
  };
#if defined(PAGEDSERVE_AVX2)
  // Tiles: rows are walked in chunks that stay in L1/L2 while every group of (up to 4) rows of x
  // passes over them, one or two weight rows per tile (two_row_tiles).
  auto tiles = [&](int64_t begin, int64_t end) {
    const int64_t chunk = std::max<int64_t>(8, (16 * 1024) / gguf_row_bytes(shards, K));
    float yt[8];
    for (int64_t n0 = begin; n0 < end; n0 += chunk) {
      const int64_t n1 = std::min(end, n0 + chunk);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int ra = static_cast<int>(std::min<int64_t>(4, M - m0));
        s = 0;
        first_row = 0;
        for (int64_t n = n0; n < n1;) {
          seek(n);
          const GgufShard& sh = shards[s];
          const int64_t shard_end = first_row + sh.rows, local = n - first_row;
          // one row of x: single-row tiles of 8 sub-blocks at a time (quant_row_grouped)
          const int rw =
              n + 1 < std::min(n1, shard_end) && (M > 1 || is_plain(sh.type)) && two_row_tiles(sh.type) ? 2 : 1;
          const uint8_t* w[2] = {sh.data + local * sh.row_stride, sh.data + (local + rw - 1) * sh.row_stride};
          const int64_t prefetch = n + 2 * rw <= std::min(end, shard_end) ? rw * sh.row_stride : 0;
          tile_for(sh.type, rw, ra)({w, prefetch, K, &qx, x + m0 * ldx, ldx, m0, yt});
          for (int i = 0; i < rw; ++i)
            for (int r = 0; r < ra; ++r) y[(m0 + r) * ldy + n + i] = yt[i * ra + r];
          n += rw;
        }
      }
    }
  };
  if (M < kPanelMinRows) {
    tiles(n_begin, n_end);
  } else {  // block-quantized shards by panels (unpacked once for every row of x), plain ones by tiles
    for (int64_t n = n_begin; n < n_end;) {
      seek(n);  // (tiles() leaves s / first_row at a shard at or before n's: seek only moves on)
      const GgufShard& sh = shards[s];
      const int64_t end = std::min(n_end, first_row + sh.rows);
      if (is_plain(sh.type)) {
        tiles(n, end);
      } else {
        panel_columns(sh, n - first_row, end - first_row, K, qx, M, y + n, ldy);
      }
      n = end;
    }
  }
#else
  (void)qx;
  std::vector<float> row(K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    seek(n);
    const GgufShard& sh = shards[s];
    dequantize_row(sh.data + (n - first_row) * sh.row_stride, sh.type, K, row.data());
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += row[k] * x[m * ldx + k];
      y[m * ldy + n] = sum;
    }
  }
#endif
  if (bias != nullptr) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n_begin; n < n_end; ++n) y[m * ldy + n] += bias[n];
  }
}

void gguf_gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const std::vector<GgufShard>& shards,
               const float* bias, float* y, int64_t ldy) {
  const int64_t N = gguf_total_rows(shards);
  if (M == 0 || N == 0) return;
#if defined(PAGEDSERVE_AVX2)
  // Plain (F32 / F16 / BF16) weights meet many rows of x in MKL, block-quantized ones in panels.
  const bool dequantize = M >= kDequantMinRows && !all_block_quantized(shards);
#else
  const bool dequantize = M >= kDequantMinRows;  // the scalar rows path would be far slower than MKL
#endif
  if (dequantize) {
    dequant_gemm(x, ldx, M, K, shards, y, ldy);
    if (bias != nullptr) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * ldy + n] += bias[n];
    }
    return;
  }
  GgufActivations qx;
  if (gguf_needs_activations(shards)) {
    qx.resize(M, K);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K),
                     [&](int64_t begin, int64_t end) { gguf_quantize_rows(x, ldx, begin, end, &qx); });
  }
  // Threads split the output rows, at least ~32 KB of weights each.
  const int64_t grain = std::max<int64_t>(2, (32 * 1024) / gguf_row_bytes(shards, K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    gguf_gemm_rows(x, ldx, qx, M, K, shards, begin, end, bias, y, ldy);
  });
}

}  // namespace pagedserve

namespace {

void gguf_linear(at::Tensor& out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef types,
                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "gguf_linear: x must be [M, K] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gguf_linear: x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<pagedserve::GgufShard> shards = pagedserve::gguf_shards(weights, types, K, "gguf_linear");
  const int64_t N = pagedserve::gguf_total_rows(shards);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type(),
              "gguf_linear: out must be a contiguous [M, N] tensor of x's dtype");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "gguf_linear: bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
  if (out.scalar_type() == at::kFloat) {
    pagedserve::gguf_gemm(x.data_ptr<float>(), x.stride(0), M, K, shards, bp, out.data_ptr<float>(), N);
    return;
  }
  const at::Tensor xf = x.to(at::kFloat);
  std::vector<float> y(M * N);
  pagedserve::gguf_gemm(xf.data_ptr<float>(), xf.stride(0), M, K, shards, bp, y.data(), N);
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < M * N; ++i) o[i] = c10::BFloat16(y[i]);
}

void gguf_dequantize(at::Tensor& out, const at::Tensor& weight, int64_t type) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "gguf_dequantize: out must be a contiguous float32 [N, K]");
  const int64_t N = out.size(0), K = out.size(1);
  check_weight(weight, type, K, "gguf_dequantize");
  TORCH_CHECK(weight.size(0) == N, "gguf_dequantize: out has ", N, " rows, the weight ", weight.size(0));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t stride = weight.stride(0);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) dequantize_row(w + n * stride, type, K, o + n * K);
  });
}

void gguf_embedding(at::Tensor& out, const at::Tensor& ids, const at::Tensor& weight, int64_t type) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "gguf_embedding: out must be a contiguous [T, K]");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "gguf_embedding: out must be float32 or bfloat16");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.size(0) == out.size(0),
              "gguf_embedding: ids must be int64 [T]");
  const int64_t T = out.size(0), K = out.size(1), V = weight.size(0);
  check_weight(weight, type, K, "gguf_embedding");
  at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < V, "gguf_embedding: token id ", id[t], " out of range");
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t stride = weight.stride(0);
  const bool is_f32 = out.scalar_type() == at::kFloat;
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> row(is_f32 ? 0 : K);
    for (int64_t t = begin; t < end; ++t) {
      if (is_f32) {
        dequantize_row(w + id[t] * stride, type, K, out.data_ptr<float>() + t * K);
      } else {
        dequantize_row(w + id[t] * stride, type, K, row.data());
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + t * K;
        for (int64_t k = 0; k < K; ++k) o[k] = c10::BFloat16(row[k]);
      }
    }
  });
}

bool has_avx2_path() {
#if defined(PAGEDSERVE_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(pagedserve_gguf, m) {
  m.def("gguf_linear(Tensor(a!) out, Tensor x, Tensor[] weights, int[] types, Tensor? bias) -> ()");
  m.def("gguf_dequantize(Tensor(a!) out, Tensor weight, int type) -> ()");
  m.def("gguf_embedding(Tensor(a!) out, Tensor ids, Tensor weight, int type) -> ()");
  m.def("gguf_has_simd() -> bool", &has_avx2_path);
}

TORCH_LIBRARY_IMPL(pagedserve_gguf, CPU, m) {
  m.impl("gguf_linear", &gguf_linear);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("gguf_embedding", &gguf_embedding);
}
