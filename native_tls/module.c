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
#define EVENT_FIELDS 16

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

/* relay_h2's policy: (headers, tables, max_streams, max_header_bytes, burst, rate) where
 * headers = [(name, value)], tables = [(nomatch, [(methods, path, exact, allowed, reason)])]
 * (bytes). */
static h2r_policy *
policy_from(PyObject *spec)
{
    PyObject *headers, *tables;
    unsigned int max_streams, max_header_bytes, burst;
    double rate;
    if (!PyArg_ParseTuple(spec, "O!O!IIId;policy must be (headers, tables, max_streams, "
                          "max_header_bytes, reset_burst, reset_rate)", &PyList_Type, &headers,
                          &PyList_Type, &tables, &max_streams, &max_header_bytes, &burst, &rate)) {
        return NULL;
    }
    if (max_streams < 1 || max_header_bytes < 1024 || rate < 0) {
        PyErr_SetString(PyExc_ValueError, "policy limits out of range");
        return NULL;
    }
    h2r_policy *p = h2r_policy_new(max_streams, max_header_bytes, burst, rate);
    if (p == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        const char *name, *value;
        Py_ssize_t nlen, vlen;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(headers, i), "y#y#;a header is (name, value)",
                              &name, &nlen, &value, &vlen)) {
            goto fail;
        }
        if (h2r_policy_add_header(p, name, (size_t)nlen, value, (size_t)vlen) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(tables); t++) {
        PyObject *rules;
        const char *nomatch;
        Py_ssize_t nomatch_len;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(tables, t), "y#O!;a route table is (nomatch, rules)",
                              &nomatch, &nomatch_len, &PyList_Type, &rules)) {
            goto fail;
        }
        if (h2r_policy_add_table(p, nomatch, (size_t)nomatch_len) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rules); i++) {
            PyObject *methods;
            const char *path, *why;
            Py_ssize_t plen, why_len;
            int exact, allowed;
            if (!PyArg_ParseTuple(PyList_GET_ITEM(rules, i),
                                  "O!y#ppy#;a rule is (methods, path, exact, allowed, reason)",
                                  &PyTuple_Type, &methods, &path, &plen, &exact, &allowed, &why,
                                  &why_len)) {
                goto fail;
            }
            Py_ssize_t nm = PyTuple_GET_SIZE(methods);
            const char *names[32];
            size_t lens[32];
            if (nm > 32) {
                PyErr_SetString(PyExc_ValueError, "at most 32 methods per rule");
                goto fail;
            }
            for (Py_ssize_t m = 0; m < nm; m++) {
                PyObject *item = PyTuple_GET_ITEM(methods, m);
                if (!PyBytes_Check(item)) {
                    PyErr_SetString(PyExc_TypeError, "methods are bytes");
                    goto fail;
                }
                names[m] = PyBytes_AS_STRING(item);
                lens[m] = (size_t)PyBytes_GET_SIZE(item);
            }
            if (h2r_policy_add_rule(p, names, lens, (size_t)nm, path, (size_t)plen, exact,
                                    allowed, why, (size_t)why_len) < 0) {
                PyErr_NoMemory();
                goto fail;
            }
        }
    }
    return p;
fail:
    h2r_policy_free(p);
    return NULL;
}

static PyObject *
Engine_relay_h2(EngineObject *self, PyObject *args)
{
    unsigned long long conn_id;
    int fd;
    PyObject *spec;
    if (!PyArg_ParseTuple(args, "KiO!", &conn_id, &fd, &PyTuple_Type, &spec)) {
        return NULL;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must not be negative");
        return NULL;
    }
    h2r_policy *policy = policy_from(spec);
    if (policy == NULL) {
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_relay_h2(self->engine, conn_id, fd, policy, err, sizeof err) < 0) {
        return raise_native(err); /* the engine freed the policy */
    }
    Py_RETURN_NONE;
}

static PyObject *
Engine_drain_h2(EngineObject *self, PyObject *args)
{
    unsigned long long conn_id;
    if (!PyArg_ParseTuple(args, "K", &conn_id)) {
        return NULL;
    }
    char err[ERR_MAX] = "";
    if (mp_engine_drain_h2(self->engine, conn_id, err, sizeof err) < 0) {
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
u64_list(const uint64_t *v, size_t n)
{
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(v ? v[i] : 0);
        if (x == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, x);
    }
    return out;
}

static PyObject *
http_stats_object(const h2r_stats *st)
{
    PyObject *outcomes = PyList_New(0);
    for (size_t i = 0; outcomes != NULL && i < st->noutcomes; i++) {
        const h2r_outcome *o = &st->outcomes[i];
        PyObject *buckets = u64_list(o->buckets, H2R_LATENCY_BUCKETS);
        PyObject *grpc = o->grpc_status < 0 ? Py_NewRef(Py_None)
                                            : PyLong_FromLong(o->grpc_status);
        PyObject *item = buckets && grpc ? Py_BuildValue("(iOOKKOd)", o->status, grpc,
                                                         o->ok ? Py_True : Py_False, o->count,
                                                         o->timed, buckets, o->latency_sum_ms)
                                         : NULL;
        Py_XDECREF(buckets);
        Py_XDECREF(grpc);
        if (item == NULL || PyList_Append(outcomes, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(outcomes);
            break;
        }
        Py_DECREF(item);
    }
    PyObject *allow = u64_list(st->rule_allow, st->nrules);
    PyObject *deny = u64_list(st->rule_deny, st->nrules);
    PyObject *goaway = st->goaway_code == UINT32_MAX ? Py_NewRef(Py_None)
                                                     : PyLong_FromUnsignedLong(st->goaway_code);
    PyObject *out = NULL;
    if (outcomes && allow && deny && goaway) {
        out = Py_BuildValue("{s:K,s:O,s:O,s:O,s:K,s:K,s:K,s:K,s:O}", "requests", st->requests,
                            "outcomes", outcomes, "rule_allow", allow, "rule_deny", deny,
                            "deny_nomatch", st->deny_nomatch, "deny_badpath", st->deny_badpath,
                            "refused_streams", st->refused_streams, "resets", st->resets,
                            "goaway", goaway);
    }
    Py_XDECREF(outcomes);
    Py_XDECREF(allow);
    Py_XDECREF(deny);
    Py_XDECREF(goaway);
    return out;
}

static PyObject *
refusal_object(const h2r_refusal *f)
{
    return Py_BuildValue("(kiNNN)", (unsigned long)f->stream_id, f->status,
                         PyUnicode_DecodeLatin1(f->method, (Py_ssize_t)strlen(f->method), NULL),
                         PyUnicode_DecodeLatin1(f->path, (Py_ssize_t)strlen(f->path), NULL),
                         PyUnicode_DecodeLatin1(f->reason, (Py_ssize_t)strlen(f->reason), NULL));
}

static PyObject *
event_object(const mp_event *ev)
{
    PyObject *item = PyStructSequence_New(EventType);
    if (item == NULL) {
        return NULL;
    }
    PyObject *fields[EVENT_FIELDS] = {
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
        ev->http ? http_stats_object(ev->http) : Py_NewRef(Py_None),
        ev->refusal ? refusal_object(ev->refusal) : Py_NewRef(Py_None),
        PyLong_FromUnsignedLong(ev->listener),
        PyBool_FromLong(ev->relaying),
        optional_str(ev->remote),
        optional_str(ev->peer_id),
        optional_str(ev->peer_uuid),
    };
    int ok = 1;
    for (int i = 0; i < EVENT_FIELDS; i++) {
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
    {"relay_h2", (PyCFunction)Engine_relay_h2, METH_VARARGS,
     "relay_h2(conn_id, fd, policy) -> None\n\nLike relay(), but as an HTTP/2 relay (client h2 "
     "-> app h2c) that decodes request heads: policy = (headers, tables, max_streams, "
     "max_header_bytes, reset_burst, reset_rate); see native_tls/h2relay.h."},
    {"drain_h2", (PyCFunction)Engine_drain_h2, METH_VARARGS,
     "drain_h2(conn_id) -> None\n\nShutdown of an HTTP/2 relay: GOAWAY now; it ends "
     "(reason 'drained') once its streams are done."},
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

/* -- H2Relay: the HTTP/2 relay core alone (sans-IO), for tests and fuzzing ----------------- */
typedef struct {
    PyObject_HEAD
    h2r *relay;
} H2RelayObject;

static PyObject *
H2Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"policy", NULL};
    PyObject *spec;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!", kwlist, &PyTuple_Type, &spec)) {
        return NULL;
    }
    h2r_policy *policy = policy_from(spec);
    if (policy == NULL) {
        return NULL;
    }
    h2r *relay = h2r_new(policy);
    if (relay == NULL) {
        return PyErr_NoMemory();
    }
    H2RelayObject *self = (H2RelayObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        h2r_free(relay);
        return NULL;
    }
    self->relay = relay;
    return (PyObject *)self;
}

static void
H2Relay_dealloc(H2RelayObject *self)
{
    h2r_free(self->relay);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
H2Relay_feed(H2RelayObject *self, PyObject *args, int client)
{
    Py_buffer data;
    unsigned long long now;
    if (!PyArg_ParseTuple(args, "y*K", &data, &now)) {
        return NULL;
    }
    int rc = client ? h2r_feed_client(self->relay, data.buf, (size_t)data.len, now)
                    : h2r_feed_app(self->relay, data.buf, (size_t)data.len, now);
    PyBuffer_Release(&data);
    return PyBool_FromLong(rc == 0);
}

static PyObject *
H2Relay_feed_client(H2RelayObject *self, PyObject *args)
{
    return H2Relay_feed(self, args, 1);
}

static PyObject *
H2Relay_feed_app(H2RelayObject *self, PyObject *args)
{
    return H2Relay_feed(self, args, 0);
}

static PyObject *
H2Relay_take(H2RelayObject *self, int app)
{
    size_t len;
    const uint8_t *p = app ? h2r_out_app(self->relay, &len) : h2r_out_client(self->relay, &len);
    PyObject *out = PyBytes_FromStringAndSize((const char *)p, p ? (Py_ssize_t)len : 0);
    if (out != NULL && len > 0) {
        if (app) {
            h2r_consumed_app(self->relay, len);
        } else {
            h2r_consumed_client(self->relay, len);
        }
    }
    return out;
}

static PyObject *
H2Relay_take_app(H2RelayObject *self, PyObject *Py_UNUSED(ignored))
{
    return H2Relay_take(self, 1);
}

static PyObject *
H2Relay_take_client(H2RelayObject *self, PyObject *Py_UNUSED(ignored))
{
    return H2Relay_take(self, 0);
}

static PyObject *
H2Relay_refusals(H2RelayObject *self, PyObject *Py_UNUSED(ignored))
{
    h2r_refusal list[32];
    size_t n = h2r_take_refusals(self->relay, list, 32);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *item = refusal_object(&list[i]);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *
H2Relay_stats(H2RelayObject *self, PyObject *args)
{
    unsigned long long now = 0;
    int finish = 0;
    if (!PyArg_ParseTuple(args, "|Kp", &now, &finish)) {
        return NULL;
    }
    h2r_stats *st = finish ? h2r_finish(self->relay, now) : h2r_take(self->relay);
    if (st == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *out = http_stats_object(st);
    h2r_stats_free(st);
    return out;
}

static PyObject *
H2Relay_drain(H2RelayObject *self, PyObject *Py_UNUSED(ignored))
{
    h2r_drain(self->relay);
    Py_RETURN_NONE;
}

static PyObject *
H2Relay_get_drained(H2RelayObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(h2r_drained(self->relay));
}

static PyObject *
H2Relay_get_failed(H2RelayObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(h2r_failed(self->relay));
}

static PyObject *
H2Relay_get_error(H2RelayObject *self, void *Py_UNUSED(closure))
{
    return optional_str(h2r_error(self->relay));
}

static PyMethodDef H2Relay_methods[] = {
    {"feed_client", (PyCFunction)H2Relay_feed_client, METH_VARARGS,
     "feed_client(data, now_ns) -> bool\n\nBytes the client sent; False once the relay failed."},
    {"feed_app", (PyCFunction)H2Relay_feed_app, METH_VARARGS,
     "feed_app(data, now_ns) -> bool\n\nBytes the app sent; False once the relay failed."},
    {"take_app", (PyCFunction)H2Relay_take_app, METH_NOARGS, "Bytes for the app (taken)."},
    {"take_client", (PyCFunction)H2Relay_take_client, METH_NOARGS,
     "Bytes for the client (taken)."},
    {"refusals", (PyCFunction)H2Relay_refusals, METH_NOARGS,
     "Refused requests since the last call: (stream_id, status, method, path, reason)."},
    {"drain", (PyCFunction)H2Relay_drain, METH_NOARGS, "Shutdown: GOAWAY, no new streams."},
    {"stats", (PyCFunction)H2Relay_stats, METH_VARARGS,
     "stats(now_ns=0, finish=False) -> dict\n\nCounters since the last call; finish: count "
     "open streams as reset first."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef H2Relay_getset[] = {
    {"failed", (getter)H2Relay_get_failed, NULL, "The relay failed (GOAWAY queued).", NULL},
    {"drained", (getter)H2Relay_get_drained, NULL, "Drained: every stream done.", NULL},
    {"error", (getter)H2Relay_get_error, NULL, "Why it failed, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject H2RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshproxy._native_tls.H2Relay",
    .tp_basicsize = sizeof(H2RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "H2Relay(policy)\n\nThe engine's HTTP/2 relay core without I/O "
              "(native_tls/h2relay.h): feed bytes, take bytes. For tests.",
    .tp_new = H2Relay_new,
    .tp_dealloc = (destructor)H2Relay_dealloc,
    .tp_methods = H2Relay_methods,
    .tp_getset = H2Relay_getset,
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
    {"http", "HTTP_STATS, CLOSED of an HTTP/2 relay: request counters since the last (dict)"},
    {"refusal", "HTTP_REFUSED: (stream_id, status, method, path, reason)"},
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
    EVENT_FIELDS,
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

static PyObject *
ec_method(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    uint64_t uses = 0;
    int installed = mp_context_ec_method(&uses);
    return Py_BuildValue("(NK)", PyBool_FromLong(installed), (unsigned long long)uses);
}

static PyMethodDef native_tls_methods[] = {
    {"openssl_version", openssl_version, METH_NOARGS,
     "openssl_version() -> str\n\nThe version string of the OpenSSL this module runs on."},
    {"ec_method", ec_method, METH_NOARGS,
     "ec_method() -> tuple[bool, int]\n\nWhether OpenSSL's default for EC keys is the "
     "built-in EC method (native_tls/context.c, legacy_ec), and how many EC key operations "
     "took it."},
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
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&EngineType) < 0 ||
        PyType_Ready(&H2RelayType) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "ENGINE_API", MESHPROXY_ENGINE_API) < 0 ||
        PyModule_AddIntConstant(module, "HANDSHAKE", MP_EV_HANDSHAKE) < 0 ||
        PyModule_AddIntConstant(module, "HANDSHAKE_FAILED", MP_EV_HANDSHAKE_FAILED) < 0 ||
        PyModule_AddIntConstant(module, "CLOSED", MP_EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(module, "ACCEPTED", MP_EV_ACCEPTED) < 0 ||
        PyModule_AddIntConstant(module, "HTTP_REFUSED", MP_EV_HTTP_REFUSED) < 0 ||
        PyModule_AddIntConstant(module, "HTTP_STATS", MP_EV_HTTP_STATS) < 0 ||
        PyModule_AddIntConstant(module, "H2_RELAY", 1) < 0 ||
        PyModule_AddObjectRef(module, "NativeError", NativeError) < 0 ||
        PyModule_AddObjectRef(module, "Event", (PyObject *)EventType) < 0 ||
        PyModule_AddObjectRef(module, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObjectRef(module, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObjectRef(module, "H2Relay", (PyObject *)&H2RelayType) < 0) {
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
