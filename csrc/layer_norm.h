// The parts of a layer-normalised cell (cells/ln_lstm.h) that run outside its time loop,
// in ATen, for the CPU and the CUDA ops alike: the input side's norm, which no step
// depends on, and the gradients of the cell's own weights, sums over all T*B rows.
#pragma once
#include <ATen/ATen.h>

namespace pyrnn {

// LN(proj) * gamma_ih + b_ih for proj = x @ W_ih^T [T*B, G*H], gamma_ih the first G*H
// entries of cell_weight. b_ih may be undefined.
inline at::Tensor normalised_input(const at::Tensor& proj, const at::Tensor& cell_weight,
                                   const at::Tensor& b_ih, double eps) {
  const int64_t GH = proj.size(1);
  return std::get<0>(at::native_layer_norm(proj, {GH}, cell_weight.narrow(0, 0, GH),
                                           b_ih.defined() ? b_ih : std::optional<at::Tensor>(),
                                           eps));
}

// From BPTT's gx [T*B, G*H] (dLoss/da), dnorm [T*B, H], the workspace rows [T*B, W] and
// proj = x @ W_ih^T: dLoss/dproj, and the gradient of cell_weight [gamma_ih | gamma_hh |
// gamma_c | beta_c]. colsum(A [M, N]) -> [N] sums the rows (the backend's own, fixed
// order). Inactive rows have gx = dnorm = 0 and add nothing.
template <class ColSum>
std::pair<at::Tensor, at::Tensor> layer_norm_grads(const at::Tensor& gx, const at::Tensor& dnorm,
                                                   const at::Tensor& ws, const at::Tensor& proj,
                                                   const at::Tensor& cell_weight, double eps,
                                                   ColSum&& colsum) {
  const int64_t GH = gx.size(1), H = dnorm.size(1);
  const at::Tensor gamma_ih = cell_weight.narrow(0, 0, GH);
  const auto stats = at::native_layer_norm(proj, {GH}, gamma_ih, std::nullopt, eps);
  const at::Tensor& mean = std::get<1>(stats);
  const at::Tensor& rstd = std::get<2>(stats);
  at::Tensor dproj = std::get<0>(at::native_layer_norm_backward(
      gx, proj, {GH}, mean, rstd, gamma_ih, std::nullopt, {true, false, false}));
  const at::Tensor x_in = (proj - mean) * rstd;    // the input side, normalised
  const at::Tensor x_hh = ws.narrow(1, GH, GH);    // the recurrent side, normalised
  const at::Tensor x_c = ws.narrow(1, 2 * GH, H);  // c_t, normalised
  at::Tensor dw = at::cat({colsum(gx * x_in), colsum(gx * x_hh), colsum(dnorm * x_c),
                           colsum(dnorm)});
  return {dproj, dw};
}

}  // namespace pyrnn
