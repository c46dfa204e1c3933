/* ----------------------------------------------------------------------
   umlipft: the loops of umlipft::scalar_conv and umlipft::symmetric_contraction, compiled
   once per instruction set (UMLIPFT_ISA = generic | avx2 | avx512, set by CMakeLists.txt with
   matching -m flags).
   Copyright (C) 2026 the umlipft developers. GPL-2.0-or-later.

   Convolution: per receiver i, the messages sum_e w[e,p,c] x[s(e),c] Y[e,m] accumulate in an S x C buffer
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

template <typename T> inline T dot(const T *__restrict a, const T *__restrict b, int64_t n)
{
  constexpr int64_t LANES = UMLIPFT_VECTOR_BYTES / sizeof(T) * 2;
  T part[LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int64_t l = 0; l < LANES; ++l) part[l] += a[k + l] * b[k + l];
  T sum = 0;
  for (int64_t l = 0; l < LANES; ++l) sum += part[l];
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// a0[q] = sum_l x[l] t0[l][q], q < R0: four register accumulators per block of 4 vectors, so
// each row of t0 (L1-resident) is loaded once per block and a0 is stored once.
template <typename T>
inline void stage0_forward(const T *__restrict x, const T *__restrict t0, int64_t L, int64_t R0, T *__restrict a0)
{
  using S_ = Simd<T>;
  using V = typename S_::V;
  constexpr int64_t W = S_::W;
  int64_t q = 0;
  for (; q + 4 * W <= R0; q += 4 * W) {
    V acc0{}, acc1{}, acc2{}, acc3{};
    for (int64_t l = 0; l < L; ++l) {
      const V xl = S_::splat(x[l]);
      const T *row = t0 + l * R0 + q;
      acc0 += xl * S_::load(row);
      acc1 += xl * S_::load(row + W);
      acc2 += xl * S_::load(row + 2 * W);
      acc3 += xl * S_::load(row + 3 * W);
    }
    S_::store(a0 + q, acc0);
    S_::store(a0 + q + W, acc1);
    S_::store(a0 + q + 2 * W, acc2);
    S_::store(a0 + q + 3 * W, acc3);
  }
  for (; q < R0; ++q) {
    T acc = 0;
    for (int64_t l = 0; l < L; ++l) acc += x[l] * t0[l * R0 + q];
    a0[q] = acc;
  }
}

// gx[l] += sum_q g0[q] t0[l][q]: four rows l at a time share each load of g0.
template <typename T>
inline void stage0_backward(const T *__restrict g0, const T *__restrict t0, int64_t L, int64_t R0, T *__restrict gx)
{
  using S_ = Simd<T>;
  using V = typename S_::V;
  constexpr int64_t W = S_::W;
  const int64_t RV = R0 - R0 % W;
  int64_t l = 0;
  for (; l + 4 <= L; l += 4) {
    V acc0{}, acc1{}, acc2{}, acc3{};
    const T *r0 = t0 + l * R0, *r1 = r0 + R0, *r2 = r1 + R0, *r3 = r2 + R0;
    for (int64_t q = 0; q < RV; q += W) {
      const V g = S_::load(g0 + q);
      acc0 += g * S_::load(r0 + q);
      acc1 += g * S_::load(r1 + q);
      acc2 += g * S_::load(r2 + q);
      acc3 += g * S_::load(r3 + q);
    }
    T s0 = S_::sum(acc0), s1 = S_::sum(acc1), s2 = S_::sum(acc2), s3 = S_::sum(acc3);
    for (int64_t q = RV; q < R0; ++q) {
      s0 += g0[q] * r0[q];
      s1 += g0[q] * r1[q];
      s2 += g0[q] * r2[q];
      s3 += g0[q] * r3[q];
    }
    gx[l] += s0;
    gx[l + 1] += s1;
    gx[l + 2] += s2;
    gx[l + 3] += s3;
  }
  for (; l < L; ++l) gx[l] += dot(g0, t0 + l * R0, R0);
}

// Tasks are (element, channel) pairs: one task streams its element's T tensors for one channel
// (kept in L1/L2) over all nodes of that element. Forward when a.out is set, else backward
// (recomputing the forward intermediates per node instead of storing them).
template <typename T>
void product(const ProductLayout &P, const ProductArgs<T> &a, int64_t task_begin, int64_t task_end, T *scratch)
{
  const int64_t C = P.C, L = P.L;
  T *__restrict a0 = scratch;
  T *__restrict a1 = a0 + P.max_r0;
  T *__restrict g0 = a1 + P.max_r1;
  T *__restrict g1 = g0 + P.max_r0;
  T *__restrict gx = g1 + P.max_r1;
  for (int64_t task = task_begin; task < task_end; ++task) {
    // Channel-major task order: every contiguous range of tasks (one per thread) mixes all
    // elements, whatever their node counts.
    const int64_t c = task / P.num_elements, e = task % P.num_elements;
    const T *element = a.packed + e * P.element_stride;
    for (int64_t k = P.element_offsets[e]; k < P.element_offsets[e + 1]; ++k) {
      const int64_t n = P.node_list ? P.node_list[k] : k;
      const T *__restrict x = a.x + (n * C + c) * L;
      if (!a.out)
        for (int64_t l = 0; l < L; ++l) gx[l] = 0;
      for (int64_t j = 0; j < P.num_contractions; ++j) {
        const ContractionSpec &s = P.spec[j];
        const int64_t R0 = s.R0, R1 = s.R1, D = s.dim_out;
        const T *__restrict t0 = element + s.t0_off + c * L * R0;
        const T *__restrict t1 = element + s.t1_off + c * L * (s.corr == 3 ? R1 : D);
        const T *__restrict t2 = element + s.t2_off + c * L * D;
        stage0_forward(x, t0, L, R0, a0);
        if (s.corr == 3) {
          for (int64_t r = 0; r < R1; ++r) a1[r] = 0;
          for (int64_t l = 0; l < L; ++l) {
            const T xl = x[l];
            const T *__restrict in = a0 + l * R1;
            const T *__restrict row = t1 + l * R1;
            for (int64_t r = 0; r < R1; ++r) a1[r] += (in[r] + row[r]) * xl;
          }
        }
        // last stage input and tensor: a0/t1 (corr 2) or a1/t2 (corr 3)
        const T *__restrict last_in = s.corr == 3 ? a1 : a0;
        const T *__restrict last_t = s.corr == 3 ? t2 : t1;
        if (a.out) {
          T *__restrict out = a.out + n * P.out_stride + s.out_col + c * D;
          if (s.corr == 1) {
            for (int64_t r = 0; r < D; ++r) out[r] = a0[r];
          } else {
            for (int64_t r = 0; r < D; ++r) {
              T sum = 0;
              for (int64_t l = 0; l < L; ++l) sum += (last_in[r * L + l] + last_t[r * L + l]) * x[l];
              out[r] = sum;
            }
          }
          continue;
        }
        const T *__restrict go = a.grad_out + n * P.out_stride + s.out_col + c * D;
        T *__restrict g_stage0 = g0;
        if (s.corr == 1) {
          for (int64_t r = 0; r < D; ++r) g0[r] = go[r];
        } else {
          // last stage: d/dx and the gradient of its input (g0 for corr 2, g1 for corr 3)
          T *__restrict g_in = s.corr == 3 ? g1 : g0;
          for (int64_t r = 0; r < D; ++r) {
            const T g = go[r];
            for (int64_t l = 0; l < L; ++l) {
              gx[l] += g * (last_in[r * L + l] + last_t[r * L + l]);
              g_in[r * L + l] = g * x[l];
            }
          }
          if (s.corr == 3) {
            for (int64_t l = 0; l < L; ++l) {
              const T *__restrict in = a0 + l * R1;
              const T *__restrict row = t1 + l * R1;
              T sum = 0;
              for (int64_t r = 0; r < R1; ++r) sum += g1[r] * (in[r] + row[r]);
              gx[l] += sum;
              const T xl = x[l];
              T *__restrict g0l = g0 + l * R1;
              for (int64_t r = 0; r < R1; ++r) g0l[r] = g1[r] * xl;
            }
          }
        }
        stage0_backward(g_stage0, t0, L, R0, gx);
      }
      if (!a.out) {
        T *__restrict out = a.grad_x + (n * C + c) * L;
        for (int64_t l = 0; l < L; ++l) out[l] = gx[l];
      }
    }
  }
}

}    // namespace

void product(const ProductLayout &P, const ProductArgs<float> &a, int64_t b, int64_t e, float *s)
{
  product<float>(P, a, b, e, s);
}
void product(const ProductLayout &P, const ProductArgs<double> &a, int64_t b, int64_t e, double *s)
{
  product<double>(P, a, b, e, s);
}

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
