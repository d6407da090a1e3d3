// The handle of pyrnn::forward in the dispatcher, typed by its schema (ops.cpp), for the
// C++ that calls the op: the autograd kernel (autograd.cpp) and the modules' forward
// (module.cpp).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace pyrnn {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    c10::string_view, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, bool, double, const std::optional<at::Tensor>&,
    double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    c10::ArrayRef<double>, const std::optional<at::Tensor>&);

inline const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyrnn::forward", "")
                             .typed<ForwardSignature>();
  return op;
}

}  // namespace pyrnn
