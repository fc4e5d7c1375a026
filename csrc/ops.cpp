// The native library dalle3_fast._C: operator schemas in one place.
// CPU kernels register in csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/binding.cpp.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dalle3_fast_C, m) {
  m.def(
      "group_norm_silu_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, "
      "int num_groups, float eps, bool silu) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "group_norm_silu_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dadd, Tensor dscale, Tensor dshift)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_lengths, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
