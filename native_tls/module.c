/*
 * meshproxy._native_tls: the C TLS engine over the system OpenSSL (libssl).
 *
 * This file is the only bridge between Python and the engine (engine.c, context.c, which
 * never touch a Python object). Native failures become Python exceptions here and only
 * here: NativeError(message); meshproxy/tls/_native.py maps that onto the MeshError tree.
 *
 * Types: Context (an SSL_CTX built from in-memory PEM), Engine (worker threads relaying
 * TLS <-> Unix-socket bytes), Event (a struct sequence the engine reports).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <sched.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/ssl.h>

#include "context.h"
#include "engine.h"

#define MESHPROXY_ENGINE_API 2 /* 2: listeners accepted by the engine */
#define ERR_MAX 256

static PyObject *NativeError;
static PyTypeObject *EventType;

/* The one place a native failure becomes a Python exception. */
static PyObject *
raise_native(const char *message)
{
    PyErr_SetString(NativeError, message);
    return NULL;
}

/* -- Context ------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
    int server;
} ContextObject;

static PyTypeObject ContextType;

static int
alpn_wire(PyObject *protocols, unsigned char **wire, size_t *len)
{
    PyObject *seq = PySequence_Fast(protocols, "alpn must be a sequence of str");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t size;
        if (!PyUnicode_Check(item) || PyUnicode_AsUTF8AndSize(item, &size) == NULL) {
            PyErr_SetString(PyExc_TypeError, "alpn must be a sequence of str");
            Py_DECREF(seq);
            return -1;
        }
        if (size < 1 || size > 255) {
            PyErr_SetString(PyExc_ValueError, "an ALPN protocol name is 1 to 255 bytes");
            Py_DECREF(seq);
            return -1;
        }
        total += 1 + (size_t)size;
    }
    *wire = NULL;
    *len = total;
    if (total > 0) {
        unsigned char *p = PyMem_Malloc(total);
        if (p == NULL) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
        *wire = p;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t size;
            const char *name = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &size);
            *p++ = (unsigned char)size;
            memcpy(p, name, (size_t)size);
            p += size;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *
Context_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"chain_pem", "key_pem",      "trust_pem",   "server", "verify_peer",
                             "partial_chain", "min_version", "tickets", "alpn", NULL};
    Py_buffer chain = {0}, key = {0}, trust = {0};
    int server = -1, verify_peer = -1, partial_chain = 1, tickets = 0;
    const char *min_version = "1.3";
    PyObject *alpn = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*w*z*|$pppspO", kwlist, &chain, &key, &trust,
                                     &server, &verify_peer, &partial_chain, &min_version,
                                     &tickets, &alpn)) {
        return NULL;
    }
    PyObject *result = NULL;
    int wiped = 0;
    unsigned char *wire = NULL;
    size_t wire_len = 0;
    if (server < 0 || verify_peer < 0) {
        PyErr_SetString(PyExc_TypeError, "Context() needs server= and verify_peer=");
        goto done;
    }
    int version;
    if (strcmp(min_version, "1.3") == 0) {
        version = TLS1_3_VERSION;
    } else if (strcmp(min_version, "1.2") == 0) {
        version = TLS1_2_VERSION;
    } else {
        PyErr_SetString(PyExc_ValueError, "min_version must be \"1.2\" or \"1.3\"");
        goto done;
    }
    if (alpn != NULL && alpn_wire(alpn, &wire, &wire_len) < 0) {
        goto done;
    }
    mp_context_config cfg = {
        .chain_pem = chain.buf,
        .chain_len = (size_t)chain.len,
        .key_pem = key.buf,
        .key_len = (size_t)key.len,
        .key_writable = 1,
        .trust_pem = trust.buf,
        .trust_len = trust.buf ? (size_t)trust.len : 0,
        .server = server,
        .verify_peer = verify_peer,
        .partial_chain = partial_chain,
        .tickets = tickets,
        .min_version = version,
        .alpn_wire = wire,
        .alpn_len = wire_len,
    };
    char err[ERR_MAX] = "";
    SSL_CTX *ctx = mp_context_new(&cfg, err, sizeof err); /* wipes the key buffer */
    wiped = 1;
    if (ctx == NULL) {
        raise_native(err);
        goto done;
    }
    ContextObject *self = (ContextObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        SSL_CTX_free(ctx);
        goto done;
    }
    self->ctx = ctx;
    self->server = server;
    result = (PyObject *)self;
done:
    if (!wiped && key.obj != NULL) { /* mp_context_new was not reached: wipe here */
        OPENSSL_cleanse(key.buf, (size_t)key.len);
    }
    PyMem_Free(wire);
    PyBuffer_Release(&chain);
    PyBuffer_Release(&key);
    PyBuffer_Release(&trust);
    return result;
}

static void
Context_dealloc(ContextObject *self)
{
    SSL_CTX_free(self->ctx); /* open sessions hold their own reference */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Context_members[] = {
    {"server", T_BOOL, offsetof(ContextObject, server), READONLY, "A server-side context."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshproxy._native_tls.Context",
    .tp_basicsize = sizeof(ContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context(chain_pem, key_pem, trust_pem, *, server, verify_peer, partial_chain=True,"
              " min_version='1.3', tickets=False, alpn=())\n\nAn SSL_CTX built from memory. "
              "key_pem must be a bytearray: it is wiped before the constructor returns.",
    .tp_new = Context_new,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_members = Context_members,
};

/* -- Engine -------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    mp_engine *engine;
} EngineObject;

static int
available_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) {
        return CPU_COUNT(&set);
    }
    return 1;
}

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"threads",         "buffer_size",     "read_buffer_size",
                             "coalesce_writes", "release_buffers", NULL};
    int threads = 0, coalesce = 1, release = 1;
    Py_ssize_t buffer_size = 64 * 1024, read_buffer_size = 64 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i$nnpp", kwlist, &threads, &buffer_size,
                                     &read_buffer_size, &coalesce, &release)) {
        return NULL;
    }
    if (threads < 0 || buffer_size < 0 || read_buffer_size < 0) {
        PyErr_SetString(PyExc_ValueError, "threads and buffer sizes must not be negative");
        return NULL;
    }
    mp_engine_config cfg = {
        .threads = threads ? threads : available_cpus(),
        .buffer_size = (size_t)buffer_size,
        .read_buffer_size = (size_t)read_buffer_size,
        .coalesce_writes = coalesce,
        .release_buffers = release,
    };
    char err[ERR_MAX] = "";
    mp_engine *engine = mp_engine_new(&cfg, err, sizeof err);
    if (engine == NULL) {
        return raise_native(err);
    }
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        mp_engine_free(engine);
        return NULL;
    }
    self->engine = engine;
    return (PyObject *)self;
}

static void
Engine_dealloc(EngineObject *self)
{
    if (self->engine != NULL) {
        mp_engine *engine = self->engine;
        self->engine = NULL;
        Py_BEGIN_ALLOW_THREADS mp_engine_free(engine); /* joins the workers */
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Engine_fileno(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(mp_engine_fileno(self->engine));
}

static PyObject *
Engine_handshake(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "ctx", "server_side", "sni", NULL};
    int fd, server_side;
    ContextObject *ctx;
    const char *sni = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO!p|z", kwlist, &fd, &ContextType, &ctx,
                                     &server_side, &sni)) {
        return NULL;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must not be negative");
        return NULL;
    }
    if (server_side != ctx->server) {
        PyErr_SetString(PyExc_ValueError, "server_side does not match the context");
        return NULL;
    }
    uint64_t conn_id;
    char err[ERR_MAX] = "";
    if (mp_engine_handshake(self->engine, fd, ctx->ctx, server_side, sni, &conn_id, err,
                            sizeof err) < 0) {
        return raise_native(err);
    }
    return PyLong_FromUnsignedLongLong(conn_id);
}

static PyObject *
Engine_listen(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd",        "ctx",          "app_path", "trust_domain",
                             "allowed",   "anonymous",    "handshake_timeout", NULL};
    int fd, anonymous = 0;
    ContextObject *ctx;
    const char *app_path = NULL, *trust_domain = NULL;
    PyObject *allowed = NULL;
    double timeout = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO!|$zzOpd", kwlist, &fd, &ContextType, &ctx,
                                     &app_path, &trust_domain, &allowed, &anonymous, &timeout)) {
        return NULL;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must not be negative");
        return NULL;
    }
    if (!ctx->server) {
        PyErr_SetString(PyExc_ValueError, "a listener needs a server context");
        return NULL;
    }
    PyObject *empty = allowed == NULL ? PyTuple_New(0) : NULL;
    if (allowed == NULL && empty == NULL) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(allowed ? allowed : empty, "allowed must be a sequence of str");
    Py_XDECREF(empty);
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    const char **names = PyMem_Calloc((size_t)n + 1, sizeof *names);
    if (names == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        names[i] = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
        if (names[i] == NULL) {
            PyMem_Free(names);
            Py_DECREF(seq);
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "allowed must be a sequence of str");
            }
            return NULL;
        }
    }
    mp_listener_config cfg = {
        .fd = fd,
        .ctx = ctx->ctx,
        .app_path = app_path,
        .trust_domain = trust_domain,
        .allowed = names,
        .nallowed = (size_t)n,
        .anonymous = anonymous,
        .handshake_timeout = timeout,
    };
    uint32_t id = 0;
    char err[ERR_MAX] = "";
    int rc = mp_engine_listen(self->engine, &cfg, &id, err, sizeof err);
    PyMem_Free(names);
    Py_DECREF(seq);
    if (rc < 0) {
        return raise_native(err);
    }
    return PyLong_FromUnsignedLong(id);
}

static PyObject *
Engine_listener_context(EngineObject *self, PyObject *args)
{
    unsigned int id;
    ContextObject *ctx;
    if (!PyArg_ParseTuple(args, "IO!", &id, &ContextType, &ctx)) {
        return NULL;
    }
    if (!ctx->server) {
        PyErr_SetString(PyExc_ValueError, "a listener needs a server context");
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_listener_context(self->engine, id, ctx->ctx, err, sizeof err) < 0) {
        return raise_native(err);
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_unlisten(EngineObject *self, PyObject *args)
{
    unsigned int id;
    if (!PyArg_ParseTuple(args, "I", &id)) {
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_unlisten(self->engine, id, err, sizeof err) < 0) {
        return raise_native(err);
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_relay(EngineObject *self, PyObject *args)
{
    unsigned long long conn_id;
    int fd;
    if (!PyArg_ParseTuple(args, "Ki", &conn_id, &fd)) {
        return NULL;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must not be negative");
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_relay(self->engine, conn_id, fd, err, sizeof err) < 0) {
        return raise_native(err);
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_close(EngineObject *self, PyObject *args)
{
    unsigned long long conn_id;
    const char *reason;
    if (!PyArg_ParseTuple(args, "Ks", &conn_id, &reason)) {
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_close(self->engine, conn_id, reason, err, sizeof err) < 0) {
        return raise_native(err);
    }
    Py_RETURN_NONE;
}

static PyObject *
optional_str(const char *s)
{
    if (s == NULL || s[0] == '\0') {
        Py_RETURN_NONE;
    }
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace");
}

static PyObject *
event_object(const mp_event *ev)
{
    PyObject *item = PyStructSequence_New(EventType);
    if (item == NULL) {
        return NULL;
    }
    PyObject *fields[14] = {
        PyLong_FromUnsignedLongLong(ev->conn_id),
        PyLong_FromLong(ev->kind),
        optional_str(ev->reason),
        ev->peer_der ? PyBytes_FromStringAndSize((const char *)ev->peer_der,
                                                 (Py_ssize_t)ev->peer_der_len)
                     : Py_NewRef(Py_None),
        ev->alpn[0] ? PyUnicode_DecodeLatin1(ev->alpn, (Py_ssize_t)strlen(ev->alpn), NULL)
                    : Py_NewRef(Py_None),
        optional_str(ev->version),
        optional_str(ev->cipher),
        PyLong_FromUnsignedLongLong(ev->tls_to_app),
        PyLong_FromUnsignedLongLong(ev->app_to_tls),
        PyLong_FromUnsignedLong(ev->listener),
        PyBool_FromLong(ev->relaying),
        optional_str(ev->remote),
        optional_str(ev->peer_id),
        optional_str(ev->peer_uuid),
    };
    int ok = 1;
    for (int i = 0; i < 14; i++) {
        if (fields[i] == NULL) {
            ok = 0;
            fields[i] = Py_NewRef(Py_None);
        }
        PyStructSequence_SetItem(item, i, fields[i]); /* steals */
    }
    if (!ok) {
        Py_DECREF(item);
        return NULL;
    }
    return item;
}

static PyObject *
Engine_events(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    mp_event *list = mp_engine_take_events(self->engine);
    PyObject *out = PyList_New(0);
    while (list != NULL) {
        mp_event *ev = list;
        list = ev->next;
        if (out != NULL) {
            PyObject *item = event_object(ev);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_CLEAR(out); /* keep freeing the rest: the events are lost with the error */
            }
            Py_XDECREF(item);
        }
        mp_event_free(ev);
    }
    return out;
}

static PyObject *
Engine_stats(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    mp_stats s;
    mp_engine_stats(self->engine, &s);
    return Py_BuildValue("{s:i,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "threads",
                         mp_engine_threads(self->engine), "active", s.active, "handshakes",
                         s.handshakes, "handshake_failures", s.handshake_failures, "closed",
                         s.closed, "bytes_tls_to_app", s.bytes_tls_to_app, "bytes_app_to_tls",
                         s.bytes_app_to_tls, "buffer_bytes", s.buffer_bytes, "accepted",
                         s.accepted, "fast_path", s.fast_path);
}

static PyObject *
Engine_shutdown(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    mp_engine *engine = self->engine;
    Py_BEGIN_ALLOW_THREADS mp_engine_stop(engine);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *
Engine_get_threads(EngineObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(mp_engine_threads(self->engine));
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS,
     "fileno() -> int\n\nAn eventfd, readable while events wait to be taken."},
    {"handshake", (PyCFunction)(void (*)(void))Engine_handshake, METH_VARARGS | METH_KEYWORDS,
     "handshake(fd, ctx, server_side, sni=None) -> int\n\nHand a connected TCP socket to a "
     "worker and start TLS; returns the connection id. On success the engine owns fd."},
    {"listen", (PyCFunction)(void (*)(void))Engine_listen, METH_VARARGS | METH_KEYWORDS,
     "listen(fd, ctx, *, app_path=None, trust_domain=None, allowed=(), anonymous=False, "
     "handshake_timeout=10.0) -> int\n\nAccept on a listening TCP socket in the workers; "
     "returns the listener id. On success the engine owns fd."},
    {"listener_context", (PyCFunction)Engine_listener_context, METH_VARARGS,
     "listener_context(listener_id, ctx) -> None\n\nNew connections of the listener use ctx."},
    {"unlisten", (PyCFunction)Engine_unlisten, METH_VARARGS,
     "unlisten(listener_id) -> None\n\nStop accepting and close the listening socket."},
    {"relay", (PyCFunction)Engine_relay, METH_VARARGS,
     "relay(conn_id, fd) -> None\n\nRelay the connection to the app's Unix socket fd. On "
     "success the engine owns fd (and closes it if the connection already ended)."},
    {"close", (PyCFunction)Engine_close, METH_VARARGS,
     "close(conn_id, reason) -> None\n\nEnd a connection; its final event carries reason."},
    {"events", (PyCFunction)Engine_events, METH_NOARGS,
     "events() -> list[Event]\n\nEvery event waiting, oldest first."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "stats() -> dict[str, int]"},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS,
     "shutdown() -> None\n\nEnd every connection and stop the workers (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"threads", (getter)Engine_get_threads, NULL, "Worker threads.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshproxy._native_tls.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(threads=0, *, buffer_size=65536, read_buffer_size=65536, "
              "coalesce_writes=True, release_buffers=True)\n\nWorker threads (0: one per "
              "available CPU) that own TLS sessions and relay them to Unix sockets.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* -- module -------------------------------------------------------------------------------- */
static PyStructSequence_Field event_fields[] = {
    {"conn_id", "the connection"},
    {"kind", "ACCEPTED, HANDSHAKE, HANDSHAKE_FAILED or CLOSED"},
    {"reason", "final events: why it ended (None: both directions reached EOF)"},
    {"peer_cert", "HANDSHAKE: the peer's leaf certificate (DER), or None"},
    {"alpn", "HANDSHAKE: the negotiated ALPN protocol, or None"},
    {"version", "HANDSHAKE: the TLS version"},
    {"cipher", "HANDSHAKE: the cipher suite"},
    {"tls_to_app", "CLOSED: plaintext bytes delivered to the app"},
    {"app_to_tls", "CLOSED: plaintext bytes taken from the app into TLS"},
    {"listener", "the engine's listener that accepted it (0: handed over by handshake())"},
    {"relaying", "HANDSHAKE: identity checked and app connected by the engine; relaying"},
    {"remote", "listener connections: the peer's host:port"},
    {"peer_id", "HANDSHAKE with relaying: the peer's SPIFFE ID (None: anonymous)"},
    {"peer_uuid", "HANDSHAKE with relaying: the peer's instance UUID, or None"},
    {NULL, NULL},
};

static PyStructSequence_Desc event_desc = {
    "meshproxy._native_tls.Event",
    "What the engine reports about a connection.",
    event_fields,
    14,
};

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
    if (OPENSSL_init_ssl(0, NULL) != 1 || mp_context_global_init() < 0 ||
        mp_engine_global_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL initialisation failed");
        return -1;
    }
    if (NativeError == NULL) {
        NativeError = PyErr_NewExceptionWithDoc(
            "meshproxy._native_tls.NativeError",
            "A failure inside the native TLS engine; the message says what and why.", NULL,
            NULL);
        if (NativeError == NULL) {
            return -1;
        }
    }
    if (EventType == NULL) {
        EventType = PyStructSequence_NewType(&event_desc);
        if (EventType == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&EngineType) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "ENGINE_API", MESHPROXY_ENGINE_API) < 0 ||
        PyModule_AddIntConstant(module, "HANDSHAKE", MP_EV_HANDSHAKE) < 0 ||
        PyModule_AddIntConstant(module, "HANDSHAKE_FAILED", MP_EV_HANDSHAKE_FAILED) < 0 ||
        PyModule_AddIntConstant(module, "CLOSED", MP_EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(module, "ACCEPTED", MP_EV_ACCEPTED) < 0 ||
        PyModule_AddObjectRef(module, "NativeError", NativeError) < 0 ||
        PyModule_AddObjectRef(module, "Event", (PyObject *)EventType) < 0 ||
        PyModule_AddObjectRef(module, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObjectRef(module, "Engine", (PyObject *)&EngineType) < 0) {
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
    .m_doc = "The C TLS engine of meshproxy: TLS sessions and the TLS <-> Unix-socket relay "
             "of tcp listeners, run by worker threads without the GIL.",
    .m_size = 0,
    .m_methods = native_tls_methods,
    .m_slots = native_tls_slots,
};

PyMODINIT_FUNC
PyInit__native_tls(void)
{
    return PyModuleDef_Init(&native_tls_module);
}
