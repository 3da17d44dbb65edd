#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

#if defined(__AVX512F__)
using pagedserve::exp16;
using pagedserve::first_lanes;
#endif

constexpr int64_t kMaxGroup = 64;  // query heads per KV head
constexpr int64_t kChunk = 16;     // key rows per vector step
constexpr int64_t kPrefetchRows = 32;

// One (request, KV head): `row_offsets[j]` is the element offset of key j (position first + j) in
// both caches, relative to this head's base pointers; K and V share strides.
template <typename T>
struct Work {
  const T* q;  // [group, head_size], the query heads of this KV head
  T* out;      // [group, head_size]
  const T* k;
  const T* v;
  const int64_t* row_offsets;
  int64_t num_keys, group, head_size;
  float scale;
};

template <typename T>
inline void prefetch_row(const T* row, int64_t head_size) {
  pagedserve::prefetch_bytes(row, head_size * static_cast<int64_t>(sizeof(T)));
}

// ---- portable path: any head size, any CPU --------------------------------------------------
template <typename T>
void attend_generic(const Work<T>& w, float* scores, float* acc) {
  const int64_t n = w.num_keys, d_size = w.head_size;
  for (int64_t g = 0; g < w.group; ++g) {
    const T* q = w.q + g * d_size;
    float* s = scores + g * n;
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      if (j + kPrefetchRows < n) prefetch_row(w.k + w.row_offsets[j + kPrefetchRows], d_size);
      const T* k = w.k + w.row_offsets[j];
      float dot = 0.f;
      for (int64_t d = 0; d < d_size; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(k[d]);
      s[j] = dot * w.scale;
      row_max = std::max(row_max, s[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - row_max));
    float* a = acc + g * d_size;
    std::fill(a, a + d_size, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const T* v = w.v + w.row_offsets[j];
      for (int64_t d = 0; d < d_size; ++d) a[d] += s[j] * static_cast<float>(v[d]);
    }
    for (int64_t d = 0; d < d_size; ++d) w.out[g * d_size + d] = static_cast<T>(a[d] / total);
  }
}

#if defined(__AVX512F__)
// ---- AVX-512 path: head_size = 16 * NV ----------------------------------------------------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane i of the result = the sum of the 16 lanes of v[i].
inline __m512 transpose_sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], each summed over that lane
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // 128-bit lane L of quads[i] holds rows 4i..4i+3 summed over lane L: add the 4 lanes up.
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}



// Float pointers to the chunk's rows: the cache itself for float32; 16-bit rows are widened once
// into `buffer`, instead of once per query head of the group.
template <typename T, int NV>
inline void chunk_rows(const T* base, const int64_t* offsets, int64_t rows, float* buffer, const float** out) {
  for (int64_t r = 0; r < kChunk; ++r) {
    const T* row = base + offsets[std::min(r, rows - 1)];
    if constexpr (std::is_same_v<T, float>) {
      out[r] = row;
    } else {
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(buffer + r * 16 * NV + 16 * c, load16(row + 16 * c));
      out[r] = buffer + r * 16 * NV;
    }
  }
}

template <typename T, int NV>
void attend_avx512(const Work<T>& w, float* scores, float* acc) {
  constexpr int64_t D = 16 * NV;
  const int64_t n = w.num_keys, group = w.group;
  float row_max[kMaxGroup], row_sum[kMaxGroup];
  std::fill(row_max, row_max + group, -std::numeric_limits<float>::infinity());
  const __m512 scale = _mm512_set1_ps(w.scale);
  alignas(64) float buffer[kChunk * D];

  // pass 1: scores of 16 keys at a time, for every query head of the group
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - j0);
    const __mmask16 mask = first_lanes(rows);
    for (int64_t r = 0; r < rows && j0 + kPrefetchRows + r < n; ++r) {
      prefetch_row(w.k + w.row_offsets[j0 + kPrefetchRows + r], D);
      prefetch_row(w.v + w.row_offsets[j0 + kPrefetchRows + r], D);
    }
    const float* k_rows[kChunk];
    chunk_rows<T, NV>(w.k, w.row_offsets + j0, rows, buffer, k_rows);
    for (int64_t g = 0; g < group; ++g) {
      __m512 q[NV], partial[kChunk];
      for (int c = 0; c < NV; ++c) q[c] = _mm512_mul_ps(load16(w.q + g * D + 16 * c), scale);
      for (int64_t r = 0; r < kChunk; ++r) {
        __m512 dot = _mm512_mul_ps(q[0], _mm512_loadu_ps(k_rows[r]));
        for (int c = 1; c < NV; ++c) dot = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k_rows[r] + 16 * c), dot);
        partial[r] = dot;
      }
      const __m512 s = transpose_sum16(partial);
      _mm512_mask_storeu_ps(scores + g * n + j0, mask, s);
      row_max[g] = std::max(row_max[g], _mm512_mask_reduce_max_ps(mask, s));
    }
  }

  // softmax numerators in place, and their sums
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    const __m512 shift = _mm512_set1_ps(row_max[g]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = first_lanes(n - j);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), shift));
      _mm512_mask_storeu_ps(s + j, mask, e);
      total = _mm512_mask_add_ps(total, mask, total, e);
    }
    row_sum[g] = _mm512_reduce_add_ps(total);
  }

  // pass 2: weighted sum of V rows, 16 keys at a time so the chunk stays in L1 across the group
  std::fill(acc, acc + group * D, 0.f);
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - j0);
    const float* v_rows[kChunk];
    chunk_rows<T, NV>(w.v, w.row_offsets + j0, rows, buffer, v_rows);
    for (int64_t g = 0; g < group; ++g) {
      const float* p = scores + g * n + j0;
      __m512 a[NV];
      for (int c = 0; c < NV; ++c) a[c] = _mm512_loadu_ps(acc + g * D + 16 * c);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 pr = _mm512_set1_ps(p[r]);
        for (int c = 0; c < NV; ++c) a[c] = _mm512_fmadd_ps(pr, _mm512_loadu_ps(v_rows[r] + 16 * c), a[c]);
      }
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, a[c]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / row_sum[g];
    for (int64_t d = 0; d < D; ++d) w.out[g * D + d] = static_cast<T>(acc[g * D + d] * inv);
  }
}
#endif

template <typename T>
using AttendFn = void (*)(const Work<T>&, float*, float*);

template <typename T>
AttendFn<T> select_attend(int64_t head_size) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    switch (head_size) {
      case 32: return attend_avx512<T, 2>;
      case 64: return attend_avx512<T, 4>;
      case 80: return attend_avx512<T, 5>;
      case 96: return attend_avx512<T, 6>;
      case 128: return attend_avx512<T, 8>;
      case 256: return attend_avx512<T, 16>;
      default: break;
    }
  }
#endif
  return attend_generic<T>;
}

template <typename T>
void decode_kernel(at::Tensor& out, const at::Tensor& query, const at::Tensor& token_indices,
                   const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                   const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  const int64_t num_seqs = token_indices.size(0);
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t block_stride = key_cache.stride(0), row_stride = key_cache.stride(1), head_stride = key_cache.stride(2);
  const int64_t bt_stride = block_table.stride(0);
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = key_cache.data_ptr<T>();
  const T* v_ptr = value_cache.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  const int64_t* idx_ptr = token_indices.data_ptr<int64_t>();
  const int32_t* bt_ptr = block_table.data_ptr<int32_t>();
  const int64_t* len_ptr = seq_lens.data_ptr<int64_t>();
  const AttendFn<T> attend = select_attend<T>(head_size);

  // Work item = (request, KV head). Thread `lane` takes items lane, lane + lanes, ...: requests
  // have random lengths, and interleaving balances the threads better than contiguous ranges.
  const int64_t num_items = num_seqs * num_kv_heads;
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    std::vector<float> scores, acc(group * head_size);
    std::vector<int64_t> row_offsets;
    for (int64_t lane = lane_begin; lane < lane_end; ++lane) {
      for (int64_t item = lane; item < num_items; item += lanes) {
        const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
        const int64_t seq_len = len_ptr[seq];
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, seq_len - sliding_window) : 0;
        const int64_t num_keys = seq_len - first;
        if (num_keys <= 0) continue;
        const int32_t* blocks = bt_ptr + seq * bt_stride;
        row_offsets.resize(num_keys);
        for (int64_t j = 0, block = first / block_size, offset = first % block_size; j < num_keys; ++j) {
          row_offsets[j] = blocks[block] * block_stride + offset * row_stride;
          if (++offset == block_size) offset = 0, ++block;
        }
        scores.resize(group * num_keys);
        const int64_t head_offset = kv_head * group * head_size;
        const Work<T> work{q_ptr + idx_ptr[seq] * query.stride(0) + head_offset,
                           o_ptr + idx_ptr[seq] * out.stride(0) + head_offset,
                           k_ptr + kv_head * head_stride,
                           v_ptr + kv_head * head_stride,
                           row_offsets.data(),
                           num_keys,
                           group,
                           head_size,
                           static_cast<float>(scale)};
        attend(work, scores.data(), acc.data());
      }
    }
  });
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& token_indices,
                            const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                            int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "query must be [num_tokens, num_heads, head_size] with contiguous heads");
  TORCH_CHECK(out.sizes() == query.sizes() && out.stride(2) == 1 && out.stride(1) == out.size(2),
              "out must match query");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.stride(3) == 1 && value_cache.sizes() == key_cache.sizes() &&
                  value_cache.strides() == key_cache.strides(),
              "caches must be [num_blocks, block_size, num_kv_heads, head_size] views with equal strides");
  TORCH_CHECK(key_cache.size(3) == query.size(2) && query.size(1) % key_cache.size(2) == 0 &&
                  query.size(1) / key_cache.size(2) <= kMaxGroup,
              "query heads must be a multiple (at most 64x) of KV heads with the same head size");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && out.scalar_type() == query.scalar_type() &&
                  value_cache.scalar_type() == query.scalar_type(),
              "query, out and caches must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1, "block_table: int32 rows");
  TORCH_CHECK(token_indices.scalar_type() == at::kLong && token_indices.is_contiguous(), "token_indices: int64");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(), "seq_lens: int64");
  TORCH_CHECK(seq_lens.size(0) == token_indices.size(0) && block_table.size(0) == token_indices.size(0),
              "one seq_len and one block-table row per decode");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(out, query, token_indices, key_cache, value_cache, block_table, seq_lens, scale,
                            sliding_window);
  });
}

}  // namespace

TORCH_LIBRARY(pagedserve_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor query, Tensor token_indices, Tensor key_cache, "
        "Tensor value_cache, Tensor block_table, Tensor seq_lens, float scale, int sliding_window) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
