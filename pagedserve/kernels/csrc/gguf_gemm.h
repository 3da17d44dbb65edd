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

// y[M, N] (row stride ldy) = x[M, K] (float32, row stride ldx) @ concat(shards)^T (+ bias[N]),
// N = sum of the shards' rows. Threads split the output rows.
void gguf_gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const std::vector<GgufShard>& shards,
               const float* bias, float* y, int64_t ldy);

// The shards of `weights` (uint8 [rows, row_bytes] each) with their types, checked against K.
std::vector<GgufShard> gguf_shards(at::TensorList weights, at::IntArrayRef types, int64_t K, const char* op);

int64_t gguf_total_rows(const std::vector<GgufShard>& shards);

}  // namespace pagedserve
