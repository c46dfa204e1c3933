/* ----------------------------------------------------------------------
   umlipft: the file LAMMPS auto-loads (its name ends in plugin.so).
   SPDX-License-Identifier: GPL-2.0-or-later

   liblammps exports a bundled reference BLAS (dgemm_ ...). Loaded normally, libtorch's float64
   matrix products would bind to it (about 1.6x slower). This loader opens the real pair style
   library with RTLD_DEEPBIND, so it and libtorch resolve symbols in their own dependencies
   first, with no environment variable needed from the user.
------------------------------------------------------------------------- */

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {
constexpr const char *IMPLEMENTATION = "libumlipft_pair_mace.so";
using register_function = void (*)(void *, void *, void *);

std::string own_directory()
{
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&own_directory), &info) == 0 || !info.dli_fname) return ".";
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}
}    // namespace

extern "C" __attribute__((visibility("default"))) void lammpsplugin_init(void *lmp, void *handle,
                                                                          void *regfunc)
{
  const std::string path = own_directory() + "/" + IMPLEMENTATION;
  // UMLIPFT_NO_DEEPBIND=1 reproduces the slow BLAS binding for the benchmark's comparison.
  const char *no_deepbind = std::getenv("UMLIPFT_NO_DEEPBIND");
  int flags = RTLD_NOW | RTLD_LOCAL;
  if (!(no_deepbind && std::strcmp(no_deepbind, "1") == 0)) flags |= RTLD_DEEPBIND;
  void *impl = dlopen(path.c_str(), flags);
  if (!impl) {
    std::fprintf(stderr,
                 "ERROR: umlipft pair_style mace could not load %s: %s\n"
                 "Reinstall umlipft (pip install --no-build-isolation .) in the environment "
                 "that provides this lmp.\n",
                 path.c_str(), dlerror());
    return;
  }
  auto reg = reinterpret_cast<register_function>(dlsym(impl, "umlipft_pair_mace_register"));
  if (!reg) {
    std::fprintf(stderr, "ERROR: %s has no umlipft_pair_mace_register entry point\n", path.c_str());
    return;
  }
  reg(lmp, handle, regfunc);
}
