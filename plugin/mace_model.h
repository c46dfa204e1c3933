/* -*- c++ -*- ----------------------------------------------------------
   umlipft: a TorchScript-exported MACE model as pair_style mace evaluates it.
   SPDX-License-Identifier: GPL-2.0-or-later

   Everything libtorch lives in mace_model.cpp, so this header (and pair_mace.h) compile
   against plain C++ and LAMMPS, whichever libtorch (CPU or CUDA) the plugin links.
------------------------------------------------------------------------- */

#ifndef UMLIPFT_MACE_MODEL_H
#define UMLIPFT_MACE_MODEL_H

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace umlipft {

// A model file that cannot be used, or a failed evaluation; what() is the whole reason.
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ModelMetadata {
  int format_version = 0;
  double r_max = 0.0;
  int num_interactions = 0;
  std::vector<int> atomic_numbers;
  std::string dtype_name, head;
  // Layer-by-layer evaluation (several MPI ranks); when absent, layered_unsupported says why.
  bool layered = false;
  std::string layered_unsupported;
  std::vector<int> layer_feature_dims;
  // The extrapolation watch (umlipft export --watch), as JSON; empty when the export has none.
  std::string watch_json;
};

// The graph a call evaluates: views into the caller's buffers. Nodes 0..nlocal-1 are the atoms
// whose energy counts; edges run sender -> receiver (edge_index = senders then receivers).
struct Graph {
  int64_t nnodes = 0, nlocal = 0, nedges = 0;
  const int64_t *species = nullptr;       // [nnodes] index into atomic_numbers
  const int64_t *edge_index = nullptr;    // [2, nedges]
  const double *positions = nullptr;      // [nnodes, 3]   whole-model call
  const double *shifts = nullptr;         // [nedges, 3]   whole-model call
  const double *vectors = nullptr;        // [nedges, 3]   layered call: x[receiver] - x[sender]
};

// How the layered call reaches the ghost nodes (nodes nlocal..nnodes-1), one exchange per
// layer boundary; every rank makes the same calls, with or without nodes.
class HaloExchange {
 public:
  virtual ~HaloExchange() = default;
  // ghost[g] = the owner's row of owned, for each ghost node g (rows of width dim).
  virtual void forward(int dim, const double *owned, double *ghost) = 0;
  // owned[n] += the rows of every ghost image of owned node n, wherever it lives.
  virtual void reverse(int dim, const double *ghost, double *owned) = 0;
};

class MACEModel {
 public:
  // Load an export; device_index < 0: CPU, else that CUDA device. Throws ModelError.
  static std::unique_ptr<MACEModel> load(const std::string &path, int device_index);
  // CUDA devices this libtorch can use (0 for a CPU build or no GPU).
  static int cuda_device_count();
  ~MACEModel();

  const ModelMetadata &metadata() const { return meta; }

  // One call of the whole model (the owned-atom graph of one rank, images as shifts).
  void evaluate(const Graph &graph);
  // The model layer by layer, exchanging node features and their gradients through halo.
  void evaluate_layered(const Graph &graph, HaloExchange &halo);

  // Results of the last evaluation, in float64 on the CPU.
  double energy() const { return energy_; }
  const double *node_energy() const;      // [nlocal]
  const double *edge_gradient() const;    // [nedges, 3]: dE / d(edge vector)
  // Columns of the owned nodes' features (every layer's output side by side) of the last
  // evaluation, row-major [nlocal, columns.size()], float64.
  void node_features(const std::vector<int64_t> &columns, std::vector<double> &out) const;

 private:
  MACEModel();
  struct Impl;
  std::unique_ptr<Impl> impl;
  ModelMetadata meta;
  double energy_ = 0.0;
};

}    // namespace umlipft

#endif
