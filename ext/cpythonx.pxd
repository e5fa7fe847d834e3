# C-level views of the CPython API on borrowed PyObject* that Cython's own cpython.*
# declarations give only on `object` (with reference counting): the row loop of
# Signer.encode_batch reads rows that stay referenced by the list/tuple it was handed.

from cpython.object cimport PyObject


cdef extern from "Python.h":
    Py_ssize_t seq_size "PySequence_Fast_GET_SIZE" (PyObject *o)
    PyObject *seq_item "PySequence_Fast_GET_ITEM" (PyObject *o, Py_ssize_t i)
    bint is_tuple "PyTuple_Check" (PyObject *o)
    bint is_list "PyList_Check" (PyObject *o)
    bint is_exact_tuple "PyTuple_CheckExact" (object o)
    bint is_exact_list "PyList_CheckExact" (object o)
    bint is_str "PyUnicode_Check" (PyObject *o)
    bint is_bytes "PyBytes_Check" (PyObject *o)
    bint is_bytearray "PyByteArray_Check" (PyObject *o)
    bint is_int "PyLong_Check" (PyObject *o)
    bint is_bool "PyBool_Check" (PyObject *o)
    char *bytes_data "PyBytes_AS_STRING" (PyObject *o)
    Py_ssize_t bytes_size "PyBytes_GET_SIZE" (PyObject *o)
    char *bytearray_data "PyByteArray_AS_STRING" (PyObject *o)
    Py_ssize_t bytearray_size "PyByteArray_GET_SIZE" (PyObject *o)
    long as_long "PyLong_AsLongAndOverflow" (PyObject *o, int *overflow)
    # NULL with an exception set when the str holds lone surrogates.
    const char *str_utf8 "PyUnicode_AsUTF8AndSize" (PyObject *o, Py_ssize_t *size)
    # New references, NULL on error: their results are stolen by tuple_set.
    PyObject *decode_utf8 "PyUnicode_DecodeUTF8" (const char *s, Py_ssize_t n, const char *errors)
    PyObject *new_str "PyUnicode_New" (Py_ssize_t size, Py_UCS4 maxchar)
    void *str_data "PyUnicode_DATA" (PyObject *o)
    bint is_compact_ascii "PyUnicode_IS_COMPACT_ASCII" (PyObject *o)
    Py_ssize_t str_length "PyUnicode_GET_LENGTH" (PyObject *o)
    void tuple_set "PyTuple_SET_ITEM" (object t, Py_ssize_t i, PyObject *o)
    PyObject *new_bytes "PyBytes_FromStringAndSize" (const char *s, Py_ssize_t n)
    int resize_bytes "_PyBytes_Resize" (PyObject **o, Py_ssize_t n)
    void PyErr_Clear()
