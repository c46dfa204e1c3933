/* -*- c++ -*- ----------------------------------------------------------
   umlipft: compute mace/q, the in-run extrapolation watch of pair_style mace.
   SPDX-License-Identifier: GPL-2.0-or-later
------------------------------------------------------------------------- */

#ifndef LMP_COMPUTE_MACE_Q_H
#define LMP_COMPUTE_MACE_Q_H

#include "compute.h"

#include <cstdint>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairMACE;

class ComputeMACEQ : public Compute {
 public:
  ComputeMACEQ(class LAMMPS *, int, char **);
  ~ComputeMACEQ() override;

  void init() override;
  void compute_peratom() override;
  double compute_scalar() override;
  void compute_vector() override;
  double memory_usage() override;

 private:
  struct Group {    // one PCA: mean [F], components [K x F] (rows), variances [K]
    std::vector<double> mean, components, variance;
  };
  struct Element {
    int group = -1;
    double q_limit = 0.0;
    double tail_threshold = 0.0, tail_scale = 0.0, tail_probability = 1.0;
    bool known = false;
  };

  PairMACE *pair = nullptr;
  int nmax = 0;
  double **q_array = nullptr;    // per atom: Q, Q/limit, T2, Q/halt limit
  double results[3] = {0.0, 0.0, 0.0};
  int n_features = 0, n_components = 0;
  double frame_alpha = 0.0;
  std::vector<int64_t> columns;          // feature columns the watch reads, in its order
  std::vector<Group> groups;
  std::vector<Element> type_watch;       // per atom type
  std::vector<double> rows, centred, scores;
  std::vector<int> row_atoms;

  void read_watch();
  void evaluate();
};

}    // namespace LAMMPS_NS

#endif
