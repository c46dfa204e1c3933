/* ----------------------------------------------------------------------
   umlipft: compute mace/q, the in-run extrapolation watch of pair_style mace.
   SPDX-License-Identifier: GPL-2.0-or-later

   compute ID group mace/q

   Reads the watch an export carries (umlipft export MODEL --watch TRAIN.extxyz): a PCA of the
   model's own invariant node features on its training frames, with per-element limits (the
   contract is python/umlipft/models/watch.py, whose watch_q is the reference this reproduces).
   It reuses the node features of the step's force call: no second model pass, and nothing is
   computed on steps where nothing asks for it.

   Per atom (array, 4 columns): Q (squared residual outside the first K components), Q/limit
   (the element's per-atom limit at the watch's alpha), Hotelling T2, and Q over the halting
   limit (the element's training tail at frame_alpha / N, N the watched atoms: Bonferroni).
   Scalar: the halting statistic, the max of the 4th column over the group on all ranks; above
   1 the model has left its data (a frame like the training frames exceeds it with probability
   about frame_alpha, whatever its size). Vector: [halting statistic, max Q/limit, fraction of
   the watched atoms over their per-atom limit]. Atoms whose type pair_style mace does not
   handle (NULL) are not watched and get zeros.
------------------------------------------------------------------------- */

#include "compute_mace_q.h"

#include "pair_mace.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "update.h"

#include <algorithm>
#include <cmath>
#include <map>

using namespace LAMMPS_NS;

namespace {
constexpr const char *WATCH_HINT =
    "export the model with a watch fitted on its training data: umlipft export MODEL.model "
    "--watch TRAIN.extxyz -o MODEL-lammps.pt (umlipft finetune does this for its models)";
}

ComputeMACEQ::ComputeMACEQ(LAMMPS *lmp, int narg, char **arg) : Compute(lmp, narg, arg)
{
  if (narg != 3)
    error->all(FLERR, "compute mace/q takes no arguments: compute ID group-ID mace/q (got {} extra)",
               narg - 3);
  peratom_flag = 1;
  size_peratom_cols = 4;
  scalar_flag = 1;
  vector_flag = 1;
  size_vector = 3;
  extscalar = 0;
  extvector = 0;
  vector = results;
}

ComputeMACEQ::~ComputeMACEQ()
{
  memory->destroy(q_array);
}

/* ---------------------------------------------------------------------- */

void ComputeMACEQ::init()
{
  pair = dynamic_cast<PairMACE *>(force->pair_match("mace", 1, 0));
  if (!pair)
    error->all(FLERR,
               "compute mace/q needs pair_style mace (alone or once under hybrid/overlay): it "
               "reads the node features of its force calls");
  read_watch();
}

void ComputeMACEQ::read_watch()
{
  const std::string &text = pair->watch_json();
  if (text.empty()) error->all(FLERR, "compute mace/q: the model given to pair_coeff has no watch; {}", WATCH_HINT);
  std::map<std::string, int> group_index;
  std::map<std::string, Element> by_element;
  try {
    const auto watch = json::parse(text);
    if (watch.value("format", std::string()) != "umlipft-mace-watch" || watch.value("version", 0) != 1)
      error->all(FLERR, "compute mace/q: the model's watch is not a version-1 umlipft watch; {}", WATCH_HINT);
    n_features = watch.at("n_features").get<int>();
    n_components = watch.at("n_components").get<int>();
    frame_alpha = watch.at("halt").at("frame_alpha").get<double>();
    const bool global = watch.at("grouping").get<std::string>() == "global";

    // Feature columns: each layer's 0e columns, at that layer's offset in the concatenation.
    const auto &dims = pair->layer_feature_dims();
    columns.clear();
    int64_t offset = 0;
    std::size_t layer = 0;
    for (const auto &entry : watch.at("layers")) {
      const int dim = entry.at("feature_dim").get<int>();
      if (!dims.empty() && (layer >= dims.size() || dims[layer] != dim))
        error->all(FLERR,
                   "compute mace/q: the watch was fitted on features of another model (layer {} "
                   "has {} values, the model's has {}); {}",
                   layer, dim, layer < dims.size() ? dims[layer] : 0, WATCH_HINT);
      for (const auto &column : entry.at("columns")) columns.push_back(offset + column.get<int64_t>());
      offset += dim;
      ++layer;
    }
    if (static_cast<int>(columns.size()) != n_features)
      error->all(FLERR, "compute mace/q: the watch lists {} columns for {} features; {}", columns.size(),
                 n_features, WATCH_HINT);

    groups.clear();
    for (const auto &[name, g] : watch.at("groups").items()) {
      Group group;
      group.mean = g.at("mean").get<std::vector<double>>();
      for (const auto &row : g.at("components")) {
        const auto values = row.get<std::vector<double>>();
        group.components.insert(group.components.end(), values.begin(), values.end());
      }
      group.variance = g.at("explained_variance").get<std::vector<double>>();
      if (static_cast<int>(group.mean.size()) != n_features ||
          static_cast<int>(group.components.size()) != n_components * n_features ||
          static_cast<int>(group.variance.size()) != n_components)
        error->all(FLERR, "compute mace/q: the watch's PCA '{}' has the wrong shape; {}", name, WATCH_HINT);
      group_index[name] = static_cast<int>(groups.size());
      groups.push_back(std::move(group));
    }
    for (const auto &[symbol, e] : watch.at("elements").items()) {
      Element element;
      const std::string group_name = global ? std::string("all") : symbol;
      if (group_index.count(group_name) == 0) continue;    // an element too rare to fit
      element.group = group_index[group_name];
      element.q_limit = e.at("q_limit").get<double>();
      const auto &tail = e.at("halt_tail");
      element.tail_threshold = tail.at("threshold").get<double>();
      element.tail_scale = tail.at("scale").get<double>();
      element.tail_probability = tail.at("probability").get<double>();
      element.known = true;
      by_element[symbol] = element;
    }
  } catch (const json::exception &err) {
    error->all(FLERR, "compute mace/q: the model's watch is incomplete ({}); {}", err.what(), WATCH_HINT);
  }

  type_watch.assign(atom->ntypes + 1, Element());
  std::string watched;
  for (const auto &entry : by_element) watched += entry.first + " ";
  for (int type = 1; type <= atom->ntypes; ++type) {
    const std::string &symbol = pair->element_of_type(type);
    if (symbol == "NULL") continue;
    const auto found = by_element.find(symbol);
    if (found == by_element.end())
      error->all(FLERR,
                 "compute mace/q: atom type {} is {}, but the model's watch was fitted for {}"
                 "only; refit the watch on training data that contains {} (umlipft export MODEL "
                 "--watch TRAIN.extxyz)",
                 type, symbol, watched, symbol);
    type_watch[type] = found->second;
  }
}

/* ---------------------------------------------------------------------- */

void ComputeMACEQ::compute_peratom()
{
  invoked_peratom = update->ntimestep;
  if (pair->last_force_step() != update->ntimestep)
    error->all(FLERR,
               "compute mace/q at step {}: pair_style mace last computed forces at step {}; the "
               "watch reads the features of the step's force call, so use it on steps of a run "
               "(thermo, dump or fix output), not between runs",
               update->ntimestep, pair->last_force_step());
  if (atom->nmax > nmax) {
    memory->destroy(q_array);
    nmax = atom->nmax;
    memory->create(q_array, nmax, size_peratom_cols, "mace/q:array");
    array_atom = q_array;
  }
  evaluate();
}

void ComputeMACEQ::evaluate()
{
  const int nlocal = atom->nlocal;
  const int *mask = atom->mask;
  const int *type = atom->type;
  for (int i = 0; i < nlocal; ++i)
    for (int k = 0; k < size_peratom_cols; ++k) q_array[i][k] = 0.0;

  pair->owned_node_features(columns, rows, row_atoms);
  const int nrows = static_cast<int>(row_atoms.size());

  bigint watched_local = 0, watched = 0;
  for (int r = 0; r < nrows; ++r)
    if (mask[row_atoms[r]] & groupbit) ++watched_local;
  MPI_Allreduce(&watched_local, &watched, 1, MPI_LMP_BIGINT, MPI_SUM, world);
  // Bonferroni over the atoms watched: each gets frame_alpha / N.
  const double per_atom_alpha = watched > 0 ? frame_alpha / static_cast<double>(watched) : frame_alpha;

  double local[3] = {0.0, 0.0, 0.0};    // max halting ratio, max Q/limit, atoms over limit
  centred.resize(n_features);
  scores.resize(n_components);
  for (int r = 0; r < nrows; ++r) {
    const int i = row_atoms[r];
    if (!(mask[i] & groupbit)) continue;
    const Element &element = type_watch[type[i]];
    const Group &g = groups[element.group];
    const double *x = rows.data() + static_cast<std::size_t>(r) * n_features;
    for (int f = 0; f < n_features; ++f) centred[f] = x[f] - g.mean[f];
    double t2 = 0.0;
    for (int j = 0; j < n_components; ++j) {
      const double *axis = g.components.data() + static_cast<std::size_t>(j) * n_features;
      double t = 0.0;
      for (int f = 0; f < n_features; ++f) t += axis[f] * centred[f];
      scores[j] = t;
      t2 += t * t / g.variance[j];
    }
    // The residual itself, not |c|^2 - |t|^2, which cancels badly near the data.
    double q = 0.0;
    for (int f = 0; f < n_features; ++f) {
      double residual = centred[f];
      for (int j = 0; j < n_components; ++j)
        residual -= scores[j] * g.components[static_cast<std::size_t>(j) * n_features + f];
      q += residual * residual;
    }
    const double halt_limit =
        element.tail_threshold +
        element.tail_scale * std::max(0.0, std::log(element.tail_probability / per_atom_alpha));
    q_array[i][0] = q;
    q_array[i][1] = q / element.q_limit;
    q_array[i][2] = t2;
    q_array[i][3] = q / halt_limit;
    local[0] = std::max(local[0], q_array[i][3]);
    local[1] = std::max(local[1], q_array[i][1]);
    if (q_array[i][1] > 1.0) local[2] += 1.0;
  }
  double maxima[2];
  MPI_Allreduce(local, maxima, 2, MPI_DOUBLE, MPI_MAX, world);
  double over = 0.0;
  MPI_Allreduce(&local[2], &over, 1, MPI_DOUBLE, MPI_SUM, world);
  results[0] = maxima[0];
  results[1] = maxima[1];
  results[2] = watched > 0 ? over / static_cast<double>(watched) : 0.0;
}

double ComputeMACEQ::compute_scalar()
{
  invoked_scalar = update->ntimestep;
  if (invoked_peratom != update->ntimestep) compute_peratom();
  scalar = results[0];
  return scalar;
}

void ComputeMACEQ::compute_vector()
{
  invoked_vector = update->ntimestep;
  if (invoked_peratom != update->ntimestep) compute_peratom();
}

double ComputeMACEQ::memory_usage()
{
  return static_cast<double>(nmax) * size_peratom_cols * sizeof(double) +
         sizeof(double) * (rows.capacity() + centred.capacity());
}
