// Llama-family decoder layers (Llama, Mistral, Qwen2, Qwen3) for a decode step, in C++.
//
//   llama_decode_layer(residual!, hidden, add_hidden, positions, slot_mapping, token_indices,
//                      block_table, seq_lens, kv_cache!, <the layer's weights and sizes>) -> out
//   DecodeModel: add_layer(<weights and sizes>) once per layer at load; then per step
//                forward(residual!, positions, slot_mapping, token_indices, block_table, seq_lens,
//                        kv_caches!) -> out: every layer in one parallel region
//                set_lora(layer, linear, a, b[], offsets[], rank) once per adapted linear at load;
//                forward_lora(..., token_lora_slots): forward plus each token's LoRA adapter
//
// Each layer computes
//   residual += hidden (unless add_hidden is false: the first layer's residual is the embedding)
//   x = rms_norm(residual) * input_norm
//   q, k, v = x @ Wqkv^T (+ bias); per-head q/k RMSNorm (Qwen3); RoPE at `positions`
//   kv_cache[., slot_mapping[t]] = k, v
//   a = softmax(q K^T * scale) V over each request's cached keys (GQA: a KV head serves its group)
//   residual += a @ Wo^T (+ bias)
//   out = (silu(g) * u) @ Wdown^T (+ bias), [g | u] = (rms_norm(residual) * post_norm) @ Wgate_up^T
//
// Every token is a decode: query r is token token_indices[r], at position seq_lens[r] - 1. A
// request has one query, or (speculative decoding: its last token and the drafts after it) several
// adjacent ones at consecutive positions; then every K/V of the step is written before any query
// attends (StepInputs::kv_first). Each linear runs gguf_gemm on its weights as
// stored (GGUF blocks, or plain F32/F16/BF16 rows); everything else is float32, with the KV cache
// in float32, bfloat16 or float16. At decode batch sizes an eager layer spends more time
// dispatching ~20 torch ops than computing; and every parallel op forks the thread team again,
// which costs tens of microseconds in a VM (a sleeping thread is woken by an inter-processor
// interrupt). DecodeModel.forward therefore runs all layers in one OpenMP region: the threads
// split each phase's rows and meet at a spinning barrier between phases (9 per layer, 10 when
// the attention phase is split in two: see layer_in_region).
//
// Attention reads each K/V row once per (request, KV head, part of its query heads): a request's
// speculative queries attend together (query_runs), and the keys' cache offsets come from one walk
// over the block table, not a division per key.

#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_math.h"
#include "gguf_gemm.h"

namespace {

using pagedserve::GgufShard;

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

// One attention row of an item. An item is some query heads, of one KV head, of one request's
// queries (one query, or a request's last token and its drafts: adjacent queries whose block
// tables agree). A row attends the keys at positions [begin, end).
struct AttendRow {
  const float* q;  // [D]
  float* out;      // [D]
  int64_t begin, end;
};

// Per-thread scratch of the attention phase.
struct AttendScratch {
  std::vector<AttendRow> rows;
  std::vector<float> scores;     // [rows, keys rounded up to 8]
  std::vector<int64_t> offsets;  // element offset of each key's row in the caches
};

// Keys a pass reads ahead of the one it computes with. A request's keys sit in blocks scattered over
// the cache, 16 rows a block, too short a run for the hardware prefetcher to follow.
constexpr int64_t kPrefetchKeys = 16;

// Softmax of s[0, n) in place, unnormalised; returns 1 / sum.
inline float softmax_unnormalised(float* s, int64_t n) {
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
  return 1.0f / total;
}

// The rows of `s.rows` over keys [first, first + n) whose rows (at `s.offsets`, D values each) sit
// in k_cache and v_cache.
//
// Every row's result is computed by the same instructions whatever the other rows are (its own
// key range, its own softmax and V pass; each key's score comes from a full 8-key chunk: the
// chunks past the last key repeat it), so a query's output does not depend on which queries, how
// many heads or which keys share its item: outputs are the same alone, in a batch, and as one of
// a request's speculative queries.
//
// 8 keys' K rows are read once for every row's scores. Each row then makes its own pass over V:
// the rows after the first find V in cache while the item's V rows fit in L2 (D = 64, float32:
// up to ~2k keys on Zen 3), in L3 beyond. Attention at long contexts is bound by reading the
// cache: a float16/bfloat16 cache (--kv-cache-dtype) halves it.
template <typename C>
void attend_rows(AttendScratch& s, const C* k_cache, const C* v_cache, int64_t first, int64_t n, int64_t D,
                 float scale) {
  const std::vector<AttendRow>& rows = s.rows;
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const int64_t* offsets = s.offsets.data();
  bool vector = false;
#if defined(PAGEDSERVE_AVX2)
  vector = D % 8 == 0;
#endif
  const int64_t padded = vector ? (n + 7) / 8 * 8 : n;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(C));
  s.scores.resize(num_rows * padded);
  float* scores = s.scores.data();
  if (vector) {
#if defined(PAGEDSERVE_AVX2)
    for (int64_t j = 0; j < padded; j += 8) {
      const C* keys[8];
      for (int r = 0; r < 8; ++r) keys[r] = k_cache + offsets[j + r];
      if (j + kPrefetchKeys + 8 <= padded)
        for (int r = 0; r < 8; ++r) pagedserve::prefetch_bytes(k_cache + offsets[j + kPrefetchKeys + r], row_bytes);
      for (int64_t i = 0; i < num_rows; ++i) {
        const float* q = rows[i].q;
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, pagedserve::load8f(keys[r] + d), acc[r]);
        }
        _mm256_storeu_ps(scores + i * padded + j, _mm256_mul_ps(pagedserve::hsum8x8(acc), _mm256_set1_ps(scale)));
      }
    }
#endif
  } else {
    for (int64_t i = 0; i < num_rows; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const C* k = k_cache + offsets[j];
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += rows[i].q[d] * static_cast<float>(k[d]);
        scores[i * padded + j] = dot * scale;
      }
  }
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t skip = rows[i].begin - first, m = rows[i].end - rows[i].begin;
    float* p = scores + i * padded + skip;
    const int64_t* offs = offsets + skip;
    const float inv_total = softmax_unnormalised(p, m);
    float* out = rows[i].out;
    int64_t d0 = 0;
#if defined(PAGEDSERVE_AVX2)
    for (; d0 + 64 <= D; d0 += 64) {  // 64 output values in 8 registers per pass over V
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t k = 0; k < m; ++k) {
        if (d0 == 0 && k + kPrefetchKeys < m) pagedserve::prefetch_bytes(v_cache + offs[k + kPrefetchKeys], row_bytes);
        const C* v = v_cache + offs[k] + d0;
        const __m256 pk = _mm256_set1_ps(p[k]);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pk, pagedserve::load8f(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv_total)));
    }
    for (; d0 + 8 <= D; d0 += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < m; ++k)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(p[k]), pagedserve::load8f(v_cache + offs[k] + d0), acc);
      _mm256_storeu_ps(out + d0, _mm256_mul_ps(acc, _mm256_set1_ps(inv_total)));
    }
#endif
    for (int64_t d = d0; d < D; ++d) {
      float acc = 0.0f;
      for (int64_t k = 0; k < m; ++k) acc += p[k] * static_cast<float>(v_cache[offs[k] + d]);
      out[d] = acc * inv_total;
    }
  }
}

// s.offsets[j] = the cache offset of key first + j of KV head h through `blocks`, for j < n, then
// the last key again up to a multiple of 8. One division per call, none per key.
void key_offsets(AttendScratch& s, const int32_t* blocks, int64_t block_size, int64_t first, int64_t n,
                 int64_t kv_size, int64_t head_offset) {
  const int64_t padded = (n + 7) / 8 * 8;
  s.offsets.resize(padded);
  int64_t b = first / block_size, o = first % block_size;
  for (int64_t j = 0; j < n; ++j) {
    s.offsets[j] = (static_cast<int64_t>(blocks[b]) * block_size + o) * kv_size + head_offset;
    if (++o == block_size) {
      o = 0;
      ++b;
    }
  }
  for (int64_t j = n; j < padded; ++j) s.offsets[j] = s.offsets[n - 1];
}

// One layer's weights and shapes, as both entry points receive them.
struct LayerWeights {
  const float* input_norm;
  const float* post_norm;
  float eps;
  std::vector<GgufShard> qkv, o, gate_up, down;
  const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias, *q_norm, *k_norm;  // null if absent
  const float* cos_sin;
  int64_t num_positions, rotary_dim;
  bool neox;
  int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
  float scale;
  int64_t sliding_window;
  std::vector<at::Tensor> keep_alive;  // the tensors behind the pointers above

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  int64_t qkv_size() const { return q_size() + 2 * kv_size(); }
};

const float* optional_f32(const c10::optional<at::Tensor>& t, int64_t numel, const char* name, LayerWeights* lw) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel, "llama decode layer: ",
              name, " must be a contiguous float32 tensor of ", numel, " values");
  lw->keep_alive.push_back(*t);
  return t->data_ptr<float>();
}

const float* required_f32(const at::Tensor& t, int64_t numel, const char* name, LayerWeights* lw) {
  return optional_f32(c10::optional<at::Tensor>(t), numel, name, lw);
}

std::vector<GgufShard> shards_of(at::TensorList weights, at::IntArrayRef types, int64_t K, const char* name,
                                 LayerWeights* lw) {
  for (const at::Tensor& t : weights) lw->keep_alive.push_back(t);
  return pagedserve::gguf_shards(weights, types, K, name);
}

LayerWeights make_layer(const at::Tensor& input_norm, const at::Tensor& post_norm, double eps, at::TensorList qkv_w,
                        at::IntArrayRef qkv_types, const c10::optional<at::Tensor>& qkv_bias,
                        const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                        at::TensorList o_w, at::IntArrayRef o_types, const c10::optional<at::Tensor>& o_bias,
                        at::TensorList gate_up_w, at::IntArrayRef gate_up_types,
                        const c10::optional<at::Tensor>& gate_up_bias, at::TensorList down_w,
                        at::IntArrayRef down_types, const c10::optional<at::Tensor>& down_bias,
                        const at::Tensor& cos_sin, bool neox, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, double scale, int64_t sliding_window) {
  LayerWeights lw;
  const int64_t H = input_norm.numel(), D = head_dim;
  TORCH_CHECK(D > 0 && D <= 512, "llama decode layer: head_dim must be in 1..512");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "llama decode layer: heads must be a positive multiple of KV heads");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.is_contiguous() &&
                  cos_sin.size(1) % 2 == 0 && cos_sin.size(1) <= D,
              "llama decode layer: cos_sin must be float32 [positions, rotary_dim]");
  lw.hidden = H;
  lw.num_heads = num_heads;
  lw.num_kv_heads = num_kv_heads;
  lw.head_dim = D;
  lw.eps = static_cast<float>(eps);
  lw.scale = static_cast<float>(scale);
  lw.sliding_window = sliding_window;
  lw.neox = neox;
  lw.input_norm = required_f32(input_norm, H, "input_norm", &lw);
  lw.post_norm = required_f32(post_norm, H, "post_norm", &lw);
  lw.qkv = shards_of(qkv_w, qkv_types, H, "llama decode layer qkv", &lw);
  lw.o = shards_of(o_w, o_types, lw.q_size(), "llama decode layer o_proj", &lw);
  TORCH_CHECK(pagedserve::gguf_total_rows(lw.qkv) == lw.qkv_size(), "llama decode layer: qkv weights have ",
              pagedserve::gguf_total_rows(lw.qkv), " rows, expected ", lw.qkv_size());
  TORCH_CHECK(pagedserve::gguf_total_rows(lw.o) == H, "llama decode layer: o_proj must have hidden rows");
  lw.gate_up = shards_of(gate_up_w, gate_up_types, H, "llama decode layer gate_up", &lw);
  const int64_t I2 = pagedserve::gguf_total_rows(lw.gate_up);
  TORCH_CHECK(I2 > 0 && I2 % 2 == 0, "llama decode layer: gate_up rows must be even");
  lw.intermediate = I2 / 2;
  lw.down = shards_of(down_w, down_types, lw.intermediate, "llama decode layer down", &lw);
  TORCH_CHECK(pagedserve::gguf_total_rows(lw.down) == H, "llama decode layer: down_proj must have hidden rows");
  lw.qkv_bias = optional_f32(qkv_bias, lw.qkv_size(), "qkv_bias", &lw);
  lw.o_bias = optional_f32(o_bias, H, "o_bias", &lw);
  lw.gate_up_bias = optional_f32(gate_up_bias, I2, "gate_up_bias", &lw);
  lw.down_bias = optional_f32(down_bias, H, "down_bias", &lw);
  lw.q_norm = optional_f32(q_norm, D, "q_norm", &lw);
  lw.k_norm = optional_f32(k_norm, D, "k_norm", &lw);
  lw.keep_alive.push_back(cos_sin);
  lw.cos_sin = cos_sin.data_ptr<float>();
  lw.num_positions = cos_sin.size(0);
  lw.rotary_dim = cos_sin.size(1);
  return lw;
}

// The step's decode inputs (shared by every layer), checked once.
struct StepInputs {
  int64_t T;
  const int64_t* positions;
  const int64_t* slots;
  const int64_t* tokens;
  const int64_t* seq_lens;
  const int32_t* block_table;
  int64_t table_stride;
  // Some query reads a slot another query of the step writes (several queries of one request):
  // the attention phase writes every K/V first, then attends (one more barrier).
  bool kv_first = false;
  // Queries that attend as one item: [r0, r1) of one request (see query_runs); a run per query
  // unless kv_first.
  std::vector<std::pair<int64_t, int64_t>> runs;
};

// Whether a query reads the slot written by the query before it: then they belong to one request
// (a block with a slot written in the step belongs to one request only). A request's queries are
// adjacent, so checking neighbours finds every such request.
bool queries_share_slots(const StepInputs& in, int64_t block_size) {
  for (int64_t r = 1; r < in.T; ++r) {
    const int64_t p = in.seq_lens[r - 1] - 1;  // the position query r - 1 writes
    if (p < 0 || p >= in.seq_lens[r] - 1) continue;  // query r does not read it
    const int64_t block = in.block_table[r * in.table_stride + p / block_size];
    if (block * block_size + p % block_size == in.slots[in.tokens[r - 1]]) return true;
  }
  return false;
}

// Adjacent queries whose block tables agree on every block the earlier one reads: a request's
// last token and its drafts. Query r - 1 may then read its keys through r's table, so the run's
// K/V rows are read once for all of them. Only with kv_first (every K/V of the step is written
// before any query attends), which such queries imply.
std::vector<std::pair<int64_t, int64_t>> query_runs(const StepInputs& in, int64_t block_size) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t r = 0; r < in.T; ++r) {
    const int64_t prev_len = r > 0 ? in.seq_lens[r - 1] : 0;
    const int64_t blocks = (prev_len + block_size - 1) / block_size;
    const bool joins = in.kv_first && r > 0 && in.seq_lens[r] > prev_len && blocks <= in.table_stride &&
                       std::equal(in.block_table + (r - 1) * in.table_stride,
                                  in.block_table + (r - 1) * in.table_stride + blocks,
                                  in.block_table + r * in.table_stride);
    if (joins) {
      runs.back().second = r + 1;
    } else {
      runs.emplace_back(r, r + 1);
    }
  }
  return runs;
}

StepInputs step_inputs(int64_t T, const at::Tensor& positions, const at::Tensor& slot_mapping,
                       const at::Tensor& token_indices, const at::Tensor& block_table, const at::Tensor& seq_lens) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == T,
              "llama decode: positions must be int64 [T]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "llama decode: slot_mapping must be int64 [T]");
  TORCH_CHECK(token_indices.scalar_type() == at::kLong && token_indices.is_contiguous() && token_indices.numel() == T &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() == T,
              "llama decode: every token must be a decode (token_indices, seq_lens: int64 [T])");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  block_table.size(0) == T,
              "llama decode: block_table must be int32 [T, blocks] with contiguous rows");
  const int64_t* tokens = token_indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < T; ++r) TORCH_CHECK(tokens[r] >= 0 && tokens[r] < T, "llama decode: bad token index");
  return {T,
          positions.data_ptr<int64_t>(),
          slot_mapping.data_ptr<int64_t>(),
          tokens,
          seq_lens.data_ptr<int64_t>(),
          block_table.data_ptr<int32_t>(),
          block_table.stride(0)};
}

void check_cache(const at::Tensor& kv_cache, const LayerWeights& lw) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(3) == lw.num_kv_heads &&
                  kv_cache.size(4) == lw.head_dim && kv_cache.is_contiguous(),
              "llama decode: kv_cache must be a contiguous [2, blocks, block_size, kv_heads, head_dim]");
  const at::ScalarType dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "llama decode: KV cache must be float32, bfloat16 or float16");
}

// The attention phase's items. Preparing: item (r, h) = r * KVH + h does the q/k norms and RoPE of
// query r's heads of KV head h and of its key head, and writes K/V into the cache. Attending: item
// (run u, h, part p) = (u * KVH + h) * head_split + p attends the run's queries' heads of KV head h
// in part p of the group. Items are independent: each touches only its heads of qkv, its cache
// slot, its output heads. With head_split 1 and a run per query both numberings agree, and one
// phase may do both (kPrepareAndAttend): a lone query reads only its own new K/V.
enum AttendPhase { kPrepare = 1, kAttend = 2, kPrepareAndAttend = 3 };

template <typename C>
void attend_items(const LayerWeights& lw, const StepInputs& in, at::Tensor& kv_cache, float* qkv, float* attn,
                  int64_t item_begin, int64_t item_end, int64_t head_split, AttendScratch& scratch,
                  AttendPhase phase) {
  const int64_t D = lw.head_dim, KVH = lw.num_kv_heads, group = lw.num_heads / KVH;
  const int64_t q_size = lw.q_size(), kv_size = lw.kv_size(), qkv_size = lw.qkv_size();
  const int64_t half = lw.rotary_dim / 2, block_size = kv_cache.size(2);
  C* k_cache = kv_cache.data_ptr<C>();
  C* v_cache = k_cache + kv_cache.stride(0);
  float head[512];
  for (int64_t item = item_begin; item < item_end; ++item) {
    if (phase & kPrepare) {
      const int64_t r = item / KVH, h = item % KVH, t = in.tokens[r];
      float* row = qkv + t * qkv_size;
      const int64_t pos = in.positions[t];  // checked in run_layers: no exception may leave the region
      const float* cos = lw.cos_sin + pos * lw.rotary_dim;
      const float* sin = cos + half;
      auto prepare = [&](float* x, const float* norm_w) {
        if (norm_w != nullptr) {
          rms_norm_row(x, norm_w, D, lw.eps, head);
          std::copy(head, head + D, x);
        }
        rope_head(x, cos, sin, lw.rotary_dim, lw.neox);
      };
      for (int64_t g = 0; g < group; ++g) prepare(row + (h * group + g) * D, lw.q_norm);
      float* k = row + q_size + h * D;
      const float* v = row + q_size + kv_size + h * D;
      prepare(k, lw.k_norm);
      C* kd = k_cache + in.slots[t] * kv_size + h * D;
      C* vd = v_cache + in.slots[t] * kv_size + h * D;
      for (int64_t i = 0; i < D; ++i) {
        kd[i] = static_cast<C>(k[i]);
        vd[i] = static_cast<C>(v[i]);
      }
    }
    if (!(phase & kAttend)) continue;
    const int64_t u = item / (KVH * head_split), h = item / head_split % KVH, part = item % head_split;
    const int64_t g0 = part * group / head_split, g1 = (part + 1) * group / head_split;
    const auto [r0, r1] = in.runs[u];
    std::vector<AttendRow>& rows = scratch.rows;
    rows.clear();
    int64_t first = std::numeric_limits<int64_t>::max(), last = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = in.tokens[r], seq_len = in.seq_lens[r];
      const int64_t begin = lw.sliding_window > 0 ? std::max<int64_t>(0, seq_len - lw.sliding_window) : 0;
      first = std::min(first, begin);
      last = std::max(last, seq_len);
      for (int64_t g = g0; g < g1; ++g) {
        rows.push_back({qkv + t * qkv_size + (h * group + g) * D, attn + t * q_size + (h * group + g) * D, begin, seq_len});
      }
    }
    // The run's last query has the longest table; the others agree with it where they read.
    key_offsets(scratch, in.block_table + (r1 - 1) * in.table_stride, block_size, first, last - first, kv_size, h * D);
    attend_rows<C>(scratch, k_cache, v_cache, first, last - first, D, lw.scale);
  }
}

void attend_items_any(const LayerWeights& lw, const StepInputs& in, at::Tensor& kv_cache, float* qkv, float* attn,
                      int64_t item_begin, int64_t item_end, int64_t head_split, AttendScratch& scratch,
                      AttendPhase phase) {
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      attend_items<float>(lw, in, kv_cache, qkv, attn, item_begin, item_end, head_split, scratch, phase);
      break;
    case at::kBFloat16:
      attend_items<c10::BFloat16>(lw, in, kv_cache, qkv, attn, item_begin, item_end, head_split, scratch, phase);
      break;
    default:
      attend_items<c10::Half>(lw, in, kv_cache, qkv, attn, item_begin, item_end, head_split, scratch, phase);
  }
}

// [begin, end) of `n` items for thread `tid` of `nt`, in multiples of `align`.
std::pair<int64_t, int64_t> share(int64_t n, int tid, int nt, int64_t align = 1) {
  const int64_t units = (n + align - 1) / align;
  const int64_t begin = units * tid / nt * align, end = units * (tid + 1) / nt * align;
  return {std::min(begin, n), std::min(end, n)};
}

// The threads of a decode step meet here between phases. They spin (then yield) instead of
// sleeping: a phase lasts microseconds, and waking a sleeping thread takes tens of them in a VM
// (an inter-processor interrupt through the hypervisor). OpenMP's own barrier sleeps after a
// while: measured 12.0 ms per SmolLM2 step with it, 9.7 ms with OMP_WAIT_POLICY=ACTIVE, which
// however spins between steps too and starves the scheduler thread (30 ms with async scheduling).
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}

  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield) {
#if defined(PAGEDSERVE_AVX2)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();  // another thread needs this core (or ours was preempted)
      }
    }
  }

 private:
  static constexpr int kSpinsBeforeYield = 1 << 14;
  const int threads_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// LoRA adapter slots of one linear layer (pagedserve/lora/layers.py: LoRASlots), read in place
// (set_lora_slot fills them between steps):
//   a [slots, S·R, K], b[i] [slots, R, N_i] (B^T, scaling folded in) for sub-projection i at
//   output column offsets[i]:  y[t, offsets[i] + n] += sum_r (a[s] · x_t)[i·R + r] · b[i][s, r, n]
// for token t of slot s. Ranks below R are zero-padded, so they add exactly 0.
struct LinearLora {
  at::Tensor a;
  std::vector<at::Tensor> b;
  std::vector<int64_t> offsets;
  int64_t rank = 0;
};

// q/k/v, o, gate/up, down: the order of DecodeModel.set_lora's `linear` index.
struct LayerLora {
  LinearLora linears[4];
  bool complete() const {
    for (const LinearLora& l : linears)
      if (!l.a.defined()) return false;
    return true;
  }
};

float dot_row(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(PAGEDSERVE_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  sum = pagedserve::hsum8(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += c * x over n values.
void axpy_row(float c, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(PAGEDSERVE_AVX2)
  const __m256 vc = _mm256_set1_ps(c);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vc, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += c * x[i];
}

// Rows [t0, t1) of y [T, N] get their token's adapter delta for input x [T, K] (slot < 0: none).
void lora_rows(const LinearLora& l, const int64_t* token_slots, const float* x, int64_t K, float* y, int64_t N,
               int64_t t0, int64_t t1, std::vector<float>& shrunk) {
  const int64_t SR = l.a.size(1), R = l.rank;
  shrunk.resize(SR);
  const float* a = l.a.data_ptr<float>();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s = token_slots[t];
    if (s < 0) continue;
    const float* as = a + s * SR * K;
    for (int64_t j = 0; j < SR; ++j) shrunk[j] = dot_row(as + j * K, x + t * K, K);
    for (size_t i = 0; i < l.b.size(); ++i) {
      const int64_t n_i = l.b[i].size(2);
      const float* bs = l.b[i].data_ptr<float>() + s * R * n_i;
      float* yt = y + t * N + l.offsets[i];
      for (int64_t r = 0; r < R; ++r) {
        const float c = shrunk[i * R + r];
        if (c != 0.0f) axpy_row(c, bs + r * n_i, yt, n_i);
      }
    }
  }
}

// Buffers of one step (shared by the threads of the parallel region).
struct StepBuffers {
  std::vector<float> x, qkv, attn, o, gate_up, act;
  pagedserve::GgufActivations qx;

  void resize(int64_t T, const LayerWeights& lw) {
    x.resize(T * lw.hidden);
    qkv.resize(T * lw.qkv_size());
    attn.resize(T * lw.q_size());
    o.resize(T * lw.hidden);
    gate_up.resize(T * 2 * lw.intermediate);
    act.resize(T * lw.intermediate);
  }
};

// One layer on the calling thread `tid` of `nt` inside a parallel region. `hidden` (the previous
// layer's output) is added to `residual` first unless add_hidden is false; `out` receives this
// layer's output. Every phase ends at a barrier: its outputs are read by all threads next.
void layer_in_region(const LayerWeights& lw, const StepInputs& in, float* residual, const float* hidden,
                     bool add_hidden, at::Tensor& kv_cache, float* out, StepBuffers& b, SpinBarrier& spin, int tid,
                     int nt, AttendScratch& scratch, const LayerLora* lora, const int64_t* token_slots) {
  const int64_t T = in.T, H = lw.hidden, I = lw.intermediate, I2 = 2 * I;
  auto barrier = [&] { spin.wait(); };
  // rows of x for a GEMM with K columns: quantized by row shares
  auto quantize = [&](const float* x, int64_t K, const std::vector<GgufShard>& shards) {
    if (!pagedserve::gguf_needs_activations(shards)) return;
    if (tid == 0) b.qx.resize(T, K);
    barrier();
    const auto [m0, m1] = share(T, tid, nt);
    pagedserve::gguf_quantize_rows(x, K, m0, m1, &b.qx);
    barrier();
  };
  const std::pair<int64_t, int64_t> token_rows = share(T, tid, nt);  // (a lambda cannot capture a binding)
  const int64_t t0 = token_rows.first, t1 = token_rows.second;
  std::vector<float> shrunk;
  // The LoRA delta goes in after the whole GEMM (a barrier), by token rows, then one more barrier.
  auto gemm = [&](const float* x, int64_t K, const std::vector<GgufShard>& shards, const float* bias, float* y,
                  int64_t N, int linear) {
    const auto [n0, n1] = share(N, tid, nt, 2);
    pagedserve::gguf_gemm_rows(x, K, b.qx, T, K, shards, n0, n1, bias, y, N);
    barrier();
    if (lora != nullptr) {
      lora_rows(lora->linears[linear], token_slots, x, K, y, N, t0, t1, shrunk);
      barrier();
    }
  };
  for (int64_t t = t0; t < t1; ++t) {
    float* res = residual + t * H;
    if (add_hidden)
      for (int64_t i = 0; i < H; ++i) res[i] += hidden[t * H + i];
    rms_norm_row(res, lw.input_norm, H, lw.eps, b.x.data() + t * H);
  }
  barrier();
  quantize(b.x.data(), H, lw.qkv);
  gemm(b.x.data(), H, lw.qkv, lw.qkv_bias, b.qkv.data(), lw.qkv_size(), 0);

  // Attention items: (query, KV head) preparing; (run, KV head, part of the group) attending. A
  // batch with fewer (run, KV head) pairs than ~4 per thread (one request: SmolLM2 has 3 KV heads)
  // splits each group's query heads, or one thread would do twice the other's share.
  const int64_t KVH = lw.num_kv_heads, group = lw.num_heads / KVH;
  const int64_t pairs = static_cast<int64_t>(in.runs.size()) * KVH;
  const int64_t head_split = pairs == 0 ? 1 : std::clamp<int64_t>((4 * nt + pairs - 1) / pairs, 1, group);
  const auto [i0, i1] = share(T * KVH, tid, nt);
  if (in.kv_first || head_split > 1) {
    attend_items_any(lw, in, kv_cache, b.qkv.data(), b.attn.data(), i0, i1, 1, scratch, kPrepare);
    barrier();
    const auto [a0, a1] = share(pairs * head_split, tid, nt);
    attend_items_any(lw, in, kv_cache, b.qkv.data(), b.attn.data(), a0, a1, head_split, scratch, kAttend);
  } else {
    attend_items_any(lw, in, kv_cache, b.qkv.data(), b.attn.data(), i0, i1, 1, scratch, kPrepareAndAttend);
  }
  barrier();
  quantize(b.attn.data(), lw.q_size(), lw.o);
  gemm(b.attn.data(), lw.q_size(), lw.o, lw.o_bias, b.o.data(), H, 1);

  for (int64_t t = t0; t < t1; ++t) {
    float* res = residual + t * H;
    for (int64_t i = 0; i < H; ++i) res[i] += b.o[t * H + i];
    rms_norm_row(res, lw.post_norm, H, lw.eps, b.x.data() + t * H);
  }
  barrier();
  quantize(b.x.data(), H, lw.gate_up);
  gemm(b.x.data(), H, lw.gate_up, lw.gate_up_bias, b.gate_up.data(), I2, 2);

  for (int64_t t = t0; t < t1; ++t)
    silu_and_mul_row(b.gate_up.data() + t * I2, b.gate_up.data() + t * I2 + I, I, b.act.data() + t * I);
  barrier();
  quantize(b.act.data(), I, lw.down);
  gemm(b.act.data(), I, lw.down, lw.down_bias, out, H, 3);
}

// Layers [0, L) of a step in one parallel region; returns the last layer's output.
// `loras` (one per layer) and `token_slots` [T]: each token's adapter slot (-1: none), or both null.
at::Tensor run_layers(const std::vector<LayerWeights>& layers, at::Tensor& residual, const at::Tensor* first_hidden,
                      StepInputs in, std::vector<at::Tensor>& kv_caches, const std::vector<LayerLora>* loras = nullptr,
                      const int64_t* token_slots = nullptr) {
  const int64_t T = in.T, H = layers.front().hidden;
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == T && residual.size(1) == H &&
                  residual.scalar_type() == at::kFloat && residual.is_contiguous(),
              "llama decode: residual must be a contiguous float32 [T, hidden]");
  TORCH_CHECK(kv_caches.size() == layers.size(), "llama decode: one KV cache per layer");
  for (size_t l = 0; l < layers.size(); ++l) {
    check_cache(kv_caches[l], layers[l]);
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(in.positions[t] >= 0 && in.positions[t] < layers[l].num_positions, "llama decode: position ",
                  in.positions[t], " out of range");
  }
  const float* first = nullptr;
  if (first_hidden != nullptr) {
    TORCH_CHECK(first_hidden->sizes() == residual.sizes() && first_hidden->scalar_type() == at::kFloat &&
                    first_hidden->is_contiguous(),
                "llama decode: hidden must match residual");
    first = first_hidden->data_ptr<float>();
  }
  in.kv_first = queries_share_slots(in, kv_caches.front().size(2));
  in.runs = query_runs(in, kv_caches.front().size(2));
  StepBuffers b;
  for (const LayerWeights& lw : layers) {  // every layer's sizes are the same in these models
    TORCH_CHECK(lw.hidden == H, "llama decode: layers of different widths");
    b.resize(T, lw);
  }
  at::Tensor outs[2] = {at::empty({T, H}, residual.options()), at::empty({T, H}, residual.options())};
  float* res = residual.data_ptr<float>();
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64)));
  std::unique_ptr<SpinBarrier> spin;
#pragma omp parallel num_threads(nt)
  {
    // NOTE: the team may be smaller than asked (nested in another region, or a thread limit).
#pragma omp single
    spin = std::make_unique<SpinBarrier>(omp_get_num_threads());
    AttendScratch scratch;
    const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    for (size_t l = 0; l < layers.size(); ++l) {
      const float* hidden = l == 0 ? first : outs[(l - 1) % 2].data_ptr<float>();
      layer_in_region(layers[l], in, res, hidden, hidden != nullptr, kv_caches[l], outs[l % 2].data_ptr<float>(), b,
                      *spin, tid, threads, scratch, loras == nullptr ? nullptr : &(*loras)[l], token_slots);
    }
  }
  return outs[(layers.size() - 1) % 2];
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
  const std::vector<LayerWeights> layers = {make_layer(
      input_norm, post_norm, eps, qkv_w, qkv_types, qkv_bias, q_norm, k_norm, o_w, o_types, o_bias, gate_up_w,
      gate_up_types, gate_up_bias, down_w, down_types, down_bias, cos_sin, neox, num_heads, num_kv_heads, head_dim,
      scale, sliding_window)};
  const StepInputs in = step_inputs(residual.size(0), positions, slot_mapping, token_indices, block_table, seq_lens);
  std::vector<at::Tensor> caches = {kv_cache};
  return run_layers(layers, residual, add_hidden ? &hidden : nullptr, in, caches);
}

// Every layer of a model, built once at load; `forward` runs a whole decode step.
struct DecodeModel : torch::CustomClassHolder {
  std::vector<LayerWeights> layers;
  std::vector<LayerLora> loras;  // empty, or one per layer once set_lora gave every linear its slots

  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_norm, double eps, std::vector<at::Tensor> qkv_w,
                 std::vector<int64_t> qkv_types, const c10::optional<at::Tensor>& qkv_bias,
                 const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                 std::vector<at::Tensor> o_w, std::vector<int64_t> o_types, const c10::optional<at::Tensor>& o_bias,
                 std::vector<at::Tensor> gate_up_w, std::vector<int64_t> gate_up_types,
                 const c10::optional<at::Tensor>& gate_up_bias, std::vector<at::Tensor> down_w,
                 std::vector<int64_t> down_types, const c10::optional<at::Tensor>& down_bias,
                 const at::Tensor& cos_sin, bool neox, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 double scale, int64_t sliding_window) {
    layers.push_back(make_layer(input_norm, post_norm, eps, qkv_w, qkv_types, qkv_bias, q_norm, k_norm, o_w, o_types,
                                o_bias, gate_up_w, gate_up_types, gate_up_bias, down_w, down_types, down_bias, cos_sin,
                                neox, num_heads, num_kv_heads, head_dim, scale, sliding_window));
  }

  // residual: the embeddings on entry, the residual stream after the last layer on exit; returns
  // the last layer's output (the model adds it to the residual in its final norm).
  at::Tensor forward(at::Tensor residual, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& token_indices, const at::Tensor& block_table, const at::Tensor& seq_lens,
                     std::vector<at::Tensor> kv_caches) {
    TORCH_CHECK(!layers.empty(), "DecodeModel: no layers");
    const StepInputs in = step_inputs(residual.size(0), positions, slot_mapping, token_indices, block_table, seq_lens);
    return run_layers(layers, residual, nullptr, in, kv_caches);
  }

  // The adapter slots of linear `linear` (0 q/k/v, 1 o, 2 gate/up, 3 down) of layer `layer`,
  // kept by reference: the caller fills them in place between steps.
  void set_lora(int64_t layer, int64_t linear, const at::Tensor& a, std::vector<at::Tensor> b,
                std::vector<int64_t> offsets, int64_t rank) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers.size()) && linear >= 0 && linear < 4,
                "DecodeModel.set_lora: bad layer or linear index");
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 3 && b.size() == offsets.size() &&
                    a.size(1) == rank * static_cast<int64_t>(b.size()),
                "DecodeModel.set_lora: a must be contiguous float32 [slots, S*rank, in] with S = len(b)");
    for (const at::Tensor& bi : b)
      TORCH_CHECK(bi.scalar_type() == at::kFloat && bi.is_contiguous() && bi.dim() == 3 && bi.size(0) == a.size(0) &&
                      bi.size(1) == rank,
                  "DecodeModel.set_lora: every b must be contiguous float32 [slots, rank, out_i]");
    loras.resize(layers.size());
    loras[layer].linears[linear] = LinearLora{a, std::move(b), std::move(offsets), rank};
  }

  at::Tensor forward_lora(at::Tensor residual, const at::Tensor& positions, const at::Tensor& slot_mapping,
                          const at::Tensor& token_indices, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          std::vector<at::Tensor> kv_caches, const at::Tensor& token_lora_slots) {
    TORCH_CHECK(!layers.empty() && loras.size() == layers.size(), "DecodeModel: no LoRA slots");
    for (const LayerLora& lora : loras) TORCH_CHECK(lora.complete(), "DecodeModel: a linear layer has no LoRA slots");
    const StepInputs in = step_inputs(residual.size(0), positions, slot_mapping, token_indices, block_table, seq_lens);
    TORCH_CHECK(token_lora_slots.scalar_type() == at::kLong && token_lora_slots.is_contiguous() &&
                    token_lora_slots.numel() == in.T,
                "DecodeModel.forward_lora: token_lora_slots must be int64 [T]");
    const int64_t* token_slots = token_lora_slots.data_ptr<int64_t>();
    const int64_t num_slots = loras.front().linears[0].a.size(0);
    for (int64_t t = 0; t < in.T; ++t)
      TORCH_CHECK(token_slots[t] >= -1 && token_slots[t] < num_slots, "DecodeModel.forward_lora: bad slot");
    return run_layers(layers, residual, nullptr, in, kv_caches, &loras, token_slots);
  }
};

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
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward)
      .def("set_lora", &DecodeModel::set_lora)
      .def("forward_lora", &DecodeModel::forward_lora)
      .def("num_layers", [](const c10::intrusive_ptr<DecodeModel>& self) { return static_cast<int64_t>(self->layers.size()); });
}

TORCH_LIBRARY_IMPL(pagedserve_decode, CPU, m) { m.impl("llama_decode_layer", &llama_decode_layer); }
