/* -*- c++ -*- ----------------------------------------------------------
   umlipft: pair_style mace, a LAMMPS plugin running TorchScript-exported MACE models.
   SPDX-License-Identifier: GPL-2.0-or-later
------------------------------------------------------------------------- */

#ifndef LMP_PAIR_MACE_H
#define LMP_PAIR_MACE_H

#include "pair.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace LAMMPS_NS {

}    // namespace LAMMPS_NS

// libtorch stays out of this header: everything torch lives behind umlipft::MACEModel, so the
// header compiles against plain LAMMPS and any libtorch (CPU or CUDA) can be swapped in.
namespace umlipft {
class MACEModel;
}

namespace LAMMPS_NS {

class PairMACE : public Pair {
 public:
  PairMACE(class LAMMPS *);
  ~PairMACE() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  double memory_usage() override;

  // Node features forward to ghosts and their gradients back to owners, between layers.
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

  enum class GraphMode { AUTO, OWNED, GHOST };

  // For compute mace/q: the export's watch (JSON, empty without one), the step of the last
  // force call, the element of each atom type ("NULL" if another style handles it), and the
  // picked feature columns of that call's owned nodes with the atom index of each row.
  const std::string &watch_json() const;
  const std::vector<int> &layer_feature_dims() const;
  bigint last_force_step() const { return force_step; }
  const std::string &element_of_type(int type) const { return type_element[type]; }
  void owned_node_features(const std::vector<int64_t> &columns, std::vector<double> &rows,
                           std::vector<int> &atoms) const;

 protected:
  std::unique_ptr<umlipft::MACEModel> model;
  std::string model_file;
  double r_max;
  GraphMode requested_mode;
  GraphMode active_mode;
  bool use_cuda;
  // Safety checks (pair_style keywords; 0 turns each off): atom pairs closer than min_distance
  // (A) at the start of a run, and forces above max_force (eV/A) during it.
  double min_distance;
  double max_force;
  bigint force_step = -1;

  std::vector<int> type_to_species;    // per LAMMPS type: index into the model's elements, -1 = NULL
  std::vector<std::string> type_element;

  // Buffers reused from step to step: the graph handed to the model.
  int n_local_nodes = 0;
  std::vector<int> atom_to_node;       // LAMMPS atom index -> graph node, -1 if not a node
  std::vector<int> node_to_atom;       // owned atoms first, then ghost atoms within r_max of one
  std::vector<int> tag_to_local;       // owned graph: atom ID -> owned atom index
  std::vector<double> node_positions;
  std::vector<int64_t> node_species;
  std::vector<int64_t> edge_sender;
  std::vector<int64_t> edge_receiver;
  std::vector<int64_t> edge_index;     // [2, E]: senders then receivers
  std::vector<double> edge_shift;
  std::vector<double> edge_vector;     // x[receiver] - x[sender image]
  std::vector<int> edge_atom_sender;   // atom that takes the sender-side force of each edge
  std::vector<int> edge_atom_receiver;

  // Ghost graph: one row per atom (owned and ghost) of the features being exchanged.
  int halo_dim = 0;
  std::vector<double> halo_rows;
  friend class PairMACEHalo;

  void allocate();
  void load_model(const std::string &path);
  void map_types(int narg, char **arg);
  void report_node_counts();
  void build_graph();
  void check_finite(const char *what, tagint bad_tag_local);
  void check_min_distance();
  void check_max_force();
  bool watchdog_active() const;
  double nearest_neighbour(int atom_index, tagint &neighbour_tag, std::string &neighbour_element) const;
};

}    // namespace LAMMPS_NS

#endif
