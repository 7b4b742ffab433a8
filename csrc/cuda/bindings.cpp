// forge._cuda: CUDA kernels behind raw device pointers and a stream handle (no torch at build time).
// Loaded only when torch sees a GPU; see forge/_native.py.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace forge {
int64_t grokfast_chunk_size();
void grokfast_ema_cuda(uintptr_t table, int n, int64_t chunks, int grad_dtype, int ema_dtype, float alpha,
                       float lamb, uintptr_t stream);
void grokfast_ma_cuda(uintptr_t table, int n, int64_t chunks, int grad_dtype, int ring_dtype, int64_t slot,
                      float scale, float lamb, uintptr_t stream);
int64_t ternary_block_values();
void ternary_quant_cuda(uintptr_t w, int dtype, int64_t groups, int64_t group_size, float eps, uintptr_t scale,
                        uintptr_t partial, uintptr_t out, bool dequantize, uintptr_t stream);
void act_quant_cuda(uintptr_t x, int dtype, int64_t rows, int64_t cols, float eps, uintptr_t scale, uintptr_t out,
                    int64_t out_stride, bool dequantize, uintptr_t stream);
void ternary_linear_cuda(uintptr_t xq, uintptr_t xs, int64_t m, int64_t kb, uintptr_t packed, int64_t n,
                         uintptr_t scale, int64_t scale_stride, int dtype, uintptr_t y, uintptr_t stream);
void kl_div_forward_cuda(uintptr_t s, uintptr_t t, uintptr_t mask, uintptr_t loss, uintptr_t ls, uintptr_t lt,
                         int64_t rows, int64_t vocab, int64_t ss, int64_t ts, int dtype, float inv_t, uintptr_t stream);
void kl_div_backward_cuda(uintptr_t s, uintptr_t t, uintptr_t ls, uintptr_t lt, uintptr_t scale, uintptr_t g,
                          int64_t rows, int64_t vocab, int64_t ss, int64_t ts, int64_t gs, int dtype, float inv_t,
                          uintptr_t stream);
void seedlm_search_cuda(uintptr_t w, int64_t n, int C, int P, uintptr_t ut, uintptr_t pinv, int64_t num_seeds,
                        uintptr_t best, uintptr_t q, uintptr_t e, uintptr_t err, uintptr_t stream);
void seedlm_decode_cuda(uintptr_t walk, uintptr_t pos, uintptr_t seeds, uintptr_t q, uintptr_t e, int64_t n, int C,
                        int P, uintptr_t out, uintptr_t stream);
void seedlm_linear_cuda(uintptr_t x, int64_t m, int64_t k, int64_t n_out, uintptr_t walk, uintptr_t pos,
                        uintptr_t seeds, uintptr_t q, uintptr_t e, int C, int P, uintptr_t y, uintptr_t stream);
void vq_decode_cuda(uintptr_t idx, uintptr_t book, uintptr_t res, uintptr_t res_book, uintptr_t scale, int64_t n_out,
                    int64_t n_in, int v, uintptr_t w, uintptr_t stream);
void vq_linear_cuda(uintptr_t x, int64_t m, uintptr_t idx, uintptr_t book, uintptr_t res, uintptr_t res_book,
                    uintptr_t scale, int64_t n_out, int64_t n_in, int v, uintptr_t y, uintptr_t stream);
}  // namespace forge

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "forge CUDA kernels (pointer-based, torch-independent)";
  m.def("grokfast_chunk_size", &forge::grokfast_chunk_size);
  m.def("grokfast_ema", &forge::grokfast_ema_cuda, py::arg("table"), py::arg("n"), py::arg("chunks"),
        py::arg("grad_dtype"), py::arg("ema_dtype"), py::arg("alpha"), py::arg("lamb"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("grokfast_ma", &forge::grokfast_ma_cuda, py::arg("table"), py::arg("n"), py::arg("chunks"),
        py::arg("grad_dtype"), py::arg("ring_dtype"), py::arg("slot"), py::arg("scale"), py::arg("lamb"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("ternary_block_values", &forge::ternary_block_values);
  m.def("ternary_quant", &forge::ternary_quant_cuda, py::arg("w"), py::arg("dtype"), py::arg("groups"),
        py::arg("group_size"), py::arg("eps"), py::arg("scale"), py::arg("partial"), py::arg("out"),
        py::arg("dequantize"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("act_quant", &forge::act_quant_cuda, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("eps"), py::arg("scale"), py::arg("out"), py::arg("out_stride"), py::arg("dequantize"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("ternary_linear", &forge::ternary_linear_cuda, py::arg("xq"), py::arg("xs"), py::arg("m"), py::arg("kb"),
        py::arg("packed"), py::arg("n"), py::arg("scale"), py::arg("scale_stride"), py::arg("dtype"), py::arg("y"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_forward", &forge::kl_div_forward_cuda, py::arg("student"), py::arg("teacher"), py::arg("mask"),
        py::arg("loss"), py::arg("lse_s"), py::arg("lse_t"), py::arg("rows"), py::arg("vocab"), py::arg("s_stride"),
        py::arg("t_stride"), py::arg("dtype"), py::arg("inv_t"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("kl_div_backward", &forge::kl_div_backward_cuda, py::arg("student"), py::arg("teacher"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("row_scale"), py::arg("grad"), py::arg("rows"), py::arg("vocab"),
        py::arg("s_stride"), py::arg("t_stride"), py::arg("g_stride"), py::arg("dtype"), py::arg("inv_t"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("seedlm_search", &forge::seedlm_search_cuda, py::arg("w"), py::arg("n"), py::arg("C"), py::arg("P"),
        py::arg("ut"), py::arg("pinv"), py::arg("num_seeds"), py::arg("best"), py::arg("q"), py::arg("e"),
        py::arg("err"), py::arg("stream"));
  m.def("seedlm_decode", &forge::seedlm_decode_cuda, py::arg("walk"), py::arg("pos"), py::arg("seeds"), py::arg("q"),
        py::arg("e"), py::arg("n"), py::arg("C"), py::arg("P"), py::arg("out"), py::arg("stream"));
  m.def("seedlm_linear", &forge::seedlm_linear_cuda, py::arg("x"), py::arg("m"), py::arg("k"), py::arg("n_out"),
        py::arg("walk"), py::arg("pos"), py::arg("seeds"), py::arg("q"), py::arg("e"), py::arg("C"), py::arg("P"),
        py::arg("y"), py::arg("stream"));
  m.def("vq_decode", &forge::vq_decode_cuda, py::arg("idx"), py::arg("book"), py::arg("res"), py::arg("res_book"),
        py::arg("scale"), py::arg("n_out"), py::arg("n_in"), py::arg("v"), py::arg("w"), py::arg("stream"));
  m.def("vq_linear", &forge::vq_linear_cuda, py::arg("x"), py::arg("m"), py::arg("idx"), py::arg("book"),
        py::arg("res"), py::arg("res_book"), py::arg("scale"), py::arg("n_out"), py::arg("n_in"), py::arg("v"),
        py::arg("y"), py::arg("stream"));
  m.attr("ABI_VERSION") = 1;
}
