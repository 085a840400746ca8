// Router chunk scores on CPU with AVX512-BF16: bf16 keys in the blocked layout x bf16 query rows.
//
// Keys (routing_cpu.pack_blocked): (nb, H, D/2, 32, 2) bf16, chunk c of block b = c // 32 at lane
// c % 32, each pair of dims of a chunk as one 32-bit word. For a block, head group g and dim pair p
// the 32 chunks are two 64-byte lines, each exactly the (chunk lane x dim pair) operand of
// _mm512_dpbf16_ps; a whole block (H*D*64 bytes, 16 KiB for 1 x 256 dims) is one contiguous run,
// so the keys stream sequentially, once. lhs (prepare_lhs): (G, R, Dk) bf16 with G*Dk == H*D
// (G = 1, Dk = H*D: head-mean fold; G = H, Dk = D: head-max). out: (C,) float32.
//
// Per block the R rows of each group run in passes of at most 12 rows; a pass keeps 2 x rows x S
// fp32 accumulators in registers (S partial sums over the dim pairs for small passes, so at least
// 16 independent dpbf16 chains cover its latency), later passes re-read the block from L1. The head
// and query reduce is fused: mode 0 = max over all G*R rows; mode 1 = max over the G groups and the
// rep rows of each of the T tokens (row r = t*rep + j), then the mean over the T tokens.
// Parallel over blocks with at::parallel_for (torch's intra-op threads).
//
// Also here: doc_reduce (per-document max / mean of chunk scores over sorted runs) and gemv_rows (one bf16
// row times a row-major bf16 weight, for the decode-step linears of runtime/cpu_linear.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t NB = 32;    // chunks per block
constexpr int RG_MAX = 12;    // rows per pass

// res[r*32 + 0..31] <- scores of rows 0..RG-1 (q, row stride qs pairs) against one block group k (P pairs)
template <int RG, int S, bool PF>
inline void pass_rows(const uint16_t* __restrict k, int64_t P, const uint32_t* __restrict q, int64_t qs,
                      float* __restrict res, int64_t pf_off) {
  __m512 lo[S][RG], hi[S][RG];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int r = 0; r < RG; ++r) {
      lo[s][r] = _mm512_setzero_ps();
      hi[s][r] = _mm512_setzero_ps();
    }
  }
  int64_t p = 0;
  for (; p + S <= P; p += S) {
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      if (PF) {   // the same lines of the next block (a later pass: the hardware prefetcher sees no misses)
        _mm_prefetch(reinterpret_cast<const char*>(k + pf_off + (p + s) * 64), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(k + pf_off + (p + s) * 64 + 32), _MM_HINT_T0);
      }
      const __m512bh kl = (__m512bh)_mm512_loadu_si512(k + (p + s) * 64);
      const __m512bh kh = (__m512bh)_mm512_loadu_si512(k + (p + s) * 64 + 32);
#pragma GCC unroll 16
      for (int r = 0; r < RG; ++r) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * qs + p + s]));
        lo[s][r] = _mm512_dpbf16_ps(lo[s][r], kl, qb);
        hi[s][r] = _mm512_dpbf16_ps(hi[s][r], kh, qb);
      }
    }
  }
  for (; p < P; ++p) {
    if (PF) {
      _mm_prefetch(reinterpret_cast<const char*>(k + pf_off + p * 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(k + pf_off + p * 64 + 32), _MM_HINT_T0);
    }
    const __m512bh kl = (__m512bh)_mm512_loadu_si512(k + p * 64);
    const __m512bh kh = (__m512bh)_mm512_loadu_si512(k + p * 64 + 32);
#pragma GCC unroll 16
    for (int r = 0; r < RG; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * qs + p]));
      lo[0][r] = _mm512_dpbf16_ps(lo[0][r], kl, qb);
      hi[0][r] = _mm512_dpbf16_ps(hi[0][r], kh, qb);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 16
    for (int s = 1; s < S; ++s) {
      lo[0][r] = _mm512_add_ps(lo[0][r], lo[s][r]);
      hi[0][r] = _mm512_add_ps(hi[0][r], hi[s][r]);
    }
    _mm512_storeu_ps(res + r * 32, lo[0][r]);
    _mm512_storeu_ps(res + r * 32 + 16, hi[0][r]);
  }
}

template <bool PF>
inline void pass_dispatch(int rg, const uint16_t* k, int64_t P, const uint32_t* q, int64_t qs, float* res,
                          int64_t pf_off) {
  switch (rg) {   // S so that 2 * rg * S >= 16 chains and <= 28 accumulators
    case 1: pass_rows<1, 8, PF>(k, P, q, qs, res, pf_off); break;
    case 2: pass_rows<2, 4, PF>(k, P, q, qs, res, pf_off); break;
    case 3: pass_rows<3, 3, PF>(k, P, q, qs, res, pf_off); break;
    case 4: pass_rows<4, 2, PF>(k, P, q, qs, res, pf_off); break;
    case 5: pass_rows<5, 2, PF>(k, P, q, qs, res, pf_off); break;
    case 6: pass_rows<6, 2, PF>(k, P, q, qs, res, pf_off); break;
    case 7: pass_rows<7, 2, PF>(k, P, q, qs, res, pf_off); break;
    case 8: pass_rows<8, 1, PF>(k, P, q, qs, res, pf_off); break;
    case 9: pass_rows<9, 1, PF>(k, P, q, qs, res, pf_off); break;
    case 10: pass_rows<10, 1, PF>(k, P, q, qs, res, pf_off); break;
    case 11: pass_rows<11, 1, PF>(k, P, q, qs, res, pf_off); break;
    default: pass_rows<12, 1, PF>(k, P, q, qs, res, pf_off); break;
  }
}

inline void max_into(float* __restrict best, const float* __restrict res) {
  _mm512_storeu_ps(best, _mm512_max_ps(_mm512_loadu_ps(best), _mm512_loadu_ps(res)));
  _mm512_storeu_ps(best + 16, _mm512_max_ps(_mm512_loadu_ps(best + 16), _mm512_loadu_ps(res + 16)));
}

}  // namespace

// out (C,) float32 <- fused chunk scores of lhs (G, R, Dk) bf16 against blocked keys (nb, H, D/2, 32, 2) bf16.
void score_blocked(const at::Tensor& lhs, const at::Tensor& keys, int64_t T, int64_t rep, int64_t mode,
                   at::Tensor& out) {
  TORCH_CHECK(lhs.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16, "bf16 operands expected");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 1, "out: contiguous (C,) float32");
  TORCH_CHECK(keys.is_contiguous() && keys.dim() == 5 && keys.size(3) == NB && keys.size(4) == 2,
              "keys: contiguous (nb, H, D/2, 32, 2)");
  TORCH_CHECK(lhs.dim() == 3, "lhs: (G, R, Dk)");
  const int64_t G = lhs.size(0), R = lhs.size(1), Dk = lhs.size(2), C = out.numel(), nb = keys.size(0);
  TORCH_CHECK(Dk % 2 == 0 && G * Dk == keys.size(1) * keys.size(2) * 2, "lhs (G, R, Dk) must have G*Dk == H*D, Dk even");
  TORCH_CHECK(nb * NB >= C && (nb - 1) * NB < C + (C == 0 ? NB : 0), "keys hold ceil(C/32) blocks");
  TORCH_CHECK(R >= 1 && (mode == 0 || (mode == 1 && T >= 1 && rep >= 1 && T * rep == R)), "mode 1 needs R == T * rep");
  if (C == 0) return;
  const at::Tensor qc = lhs.contiguous();
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(qc.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t P = Dk / 2, gstride = P * 2 * NB, bstride = G * gstride;
  const int64_t nbest = mode == 0 ? 1 : T;
  const int64_t npass = (R + RG_MAX - 1) / RG_MAX;
  // at least ~64 KiB of keys x rows per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(1, bstride * 2 * std::min<int64_t>(R, 4)));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float res[RG_MAX * 32];
    std::vector<float> best(nbest * 32);
    alignas(64) float o[NB];
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(best.begin(), best.end(), ninf);
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* kb = kp + b * bstride + g * gstride;
        const uint32_t* qg = qp + g * R * P;
        int64_t r0 = 0;
        for (int64_t ps = 0; ps < npass; ++ps) {
          const int rg = static_cast<int>((R - r0) / (npass - ps));
          // the last of several passes prefetches the next block (in this thread's range)
          if (npass > 1 && ps == npass - 1 && b + 1 < b1)
            pass_dispatch<true>(rg, kb, P, qg + r0 * P, P, res, bstride);
          else
            pass_dispatch<false>(rg, kb, P, qg + r0 * P, P, res, 0);
          for (int r = 0; r < rg; ++r) max_into(best.data() + (mode == 0 ? 0 : (r0 + r) / rep) * 32, res + r * 32);
          r0 += rg;
        }
      }
      __m512 lo = _mm512_loadu_ps(best.data()), hi = _mm512_loadu_ps(best.data() + 16);
      if (mode != 0) {
        for (int64_t t = 1; t < T; ++t) {
          lo = _mm512_add_ps(lo, _mm512_loadu_ps(best.data() + t * 32));
          hi = _mm512_add_ps(hi, _mm512_loadu_ps(best.data() + t * 32 + 16));
        }
        const __m512 inv = _mm512_set1_ps(1.0f / static_cast<float>(T));
        lo = _mm512_mul_ps(lo, inv);
        hi = _mm512_mul_ps(hi, inv);
      }
      const int64_t c0 = b * NB, n = std::min<int64_t>(NB, C - c0);
      if (n == NB) {
        _mm512_storeu_ps(op + c0, lo);
        _mm512_storeu_ps(op + c0 + 16, hi);
      } else {
        _mm512_storeu_ps(o, lo);
        _mm512_storeu_ps(o + 16, hi);
        std::memcpy(op + c0, o, n * sizeof(float));
      }
    }
  });
}

// out (N,) float32 <- per-document max (mode 0) or mean (mode 1) of chunk scores cs (C,) float32 over the
// sorted runs cs[offsets[d] : offsets[d + 1]] (offsets (N + 1,) int64, non-decreasing, offsets[N] == C, every run
// non-empty). One pass over cs, parallel over documents: torch.segment_reduce's fixed cost dominates small stores.
void doc_reduce(const at::Tensor& cs, const at::Tensor& offsets, int64_t mode, at::Tensor& out) {
  TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.is_contiguous() && cs.dim() == 1, "cs: contiguous (C,) float32");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 1, "offsets: (N+1,) int64");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() + 1 == offsets.numel(),
              "out: contiguous (N,) float32 with N + 1 == offsets.numel()");
  const int64_t N = out.numel();
  const float* c = cs.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  TORCH_CHECK(N == 0 || (off[0] == 0 && off[N] == cs.numel()), "offsets must run from 0 to C");
  at::parallel_for(0, N, 8192, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t a = off[d], b = off[d + 1];
      if (mode == 0) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = a; i < b; ++i) m = std::max(m, c[i]);
        o[d] = m;
      } else {
        float t = 0.0f;
        for (int64_t i = a; i < b; ++i) t += c[i];
        o[d] = b > a ? t / static_cast<float>(b - a) : std::numeric_limits<float>::quiet_NaN();
      }
    }
  });
}

// out (O,) float32 <- W (O, I) bf16 row-major (rows contiguous, row stride ws elements) times x (I,) bf16, fp32
// accumulation: the one-row linear of a decode step (runtime.cpu_linear). One row at a time, in memory order
// (interleaving 2-16 rows per load of x ran the 262144 x 640 LM head in 20-25 ms against 12 ms so, on the dev
// VM: the purely sequential stream is what its prefetchers follow); a row's tail (I % 32) is a masked load.
// Parallel over rows.
void gemv_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 operands expected");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x: contiguous (I,) bf16");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.stride(0) >= w.size(1) && w.size(1) == x.size(0),
              "w: (O, I) bf16 with contiguous rows and I == x.numel()");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 1 && out.numel() == w.size(0),
              "out: contiguous (O,) float32");
  const int64_t O = w.size(0), I = w.size(1), ws = w.stride(0);
  if (O == 0) return;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t full = I / 32, tail = I % 32;
  const __mmask32 tm = static_cast<__mmask32>((uint64_t(1) << tail) - 1);
  const __m512bh xt = (__m512bh)_mm512_maskz_loadu_epi16(tm, xp + full * 32);
  // at least ~256 KiB of weights per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, I * 2));
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint16_t* row = wp + o * ws;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; ++i)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(row + i * 32), (__m512bh)_mm512_loadu_si512(xp + i * 32));
      if (tail) acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tm, row + full * 32), xt);
      op[o] = _mm512_reduce_add_ps(acc);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_rows", &gemv_rows, "one bf16 row times a row-major bf16 weight, fp32 accumulation (AVX512-BF16)");
  m.def("score_blocked", &score_blocked,
        "fused router chunk scores of bf16 query rows against blocked bf16 keys (AVX512-BF16)");
  m.def("doc_reduce", &doc_reduce, "per-document max / mean of chunk scores over sorted runs");
}
