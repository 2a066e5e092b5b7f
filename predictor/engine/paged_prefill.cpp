// Prefill attention read straight from the paged KV cache's block pools: a flash-attention kernel on AVX512-BF16.
//
// kserve_llm::paged_prefill_attention(query (N, H, D), key_pool, value_pool (num_blocks, block_size, KVH, D),
//     query_starts (P + 1,) int64, start_positions (P,) int64, block_tables (P, nb) int64, scale, window) -> (N, H, D)
//
// Sequence i's queries are rows query_starts[i] .. query_starts[i + 1] of query, at positions start_positions[i],
// start_positions[i] + 1, ...; the query at position p attends to its sequence's positions [lo, p], lo = p - window + 1
// when window > 0, else 0. The layer wrote the step's keys and values into the pools before attending, so a chunk
// of a long prompt and a prompt whose prefix is cached read their earlier positions where they are: no gather into a
// buffer, no (T, S) mask. Grouped-query: query head h reads KV head h / (H / KVH).
//
// bfloat16, head_dim 64 or 128, where the compiler targets AVX512-BF16 (-march=native on a CPU that has it);
// paged_prefill_isa() says whether this build has the kernel (elsewhere the caller keeps SDPA).
//
// How: the keys and values of each (sequence, KV head) are first packed, 64 positions (a tile) at a time, into the
// layouts of vdpbf16ps (pairs of bfloat16 multiplied and summed into float lanes): keys as [D/2][64][2] (a pair of
// head dimensions of 64 positions side by side), values as [32][D][2] (a pair of positions of D dimensions).
// Then one task per (sequence, KV head, 16 query positions): its rows are those positions' G = H / KVH query heads;
// for each key tile up to the last position, scores S = Q K^T (rows x 64, float), the online softmax (running max
// and sum per row, masked beyond the row's position and window), P rounded to bfloat16, O += P V in float; O / sum
// at the end. Tasks go round-robin to torch's intra-op threads, so the causal triangle's long and short rows
// spread evenly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t KT = 64;  // positions of a key tile
constexpr int64_t QT = 16;  // query positions of a task

#if defined(__AVX512BF16__)

// Cephes' expf as in paged_decode.cpp (about 1 ulp, clamped to [-87, 88]), 16 lanes; 2^n by vscalefps.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

struct Pools {
  const uint16_t* k;
  const uint16_t* v;
  int64_t block, row, head;  // element strides: between blocks, a block's rows, KV heads
  int64_t bs, num_blocks;
};

// One (sequence, KV head)'s key and value tile `tile` (positions tile*KT ...), positions >= ctx as zeros.
template <int D>
void pack_tile(const Pools& p, const int64_t* table, int64_t ctx, int64_t kh, int64_t tile, uint32_t* kp, uint16_t* vp) {
  static const uint16_t zeros[D] = {};
  const uint16_t* krows[KT];  // position j's key row and value row, zeros past the context
  const uint16_t* vrows[KT];
  for (int64_t j = 0; j < KT; ++j) {
    const int64_t pos = tile * KT + j;
    if (pos >= ctx) {
      krows[j] = vrows[j] = zeros;
      continue;
    }
    const int64_t block = table[pos / p.bs];
    TORCH_CHECK(block >= 0 && block < p.num_blocks, "paged_prefill_attention: block id ", block, " out of range [0, ", p.num_blocks, ")");
    const int64_t at = block * p.block + (pos % p.bs) * p.row + kh * p.head;  // the value pool shares the key pool's strides
    krows[j] = p.k + at;
    vrows[j] = p.v + at;
  }
  for (int64_t j = 0; j < KT; ++j) {  // keys: kp[d2 * KT + j] = the pair (2 d2, 2 d2 + 1) of position j
    uint32_t pairs[D / 2];
    std::memcpy(pairs, krows[j], sizeof pairs);
    for (int d2 = 0; d2 < D / 2; ++d2) kp[d2 * KT + j] = pairs[d2];
  }
  for (int64_t j2 = 0; j2 < KT / 2; ++j2) {  // values: vp[(j2 * D + d) * 2 + e] = dimension d of position 2 j2 + e
    const uint16_t* a = vrows[2 * j2];
    const uint16_t* b = vrows[2 * j2 + 1];
    uint16_t* out = vp + j2 * D * 2;
    for (int d = 0; d < D; ++d) {
      out[2 * d] = a[d];
      out[2 * d + 1] = b[d];
    }
  }
}

// S (R rows x KT) = Q K^T for one key tile: q[r] the rows as bfloat16 pairs, kp the packed tile.
template <int D, int R>
inline void scores(const uint32_t* const* q, const uint32_t* kp, float* s) {
  __m512 acc[R][KT / 16];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KT / 16; ++c) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int d2 = 0; d2 < D / 2; ++d2) {
    __m512bh k[KT / 16];
    for (int c = 0; c < KT / 16; ++c) k[c] = (__m512bh)_mm512_loadu_si512(kp + d2 * KT + c * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][d2]));
      for (int c = 0; c < KT / 16; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, k[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KT / 16; ++c) _mm512_storeu_ps(s + r * KT + c * 16, acc[r][c]);
}

// O (R rows x D, float) += P V for one key tile: p[r] the rows' probabilities as bfloat16 pairs, vp the packed tile.
template <int D, int R>
inline void accumulate(float* const* o, const uint32_t* const* p, const uint16_t* vp) {
  __m512 acc[R][D / 16];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / 16; ++c) acc[r][c] = _mm512_loadu_ps(o[r] + c * 16);
#pragma GCC unroll 4
  for (int j2 = 0; j2 < KT / 2; ++j2) {
    __m512bh v[D / 16];
    for (int c = 0; c < D / 16; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + (j2 * D + c * 16) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r][j2]));
      for (int c = 0; c < D / 16; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, v[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(o[r] + c * 16, acc[r][c]);
}

// All n rows: blocks of RMAX (the register tile), then the remainder as one smaller block.
template <int D, int RMAX>
inline void scores_rows(int64_t n, const uint32_t* const* q, const uint32_t* kp, float* s) {
  int64_t r = 0;
  for (; r + RMAX <= n; r += RMAX) scores<D, RMAX>(q + r, kp, s + r * KT);
  switch (n - r) {
    case 3: scores<D, 3>(q + r, kp, s + r * KT); break;
    case 2: scores<D, 2>(q + r, kp, s + r * KT); break;
    case 1: scores<D, 1>(q + r, kp, s + r * KT); break;
    default: break;
  }
}

template <int D, int RMAX>
inline void accumulate_rows(int64_t n, float* const* o, const uint32_t* const* p, const uint16_t* vp) {
  int64_t r = 0;
  for (; r + RMAX <= n; r += RMAX) accumulate<D, RMAX>(o + r, p + r, vp);
  switch (n - r) {
    case 3: accumulate<D, 3>(o + r, p + r, vp); break;
    case 2: accumulate<D, 2>(o + r, p + r, vp); break;
    case 1: accumulate<D, 1>(o + r, p + r, vp); break;
    default: break;
  }
}

template <int D>
void prefill_kernel(const uint16_t* query, int64_t q_sn, int64_t q_sh, const Pools& pools, const int64_t* qstarts, const int64_t* starts,
                    const int64_t* tables, int64_t nb, int64_t P, int64_t H, int64_t KVH, float scale, int64_t window, uint16_t* out) {
  constexpr int RQ = 4;                          // rows per register tile of the scores
  constexpr int RV = std::min(4, 256 / D);       // and of the values' accumulation (RV x D / 16 accumulators)
  const int64_t G = H / KVH;
  // Key tiles per sequence, and where each sequence's packed tiles start.
  std::vector<int64_t> tile0(P + 1, 0);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t T = qstarts[i + 1] - qstarts[i];
    TORCH_CHECK(T >= 0 && starts[i] >= 0, "paged_prefill_attention: sequence ", i, " has ", T, " queries from position ", starts[i]);
    const int64_t ctx = starts[i] + T;
    TORCH_CHECK(ctx <= nb * pools.bs, "paged_prefill_attention: sequence ", i, " reaches position ", ctx - 1, ", beyond its block table of ", nb,
                " blocks of ", pools.bs);
    tile0[i + 1] = tile0[i] + (ctx + KT - 1) / KT;
  }
  const int64_t tiles = tile0[P];
  constexpr int64_t kTile = KT * D / 2;  // dwords of one packed key tile (and of one value tile)
  std::vector<uint32_t> kpack(tiles * KVH * kTile), vpack(tiles * KVH * kTile);
  auto kp_of = [&](int64_t i, int64_t kh, int64_t t) { return kpack.data() + ((tile0[i] + t) * KVH + kh) * kTile; };
  auto vp_of = [&](int64_t i, int64_t kh, int64_t t) { return reinterpret_cast<uint16_t*>(vpack.data() + ((tile0[i] + t) * KVH + kh) * kTile); };
  std::vector<int64_t> seq_of(tiles);
  for (int64_t i = 0; i < P; ++i)
    for (int64_t t = tile0[i]; t < tile0[i + 1]; ++t) seq_of[t] = i;
  at::parallel_for(0, tiles * KVH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / KVH, kh = task % KVH, i = seq_of[t];
      const int64_t ctx = starts[i] + qstarts[i + 1] - qstarts[i];
      pack_tile<D>(pools, tables + i * nb, ctx, kh, t - tile0[i], kp_of(i, kh, t - tile0[i]), vp_of(i, kh, t - tile0[i]));
    }
  });

  // Tasks: (sequence, KV head, QT query positions), dealt round-robin to the threads.
  struct Task {
    int64_t seq, kh, q0, nq;
  };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < P; ++i)
    for (int64_t q0 = 0; q0 < qstarts[i + 1] - qstarts[i]; q0 += QT)
      for (int64_t kh = 0; kh < KVH; ++kh) tasks.push_back({i, kh, q0, std::min(QT, qstarts[i + 1] - qstarts[i] - q0)});
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  at::parallel_for(0, threads, 1, [&](int64_t tbegin, int64_t tend) {
    const int64_t rows_max = QT * G;
    std::vector<float> o(rows_max * D), s(rows_max * KT), m(rows_max), l(rows_max);
    std::vector<uint32_t> pbf(rows_max * KT / 2);
    std::vector<const uint32_t*> qrow(rows_max), prow(rows_max);
    std::vector<float*> orow(rows_max);
    for (int64_t tid = tbegin; tid < tend; ++tid) {
      for (size_t n = tid; n < tasks.size(); n += threads) {
        const Task& task = tasks[n];
        const int64_t rows = task.nq * G, first_pos = starts[task.seq] + task.q0, last_pos = first_pos + task.nq - 1;
        for (int64_t r = 0; r < rows; ++r) {  // row r: query position first_pos + r / G, head kh * G + r % G
          const int64_t tok = qstarts[task.seq] + task.q0 + r / G, h = task.kh * G + r % G;
          qrow[r] = reinterpret_cast<const uint32_t*>(query + tok * q_sn + h * q_sh);
          orow[r] = o.data() + r * D;
          prow[r] = pbf.data() + r * KT / 2;
          m[r] = -std::numeric_limits<float>::infinity();
          l[r] = 0.0f;
        }
        std::fill(o.begin(), o.begin() + rows * D, 0.0f);
        const int64_t lo_key = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
        for (int64_t t = lo_key / KT; t <= last_pos / KT; ++t) {
          const uint32_t* kp = kp_of(task.seq, task.kh, t);
          scores_rows<D, RQ>(rows, qrow.data(), kp, s.data());
          for (int64_t r = 0; r < rows; ++r) {  // the online softmax of row r over this tile
            const int64_t pos = first_pos + r / G;
            const int64_t lo = window > 0 ? pos - window + 1 : 0;
            __m512 x[KT / 16];
            __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            for (int c = 0; c < KT / 16; ++c) {
              const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(t * KT + c * 16)),
                                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
              const __mmask16 ok = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(pos))) &
                                   _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(lo)));
              x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), ok, _mm512_loadu_ps(s.data() + r * KT + c * 16),
                                        _mm512_set1_ps(scale));
              mx = _mm512_max_ps(mx, x[c]);
            }
            const float tile_max = _mm512_reduce_max_ps(mx);
            uint32_t* pr = pbf.data() + r * KT / 2;
            if (tile_max == -std::numeric_limits<float>::infinity()) {  // nothing of this tile is visible to the row
              std::memset(pr, 0, KT * 2);
              continue;
            }
            const float m_new = std::max(m[r], tile_max);
            const float alpha = m[r] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[r] - m_new);
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < KT / 16; ++c) {
              const __m512 e = exp512(_mm512_sub_ps(x[c], _mm512_set1_ps(m_new)));  // -inf - m: exp clamps to e^-87, masked below
              const __mmask16 live = _mm512_cmp_ps_mask(x[c], _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
              const __m512 pe = _mm512_maskz_mov_ps(live, e);
              sum = _mm512_add_ps(sum, pe);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c * 8), (__m256i)_mm512_cvtneps_pbh(pe));
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            if (alpha != 1.0f) {
              float* orr = o.data() + r * D;
              for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(orr + c * 16, _mm512_mul_ps(_mm512_loadu_ps(orr + c * 16), _mm512_set1_ps(alpha)));
            }
            m[r] = m_new;
          }
          const uint16_t* vp = vp_of(task.seq, task.kh, t);
          accumulate_rows<D, RV>(rows, orow.data(), prow.data(), vp);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t tok = qstarts[task.seq] + task.q0 + r / G, h = task.kh * G + r % G;
          const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
          uint16_t* dst = out + (tok * H + h) * D;
          for (int c = 0; c < D / 16; ++c)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + c * 16), _mm512_set1_ps(inv))));
        }
      }
    }
  });
}

#endif  // __AVX512BF16__

std::string paged_prefill_isa() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return "";
#endif
}

at::Tensor paged_prefill_attention(const at::Tensor& query_in, const at::Tensor& key_pool, const at::Tensor& value_pool,
                                   const at::Tensor& query_starts_in, const at::Tensor& start_positions_in, const at::Tensor& block_tables_in,
                                   double scale, int64_t window) {
  TORCH_CHECK(!paged_prefill_isa().empty(), "paged_prefill_attention: this build has no AVX512-BF16 kernel (paged_prefill_isa() is empty)");
  TORCH_CHECK(query_in.dim() == 3, "paged_prefill_attention: query must be (N, H, D), got ", query_in.sizes());
  TORCH_CHECK(key_pool.dim() == 4 && value_pool.sizes() == key_pool.sizes() && key_pool.is_contiguous() && value_pool.is_contiguous(),
              "paged_prefill_attention: key_pool and value_pool must both be contiguous (num_blocks, block_size, KVH, D), got ", key_pool.sizes(),
              " and ", value_pool.sizes());
  TORCH_CHECK(query_in.device().is_cpu() && key_pool.device().is_cpu() && value_pool.device().is_cpu(), "paged_prefill_attention: CPU tensors only");
  TORCH_CHECK(query_in.scalar_type() == at::kBFloat16 && key_pool.scalar_type() == at::kBFloat16 && value_pool.scalar_type() == at::kBFloat16,
              "paged_prefill_attention: bfloat16 only, got ", query_in.scalar_type(), ", ", key_pool.scalar_type(), ", ", value_pool.scalar_type());
  const int64_t N = query_in.size(0), H = query_in.size(1), D = query_in.size(2);
  const int64_t num_blocks = key_pool.size(0), BS = key_pool.size(1), KVH = key_pool.size(2);
  TORCH_CHECK(key_pool.size(3) == D && (D == 64 || D == 128), "paged_prefill_attention: head_dim 64 or 128, got ", D, " (query) and ",
              key_pool.size(3), " (pools)");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_prefill_attention: ", H, " query heads are not a multiple of ", KVH, " KV heads");
  const at::Tensor qstarts = query_starts_in.to(at::kLong).contiguous(), starts = start_positions_in.to(at::kLong).contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const int64_t P = starts.numel();
  TORCH_CHECK(qstarts.dim() == 1 && qstarts.numel() == P + 1 && tables.dim() == 2 && tables.size(0) == P,
              "paged_prefill_attention: query_starts (P + 1,), start_positions (P,) and block_tables (P, nb) for P sequences, got ", qstarts.sizes(),
              ", ", starts.sizes(), ", ", tables.sizes());
  const int64_t* qs = qstarts.data_ptr<int64_t>();
  for (int64_t i = 0; i < P; ++i)
    TORCH_CHECK(qs[i] <= qs[i + 1] && qs[0] >= 0 && qs[P] <= N, "paged_prefill_attention: query_starts must rise within [0, ", N, "], got ", qstarts);
  const at::Tensor query = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  at::Tensor out = at::zeros({N, H, D}, query.options().memory_format(at::MemoryFormat::Contiguous));
  if (P == 0 || H == 0) return out;
#if defined(__AVX512BF16__)
  const auto* kp = reinterpret_cast<const uint16_t*>(key_pool.data_ptr<c10::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(value_pool.data_ptr<c10::BFloat16>());
  const Pools pools{kp, vp, key_pool.stride(0), key_pool.stride(1), key_pool.stride(2), BS, num_blocks};
  const auto* q = reinterpret_cast<const uint16_t*>(query.data_ptr<c10::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float sc = static_cast<float>(scale);
  if (D == 64) {
    prefill_kernel<64>(q, query.stride(0), query.stride(1), pools, qs, starts.data_ptr<int64_t>(), tables.data_ptr<int64_t>(), tables.size(1), P,
                       H, KVH, sc, window, o);
  } else {
    prefill_kernel<128>(q, query.stride(0), query.stride(1), pools, qs, starts.data_ptr<int64_t>(), tables.data_ptr<int64_t>(), tables.size(1), P,
                        H, KVH, sc, window, o);
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kserve_llm, m) {
  m.def("paged_prefill_isa() -> str", &paged_prefill_isa);
  m.def(
      "paged_prefill_attention(Tensor query, Tensor key_pool, Tensor value_pool, Tensor query_starts, Tensor start_positions, "
      "Tensor block_tables, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kserve_llm, CPU, m) { m.impl("paged_prefill_attention", &paged_prefill_attention); }
