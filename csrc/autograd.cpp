// Autograd of the fused op pair, in C++ (the host path of a training step).
//
// nuwa_kernels::na3d_fwd's Autograd kernel: the forward runs the device kernel below autograd and saves
// (query, key, value, out, lse); the backward forms delta = rowsum(dO * O) - dLSE (na3d_delta) and runs
// na3d_bwd, FlashAttention style. CPU tensors that need gradients take na3d_fwd_probs / na3d_bwd_probs
// instead: the CPU kernel also keeps the probabilities of small windows, and the backward skips the
// scores' recomputation and forms delta itself (sum of P dP over the window, minus dLSE). Under grad mode
// (create_graph=True: a gradient penalty, double backward) the backward instead calls
// na3d_bwd_recompute, whose CompositeImplicitAutograd kernel is the Python reference's differentiable
// recomputation (nuwa_kernels/backends/_fused_ops.py), so second order is exact. A Python
// autograd.Function on this path costs tens of microseconds a call (benchmarks/host_overhead.py); this
// costs a few. Every call goes through the dispatcher, so
// torch.compile traces the same formula with the ops' fake kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace nuwa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  at::IntArrayRef, c10::List<bool>, bool, bool, at::IntArrayRef,
                                                  at::IntArrayRef, double);
using FwdProbsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, at::IntArrayRef, c10::List<bool>,
                                                                   bool, bool, at::IntArrayRef, at::IntArrayRef, double);
using BwdProbsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef, c10::List<bool>, bool, bool,
    at::IntArrayRef, at::IntArrayRef, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              at::IntArrayRef, c10::List<bool>, bool, bool,
                                                              at::IntArrayRef, at::IntArrayRef, double);
using RecomputeSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::IntArrayRef, c10::List<bool>, bool, bool, at::IntArrayRef, at::IntArrayRef,
    double);
using DeltaSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The window arguments of one call, kept on the autograd node.
struct WindowArgs {
  std::vector<int64_t> kernel_size;
  c10::List<bool> causal_axes;
  bool raster_causal;
  bool shift_border;
  std::vector<int64_t> stride;
  std::vector<int64_t> slab;
  double scale;
  bool keep_probs;  // CPU tensors that need gradients: na3d_fwd_probs, whose probabilities na3d_bwd_probs reads
};

class Na3dFunction : public torch::autograd::Function<Na3dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, WindowArgs args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op<FwdSig>("nuwa_kernels::na3d_fwd");
    static auto fwd_probs = op<FwdProbsSig>("nuwa_kernels::na3d_fwd_probs");
    at::Tensor out, lse, probs;  // probs: undefined, or (possibly empty) the CPU kernel's probabilities
    if (args.keep_probs)
      std::tie(out, lse, probs) = fwd_probs.call(query, key, value, args.kernel_size, args.causal_axes,
                                                 args.raster_causal, args.shift_border, args.stride, args.slab,
                                                 args.scale);
    else
      std::tie(out, lse) = fwd.call(query, key, value, args.kernel_size, args.causal_axes, args.raster_causal,
                                    args.shift_border, args.stride, args.slab, args.scale);
    ctx->save_for_backward({query, key, value, out, lse, probs});
    ctx->set_materialize_grads(false);
    ctx->saved_data["kernel_size"] = args.kernel_size;
    ctx->saved_data["causal_axes"] = args.causal_axes;
    ctx->saved_data["raster_causal"] = args.raster_causal;
    ctx->saved_data["shift_border"] = args.shift_border;
    ctx->saved_data["stride"] = args.stride;
    ctx->saved_data["slab"] = args.slab;
    ctx->saved_data["scale"] = args.scale;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor& probs = saved[5];
    at::Tensor grad_out = grads[0];
    const at::Tensor& grad_lse = grads[1];
    variable_list result(4);  // dq, dk, dv, and nothing for the window arguments
    if (!grad_out.defined() && !grad_lse.defined()) return result;
    const std::vector<int64_t> kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const c10::List<bool> causal_axes = ctx->saved_data["causal_axes"].toBoolList();
    const bool raster = ctx->saved_data["raster_causal"].toBool();
    const bool shift = ctx->saved_data["shift_border"].toBool();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> slab = ctx->saved_data["slab"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const std::optional<at::Tensor> glse = grad_lse.defined() ? std::optional<at::Tensor>(grad_lse) : std::nullopt;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate a recomputation (exact 2nd order)
      static auto recompute = op<RecomputeSig>("nuwa_kernels::na3d_bwd_recompute");
      const std::optional<at::Tensor> gout = grad_out.defined() ? std::optional<at::Tensor>(grad_out) : std::nullopt;
      std::tie(result[0], result[1], result[2]) =
          recompute.call(query, key, value, gout, glse, kernel_size, causal_axes, raster, shift, stride, slab, scale);
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto delta_op = op<DeltaSig>("nuwa_kernels::na3d_delta");
    static auto bwd = op<BwdSig>("nuwa_kernels::na3d_bwd");
    if (!grad_out.defined()) grad_out = at::zeros_like(out);
    if (probs.defined() && probs.numel() > 0) {  // forms delta from P and dP itself: no pass over O
      static auto bwd_probs = op<BwdProbsSig>("nuwa_kernels::na3d_bwd_probs");
      std::tie(result[0], result[1], result[2]) = bwd_probs.call(grad_out, query, key, value, lse, glse, probs,
                                                                 kernel_size, causal_axes, raster, shift, stride,
                                                                 slab, scale);
      return result;
    }
    const at::Tensor delta = delta_op.call(grad_out, out, glse);
    std::tie(result[0], result[1], result[2]) =
        bwd.call(grad_out, query, key, value, lse, delta, kernel_size, causal_axes, raster, shift, stride, slab, scale);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> na3d_fwd_autograd(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, at::IntArrayRef kernel_size,
                                                     c10::List<bool> causal_axes, bool raster_causal,
                                                     bool shift_border, at::IntArrayRef stride, at::IntArrayRef slab,
                                                     double scale) {
  const bool needs_grad =
      at::GradMode::is_enabled() && (query.requires_grad() || key.requires_grad() || value.requires_grad());
  WindowArgs args{kernel_size.vec(), causal_axes,  raster_causal, shift_border,
                  stride.vec(),      slab.vec(),   scale,         needs_grad && query.is_cpu()};
  variable_list outs = Na3dFunction::apply(query, key, value, std::move(args));
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace nuwa

TORCH_LIBRARY_IMPL(nuwa_kernels, Autograd, m) { m.impl("na3d_fwd", &nuwa::na3d_fwd_autograd); }
