// One Llama-family decoder layer (Llama, Mistral, Qwen2, Qwen3) for a decode step, as one op.
//
//   llama_decode_layer(residual!, hidden, add_hidden, positions, slot_mapping, token_indices,
//                      block_table, seq_lens, kv_cache!, <the layer's weights and sizes>) -> out
//
//   residual += hidden (unless add_hidden is false: the first layer's residual is the embedding)
//   x = rms_norm(residual) * input_norm
//   q, k, v = x @ Wqkv^T (+ bias); per-head q/k RMSNorm (Qwen3); RoPE at `positions`
//   kv_cache[., slot_mapping[t]] = k, v
//   a = softmax(q K^T * scale) V over each request's cached keys (GQA: a KV head serves its group)
//   residual += a @ Wo^T (+ bias)
//   out = (silu(g) * u) @ Wdown^T (+ bias), [g | u] = (rms_norm(residual) * post_norm) @ Wgate_up^T
//
// Every token is a decode: token t is request token_indices[r]'s one new token, at position
// seq_lens[r] - 1 (so T == number of requests). Each linear runs gguf_gemm on its weights as
// stored (GGUF blocks, or plain F32/F16/BF16 rows); everything else is float32, with the KV cache
// in float32, bfloat16 or float16. Running the layer as one call instead of ~20 torch ops is the
// point: at decode batch sizes the eager layer spends more time dispatching than computing.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"
#include "gguf_gemm.h"

namespace {

using pagedserve::GgufShard;

// Scratch buffers reused across calls (one set per thread that calls the op).
std::vector<float>& scratch(int which, size_t size) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& buffer = buffers[which];
  if (buffer.size() < size) buffer.resize(size);
  return buffer;
}

// y = x * rsqrt(mean(x^2) + eps) * w over one row of n values.
void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
#if defined(PAGEDSERVE_AVX2)
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float sum = pagedserve::hsum8(acc);
  for (; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
#else
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
#endif
}

// Rotates the first rotary_dim values of one head in place: pairs (i, i + half) (GPT-NeoX) or
// (2i, 2i + 1) (GPT-J), by cos/sin rows of half values each.
void rope_head(float* x, const float* cos, const float* sin, int64_t rotary_dim, bool neox) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float* a = neox ? x + i : x + 2 * i;
    float* b = neox ? x + i + half : x + 2 * i + 1;
    const float x1 = *a, x2 = *b;
    *a = x1 * cos[i] - x2 * sin[i];
    *b = x2 * cos[i] + x1 * sin[i];
  }
}

void silu_and_mul_row(const float* gate, const float* up, int64_t n, float* y) {
  int64_t i = 0;
#if defined(PAGEDSERVE_AVX2)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, pagedserve::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) y[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// Attention of one request's query heads [group, D] of one KV head over its cached keys.
struct AttendWork {
  const float* q;  // [group, D] (contiguous heads)
  float* out;      // [group, D]
  const int32_t* blocks;
  int64_t first, num_keys;  // keys at positions first .. first + num_keys - 1
  int64_t group, D, block_size;
  int64_t kv_head, num_kv_heads;
  float scale;
};

template <typename C>
void attend(const AttendWork& w, const C* k_cache, const C* v_cache, std::vector<float>& scores) {
  const int64_t D = w.D, n = w.num_keys;
  auto row = [&](const C* cache, int64_t j) {
    const int64_t pos = w.first + j;
    const int64_t slot = static_cast<int64_t>(w.blocks[pos / w.block_size]) * w.block_size + pos % w.block_size;
    return cache + (slot * w.num_kv_heads + w.kv_head) * D;
  };
  scores.resize(w.group * n);
  for (int64_t g = 0; g < w.group; ++g) {
    const float* q = w.q + g * D;
    float* s = scores.data() + g * n;
    int64_t j = 0;
#if defined(PAGEDSERVE_AVX2)
    if (D % 8 == 0) {
      for (; j + 8 <= n; j += 8) {
        const C* rows[8];
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) {
          rows[r] = row(k_cache, j + r);
          acc[r] = _mm256_setzero_ps();
        }
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, pagedserve::load8f(rows[r] + d), acc[r]);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(pagedserve::hsum8x8(acc), _mm256_set1_ps(w.scale)));
      }
    }
#endif
    for (; j < n; ++j) {
      const C* k = row(k_cache, j);
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[d]);
      s[j] = dot * w.scale;
    }
    // softmax over the keys, normalised at the end
    float max_score = -INFINITY;
    for (int64_t i = 0; i < n; ++i) max_score = std::max(max_score, s[i]);
    float total = 0.0f;
    int64_t i = 0;
#if defined(PAGEDSERVE_AVX2)
    __m256 vtotal = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = pagedserve::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(max_score)));
      _mm256_storeu_ps(s + i, e);
      vtotal = _mm256_add_ps(vtotal, e);
    }
    total = pagedserve::hsum8(vtotal);
#endif
    for (; i < n; ++i) {
      s[i] = std::exp(s[i] - max_score);
      total += s[i];
    }
    const float inv_total = 1.0f / total;
    float* out = w.out + g * D;
    int64_t d0 = 0;
#if defined(PAGEDSERVE_AVX2)
    for (; d0 + 64 <= D; d0 += 64) {  // 64 output values in 8 registers per pass over V
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t k = 0; k < n; ++k) {
        const C* v = row(v_cache, k) + d0;
        const __m256 p = _mm256_set1_ps(s[k]);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(p, pagedserve::load8f(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv_total)));
    }
#endif
    for (int64_t d = d0; d < D; ++d) {
      float acc = 0.0f;
      for (int64_t k = 0; k < n; ++k) acc += s[k] * static_cast<float>(row(v_cache, k)[d]);
      out[d] = acc * inv_total;
    }
  }
}

template <typename C>
void write_and_attend(const at::Tensor& kv_cache, const float* qkv, int64_t qkv_stride, const at::Tensor& slot_mapping,
                      const at::Tensor& token_indices, const at::Tensor& block_table, const at::Tensor& seq_lens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t D, double scale, int64_t sliding_window,
                      float* attn_out) {
  const int64_t T = slot_mapping.size(0);
  const int64_t block_size = kv_cache.size(2);
  C* k_cache = kv_cache.data_ptr<C>();
  C* v_cache = k_cache + kv_cache.stride(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;
  for (int64_t t = 0; t < T; ++t) {
    const float* k = qkv + t * qkv_stride + q_size;
    const float* v = k + kv_size;
    C* kd = k_cache + slots[t] * kv_size;
    C* vd = v_cache + slots[t] * kv_size;
    for (int64_t i = 0; i < kv_size; ++i) {
      kd[i] = static_cast<C>(k[i]);
      vd[i] = static_cast<C>(v[i]);
    }
  }
  const int64_t num_reqs = token_indices.size(0), group = num_heads / num_kv_heads;
  const int64_t* tokens = token_indices.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t items = num_reqs * num_kv_heads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / num_kv_heads, h = item % num_kv_heads, t = tokens[r];
      const int64_t seq_len = lens[r];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, seq_len - sliding_window) : 0;
      const AttendWork work{qkv + t * qkv_stride + h * group * D,
                            attn_out + t * q_size + h * group * D,
                            table + r * table_stride,
                            first,
                            seq_len - first,
                            group,
                            D,
                            block_size,
                            h,
                            num_kv_heads,
                            static_cast<float>(scale)};
      attend<C>(work, k_cache, v_cache, scores);
    }
  });
}

const float* optional_f32(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel, "llama_decode_layer: ",
              name, " must be a contiguous float32 tensor of ", numel, " values");
  return t->data_ptr<float>();
}

void check_f32(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel, "llama_decode_layer: ", name,
              " must be a contiguous float32 tensor of ", numel, " values");
}

at::Tensor llama_decode_layer(at::Tensor& residual, const at::Tensor& hidden, bool add_hidden, const at::Tensor& positions,
                              const at::Tensor& slot_mapping, const at::Tensor& token_indices,
                              const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& kv_cache,
                              const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                              at::TensorList qkv_w, at::IntArrayRef qkv_types, const c10::optional<at::Tensor>& qkv_bias,
                              const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                              at::TensorList o_w, at::IntArrayRef o_types, const c10::optional<at::Tensor>& o_bias,
                              at::TensorList gate_up_w, at::IntArrayRef gate_up_types,
                              const c10::optional<at::Tensor>& gate_up_bias, at::TensorList down_w,
                              at::IntArrayRef down_types, const c10::optional<at::Tensor>& down_bias,
                              const at::Tensor& cos_sin, bool neox, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, double scale, int64_t sliding_window) {
  const int64_t T = residual.size(0), H = residual.size(1), D = head_dim;
  TORCH_CHECK(residual.dim() == 2 && residual.scalar_type() == at::kFloat && residual.is_contiguous(),
              "llama_decode_layer: residual must be a contiguous float32 [T, hidden]");
  TORCH_CHECK(!add_hidden || (hidden.sizes() == residual.sizes() && hidden.scalar_type() == at::kFloat &&
                              hidden.is_contiguous()),
              "llama_decode_layer: hidden must match residual");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == T,
              "llama_decode_layer: positions must be int64 [T]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "llama_decode_layer: slot_mapping must be int64 [T]");
  TORCH_CHECK(token_indices.scalar_type() == at::kLong && token_indices.is_contiguous() && token_indices.numel() == T &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() == T,
              "llama_decode_layer: every token must be a decode (token_indices, seq_lens: int64 [T])");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  block_table.size(0) == T,
              "llama_decode_layer: block_table must be int32 [T, blocks] with contiguous rows");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(3) == num_kv_heads &&
                  kv_cache.size(4) == D && kv_cache.stride(4) == 1 && kv_cache.stride(3) == D &&
                  kv_cache.stride(2) == num_kv_heads * D && kv_cache.stride(1) == kv_cache.size(2) * num_kv_heads * D,
              "llama_decode_layer: kv_cache must be a contiguous-row [2, blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(num_heads % num_kv_heads == 0, "llama_decode_layer: heads must be a multiple of KV heads");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.is_contiguous() &&
                  cos_sin.size(1) % 2 == 0 && cos_sin.size(1) <= D,
              "llama_decode_layer: cos_sin must be float32 [positions, rotary_dim]");
  check_f32(input_norm, H, "input_norm");
  check_f32(post_norm, H, "post_norm");
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D, qkv_size = q_size + 2 * kv_size;

  const std::vector<GgufShard> qkv_shards = pagedserve::gguf_shards(qkv_w, qkv_types, H, "llama_decode_layer qkv");
  const std::vector<GgufShard> o_shards = pagedserve::gguf_shards(o_w, o_types, q_size, "llama_decode_layer o_proj");
  TORCH_CHECK(pagedserve::gguf_total_rows(qkv_shards) == qkv_size, "llama_decode_layer: qkv weights have ",
              pagedserve::gguf_total_rows(qkv_shards), " rows, expected ", qkv_size);
  TORCH_CHECK(pagedserve::gguf_total_rows(o_shards) == H, "llama_decode_layer: o_proj must have hidden rows");
  TORCH_CHECK(!gate_up_w.empty(), "llama_decode_layer: no gate_up weights");
  const int64_t I2 = [&] {
    int64_t rows = 0;
    for (const at::Tensor& t : gate_up_w) rows += t.size(0);
    return rows;
  }();
  TORCH_CHECK(I2 % 2 == 0, "llama_decode_layer: gate_up rows must be even");
  const int64_t I = I2 / 2;
  const std::vector<GgufShard> gate_up_shards =
      pagedserve::gguf_shards(gate_up_w, gate_up_types, H, "llama_decode_layer gate_up");
  const std::vector<GgufShard> down_shards = pagedserve::gguf_shards(down_w, down_types, I, "llama_decode_layer down");
  TORCH_CHECK(pagedserve::gguf_total_rows(down_shards) == H, "llama_decode_layer: down_proj must have hidden rows");
  const float* qkv_b = optional_f32(qkv_bias, qkv_size, "qkv_bias");
  const float* o_b = optional_f32(o_bias, H, "o_bias");
  const float* gu_b = optional_f32(gate_up_bias, I2, "gate_up_bias");
  const float* down_b = optional_f32(down_bias, H, "down_bias");
  const float* qn = optional_f32(q_norm, D, "q_norm");
  const float* kn = optional_f32(k_norm, D, "k_norm");

  float* res = residual.data_ptr<float>();
  if (add_hidden) {
    const float* h = hidden.data_ptr<float>();
    for (int64_t i = 0; i < T * H; ++i) res[i] += h[i];
  }
  float* x = scratch(0, T * H).data();
  const float* in_w = input_norm.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) rms_norm_row(res + t * H, in_w, H, static_cast<float>(eps), x + t * H);

  float* qkv = scratch(1, T * qkv_size).data();
  pagedserve::gguf_gemm(x, H, T, H, qkv_shards, qkv_b, qkv, qkv_size);

  const int64_t rotary_dim = cos_sin.size(1), half = rotary_dim / 2;
  const float* table = cos_sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  std::vector<float> head(D);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin.size(0), "llama_decode_layer: position ", pos[t], " out of range");
    const float* cos = table + pos[t] * rotary_dim;
    const float* sin = cos + half;
    float* row = qkv + t * qkv_size;
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
      float* x_head = row + h * D;
      const float* norm_w = h < num_heads ? qn : kn;
      if (norm_w != nullptr) {
        rms_norm_row(x_head, norm_w, D, static_cast<float>(eps), head.data());
        std::copy(head.begin(), head.end(), x_head);
      }
      rope_head(x_head, cos, sin, rotary_dim, neox);
    }
  }

  float* attn = scratch(2, T * q_size).data();
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      write_and_attend<float>(kv_cache, qkv, qkv_size, slot_mapping, token_indices, block_table, seq_lens, num_heads,
                              num_kv_heads, D, scale, sliding_window, attn);
      break;
    case at::kBFloat16:
      write_and_attend<c10::BFloat16>(kv_cache, qkv, qkv_size, slot_mapping, token_indices, block_table, seq_lens,
                                      num_heads, num_kv_heads, D, scale, sliding_window, attn);
      break;
    case at::kHalf:
      write_and_attend<c10::Half>(kv_cache, qkv, qkv_size, slot_mapping, token_indices, block_table, seq_lens,
                                  num_heads, num_kv_heads, D, scale, sliding_window, attn);
      break;
    default:
      TORCH_CHECK(false, "llama_decode_layer: KV cache must be float32, bfloat16 or float16");
  }

  float* o = scratch(3, T * H).data();
  pagedserve::gguf_gemm(attn, q_size, T, q_size, o_shards, o_b, o, H);
  for (int64_t i = 0; i < T * H; ++i) res[i] += o[i];
  const float* post_w = post_norm.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) rms_norm_row(res + t * H, post_w, H, static_cast<float>(eps), x + t * H);

  float* gate_up = scratch(4, T * I2).data();
  pagedserve::gguf_gemm(x, H, T, H, gate_up_shards, gu_b, gate_up, I2);
  float* act = scratch(5, T * I).data();
  for (int64_t t = 0; t < T; ++t) silu_and_mul_row(gate_up + t * I2, gate_up + t * I2 + I, I, act + t * I);

  at::Tensor out = at::empty({T, H}, residual.options());
  pagedserve::gguf_gemm(act, I, T, I, down_shards, down_b, out.data_ptr<float>(), H);
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedserve_decode, m) {
  m.def(
      "llama_decode_layer(Tensor(a!) residual, Tensor hidden, bool add_hidden, Tensor positions, "
      "Tensor slot_mapping, Tensor token_indices, Tensor block_table, Tensor seq_lens, Tensor(b!) kv_cache, "
      "Tensor input_norm, Tensor post_norm, float eps, Tensor[] qkv, int[] qkv_types, Tensor? qkv_bias, "
      "Tensor? q_norm, Tensor? k_norm, Tensor[] o, int[] o_types, Tensor? o_bias, Tensor[] gate_up, "
      "int[] gate_up_types, Tensor? gate_up_bias, Tensor[] down, int[] down_types, Tensor? down_bias, "
      "Tensor cos_sin, bool neox, int num_heads, int num_kv_heads, int head_dim, float scale, "
      "int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedserve_decode, CPU, m) { m.impl("llama_decode_layer", &llama_decode_layer); }
