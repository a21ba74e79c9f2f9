// A Linear layer's product with 4-bit weights on a CPU with AVX-512 VNNI: quantize.Int4Linear's.
//
// PyTorch's int4pack kernel turns every weight into a float and multiplies in floats; here the
// weights stay integers and VNNI's vpdpbusd multiplies 64 of them by bytes of the activations in
// one instruction. Each activation is held to 15 bits (x ~ scale * (128 hi + lo), hi and lo signed
// bytes; about 3e-5 of a row's largest value), so two byte products give a 15-bit one. A group's
// 32 weights are code * scale + minimum (GGUF's Q4_1): the codes' integer sums are scaled once
// per group, and the minimums meet the group's sum of activations. On the default model's
// layers at one row it reads its weights 2x as fast as int4pack (README, Performance), asking for
// them well ahead of their use: a layer's weights are one stream, and the CPU's own prefetcher
// stops at each 4 KiB page.
//
// packed [N/16, K/8, 64] uint8: for each block of 16 outputs and each 8 inputs k..k+7, byte
// 4 o + t holds the code of output o's weight k + t in its low nibble and of k + 4 + t in its
// high one (so a 64-byte vector is 16 lanes of 4 codes each, for both halves). scales
// [N/16, K/32, 2, 16] float16: for each block and group, the 16 outputs' scales, then their
// minimums. x [..., K] any float dtype; returns [..., N] in x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;  // weights sharing a scale and a minimum
constexpr int64_t kBlock = 16;  // outputs computed together, one per 32-bit lane
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead the weights are asked for
constexpr int kMaxRows = 4;  // rows multiplied per pass over a block's weights
constexpr float kLargest = 16383.f;  // 15 bits: 128 * hi + lo with hi in [-128, 127], lo in [0, 127]

struct Activations {
  std::vector<int32_t> hi, lo;  // [rows, K/4]: signed bytes, four to an int32, the form vpdpbusd broadcasts
  std::vector<float> group_sums;  // [rows, K/32]: what each group's minimums multiply
  std::vector<float> scales;  // [rows]
};

Activations split(const float* x, int64_t rows, int64_t K) {
  Activations a{std::vector<int32_t>(rows * K / 4), std::vector<int32_t>(rows * K / 4),
                std::vector<float>(rows * K / kGroup), std::vector<float>(rows)};
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * K;
    float largest = 0.f;
    for (int64_t k = 0; k < K; ++k) largest = std::max(largest, std::fabs(row[k]));
    const float scale = largest > 0.f ? largest / kLargest : 1.f;
    a.scales[m] = scale;
    auto* hi = reinterpret_cast<int8_t*>(a.hi.data() + m * K / 4);
    auto* lo = reinterpret_cast<int8_t*>(a.lo.data() + m * K / 4);
    for (int64_t k = 0; k < K; ++k) {
      const auto q = static_cast<int32_t>(std::nearbyint(row[k] / scale));
      hi[k] = static_cast<int8_t>(q >> 7);  // floor(q / 128)
      lo[k] = static_cast<int8_t>(q & 127);
    }
    for (int64_t g = 0; g < K / kGroup; ++g) {
      float sum = 0.f;
      for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) sum += row[k];
      a.group_sums[m * (K / kGroup) + g] = sum;
    }
  }
  return a;
}

// Rows first..first+M-1 of one block of 16 outputs: out[m, 0..15].
template <int M>
void block_product(const uint8_t* codes, const at::Half* scales, const Activations& a, int64_t first, int64_t K,
                   float* out, int64_t N) {
  const int64_t groups = K / kGroup, quads = K / 4;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 sums[M], minimum_terms[M];
  for (int m = 0; m < M; ++m) sums[m] = minimum_terms[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // Four chains per row (low and high nibbles, times hi and lo bytes), so no product waits on the last.
    __m512i low_hi[M], low_lo[M], high_hi[M], high_lo[M];
    for (int m = 0; m < M; ++m) low_hi[m] = low_lo[m] = high_hi[m] = high_lo[m] = _mm512_setzero_si512();
    for (int64_t eight = 0; eight < kGroup / 8; ++eight) {
      const uint8_t* at = codes + (g * kGroup / 8 + eight) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchBytes), _MM_HINT_T0);
      const __m512i both = _mm512_loadu_si512(at);
      const __m512i low = _mm512_and_si512(both, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(both, 4), nibble);
      const int64_t quad = g * kGroup / 4 + eight * 2;
      for (int m = 0; m < M; ++m) {
        const int32_t* hi = a.hi.data() + (first + m) * quads + quad;
        const int32_t* lo = a.lo.data() + (first + m) * quads + quad;
        low_hi[m] = _mm512_dpbusd_epi32(low_hi[m], low, _mm512_set1_epi32(hi[0]));
        low_lo[m] = _mm512_dpbusd_epi32(low_lo[m], low, _mm512_set1_epi32(lo[0]));
        high_hi[m] = _mm512_dpbusd_epi32(high_hi[m], high, _mm512_set1_epi32(hi[1]));
        high_lo[m] = _mm512_dpbusd_epi32(high_lo[m], high, _mm512_set1_epi32(lo[1]));
      }
    }
    const at::Half* group = scales + g * 2 * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(group) + kPrefetchBytes / 4, _MM_HINT_T0);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group)));
    const __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kBlock)));
    for (int m = 0; m < M; ++m) {
      const __m512i his = _mm512_add_epi32(low_hi[m], high_hi[m]), los = _mm512_add_epi32(low_lo[m], high_lo[m]);
      const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(his, 7), los);
      sums[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, sums[m]);
      minimum_terms[m] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(a.group_sums[(first + m) * groups + g]),
                                         minimum_terms[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    _mm512_storeu_ps(out + (first + m) * N,
                     _mm512_fmadd_ps(sums[m], _mm512_set1_ps(a.scales[first + m]), minimum_terms[m]));
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "int4_linear: packed must be contiguous uint8 [N/16, K/8, 64]");
  const int64_t K = x.size(-1), blocks = packed.size(0), N = blocks * kBlock;
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) * 8 == K, "int4_linear: x's last size must be packed's K");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.is_contiguous()
                  && scales.numel() == blocks * (K / kGroup) * 2 * kBlock,
              "int4_linear: scales must be contiguous float16 [N/16, K/32, 2, 16]");
  const int64_t rows = x.numel() / K;
  const at::Tensor input = x.reshape({rows, K}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, N}, x.options().dtype(at::kFloat));
  const Activations a = split(input.data_ptr<float>(), rows, K);
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::Half* block_scales = scales.data_ptr<at::Half>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* c = codes + b * K * 8;
      const at::Half* s = block_scales + b * (K / kGroup) * 2 * kBlock;
      float* o = y + b * kBlock;
      int64_t m = 0;
      for (; m + kMaxRows <= rows; m += kMaxRows) block_product<kMaxRows>(c, s, a, m, K, o, N);
      switch (rows - m) {
        case 3: block_product<3>(c, s, a, m, K, o, N); break;
        case 2: block_product<2>(c, s, a, m, K, o, N); break;
        case 1: block_product<1>(c, s, a, m, K, o, N); break;
        default: break;
      }
    }
  });
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape).to(x.scalar_type());
}

}  // namespace

// Defined only where it is built for VNNI: elsewhere Int4Linear takes PyTorch's int4pack.
TORCH_LIBRARY_FRAGMENT(zmqchat_kernels, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(zmqchat_kernels, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}
#endif
