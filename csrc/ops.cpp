// The native library dalle3_fast._C. Loading it registers the C++ implementations of the
// dalle3_fast operators, whose schemas live in dalle3_fast/ops/library.py: CPU kernels in
// csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/binding.cpp, all validated by csrc/op_checks.cpp.
// The module itself exports the op limits of op_limits.h and whether CUDA was compiled in.
#include <Python.h>

#include "op_limits.h"

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

static PyObject* head_dims() {
  constexpr Py_ssize_t n = sizeof(dalle3_fast::kHeadDims) / sizeof(dalle3_fast::kHeadDims[0]);
  PyObject* dims = PyTuple_New(n);
  if (dims == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyLong_FromLong(dalle3_fast::kHeadDims[i]);
    if (d == nullptr) {
      Py_DECREF(dims);
      return nullptr;
    }
    PyTuple_SET_ITEM(dims, i, d);
  }
  return dims;
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* dims = head_dims();
  if (dims == nullptr || PyModule_AddObject(m, "SUPPORTED_HEAD_DIMS", dims) < 0) {  // steals dims on success
    Py_XDECREF(dims);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddIntConstant(m, "MAX_KEY_TOKENS", static_cast<long>(dalle3_fast::kMaxKeyTokens)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
