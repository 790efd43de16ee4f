// bn_relu_conv2d: conv2d(relu(batch_norm(u))) as one op whose autograd saves u and the per-channel vectors, not
// the convolution's input r. Forward: bn_relu_forward, then ATen's convolution (oneDNN on the CPU, cuDNN on CUDA),
// registered once for every backend (CompositeExplicitAutograd, which also serves meta and fake tensors).
// Backward (C++ autograd kernel): r recomputed with bn_relu_apply, the convolution's backward, then the BN-ReLU
// backward shared with bn_relu_forward (bn_relu_grads).
// Mixed precision: BatchNorm runs in u's dtype and the convolution in conv_dtype when given, else in conv_weight's,
// which may be float16 or bfloat16 for float32 u (r is rounded to it, as autocast rounds r before a convolution).
// The Autocast kernels cast only the convolution's operands, and by passing conv_dtype rather than cast tensors:
// the op casts conv_weight and conv_bias itself (channels_last for channels_last u, in the same copy), saves the
// cast weight for its backward and returns their gradients in their own dtype, where autocast's casts would each
// add an autograd node, and a layout copy in forward and backward. F.batch_norm is on none of autocast's lists, so
// its input, parameters and running statistics (updated in place) keep their dtypes there too.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd_utils.h"
#include "ops/bn_relu_autograd.h"
#include "ops/common.h"

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  m.def(
      "bn_relu_conv2d(Tensor u, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, Tensor conv_weight, Tensor? conv_bias, int padding, "
      "ScalarType? conv_dtype=None) -> Tensor");
}

namespace fused_hourglass {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
// Every check of fused_hourglass/ops/bn_relu_conv.py's wrapper on the convolution's operands, with its messages,
// made before the BatchNorm updates any running statistic (so a call that fails changes nothing).
void check_conv_args(const at::Tensor& u, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                     int64_t padding, std::optional<at::ScalarType> conv_dtype) {
  constexpr const char* op = "bn_relu_conv2d";
  check_4d_float(u, op, "u");
  check_4d_float(conv_weight, op, "conv_weight");
  TORCH_CHECK_VALUE(conv_weight.device() == u.device(), op, ": u and conv_weight must be on the same device, got u on ",
                    u.device(), " and conv_weight on ", conv_weight.device());
  const at::ScalarType ut = u.scalar_type(), ct = conv_dtype.value_or(conv_weight.scalar_type());
  TORCH_CHECK_TYPE(ct == ut || ((ct == at::kHalf || ct == at::kBFloat16) && ut != at::kDouble), op,
                   conv_dtype.has_value() ? ": conv_dtype must be " : ": conv_weight must be ", dtype_name(ut),
                   " (u's dtype), or float16/bfloat16 for a lower-precision convolution, got ", dtype_name(ct));
  TORCH_CHECK_VALUE(conv_weight.size(1) == u.size(1), op, ": conv_weight must have ", u.size(1),
                    " input channels (the channels of u), got shape ", shape_str(conv_weight));
  if (conv_bias.has_value()) {
    TORCH_CHECK_VALUE(conv_bias->device() == u.device(), op, ": u and conv_bias must be on the same device, got u on ",
                      u.device(), " and conv_bias on ", conv_bias->device());
    TORCH_CHECK_TYPE(conv_bias->scalar_type() == conv_weight.scalar_type(), op,
                     ": conv_bias must have conv_weight's dtype ", dtype_name(conv_weight.scalar_type()), ", got ",
                     dtype_name(conv_bias->scalar_type()));
    TORCH_CHECK_VALUE(conv_bias->dim() == 1 && conv_bias->size(0) == conv_weight.size(0), op,
                      ": conv_bias must be 1-D with ", conv_weight.size(0),
                      " elements (conv_weight's output channels), got shape ", shape_str(*conv_bias));
  }
  TORCH_CHECK_VALUE(padding >= 0, op, ": padding must be an int >= 0, got ", padding);
  const int64_t kh = conv_weight.size(2), kw = conv_weight.size(3);
  TORCH_CHECK_VALUE(u.size(2) + 2 * padding >= kh && u.size(3) + 2 * padding >= kw, op, ": the ", kh, "x", kw,
                    " conv_weight does not fit u's ", u.size(2), "x", u.size(3), " planes with padding ", padding);
}

// The convolution's input: r, rounded to the convolution's dtype when that is lower than u's.
at::Tensor conv_input(const at::Tensor& r, const at::Tensor& conv_weight) {
  return r.scalar_type() == conv_weight.scalar_type() ? r : r.to(conv_weight.scalar_type());
}

at::Tensor conv(const at::Tensor& r, const at::Tensor& conv_weight, const OptTensor& conv_bias, int64_t padding) {
  return at::convolution(conv_input(r, conv_weight), conv_weight, conv_bias, {1, 1}, {padding, padding}, {1, 1},
                         false, {0, 0}, 1);
}

// t in dtype `dt` and, unless `fmt` is Preserve, memory format `fmt`: t itself when it already is (never an alias
// through aten::to, which an op below autograd must not return or pass on as a fresh tensor).
at::Tensor converted(const at::Tensor& t, at::ScalarType dt, at::MemoryFormat fmt) {
  if (t.scalar_type() == dt && (fmt == at::MemoryFormat::Preserve || t.is_contiguous(fmt))) return t;
  return t.to(dt, false, true, fmt);
}

// The weight and bias as the convolution runs them: in `conv_dtype` when given (the op casts them itself, so that
// autocast records no cast of its own and the weight gradient comes back in conv_weight's dtype), and the weight
// channels_last for channels_last activations, which oneDNN and cuDNN would otherwise copy it to on every call.
// Nothing is copied when both already hold.
std::pair<at::Tensor, OptTensor> run_operands(const at::Tensor& u, const at::Tensor& conv_weight,
                                              const OptTensor& conv_bias, std::optional<at::ScalarType> conv_dtype) {
  const at::ScalarType dt = conv_dtype.value_or(conv_weight.scalar_type());
  const bool channels_last = output_memory_format(u) == at::MemoryFormat::ChannelsLast;
  const at::MemoryFormat fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Preserve;
  at::Tensor w = converted(conv_weight, dt, fmt);
  OptTensor b;
  if (conv_bias.has_value()) b = converted(*conv_bias, dt, at::MemoryFormat::Preserve);
  return {std::move(w), std::move(b)};
}

// Without autograd (every backend, meta and fake tensors included).
at::Tensor bn_relu_conv2d_composite(const at::Tensor& u, const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                    double momentum, double eps, const at::Tensor& conv_weight,
                                    const OptTensor& conv_bias, int64_t padding,
                                    std::optional<at::ScalarType> conv_dtype) {
  check_conv_args(u, conv_weight, conv_bias, padding, conv_dtype);
  const at::Tensor r =
      std::get<0>(call_bn_relu_forward(u, weight, bias, running_mean, running_var, training, momentum, eps));
  const auto [w, b] = run_operands(u, conv_weight, conv_bias, conv_dtype);
  return conv(r, w, b, padding);
}

class BnReLUConvFunction : public torch::autograd::Function<BnReLUConvFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps, const at::Tensor& conv_weight,
                               const OptTensor& conv_bias, int64_t padding,
                               std::optional<at::ScalarType> conv_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_conv_args(u, conv_weight, conv_bias, padding, conv_dtype);
    auto [r, scale, shift, mean, invstd] =
        call_bn_relu_forward(u, weight, bias, running_mean, running_var, training, momentum, eps);
    const auto [w, b] = run_operands(u, conv_weight, conv_bias, conv_dtype);
    at::Tensor out = conv(r, w, b, padding);
    // The weight as the convolution ran it when the op cast it (a copy the backward takes as it is, as autocast's
    // cast would have been saved), else conv_weight itself (a channels_last copy would add to the saved bytes);
    // weight, bias and conv_weight only for the double-backward guard (every gradient depends on them).
    const bool cast = w.scalar_type() != conv_weight.scalar_type();
    ctx->save_for_backward({u, scale, shift, mean, invstd, cast ? w : conv_weight, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), conv_weight});
    // the weight gradient goes back in conv_weight's dtype and layout (which AccumulateGrad then keeps as it is)
    ctx->saved_data["conv_weight_dtype"] = static_cast<int64_t>(conv_weight.scalar_type());
    ctx->saved_data["conv_weight_channels_last"] =
        output_memory_format(conv_weight) == at::MemoryFormat::ChannelsLast;
    save_bn_relu_flags(ctx, training || !running_mean.has_value(), weight, bias);
    // Gradient edges exist for the tensor inputs given, in order: u, weight, bias, running_mean, running_var,
    // conv_weight, conv_bias (the optional ones only when present).
    const int64_t conv_edge = 1 + weight.has_value() + bias.has_value() + running_mean.has_value() +
                              running_var.has_value();
    ctx->saved_data["conv_edge"] = conv_edge;
    ctx->saved_data["has_conv_bias"] = conv_bias.has_value();
    ctx->saved_data["padding"] = padding;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t conv_edge = ctx->saved_data["conv_edge"].toInt();
    const bool has_conv_bias = ctx->saved_data["has_conv_bias"].toBool();
    const int64_t padding = ctx->saved_data["padding"].toInt();
    const BnReLUNeeds need = bn_relu_needs(ctx);
    const bool need_cw = ctx->needs_input_grad(conv_edge);
    const bool need_cb = has_conv_bias && ctx->needs_input_grad(conv_edge + 1);
    const bool need_bn = need.any();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &u = saved[0], &scale = saved[1], &shift = saved[2], &conv_weight = saved[5];
    const bool grad_mode = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    static const auto apply_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fused_hourglass::bn_relu_apply", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    at::Tensor dr, dcw, dcb;
    {
      const at::Tensor r = conv_input(apply_op.call(u, scale, shift), conv_weight);  // recomputed, never saved
      // The convolution's gradients want the output gradient in the layout its forward produced (r's).
      const at::Tensor grad = grads[0].contiguous(output_memory_format(r));
      const std::optional<at::IntArrayRef> bias_sizes =
          has_conv_bias ? std::optional<at::IntArrayRef>(at::IntArrayRef(conv_weight.sizes().data(), 1))
                        : std::nullopt;
      std::tie(dr, dcw, dcb) =
          at::convolution_backward(grad, r, conv_weight, bias_sizes, {1, 1}, {padding, padding}, {1, 1}, false,
                                   {0, 0}, 1, {need_bn, need_cw, need_cb});
    }
    if (need_bn && dr.scalar_type() != u.scalar_type()) dr = dr.to(u.scalar_type());
    variable_list out{at::Tensor(), at::Tensor(), at::Tensor()};
    if (need_bn) {
      out = bn_relu_grads(ctx, dr, saved, need);
    }
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["conv_weight_dtype"].toInt());
    const auto weight_format = ctx->saved_data["conv_weight_channels_last"].toBool()
                                   ? at::MemoryFormat::ChannelsLast
                                   : at::MemoryFormat::Contiguous;
    out.push_back(dcw.defined() ? converted(dcw, weight_dtype, weight_format) : dcw);
    out.push_back(dcb.defined() ? converted(dcb, weight_dtype, at::MemoryFormat::Preserve) : dcb);
    out = once_differentiable(std::move(out), "bn_relu_conv2d", grad_mode,
                              {grads[0], u, saved[8], saved[6], saved[7]});
    // One entry per forward argument: u, weight, bias, running_mean, running_var, training, momentum, eps,
    // conv_weight, conv_bias, padding, conv_dtype.
    return {out[0], out[1], out[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            out[3], out[4], at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_relu_conv2d_autograd(const at::Tensor& u, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                   double momentum, double eps, const at::Tensor& conv_weight,
                                   const OptTensor& conv_bias, int64_t padding,
                                   std::optional<at::ScalarType> conv_dtype) {
  return BnReLUConvFunction::apply(u, weight, bias, running_mean, running_var, training, momentum, eps, conv_weight,
                                   conv_bias, padding, conv_dtype)[0];
}

template <c10::DeviceType device_type>
at::Tensor bn_relu_conv2d_autocast(const at::Tensor& u, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                   double momentum, double eps, const at::Tensor& conv_weight,
                                   const OptTensor& conv_bias, int64_t padding,
                                   std::optional<at::ScalarType> conv_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType low = at::autocast::get_lower_precision_fp_from_device_type(device_type);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_hourglass::bn_relu_conv2d", "")
                             .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, bool, double, double,
                                               const at::Tensor&, const OptTensor&, int64_t,
                                               std::optional<at::ScalarType>)>();
  // The weight and bias autocast would cast (floating, on this device, neither float64 nor already low): the op
  // casts them itself (conv_dtype), with no autograd node per cast and the weight gradient in their own dtype.
  const auto castable = [&](const at::Tensor& t) {
    return t.is_floating_point() && t.device().type() == device_type && t.scalar_type() != at::kDouble &&
           t.scalar_type() != low;
  };
  if (!conv_dtype.has_value() && castable(conv_weight) &&
      (!conv_bias.has_value() || conv_bias->scalar_type() == conv_weight.scalar_type())) {
    return op.call(u, weight, bias, running_mean, running_var, training, momentum, eps, conv_weight, conv_bias,
                   padding, low);
  }
  return op.call(u, weight, bias, running_mean, running_var, training, momentum, eps,
                 at::autocast::cached_cast(low, conv_weight, device_type),
                 at::autocast::cached_cast(low, conv_bias, device_type), padding, conv_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CompositeExplicitAutograd, m) {
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_composite);
}

TORCH_LIBRARY_IMPL(fused_hourglass, Autograd, m) { m.impl("bn_relu_conv2d", &bn_relu_conv2d_autograd); }

TORCH_LIBRARY_IMPL(fused_hourglass, AutocastCPU, m) {
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fused_hourglass, AutocastCUDA, m) {
  m.impl("bn_relu_conv2d", &bn_relu_conv2d_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fused_hourglass
