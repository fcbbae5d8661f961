/*
 * meshproxy._native_tls: the C TLS engine over the system OpenSSL (libssl).
 *
 * This first cut only proves the build and link against libssl/libcrypto and reports the
 * library version; ENGINE_API = 0 tells Python that the relay engine is not there yet,
 * so MESHPROXY_NATIVE=require fails closed instead of pretending.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/crypto.h>
#include <openssl/ssl.h>

#define MESHPROXY_ENGINE_API 0

static PyObject *
openssl_version(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    const char *version = OpenSSL_version(OPENSSL_VERSION);
    if (version == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL_version returned NULL");
        return NULL;
    }
    return PyUnicode_FromString(version);
}

static PyMethodDef native_tls_methods[] = {
    {"openssl_version", openssl_version, METH_NOARGS,
     "openssl_version() -> str\n\nThe version string of the OpenSSL this module runs on."},
    {NULL, NULL, 0, NULL},
};

static int
native_tls_exec(PyObject *module)
{
    if (OPENSSL_init_ssl(0, NULL) != 1) {
        PyErr_SetString(PyExc_ImportError, "OPENSSL_init_ssl failed");
        return -1;
    }
    if (PyModule_AddIntConstant(module, "ENGINE_API", MESHPROXY_ENGINE_API) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot native_tls_slots[] = {
    {Py_mod_exec, native_tls_exec},
    {0, NULL},
};

static struct PyModuleDef native_tls_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshproxy._native_tls",
    .m_doc = "The C TLS engine of meshproxy (version probe only; ENGINE_API 0).",
    .m_size = 0,
    .m_methods = native_tls_methods,
    .m_slots = native_tls_slots,
};

PyMODINIT_FUNC
PyInit__native_tls(void)
{
    return PyModuleDef_Init(&native_tls_module);
}
