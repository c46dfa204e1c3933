/* ----------------------------------------------------------------------
   umlipft: a TorchScript-exported MACE model as pair_style mace evaluates it.
   SPDX-License-Identifier: GPL-2.0-or-later

   Two evaluations of one export (see python/umlipft/models/lammps_module.py):

   - evaluate(): the module's forward on the owned-atom graph of a single rank (periodic
     images folded onto their owners as edge shifts); it returns dE/d(edge vector) itself.
   - evaluate_layered(): several ranks, each holding its owned atoms plus ghosts within one
     cutoff. Layer t updates the owned nodes only; before layer t+1, the ghosts' features are
     copied from their owners (HaloExchange::forward). The backward pass runs layer by layer
     from the top: the gradient that lands on ghost features is added to the owners
     (HaloExchange::reverse) before that layer's own backward. The edge-embedding gradients
     of all layers are collected and taken back to the edge vectors once at the end.
------------------------------------------------------------------------- */

#include "mace_model.h"

#include "json.h"

#include <torch/cuda.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>

#include <fstream>

using namespace umlipft;

namespace {

constexpr const char *METADATA_NAME = "umlipft.json";
constexpr const char *WATCH_NAME = "umlipft_watch.json";
constexpr const char *FORMAT_NAME = "umlipft-mace-lammps";
constexpr int FORMAT_VERSION = 2;

// The cause in a libtorch error: TorchScript wraps it in a traceback whose last line reads
// "RuntimeError: <cause>"; plain c10 errors start with it.
std::string error_cause(const std::string &what)
{
  std::vector<std::string> lines;
  std::size_t begin = 0;
  while (begin <= what.size()) {
    const auto end = what.find('\n', begin);
    lines.push_back(what.substr(begin, end == std::string::npos ? std::string::npos : end - begin));
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    const auto at = it->find("Error: ");
    if (at != std::string::npos && it->rfind("  ", 0) != 0) return it->substr(at + 7);
  }
  return lines.empty() ? what : lines.front();
}

}    // namespace

struct MACEModel::Impl {
  torch::jit::Module module;
  torch::Device device = torch::kCPU;
  torch::Dtype dtype = torch::kFloat64;
  torch::Tensor node_energy, edge_gradient;    // float64, CPU, contiguous
  torch::Tensor node_features;                 // owned nodes, model dtype and device (kept, not copied)

  // Host copies of one layer's owned features / ghost rows, reused between steps.
  std::vector<double> owned_rows, ghost_rows;

  torch::Tensor floats(const double *data, int64_t rows, int64_t cols) const
  {
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    return torch::from_blob(const_cast<double *>(data), {rows, cols}, f64).to(device, dtype);
  }
  torch::Tensor longs(const int64_t *data, c10::IntArrayRef shape) const
  {
    return torch::from_blob(const_cast<int64_t *>(data), shape, torch::kInt64).to(device);
  }
  static torch::Tensor host(const torch::Tensor &t)
  {
    return t.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  }
};

MACEModel::MACEModel() : impl(std::make_unique<Impl>()) {}
MACEModel::~MACEModel() = default;

const double *MACEModel::node_energy() const
{
  return impl->node_energy.defined() ? impl->node_energy.data_ptr<double>() : nullptr;
}

const double *MACEModel::edge_gradient() const
{
  return impl->edge_gradient.defined() ? impl->edge_gradient.data_ptr<double>() : nullptr;
}

int MACEModel::cuda_device_count()
{
  return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
}

/* ---------------------------------------------------------------------- */

std::unique_ptr<MACEModel> MACEModel::load(const std::string &path, int device_index)
{
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe.good()) throw ModelError("cannot open model file '" + path + "'");
  }
  std::unique_ptr<MACEModel> model(new MACEModel());
  auto &impl = *model->impl;
  torch::jit::ExtraFilesMap extra{{METADATA_NAME, ""}, {WATCH_NAME, ""}};
  try {
    impl.device = device_index < 0 ? torch::Device(torch::kCPU)
                                   : torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    impl.module = torch::jit::load(path, impl.device, extra);
  } catch (const std::exception &err) {
    throw ModelError("'" + path + "' is not a TorchScript model file (" + error_cause(err.what()) + ")");
  }
  if (extra[METADATA_NAME].empty())
    throw ModelError("'" + path + "' was not written by umlipft export (no " + METADATA_NAME +
                     " inside; a file from mace's create_lammps_model or a raw .model will not do)");
  auto &meta = model->meta;
  try {
    const auto json = LAMMPS_NS::json::parse(extra[METADATA_NAME]);
    if (json.value("format", std::string()) != FORMAT_NAME)
      throw ModelError("'" + path + "' is not a umlipft MACE export");
    meta.format_version = json.value("format_version", 1);
    if (meta.format_version != FORMAT_VERSION)
      throw ModelError("'" + path + "' is an export of format version " + std::to_string(meta.format_version) +
                       " and this plugin reads version " + std::to_string(FORMAT_VERSION) +
                       "; export the model again with this umlipft");
    meta.r_max = json.at("r_max").get<double>();
    meta.num_interactions = json.at("num_interactions").get<int>();
    meta.atomic_numbers = json.at("atomic_numbers").get<std::vector<int>>();
    meta.dtype_name = json.at("dtype").get<std::string>();
    meta.head = json.value("head", std::string("Default"));
    meta.layered = json.value("layered", false);
    meta.layered_unsupported = json.value("layered_unsupported", std::string("not recorded in the export"));
    if (meta.layered) meta.layer_feature_dims = json.at("layer_feature_dims").get<std::vector<int>>();
    meta.watch_json = extra[WATCH_NAME];
  } catch (const LAMMPS_NS::json::exception &err) {
    throw ModelError("metadata of '" + path + "' is incomplete (" + err.what() + ")");
  }
  if (meta.dtype_name == "float32")
    impl.dtype = torch::kFloat32;
  else if (meta.dtype_name == "float64")
    impl.dtype = torch::kFloat64;
  else
    throw ModelError("'" + path + "' has unsupported dtype '" + meta.dtype_name + "'");
  if (meta.layered && static_cast<int>(meta.layer_feature_dims.size()) != meta.num_interactions)
    throw ModelError("metadata of '" + path + "' gives " + std::to_string(meta.layer_feature_dims.size()) +
                     " layer widths for " + std::to_string(meta.num_interactions) + " interactions");
  impl.module.eval();
  // The profiling executor spends the first calls re-optimising the graph (seconds each);
  // the plain executor is as fast in steady state.
  torch::jit::setGraphExecutorOptimize(false);
  return model;
}

/* ---------------------------------------------------------------------- */

void MACEModel::evaluate(const Graph &g)
{
  auto &m = *impl;
  try {
    torch::Tensor positions = m.floats(g.positions, g.nnodes, 3);
    torch::Tensor species = m.longs(g.species, {g.nnodes});
    torch::Tensor edges = m.longs(g.edge_index, {2, g.nedges});
    torch::Tensor shifts = m.floats(g.shifts, g.nedges, 3);
    std::vector<torch::jit::IValue> inputs{positions, species, edges, shifts, g.nlocal};
    auto out = m.module.forward(inputs).toTuple();
    energy_ = out->elements()[0].toTensor().item<double>();
    m.node_energy = Impl::host(out->elements()[1].toTensor());
    m.edge_gradient = Impl::host(out->elements()[2].toTensor());
    if (out->elements().size() > 3) m.node_features = out->elements()[3].toTensor();
  } catch (const ModelError &) {
    throw;
  } catch (const std::exception &err) {
    throw ModelError(error_cause(err.what()));
  }
}

/* ---------------------------------------------------------------------- */

void MACEModel::evaluate_layered(const Graph &g, HaloExchange &halo)
{
  auto &m = *impl;
  const int layers = meta.num_interactions;
  const int64_t nghost = g.nnodes - g.nlocal;
  const auto &dims = meta.layer_feature_dims;

  // A rank without nodes still takes part in every exchange: they are collective.
  if (g.nnodes == 0) {
    for (int t = 0; t + 1 < layers; ++t) halo.forward(dims[t], nullptr, nullptr);
    for (int t = layers - 1; t > 0; --t) halo.reverse(dims[t - 1], nullptr, nullptr);
    energy_ = 0.0;
    m.node_energy = torch::zeros({0}, torch::kFloat64);
    m.edge_gradient = torch::zeros({0, 3}, torch::kFloat64);
    m.node_features = torch::zeros({0, 0}, torch::kFloat64);
    return;
  }

  try {
    torch::Tensor vectors = m.floats(g.vectors, g.nedges, 3).requires_grad_(true);
    torch::Tensor species = m.longs(g.species, {g.nnodes});
    torch::Tensor edges = m.longs(g.edge_index, {2, g.nedges});

    auto embedded = m.module.get_method("embed")({species, g.nlocal}).toTuple();
    const torch::Tensor node_attrs = embedded->elements()[0].toTensor();
    const torch::Tensor node_e0 = embedded->elements()[2].toTensor();
    auto edge = m.module.get_method("edge_embedding")({vectors, node_attrs, edges, g.nlocal}).toTuple();
    const torch::Tensor edge_attrs = edge->elements()[0].toTensor();
    const torch::Tensor edge_feats = edge->elements()[1].toTensor();
    const torch::jit::IValue cutoff = edge->elements()[2];
    const torch::Tensor pair_energy =
        m.module.get_method("scale_energy")({edge->elements()[3].toTensor()}).toTensor();

    std::vector<torch::Tensor> inputs(layers), outputs(layers), energies(layers);
    inputs[0] = embedded->elements()[1].toTensor();
    auto layer = m.module.get_method("interaction_layer");
    for (int t = 0; t < layers; ++t) {
      auto out = layer({static_cast<int64_t>(t), inputs[t], node_attrs, edge_attrs, edge_feats, cutoff,
                        edges, g.nlocal})
                     .toTuple();
      outputs[t] = out->elements()[0].toTensor();
      energies[t] = out->elements()[1].toTensor();
      if (t + 1 == layers) break;
      const int dim = dims[t];
      const torch::Tensor owned = Impl::host(outputs[t]);
      m.ghost_rows.resize(static_cast<std::size_t>(nghost) * dim);
      halo.forward(dim, owned.data_ptr<double>(), m.ghost_rows.data());
      const torch::Tensor ghosts = m.floats(m.ghost_rows.data(), nghost, dim);
      inputs[t + 1] = torch::cat({outputs[t].detach(), ghosts}).requires_grad_(true);
    }

    m.node_features = torch::cat(outputs, 1).detach();
    torch::Tensor node_energy = node_e0 + pair_energy;
    for (const auto &e : energies) node_energy = node_energy + e;
    m.node_energy = Impl::host(node_energy);
    energy_ = m.node_energy.sum().item<double>();

    // Backward, top layer first. upstream = dE/d(owned outputs of layer t) through the layers
    // above it, ghost images included.
    std::vector<torch::Tensor> edge_inputs{edge_attrs, edge_feats};
    if (cutoff.isTensor()) edge_inputs.push_back(cutoff.toTensor());
    std::vector<torch::Tensor> edge_grads(edge_inputs.size());
    torch::Tensor upstream;
    for (int t = layers - 1; t >= 0; --t) {
      std::vector<torch::Tensor> outs{energies[t]}, grad_outs{torch::ones_like(energies[t])};
      if (upstream.defined()) {
        outs.push_back(outputs[t]);
        grad_outs.push_back(upstream);
      }
      std::vector<torch::Tensor> wrt(edge_inputs);
      if (t > 0) wrt.push_back(inputs[t]);
      auto grads = torch::autograd::grad(outs, wrt, grad_outs, /*retain_graph=*/true,
                                         /*create_graph=*/false, /*allow_unused=*/true);
      for (std::size_t k = 0; k < edge_inputs.size(); ++k)
        if (grads[k].defined()) edge_grads[k] = edge_grads[k].defined() ? edge_grads[k] + grads[k] : grads[k];
      if (t == 0) break;
      const int dim = dims[t - 1];
      torch::Tensor g_in = grads.back();
      if (!g_in.defined()) g_in = torch::zeros_like(inputs[t]);
      torch::Tensor g_host = Impl::host(g_in);
      m.owned_rows.assign(g_host.data_ptr<double>(), g_host.data_ptr<double>() + g.nlocal * dim);
      halo.reverse(dim, g_host.data_ptr<double>() + g.nlocal * dim, m.owned_rows.data());
      upstream = m.floats(m.owned_rows.data(), g.nlocal, dim);
    }

    std::vector<torch::Tensor> outs, grad_outs;
    if (pair_energy.requires_grad()) {
      outs.push_back(pair_energy.sum());
      grad_outs.push_back(torch::ones({}, pair_energy.options()));
    }
    for (std::size_t k = 0; k < edge_inputs.size(); ++k)
      if (edge_grads[k].defined()) {
        outs.push_back(edge_inputs[k]);
        grad_outs.push_back(edge_grads[k]);
      }
    torch::Tensor gradient;
    if (!outs.empty())
      gradient = torch::autograd::grad(outs, {vectors}, grad_outs, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true)[0];
    m.edge_gradient = gradient.defined() ? Impl::host(gradient) : torch::zeros({g.nedges, 3}, torch::kFloat64);
  } catch (const ModelError &) {
    throw;
  } catch (const std::exception &err) {
    throw ModelError(error_cause(err.what()));
  }
}

/* ---------------------------------------------------------------------- */

void MACEModel::node_features(const std::vector<int64_t> &columns, std::vector<double> &out) const
{
  const auto &features = impl->node_features;
  if (!features.defined() || features.size(0) == 0) {
    out.clear();
    return;
  }
  const auto index = torch::from_blob(const_cast<int64_t *>(columns.data()),
                                      {static_cast<int64_t>(columns.size())}, torch::kInt64)
                         .to(features.device());
  const torch::Tensor picked = Impl::host(features.index_select(1, index));
  out.assign(picked.data_ptr<double>(), picked.data_ptr<double>() + picked.numel());
}
