/*
 * h2relay: see h2relay.h. Theory of operation.
 *
 * Each direction has a frame parser (9-byte header, then the payload as it arrives) whose
 * mode says what happens to the payload: PASS (copied to the other side as it comes, so a
 * DATA frame never waits for its end), DROP, BLOCK (a request header block, collected up to
 * the header limit and decoded at END_HEADERS), SNOOP (an app header block: passed and
 * collected, decoded to keep the HPACK state) and SETTINGS (collected, read, passed on;
 * the app's are capped to our limits). Frames of our own for the client (replies,
 * RST_STREAM, WINDOW_UPDATE, GOAWAY) wait in `pending` until the app -> client parser is at
 * a frame boundary outside a header block, so they never split an app frame.
 */
#include "h2relay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#define PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define PREFACE_LEN 24
#define FRAME_HDR 9
#define DEFAULT_FRAME 16384
#define SETTINGS_MAX 4096 /* bytes of one SETTINGS frame we read */
#define DENIED_RING 64
#define REFUSALS_MAX 32
#define DEFLATE_TABLE 4096

enum { F_DATA, F_HEADERS, F_PRIORITY, F_RST, F_SETTINGS, F_PUSH, F_PING, F_GOAWAY, F_WU, F_CONT };
enum { FL_END_STREAM = 0x1, FL_ACK = 0x1, FL_END_HEADERS = 0x4, FL_PADDED = 0x8, FL_PRIO = 0x20 };
enum {
    E_NO_ERROR = 0,
    E_PROTOCOL = 1,
    E_INTERNAL = 2,
    E_FRAME_SIZE = 6,
    E_REFUSED = 7,
    E_COMPRESSION = 9,
    E_CALM = 11
};
enum { M_PASS, M_DROP, M_BLOCK, M_SNOOP, M_SETTINGS };

const double h2r_latency_bounds_ms[H2R_LATENCY_BUCKETS - 1] = {
    1,    2,    3,    4,     5,     10,    20,    30,    40,    50,    100,   200,  300,
    400,  500,  1000, 2000,  3000,  4000,  5000,  10000, 20000, 30000, 40000, 50000};

/* -- byte buffers ------------------------------------------------------------------------- */
typedef struct {
    uint8_t *data;
    size_t start, end, cap;
} bytes_t;

static int
bytes_reserve(bytes_t *b, size_t n)
{
    if (b->cap - b->end >= n) {
        return 0;
    }
    if (b->start > 0) { /* compact first */
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
        if (b->cap - b->end >= n) {
            return 0;
        }
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->end < n) {
        if (cap > ((size_t)1 << 30)) {
            return -1;
        }
        cap *= 2;
    }
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL) {
        return -1;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

static int
bytes_add(bytes_t *b, const void *p, size_t n)
{
    if (n == 0) {
        return 0;
    }
    if (bytes_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

static inline size_t
bytes_len(const bytes_t *b)
{
    return b->end - b->start;
}

static void
bytes_consume(bytes_t *b, size_t n)
{
    b->start += n;
    if (b->start >= b->end) {
        b->start = b->end = 0;
        if (b->cap > (16u << 10)) { /* a burst made it big: idle connections hold little */
            free(b->data);
            b->data = NULL;
            b->cap = 0;
        }
    }
}

static void
bytes_free(bytes_t *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* -- policy ---------------------------------------------------------------------------------- */
typedef struct {
    char **methods;
    size_t *method_lens;
    size_t nmethods;
    char *path;
    size_t path_len;
    int exact, allowed;
    size_t index;
    char *deny_reason; /* when not allowed: Python's words */
} rule_t;

typedef struct {
    rule_t *rules;
    size_t nrules;
    char *nomatch; /* "no <source> route rule matches" */
} table_t;

typedef struct {
    char *name, *value;
    size_t name_len, value_len;
} hdr_t;

struct h2r_policy {
    hdr_t *add;
    size_t nadd;
    table_t *tables;
    size_t ntables, nrules;
    uint32_t max_streams, max_header_bytes, reset_burst;
    double reset_rate;
};

static char *
dup_bytes(const char *p, size_t n)
{
    char *out = malloc(n + 1);
    if (out != NULL) {
        if (n) {
            memcpy(out, p, n);
        }
        out[n] = '\0';
    }
    return out;
}

h2r_policy *
h2r_policy_new(uint32_t max_concurrent_streams, uint32_t max_header_bytes, uint32_t reset_burst,
               double reset_rate)
{
    h2r_policy *p = calloc(1, sizeof *p);
    if (p != NULL) {
        p->max_streams = max_concurrent_streams ? max_concurrent_streams : 1;
        p->max_header_bytes = max_header_bytes ? max_header_bytes : 1;
        p->reset_burst = reset_burst;
        p->reset_rate = reset_rate;
    }
    return p;
}

void
h2r_policy_free(h2r_policy *p)
{
    if (p == NULL) {
        return;
    }
    for (size_t i = 0; i < p->nadd; i++) {
        free(p->add[i].name);
        free(p->add[i].value);
    }
    free(p->add);
    for (size_t t = 0; t < p->ntables; t++) {
        for (size_t i = 0; i < p->tables[t].nrules; i++) {
            rule_t *r = &p->tables[t].rules[i];
            for (size_t m = 0; m < r->nmethods; m++) {
                free(r->methods[m]);
            }
            free(r->methods);
            free(r->method_lens);
            free(r->path);
            free(r->deny_reason);
        }
        free(p->tables[t].rules);
        free(p->tables[t].nomatch);
    }
    free(p->tables);
    free(p);
}

int
h2r_policy_add_header(h2r_policy *p, const char *name, size_t name_len, const char *value,
                      size_t value_len)
{
    hdr_t *add = realloc(p->add, (p->nadd + 1) * sizeof *add);
    if (add == NULL) {
        return -1;
    }
    p->add = add;
    hdr_t *h = &add[p->nadd];
    h->name = dup_bytes(name, name_len);
    h->value = dup_bytes(value, value_len);
    if (h->name == NULL || h->value == NULL) {
        free(h->name);
        free(h->value);
        return -1;
    }
    h->name_len = name_len;
    h->value_len = value_len;
    p->nadd++;
    return 0;
}

int
h2r_policy_add_table(h2r_policy *p, const char *nomatch, size_t nomatch_len)
{
    table_t *t = realloc(p->tables, (p->ntables + 1) * sizeof *t);
    if (t == NULL) {
        return -1;
    }
    p->tables = t;
    memset(&t[p->ntables], 0, sizeof *t);
    t[p->ntables].nomatch = dup_bytes(nomatch, nomatch_len);
    if (t[p->ntables].nomatch == NULL) {
        return -1;
    }
    return (int)p->ntables++;
}

int
h2r_policy_add_rule(h2r_policy *p, const char *const *methods, const size_t *method_lens,
                    size_t nmethods, const char *path, size_t path_len, int exact, int allowed,
                    const char *deny_reason, size_t deny_reason_len)
{
    if (p->ntables == 0) {
        return -1;
    }
    table_t *t = &p->tables[p->ntables - 1];
    rule_t *rules = realloc(t->rules, (t->nrules + 1) * sizeof *rules);
    if (rules == NULL) {
        return -1;
    }
    t->rules = rules;
    rule_t *r = &rules[t->nrules];
    memset(r, 0, sizeof *r);
    r->path = dup_bytes(path, path_len);
    r->deny_reason = dup_bytes(deny_reason, deny_reason_len);
    r->methods = nmethods ? calloc(nmethods, sizeof *r->methods) : NULL;
    r->method_lens = nmethods ? calloc(nmethods, sizeof *r->method_lens) : NULL;
    int ok = r->path != NULL && r->deny_reason != NULL && (nmethods == 0 || (r->methods && r->method_lens));
    for (size_t i = 0; ok && i < nmethods; i++) {
        r->methods[i] = dup_bytes(methods[i], method_lens[i]);
        r->method_lens[i] = method_lens[i];
        ok = r->methods[i] != NULL;
        r->nmethods = i + 1;
    }
    if (!ok) {
        for (size_t i = 0; i < r->nmethods; i++) {
            free(r->methods[i]);
        }
        free(r->methods);
        free(r->method_lens);
        free(r->path);
        free(r->deny_reason);
        return -1;
    }
    r->nmethods = nmethods;
    r->path_len = path_len;
    r->exact = exact;
    r->allowed = allowed;
    r->index = p->nrules++;
    t->nrules++;
    return 0;
}

/* -- the relay state ------------------------------------------------------------------------- */
typedef struct {
    uint8_t hdr[FRAME_HDR];
    size_t hlen;
    uint32_t len, sid;
    uint8_t type, flags;
    size_t left; /* payload bytes still to come */
    int mode;
} parser_t;

typedef struct {
    uint32_t id;
    uint64_t start_ns;
    int status, grpc;
    double head_ms; /* time to the response head */
    uint8_t client_ended, app_ended, responded, recorded;
} stream_t;

typedef struct {
    const uint8_t *name, *value;
    size_t name_len, value_len;
} nvref_t;

struct h2r {
    h2r_policy *pol;
    bytes_t to_app, to_client, pending;
    parser_t cp, ap;
    size_t preface;
    /* header blocks being collected */
    bytes_t cblock, ablock;
    uint32_t cblock_sid, ablock_sid;
    uint8_t cblock_end_stream, ablock_end_stream, c_in_block, a_in_block, ablock_push;
    bytes_t settings;
    nghttp2_hd_inflater *c_infl, *a_infl;
    nghttp2_hd_deflater *defl;
    uint32_t app_max_frame;
    uint32_t last_sid;
    stream_t *streams;
    size_t nstreams;
    uint32_t denied[DENIED_RING];
    size_t denied_next;
    uint64_t dropped; /* DATA bytes of denied streams not yet given back */
    /* decoded request headers (the arena holds copies) */
    bytes_t arena;
    nvref_t *nv;
    size_t nnv, nv_cap;
    nghttp2_nv *out_nv;
    size_t out_nv_cap;
    bytes_t scratch;
    double tokens;
    uint64_t tokens_at;
    h2r_refusal refusals[REFUSALS_MAX];
    size_t nrefusals;
    /* HPACK: the client's table size changes, which the next header block it gets must
     * announce (RFC 7541 4.2): owed from the app's SETTINGS ACK to the app's next block */
    uint32_t c_table_size, c_table_min;
    uint8_t c_table_changed, update_owed;
    uint8_t app_started; /* the app's first SETTINGS went to the client */
    uint8_t draining;    /* our GOAWAY (shutdown) is queued or sent */
    uint32_t owed_min, owed_final;
    h2r_stats stats;
    int rules_dirty;
    int failed;
    char error[H2R_ERROR_MAX];
};

static void
put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t
get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
frame_header(uint8_t *h, size_t len, uint8_t type, uint8_t flags, uint32_t sid)
{
    h[0] = (uint8_t)(len >> 16);
    h[1] = (uint8_t)(len >> 8);
    h[2] = (uint8_t)len;
    h[3] = type;
    h[4] = flags;
    put32(h + 5, sid & 0x7fffffffu);
}

static int
emit_frame(bytes_t *out, uint8_t type, uint8_t flags, uint32_t sid, const void *payload,
           size_t len)
{
    uint8_t h[FRAME_HDR];
    frame_header(h, len, type, flags, sid);
    if (bytes_reserve(out, FRAME_HDR + len) < 0) {
        return -1;
    }
    bytes_add(out, h, FRAME_HDR);
    return bytes_add(out, payload, len);
}

static int
fail(h2r *r, uint32_t code, const char *why)
{
    if (r->failed) {
        return -1;
    }
    r->failed = 1;
    snprintf(r->error, sizeof r->error, "HTTP/2: %s", why);
    r->stats.goaway_code = code;
    /* GOAWAY only at a frame boundary of the app's stream; else the client gets EOF */
    if (r->ap.hlen == 0 && !r->a_in_block) {
        uint8_t g[8];
        put32(g, r->last_sid);
        put32(g + 4, code);
        if (!r->app_started) { /* a server speaks SETTINGS first, even to say goodbye */
            emit_frame(&r->to_client, F_SETTINGS, 0, 0, NULL, 0);
        }
        bytes_add(&r->to_client, r->pending.data + r->pending.start, bytes_len(&r->pending));
        emit_frame(&r->to_client, F_GOAWAY, 0, 0, g, sizeof g);
        bytes_consume(&r->pending, bytes_len(&r->pending));
    }
    return -1;
}

static int
oom(h2r *r)
{
    return fail(r, E_INTERNAL, "out of memory");
}

/* Our frames go out at the next app frame boundary outside a header block. */
static int
flush_pending(h2r *r)
{
    /* never before the app's SETTINGS: a server's first frame (RFC 9113 3.4) */
    if (bytes_len(&r->pending) == 0 || r->ap.hlen != 0 || r->a_in_block || !r->app_started) {
        return 0;
    }
    if (bytes_add(&r->to_client, r->pending.data + r->pending.start, bytes_len(&r->pending)) < 0) {
        return oom(r);
    }
    bytes_consume(&r->pending, bytes_len(&r->pending));
    return 0;
}

h2r *
h2r_new(h2r_policy *policy)
{
    h2r *r = calloc(1, sizeof *r);
    if (r == NULL) {
        h2r_policy_free(policy);
        return NULL;
    }
    r->pol = policy;
    r->app_max_frame = DEFAULT_FRAME;
    r->c_table_size = 4096;
    r->tokens = policy->reset_burst;
    r->stats.goaway_code = UINT32_MAX;
    r->stats.nrules = policy->nrules;
    r->streams = calloc(policy->max_streams, sizeof *r->streams);
    if (policy->nrules) {
        r->stats.rule_allow = calloc(policy->nrules, sizeof(uint64_t));
        r->stats.rule_deny = calloc(policy->nrules, sizeof(uint64_t));
    }
    if (r->streams == NULL || (policy->nrules && (!r->stats.rule_allow || !r->stats.rule_deny)) ||
        nghttp2_hd_inflate_new(&r->c_infl) != 0 || nghttp2_hd_inflate_new(&r->a_infl) != 0 ||
        nghttp2_hd_deflate_new(&r->defl, DEFLATE_TABLE) != 0) {
        h2r_free(r);
        return NULL;
    }
    return r;
}

void
h2r_free(h2r *r)
{
    if (r == NULL) {
        return;
    }
    if (r->c_infl) {
        nghttp2_hd_inflate_del(r->c_infl);
    }
    if (r->a_infl) {
        nghttp2_hd_inflate_del(r->a_infl);
    }
    if (r->defl) {
        nghttp2_hd_deflate_del(r->defl);
    }
    bytes_free(&r->to_app);
    bytes_free(&r->to_client);
    bytes_free(&r->pending);
    bytes_free(&r->cblock);
    bytes_free(&r->ablock);
    bytes_free(&r->settings);
    bytes_free(&r->arena);
    bytes_free(&r->scratch);
    free(r->nv);
    free(r->out_nv);
    free(r->streams);
    free(r->stats.rule_allow);
    free(r->stats.rule_deny);
    h2r_policy_free(r->pol);
    free(r);
}

/* -- streams and metrics ------------------------------------------------------------------- */
static stream_t *
stream_find(h2r *r, uint32_t id)
{
    for (size_t i = 0; i < r->nstreams; i++) {
        if (r->streams[i].id == id) {
            return &r->streams[i];
        }
    }
    return NULL;
}

static void
stream_remove(h2r *r, stream_t *s)
{
    *s = r->streams[--r->nstreams];
}

static int
is_denied(const h2r *r, uint32_t id)
{
    for (size_t i = 0; i < DENIED_RING; i++) {
        if (r->denied[i] == id && id != 0) {
            return 1;
        }
    }
    return 0;
}

static void
deny_stream(h2r *r, uint32_t id)
{
    r->denied[r->denied_next] = id;
    r->denied_next = (r->denied_next + 1) % DENIED_RING;
}

static void
record(h2r *r, int status, int grpc, int ok, int timed, double ms)
{
    h2r_stats *st = &r->stats;
    h2r_outcome *o = NULL;
    for (size_t i = 0; i < st->noutcomes; i++) {
        h2r_outcome *x = &st->outcomes[i];
        if (x->status == status && x->grpc_status == grpc && x->ok == ok) {
            o = x;
            break;
        }
    }
    if (o == NULL) {
        if (st->noutcomes < H2R_MAX_OUTCOMES) {
            o = &st->outcomes[st->noutcomes++];
            o->status = status;
            o->grpc_status = grpc;
            o->ok = ok;
        } else {
            o = &st->outcomes[H2R_MAX_OUTCOMES - 1];
        }
    }
    o->count++;
    if (timed) {
        size_t b = 0;
        while (b < H2R_LATENCY_BUCKETS - 1 && ms > h2r_latency_bounds_ms[b]) {
            b++;
        }
        o->buckets[b]++;
        o->latency_sum_ms += ms;
        o->timed++;
    }
}

static double
ms_since(uint64_t start, uint64_t now)
{
    return now > start ? (double)(now - start) / 1e6 : 0.0;
}

/* The response ended (or the stream broke): one outcome, as Python's Observer.finished. */
static void
stream_record(h2r *r, stream_t *s, int reset, uint64_t now)
{
    if (s->recorded) {
        return;
    }
    s->recorded = 1;
    int ok = !reset && s->status >= 200 && s->status < 500 && (s->grpc == -1 || s->grpc == 0);
    /* timed to the response head; never responded: timed now, with status 0 (as Python) */
    double ms = s->responded ? s->head_ms : ms_since(s->start_ns, now);
    record(r, s->responded ? s->status : 0, reset ? -1 : s->grpc, ok, 1, ms);
}

/* -- HPACK helpers ------------------------------------------------------------------------- */
static int
hp_int(bytes_t *b, uint8_t first, int prefix, size_t v)
{
    uint8_t buf[16];
    size_t n = 0;
    size_t max = ((size_t)1 << prefix) - 1;
    if (v < max) {
        buf[n++] = (uint8_t)(first | v);
    } else {
        buf[n++] = (uint8_t)(first | max);
        v -= max;
        while (v >= 128) {
            buf[n++] = (uint8_t)((v & 0x7f) | 0x80);
            v >>= 7;
        }
        buf[n++] = (uint8_t)v;
    }
    return bytes_add(b, buf, n);
}

/* literal without indexing: static name index, or a new name (index 0) */
static int
hp_literal(bytes_t *b, size_t name_index, const char *name, const char *value, size_t vlen)
{
    int rc = hp_int(b, 0x00, 4, name_index);
    if (name_index == 0) {
        size_t nlen = strlen(name);
        rc |= hp_int(b, 0x00, 7, nlen);
        rc |= bytes_add(b, name, nlen);
    }
    rc |= hp_int(b, 0x00, 7, vlen);
    rc |= bytes_add(b, value, vlen);
    return rc;
}

/* A header value the proxy writes: printable ASCII only. */
static void
printable(char *out, size_t n, const char *in, size_t len)
{
    size_t j = 0;
    for (size_t i = 0; i < len && j + 1 < n; i++) {
        unsigned char ch = (unsigned char)in[i];
        out[j++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    out[j] = '\0';
}

/* -- our replies ------------------------------------------------------------------------- */
static int
queue_rst(h2r *r, uint32_t sid, uint32_t code)
{
    uint8_t p[4];
    put32(p, code);
    if (emit_frame(&r->pending, F_RST, 0, sid, p, 4) < 0) {
        return oom(r);
    }
    return flush_pending(r);
}

static int
queue_window_update(h2r *r, uint32_t increment)
{
    uint8_t p[4];
    put32(p, increment & 0x7fffffffu);
    if (increment == 0) {
        return 0;
    }
    if (emit_frame(&r->pending, F_WU, 0, 0, p, 4) < 0) {
        return oom(r);
    }
    return flush_pending(r);
}

/* A response of ours: trailers-only gRPC (200 + grpc-status) or a body-less HTTP status
 * (DATA of ours would take connection credit the app does not know about). */
static int
queue_reply(h2r *r, uint32_t sid, int status, int grpc, int grpc_code, const char *reason,
            int request_ended)
{
    bytes_t *b = &r->scratch;
    b->start = b->end = 0;
    char value[H2R_ERROR_MAX];
    printable(value, sizeof value, reason, strlen(reason));
    int rc = 0;
    if (r->update_owed) { /* ours is the client's first block under its new table size */
        if (r->owed_min < r->owed_final) {
            rc |= hp_int(b, 0x20, 5, r->owed_min);
        }
        rc |= hp_int(b, 0x20, 5, r->owed_final);
        r->update_owed = 0;
    }
    if (grpc) {
        char code[8];
        snprintf(code, sizeof code, "%d", grpc_code);
        rc |= bytes_add(b, "\x88", 1); /* :status 200, static index 8 */
        rc |= hp_literal(b, 31, NULL, "application/grpc", 16);
        rc |= hp_literal(b, 0, "grpc-status", code, strlen(code));
        char quoted[3 * H2R_ERROR_MAX];
        size_t q = 0;
        for (const char *c = reason; *c && q + 4 < sizeof quoted; c++) {
            unsigned char ch = (unsigned char)*c;
            if (ch >= 0x20 && ch < 0x7f && ch != '%') {
                quoted[q++] = (char)ch;
            } else {
                q += (size_t)snprintf(quoted + q, sizeof quoted - q, "%%%02X", ch);
            }
        }
        rc |= hp_literal(b, 0, "grpc-message", quoted, q);
        rc |= hp_literal(b, 0, "meshproxy-error", value, strlen(value));
    } else {
        char code[8];
        snprintf(code, sizeof code, "%d", status);
        rc |= hp_literal(b, 8, NULL, code, strlen(code)); /* :status */
        rc |= hp_literal(b, 28, NULL, "0", 1);            /* content-length */
        rc |= hp_literal(b, 0, "meshproxy-error", value, strlen(value));
    }
    if (rc != 0 || bytes_len(b) > DEFAULT_FRAME ||
        emit_frame(&r->pending, F_HEADERS, FL_END_STREAM | FL_END_HEADERS, sid,
                   b->data + b->start, bytes_len(b)) < 0) {
        return oom(r);
    }
    if (!request_ended) { /* RFC 9113 8.1: the client may stop sending its body */
        uint8_t p[4];
        put32(p, E_NO_ERROR);
        if (emit_frame(&r->pending, F_RST, 0, sid, p, 4) < 0) {
            return oom(r);
        }
    }
    return flush_pending(r);
}

static void
note_refusal(h2r *r, uint32_t sid, int status, const nvref_t *method, const nvref_t *path,
             const char *reason)
{
    if (r->nrefusals >= REFUSALS_MAX) {
        return;
    }
    h2r_refusal *f = &r->refusals[r->nrefusals++];
    f->stream_id = sid;
    f->status = status;
    printable(f->method, sizeof f->method, method ? (const char *)method->value : "",
              method ? method->value_len : 0);
    printable(f->path, sizeof f->path, path ? (const char *)path->value : "",
              path ? path->value_len : 0);
    snprintf(f->reason, sizeof f->reason, "%s", reason);
}

/* -- route rules (meshproxy/proxy/http/_routes.py, manifest.path_problem) -------------------- */
static const char *const path_problems[] = {
    NULL,
    "must start with '/'",
    "must be a path only (no query, fragment, spaces or control characters)",
    "must be in normal form (no '//', '.' or '..' segments, %2e, %2f, %5c, %00, '\\')",
};

/* manifest.path_problem: 0, or an index into path_problems (the first that applies). */
static int
path_problem(const uint8_t *p, size_t n)
{
    if (n == 0 || p[0] != '/') {
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] <= 0x20 || p[i] == 0x7f || p[i] == '#' || p[i] == '?') {
            return 2;
        }
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t ch = p[i];
        if (ch == '\\') {
            return 3;
        }
        if (ch == '/' && i + 1 < n) {
            if (p[i + 1] == '/') {
                return 3;
            }
            if (p[i + 1] == '.') { /* "/." or "/.." then '/' or the end */
                size_t j = i + 2;
                if (j < n && p[j] == '.') {
                    j++;
                }
                if (j == n || p[j] == '/') {
                    return 3;
                }
            }
        }
        if (ch == '%' && i + 2 < n) {
            uint8_t a = p[i + 1], b = p[i + 2] | 0x20;
            if ((a == '2' && (b == 'e' || b == 'f')) || (a == '5' && b == 'c') ||
                (a == '0' && p[i + 2] == '0')) {
                return 3;
            }
        }
    }
    return 0;
}

typedef struct {
    int allowed, status;
    long rule; /* deciding rule's index, -1 when none */
    char reason[H2R_ERROR_MAX];
} decision_t;

static int
rule_matches(const rule_t *rule, const nvref_t *method, const uint8_t *path, size_t n)
{
    if (rule->nmethods) {
        int found = 0;
        for (size_t i = 0; i < rule->nmethods && !found; i++) {
            found = method && method->value_len == rule->method_lens[i] &&
                    memcmp(method->value, rule->methods[i], method->value_len) == 0;
        }
        if (!found) {
            return 0;
        }
    }
    if (rule->exact) {
        return n == rule->path_len && memcmp(path, rule->path, n) == 0;
    }
    if (n == rule->path_len && memcmp(path, rule->path, n) == 0) {
        return 1;
    }
    return n > rule->path_len && memcmp(path, rule->path, rule->path_len) == 0 &&
           path[rule->path_len] == '/';
}

static void
decide(const h2r *r, const nvref_t *method, const nvref_t *path, decision_t *d)
{
    d->allowed = 1;
    d->status = 200;
    d->rule = -1;
    d->reason[0] = '\0';
    if (r->pol->ntables == 0) {
        return;
    }
    const uint8_t *p = path ? path->value : (const uint8_t *)"";
    size_t n = path ? path->value_len : 0;
    const uint8_t *q = memchr(p, '?', n);
    if (q != NULL) {
        n = (size_t)(q - p);
    }
    int problem = path_problem(p, n);
    if (problem) {
        char shown[100];
        printable(shown, sizeof shown, (const char *)p, n);
        d->allowed = 0;
        d->status = 400;
        snprintf(d->reason, sizeof d->reason, "path '%s' %s", shown, path_problems[problem]);
        return;
    }
    char verb[24], shown[120];
    printable(verb, sizeof verb, method ? (const char *)method->value : "",
              method ? method->value_len : 0);
    printable(shown, sizeof shown, (const char *)p, n);
    for (size_t t = 0; t < r->pol->ntables; t++) {
        const table_t *table = &r->pol->tables[t];
        const rule_t *rule = NULL;
        for (size_t i = 0; i < table->nrules && rule == NULL; i++) {
            if (rule_matches(&table->rules[i], method, p, n)) {
                rule = &table->rules[i];
            }
        }
        if (rule == NULL) {
            d->allowed = 0;
            d->status = 403;
            d->rule = -1;
            snprintf(d->reason, sizeof d->reason, "%s %s %s", table->nomatch, verb, shown);
            return;
        }
        d->rule = (long)rule->index;
        if (!rule->allowed) {
            d->allowed = 0;
            d->status = 403;
            snprintf(d->reason, sizeof d->reason, "%s", rule->deny_reason);
            return;
        }
    }
}

/* -- header blocks ------------------------------------------------------------------------- */
/* Strip padding and priority from the first frame's payload in `block`. */
static int
unpad(bytes_t *block, uint8_t flags, size_t skip_front)
{
    uint8_t *p = block->data + block->start;
    size_t n = bytes_len(block), off = 0, pad = 0;
    if (flags & FL_PADDED) {
        if (n < 1) {
            return -1;
        }
        pad = p[0];
        off = 1;
    }
    off += skip_front;
    if (off + pad > n) {
        return -1;
    }
    block->start += off;
    block->end -= pad;
    return 0;
}

static int
arena_keep(h2r *r, const nghttp2_nv *nv)
{
    if (r->nnv == r->nv_cap) {
        size_t cap = r->nv_cap ? r->nv_cap * 2 : 32;
        nvref_t *p = realloc(r->nv, cap * sizeof *p);
        if (p == NULL) {
            return -1;
        }
        r->nv = p;
        r->nv_cap = cap;
    }
    /* offsets now, pointers once the arena stops moving */
    size_t at = r->arena.end;
    if (bytes_add(&r->arena, nv->name, nv->namelen) < 0 ||
        bytes_add(&r->arena, nv->value, nv->valuelen) < 0) {
        return -1;
    }
    nvref_t *ref = &r->nv[r->nnv++];
    ref->name = (const uint8_t *)(uintptr_t)at;
    ref->name_len = nv->namelen;
    ref->value = (const uint8_t *)(uintptr_t)(at + nv->namelen);
    ref->value_len = nv->valuelen;
    return 0;
}

/* A small decimal number of at most `max` digits, or -1. */
static int
digits(const uint8_t *p, size_t n, size_t max)
{
    if (n == 0 || n > max) {
        return -1;
    }
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return -1;
        }
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* Decode a block. keep: copy the headers (up to the size limit: *too_large beyond it). */
static int
inflate_block(h2r *r, nghttp2_hd_inflater *inf, const uint8_t *in, size_t len, int keep,
              int *too_large, int *status, int *grpc)
{
    size_t list = 0;
    r->nnv = 0;
    r->arena.start = r->arena.end = 0;
    for (;;) {
        nghttp2_nv nv;
        int fl = 0;
        ssize_t rv = nghttp2_hd_inflate_hd2(inf, &nv, &fl, in, len, 1);
        if (rv < 0 || (rv == 0 && !(fl & (NGHTTP2_HD_INFLATE_EMIT | NGHTTP2_HD_INFLATE_FINAL)))) {
            return -1;
        }
        in += rv;
        len -= (size_t)rv;
        if (fl & NGHTTP2_HD_INFLATE_EMIT) {
            list += nv.namelen + nv.valuelen + 32;
            if (keep && !*too_large) {
                if (list > r->pol->max_header_bytes) {
                    *too_large = 1;
                } else if (arena_keep(r, &nv) < 0) {
                    return -2;
                }
            }
            if (status && nv.namelen == 7 && memcmp(nv.name, ":status", 7) == 0) {
                int v = digits(nv.value, nv.valuelen, 3);
                *status = v >= 100 ? v : 0; /* a metrics label: three digits or nothing */
            }
            if (grpc && nv.namelen == 11 && memcmp(nv.name, "grpc-status", 11) == 0) {
                *grpc = digits(nv.value, nv.valuelen, 2); /* 0..16; -1: not a number */
            }
        }
        if (fl & NGHTTP2_HD_INFLATE_FINAL) {
            nghttp2_hd_inflate_end_headers(inf);
            break;
        }
        if ((fl & NGHTTP2_HD_INFLATE_EMIT) == 0 && len == 0) {
            return -1; /* truncated block */
        }
    }
    for (size_t i = 0; i < r->nnv; i++) { /* offsets -> pointers */
        nvref_t *v = &r->nv[i];
        v->name = r->arena.data + (uintptr_t)v->name;
        v->value = r->arena.data + (uintptr_t)v->value;
    }
    return 0;
}

static int
name_is(const nvref_t *h, const char *name)
{
    size_t n = strlen(name);
    return h->name_len == n && memcmp(h->name, name, n) == 0;
}

/* Headers a client may not send on (meshproxy/proxy/http/_headers.py): identity claims and
 * connection-specific fields (te survives only as "trailers"). */
static int
dropped_header(const nvref_t *h)
{
    if (h->name_len >= 4 && memcmp(h->name, "l5d-", 4) == 0) {
        return 1;
    }
    static const char *const names[] = {
        "x-forwarded-client-cert", "forwarded",  "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id", "connection", "keep-alive",
        "proxy-connection",         "transfer-encoding", "upgrade",
        "http2-settings",           "proxy-authenticate", "proxy-authorization",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (name_is(h, names[i])) {
            return 1;
        }
    }
    if (name_is(h, "te")) {
        return !(h->value_len == 8 && memcmp(h->value, "trailers", 8) == 0);
    }
    return 0;
}

static int
out_nv_push(h2r *r, size_t *n, const void *name, size_t nlen, const void *value, size_t vlen)
{
    if (*n == r->out_nv_cap) {
        size_t cap = r->out_nv_cap ? r->out_nv_cap * 2 : 32;
        nghttp2_nv *p = realloc(r->out_nv, cap * sizeof *p);
        if (p == NULL) {
            return -1;
        }
        r->out_nv = p;
        r->out_nv_cap = cap;
    }
    nghttp2_nv *nv = &r->out_nv[(*n)++];
    nv->name = (uint8_t *)(uintptr_t)name;
    nv->namelen = nlen;
    nv->value = (uint8_t *)(uintptr_t)value;
    nv->valuelen = vlen;
    nv->flags = NGHTTP2_NV_FLAG_NONE;
    return 0;
}

/* Encode the kept headers (minus the dropped, plus ours) as HEADERS (+ CONTINUATION). */
static int
forward_block(h2r *r, uint32_t sid, int end_stream, int add_identity)
{
    size_t n = 0;
    for (size_t i = 0; i < r->nnv; i++) {
        const nvref_t *h = &r->nv[i];
        if (!dropped_header(h) && out_nv_push(r, &n, h->name, h->name_len, h->value,
                                              h->value_len) < 0) {
            return oom(r);
        }
    }
    for (size_t i = 0; add_identity && i < r->pol->nadd; i++) {
        const hdr_t *h = &r->pol->add[i];
        if (out_nv_push(r, &n, h->name, h->name_len, h->value, h->value_len) < 0) {
            return oom(r);
        }
    }
    bytes_t *b = &r->scratch;
    b->start = b->end = 0;
    size_t bound = nghttp2_hd_deflate_bound(r->defl, r->out_nv, n);
    if (bytes_reserve(b, bound) < 0) {
        return oom(r);
    }
    ssize_t len = nghttp2_hd_deflate_hd(r->defl, b->data, bound, r->out_nv, n);
    if (len < 0) {
        return fail(r, E_INTERNAL, "HPACK encoding failed");
    }
    size_t left = (size_t)len, at = 0;
    int first = 1;
    do {
        size_t chunk = left < r->app_max_frame ? left : r->app_max_frame;
        uint8_t flags = chunk == left ? FL_END_HEADERS : 0;
        if (first && end_stream) {
            flags |= FL_END_STREAM;
        }
        if (emit_frame(&r->to_app, first ? F_HEADERS : F_CONT, flags, sid, b->data + at, chunk) <
            0) {
            return oom(r);
        }
        at += chunk;
        left -= chunk;
        first = 0;
    } while (left > 0);
    return 0;
}

static const nvref_t *
find(const h2r *r, const char *name)
{
    for (size_t i = 0; i < r->nnv; i++) {
        if (name_is(&r->nv[i], name)) {
            return &r->nv[i];
        }
    }
    return NULL;
}

/* A complete request header block from the client. */
static int
client_block(h2r *r, uint64_t now)
{
    uint32_t sid = r->cblock_sid;
    int end_stream = r->cblock_end_stream;
    int too_large = 0;
    int rc = inflate_block(r, r->c_infl, r->cblock.data + r->cblock.start, bytes_len(&r->cblock),
                           1, &too_large, NULL, NULL);
    r->cblock.start = r->cblock.end = 0;
    if (rc == -2) {
        return oom(r);
    }
    if (rc < 0) {
        return fail(r, E_COMPRESSION, "request header block does not decode (HPACK)");
    }
    stream_t *s = stream_find(r, sid);
    if (s != NULL) { /* trailers */
        if (too_large) {
            return fail(r, E_CALM, "trailers over the header size limit");
        }
        s->client_ended = 1;
        if (forward_block(r, sid, 1, 0) < 0) {
            return -1;
        }
        if (s->app_ended) {
            stream_remove(r, s);
        }
        return 0;
    }
    if (sid <= r->last_sid) {
        return 0; /* a stream that is gone (denied, reset, or ended): decoded, dropped */
    }
    r->last_sid = sid;
    r->stats.requests++;
    const nvref_t *method = find(r, ":method"), *path = find(r, ":path");
    const nvref_t *ctype = find(r, "content-type");
    int grpc = ctype && ctype->value_len >= 16 && memcmp(ctype->value, "application/grpc", 16) == 0;
    if (too_large) {
        deny_stream(r, sid);
        note_refusal(r, sid, 431, method, path, "request headers over the size limit");
        record(r, grpc ? 200 : 431, grpc ? 8 : -1, 0, 1, 0.0);
        return queue_reply(r, sid, 431, grpc, 8, "request headers over the size limit",
                           end_stream);
    }
    if (r->nstreams >= r->pol->max_streams || r->draining) { /* full, or after our GOAWAY */
        deny_stream(r, sid);
        r->stats.requests--; /* refused before it began, as h2's limit does */
        r->stats.refused_streams++;
        return queue_rst(r, sid, E_REFUSED);
    }
    decision_t d;
    decide(r, method, path, &d);
    if (r->pol->ntables) {
        r->rules_dirty = 1;
        if (d.allowed && d.rule >= 0) {
            r->stats.rule_allow[d.rule]++;
        } else if (d.rule >= 0) {
            r->stats.rule_deny[d.rule]++;
        } else if (d.status == 400) {
            r->stats.deny_badpath++;
        } else {
            r->stats.deny_nomatch++;
        }
    }
    if (!d.allowed) {
        deny_stream(r, sid);
        note_refusal(r, sid, d.status, method, path, d.reason);
        int code = d.status == 403 ? 7 : 3; /* PERMISSION_DENIED, INVALID_ARGUMENT */
        record(r, grpc ? 200 : d.status, grpc ? code : -1, 0, 1, 0.0);
        return queue_reply(r, sid, d.status, grpc, code, d.reason, end_stream);
    }
    s = &r->streams[r->nstreams++];
    memset(s, 0, sizeof *s);
    s->id = sid;
    s->start_ns = now;
    s->grpc = -1;
    s->client_ended = (uint8_t)end_stream;
    return forward_block(r, sid, end_stream, 1);
}

/* A complete response (or pushed request) header block from the app: already passed on. */
static int
app_block(h2r *r, uint64_t now)
{
    int status = 0, grpc = -1, too_large = 0;
    int rc = inflate_block(r, r->a_infl, r->ablock.data + r->ablock.start, bytes_len(&r->ablock),
                           0, &too_large, &status, &grpc);
    r->ablock.start = r->ablock.end = 0;
    if (rc < 0) {
        return fail(r, E_COMPRESSION, "the app's header block does not decode (HPACK)");
    }
    if (r->ablock_push) {
        return 0;
    }
    stream_t *s = stream_find(r, r->ablock_sid);
    if (s == NULL) {
        return 0;
    }
    if (!s->responded && status >= 200) {
        s->responded = 1;
        s->status = status;
        s->head_ms = ms_since(s->start_ns, now);
    }
    if (grpc >= 0) {
        s->grpc = grpc;
    }
    if (r->ablock_end_stream) {
        s->app_ended = 1;
        stream_record(r, s, 0, now);
        if (s->client_ended) {
            stream_remove(r, s);
        }
    }
    return 0;
}

/* -- frames from the client ----------------------------------------------------------------- */
static int
spend_reset(h2r *r, uint64_t now)
{
    if (now > r->tokens_at) {
        r->tokens += (double)(now - r->tokens_at) / 1e9 * r->pol->reset_rate;
        if (r->tokens > r->pol->reset_burst) {
            r->tokens = r->pol->reset_burst;
        }
    }
    r->tokens_at = now;
    if (r->tokens < 1.0) {
        return -1;
    }
    r->tokens -= 1.0;
    return 0;
}

static void
parse_header(parser_t *p)
{
    p->len = ((uint32_t)p->hdr[0] << 16) | ((uint32_t)p->hdr[1] << 8) | p->hdr[2];
    p->type = p->hdr[3];
    p->flags = p->hdr[4];
    p->sid = get32(p->hdr + 5) & 0x7fffffffu;
    p->left = p->len;
}

static int
client_start(h2r *r, uint64_t now)
{
    parser_t *p = &r->cp;
    parse_header(p);
    if (r->c_in_block && (p->type != F_CONT || p->sid != r->cblock_sid)) {
        return fail(r, E_PROTOCOL, "a header block was interrupted (CONTINUATION expected)");
    }
    p->mode = M_PASS;
    stream_t *s;
    switch (p->type) {
    case F_DATA:
        if (p->sid == 0) {
            return fail(r, E_PROTOCOL, "DATA on stream 0");
        }
        if (is_denied(r, p->sid)) {
            p->mode = M_DROP;
        } else if ((p->flags & FL_END_STREAM) && (s = stream_find(r, p->sid)) != NULL) {
            s->client_ended = 1;
            if (s->app_ended) {
                stream_remove(r, s);
            }
        }
        break;
    case F_HEADERS:
        if (p->sid == 0 || (p->sid & 1) == 0) {
            return fail(r, E_PROTOCOL, "HEADERS on a stream id a client may not use");
        }
        if (p->len > r->pol->max_header_bytes) {
            return fail(r, E_CALM, "request header block over the size limit");
        }
        r->c_in_block = 1;
        r->cblock_sid = p->sid;
        r->cblock_end_stream = (p->flags & FL_END_STREAM) != 0;
        r->cblock.start = r->cblock.end = 0;
        p->mode = M_BLOCK;
        break;
    case F_CONT:
        if (!r->c_in_block) {
            return fail(r, E_PROTOCOL, "CONTINUATION without HEADERS");
        }
        if (bytes_len(&r->cblock) + p->len > r->pol->max_header_bytes) {
            return fail(r, E_CALM, "request header block over the size limit");
        }
        p->mode = M_BLOCK;
        break;
    case F_PUSH:
        return fail(r, E_PROTOCOL, "PUSH_PROMISE from a client");
    case F_SETTINGS:
        if (p->sid != 0) {
            return fail(r, E_PROTOCOL, "SETTINGS on a stream");
        }
        if (p->flags & FL_ACK) {
            if (p->len != 0) {
                return fail(r, E_FRAME_SIZE, "SETTINGS ACK with a payload");
            }
        } else {
            if (p->len % 6 != 0) {
                return fail(r, E_FRAME_SIZE, "SETTINGS length not a multiple of 6");
            }
            if (p->len > SETTINGS_MAX) {
                return fail(r, E_CALM, "SETTINGS frame too large");
            }
            r->settings.start = r->settings.end = 0;
            p->mode = M_SETTINGS;
        }
        break;
    case F_RST:
        if (p->len != 4 || p->sid == 0) {
            return fail(r, E_PROTOCOL, "malformed RST_STREAM");
        }
        r->stats.resets++;
        if (spend_reset(r, now) < 0) {
            return fail(r, E_CALM, "too many stream resets (rapid reset)");
        }
        if (is_denied(r, p->sid)) {
            p->mode = M_DROP;
        } else if ((s = stream_find(r, p->sid)) != NULL) {
            stream_record(r, s, 1, now);
            stream_remove(r, s);
        }
        break;
    case F_WU:
        if (p->sid != 0 && is_denied(r, p->sid)) {
            p->mode = M_DROP;
        }
        break;
    default: /* PRIORITY, PING, GOAWAY, extensions: the app's business */
        break;
    }
    if (p->mode == M_PASS && bytes_add(&r->to_app, p->hdr, FRAME_HDR) < 0) {
        return oom(r);
    }
    return 0;
}

static int
client_end(h2r *r, uint64_t now)
{
    parser_t *p = &r->cp;
    p->hlen = 0;
    switch (p->mode) {
    case M_BLOCK:
        if (p->type == F_HEADERS &&
            unpad(&r->cblock, p->flags, (p->flags & FL_PRIO) ? 5 : 0) < 0) {
            return fail(r, E_PROTOCOL, "HEADERS padding longer than the frame");
        }
        if (p->flags & FL_END_HEADERS) {
            r->c_in_block = 0;
            return client_block(r, now);
        }
        return 0;
    case M_SETTINGS: {
        const uint8_t *s = r->settings.data + r->settings.start;
        for (size_t i = 0; i + 6 <= bytes_len(&r->settings); i += 6) {
            uint16_t id = (uint16_t)((s[i] << 8) | s[i + 1]);
            uint32_t v = get32(s + i + 2);
            if (id == 1) { /* the app's encoder may now use this much: our mirror too */
                nghttp2_hd_inflate_change_table_size(r->a_infl, v);
                if (v != r->c_table_size || r->c_table_changed) {
                    uint32_t low = r->c_table_changed ? r->c_table_min : r->c_table_size;
                    r->c_table_min = low < v ? low : v;
                    r->c_table_size = v;
                    r->c_table_changed = 1;
                }
            }
        }
        if (emit_frame(&r->to_app, F_SETTINGS, 0, 0, s, bytes_len(&r->settings)) < 0) {
            return oom(r);
        }
        return 0;
    }
    case M_DROP:
        if (p->type == F_DATA) { /* the app never saw it: give the connection credit back */
            return queue_window_update(r, p->len);
        }
        return 0;
    default:
        return 0;
    }
}

/* -- frames from the app ---------------------------------------------------------------------- */
static int
app_start(h2r *r, uint64_t now)
{
    parser_t *p = &r->ap;
    parse_header(p);
    if (r->a_in_block && (p->type != F_CONT || p->sid != r->ablock_sid)) {
        return fail(r, E_PROTOCOL, "the app interrupted a header block");
    }
    if (!r->a_in_block && flush_pending(r) < 0) { /* a boundary: our frames first */
        return -1;
    }
    p->mode = M_PASS;
    size_t block_max = r->pol->max_header_bytes * 4 > (256u << 10)
                           ? (size_t)r->pol->max_header_bytes * 4
                           : (256u << 10);
    stream_t *s;
    switch (p->type) {
    case F_HEADERS:
    case F_PUSH:
        if (p->len > block_max) {
            return fail(r, E_INTERNAL, "the app's header block is too large");
        }
        r->a_in_block = 1;
        r->update_owed = 0; /* the app's block announces the size */
        r->ablock_sid = p->sid;
        r->ablock_end_stream = p->type == F_HEADERS && (p->flags & FL_END_STREAM);
        r->ablock_push = p->type == F_PUSH;
        r->ablock.start = r->ablock.end = 0;
        p->mode = M_SNOOP;
        break;
    case F_CONT:
        if (!r->a_in_block) {
            return fail(r, E_PROTOCOL, "CONTINUATION without HEADERS from the app");
        }
        if (bytes_len(&r->ablock) + p->len > block_max) {
            return fail(r, E_INTERNAL, "the app's header block is too large");
        }
        p->mode = M_SNOOP;
        break;
    case F_SETTINGS:
        if ((p->flags & FL_ACK) && r->c_table_changed) { /* the app took the new size */
            r->update_owed = 1;
            r->owed_min = r->c_table_min;
            r->owed_final = r->c_table_size;
            r->c_table_changed = 0;
        }
        if (!(p->flags & FL_ACK)) {
            if (p->len % 6 != 0 || p->len > SETTINGS_MAX || p->sid != 0) {
                return fail(r, E_INTERNAL, "malformed SETTINGS from the app");
            }
            r->settings.start = r->settings.end = 0;
            p->mode = M_SETTINGS;
        }
        break;
    case F_DATA:
        if ((p->flags & FL_END_STREAM) && (s = stream_find(r, p->sid)) != NULL) {
            s->app_ended = 1;
            stream_record(r, s, 0, now);
            if (s->client_ended) {
                stream_remove(r, s);
            }
        }
        break;
    case F_RST:
        if ((s = stream_find(r, p->sid)) != NULL) {
            stream_record(r, s, 1, now);
            stream_remove(r, s);
        }
        break;
    default:
        break;
    }
    if ((p->mode == M_PASS || p->mode == M_SNOOP) &&
        bytes_add(&r->to_client, p->hdr, FRAME_HDR) < 0) {
        return oom(r);
    }
    return 0;
}

static int
app_settings(h2r *r)
{
    const uint8_t *s = r->settings.data + r->settings.start;
    size_t n = bytes_len(&r->settings);
    bytes_t *out = &r->scratch;
    out->start = out->end = 0;
    int seen_streams = 0, seen_list = 0;
    for (size_t i = 0; i + 6 <= n; i += 6) {
        uint16_t id = (uint16_t)((s[i] << 8) | s[i + 1]);
        uint32_t v = get32(s + i + 2);
        if (id == 1) { /* the client's encoder may use this much: our decoder and encoder */
            nghttp2_hd_inflate_change_table_size(r->c_infl, v);
            nghttp2_hd_deflate_change_table_size(r->defl, v);
        } else if (id == 3) { /* our concurrency limit is the tighter one */
            seen_streams = 1;
            v = v < r->pol->max_streams ? v : r->pol->max_streams;
        } else if (id == 5 && v >= DEFAULT_FRAME && v <= 0xffffff) {
            r->app_max_frame = v;
        } else if (id == 6) {
            seen_list = 1;
            v = v < r->pol->max_header_bytes ? v : r->pol->max_header_bytes;
        }
        uint8_t param[6] = {(uint8_t)(id >> 8), (uint8_t)id};
        put32(param + 2, v);
        if (bytes_add(out, param, 6) < 0) {
            return oom(r);
        }
    }
    if (!seen_streams) {
        uint8_t param[6] = {0, 3};
        put32(param + 2, r->pol->max_streams);
        bytes_add(out, param, 6);
    }
    if (!seen_list) {
        uint8_t param[6] = {0, 6};
        put32(param + 2, r->pol->max_header_bytes);
        bytes_add(out, param, 6);
    }
    if (emit_frame(&r->to_client, F_SETTINGS, 0, 0, out->data + out->start, bytes_len(out)) <
        0) {
        return oom(r);
    }
    return 0;
}

static int
app_end(h2r *r, uint64_t now)
{
    parser_t *p = &r->ap;
    p->hlen = 0;
    int rc = 0;
    if (p->mode == M_SNOOP) {
        if (p->type == F_HEADERS || p->type == F_PUSH) {
            size_t skip = p->type == F_PUSH ? 4 : ((p->flags & FL_PRIO) ? 5 : 0);
            if (unpad(&r->ablock, p->flags, skip) < 0) {
                return fail(r, E_PROTOCOL, "the app's HEADERS padding is longer than the frame");
            }
        }
        if (p->flags & FL_END_HEADERS) {
            r->a_in_block = 0;
            rc = app_block(r, now);
        }
    } else if (p->mode == M_SETTINGS) {
        rc = app_settings(r);
        r->app_started = 1;
    }
    if (rc == 0) {
        rc = flush_pending(r);
    }
    return rc;
}

/* -- feeding ---------------------------------------------------------------------------------- */
static int
feed(h2r *r, int client, const uint8_t *d, size_t n, uint64_t now)
{
    if (r->failed) {
        return -1;
    }
    parser_t *p = client ? &r->cp : &r->ap;
    if (client && r->preface < PREFACE_LEN) {
        size_t k = n < PREFACE_LEN - r->preface ? n : PREFACE_LEN - r->preface;
        if (memcmp(d, PREFACE + r->preface, k) != 0) {
            return fail(r, E_PROTOCOL, "the client did not open with the connection preface");
        }
        if (bytes_add(&r->to_app, d, k) < 0) {
            return oom(r);
        }
        r->preface += k;
        d += k;
        n -= k;
    }
    while (n > 0) {
        if (p->hlen < FRAME_HDR) {
            size_t k = FRAME_HDR - p->hlen < n ? FRAME_HDR - p->hlen : n;
            memcpy(p->hdr + p->hlen, d, k);
            p->hlen += k;
            d += k;
            n -= k;
            if (p->hlen < FRAME_HDR) {
                break;
            }
            if ((client ? client_start(r, now) : app_start(r, now)) < 0) {
                return -1;
            }
            if (p->left == 0 && (client ? client_end(r, now) : app_end(r, now)) < 0) {
                return -1;
            }
            continue;
        }
        size_t k = p->left < n ? p->left : n;
        int rc = 0;
        switch (p->mode) {
        case M_PASS:
            rc = bytes_add(client ? &r->to_app : &r->to_client, d, k);
            break;
        case M_BLOCK:
            rc = bytes_add(&r->cblock, d, k);
            break;
        case M_SNOOP:
            rc = bytes_add(&r->to_client, d, k) | bytes_add(&r->ablock, d, k);
            break;
        case M_SETTINGS:
            rc = bytes_add(&r->settings, d, k);
            break;
        default:
            break;
        }
        if (rc != 0) {
            return oom(r);
        }
        p->left -= k;
        d += k;
        n -= k;
        if (p->left == 0 && (client ? client_end(r, now) : app_end(r, now)) < 0) {
            return -1;
        }
    }
    return r->failed ? -1 : 0;
}

int
h2r_feed_client(h2r *r, const uint8_t *data, size_t len, uint64_t now_ns)
{
    return feed(r, 1, data, len, now_ns);
}

int
h2r_feed_app(h2r *r, const uint8_t *data, size_t len, uint64_t now_ns)
{
    return feed(r, 0, data, len, now_ns);
}

/* -- output and results ------------------------------------------------------------------------ */
const uint8_t *
h2r_out_app(const h2r *r, size_t *len)
{
    *len = bytes_len(&r->to_app);
    return r->to_app.data ? r->to_app.data + r->to_app.start : NULL;
}

void
h2r_consumed_app(h2r *r, size_t n)
{
    bytes_consume(&r->to_app, n);
}

const uint8_t *
h2r_out_client(const h2r *r, size_t *len)
{
    *len = bytes_len(&r->to_client);
    return r->to_client.data ? r->to_client.data + r->to_client.start : NULL;
}

void
h2r_consumed_client(h2r *r, size_t n)
{
    bytes_consume(&r->to_client, n);
}

size_t
h2r_pending_app(const h2r *r)
{
    return bytes_len(&r->to_app);
}

size_t
h2r_pending_client(const h2r *r)
{
    return bytes_len(&r->to_client) + bytes_len(&r->pending);
}

void
h2r_drain(h2r *r)
{
    if (r->draining || r->failed) {
        return;
    }
    r->draining = 1;
    uint8_t g[8];
    put32(g, r->last_sid);
    put32(g + 4, E_NO_ERROR);
    if (emit_frame(&r->pending, F_GOAWAY, 0, 0, g, sizeof g) < 0) {
        oom(r);
        return;
    }
    flush_pending(r);
}

int
h2r_drained(const h2r *r)
{
    return r->draining && r->nstreams == 0 && bytes_len(&r->pending) == 0 &&
           bytes_len(&r->to_client) == 0 && r->ap.hlen == 0 && !r->a_in_block;
}

int
h2r_failed(const h2r *r)
{
    return r->failed;
}

const char *
h2r_error(const h2r *r)
{
    return r->error;
}

size_t
h2r_take_refusals(h2r *r, h2r_refusal *out, size_t n)
{
    size_t k = r->nrefusals < n ? r->nrefusals : n;
    memcpy(out, r->refusals, k * sizeof *out);
    r->nrefusals = 0;
    return k;
}

int
h2r_dirty(const h2r *r)
{
    const h2r_stats *s = &r->stats;
    return s->requests || s->noutcomes || s->deny_nomatch || s->deny_badpath ||
           s->refused_streams || s->resets || r->rules_dirty;
}

size_t
h2r_open_streams(const h2r *r)
{
    return r->nstreams;
}

h2r_stats *
h2r_finish(h2r *r, uint64_t now_ns)
{
    for (size_t i = 0; i < r->nstreams; i++) {
        stream_record(r, &r->streams[i], 1, now_ns);
    }
    r->nstreams = 0;
    return h2r_take(r);
}

h2r_stats *
h2r_take(h2r *r)
{
    h2r_stats *s = malloc(sizeof *s);
    if (s == NULL) {
        return NULL;
    }
    *s = r->stats;
    s->rule_allow = s->rule_deny = NULL;
    if (s->nrules) {
        s->rule_allow = malloc(s->nrules * sizeof(uint64_t));
        s->rule_deny = malloc(s->nrules * sizeof(uint64_t));
        if (s->rule_allow == NULL || s->rule_deny == NULL) {
            h2r_stats_free(s);
            return NULL;
        }
        memcpy(s->rule_allow, r->stats.rule_allow, s->nrules * sizeof(uint64_t));
        memcpy(s->rule_deny, r->stats.rule_deny, s->nrules * sizeof(uint64_t));
        memset(r->stats.rule_allow, 0, s->nrules * sizeof(uint64_t));
        memset(r->stats.rule_deny, 0, s->nrules * sizeof(uint64_t));
    }
    uint64_t *allow = r->stats.rule_allow, *deny = r->stats.rule_deny;
    memset(&r->stats, 0, sizeof r->stats); /* counted from zero again: deltas */
    r->stats.rule_allow = allow;
    r->stats.rule_deny = deny;
    r->stats.nrules = s->nrules;
    r->stats.goaway_code = UINT32_MAX;
    r->rules_dirty = 0;
    return s;
}

void
h2r_stats_free(h2r_stats *s)
{
    if (s != NULL) {
        free(s->rule_allow);
        free(s->rule_deny);
        free(s);
    }
}
