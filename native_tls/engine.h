/*
 * The relay engine: worker threads that own the TLS sessions of the tcp data path.
 *
 * No Python here: nothing in engine.c may touch a Python object, so the hot path runs
 * without the GIL by construction. module.c is the only bridge.
 *
 * Contract with the caller (Python, through module.c):
 *   - mp_engine_handshake hands a connected, non-blocking TCP fd to a worker; on success
 *     the engine owns it (and closes it exactly once), on failure the caller still does.
 *   - The worker posts MP_EV_HANDSHAKE (peer certificate, ALPN, version, cipher) or the
 *     final MP_EV_HANDSHAKE_FAILED; then it waits for the caller's verdict.
 *   - mp_engine_relay hands the app's Unix socket fd over (same ownership rule) and the
 *     worker relays both ways; mp_engine_close ends a connection with a reason.
 *   - Every connection ends with exactly one final event (HANDSHAKE_FAILED or CLOSED),
 *     preallocated when the connection is created so that it cannot fail to be posted.
 *   - The event fd (mp_engine_fileno) becomes readable when events are waiting.
 *   - Or the engine accepts itself: mp_engine_listen hands a listening TCP socket over
 *     with a policy. Workers accept, handshake (with a handshake timeout), and for the
 *     common case check the peer's identity and connect the app's Unix socket in C, then
 *     post MP_EV_HANDSHAKE with relaying = 1 and relay at once. Anything else (no exact
 *     positive identity match, the app not accepting at once, a PROXY header to send)
 *     posts the usual MP_EV_HANDSHAKE (relaying = 0, peer DER) and waits for the caller,
 *     who stays the authority: C only ever takes the positive shortcut (fail closed).
 *     Events of such connections carry the listener id and the peer's address.
 */
#ifndef MESHPROXY_ENGINE_H
#define MESHPROXY_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "h2relay.h"

enum { MP_EV_HANDSHAKE = 1, MP_EV_HANDSHAKE_FAILED = 2, MP_EV_CLOSED = 3, MP_EV_ACCEPTED = 4,
       MP_EV_HTTP_REFUSED = 5, MP_EV_HTTP_STATS = 6 };
/* MP_EV_ACCEPTED: a listener accepted the connection (first event of every listener
 * connection; its handshake runs). */

#define MP_REASON_MAX 200
#define MP_SNI_MAX 256

typedef struct mp_event {
    struct mp_event *next;
    uint64_t conn_id;
    int kind;
    char reason[MP_REASON_MAX]; /* final events; "" = both directions ended cleanly */
    unsigned char *peer_der;    /* MP_EV_HANDSHAKE: the peer's leaf, or NULL */
    size_t peer_der_len;
    char alpn[256];
    const char *version; /* static strings of OpenSSL */
    const char *cipher;
    uint64_t tls_to_app;
    uint64_t app_to_tls;
    uint32_t listener;   /* accepted by the engine on this listener; 0: handed over */
    int relaying;        /* MP_EV_HANDSHAKE: identity checked and app connected in C */
    char remote[64];     /* listener connections: the peer's "host:port" */
    char peer_id[256];   /* relaying: the peer's SPIFFE ID ("" for an anonymous client) */
    char peer_uuid[64];  /* relaying: the peer's instance UUID, or "" */
    h2r_stats *http;         /* HTTP_STATS, CLOSED of an HTTP/2 relay: counters since the last */
    h2r_refusal *refusal;    /* MP_EV_HTTP_REFUSED: a request the route rules refused */
} mp_event;

typedef struct {
    int threads;             /* worker threads, >= 1 */
    size_t buffer_size;      /* bytes per direction buffer (and per write coalescing buffer) */
    size_t read_buffer_size; /* OpenSSL's read-ahead buffer per session */
    int coalesce_writes;     /* gather TLS records before send(): fewer, larger syscalls */
    int release_buffers;     /* SSL_MODE_RELEASE_BUFFERS: idle sessions hold no buffers */
} mp_engine_config;

/* A listening socket the engine accepts on, and what it may decide in C. */
typedef struct {
    int fd;                     /* bound, listening TCP socket; the engine owns it on success */
    SSL_CTX *ctx;               /* server context (the engine takes its own reference) */
    const char *app_path;       /* the app's Unix socket; NULL: the caller connects the app */
    const char *trust_domain;   /* identity check of marble clients; NULL with anonymous */
    const char *const *allowed; /* marble types allowed to call */
    size_t nallowed;
    int anonymous;              /* clients: public (no client certificate asked for) */
    double handshake_timeout;   /* seconds */
} mp_listener_config;

typedef struct {
    uint64_t active;
    uint64_t handshakes;
    uint64_t handshake_failures;
    uint64_t closed;
    uint64_t bytes_tls_to_app;
    uint64_t bytes_app_to_tls;
    uint64_t buffer_bytes; /* memory held by relay buffers (in use and pooled) */
    uint64_t accepted;     /* connections accepted by the engine's listeners */
    uint64_t fast_path;    /* of those: identity and app connect decided in C */
} mp_stats;

typedef struct mp_engine mp_engine;

int mp_engine_global_init(void);
mp_engine *mp_engine_new(const mp_engine_config *cfg, char *err, size_t errlen);
int mp_engine_fileno(const mp_engine *e);
int mp_engine_threads(const mp_engine *e);
/* 0 and *conn_id set, or -1 with err (the caller keeps fd). Takes its own ctx reference. */
int mp_engine_handshake(mp_engine *e, int fd, SSL_CTX *ctx, int server_side, const char *sni,
                        uint64_t *conn_id, char *err, size_t errlen);
int mp_engine_relay(mp_engine *e, uint64_t conn_id, int app_fd, char *err, size_t errlen);
/* Like mp_engine_relay, but the relay speaks HTTP/2 (h2relay.h) with this policy, which the
 * engine owns from the call on (also when it fails). */
int mp_engine_relay_h2(mp_engine *e, uint64_t conn_id, int app_fd, h2r_policy *policy, char *err,
                       size_t errlen);
/* Shutdown of an HTTP/2 relay: GOAWAY now, the connection ends when its streams are done
 * (reason "drained"). A no-op for other connections. */
int mp_engine_drain_h2(mp_engine *e, uint64_t conn_id, char *err, size_t errlen);
int mp_engine_close(mp_engine *e, uint64_t conn_id, const char *reason, char *err, size_t errlen);
/* 0 and *listener_id set, or -1 with err (the caller keeps fd). */
int mp_engine_listen(mp_engine *e, const mp_listener_config *cfg, uint32_t *listener_id,
                     char *err, size_t errlen);
/* Rotation: new connections of the listener use ctx; open ones keep theirs. */
int mp_engine_listener_context(mp_engine *e, uint32_t listener_id, SSL_CTX *ctx, char *err,
                               size_t errlen);
/* Stop accepting: the workers drop the socket, the last one closes it. Open connections
 * are not touched. Idempotent. */
int mp_engine_unlisten(mp_engine *e, uint32_t listener_id, char *err, size_t errlen);
/* All waiting events, oldest first (a list linked by next); free each with mp_event_free. */
mp_event *mp_engine_take_events(mp_engine *e);
void mp_event_free(mp_event *ev);
void mp_engine_stats(const mp_engine *e, mp_stats *out);
/* Stop the workers (open connections end, their fds closed) and join them. Idempotent. */
void mp_engine_stop(mp_engine *e);
void mp_engine_free(mp_engine *e);

#endif
