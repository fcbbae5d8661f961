/*
 * h2relay: the HTTP/2 fast path of inbound `protocol: http` listeners (client h2 over TLS
 * -> the app's h2c Unix socket), as a sans-IO core: feed it the bytes one side sent, take
 * the bytes each side must receive. No sockets, no clock, no Python here.
 *
 * One client connection maps to one app connection and frames keep their stream ids, so
 * DATA, SETTINGS, PING, WINDOW_UPDATE, PRIORITY and GOAWAY cross byte for byte and flow
 * control stays end to end. Only request header blocks (HEADERS + CONTINUATION from the
 * client) are decoded (HPACK, nghttp2's inflater) and encoded again toward the app (a
 * deflater of ours): identity headers a client sent are dropped, the connection's identity
 * headers are added, the route rules decide (denied -> a reply of ours: 403 / 400, or for
 * gRPC 200 + grpc-status, encoded without touching the dynamic table; the stream's DATA is
 * dropped and its connection credit given back). Response header blocks pass unchanged;
 * they are decoded only to keep the HPACK state and to read :status / grpc-status.
 * Limits: header block and header list size, concurrent streams (REFUSED_STREAM), the
 * rapid-reset budget (GOAWAY ENHANCE_YOUR_CALM). A protocol error queues GOAWAY and fails
 * the relay (h2r_failed); the caller flushes what is queued for the client and closes.
 */
#ifndef MESHPROXY_H2RELAY_H
#define MESHPROXY_H2RELAY_H

#include <stddef.h>
#include <stdint.h>

#define H2R_LATENCY_BUCKETS 26 /* meshproxy's LATENCY_BUCKETS (25 bounds, ms) + Inf */
#define H2R_MAX_OUTCOMES 16
#define H2R_ERROR_MAX 256

extern const double h2r_latency_bounds_ms[H2R_LATENCY_BUCKETS - 1];

/* -- the policy of one connection (built by the caller, owned by the relay) --------------- */
typedef struct h2r_policy h2r_policy;

h2r_policy *h2r_policy_new(uint32_t max_concurrent_streams, uint32_t max_header_bytes,
                           uint32_t reset_burst, double reset_rate);
void h2r_policy_free(h2r_policy *p);
/* A header added to every request (lower-case name). 0, or -1 when out of memory. */
int h2r_policy_add_header(h2r_policy *p, const char *name, size_t name_len, const char *value,
                          size_t value_len);
/* A route table (a request must pass every table); nomatch: the refusal's words when no
 * rule matches ("no manifest route rule matches"; method and path follow). Index or -1. */
int h2r_policy_add_table(h2r_policy *p, const char *nomatch, size_t nomatch_len);
/* A rule of the last table: methods (none = any), exact path or prefix (no trailing '/'),
 * whether this connection's caller may use it, and the refusal's words when it may not.
 * Rules get global indexes in order. */
int h2r_policy_add_rule(h2r_policy *p, const char *const *methods, const size_t *method_lens,
                        size_t nmethods, const char *path, size_t path_len, int exact,
                        int allowed, const char *deny_reason, size_t deny_reason_len);

/* -- what a connection did, for /metrics ------------------------------------------------- */
typedef struct {
    int status;      /* 0: no response (reset) */
    int grpc_status; /* -1: none */
    int ok;
    uint64_t count;
    uint64_t timed; /* responses whose head was timed (status >= 200 or reset) */
    uint64_t buckets[H2R_LATENCY_BUCKETS]; /* per bucket, not cumulative */
    double latency_sum_ms;
} h2r_outcome;

typedef struct {
    uint64_t requests;
    size_t noutcomes;
    h2r_outcome outcomes[H2R_MAX_OUTCOMES]; /* the last one absorbs any overflow */
    size_t nrules;
    uint64_t *rule_allow, *rule_deny; /* per rule */
    uint64_t deny_nomatch, deny_badpath;
    uint64_t refused_streams, resets;
    uint32_t goaway_code; /* our GOAWAY's code, or UINT32_MAX: none sent */
} h2r_stats;

void h2r_stats_free(h2r_stats *s);

/* -- the relay ------------------------------------------------------------------------------- */
typedef struct h2r h2r;

/* A denied request, reported to the caller's log (bounded, printable text only). */
typedef struct {
    uint32_t stream_id;
    int status;
    char method[24];
    char path[120];
    char reason[H2R_ERROR_MAX];
} h2r_refusal;

h2r *h2r_new(h2r_policy *policy); /* takes the policy; NULL when out of memory */
void h2r_free(h2r *r);

/* Feed what the client sent (TLS plaintext) / what the app sent; now_ns is a monotonic
 * clock. 0, or -1 when the relay failed (h2r_error says why; GOAWAY may be queued). */
int h2r_feed_client(h2r *r, const uint8_t *data, size_t len, uint64_t now_ns);
int h2r_feed_app(h2r *r, const uint8_t *data, size_t len, uint64_t now_ns);

/* Bytes waiting for the app / the client; consume what was written. */
const uint8_t *h2r_out_app(const h2r *r, size_t *len);
void h2r_consumed_app(h2r *r, size_t n);
const uint8_t *h2r_out_client(const h2r *r, size_t *len);
void h2r_consumed_client(h2r *r, size_t n);
size_t h2r_pending_app(const h2r *r);
size_t h2r_pending_client(const h2r *r);

/* Shutdown: GOAWAY (NO_ERROR, the last stream seen) to the client, later streams refused;
 * h2r_drained() once every stream is done and everything of ours went out. */
void h2r_drain(h2r *r);
int h2r_drained(const h2r *r);

int h2r_failed(const h2r *r);
const char *h2r_error(const h2r *r);

/* Refusals since the last call (at most n copied; the rest are counted, not kept). */
size_t h2r_take_refusals(h2r *r, h2r_refusal *out, size_t n);

/* The counters since the last take (a copy the caller frees; NULL: out of memory), and
 * whether there are any; h2r_finish first counts the streams still open as reset. */
int h2r_dirty(const h2r *r);
size_t h2r_open_streams(const h2r *r);
h2r_stats *h2r_take(h2r *r);
h2r_stats *h2r_finish(h2r *r, uint64_t now_ns);

#endif
