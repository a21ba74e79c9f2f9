// Attention of decoding sequences (one query each) over the paged KV pool, on a CPU, in float32.
//
// attention.py's general path gathers each sequence's keys and values out of the pool into a new
// tensor and hands them to SDPA: at many streams a copy of every key read, written and read again,
// and at one stream some twenty small operators a layer. This kernel reads each slot's keys (then
// values) where they lie in the pool, once, for every query head, and asks for the slots ahead
// of their use: it is bound by memory.
//
// queries [B, Hq, D]; pool [slots, 2, Hkv, D] (keys, values); key_slots [B, Lk] (the slot of each
// sequence's j-th key); mask [B, Lk] (the keys each query may see); softcap 0 for none.
// Returns [B, Hq, D].
//
// planned_attention: a layer's whole attention for a step (attention.py's attend_as_planned, the
// same operators in the same order, with this kernel for the decodes) as one C++ operator, so
// that a step, eager or compiled, spends no Python on it (70 µs a layer at one stream had been
// the Python operator's, 22 of them this kernel's; with the compiled step's size checks dropped
// too, int4 compiled ran 1.02-1.13x: README, Performance, run AD).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kWorkPerThread = 1 << 17;  // multiply-adds a thread takes at least before work is split
constexpr int64_t kPrefetch = 4;  // slots ahead whose keys (or values) are asked for while this one's are used
constexpr float kMasked = -1e30f;  // finite (-ffast-math), and exp() of it less any real score is 0

#ifdef __AVX512F__
inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
inline void add_scaled(float w, const float* x, float* y, int64_t n) {  // y += w x
  const __m512 weight = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(weight, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
inline void add_scaled(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}
#endif

// Asks for the `n` floats at `p` ahead of their use: a slot's keys span several cache lines.
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(p + i);
}

// One sequence's attention: every query head over its keys. A slot holds the keys of all
// key-value heads together (then their values), so each is read once, whole, for all heads.
void attend(const float* queries, const float* pool, const int64_t* slots, const bool* allowed, float* out,
            int64_t keys, int64_t heads, int64_t kv_heads, int64_t d, float scale, float softcap, float* q,
            float* scores) {
  const int64_t group = heads / kv_heads, slot_stride = 2 * kv_heads * d, width = kv_heads * d;
  for (int64_t i = 0; i < heads * d; ++i) q[i] = queries[i] * scale;
  for (int64_t j = 0; j < keys; ++j) {
    if (j + kPrefetch < keys) prefetch(pool + slots[j + kPrefetch] * slot_stride, width);
    const float* k = pool + slots[j] * slot_stride;
    for (int64_t hq = 0; hq < heads; ++hq) {
      const float s = allowed[j] ? dot(q + hq * d, k + (hq / group) * d, d) : kMasked;
      scores[hq * keys + j] = softcap > 0.f && allowed[j] ? std::tanh(s / softcap) * softcap : s;
    }
  }
  for (int64_t hq = 0; hq < heads; ++hq) {
    float* p = scores + hq * keys;
    float top = kMasked, total = 0.f;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < keys; ++j) top = std::max(top, p[j]);
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < keys; ++j) {
      p[j] = std::exp(p[j] - top);
      total += p[j];
    }
    const float inverse = 1.f / total;
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) p[j] *= inverse;
  }
  std::fill(out, out + heads * d, 0.f);
  for (int64_t j = 0; j < keys; ++j) {
    if (j + kPrefetch < keys) prefetch(pool + slots[j + kPrefetch] * slot_stride + width, width);
    if (!allowed[j]) continue;
    const float* v = pool + slots[j] * slot_stride + width;
    for (int64_t hq = 0; hq < heads; ++hq) add_scaled(scores[hq * keys + j], v + (hq / group) * d, out + hq * d, d);
  }
}

at::Tensor decode_attention(const at::Tensor& queries, const at::Tensor& pool, const at::Tensor& key_slots,
                            const at::Tensor& mask, double scale, double softcap) {
  TORCH_CHECK(queries.dim() == 3 && pool.dim() == 4 && key_slots.dim() == 2, "decode_attention: bad ranks");
  TORCH_CHECK(queries.scalar_type() == at::kFloat && pool.scalar_type() == at::kFloat && pool.is_contiguous(),
              "decode_attention: float32 queries and a contiguous float32 pool");
  TORCH_CHECK(queries.size(1) % pool.size(2) == 0 && pool.size(3) == queries.size(2) &&
              key_slots.size(0) == queries.size(0), "decode_attention: bad shapes");
  const int64_t batch = queries.size(0), heads = queries.size(1), d = queries.size(2);
  const int64_t kv_heads = pool.size(2), keys = key_slots.size(1);
  const at::Tensor q = queries.contiguous(), slots = key_slots.to(at::kLong).contiguous();
  const at::Tensor allowed = mask.reshape({batch, keys}).to(at::kBool).contiguous();
  at::Tensor out = at::empty_like(q);
  const float* q_data = q.const_data_ptr<float>();
  const float* pool_data = pool.const_data_ptr<float>();
  const int64_t* slot_data = slots.const_data_ptr<int64_t>();
  const bool* allowed_data = allowed.const_data_ptr<bool>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t work = std::max<int64_t>(1, keys * heads * d * 2);
  at::parallel_for(0, batch, std::max<int64_t>(1, kWorkPerThread / work), [&](int64_t begin, int64_t end) {
    std::vector<float> q_buf(heads * d), scores(heads * keys);
    for (int64_t b = begin; b < end; ++b)
      attend(q_data + b * heads * d, pool_data, slot_data + b * keys, allowed_data + b * keys, out_data + b * heads * d,
             keys, heads, kv_heads, d, static_cast<float>(scale), static_cast<float>(softcap), q_buf.data(),
             scores.data());
  });
  return out;
}

// Queries [B, Hq, Tq, D] over the keys and values at `key_slots` [B, Lk]: [B x Tq, Hq, D]
// (attention.py's _attend: the prompts' group).
at::Tensor attend_gathered(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& key_slots,
                           const at::Tensor& mask, double scale, double softcap) {
  const at::Tensor kv = pool.index_select(0, key_slots.flatten()).unflatten(0, key_slots.sizes())
                            .permute({2, 0, 3, 1, 4});  // [2, B, Hkv, Lk, D]
  at::Tensor k = kv[0], v = kv[1];
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), d = q.size(3);
  at::Tensor out;
  if (softcap > 0) {
    const int64_t group = heads / k.size(1);
    k = k.repeat_interleave(group, 1);
    v = v.repeat_interleave(group, 1);
    const at::Tensor scores = at::tanh(at::matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap;
    out = at::matmul(at::softmax(scores.masked_fill(mask.logical_not(), kMasked), -1), v);
  } else {
    out = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, heads != k.size(1));
  }
  return out.reshape({batch, heads, queries, d}).transpose(1, 2).flatten(0, 1);
}

at::Tensor planned_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                             const at::Tensor& write_slots, const at::Tensor& decode_key_slots,
                             const at::Tensor& decode_mask, const at::Tensor& query_index, const at::Tensor& key_slots,
                             const at::Tensor& token_rows, const at::Tensor& mask, double scale, double softcap) {
  pool.index_copy_(0, write_slots, at::stack({key[0], value[0]}).permute({2, 0, 1, 3}));
  const at::Tensor queries = query[0].transpose(0, 1);  // [N, Hq, D]
  const int64_t decodes = decode_key_slots.size(0);
  std::vector<at::Tensor> outs;
  if (decodes) outs.push_back(decode_attention(queries.slice(0, 0, decodes), pool, decode_key_slots, decode_mask,
                                               scale, softcap));
  if (query_index.size(0)) {
    const at::Tensor q = queries.slice(0, decodes).index_select(0, query_index.flatten())
                             .unflatten(0, query_index.sizes()).transpose(1, 2);  // [B, Hq, Tq, D]
    outs.push_back(attend_gathered(q, pool, key_slots, mask, scale, softcap).index_select(0, token_rows));
  }
  return (outs.size() == 1 ? outs[0] : at::cat(outs)).unsqueeze(0);
}

}  // namespace

TORCH_LIBRARY(zmqchat_kernels, m) {
  m.def("planned_attention(Tensor query, Tensor key, Tensor value, Tensor(a!) pool, Tensor write_slots, "
        "Tensor decode_key_slots, Tensor decode_mask, Tensor query_index, Tensor key_slots, "
        "Tensor token_rows, Tensor mask, float scaling, float softcap) -> Tensor");
  m.def("decode_attention(Tensor queries, Tensor pool, Tensor key_slots, Tensor mask, float scale, float softcap) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(zmqchat_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("planned_attention", &planned_attention);
}
