// Decode attention read straight from the paged KV cache's block pools (no gather into a scratch buffer).
//
// kserve_llm::paged_decode_attention(query (B, H, D), key_pool, value_pool (num_blocks, block_size, KVH, D),
//     block_tables (B, nb) int64, context_lens (B,) int64, scale, window, softcap) -> (B, H, D)
//
// Sequence b attends to its positions [lo, context_lens[b]), lo = context_lens[b] - window when window > 0
// (the last `window` positions, as StepBatch.decode_mask), else 0; position p lives in block
// block_tables[b, p / block_size], row p % block_size. Grouped-query: query head h reads KV head h / (H / KVH).
// softcap > 0: scores = tanh(scores / softcap) * softcap (Gemma 2). float32 or bfloat16; float32 accumulation,
// softmax with max-subtraction. A sequence with no position (context_lens 0) gets zeros.
//
// One task per (sequence, KV head), spread over torch's intra-op threads by at::parallel_for (OpenMP: built
// with -fopenmp); each task handles the G = H / KVH query heads of its KV head, block by block: a block's rows
// of that KV head are read from memory once (blocks ahead prefetched into L2 meanwhile, the keys' then the
// values') and from L1 for the other heads. Two passes: the scores of every position, then the softmax-weighted sum of the value rows.
// head_dim 64 and 128 (the common ones) run vector kernels written with GCC/Clang vector extensions, as wide
// as -march=native allows; the others plain loops the compiler vectorises. bfloat16 rows are widened to float
// into a block buffer first (c10::BFloat16's conversion vectorises as well as a hand-written bits << 16).
//
// Measured against the plain loops for head_dim 64 (SmolLM2's shapes, one thread): the plain loops' horizontal
// sum per dot product and the accumulators kept in memory made them 1.5-1.9x slower; prefetching the next block
// made 1.4-2x on contexts of 1000 positions (memory-bound there). On the AMD EPYC (2 cores, bfloat16, B=16,
// 30 layers' pools read in turn, so from DRAM as in a served step): 4 blocks ahead into L2 rather than the next
// one into L1, 240-259 -> 148-151 us a layer at 100 positions, 1816-2174 -> 1019-1022 us at 1000; inside the
// compiled decode step of SmolLM2 (B=16, 100 positions, torch.profiler) 174-185 -> 92-126 us a layer.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <utility>
#include <vector>

namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// exp written to vectorise (libm's expf does not without -ffast-math): Cephes' expf, about 1 ulp; clamped to
// [-87, 88], so it never returns 0 or inf (softmax after max-subtraction only asks x <= 0).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + kMagic) - kMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}

template <typename T>
struct Rows;

template <>
struct Rows<float> {
  // A row as floats: float32 rows are used where they lie.
  static inline const float* get(const float* src, float* /*buf*/, int64_t /*D*/) { return src; }
  static inline float one(float x) { return x; }
  static inline float store(float x) { return x; }
};

template <>
struct Rows<c10::BFloat16> {
  static inline const float* get(const c10::BFloat16* src, float* __restrict buf, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(src[d]);
    return buf;
  }
  static inline float one(c10::BFloat16 x) { return static_cast<float>(x); }
  static inline c10::BFloat16 store(float x) { return c10::BFloat16(x); }  // round to nearest even
};

// Blocks (of one KV head: BS rows of D values) prefetched ahead of the one being read, into L2 (locality 1): measured
// on the AMD EPYC (B=16, 30 layers' pools, cold), prefetching the next block into L1 left decode attention at 4-7 GB/s
// of KV read, L1's few outstanding misses the limit; into L2, 4 blocks ahead, it ran at the speed of warm data.
constexpr int64_t kPrefetchBlocks = 4;

template <typename T>
inline void prefetch_rows(const T* base, int64_t rows, int64_t row_stride, int64_t D) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* p = reinterpret_cast<const char*>(base + r * row_stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
  }
}

// Dot product of two float rows with a fixed reduction order the compiler can vectorise: 16 lanes of partial
// sums, then a tree. The generic path (any head_dim); the fixed head dims use the vector kernels below.
inline float dot_row(const float* __restrict a, const float* __restrict b, int64_t D) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    for (int c = 0; c < 16; ++c) part[c] += a[i + c] * b[i + c];
  for (; i < D; ++i) part[0] += a[i] * b[i];
  for (int c = 0; c < 8; ++c) part[c] += part[c + 8];
  for (int c = 0; c < 4; ++c) part[c] += part[c + 4];
  for (int c = 0; c < 2; ++c) part[c] += part[c + 2];
  return part[0] + part[1];
}

// GCC/Clang vector extensions: W floats, the widest the target has (-march=native), lowered to whatever it
// has. With them the accumulators stay in registers and each row's dot product needs no horizontal sum of
// its own: W rows' partial-sum vectors are reduced together (transpose_sum), a few shuffles per row.
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vfloat __attribute__((vector_size(W * sizeof(float))));

inline vfloat vload(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof v); }

// One level of the transposed reduction: x and y each hold M rows of P partial sums (M * P = W); the result
// holds their 2M rows (x's first) of P / 2 partial sums.
template <int P>
struct Level {
  static constexpr int M = W / P;
  static constexpr int lo(int lane) {
    const int s = lane / (P / 2), i = lane % (P / 2);
    return s < M ? s * P + i : W + (s - M) * P + i;
  }
  template <int... I>
  static inline vfloat combine(vfloat x, vfloat y, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(x, y, lo(I)...) + __builtin_shufflevector(x, y, (lo(I) + P / 2)...);
  }
};

// v[0..W): W rows' partial-sum vectors → one vector, lane r = the sum of v[r]'s lanes. Overwrites v.
template <int P = W>
inline vfloat transpose_sum(vfloat* v) {
  if constexpr (P == 1) {
    return v[0];
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < P / 2; ++i) v[i] = Level<P>::combine(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, W>{});
    return transpose_sum<P / 2>(v);
  }
}

// Scores of the W rows k[0..W) for one head: s[r] = q · k[r], q given as NV vectors.
template <int NV>
inline void score_rows(const vfloat* q, const float* const* k, float* s) {
  vfloat part[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    vfloat acc = q[0] * vload(k[r]);
#pragma GCC unroll 16
    for (int t = 1; t < NV; ++t) acc += q[t] * vload(k[r] + t * W);
    part[r] = acc;
  }
  vstore(s, transpose_sum(part));
}

#if defined(__AVX512BF16__)
// bfloat16 keys scored where they lie, by AVX512-BF16's pairwise dot product (vdpbf16ps: products exact, sums in
// float): s[r] = q · k[r] for the 16 rows k[0..16), q given as NB vectors of 32 bfloat16. No widening to float.
constexpr bool kDotBF16 = W == 16;
template <int NB>
inline void score_rows_bf16(const __m512bh* q, const c10::BFloat16* const* k, float* s) {
  vfloat part[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0], (__m512bh)_mm512_loadu_si512(k[r]));
#pragma GCC unroll 8
    for (int t = 1; t < NB; ++t) acc = _mm512_dpbf16_ps(acc, q[t], (__m512bh)_mm512_loadu_si512(k[r] + t * 32));
    part[r] = (vfloat)acc;
  }
  vstore(s, transpose_sum(part));
}
#else
constexpr bool kDotBF16 = false;
#endif

// acc (NV vectors) += sum over rows r0..r1 of w[r] * v[r].
template <int NV>
inline void accumulate_rows(float* acc, const float* w, const float* const* v, int64_t r0, int64_t r1) {
  vfloat a[NV];
#pragma GCC unroll 16
  for (int t = 0; t < NV; ++t) a[t] = vload(acc + t * W);
  for (int64_t r = r0; r < r1; ++r) {
    const float wr = w[r];
#pragma GCC unroll 16
    for (int t = 0; t < NV; ++t) a[t] += wr * vload(v[r] + t * W);
  }
#pragma GCC unroll 16
  for (int t = 0; t < NV; ++t) vstore(acc + t * W, a[t]);
}

// DC > 0: the head dimension known at compile time, a multiple of W (vector kernels, needs block_size % W == 0);
// 0: any head dimension, plain loops.
template <typename T, int64_t DC>
void decode_kernel(const T* query, int64_t q_sb, int64_t q_sh, const T* key_pool, const T* value_pool, const int64_t* tables,
                   int64_t nb, const int64_t* lens, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D_rt, int64_t BS,
                   int64_t num_blocks, float scale, int64_t window, float softcap) {
  constexpr int NV = static_cast<int>(DC / W);
  static_assert(DC % W == 0, "the vector kernels take whole vectors per row");
  const int64_t D = DC > 0 ? DC : D_rt;
  const int64_t G = H / KVH;
  const int64_t row_stride = KVH * D;  // between two positions of one block
  const int64_t block_stride = BS * KVH * D;

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), rows_buf(BS * D), scores, inv(G);
    std::vector<const float*> rows(BS);
    // Rows [r0, r1) of one block of KV head kh, as float rows.
    auto block_rows = [&](const T* pool, int64_t block, int64_t kh, int64_t r0, int64_t r1) {
      const T* base = pool + block * block_stride + kh * D;
      for (int64_t r = r0; r < r1; ++r) rows[r] = Rows<T>::get(base + r * row_stride, rows_buf.data() + r * D, D);
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kh = task % KVH;
      const int64_t ctx = lens[b];
      TORCH_CHECK(ctx >= 0 && ctx <= nb * BS, "paged_decode_attention: context_lens[", b, "] = ", ctx, " does not fit its block table of ", nb,
                  " blocks of ", BS);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      T* o = out + (b * H + kh * G) * D;
      if (ctx - lo <= 0) {
        for (int64_t i = 0; i < G * D; ++i) o[i] = Rows<T>::store(0.0f);
        continue;
      }
      const int64_t* table = tables + b * nb;
      const int64_t first = lo / BS, last = (ctx - 1) / BS;
      for (int64_t blk = first; blk <= last; ++blk)
        TORCH_CHECK(table[blk] >= 0 && table[blk] < num_blocks, "paged_decode_attention: block id ", table[blk], " out of range [0, ",
                    num_blocks, ")");
      for (int64_t g = 0; g < G; ++g) {
        const T* qs = query + b * q_sb + (kh * G + g) * q_sh;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = Rows<T>::one(qs[d]);
      }
      // scores[g * span + i]: head g's score of position first * BS + i; the valid ones are [vlo, vhi).
      const int64_t span = (last - first + 1) * BS, vlo = lo - first * BS, vhi = ctx - first * BS;
      scores.resize(G * span);

      // The task's blocks in reading order, its key blocks then its value blocks, prefetched kPrefetchBlocks ahead.
      const int64_t n = last - first + 1;
      int64_t fetched = 0;
      auto fetch_to = [&](int64_t j) {
        for (j = std::min(j, 2 * n); fetched < j; ++fetched) {
          const T* pool = fetched < n ? key_pool : value_pool;
          prefetch_rows(pool + table[first + fetched % n] * block_stride + kh * D, BS, row_stride, D);
        }
      };
      fetch_to(kPrefetchBlocks);

      // Pass 1: the scores, block by block; the vector kernels score whole blocks (rows outside [lo, ctx) unused).
      for (int64_t blk = first; blk <= last; ++blk) {
        fetch_to(blk - first + 1 + kPrefetchBlocks);
        float* s = scores.data() + (blk - first) * BS;
        if constexpr (DC > 0 && std::is_same_v<T, c10::BFloat16> && kDotBF16) {
#if defined(__AVX512BF16__)
          const T* base = key_pool + table[blk] * block_stride + kh * D;
          const T* krows[W];
          for (int64_t g = 0; g < G; ++g) {
            __m512bh q[DC / 32];
            for (int t = 0; t < DC / 32; ++t) q[t] = (__m512bh)_mm512_loadu_si512(query + b * q_sb + (kh * G + g) * q_sh + t * 32);
            for (int64_t c = 0; c < BS; c += W) {
              for (int r = 0; r < W; ++r) krows[r] = base + (c + r) * row_stride;
              score_rows_bf16<DC / 32>(q, krows, s + g * span + c);
            }
          }
#endif
        } else if constexpr (DC > 0) {
          block_rows(key_pool, table[blk], kh, 0, BS);
          for (int64_t g = 0; g < G; ++g) {
            vfloat q[NV];
            for (int t = 0; t < NV; ++t) q[t] = vload(qf.data() + g * D + t * W);
            for (int64_t c = 0; c < BS; c += W) score_rows<NV>(q, rows.data() + c, s + g * span + c);
          }
        } else {
          const int64_t r0 = std::max(lo - blk * BS, int64_t{0}), r1 = std::min(ctx - blk * BS, BS);
          block_rows(key_pool, table[blk], kh, r0, r1);
          for (int64_t g = 0; g < G; ++g)
            for (int64_t r = r0; r < r1; ++r) s[g * span + r] = dot_row(qf.data() + g * D, rows[r], D);
        }
      }

      // Softmax per head over the valid positions, in place: scale, softcap, max-subtraction, exp, sum.
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict s = scores.data() + g * span;
#pragma omp simd
        for (int64_t i = vlo; i < vhi; ++i) s[i] *= scale;
        if (softcap > 0.0f) {
          for (int64_t i = vlo; i < vhi; ++i) s[i] = std::tanh(s[i] / softcap) * softcap;
        }
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = vlo; i < vhi; ++i) m = std::max(m, s[i]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = vlo; i < vhi; ++i) {
          const float e = fast_exp(s[i] - m);
          s[i] = e;
          sum += e;
        }
        inv[g] = 1.0f / sum;
      }

      // Pass 2: the weighted sum of the valid value rows, block by block, each head's accumulator over the block.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t blk = first; blk <= last; ++blk) {
        fetch_to(n + blk - first + 1 + kPrefetchBlocks);
        const int64_t r0 = std::max(lo - blk * BS, int64_t{0}), r1 = std::min(ctx - blk * BS, BS);
        block_rows(value_pool, table[blk], kh, r0, r1);
        const float* s = scores.data() + (blk - first) * BS;
        for (int64_t g = 0; g < G; ++g) {
          if constexpr (DC > 0) {
            accumulate_rows<NV>(acc.data() + g * D, s + g * span, rows.data(), r0, r1);
          } else {
            float* __restrict a = acc.data() + g * D;
            for (int64_t r = r0; r < r1; ++r) {
              const float* __restrict v = rows[r];
              const float wr = s[g * span + r];
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += wr * v[d];
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = Rows<T>::store(acc[g * D + d] * inv[g]);
    }
  });
}

template <typename T>
void dispatch_head_dim(const T* q, int64_t q_sb, int64_t q_sh, const T* kp, const T* vp, const int64_t* tables, int64_t nb,
                       const int64_t* lens, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t num_blocks,
                       float scale, int64_t window, float softcap) {
#define KSERVE_DECODE(DC) decode_kernel<T, DC>(q, q_sb, q_sh, kp, vp, tables, nb, lens, out, B, H, KVH, D, BS, num_blocks, scale, window, softcap)
  if (BS % W == 0 && D == 64) {
    KSERVE_DECODE(64);
  } else if (BS % W == 0 && D == 128) {
    KSERVE_DECODE(128);
  } else {
    KSERVE_DECODE(0);
  }
#undef KSERVE_DECODE
}

at::Tensor paged_decode_attention(const at::Tensor& query_in, const at::Tensor& key_pool, const at::Tensor& value_pool,
                                  const at::Tensor& block_tables_in, const at::Tensor& context_lens_in, double scale, int64_t window,
                                  double softcap) {
  TORCH_CHECK(query_in.dim() == 3, "paged_decode_attention: query must be (B, H, D), got ", query_in.sizes());
  TORCH_CHECK(key_pool.dim() == 4 && value_pool.sizes() == key_pool.sizes(),
              "paged_decode_attention: key_pool and value_pool must both be (num_blocks, block_size, KVH, D), got ", key_pool.sizes(),
              " and ", value_pool.sizes());
  TORCH_CHECK(key_pool.is_contiguous() && value_pool.is_contiguous(), "paged_decode_attention: the pools must be contiguous");
  TORCH_CHECK(query_in.device().is_cpu() && key_pool.device().is_cpu() && value_pool.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(query_in.scalar_type() == key_pool.scalar_type() && value_pool.scalar_type() == key_pool.scalar_type(),
              "paged_decode_attention: query and pools must share a dtype, got ", query_in.scalar_type(), ", ", key_pool.scalar_type(),
              ", ", value_pool.scalar_type());
  const int64_t B = query_in.size(0), H = query_in.size(1), D = query_in.size(2);
  const int64_t num_blocks = key_pool.size(0), BS = key_pool.size(1), KVH = key_pool.size(2);
  TORCH_CHECK(key_pool.size(3) == D, "paged_decode_attention: head_dim ", D, " of the query, ", key_pool.size(3), " of the pools");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_decode_attention: ", H, " query heads are not a multiple of ", KVH, " KV heads");
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.size(0) == B, "paged_decode_attention: block_tables must be (B, nb) with B = ",
              B, ", got ", block_tables_in.sizes());
  TORCH_CHECK(context_lens_in.dim() == 1 && context_lens_in.size(0) == B, "paged_decode_attention: context_lens must be (B,) with B = ", B,
              ", got ", context_lens_in.sizes());
  const at::Tensor query = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, H, D}, query.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || D == 0) return out;
  const int64_t nb = tables.size(1);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  switch (query.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(query.data_ptr<float>(), query.stride(0), query.stride(1), key_pool.data_ptr<float>(),
                               value_pool.data_ptr<float>(), tables.data_ptr<int64_t>(), nb, lens.data_ptr<int64_t>(), out.data_ptr<float>(), B,
                               H, KVH, D, BS, num_blocks, sc, window, cap);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(query.data_ptr<c10::BFloat16>(), query.stride(0), query.stride(1), key_pool.data_ptr<c10::BFloat16>(),
                                       value_pool.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(), nb, lens.data_ptr<int64_t>(),
                                       out.data_ptr<c10::BFloat16>(), B, H, KVH, D, BS, num_blocks, sc, window, cap);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ", query.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kserve_llm, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_pool, Tensor value_pool, Tensor block_tables, Tensor context_lens, float scale, "
      "int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(kserve_llm, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
