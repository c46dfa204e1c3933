/* ----------------------------------------------------------------------
   umlipft: the loops of umlipft::scalar_conv, compiled once per instruction set
   (UMLIPFT_ISA = generic | avx2 | avx512, set by CMakeLists.txt with matching -m flags).
   Copyright (C) 2026 the umlipft developers. GPL-2.0-or-later.

   Per receiver i, the messages sum_e w[e,p,c] x[s(e),c] Y[e,m] accumulate in an S x C buffer
   (8 KiB for 128 channels and lmax 3: it stays in L1). The backward walks each edge's channels
   in register-sized blocks, so the per-edge weights are read once and every gradient of that
   edge (weights, sender features, spherical harmonics) comes out of the same pass.
------------------------------------------------------------------------- */

#include "mace_kernels.h"

namespace umlipft {
namespace UMLIPFT_ISA {
namespace {

// Vectors of the compiler's generic vector extension, one register wide (UMLIPFT_VECTOR_BYTES:
// 64 for AVX-512, 32 for AVX2, 16 in the generic build). Channels are processed W at a time; a
// channel count that is not a multiple of W finishes with a scalar tail.
template <typename T> struct Simd {
  typedef T V __attribute__((vector_size(UMLIPFT_VECTOR_BYTES)));
  static constexpr int64_t W = UMLIPFT_VECTOR_BYTES / sizeof(T);
  static V load(const T *p)
  {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T *p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static V splat(T x) { return V{} + x; }
  static T sum(V v)
  {
    T s = 0;
    for (int64_t l = 0; l < W; ++l) s += v[l];
    return s;
  }
};

template <typename T>
void forward(const ConvLayout &L, const ConvForwardArgs<T> &a, int64_t begin, int64_t end, T *scratch)
{
  using S_ = Simd<T>;
  using V = typename S_::V;
  constexpr int64_t W = S_::W;
  const int64_t C = L.C, S = L.S, P = L.P, CV = C - C % W;
  T *__restrict acc = scratch;    // [S][C]
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t k = 0; k < S * C; ++k) acc[k] = 0;
    for (int64_t k = L.offsets[i]; k < L.offsets[i + 1]; ++k) {
      const int64_t e = L.order ? L.order[k] : k;
      const T *__restrict xs = a.x + L.sender[e] * C;
      const T *__restrict ye = a.y + e * S;
      for (int64_t p = 0; p < P; ++p) {
        const T *__restrict wp = a.w + (e * P + L.weight_block[p]) * C;
        const int64_t m0 = L.sh_start[p], m1 = m0 + L.sh_dim[p];
        for (int64_t c = 0; c < CV; c += W) {
          const V h = S_::load(wp + c) * S_::load(xs + c);
          for (int64_t m = m0; m < m1; ++m) {
            T *row = acc + m * C + c;
            S_::store(row, S_::load(row) + S_::splat(ye[m]) * h);
          }
        }
        for (int64_t c = CV; c < C; ++c) {
          const T h = wp[c] * xs[c];
          for (int64_t m = m0; m < m1; ++m) acc[m * C + c] += ye[m] * h;
        }
      }
    }
    T *__restrict oi = a.out + i * C * S;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t d = L.sh_dim[p];
      T *__restrict block = oi + L.out_start[p] * C;
      for (int64_t j = 0; j < d; ++j) {
        const T *__restrict row = acc + (L.sh_start[p] + j) * C;
        for (int64_t c = 0; c < C; ++c) block[c * d + j] = row[c];
      }
    }
  }
}

template <typename T>
void backward(const ConvLayout &L, const ConvBackwardArgs<T> &a, int64_t begin, int64_t end, T *scratch)
{
  using S_ = Simd<T>;
  using V = typename S_::V;
  constexpr int64_t W = S_::W;
  const int64_t C = L.C, S = L.S, P = L.P, CV = C - C % W;
  T *__restrict g = scratch;    // receiver's output gradient, [row m][channel]
  V gy[MAX_SH_ROWS];    // per row m: partial sums of d out / d Y[e, m] over channel blocks
  for (int64_t i = begin; i < end; ++i) {
    if (L.offsets[i] == L.offsets[i + 1]) continue;
    const T *__restrict gi = a.grad_out + i * C * S;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t d = L.sh_dim[p];
      const T *__restrict block = gi + L.out_start[p] * C;
      for (int64_t j = 0; j < d; ++j) {
        T *__restrict row = g + (L.sh_start[p] + j) * C;
        for (int64_t c = 0; c < C; ++c) row[c] = block[c * d + j];
      }
    }
    for (int64_t k = L.offsets[i]; k < L.offsets[i + 1]; ++k) {
      const int64_t e = L.order ? L.order[k] : k;
      const T *__restrict xs = a.x + L.sender[e] * C;
      const T *__restrict ye = a.y + e * S;
      T *__restrict gxe = a.grad_x_edge ? a.grad_x_edge + e * C : nullptr;
      for (int64_t m = 0; m < S; ++m) gy[m] = V{};
      T gy_tail[MAX_SH_ROWS] = {};
      for (int64_t c = 0; c < CV; c += W) {
        const V xv = S_::load(xs + c);
        V gx{};
        for (int64_t p = 0; p < P; ++p) {
          const int64_t b = L.weight_block[p];
          const V wv = S_::load(a.w + (e * P + b) * C + c);
          const V hv = wv * xv;
          V gh{};
          for (int64_t m = L.sh_start[p]; m < L.sh_start[p] + L.sh_dim[p]; ++m) {
            const V gm = S_::load(g + m * C + c);
            gh += S_::splat(ye[m]) * gm;
            gy[m] += gm * hv;
          }
          if (a.grad_w) S_::store(a.grad_w + (e * P + b) * C + c, gh * xv);
          gx += gh * wv;
        }
        if (gxe) S_::store(gxe + c, gx);
      }
      for (int64_t c = CV; c < C; ++c) {
        T gx = 0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t b = L.weight_block[p];
          const T wv = a.w[(e * P + b) * C + c], hv = wv * xs[c];
          T gh = 0;
          for (int64_t m = L.sh_start[p]; m < L.sh_start[p] + L.sh_dim[p]; ++m) {
            gh += ye[m] * g[m * C + c];
            gy_tail[m] += g[m * C + c] * hv;
          }
          if (a.grad_w) a.grad_w[(e * P + b) * C + c] = gh * xs[c];
          gx += gh * wv;
        }
        if (gxe) gxe[c] = gx;
      }
      if (a.grad_y)
        for (int64_t p = 0; p < P; ++p)
          for (int64_t m = L.sh_start[p]; m < L.sh_start[p] + L.sh_dim[p]; ++m)
            a.grad_y[e * S + m] = S_::sum(gy[m]) + gy_tail[m];
    }
  }
}

}    // namespace

void conv_forward(const ConvLayout &L, const ConvForwardArgs<float> &a, int64_t b, int64_t e, float *s)
{
  forward(L, a, b, e, s);
}
void conv_forward(const ConvLayout &L, const ConvForwardArgs<double> &a, int64_t b, int64_t e, double *s)
{
  forward(L, a, b, e, s);
}
void conv_backward(const ConvLayout &L, const ConvBackwardArgs<float> &a, int64_t b, int64_t e, float *s)
{
  backward(L, a, b, e, s);
}
void conv_backward(const ConvLayout &L, const ConvBackwardArgs<double> &a, int64_t b, int64_t e, double *s)
{
  backward(L, a, b, e, s);
}

}    // namespace UMLIPFT_ISA
}    // namespace umlipft
