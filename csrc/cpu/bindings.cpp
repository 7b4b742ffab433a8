// forge._C: the C++ CPU kernels. Every entry takes raw pointers (ints) and sizes, never a torch
// tensor, so the module builds without torch and loads into any torch version. The GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/bitnet.h"
#include "cpu/grokfast.h"
#include "cpu/kl_div.h"
#include "cpu/newton_schulz.h"
#include "cpu/seedlm.h"
#include "cpu/symmetric.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "forge C++ CPU kernels (pointer-based, torch-independent)";
  m.def("grokfast_ema", &forge::grokfast_ema_cpu, py::arg("grads"), py::arg("emas"), py::arg("numels"),
        py::arg("grad_dtypes"), py::arg("ema_dtypes"), py::arg("alpha"), py::arg("lamb"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("grokfast_ma", &forge::grokfast_ma_cpu, py::arg("grads"), py::arg("rings"), py::arg("sums"),
        py::arg("numels"), py::arg("grad_dtypes"), py::arg("ring_dtypes"), py::arg("slot"), py::arg("scale"),
        py::arg("lamb"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("newton_schulz_small_f32", &forge::newton_schulz_small_f32, py::arg("input"), py::arg("output"),
        py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("coefficients"), py::arg("eps"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("symmetrize_from_lower_f32", &forge::symmetrize_from_lower_f32, py::arg("data"), py::arg("batch"),
        py::arg("m"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("ternary_quant", &forge::ternary_quant_cpu, py::arg("w"), py::arg("dtype"), py::arg("groups"),
        py::arg("group_size"), py::arg("eps"), py::arg("scale"), py::arg("out"), py::arg("dequantize"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("act_quant", &forge::act_quant_cpu, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("eps"), py::arg("scale"), py::arg("out"), py::arg("out_stride"), py::arg("dequantize"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("pack_ternary", &forge::pack_ternary_cpu, py::arg("q"), py::arg("rows"), py::arg("cols"), py::arg("packed"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("unpack_ternary", &forge::unpack_ternary_cpu, py::arg("packed"), py::arg("rows"), py::arg("cols"),
        py::arg("q"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("ternary_linear", &forge::ternary_linear_cpu, py::arg("x"), py::arg("dtype"), py::arg("m"), py::arg("k"),
        py::arg("packed"), py::arg("n"), py::arg("scale"), py::arg("scale_stride"), py::arg("eps"), py::arg("y"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_forward", &forge::kl_div_forward_cpu, py::arg("student"), py::arg("teacher"), py::arg("mask"),
        py::arg("loss"), py::arg("lse_s"), py::arg("lse_t"), py::arg("rows"), py::arg("vocab"), py::arg("s_stride"),
        py::arg("t_stride"), py::arg("dtype"), py::arg("inv_t"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_reduce", &forge::kl_div_reduce_cpu, py::arg("loss"), py::arg("mask"), py::arg("rows"),
        py::arg("vocab"), py::arg("reduction"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_loss", &forge::kl_div_loss_cpu, py::arg("student"), py::arg("teacher"), py::arg("mask"),
        py::arg("rows"), py::arg("vocab"), py::arg("s_stride"), py::arg("t_stride"), py::arg("dtype"),
        py::arg("inv_t"), py::arg("reduction"), py::arg("out"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_backward", &forge::kl_div_backward_cpu, py::arg("student"), py::arg("teacher"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("row_scale"), py::arg("grad"), py::arg("rows"), py::arg("vocab"),
        py::arg("s_stride"), py::arg("t_stride"), py::arg("g_stride"), py::arg("dtype"), py::arg("inv_t"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("seedlm_search", &forge::seedlm_search_cpu, py::arg("blocks"), py::arg("n"), py::arg("C"), py::arg("P"),
        py::arg("K"), py::arg("taps_mask"), py::arg("num_seeds"), py::arg("seeds"), py::arg("q"), py::arg("e"),
        py::arg("err"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("seedlm_decode", &forge::seedlm_decode_cpu, py::arg("seeds"), py::arg("q"), py::arg("e"), py::arg("n"),
        py::arg("C"), py::arg("P"), py::arg("walk"), py::arg("position"), py::arg("out"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("seedlm_linear", &forge::seedlm_linear_cpu, py::arg("x"), py::arg("m"), py::arg("k"), py::arg("n_out"),
        py::arg("seeds"), py::arg("q"), py::arg("e"), py::arg("C"), py::arg("P"), py::arg("walk"),
        py::arg("position"), py::arg("y"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("vq_decode", &forge::vq_decode_cpu, py::arg("idx"), py::arg("codebook"), py::arg("res_idx"),
        py::arg("res_codebook"), py::arg("scale"), py::arg("out"), py::arg("in"), py::arg("v"), py::arg("w"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("vq_linear", &forge::vq_linear_cpu, py::arg("x"), py::arg("m"), py::arg("idx"), py::arg("codebook"),
        py::arg("res_idx"), py::arg("res_codebook"), py::arg("scale"), py::arg("out"), py::arg("in"), py::arg("v"),
        py::arg("y"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.attr("ABI_VERSION") = 1;
}
