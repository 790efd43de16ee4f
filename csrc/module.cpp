// The Python module `fused_hourglass._C`. It has no Python-visible functions: importing it loads the
// shared library, whose static initialisers register every op with the dispatcher (TORCH_LIBRARY_*).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
