/* ----------------------------------------------------------------------
   umlipft: fused CPU kernels for exported MACE models (interface between the op registration
   in mace_kernels.cpp and the loops in mace_kernels_isa.cpp).
   Copyright (C) 2026 the umlipft developers. GPL-2.0-or-later.

   The loops are compiled once per instruction set (generic, AVX2+FMA, AVX-512) and chosen at
   run time, so one build runs on any x86-64 node of a cluster at that node's best width. The
   per-ISA file includes nothing but this header: inline library code compiled with wider
   instructions must never be shared with (and picked by the linker for) the generic build.
------------------------------------------------------------------------- */

#ifndef UMLIPFT_MACE_KERNELS_H
#define UMLIPFT_MACE_KERNELS_H

#include <cstdint>

namespace umlipft {

// Spherical-harmonic rows a convolution may have: (lmax + 1)^2 for lmax <= 7.
constexpr int64_t MAX_SH_ROWS = 64;

// Edges grouped by receiver (CSR) and the tensor-product paths of one scalar convolution.
struct ConvLayout {
  const int64_t *offsets;         // [receivers + 1]: edges of receiver i are k in offsets[i]..offsets[i+1]
  const int64_t *order;           // edge of slot k, or nullptr when edges are already grouped
  const int64_t *sender;          // [E]
  int64_t C, S, P;                // channels, spherical-harmonic rows, paths
  const int64_t *sh_start, *sh_dim, *weight_block, *out_start;    // per path
};

template <typename T> struct ConvForwardArgs {
  const T *x, *w, *y;    // [N, C], [E, P*C], [E, S]
  T *out;                // [N, C*S], e3nn layout (per path, channel-major [C, d] blocks)
};

template <typename T> struct ConvBackwardArgs {
  const T *x, *w, *y, *grad_out;
  T *grad_w;         // [E, P*C] or nullptr
  T *grad_x_edge;    // [E, C] (summed onto senders by the caller) or nullptr
  T *grad_y;         // [E, S] or nullptr (rows of no path are left as they are)
};

// One symmetric contraction (MACE's product basis) with correlation 1, 2 or 3, per element and
// channel: T tensors folded from the coupling coefficients and the element's weights at export.
// Stage 0 is a0[q] = sum_l x[l] T0[l][q]; for correlation 3 its output is laid out [l1][r1] so
// the middle stage a1[r1] = sum_l1 (a0[l1][r1] + T1[l1][r1]) x[l1] vectorises over r1; the last
// stage out[r] = sum_l (a[r*L + l] + Tlast[r][l]) x[l] is a short dot product per output row.
struct ContractionSpec {
  int64_t corr, dim_out, R0, R1;       // R0 = rows of stage 0, R1 = rows of stage 1 (corr 3)
  int64_t t0_off, t1_off, t2_off;      // offsets of this contraction's tensors in an element's row
  int64_t out_col;                     // first output column (outputs are [C, dim_out] channel-major)
};

constexpr int64_t MAX_CONTRACTIONS = 8;

struct ProductLayout {
  int64_t C, L, num_contractions, out_stride, element_stride, num_elements;
  int64_t max_r0, max_r1;            // largest R0 / R1 over the contractions (scratch layout)
  ContractionSpec spec[MAX_CONTRACTIONS];
  const int64_t *element_offsets;    // nodes of element e: node_list[element_offsets[e] .. [e+1])
  const int64_t *node_list;          // nullptr when the nodes are already grouped by element
};

template <typename T> struct ProductArgs {
  const T *x;           // [N, C, L]
  const T *packed;      // [elements, element_stride]
  T *out;               // [N, out_stride] (forward) or nullptr
  const T *grad_out;    // [N, out_stride] (backward) or nullptr
  T *grad_x;            // [N, C, L] (backward) or nullptr
};

// Scratch per calling thread: S * C values for the convolution (forward and backward),
// 2 * (max_r0 + max_r1) + L for the product basis.
#define UMLIPFT_DECLARE_ISA(isa)                                                                      \
  namespace isa {                                                                                     \
  void conv_forward(const ConvLayout &, const ConvForwardArgs<float> &, int64_t, int64_t, float *);   \
  void conv_forward(const ConvLayout &, const ConvForwardArgs<double> &, int64_t, int64_t, double *); \
  void conv_backward(const ConvLayout &, const ConvBackwardArgs<float> &, int64_t, int64_t, float *); \
  void conv_backward(const ConvLayout &, const ConvBackwardArgs<double> &, int64_t, int64_t,         \
                     double *);                                                                      \
  void product(const ProductLayout &, const ProductArgs<float> &, int64_t, int64_t, float *);        \
  void product(const ProductLayout &, const ProductArgs<double> &, int64_t, int64_t, double *);      \
  }

UMLIPFT_DECLARE_ISA(generic)
#if defined(UMLIPFT_HAVE_X86_KERNELS)
UMLIPFT_DECLARE_ISA(avx2)
UMLIPFT_DECLARE_ISA(avx512)
#endif

}    // namespace umlipft

#endif
