// GGUF block matmul shared by the kernel libraries (see gguf_gemm.cpp for the arithmetic).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pagedserve {

// Rows of one weight (checkpoint tensor) of a linear layer, in ggml blocks of `type`.
struct GgufShard {
  const uint8_t* data;
  int64_t row_stride;  // bytes between rows
  int64_t type;        // ggml type id
  int64_t rows;
};

// From this many rows of x on, gguf_gemm runs plain (F32 / F16 / BF16) weights through a float32
// copy and the BLAS GEMM (MKL). Block-quantized weights go through int16 panels at any size
// from kPanelMinRows: on this AVX2 Zen 3 they measured 1.3-2.4x MKL's speed (dequantizing
// included) at 128-256 rows and level with it at 512.
constexpr int64_t kDequantMinRows = 96;

// From this many rows of x on, block-quantized weights are unpacked once per 16 rows into
// column-interleaved int16 panels that every row of x shares (see gguf_gemm.cpp); below, each
// group of 4 rows unpacks them again in its tiles, which is faster for few rows. With AVX-512
// VNNI a panel's multiplies take a quarter of the instructions, and panels win from 5 rows on
// (SmolLM2's layers: 0.93x the tiles' time at 5 rows, 0.77x at 8). 8 keeps a one-request verify
// step of up to 7 rows (6 drafts) on the tiles, bit for bit like decoding its tokens one by one.
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int64_t kPanelMinRows = 8;
#else
constexpr int64_t kPanelMinRows = 16;
#endif

// Rows of x quantized for block weights: per block of 32 values int16 q and (d, d * sum(q)),
// d = max|x| / 32767 (see gguf_gemm.cpp).
struct GgufActivations {
  std::vector<int16_t> q;  // [M][K]
  std::vector<float> ds;   // [M][K / 32][2]: (d, s) pairs, for tiles of several rows
  std::vector<float> d, s;  // [M][padded_blocks]: the same, apart, for 8 blocks at a time
  int64_t K = 0, blocks = 0, padded_blocks = 0;
  void resize(int64_t num_rows, int64_t num_columns);  // K must be a multiple of 32
  const int16_t* row_q(int64_t m) const { return q.data() + m * K; }
  const float* row_ds(int64_t m) const { return ds.data() + 2 * m * blocks; }
  const float* row_d(int64_t m) const { return d.data() + m * padded_blocks; }
  const float* row_s(int64_t m) const { return s.data() + m * padded_blocks; }
};

// y[M, N] (row stride ldy) = x[M, K] (float32, row stride ldx) @ concat(shards)^T (+ bias[N]),
// N = sum of the shards' rows. Threads split the output rows.
void gguf_gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const std::vector<GgufShard>& shards,
               const float* bias, float* y, int64_t ldy);

// The parts of gguf_gemm (at any M for block-quantized weights), for callers that split the work
// themselves: quantize rows [m_begin, m_end) of x into `qx` (resized for all rows first; only needed when
// gguf_needs_activations), then compute output columns [n_begin, n_end) on one thread.
bool gguf_needs_activations(const std::vector<GgufShard>& shards);
void gguf_quantize_rows(const float* x, int64_t ldx, int64_t m_begin, int64_t m_end, GgufActivations* qx);
void gguf_gemm_rows(const float* x, int64_t ldx, const GgufActivations& qx, int64_t M, int64_t K,
                    const std::vector<GgufShard>& shards, int64_t n_begin, int64_t n_end, const float* bias, float* y,
                    int64_t ldy);

// The shards of `weights` (uint8 [rows, row_bytes] each) with their types, checked against K.
std::vector<GgufShard> gguf_shards(at::TensorList weights, at::IntArrayRef types, int64_t K, const char* op);

int64_t gguf_total_rows(const std::vector<GgufShard>& shards);

}  // namespace pagedserve
