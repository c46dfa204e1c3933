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
  const int64_t *offsets;         // [num_nodes + 1]: edges of receiver i are k in offsets[i]..offsets[i+1]
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

// Scratch per calling thread: S * C values (forward and backward).
#define UMLIPFT_DECLARE_ISA(isa)                                                                      \
  namespace isa {                                                                                     \
  void conv_forward(const ConvLayout &, const ConvForwardArgs<float> &, int64_t, int64_t, float *);   \
  void conv_forward(const ConvLayout &, const ConvForwardArgs<double> &, int64_t, int64_t, double *); \
  void conv_backward(const ConvLayout &, const ConvBackwardArgs<float> &, int64_t, int64_t, float *); \
  void conv_backward(const ConvLayout &, const ConvBackwardArgs<double> &, int64_t, int64_t,         \
                     double *);                                                                      \
  }

UMLIPFT_DECLARE_ISA(generic)
#if defined(UMLIPFT_HAVE_X86_KERNELS)
UMLIPFT_DECLARE_ISA(avx2)
UMLIPFT_DECLARE_ISA(avx512)
#endif

}    // namespace umlipft

#endif
