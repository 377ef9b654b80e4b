/* Safetensors writer bindings: filled in by the export work (issue 4). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyMethodDef aoq_st_methods[] = {{NULL, NULL, 0, NULL}};
