/* ----------------------------------------------------------------------
   umlipft: pair_style mace, a LAMMPS plugin running TorchScript-exported MACE models.
   SPDX-License-Identifier: GPL-2.0-or-later

   PairMACE does the LAMMPS side only: keywords, the graph from the neighbour list, halo
   communication and the tallies; umlipft::MACEModel (mace_model.cpp) loads and evaluates
   the export. The model returns dE/d(edge vector) for every edge, from which forces, the
   global virial and per-atom virials follow in one pass, whichever graph was evaluated:

   - owned graph (one MPI rank): nodes are the owned atoms only; a neighbour that is a ghost
     image is replaced by its owner plus a periodic shift. No node is evaluated twice.
   - ghost graph (several ranks): nodes are the owned atoms plus the ghost atoms within one
     cutoff of them. The model runs layer by layer; between layers the owners' new node
     features are copied to their ghosts (forward communication), and in the backward pass
     the gradients on ghost features are summed onto their owners (reverse communication).
     Forces on ghosts reach their owners through LAMMPS' own reverse communication (newton
     pair on).
------------------------------------------------------------------------- */

#include "pair_mace.h"

#include "mace_model.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

using namespace LAMMPS_NS;

// Defined in libumlipft_kernels.so; calling it keeps that library (and the TorchScript ops it
// registers, which optimised exports use) linked even under --as-needed.
extern "C" int umlipft_kernels_abi_version();

namespace {

constexpr const char *EXPORT_HINT = "create one with: umlipft export MODEL.model -o MODEL-lammps.pt";

// Below half an Angstrom no chemistry happens (H2 is 0.74 A) and a model has never seen such
// pairs: its forces are arbitrary and the run explodes. Forces above 50 eV/A do not occur in
// MD near room temperature (stretched O-H bonds give a few eV/A); they mark a run blowing up.
constexpr double DEFAULT_MIN_DISTANCE = 0.5;
constexpr double DEFAULT_MAX_FORCE = 50.0;
constexpr const char *BLOWUP_CAUSES =
    "likely causes: a timestep too large for these atoms (0.5 fs with hydrogen), atoms "
    "overlapping in the start structure, or the model extrapolating far outside its training "
    "data (fine-tune it on this chemistry)";

const std::array<const char *, 118> ELEMENTS = {
    "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",
    "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh",
    "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd",
    "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",  "Re",
    "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th",
    "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db",
    "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};

int atomic_number(const std::string &symbol)
{
  for (std::size_t z = 0; z < ELEMENTS.size(); ++z)
    if (symbol == ELEMENTS[z]) return static_cast<int>(z) + 1;
  return 0;
}

// libtorch allocates and frees tens of MB per step (edge x channel tensors and their gradients).
// glibc serves such blocks with fresh mmap()s and trims freed heap back to the kernel, so every
// step page-faults them in again: about a third of a float64 step on 2 cores. Keeping them in
// the heap (the classic MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ HPC setting) costs only
// memory the step needs anyway. UMLIPFT_NO_MALLOC_TUNING=1 leaves malloc alone.
void tune_malloc_for_steady_state()
{
#if defined(__GLIBC__)
  static bool done = false;
  if (done) return;
  done = true;
  const char *off = std::getenv("UMLIPFT_NO_MALLOC_TUNING");
  if (off && std::strcmp(off, "1") == 0) return;
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, -1);
#endif
}

std::string element_symbol(int z)
{
  return (z >= 1 && z <= static_cast<int>(ELEMENTS.size())) ? ELEMENTS[z - 1] : std::to_string(z);
}

}    // namespace

/* ---------------------------------------------------------------------- */

PairMACE::PairMACE(LAMMPS *lmp) :
    Pair(lmp), r_max(0.0), requested_mode(GraphMode::AUTO),
    active_mode(GraphMode::OWNED), use_cuda(false), min_distance(DEFAULT_MIN_DISTANCE),
    max_force(DEFAULT_MAX_FORCE)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // The virial comes from the edge gradients: fdotr would miss the periodic shifts of the
  // owned graph, where ghost images never receive forces.
  no_virial_fdotr_compute = 1;
  centroidstressflag = CENTROID_NOTAVAIL;
  tune_malloc_for_steady_state();
}

PairMACE::~PairMACE()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairMACE::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  memory->create(cutghost, n, n, "pair:cutghost");
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) setflag[i][j] = 0;
}

/* ----------------------------------------------------------------------
   pair_style mace [graph auto|owned|ghost] [device cpu|cuda] [min_distance D] [max_force F]
------------------------------------------------------------------------- */

void PairMACE::settings(int narg, char **arg)
{
  // A repeated pair_style line starts from the defaults, like a new one.
  requested_mode = GraphMode::AUTO;
  use_cuda = false;
  min_distance = DEFAULT_MIN_DISTANCE;
  max_force = DEFAULT_MAX_FORCE;

  // A length or force limit: a number >= 0, or 'off' (= 0, no check).
  auto limit = [&](int iarg, const char *keyword, const char *unit, const char *example) {
    if (iarg + 1 >= narg)
      error->all(FLERR, "pair_style mace: keyword '{}' needs a value in {} (0 or off: no check), e.g. {} {}",
                 keyword, unit, keyword, example);
    const std::string value = arg[iarg + 1];
    if (value == "off") return 0.0;
    if (!utils::is_double(value) || std::stod(value) < 0.0)
      error->all(FLERR,
                 "pair_style mace: '{} {}' is not a limit: give a number >= 0 in {} (0 or off: "
                 "no check), e.g. {} {}",
                 keyword, value, unit, keyword, example);
    return std::stod(value);
  };

  int iarg = 0;
  while (iarg < narg) {
    if (strcmp(arg[iarg], "graph") == 0) {
      if (iarg + 1 >= narg)
        error->all(FLERR, "pair_style mace: keyword 'graph' needs a value: auto, owned or ghost");
      const std::string value = arg[iarg + 1];
      if (value == "auto")
        requested_mode = GraphMode::AUTO;
      else if (value == "owned")
        requested_mode = GraphMode::OWNED;
      else if (value == "ghost")
        requested_mode = GraphMode::GHOST;
      else
        error->all(FLERR, "pair_style mace: unknown graph mode '{}'; use auto, owned or ghost", value);
      iarg += 2;
    } else if (strcmp(arg[iarg], "device") == 0) {
      if (iarg + 1 >= narg)
        error->all(FLERR, "pair_style mace: keyword 'device' needs a value: cpu or cuda");
      const std::string value = arg[iarg + 1];
      if (value != "cpu" && value != "cuda")
        error->all(FLERR, "pair_style mace: unknown device '{}'; use cpu or cuda", value);
      if (value == "cuda" && umlipft::MACEModel::cuda_device_count() == 0)
        error->all(FLERR,
                   "pair_style mace: device cuda requested but this libtorch sees no CUDA GPU; "
                   "build the plugin against a CUDA libtorch (see README) or use device cpu");
      use_cuda = (value == "cuda");
      iarg += 2;
    } else if (strcmp(arg[iarg], "min_distance") == 0) {
      min_distance = limit(iarg, "min_distance", "Angstrom", "0.5");
      iarg += 2;
    } else if (strcmp(arg[iarg], "max_force") == 0) {
      max_force = limit(iarg, "max_force", "eV/Angstrom", "50");
      iarg += 2;
    } else {
      error->all(FLERR,
                 "pair_style mace: unknown keyword '{}'; the syntax is 'pair_style mace "
                 "[graph auto|owned|ghost] [device cpu|cuda] [min_distance D] [max_force F]' "
                 "and the model is given with pair_coeff",
                 arg[iarg]);
    }
  }
}

/* ----------------------------------------------------------------------
   pair_coeff * * MODEL.pt El1 El2 ... (one element or NULL per atom type)
------------------------------------------------------------------------- */

void PairMACE::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg < 3)
    error->all(FLERR, "pair_coeff for pair_style mace needs: pair_coeff * * MODEL.pt El1 El2 ...");
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "pair_coeff for pair_style mace must start with '* *' (got '{} {}'): one "
               "pair_coeff line maps every atom type, e.g. pair_coeff * * MODEL.pt O H",
               arg[0], arg[1]);
  if (narg - 3 != ntypes)
    error->all(FLERR,
               "pair_coeff * * {} needs one element per atom type: got {} element(s) for {} "
               "atom type(s); list them in type order and use NULL for types handled by another "
               "pair style under hybrid/overlay",
               arg[2], narg - 3, ntypes);

  load_model(arg[2]);
  map_types(narg, arg);
}

/* ----------------------------------------------------------------------
   Load the export named in pair_coeff; every problem with the file is one message.
------------------------------------------------------------------------- */

void PairMACE::load_model(const std::string &path)
{
  if (umlipft_kernels_abi_version() != 1)
    error->all(FLERR, "pair_style mace: libumlipft_kernels.so does not match this plugin; reinstall umlipft");
  // One GPU per rank, round robin, for the usual 'one rank per GPU' cluster launch.
  const int device = use_cuda ? comm->me % umlipft::MACEModel::cuda_device_count() : -1;
  try {
    model = umlipft::MACEModel::load(path, device);
  } catch (const umlipft::ModelError &err) {
    error->all(FLERR, "pair_style mace: {}; {}", err.what(), EXPORT_HINT);
  }
  model_file = path;
  const auto &meta = model->metadata();
  r_max = meta.r_max;
  // Layer features travel to ghosts between layers: the widest layer sizes the buffers.
  comm_forward = comm_reverse = 0;
  for (int dim : meta.layer_feature_dims) comm_forward = comm_reverse = std::max(comm_forward, dim);

  if (comm->me == 0)
    utils::logmesg(lmp,
                   "pair_style mace: model {} ({}, r_max {} A, {} interactions, head {}, {} "
                   "elements) on {}\n",
                   model_file, meta.dtype_name, r_max, meta.num_interactions, meta.head,
                   meta.atomic_numbers.size(), use_cuda ? "cuda" : "cpu");
}

/* ----------------------------------------------------------------------
   pair_coeff's element list: atom type -> the model's species index (-1 for NULL).
------------------------------------------------------------------------- */

void PairMACE::map_types(int narg, char **arg)
{
  const int ntypes = atom->ntypes;
  const auto &numbers = model->metadata().atomic_numbers;
  type_to_species.assign(ntypes + 1, -1);
  type_element.assign(ntypes + 1, "NULL");
  for (int itype = 1; itype <= ntypes && 2 + itype < narg; ++itype) {
    const std::string symbol = arg[2 + itype];
    type_element[itype] = symbol;
    if (symbol == "NULL") {
      // Under hybrid styles force->pair is the hybrid container, and another style covers it.
      if (force->pair == this)
        error->all(FLERR,
                   "pair_coeff: atom type {} is mapped to NULL but no other pair style handles "
                   "it; give it an element or use pair_style hybrid/overlay mace ...",
                   itype);
      continue;
    }
    const int z = atomic_number(symbol);
    if (z == 0)
      error->all(FLERR,
                 "pair_coeff: '{}' (atom type {}) is not an element symbol; use symbols such as "
                 "H, O, Co (case matters) or NULL",
                 symbol, itype);
    int species = -1;
    for (std::size_t k = 0; k < numbers.size(); ++k)
      if (numbers[k] == z) species = static_cast<int>(k);
    if (species < 0) {
      std::string covered;
      for (int zz : numbers) covered += element_symbol(zz) + " ";
      error->all(FLERR,
                 "pair_coeff: element {} (atom type {}) is not covered by model '{}', which "
                 "covers: {}; use a model trained with {} or map this type to NULL and give it "
                 "another pair style under hybrid/overlay",
                 symbol, itype, model_file, covered, symbol);
    }
    type_to_species[itype] = species;
  }
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j)
      setflag[i][j] = (type_to_species[i] >= 0 && type_to_species[j] >= 0) ? 1 : 0;
}

/* ---------------------------------------------------------------------- */

void PairMACE::init_style()
{
  if (!model)
    error->all(FLERR, "pair_style mace has no model: add 'pair_coeff * * MODEL.pt El1 El2 ...'");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR,
               "pair_style mace requires 'units metal' (eV, Angstrom, ps); the input uses "
               "'units {}': change the units line and convert the data file",
               update->unit_style);
  if (atom->tag_enable == 0)
    error->all(FLERR, "pair_style mace requires atom IDs; remove 'atom_modify id no'");
  if (requested_mode == GraphMode::OWNED && comm->nprocs > 1)
    error->all(FLERR,
               "pair_style mace: 'graph owned' works on one MPI rank only; this run has {} "
               "ranks: use 'graph auto' or 'graph ghost'",
               comm->nprocs);
  if (requested_mode == GraphMode::AUTO)
    active_mode = (comm->nprocs == 1) ? GraphMode::OWNED : GraphMode::GHOST;
  else
    active_mode = requested_mode;

  if (active_mode == GraphMode::GHOST) {
    const auto &meta = model->metadata();
    if (!meta.layered)
      error->all(FLERR,
                 "pair_style mace: '{}' runs on one MPI rank only ({}); this run uses the ghost "
                 "graph of {} rank(s): run it on one rank, or export a supported model",
                 model_file, meta.layered_unsupported, comm->nprocs);
    if (force->newton_pair == 0)
      error->all(FLERR,
                 "pair_style mace with a ghost-atom graph (several MPI ranks) requires 'newton "
                 "on' (the default), because ghost atoms receive forces; remove 'newton off'");
    // pair hybrid takes its sub-styles' buffer sizes when they are created, before pair_coeff
    // loads the model; Comm::init, which sizes the buffers, runs after this.
    if (force->pair != this) {
      force->pair->comm_forward = std::max(force->pair->comm_forward, comm_forward);
      force->pair->comm_reverse = std::max(force->pair->comm_reverse, comm_reverse);
    }
  }
  // Owned atoms' full neighbour lists are all either graph needs: the ghost graph holds the
  // ghosts within one cutoff of an owned atom, which LAMMPS' ghost shell (cutoff + skin) has.
  neighbor->add_request(this, NeighConst::REQ_FULL);
  ghostneigh = 0;

  if (comm->me == 0) {
    utils::logmesg(lmp, "pair_style mace: min_distance {} A, max_force {} eV/A{}\n", min_distance,
                   max_force, (min_distance > 0.0 || max_force > 0.0) ? "" : " (checks off)");
    if (active_mode == GraphMode::OWNED)
      utils::logmesg(lmp, "pair_style mace: owned-atom graph with periodic shifts (1 MPI rank)\n");
    else
      utils::logmesg(lmp,
                     "pair_style mace: owned + ghost graph on {} MPI rank(s), layer by layer with "
                     "halo exchange of node features ({} values per atom), ghosts within {} A\n",
                     comm->nprocs, comm_forward, r_max);
  }
}

double PairMACE::init_one(int i, int j)
{
  if (type_to_species[i] >= 0 && type_to_species[j] >= 0) {
    setflag[i][j] = setflag[j][i] = 1;
  }
  cutghost[i][j] = cutghost[j][i] = r_max;
  return r_max;
}

/* ----------------------------------------------------------------------
   Build nodes and edges from the neighbour list into the reused buffers.
------------------------------------------------------------------------- */

void PairMACE::build_graph()
{
  double **x = atom->x;
  const int *type = atom->type;
  const tagint *tag = atom->tag;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int inum = list->inum;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const double cut2 = r_max * r_max;

  node_to_atom.clear();
  atom_to_node.assign(nall, -1);
  edge_sender.clear();
  edge_receiver.clear();
  edge_shift.clear();
  edge_atom_sender.clear();
  edge_atom_receiver.clear();
  edge_vector.clear();

  for (int ii = 0; ii < inum; ++ii) {
    const int i = ilist[ii];
    if (type_to_species[type[i]] < 0) continue;
    atom_to_node[i] = static_cast<int>(node_to_atom.size());
    node_to_atom.push_back(i);
  }
  n_local_nodes = static_cast<int>(node_to_atom.size());

  auto add_edge = [&](int receiver_atom, int sender_atom, int sender_image) {
    const double dx = x[receiver_atom][0] - x[sender_image][0];
    const double dy = x[receiver_atom][1] - x[sender_image][1];
    const double dz = x[receiver_atom][2] - x[sender_image][2];
    edge_receiver.push_back(atom_to_node[receiver_atom]);
    edge_sender.push_back(atom_to_node[sender_atom]);
    // vector = x[receiver] - x[sender] + shift, so shift = x[sender owner] - x[sender image]
    edge_shift.push_back(x[sender_atom][0] - x[sender_image][0]);
    edge_shift.push_back(x[sender_atom][1] - x[sender_image][1]);
    edge_shift.push_back(x[sender_atom][2] - x[sender_image][2]);
    edge_vector.push_back(dx);
    edge_vector.push_back(dy);
    edge_vector.push_back(dz);
    edge_atom_receiver.push_back(receiver_atom);
    edge_atom_sender.push_back(sender_atom);
  };
  auto within_cutoff = [&](int i, int j) {
    const double dx = x[i][0] - x[j][0];
    const double dy = x[i][1] - x[j][1];
    const double dz = x[i][2] - x[j][2];
    return dx * dx + dy * dy + dz * dz < cut2;
  };

  // Owned graph: ghost images fold back onto their owners (one rank owns every atom). Ghost
  // graph: a ghost neighbour becomes a node once, whatever its image; its features arrive from
  // its owner between layers. Receivers are owned atoms either way.
  const bool fold_images = (active_mode == GraphMode::OWNED);
  if (fold_images) {
    tagint max_tag = 0;
    for (int i = 0; i < nlocal; ++i) max_tag = std::max(max_tag, tag[i]);
    if (static_cast<tagint>(tag_to_local.size()) <= max_tag) tag_to_local.resize(max_tag + 1);
    for (int i = 0; i < nlocal; ++i) tag_to_local[tag[i]] = i;
  }
  for (int n = 0; n < n_local_nodes; ++n) {
    const int i = node_to_atom[n];
    const int *jlist = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      if (type_to_species[type[j]] < 0 || !within_cutoff(i, j)) continue;
      if (fold_images) {
        add_edge(i, (j < nlocal) ? j : tag_to_local[tag[j]], j);
        continue;
      }
      if (atom_to_node[j] < 0) {
        atom_to_node[j] = static_cast<int>(node_to_atom.size());
        node_to_atom.push_back(j);
      }
      add_edge(i, j, j);
    }
  }

  const std::size_t nnodes = node_to_atom.size();
  node_positions.resize(3 * nnodes);
  node_species.resize(nnodes);
  for (std::size_t n = 0; n < nnodes; ++n) {
    const int i = node_to_atom[n];
    node_positions[3 * n + 0] = x[i][0];
    node_positions[3 * n + 1] = x[i][1];
    node_positions[3 * n + 2] = x[i][2];
    node_species[n] = type_to_species[type[i]];
  }
  // edge_index [2,E]: senders then receivers, contiguous
  const std::size_t nedges = edge_sender.size();
  edge_index.resize(2 * nedges);
  std::copy(edge_sender.begin(), edge_sender.end(), edge_index.begin());
  std::copy(edge_receiver.begin(), edge_receiver.end(), edge_index.begin() + nedges);
}

/* ----------------------------------------------------------------------
   Non-finite positions or model outputs stop the run on every rank with the first bad atom.
------------------------------------------------------------------------- */

void PairMACE::check_finite(const char *what, tagint bad_tag_local)
{
  tagint bad_tag = 0;
  const tagint mine = bad_tag_local > 0 ? bad_tag_local : std::numeric_limits<tagint>::max();
  MPI_Allreduce(&mine, &bad_tag, 1, MPI_LMP_TAGINT, MPI_MIN, world);
  if (bad_tag != std::numeric_limits<tagint>::max())
    error->all(FLERR,
               "pair_style mace: {} at step {} (first atom ID {}); the simulation has become "
               "unstable: check the start structure for overlapping atoms, reduce the "
               "timestep, or use a model trained on this chemistry",
               what, update->ntimestep, bad_tag);
}

/* ----------------------------------------------------------------------
   Closest neighbour (graph edge) of one atom, for the messages; -1 if it has none.
------------------------------------------------------------------------- */

double PairMACE::nearest_neighbour(int atom_index, tagint &neighbour_tag,
                                   std::string &neighbour_element) const
{
  double best = -1.0;
  int other = -1;
  const double *r = edge_vector.data();
  for (std::size_t e = 0; e < edge_atom_receiver.size(); ++e) {
    const int recv = edge_atom_receiver[e], send = edge_atom_sender[e];
    if (recv != atom_index && send != atom_index) continue;
    const double d2 = r[3 * e] * r[3 * e] + r[3 * e + 1] * r[3 * e + 1] + r[3 * e + 2] * r[3 * e + 2];
    if (best < 0.0 || d2 < best) {
      best = d2;
      other = (recv == atom_index) ? send : recv;
    }
  }
  if (other < 0) return -1.0;
  neighbour_tag = atom->tag[other];
  neighbour_element = type_element[atom->type[other]];
  return std::sqrt(best);
}

/* ----------------------------------------------------------------------
   At the start of a run: refuse atom pairs closer than min_distance, naming the closest.
   The graph edges are every pair within r_max, so this costs one pass over them.
------------------------------------------------------------------------- */

void PairMACE::check_min_distance()
{
  const tagint *tag = atom->tag;
  const double *r = edge_vector.data();
  const double limit2 = min_distance * min_distance;
  struct {
    double d2;
    int rank;
  } mine{std::numeric_limits<double>::max(), comm->me}, closest{};
  bigint count_local = 0, count = 0;
  tagint pair[2] = {0, 0};
  for (std::size_t e = 0; e < edge_atom_receiver.size(); ++e) {
    // Owned receivers only (the ghost graph also links ghosts); each pair once by atom ID.
    if (edge_receiver[e] >= n_local_nodes) continue;
    const double d2 = r[3 * e] * r[3 * e] + r[3 * e + 1] * r[3 * e + 1] + r[3 * e + 2] * r[3 * e + 2];
    if (d2 >= limit2) continue;
    const tagint a = tag[edge_atom_receiver[e]], b = tag[edge_atom_sender[e]];
    if (a > b) continue;
    ++count_local;
    if (d2 < mine.d2) {
      mine.d2 = d2;
      pair[0] = a;
      pair[1] = b;
    }
  }
  MPI_Allreduce(&count_local, &count, 1, MPI_LMP_BIGINT, MPI_SUM, world);
  if (count == 0) return;
  MPI_Allreduce(&mine, &closest, 1, MPI_DOUBLE_INT, MPI_MINLOC, world);
  MPI_Bcast(pair, 2, MPI_LMP_TAGINT, closest.rank, world);
  const double distance = std::sqrt(closest.d2);
  error->all(FLERR,
             "pair_style mace: atoms {} and {} are {:.3f} A apart at step {} ({} pair(s) closer "
             "than min_distance {} A); overlapping atoms make the model's forces meaningless "
             "and the run explodes. Fix the structure (duplicated atoms, wrong cell or units, "
             "atoms placed by hand), or if such pairs are intended lower the limit: "
             "'pair_style mace ... min_distance {:.2f}' (0 turns the check off)",
             pair[0], pair[1], distance, update->ntimestep, count, min_distance,
             0.9 * distance);
}

/* ----------------------------------------------------------------------
   During a run: stop on a force above max_force, naming the atom and its closest neighbour.
   Owned graph: the atoms' full forces. Ghost graph: what this rank adds to each node before
   LAMMPS sums the ghost parts onto their owners, which shows a blow-up just as well.
------------------------------------------------------------------------- */

void PairMACE::check_max_force()
{
  double **f = atom->f;
  struct {
    double f2;
    int rank;
  } mine{0.0, comm->me}, largest{};
  int worst = -1;
  for (std::size_t n = 0; n < node_to_atom.size(); ++n) {
    const int i = node_to_atom[n];
    const double f2 = f[i][0] * f[i][0] + f[i][1] * f[i][1] + f[i][2] * f[i][2];
    if (f2 > mine.f2) {
      mine.f2 = f2;
      worst = i;
    }
  }
  MPI_Allreduce(&mine, &largest, 1, MPI_DOUBLE_INT, MPI_MAXLOC, world);
  if (largest.f2 <= max_force * max_force) return;

  // The rank holding the atom describes it; every rank stops with the same message.
  tagint ids[2] = {0, 0};
  double distance = -1.0;
  std::string element = "?", neighbour_element = "?";
  if (comm->me == largest.rank && worst >= 0) {
    ids[0] = atom->tag[worst];
    element = type_element[atom->type[worst]];
    distance = nearest_neighbour(worst, ids[1], neighbour_element);
  }
  MPI_Bcast(ids, 2, MPI_LMP_TAGINT, largest.rank, world);
  MPI_Bcast(&distance, 1, MPI_DOUBLE, largest.rank, world);
  char symbols[2][8] = {};
  if (comm->me == largest.rank) {
    std::strncpy(symbols[0], element.c_str(), 7);
    std::strncpy(symbols[1], neighbour_element.c_str(), 7);
  }
  MPI_Bcast(&symbols[0][0], 16, MPI_CHAR, largest.rank, world);
  const std::string neighbour =
      distance < 0.0 ? std::string("it has no neighbour within the cutoff")
                     : fmt::format("its closest neighbour, atom {} ({}), is {:.3f} A away", ids[1],
                                   symbols[1], distance);
  error->all(FLERR,
             "pair_style mace: watchdog: a force of {:.4g} eV/A on atom {} ({}) at step {} "
             "exceeds max_force {} eV/A; {}. The run is blowing up; {}. If such forces are "
             "expected, raise the limit: 'pair_style mace ... max_force {:.0f}' (0 turns the "
             "watchdog off)",
             std::sqrt(largest.f2), ids[0], symbols[0], update->ntimestep, max_force, neighbour,
             BLOWUP_CAUSES, 2.0 * std::sqrt(largest.f2));
}

/* ----------------------------------------------------------------------
   The ghost graph's exchanges between layers, through LAMMPS' own communication pattern
   (the one that moves positions to ghosts and ghost forces back), one row per atom.
------------------------------------------------------------------------- */

namespace LAMMPS_NS {

class PairMACEHalo : public umlipft::HaloExchange {
 public:
  explicit PairMACEHalo(PairMACE &pair) : pair(pair) {}

  void forward(int dim, const double *owned, double *ghost) override
  {
    rows(dim);
    double *buffer = pair.halo_rows.data();
    const int nlocal_nodes = pair.n_local_nodes;
    for (int n = 0; n < nlocal_nodes; ++n)
      std::copy(owned + std::size_t(n) * dim, owned + std::size_t(n + 1) * dim,
                buffer + std::size_t(pair.node_to_atom[n]) * dim);
    pair.comm->forward_comm(&pair, dim);
    const int nnodes = static_cast<int>(pair.node_to_atom.size());
    for (int n = nlocal_nodes; n < nnodes; ++n) {
      const double *row = buffer + std::size_t(pair.node_to_atom[n]) * dim;
      std::copy(row, row + dim, ghost + std::size_t(n - nlocal_nodes) * dim);
    }
  }

  void reverse(int dim, const double *ghost, double *owned) override
  {
    rows(dim);
    double *buffer = pair.halo_rows.data();
    std::fill(pair.halo_rows.begin(), pair.halo_rows.end(), 0.0);
    const int nlocal_nodes = pair.n_local_nodes;
    const int nnodes = static_cast<int>(pair.node_to_atom.size());
    for (int n = nlocal_nodes; n < nnodes; ++n)
      std::copy(ghost + std::size_t(n - nlocal_nodes) * dim, ghost + std::size_t(n - nlocal_nodes + 1) * dim,
                buffer + std::size_t(pair.node_to_atom[n]) * dim);
    pair.comm->reverse_comm(&pair, dim);
    for (int n = 0; n < nlocal_nodes; ++n) {
      const double *row = buffer + std::size_t(pair.node_to_atom[n]) * dim;
      double *out = owned + std::size_t(n) * dim;
      for (int d = 0; d < dim; ++d) out[d] += row[d];
    }
  }

 private:
  PairMACE &pair;

  void rows(int dim)
  {
    if (dim > pair.comm_forward)
      pair.error->one(FLERR, "pair_style mace: a layer exchanges {} values per atom, more than the {} "
                             "the communication buffers were sized for; export the model again",
                      dim, pair.comm_forward);
    pair.halo_dim = dim;
    pair.halo_rows.resize(std::size_t(pair.atom->nlocal + pair.atom->nghost) * dim);
  }
};

}    // namespace LAMMPS_NS

int PairMACE::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/)
{
  // Node features are invariant under translation: a periodic image gets its owner's row.
  const int dim = halo_dim;
  int m = 0;
  for (int k = 0; k < n; ++k) {
    const double *row = halo_rows.data() + std::size_t(list[k]) * dim;
    for (int d = 0; d < dim; ++d) buf[m++] = row[d];
  }
  return m;
}

void PairMACE::unpack_forward_comm(int n, int first, double *buf)
{
  const int dim = halo_dim;
  std::copy(buf, buf + std::size_t(n) * dim, halo_rows.data() + std::size_t(first) * dim);
}

int PairMACE::pack_reverse_comm(int n, int first, double *buf)
{
  const int dim = halo_dim;
  std::copy(halo_rows.data() + std::size_t(first) * dim, halo_rows.data() + std::size_t(first + n) * dim, buf);
  return n * dim;
}

void PairMACE::unpack_reverse_comm(int n, int *list, double *buf)
{
  const int dim = halo_dim;
  int m = 0;
  for (int k = 0; k < n; ++k) {
    double *row = halo_rows.data() + std::size_t(list[k]) * dim;
    for (int d = 0; d < dim; ++d) row[d] += buf[m++];
  }
}

/* ----------------------------------------------------------------------
   Once per run: how many nodes each rank evaluates, to read the ghost redundancy off the log.
------------------------------------------------------------------------- */

void PairMACE::report_node_counts()
{
  const double owned = n_local_nodes;
  const double ghost = static_cast<double>(node_to_atom.size()) - n_local_nodes;
  const double ratio = owned > 0 ? ghost / owned : 0.0;
  double mine[3] = {owned, ghost, ratio}, low[3], high[3], sum[3];
  MPI_Allreduce(mine, low, 3, MPI_DOUBLE, MPI_MIN, world);
  MPI_Allreduce(mine, high, 3, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(mine, sum, 3, MPI_DOUBLE, MPI_SUM, world);
  const int p = comm->nprocs;
  if (comm->me == 0)
    utils::logmesg(lmp,
                   "pair_style mace: nodes per rank (min/avg/max) on {} rank(s): owned {:.0f}/{:.1f}/{:.0f}, "
                   "ghost {:.0f}/{:.1f}/{:.0f}, ghost/owned {:.3f}/{:.3f}/{:.3f} ({:.0f} owned in all)\n",
                   p, low[0], sum[0] / p, high[0], low[1], sum[1] / p, high[1], low[2], sum[2] / p, high[2],
                   sum[0]);
}

/* ---------------------------------------------------------------------- */

void PairMACE::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  {
    double **x = atom->x;
    const tagint *tag = atom->tag;
    tagint bad = 0;
    for (int i = 0; i < atom->nlocal && bad == 0; ++i)
      if (!std::isfinite(x[i][0]) || !std::isfinite(x[i][1]) || !std::isfinite(x[i][2]))
        bad = tag[i];
    check_finite("non-finite (NaN or infinite) atom position", bad);
  }

  build_graph();
  // setupflag: the force call that starts each run (and 'run 0'), before any step is taken.
  if (update->setupflag && min_distance > 0.0) check_min_distance();
  if (update->setupflag) report_node_counts();
  const int64_t nnodes = static_cast<int64_t>(node_to_atom.size());
  const int64_t nedges = static_cast<int64_t>(edge_sender.size());

  umlipft::Graph graph;
  graph.nnodes = nnodes;
  graph.nlocal = n_local_nodes;
  graph.nedges = nedges;
  graph.species = node_species.data();
  graph.edge_index = edge_index.data();
  graph.positions = node_positions.data();
  graph.shifts = edge_shift.data();
  graph.vectors = edge_vector.data();
  try {
    if (active_mode == GraphMode::GHOST) {
      PairMACEHalo halo(*this);
      model->evaluate_layered(graph, halo);
    } else if (nnodes > 0) {
      model->evaluate(graph);
    }
  } catch (const umlipft::ModelError &err) {
    error->one(FLERR, "pair_style mace: the model failed at step {}: {}", update->ntimestep, err.what());
  }
  const double energy = nnodes > 0 ? model->energy() : 0.0;
  const double *node_energy = nnodes > 0 ? model->node_energy() : nullptr;
  const double *edge_gradient = nedges > 0 ? model->edge_gradient() : nullptr;

  {
    tagint bad = 0;
    if (nnodes > 0 && !std::isfinite(energy)) bad = atom->tag[node_to_atom[0]];
    if (nedges > 0 && bad == 0) {
      const double *g = edge_gradient;
      for (int64_t e = 0; e < nedges && bad == 0; ++e)
        if (!std::isfinite(g[3 * e]) || !std::isfinite(g[3 * e + 1]) || !std::isfinite(g[3 * e + 2]))
          bad = atom->tag[edge_atom_receiver[e]];
    }
    check_finite("the model returned a non-finite energy or force", bad);
  }
  force_step = update->ntimestep;
  if (nnodes == 0) {
    if (watchdog_active()) check_max_force();    // collective
    return;
  }

  if (eflag_global) eng_vdwl += energy;
  if (eflag_atom) {
    for (int n = 0; n < n_local_nodes; ++n) eatom[node_to_atom[n]] += node_energy[n];
  }

  double **f = atom->f;
  const double *g = edge_gradient;
  const double *r = edge_vector.data();
  for (int64_t e = 0; e < nedges; ++e) {
    const double gx = g[3 * e], gy = g[3 * e + 1], gz = g[3 * e + 2];
    const int recv = edge_atom_receiver[e];
    const int send = edge_atom_sender[e];
    // E depends on the edge vector x_recv - x_send: the receiver feels -g, the sender +g.
    f[recv][0] -= gx;
    f[recv][1] -= gy;
    f[recv][2] -= gz;
    f[send][0] += gx;
    f[send][1] += gy;
    f[send][2] += gz;
    if (vflag_either) {
      const double rx = r[3 * e], ry = r[3 * e + 1], rz = r[3 * e + 2];
      const double v[6] = {-rx * gx, -ry * gy, -rz * gz, -rx * gy, -rx * gz, -ry * gz};
      if (vflag_global)
        for (int k = 0; k < 6; ++k) virial[k] += v[k];
      if (vflag_atom)
        for (int k = 0; k < 6; ++k) {
          vatom[recv][k] += 0.5 * v[k];
          vatom[send][k] += 0.5 * v[k];
        }
    }
  }

  if (watchdog_active()) check_max_force();
}

/* ----------------------------------------------------------------------
   The force watchdog guards dynamics, including the forces of the first step's setup (they
   give the first kick); a single point ('run 0') or a minimisation may hold any forces.
------------------------------------------------------------------------- */

bool PairMACE::watchdog_active() const
{
  if (max_force <= 0.0) return false;
  return !update->setupflag || (update->whichflag == 1 && update->nsteps > 0);
}

/* ---------------------------------------------------------------------- */

const std::string &PairMACE::watch_json() const
{
  static const std::string none;
  return model ? model->metadata().watch_json : none;
}

const std::vector<int> &PairMACE::layer_feature_dims() const
{
  static const std::vector<int> none;
  return model ? model->metadata().layer_feature_dims : none;
}

void PairMACE::owned_node_features(const std::vector<int64_t> &columns, std::vector<double> &rows,
                                   std::vector<int> &atoms) const
{
  atoms.assign(node_to_atom.begin(), node_to_atom.begin() + n_local_nodes);
  if (n_local_nodes == 0 || !model) {
    rows.clear();
    return;
  }
  model->node_features(columns, rows);
}

/* ---------------------------------------------------------------------- */

double PairMACE::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += sizeof(int) * (atom_to_node.capacity() + node_to_atom.capacity() +
                          tag_to_local.capacity() +
                          edge_atom_sender.capacity() + edge_atom_receiver.capacity());
  bytes += sizeof(double) * (node_positions.capacity() + edge_shift.capacity() +
                             edge_vector.capacity());
  bytes += sizeof(int64_t) * (node_species.capacity() + edge_sender.capacity() +
                              edge_receiver.capacity() + edge_index.capacity());
  return bytes;
}
