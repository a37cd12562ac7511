// Operator schemas of the fastflow_cpp namespace and the Python module stub fastflow._C.
//
// The CPU kernels are registered next to their implementations (gn_film_silu.cpp,
// attention.cpp). Autograd formulas and fake (meta) kernels are registered from Python
// (fastflow/ops/cpu.py) with torch.library, so torch.compile traces these ops without graph breaks.
#include <Python.h>

#include <torch/library.h>

#include <string>

#include "blas.h"
#include "simd.h"

namespace fastflow {
namespace {

std::string build_info() {
  std::string info = std::string("isa=") + simd::active_isa();
  info += blas::has_blas() ? ", gemm=blas (sgemm_/dgemm_ from libtorch_cpu)" : ", gemm=fallback loop";
  return info;
}

}  // namespace

TORCH_LIBRARY(fastflow_cpp, m) {
  // GroupNorm → affine → FiLM → SiLU. mean/rstd: (N, G); stats: (N, G, 4) = (μ, r, mean ẋ, mean n̂ẋ).
  m.def("gn_film_silu_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "int groups, float eps, bool silu) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("gn_film_silu_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
        "Tensor? shift, Tensor mean, Tensor rstd, int groups, bool silu) -> "
        "(Tensor dx, Tensor dweight, Tensor dbias, Tensor dscale, Tensor dshift)");
  m.def("gn_film_silu_dual_fwd(Tensor x, Tensor? x_dot, Tensor? weight, Tensor? bias, "
        "Tensor? scale, Tensor? scale_dot, Tensor? shift, Tensor? shift_dot, int groups, float eps, "
        "bool silu) -> (Tensor y, Tensor y_dot, Tensor stats)");
  m.def("gn_film_silu_dual_bwd(Tensor? grad_y, Tensor? grad_y_dot, Tensor x, Tensor? x_dot, "
        "Tensor? weight, Tensor? bias, Tensor? scale, Tensor? scale_dot, Tensor? shift, "
        "Tensor? shift_dot, Tensor stats, int groups, bool silu) -> (Tensor dx, Tensor dx_dot, "
        "Tensor dweight, Tensor dbias, Tensor dscale, Tensor dscale_dot, Tensor dshift, "
        "Tensor dshift_dot)");
  // Attention softmax(QKᵀ/√d)·V over (B, H, L, D). lse: (B, H, Lq) row log-sum-exp.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor o, Tensor lse)");
  m.def("attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor lse) -> "
        "(Tensor dq, Tensor dk, Tensor dv)");
  m.def("attention_dual_fwd(Tensor q, Tensor? q_dot, Tensor k, Tensor? k_dot, Tensor v, "
        "Tensor? v_dot) -> (Tensor o, Tensor o_dot, Tensor lse)");
  m.def("attention_dual_bwd(Tensor? grad_o, Tensor? grad_o_dot, Tensor q, Tensor? q_dot, Tensor k, "
        "Tensor? k_dot, Tensor v, Tensor? v_dot, Tensor lse) -> (Tensor dq, Tensor dq_dot, "
        "Tensor dk, Tensor dk_dot, Tensor dv, Tensor dv_dot)");
  m.def("build_info() -> str", &build_info);
}

}  // namespace fastflow

// `import fastflow._C` loads this library, which runs the registrations above.
static PyModuleDef fastflow_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastflow C++ CPU ops", -1,
                                       nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastflow_c_module); }
