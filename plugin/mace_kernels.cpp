/* ----------------------------------------------------------------------
   umlipft: fused CPU kernels for exported MACE models.
   Copyright (C) 2026 the umlipft developers. GPL-2.0-or-later.

   umlipft::scalar_conv is the convolution of a MACE interaction whose node features entering
   it are scalars (every layer of MACE-MP-0 small, the first layer of any MACE):

     out[i, p, c, m] = sum over edges e -> i of  w[e, p, c] * x[sender(e), c] * Y[e, m]

   for every path p of the tensor product (m runs over that path's block of spherical
   harmonics; e3nn's path constant is folded into Y by the caller) and every receiving node i:
   all nodes, or the first num_receivers (the owned atoms of an MPI rank, whose ghosts only
   send). mace-torch materialises the
   edges x channels x (lmax+1)^2 message and scatters it; here each receiver's sum is
   accumulated in a small cache-resident buffer, so forward and backward each stream the
   per-edge weights once and never build an edge x channel x irrep tensor.

   umlipft::symmetric_contraction is MACE's product basis (correlation 1-3) with the coupling
   tensors folded with each element's weights at export; umlipft::linear is a product with
   frozen weights (the radial MLPs) through oneDNN for float32.

   The ops are registered with TorchScript (TORCH_LIBRARY) so that exported models call them
   from LAMMPS and from Python alike. First derivatives only: MD needs forces, training through
   them (forces in the loss) would need the second and is refused with a clear error.
------------------------------------------------------------------------- */

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "mace_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" __attribute__((visibility("default"))) int umlipft_kernels_abi_version() { return 1; }

namespace {

using namespace umlipft;

using torch::Tensor;

// Items grouped by an integer key (CSR): the items of key k are order[offsets[k] .. offsets[k+1]),
// or offsets[k] .. offsets[k+1]) themselves when the keys are already non-decreasing (`order`
// stays empty): what pair_style mace builds for edges by receiver, and what sorted species give.
struct KeyGroups {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
  const int64_t *order_or_null() const { return order.empty() ? nullptr : order.data(); }
};

// `what` names a key in errors ("... receiver index"), `keys` the kind of key ("nodes").
KeyGroups group_by_key(const int64_t *key, int64_t count, int64_t num_keys, const char *what, const char *keys)
{
  KeyGroups groups;
  groups.offsets.assign(num_keys + 1, 0);
  bool sorted = true;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(key[i] >= 0 && key[i] < num_keys, what, " ", key[i], " out of range for ", num_keys, " ", keys);
    groups.offsets[key[i] + 1] += 1;
    if (i > 0 && key[i] < key[i - 1]) sorted = false;
  }
  for (int64_t k = 0; k < num_keys; ++k) groups.offsets[k + 1] += groups.offsets[k];
  if (!sorted) {
    groups.order.resize(count);
    std::vector<int64_t> fill(groups.offsets.begin(), groups.offsets.end() - 1);
    for (int64_t i = 0; i < count; ++i) groups.order[fill[key[i]]++] = i;
  }
  return groups;
}

KeyGroups group_edges_by_receiver(const Tensor &receiver, const Tensor &sender, int64_t num_nodes,
                                  int64_t num_receivers)
{
  const int64_t *s = sender.data_ptr<int64_t>();
  for (int64_t e = 0; e < sender.numel(); ++e)
    TORCH_CHECK(s[e] >= 0 && s[e] < num_nodes, "umlipft::scalar_conv: sender index ", s[e], " out of range for ",
                num_nodes, " nodes");
  return group_by_key(receiver.data_ptr<int64_t>(), receiver.numel(), num_receivers,
                      "umlipft::scalar_conv: receiver index", "receiving nodes");
}

// First derivatives only: MD differentiates the energy once; training on forces would
// differentiate these ops again (create_graph=True), which they do not support.
void refuse_second_derivative(const char *op)
{
  TORCH_CHECK(!torch::GradMode::is_enabled(), op,
              " has first derivatives only (forces, virials): a second derivative was requested "
              "(create_graph=True, e.g. training on forces). Train with mace-torch or use a model "
              "exported with --reference");
}

// Layout of the tensor-product paths: spherical-harmonic rows, weight block and output block.
struct Paths {
  std::vector<int64_t> sh_start, sh_dim, weight_block, out_start;
  int64_t count() const { return static_cast<int64_t>(sh_start.size()); }
};

Paths check_paths(const std::vector<int64_t> &sh_start, const std::vector<int64_t> &sh_dim,
                  const std::vector<int64_t> &weight_block, int64_t sh_total, int64_t num_blocks)
{
  const auto count = static_cast<int64_t>(sh_start.size());
  TORCH_CHECK(count > 0 && static_cast<int64_t>(sh_dim.size()) == count &&
                  static_cast<int64_t>(weight_block.size()) == count,
              "umlipft::scalar_conv: path lists must be non-empty and of equal length");
  TORCH_CHECK(num_blocks == count, "umlipft::scalar_conv: weights hold ", num_blocks,
              " blocks of channels for ", count, " paths");
  std::vector<int> block_used(count, 0), row_used(sh_total, 0);
  Paths paths{sh_start, sh_dim, weight_block, {}};
  int64_t out = 0;
  for (int64_t p = 0; p < count; ++p) {
    TORCH_CHECK(weight_block[p] >= 0 && weight_block[p] < count && !block_used[weight_block[p]]++,
                "umlipft::scalar_conv: weight blocks must be a permutation of the paths");
    TORCH_CHECK(sh_dim[p] > 0 && sh_start[p] >= 0 && sh_start[p] + sh_dim[p] <= sh_total,
                "umlipft::scalar_conv: path ", p, " reads spherical-harmonic rows outside 0..", sh_total);
    for (int64_t m = sh_start[p]; m < sh_start[p] + sh_dim[p]; ++m)
      TORCH_CHECK(!row_used[m]++, "umlipft::scalar_conv: two paths share spherical-harmonic row ", m);
    paths.out_start.push_back(out);
    out += sh_dim[p];
  }
  // The loops address a node's output (and its gradient) as C * sh_total values: paths that
  // leave a row out would make that stride larger than the output's row.
  TORCH_CHECK(out == sh_total, "umlipft::scalar_conv: the paths cover ", out, " of the ", sh_total,
              " spherical-harmonic rows of sh; the kernel needs every row in exactly one path "
              "(export with --no-kernels)");
  return paths;
}

// Instruction set of the loops: the widest this CPU runs, or UMLIPFT_KERNEL_ISA
// (generic | avx2 | avx512) for comparisons; an unusable request is an error, not a fallback.
enum class Isa { generic, avx2, avx512 };

const char *isa_name(Isa isa)
{
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic";
}

Isa detect_isa()
{
#if defined(UMLIPFT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  const bool avx2 = false, avx512 = false;
#endif
  const Isa best = avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::generic;
  const char *requested = std::getenv("UMLIPFT_KERNEL_ISA");
  if (!requested || !*requested) return best;
  const std::string name(requested);
  TORCH_CHECK(name == "generic" || name == "avx2" || name == "avx512",
              "UMLIPFT_KERNEL_ISA='", name, "' is not one of generic, avx2, avx512; unset it to use the best");
  const Isa isa = name == "avx512" ? Isa::avx512 : name == "avx2" ? Isa::avx2 : Isa::generic;
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "UMLIPFT_KERNEL_ISA=", name,
              ": this CPU (or this build) supports up to ", isa_name(best), "; unset it or pick a lower one");
  return isa;
}

Isa active_isa()
{
  static const Isa isa = detect_isa();
  return isa;
}

// The loops of one instruction set, for one dtype.
template <typename T> struct IsaKernels {
  void (*conv_forward)(const ConvLayout &, const ConvForwardArgs<T> &, int64_t, int64_t, T *);
  void (*conv_backward)(const ConvLayout &, const ConvBackwardArgs<T> &, int64_t, int64_t, T *);
  void (*product)(const ProductLayout &, const ProductArgs<T> &, int64_t, int64_t, T *);
};

template <typename T> IsaKernels<T> kernels_of(Isa isa)
{
  switch (isa) {
#if defined(UMLIPFT_HAVE_X86_KERNELS)
    case Isa::avx512: return {avx512::conv_forward, avx512::conv_backward, avx512::product};
    case Isa::avx2: return {avx2::conv_forward, avx2::conv_backward, avx2::product};
#endif
    default: return {generic::conv_forward, generic::conv_backward, generic::product};
  }
}

// kernel(layout, args, begin, end, scratch) over tasks 0..count-1 on libtorch's threads, each
// thread with its own scratch of `scratch_size` values.
template <typename T, typename Layout, typename Args>
void run_on_threads(void (*kernel)(const Layout &, const Args &, int64_t, int64_t, T *), const Layout &layout,
                    const Args &args, int64_t count, int64_t scratch_size)
{
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_size);
    kernel(layout, args, begin, end, scratch.data());
  });
}

ConvLayout make_layout(const KeyGroups &ranges, const Tensor &sender, const Paths &paths, int64_t C, int64_t S)
{
  return ConvLayout{ranges.offsets.data(), ranges.order_or_null(),
                    sender.data_ptr<int64_t>(), C, S, paths.count(), paths.sh_start.data(),
                    paths.sh_dim.data(), paths.weight_block.data(), paths.out_start.data()};
}

struct Inputs {
  Tensor x, w, y, sender, receiver;
  int64_t num_nodes, num_receivers, num_edges, C, S;
};

Inputs check_inputs(const Tensor &node_feats, const Tensor &weights, const Tensor &sh, const Tensor &sender,
                    const Tensor &receiver, int64_t num_receivers)
{
  TORCH_CHECK(node_feats.device().is_cpu(),
              "umlipft::scalar_conv is a CPU kernel; on GPUs the exported model uses its pure "
              "PyTorch convolution (this call should not happen: report it)");
  TORCH_CHECK(node_feats.dim() == 2 && weights.dim() == 2 && sh.dim() == 2,
              "umlipft::scalar_conv: node_feats [N,C], weights [E,P*C] and sh [E,S] must be 2-D");
  TORCH_CHECK(node_feats.scalar_type() == weights.scalar_type() && sh.scalar_type() == weights.scalar_type(),
              "umlipft::scalar_conv: node_feats, weights and sh must share one dtype");
  TORCH_CHECK(node_feats.scalar_type() == torch::kFloat || node_feats.scalar_type() == torch::kDouble,
              "umlipft::scalar_conv: float32 or float64 only");
  TORCH_CHECK(sender.scalar_type() == torch::kLong && receiver.scalar_type() == torch::kLong,
              "umlipft::scalar_conv: edge indices must be int64");
  TORCH_CHECK(weights.device().is_cpu() && sh.device().is_cpu() && sender.device().is_cpu() &&
                  receiver.device().is_cpu(),
              "umlipft::scalar_conv: weights, sh, sender and receiver must be on the CPU with node_feats");
  TORCH_CHECK(sender.dim() == 1 && receiver.dim() == 1,
              "umlipft::scalar_conv: sender and receiver must be 1-D [E], got ", sender.sizes(), " and ",
              receiver.sizes());
  Inputs in;
  in.x = node_feats.contiguous();
  in.w = weights.contiguous();
  in.y = sh.contiguous();
  in.sender = sender.contiguous();
  in.receiver = receiver.contiguous();
  in.num_nodes = in.x.size(0);
  TORCH_CHECK(num_receivers <= in.num_nodes,
              "umlipft::scalar_conv: num_receivers ", num_receivers, " is more than the ", in.num_nodes,
              " nodes (receivers are the first num_receivers nodes; -1 for all)");
  in.num_receivers = num_receivers < 0 ? in.num_nodes : num_receivers;
  in.C = in.x.size(1);
  in.num_edges = in.sender.numel();
  in.S = in.y.size(1);
  TORCH_CHECK(in.S <= MAX_SH_ROWS, "umlipft::scalar_conv: ", in.S, " spherical-harmonic rows, more than the ",
              MAX_SH_ROWS, " (lmax 7) the kernel supports; export with --no-kernels");
  TORCH_CHECK(in.receiver.numel() == in.num_edges && in.w.size(0) == in.num_edges && in.y.size(0) == in.num_edges,
              "umlipft::scalar_conv: sender, receiver, weights and sh must have one row per edge");
  TORCH_CHECK(in.C > 0 && in.w.size(1) % in.C == 0,
              "umlipft::scalar_conv: weights have ", in.w.size(1), " columns, not a multiple of ", in.C,
              " channels");
  return in;
}

class ScalarConv : public torch::autograd::Function<ScalarConv> {
 public:
  static Tensor forward(torch::autograd::AutogradContext *ctx, const Tensor &node_feats, const Tensor &weights,
                        const Tensor &sh, const Tensor &sender, const Tensor &receiver,
                        std::vector<int64_t> path_sh_start, std::vector<int64_t> path_sh_dim,
                        std::vector<int64_t> path_weight_block, int64_t num_receivers)
  {
    Inputs in = check_inputs(node_feats, weights, sh, sender, receiver, num_receivers);
    const Paths paths = check_paths(path_sh_start, path_sh_dim, path_weight_block, in.S, in.w.size(1) / in.C);
    int64_t out_rows = 0;
    for (auto d : path_sh_dim) out_rows += d;
    // Only receiving nodes get a row: across MPI ranks the ghosts (nodes past num_receivers)
    // only send, and rows of zeros for them would cost as much memory traffic as real ones.
    Tensor out = torch::empty({in.num_receivers, in.C * out_rows}, in.x.options());
    const auto ranges = group_edges_by_receiver(in.receiver, in.sender, in.num_nodes, in.num_receivers);
    const ConvLayout layout = make_layout(ranges, in.sender, paths, in.C, in.S);
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "umlipft_scalar_conv", [&] {
      const ConvForwardArgs<scalar_t> args{in.x.data_ptr<scalar_t>(), in.w.data_ptr<scalar_t>(),
                                           in.y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()};
      run_on_threads(kernels_of<scalar_t>(active_isa()).conv_forward, layout, args, in.num_receivers, in.S * in.C);
    });
    ctx->save_for_backward({in.x, in.w, in.y, in.sender, in.receiver});
    ctx->saved_data["sh_start"] = path_sh_start;
    ctx->saved_data["sh_dim"] = path_sh_dim;
    ctx->saved_data["weight_block"] = path_weight_block;
    ctx->saved_data["num_receivers"] = in.num_receivers;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs)
  {
    refuse_second_derivative("umlipft::scalar_conv");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &y = saved[2], &sender = saved[3], &receiver = saved[4];
    const auto sh_start = ctx->saved_data["sh_start"].toIntVector();
    const auto sh_dim = ctx->saved_data["sh_dim"].toIntVector();
    const auto weight_block = ctx->saved_data["weight_block"].toIntVector();
    const int64_t num_nodes = x.size(0), C = x.size(1), S = y.size(1), num_edges = sender.numel();
    const int64_t num_receivers = ctx->saved_data["num_receivers"].toInt();
    const Paths paths = check_paths(sh_start, sh_dim, weight_block, S, w.size(1) / C);
    const Tensor grad_out = grad_outputs[0].contiguous();
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == num_receivers && grad_out.size(1) == C * S &&
                    grad_out.scalar_type() == x.scalar_type() && grad_out.device().is_cpu(),
                "umlipft::scalar_conv: the output gradient must be [", num_receivers, ", ", C * S, "] ",
                x.scalar_type(), " on the CPU like the output, got ", grad_out.sizes(), " ",
                grad_out.scalar_type());
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_y = ctx->needs_input_grad(2);
    Tensor grad_w = need_w ? torch::empty_like(w) : Tensor();
    Tensor grad_y = need_y ? torch::zeros_like(y) : Tensor();    // rows of no path stay zero
    Tensor grad_x_edge = need_x ? torch::empty({num_edges, C}, x.options()) : Tensor();
    const auto ranges = group_edges_by_receiver(receiver, sender, num_nodes, num_receivers);
    const ConvLayout layout = make_layout(ranges, sender, paths, C, S);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "umlipft_scalar_conv_backward", [&] {
      const ConvBackwardArgs<scalar_t> args{x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                            grad_out.data_ptr<scalar_t>(),
                                            need_w ? grad_w.data_ptr<scalar_t>() : nullptr,
                                            need_x ? grad_x_edge.data_ptr<scalar_t>() : nullptr,
                                            need_y ? grad_y.data_ptr<scalar_t>() : nullptr};
      run_on_threads(kernels_of<scalar_t>(active_isa()).conv_backward, layout, args, num_receivers, S * C);
    });
    Tensor grad_x;
    if (need_x) grad_x = torch::zeros_like(x).index_add_(0, sender, grad_x_edge);
    return {grad_x, grad_w, grad_y, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor scalar_conv(const Tensor &node_feats, const Tensor &weights, const Tensor &sh, const Tensor &sender,
                   const Tensor &receiver, c10::IntArrayRef path_sh_start, c10::IntArrayRef path_sh_dim,
                   c10::IntArrayRef path_weight_block, int64_t num_receivers)
{
  return ScalarConv::apply(node_feats, weights, sh, sender, receiver, path_sh_start.vec(), path_sh_dim.vec(),
                           path_weight_block.vec(), num_receivers);
}

// ---------------------------------------------------------------------------- product basis

// spec = [C, L, num_contractions, then per contraction: corr, dim_out, R0, R1, t0_off, t1_off,
// t2_off, out_col]; the module that builds `packed` (umlipft.models.fast) writes both.
struct ProductPlan {
  ProductLayout layout;
  KeyGroups nodes_by_element;
  int64_t scratch() const { return 2 * (layout.max_r0 + layout.max_r1) + layout.L; }
};

ProductPlan make_product_plan(const Tensor &x, const Tensor &species, const Tensor &packed,
                              const std::vector<int64_t> &spec)
{
  TORCH_CHECK(spec.size() >= 3, "umlipft::symmetric_contraction: spec too short");
  ProductPlan plan;
  ProductLayout &P = plan.layout;
  P.C = spec[0];
  P.L = spec[1];
  P.num_contractions = spec[2];
  TORCH_CHECK(P.num_contractions >= 1 && P.num_contractions <= MAX_CONTRACTIONS &&
                  static_cast<int64_t>(spec.size()) == 3 + 8 * P.num_contractions,
              "umlipft::symmetric_contraction: spec holds ", spec.size(), " numbers for ", P.num_contractions,
              " contractions");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == P.C && x.size(2) == P.L, "umlipft::symmetric_contraction: x must be [N, ",
              P.C, ", ", P.L, "], got ", x.sizes());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == x.scalar_type(),
              "umlipft::symmetric_contraction: packed must be 2-D with the dtype of x");
  TORCH_CHECK(species.scalar_type() == torch::kLong && species.dim() == 1 && species.size(0) == x.size(0),
              "umlipft::symmetric_contraction: species must be int64 [N]");
  TORCH_CHECK(species.device().is_cpu() && packed.device().is_cpu(),
              "umlipft::symmetric_contraction: species and packed must be on the CPU with x");
  TORCH_CHECK(x.is_contiguous() && species.is_contiguous() && packed.is_contiguous(),
              "umlipft::symmetric_contraction: x, species and packed must be contiguous");
  TORCH_CHECK(P.C > 0 && P.L > 0, "umlipft::symmetric_contraction: spec C=", P.C, " and L=", P.L,
              " must be positive");
  P.element_stride = packed.size(1);
  const int64_t CL = P.C * P.L;    // both bounded by the sizes of x: no overflow
  // A block of C*L*rows values at `off` lies inside an element's row of packed (division, not
  // multiplication, so that huge malformed values cannot wrap around).
  const auto fits = [&](int64_t off, int64_t rows) {
    return off >= 0 && rows >= 0 && off <= P.element_stride && rows <= (P.element_stride - off) / CL;
  };
  int64_t out = 0;
  P.max_r0 = P.max_r1 = 0;
  for (int64_t j = 0; j < P.num_contractions; ++j) {
    const int64_t *v = spec.data() + 3 + 8 * j;
    ContractionSpec &c = P.spec[j];
    c = ContractionSpec{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
    TORCH_CHECK(c.corr >= 1 && c.corr <= 3, "umlipft::symmetric_contraction: correlation ", c.corr,
                " is not supported by the kernel (1-3); export with --no-kernels");
    const int64_t t1_rows = c.corr == 3 ? c.R1 : c.dim_out;
    TORCH_CHECK(c.dim_out > 0 && c.R0 > 0 && c.R1 >= 0 && (c.corr < 3 || c.R1 > 0),
                "umlipft::symmetric_contraction: contraction ", j, ": dim_out=", c.dim_out, ", R0=", c.R0,
                ", R1=", c.R1, " must be positive (R1 for correlation 3)");
    TORCH_CHECK(c.out_col == out, "umlipft::symmetric_contraction: contraction ", j, " starts at output column ",
                c.out_col, ", expected ", out, " (the previous contractions' C*dim_out columns)");
    TORCH_CHECK(fits(c.t0_off, c.R0) && (c.corr == 1 || fits(c.t1_off, t1_rows)) &&
                    (c.corr < 3 || fits(c.t2_off, c.dim_out)),
                "umlipft::symmetric_contraction: contraction ", j, " does not fit the packed tensors (",
                P.element_stride, " values per element; offsets ", c.t0_off, ", ", c.t1_off, ", ", c.t2_off,
                " and C*L*rows blocks must lie inside)");
    // Stage sizes the loops index scratch with: a0 holds R0 values, a1 R1; the last stage reads
    // dim_out*L of its input (a0 for correlation 2, a1 for 3), correlation 3's middle stage L*R1
    // of a0, and correlation 1 copies dim_out values of a0.
    const int64_t last_in = c.corr == 1 ? c.dim_out : c.dim_out * P.L;
    TORCH_CHECK((c.corr == 1 && c.R0 == last_in) || (c.corr == 2 && c.R0 == last_in) ||
                    (c.corr == 3 && c.R1 == last_in && c.R0 == P.L * c.R1),
                "umlipft::symmetric_contraction: contraction ", j, " (correlation ", c.corr, ") has R0=", c.R0,
                ", R1=", c.R1, "; expected ",
                c.corr == 1   ? "R0 = dim_out"
                : c.corr == 2 ? "R0 = dim_out * L"
                              : "R1 = dim_out * L and R0 = L * R1",
                " (dim_out=", c.dim_out, ", L=", P.L, ")");
    out += P.C * c.dim_out;
    P.max_r0 = std::max(P.max_r0, c.R0);
    P.max_r1 = std::max(P.max_r1, c.R1);
  }
  P.out_stride = out;
  P.num_elements = packed.size(0);
  plan.nodes_by_element = group_by_key(species.data_ptr<int64_t>(), x.size(0), P.num_elements,
                                       "umlipft::symmetric_contraction: species", "elements");
  P.element_offsets = plan.nodes_by_element.offsets.data();
  P.node_list = plan.nodes_by_element.order_or_null();
  return plan;
}

class SymmetricContraction : public torch::autograd::Function<SymmetricContraction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext *ctx, const Tensor &x_in, const Tensor &species_in,
                        const Tensor &packed_in, std::vector<int64_t> spec)
  {
    TORCH_CHECK(x_in.device().is_cpu(), "umlipft::symmetric_contraction is a CPU kernel");
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kDouble,
                "umlipft::symmetric_contraction: float32 or float64 only");
    const Tensor x = x_in.contiguous(), species = species_in.contiguous(), packed = packed_in.contiguous();
    const ProductPlan plan = make_product_plan(x, species, packed, spec);
    Tensor out = torch::empty({x.size(0), plan.layout.out_stride}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "umlipft_symmetric_contraction", [&] {
      const ProductArgs<scalar_t> args{x.data_ptr<scalar_t>(), packed.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                       nullptr, nullptr};
      run_on_threads(kernels_of<scalar_t>(active_isa()).product, plan.layout, args,
                     plan.layout.num_elements * plan.layout.C, plan.scratch());
    });
    ctx->save_for_backward({x, species, packed});
    ctx->saved_data["spec"] = spec;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs)
  {
    refuse_second_derivative("umlipft::symmetric_contraction");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &species = saved[1], &packed = saved[2];
    const ProductPlan plan = make_product_plan(x, species, packed, ctx->saved_data["spec"].toIntVector());
    const Tensor grad_out = grad_outputs[0].contiguous();
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == plan.layout.out_stride &&
                    grad_out.scalar_type() == x.scalar_type() && grad_out.device().is_cpu(),
                "umlipft::symmetric_contraction: the output gradient must be [", x.size(0), ", ",
                plan.layout.out_stride, "] ", x.scalar_type(), " on the CPU like the output, got ", grad_out.sizes(),
                " ", grad_out.scalar_type());
    Tensor grad_x = torch::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "umlipft_symmetric_contraction_backward", [&] {
      const ProductArgs<scalar_t> args{x.data_ptr<scalar_t>(), packed.data_ptr<scalar_t>(), nullptr,
                                       grad_out.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>()};
      run_on_threads(kernels_of<scalar_t>(active_isa()).product, plan.layout, args,
                     plan.layout.num_elements * plan.layout.C, plan.scratch());
    });
    return {grad_x, Tensor(), Tensor(), Tensor()};
  }
};

Tensor symmetric_contraction(const Tensor &x, const Tensor &species, const Tensor &packed, c10::IntArrayRef spec)
{
  return SymmetricContraction::apply(x, species, packed, spec.vec());
}

// ---------------------------------------------------------------------------- dense layers

// oneDNN's GEMM (through the mkldnn::_linear_pointwise op libtorch registers) runs the tall,
// thin products of the per-edge radial MLPs 1.6-1.8x faster than the BLAS behind at::mm on the
// CPUs measured (float32 only: oneDNN has no float64 GEMM). Absent, at::mm does the work.
const c10::OperatorHandle *onednn_linear_op()
{
  static const c10::OperatorHandle *op = []() -> const c10::OperatorHandle * {
    if (!at::hasMKLDNN()) return nullptr;
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return handle ? new c10::OperatorHandle(*handle) : nullptr;
  }();
  return op;
}

// input [M, K] @ weight [K, N], with weight_t = weight^T contiguous ([N, K], the layout oneDNN reads).
Tensor matmul_frozen(const Tensor &input, const Tensor &weight, const Tensor &weight_t)
{
  const auto *op = onednn_linear_op();
  if (op && input.scalar_type() == torch::kFloat && input.device().is_cpu() && input.size(0) > 0) {
    torch::jit::Stack stack{input.contiguous(), weight_t, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    op->callBoxed(&stack);
    return stack[0].toTensor();
  }
  return at::mm(input, weight);
}

class FrozenLinear : public torch::autograd::Function<FrozenLinear> {
 public:
  static Tensor forward(torch::autograd::AutogradContext *ctx, const Tensor &input, const Tensor &weight,
                        const Tensor &weight_t)
  {
    TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && weight_t.dim() == 2 &&
                    input.size(1) == weight.size(0) && weight_t.size(0) == weight.size(1) &&
                    weight_t.size(1) == weight.size(0),
                "umlipft::linear: input [M, K], weight [K, N] and weight_t [N, K] expected, got ", input.sizes(),
                ", ", weight.sizes(), " and ", weight_t.sizes());
    TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight_t.scalar_type() == input.scalar_type() &&
                    weight.device() == input.device() && weight_t.device() == input.device(),
                "umlipft::linear: input, weight and weight_t must share one dtype and device");
    TORCH_CHECK(!weight.requires_grad() && !weight_t.requires_grad(),
                "umlipft::linear is for frozen (exported) weights: they must not require gradients");
    ctx->save_for_backward({weight, weight_t});
    return matmul_frozen(input, weight, weight_t);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs)
  {
    refuse_second_derivative("umlipft::linear");
    const auto saved = ctx->get_saved_variables();
    // d(input @ W) / d input = grad @ W^T: the same product with the two layouts swapped.
    return {matmul_frozen(grad_outputs[0].contiguous(), saved[1], saved[0]), Tensor(), Tensor()};
  }
};

Tensor frozen_linear(const Tensor &input, const Tensor &weight, const Tensor &weight_t)
{
  return FrozenLinear::apply(input, weight, weight_t);
}

}    // namespace

std::string kernel_isa() { return isa_name(active_isa()); }

TORCH_LIBRARY(umlipft, m)
{
  m.def("kernel_isa() -> str", kernel_isa);
  m.def("linear(Tensor input, Tensor weight, Tensor weight_t) -> Tensor");
  m.def("symmetric_contraction(Tensor x, Tensor species, Tensor packed, int[] spec) -> Tensor");
  m.def("scalar_conv(Tensor node_feats, Tensor weights, Tensor sh, Tensor sender, Tensor receiver, "
        "int[] path_sh_start, int[] path_sh_dim, int[] path_weight_block, int num_receivers=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(umlipft, CompositeImplicitAutograd, m)
{
  m.impl("scalar_conv", scalar_conv);
  m.impl("linear", frozen_linear);
  m.impl("symmetric_contraction", symmetric_contraction);
}
