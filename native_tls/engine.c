/*
 * The relay engine: N worker threads, each with its own epoll set, owning TLS sessions.
 *
 * Theory of operation. A connection belongs to one worker (conn_id % threads) for its
 * whole life; only that worker touches its SSL object, fds and buffers, so there are no
 * locks on the data path. The Python thread talks to a worker through a command queue
 * (mutex + eventfd) and hears back through the engine's event queue (mutex + eventfd).
 *
 * A connection moves HANDSHAKE -> WAIT -> RELAY -> DEAD (or HANDSHAKE -> DEAD, or WAIT ->
 * DEAD when the caller refuses the peer). In RELAY, pump() moves bytes until nothing moves:
 *   tls -> to_app -> app   (SSL_read into a bounded buffer; send to the app)
 *   app -> to_tls -> tls   (recv from the app into a bounded buffer; SSL_write)
 * then derives the epoll interest of both fds from what blocked it: a full buffer drops
 * EPOLLIN on the side that fills it (back-pressure), a blocked write asks for EPOLLOUT.
 * An fd with no interest is removed from the epoll set, so a hung-up peer cannot spin us.
 * EOF is a half-close: the peer's close_notify becomes shutdown(SHUT_WR) on the app
 * socket; the app's EOF becomes our close_notify (then FIN) while we keep reading. The
 * connection ends when both directions ended, or at the first error of either side.
 *
 * TLS bytes go through a small custom BIO: recv() for reads (OpenSSL reads ahead into
 * its own buffer), and for writes an optional coalescing buffer so that several records
 * leave in one send(). Buffers come from a per-worker pool and are held by a connection
 * only while they hold bytes, so idle connections cost no buffer memory.
 *
 * Listeners (mp_engine_listen): the listening socket is in every worker's epoll set
 * (EPOLLEXCLUSIVE: one worker wakes per connection); a worker accepts a batch, runs the
 * handshake under a deadline, and then, for the common case, checks the peer's SPIFFE
 * identity against the listener's policy and connects the app's Unix socket itself, so
 * that Python hears of the connection once (and once more at its end) instead of
 * driving it. Everything else falls back to the caller (see engine.h).
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define MAX_THREADS 64
#define EPOLL_BATCH 128
#define PUMP_ROUNDS 16 /* then yield to other connections; the rest runs from the ready list */
#define POOL_BUFFERS 16 /* per worker, kept for reuse: no malloc per burst */
#define CMD_TEXT 256
#define ACCEPT_BATCH 64   /* accepts per readiness: new connections cannot starve open ones */
#define ACCEPT_PAUSE_S 1.0 /* out of fds or memory: stop accepting for this long */
/* SO_SNDBUF of the proxy's end of an app Unix socket. The default (net.core.wmem_default,
 * 208 KiB, charged with skb overhead) holds about one direction buffer: a single upstream
 * stream then stalls on every app read (bench bulk 1 conn up: both CPUs half idle, 0.49 of
 * the TLS-receive ceiling). 1 MiB (the kernel doubles it, capped by net.core.wmem_max):
 * +50-60 % MB/s and +20-35 % MB per CPU-s in A/B runs; 512 KiB was uneven. It is a limit,
 * not an allocation: memory is only held while an app reads slower than its peer sends. */
#define APP_SNDBUF (1 << 20)
/* TCP_NOTSENT_LOWAT of the TLS side: at most this much written but not yet sent sits in
 * the kernel; then send() says EAGAIN and the worker waits for EPOLLOUT. Without it a
 * receiver that reads slower than we write (the bench's download client, its core
 * saturated) makes the kernel queue up to the autotuned send buffer, and every window
 * update the receiver sends then transmits that backlog in the receiver's softirq, on its
 * CPU. Bench bulk down, A/B in alternating runs of meshproxy-native and haproxy: 1 conn
 * 944-1302 vs 882-1041 MB/s, 8 conns 995-1315 vs 731-956 (ratios 1.21-1.43 vs 1.04-1.43);
 * upload unchanged within the noise. It also bounds per-connection kernel memory and the
 * latency of what is queued behind a bulk transfer. 16 KiB and 128 KiB were no better. */
#define TCP_UNSENT_LOWAT (32 * 1024)

/* -- types ------------------------------------------------------------------------------- */
typedef struct {
    char *data;
    size_t start, end;
} buf_t;

enum { CMD_HANDSHAKE = 1, CMD_RELAY, CMD_CLOSE, CMD_RELAY_H2, CMD_DRAIN_H2, CMD_LISTEN,
       CMD_UNLISTEN };

struct conn;
typedef struct {
    struct conn *conn; /* NULL: a listener slot */
    int app;
} endpoint_t;

/* A listening socket shared by the workers. refs: the engine's list, every worker slot,
 * every connection accepted on it; slots: workers that still poll the fd (the last one
 * to let go closes it, so that no worker can accept on a reused fd number). */
typedef struct listener {
    uint32_t id;
    int fd;
    _Atomic int refs, slots;
    pthread_mutex_t mu; /* guards ctx */
    SSL_CTX *ctx;
    char *app_path;
    char *trust_domain;
    char **allowed;
    size_t nallowed;
    int anonymous;
    int nodelay; /* set on the listening socket: accepted sockets inherit it (Linux) */
    double timeout;
    struct listener *next; /* the engine's list */
} listener_t;

typedef struct lslot {
    endpoint_t ep; /* first: epoll hands back &ep */
    listener_t *l;
    int polled;          /* in the epoll set */
    int removed;         /* freed after the current epoll batch */
    double paused_until; /* accept failed for lack of fds or memory */
    struct lslot *next;
} lslot_t;

typedef struct cmd {
    struct cmd *next;
    int op;
    uint64_t conn_id;
    int fd;
    SSL_CTX *ctx;
    int server_side;
    listener_t *l; /* CMD_LISTEN, CMD_UNLISTEN */
    mp_event *final;
    h2r_policy *policy; /* CMD_RELAY_H2 */
    char text[CMD_TEXT]; /* SNI or close reason */
} cmd_t;

enum { ST_HANDSHAKE, ST_WAIT, ST_RELAY, ST_DEAD };

typedef struct conn {
    uint64_t id;
    struct conn *hnext; /* hash chain */
    struct conn *rnext; /* ready list */
    struct conn *dnext; /* dead list */
    struct worker *w;
    int state;
    int tcp_fd, app_fd;
    uint32_t tcp_ev, app_ev; /* interest registered in epoll; 0 = not in the set */
    endpoint_t ep_tcp, ep_app;
    SSL *ssl;
    buf_t to_app, to_tls, out;
    int hs_want, rd_want, wr_want, sd_want; /* SSL_ERROR_WANT_* that stopped each op */
    unsigned tls_eof : 1, app_eof : 1, app_shut : 1, notify_sent : 1, tcp_shut : 1,
        tcp_rd_eof : 1, handshake_posted : 1, on_ready : 1;
    /* A recv returned less than asked: the socket is (very likely) empty. Epoll is level-
     * triggered, so the read that would only say EAGAIN is skipped until it reports the
     * fd readable again: a third fewer syscalls per request/response exchange. */
    unsigned tcp_drained : 1, app_drained : 1;
    int io_errno; /* errno of the failed socket call behind an SSL error */
    uint64_t tls_to_app, app_to_tls;
    mp_event *final; /* preallocated by the caller: the last event can always be posted */
    listener_t *listener;              /* accepted by the engine on this listener, or NULL */
    struct conn *hs_prev, *hs_next;    /* the worker's handshake-deadline list */
    double deadline;                   /* listener connections: end of the handshake */
    int hs_linked;
    h2r *h2;         /* HTTP/2 relay mode (h2relay.c), or NULL: bytes as they are */
    uint64_t h2_posted; /* when its counters were last posted (ns) */
    struct conn *h2_prev, *h2_next; /* on the worker's list of counters waiting to go */
    unsigned h2_waiting : 1;
} conn_t;

typedef struct worker {
    struct mp_engine *eng;
    int epfd, cmd_fd;
    int mu_ready, started;
    pthread_t thread;
    pthread_mutex_t mu; /* guards cmd_head/cmd_tail/stopping */
    cmd_t *cmd_head, *cmd_tail;
    int stopping;
    size_t bufsize;
    int coalesce;
    conn_t **table;
    size_t table_cap, count;
    conn_t *ready, *dead;
    conn_t *h2_waiting;  /* HTTP/2 relays whose counters wait for their next slot */
    uint64_t h2_due;     /* the earliest slot of those (ns); 0: none */
    char *pool[POOL_BUFFERS];
    int pooled;
    lslot_t *slots;         /* listeners this worker accepts on */
    lslot_t *dead_slots;    /* removed during this epoll batch */
    conn_t *hs_head;        /* listener connections in their handshake, oldest first */
    conn_t *hs_tail;
    double next_timer;      /* earliest handshake deadline or accept resume; 0: none */
    /* written by this worker only, read by anyone */
    _Atomic uint64_t active, handshakes, failures, closed, t2a, a2t, buffer_bytes, accepted,
        fast_path;
} worker_t;

struct mp_engine {
    mp_engine_config cfg;
    int nworkers;
    worker_t *workers;
    _Atomic uint64_t next_id;
    int ev_fd;
    int ev_mu_ready;
    pthread_mutex_t ev_mu; /* guards ev_head/ev_tail */
    mp_event *ev_head, *ev_tail;
    int stopped;
    pthread_mutex_t ls_mu; /* guards listeners, next_listener */
    int ls_mu_ready;
    listener_t *listeners;
    uint32_t next_listener;
};

static BIO_METHOD *tio_method;

static void pump(conn_t *c);
static void widen_app_queue(int fd);
static void conn_end(conn_t *c, const char *reason);
static void hs_unlink(conn_t *c);
static int h2_room(const h2r *r, int toward_app);
static void h2_unwait(conn_t *c);
static void h2_post_due(worker_t *w);
static int h2_timeout_ms(const worker_t *w);
static uint64_t now_ns(void);

#define ADD(counter, n) atomic_fetch_add_explicit(&(counter), (n), memory_order_relaxed)
#define SUB(counter, n) atomic_fetch_sub_explicit(&(counter), (n), memory_order_relaxed)
#define GET(counter) atomic_load_explicit(&(counter), memory_order_relaxed)

/* -- small helpers ----------------------------------------------------------------------- */
static void
close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd); /* Linux: the fd is released even when close reports EINTR */
        *fd = -1;
    }
}

static void
wake(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r; /* EAGAIN: the counter is already non-zero, the reader wakes anyway */
}

static void
drain_eventfd(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

static void
errno_text(int err, const char *side, char *out, size_t n)
{
    char tmp[128];
    const char *s = strerror_r(err, tmp, sizeof tmp);
    char first = (s[0] >= 'A' && s[0] <= 'Z') ? (char)(s[0] - 'A' + 'a') : s[0];
    snprintf(out, n, "%s%s%c%s", side ? side : "", side ? ": " : "", first, s[0] ? s + 1 : "");
}

static double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
listener_release(listener_t *l)
{
    if (l == NULL || atomic_fetch_sub(&l->refs, 1) != 1) {
        return;
    }
    pthread_mutex_destroy(&l->mu);
    SSL_CTX_free(l->ctx);
    for (size_t i = 0; i < l->nallowed; i++) {
        free(l->allowed[i]);
    }
    free(l->allowed);
    free(l->app_path);
    free(l->trust_domain);
    free(l);
}

/* A worker stops polling the listening fd; the last one closes it. */
static void
listener_drop_slot(listener_t *l)
{
    if (atomic_fetch_sub(&l->slots, 1) == 1) {
        close_fd(&l->fd);
    }
}

static int
set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) {
        return -1;
    }
    return (flags & O_NONBLOCK) ? 0 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* -- buffers ----------------------------------------------------------------------------- */
static int
buf_get(worker_t *w, buf_t *b)
{
    if (w->pooled > 0) {
        b->data = w->pool[--w->pooled];
    } else {
        b->data = malloc(w->bufsize);
        if (b->data == NULL) {
            return -1;
        }
        ADD(w->buffer_bytes, w->bufsize);
    }
    b->start = b->end = 0;
    return 0;
}

static void
buf_put(worker_t *w, buf_t *b)
{
    if (b->data == NULL) {
        return;
    }
    if (w->pooled < POOL_BUFFERS) {
        w->pool[w->pooled++] = b->data;
    } else {
        free(b->data);
        SUB(w->buffer_bytes, w->bufsize);
    }
    b->data = NULL;
    b->start = b->end = 0;
}

static inline size_t
buf_len(const buf_t *b)
{
    return b->data ? b->end - b->start : 0;
}

/* Pending bytes move to the front when the end is reached, but only while they are few:
 * moving most of a full buffer to gain a record's worth of room cost a copy of up to
 * 7/8 of the buffer per 16 KiB drained (bulk behind a slow peer); a full buffer waits
 * for its reader instead (the same back-pressure as a full buffer). */
static inline int
buf_compactable(const worker_t *w, const buf_t *b)
{
    return b->start > 0 && b->end - b->start <= w->bufsize / 4;
}

/* Room at the end, moving pending bytes to the front when the end is reached. */
static size_t
buf_room(worker_t *w, buf_t *b)
{
    if (b->start == b->end) {
        b->start = b->end = 0;
    } else if (b->end == w->bufsize && buf_compactable(w, b)) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
    }
    return w->bufsize - b->end;
}

/* Whether buf_room would find room: what epoll interest follows. */
static inline int
buf_has_room(const worker_t *w, const buf_t *b)
{
    return b->data == NULL || b->end < w->bufsize || b->start == b->end ||
           buf_compactable(w, b);
}

/* -- the TCP BIO --------------------------------------------------------------------------- */
/* Send the coalesced records. 1: all sent, 0: blocked with bytes left, -1: error. */
static int
flush_out(conn_t *c, int *progress)
{
    buf_t *o = &c->out;
    while (buf_len(o) > 0) {
        ssize_t n = send(c->tcp_fd, o->data + o->start, o->end - o->start, MSG_NOSIGNAL);
        if (n > 0) {
            o->start += (size_t)n;
            if (progress) {
                *progress = 1;
            }
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        }
        c->io_errno = n < 0 ? errno : EIO;
        return -1;
    }
    if (o->data) {
        o->start = o->end = 0;
    }
    return 1;
}

static int
tio_write(BIO *b, const char *data, int len)
{
    conn_t *c = BIO_get_data(b);
    worker_t *w = c->w;
    BIO_clear_retry_flags(b);
    if (len <= 0) {
        return 0;
    }
    if (c->io_errno) {
        return -1;
    }
    if (!w->coalesce) {
        ssize_t n = send(c->tcp_fd, data, (size_t)len, MSG_NOSIGNAL);
        if (n >= 0) {
            return (int)n;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            BIO_set_retry_write(b);
        } else {
            c->io_errno = errno;
        }
        return -1;
    }
    buf_t *o = &c->out;
    if (o->data == NULL && buf_get(w, o) < 0) {
        c->io_errno = ENOMEM;
        return -1;
    }
    size_t room = buf_room(w, o);
    if (room < (size_t)len) {
        if (flush_out(c, NULL) < 0) {
            return -1;
        }
        room = buf_room(w, o);
    }
    if (room == 0) {
        BIO_set_retry_write(b);
        return -1;
    }
    size_t n = room < (size_t)len ? room : (size_t)len; /* OpenSSL resumes partial writes */
    memcpy(o->data + o->end, data, n);
    o->end += n;
    return (int)n;
}

static int
tio_read(BIO *b, char *data, int len)
{
    conn_t *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0) {
        return 0;
    }
    for (;;) {
        ssize_t n = recv(c->tcp_fd, data, (size_t)len, 0);
        if (n > 0) {
            c->tcp_drained = n < len;
            return (int)n;
        }
        if (n == 0) {
            c->tcp_rd_eof = 1;
            return 0;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            BIO_set_retry_read(b);
        } else {
            c->io_errno = errno;
        }
        return -1;
    }
}

static long
tio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num, (void)ptr;
    conn_t *c = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH: {
        BIO_clear_retry_flags(b);
        int r = flush_out(c, NULL);
        if (r == 0) {
            BIO_set_retry_write(b);
        }
        return r > 0 ? 1 : -1;
    }
    case BIO_CTRL_WPENDING:
        return (long)buf_len(&c->out);
    case BIO_CTRL_EOF:
        return c->tcp_rd_eof;
    case BIO_CTRL_DUP:
        return 1;
    default:
        return 0;
    }
}

static int
tio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static int
tio_destroy(BIO *b)
{
    (void)b; /* the connection owns the fd */
    return 1;
}

int
mp_engine_global_init(void)
{
    if (tio_method != NULL) {
        return 0;
    }
    int type = BIO_get_new_index();
    if (type == -1) {
        return -1;
    }
    BIO_METHOD *m = BIO_meth_new(type | BIO_TYPE_SOURCE_SINK, "meshproxy tcp");
    if (m == NULL || BIO_meth_set_write(m, tio_write) != 1 || BIO_meth_set_read(m, tio_read) != 1 ||
        BIO_meth_set_ctrl(m, tio_ctrl) != 1 || BIO_meth_set_create(m, tio_create) != 1 ||
        BIO_meth_set_destroy(m, tio_destroy) != 1) {
        BIO_meth_free(m);
        return -1;
    }
    tio_method = m;
    return 0;
}

/* -- the connection table of a worker ------------------------------------------------------ */
static inline size_t
slot(const worker_t *w, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ULL) >> 32) & (w->table_cap - 1);
}

static conn_t *
conn_find(worker_t *w, uint64_t id)
{
    for (conn_t *c = w->table[slot(w, id)]; c; c = c->hnext) {
        if (c->id == id) {
            return c;
        }
    }
    return NULL;
}

static void
conn_insert(worker_t *w, conn_t *c)
{
    if (w->count >= w->table_cap) { /* grow; on allocation failure chains just get longer */
        size_t cap = w->table_cap * 2;
        conn_t **table = calloc(cap, sizeof *table);
        if (table != NULL) {
            conn_t **old = w->table;
            size_t old_cap = w->table_cap;
            w->table = table;
            w->table_cap = cap;
            for (size_t i = 0; i < old_cap; i++) {
                for (conn_t *x = old[i], *next; x; x = next) {
                    next = x->hnext;
                    size_t s = slot(w, x->id);
                    x->hnext = table[s];
                    table[s] = x;
                }
            }
            free(old);
        }
    }
    size_t s = slot(w, c->id);
    c->hnext = w->table[s];
    w->table[s] = c;
    w->count++;
}

static void
conn_remove(worker_t *w, conn_t *c)
{
    for (conn_t **p = &w->table[slot(w, c->id)]; *p; p = &(*p)->hnext) {
        if (*p == c) {
            *p = c->hnext;
            w->count--;
            return;
        }
    }
}

/* -- events to Python ----------------------------------------------------------------------- */
/* Waking the caller costs a context switch each way on a shared core, and a turn of its
 * event loop. So a worker wakes it at most once per epoll batch, and only for events
 * someone waits for (a handed-over connection's, a listener connection left to the
 * caller); the events of connections the engine decided itself (ACCEPTED, HANDSHAKE with
 * relaying, their final event: log lines and metrics) wait up to LAZY_WAKE_S and travel
 * in batches. Worker threads only. */
#define LAZY_WAKE_S 0.01
typedef struct {
    int now;       /* wake at the end of this batch */
    double lazy;   /* wake by then (0: nothing waiting) */
} wake_state;
static __thread wake_state *tl_wake;

static void
post(mp_engine *e, mp_event *ev)
{
    ev->next = NULL;
    pthread_mutex_lock(&e->ev_mu);
    int was_empty = e->ev_head == NULL;
    if (e->ev_tail) {
        e->ev_tail->next = ev;
    } else {
        e->ev_head = ev;
    }
    e->ev_tail = ev;
    pthread_mutex_unlock(&e->ev_mu);
    if (tl_wake == NULL) {
        if (was_empty) {
            wake(e->ev_fd);
        }
    } else if (ev->listener == 0 || (ev->kind == MP_EV_HANDSHAKE && !ev->relaying)) {
        tl_wake->now = 1;
    } else if (tl_wake->lazy == 0) {
        tl_wake->lazy = now_s() + LAZY_WAKE_S;
    }
}

void
mp_event_free(mp_event *ev)
{
    if (ev != NULL) {
        free(ev->peer_der);
        h2r_stats_free(ev->http);
        free(ev->refusal);
        free(ev);
    }
}

/* The HANDSHAKE event of c, not posted yet; with the peer's DER leaf when with_der. */
static mp_event *
handshake_event(conn_t *c, int with_der)
{
    mp_event *ev = calloc(1, sizeof *ev);
    if (ev == NULL) {
        return NULL;
    }
    ev->conn_id = c->id;
    ev->kind = MP_EV_HANDSHAKE;
    if (c->listener != NULL) {
        ev->listener = c->listener->id;
        memcpy(ev->remote, c->final->remote, sizeof ev->remote);
    }
    X509 *peer = with_der ? SSL_get0_peer_certificate(c->ssl) : NULL;
    if (peer != NULL) {
        int n = i2d_X509(peer, NULL);
        if (n <= 0 || (ev->peer_der = malloc((size_t)n)) == NULL) {
            free(ev);
            return NULL;
        }
        unsigned char *p = ev->peer_der;
        ev->peer_der_len = (size_t)i2d_X509(peer, &p);
    }
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
    if (alpn != NULL && alpn_len > 0 && alpn_len < sizeof ev->alpn) {
        memcpy(ev->alpn, alpn, alpn_len);
        ev->alpn[alpn_len] = '\0';
    }
    ev->version = SSL_get_version(c->ssl);
    const SSL_CIPHER *cipher = SSL_get_current_cipher(c->ssl);
    ev->cipher = cipher ? SSL_CIPHER_get_name(cipher) : NULL;
    return ev;
}

static void
post_handshake_event(conn_t *c, mp_event *ev)
{
    post(c->w->eng, ev);
    c->handshake_posted = 1;
    ADD(c->w->handshakes, 1);
}

static int
post_handshake(conn_t *c)
{
    mp_event *ev = handshake_event(c, 1);
    if (ev == NULL) {
        return -1;
    }
    post_handshake_event(c, ev);
    return 0;
}

/* -- epoll interest ------------------------------------------------------------------------- */
static int
set_interest(conn_t *c, int app, uint32_t want)
{
    uint32_t *cur = app ? &c->app_ev : &c->tcp_ev;
    int fd = app ? c->app_fd : c->tcp_fd;
    if (fd < 0 || want == *cur) {
        return 0;
    }
    struct epoll_event ev = {.events = want, .data.ptr = app ? &c->ep_app : &c->ep_tcp};
    int op = *cur == 0 ? EPOLL_CTL_ADD : (want == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD);
    if (epoll_ctl(c->w->epfd, op, fd, &ev) < 0) {
        return -1;
    }
    *cur = want;
    return 0;
}

static void
update_interest(conn_t *c)
{
    worker_t *w = c->w;
    uint32_t tcp = 0, app = 0;
    if (buf_len(&c->out) > 0) {
        tcp |= EPOLLOUT;
    }
    if (c->state == ST_HANDSHAKE) {
        tcp |= c->hs_want == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
    } else if (c->state == ST_RELAY) {
        if (!c->tls_eof && (c->h2 ? h2_room(c->h2, 1) : buf_has_room(w, &c->to_app))) {
            tcp |= c->rd_want == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN;
        }
        if ((c->h2 ? h2r_pending_client(c->h2) : buf_len(&c->to_tls)) > 0 && !c->notify_sent) {
            tcp |= c->wr_want == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
        }
        if (c->sd_want) {
            tcp |= c->sd_want == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
        }
        if (!c->app_eof && (c->h2 ? h2_room(c->h2, 0) : buf_has_room(w, &c->to_tls))) {
            app |= EPOLLIN;
        }
        if ((c->h2 ? h2r_pending_app(c->h2) : buf_len(&c->to_app)) > 0) {
            app |= EPOLLOUT;
        }
    }
    if (set_interest(c, 0, tcp) < 0 || set_interest(c, 1, app) < 0) {
        char reason[MP_REASON_MAX];
        errno_text(errno, "epoll_ctl", reason, sizeof reason);
        conn_end(c, reason);
    }
}

/* Idle connections hold no buffers. */
static void
tidy(conn_t *c)
{
    if (c->to_app.data && buf_len(&c->to_app) == 0) {
        buf_put(c->w, &c->to_app);
    }
    if (c->to_tls.data && buf_len(&c->to_tls) == 0) {
        buf_put(c->w, &c->to_tls);
    }
    if (c->out.data && buf_len(&c->out) == 0) {
        buf_put(c->w, &c->out);
    }
}

/* -- ending a connection -------------------------------------------------------------------- */
static void
eof_text(const conn_t *c, char *out, size_t n)
{
    snprintf(out, n, "%s", c->handshake_posted || c->state != ST_HANDSHAKE
                               ? "peer closed TCP without TLS close_notify"
                               : "peer closed the connection during the TLS handshake");
}

/* Why an SSL call failed, in the words of the Python backend (tls.describe_error). */
static void
ssl_failure_text(conn_t *c, int ssl_error, char *out, size_t n)
{
    unsigned long code = ERR_peek_last_error();
    int ssl_lib = ERR_GET_LIB(code) == ERR_LIB_SSL;
    if (c->io_errno) {
        errno_text(c->io_errno, NULL, out, n);
    } else if (ssl_error == SSL_ERROR_SSL && ssl_lib &&
               ERR_GET_REASON(code) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        long result = SSL_get_verify_result(c->ssl);
        snprintf(out, n, "certificate verify failed: %s", X509_verify_cert_error_string(result));
    } else if (ssl_error == SSL_ERROR_SSL && ssl_lib &&
               ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        eof_text(c, out, n);
    } else if (ssl_error == SSL_ERROR_SSL && code != 0) {
        const char *reason = ERR_reason_error_string(code);
        snprintf(out, n, "%s", reason ? reason : "TLS protocol error");
    } else if (c->tcp_rd_eof || ssl_error == SSL_ERROR_SYSCALL) {
        eof_text(c, out, n);
    } else {
        snprintf(out, n, "TLS error %d", ssl_error);
    }
    ERR_clear_error();
}

static int
fail_ssl(conn_t *c, int ssl_error)
{
    char reason[MP_REASON_MAX];
    ssl_failure_text(c, ssl_error, reason, sizeof reason);
    conn_end(c, reason);
    return -1;
}

static int
fail_errno(conn_t *c, const char *side, int err)
{
    char reason[MP_REASON_MAX];
    errno_text(err, side, reason, sizeof reason);
    conn_end(c, reason);
    return -1;
}

/* A Unix socket closed with unread bytes resets its peer (ECONNRESET on the app's next
 * read) instead of giving it EOF. Those bytes cannot be delivered any more: read and drop
 * a bounded amount so that the app sees the end of the connection, as on the Python
 * backend (whose transport has always read them already). */
static void
discard_unread(conn_t *c)
{
    char sink[16384];
    for (int i = 0; i < 16; i++) {
        if (recv(c->app_fd, sink, sizeof sink, MSG_DONTWAIT) <= 0) {
            return;
        }
    }
}

/* Close both fds and post the final event now; free memory after the epoll batch. */
static void
conn_end(conn_t *c, const char *reason)
{
    if (c->state == ST_DEAD) {
        return;
    }
    worker_t *w = c->w;
    hs_unlink(c);
    if (c->tcp_ev) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->tcp_fd, NULL);
    }
    if (c->app_ev) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->app_fd, NULL);
    }
    c->tcp_ev = c->app_ev = 0;
    if (reason[0] && c->app_fd >= 0) {
        discard_unread(c);
    }
    close_fd(&c->tcp_fd);
    close_fd(&c->app_fd);
    mp_event *ev = c->final;
    c->final = NULL;
    ev->conn_id = c->id;
    ev->kind = c->handshake_posted ? MP_EV_CLOSED : MP_EV_HANDSHAKE_FAILED;
    snprintf(ev->reason, sizeof ev->reason, "%s", reason);
    ev->tls_to_app = c->tls_to_app;
    ev->app_to_tls = c->app_to_tls;
    if (c->h2 != NULL) {
        h2_unwait(c);
        ev->http = h2r_finish(c->h2, now_ns());
    }
    post(w->eng, ev);
    if (c->handshake_posted) {
        ADD(w->closed, 1);
    } else {
        ADD(w->failures, 1);
    }
    SUB(w->active, 1);
    conn_remove(w, c);
    c->state = ST_DEAD;
    c->dnext = w->dead;
    w->dead = c;
}

static void
reap(worker_t *w)
{
    while (w->dead) {
        conn_t *c = w->dead;
        w->dead = c->dnext;
        SSL_free(c->ssl); /* frees the BIO, which does not own the fd */
        h2r_free(c->h2);
        buf_put(w, &c->to_app);
        buf_put(w, &c->to_tls);
        buf_put(w, &c->out);
        listener_release(c->listener);
        free(c);
    }
    while (w->dead_slots) {
        lslot_t *s = w->dead_slots;
        w->dead_slots = s->next;
        listener_release(s->l);
        free(s);
    }
}

/* -- handshake ------------------------------------------------------------------------------ */
static void
hs_unlink(conn_t *c)
{
    if (!c->hs_linked) {
        return;
    }
    worker_t *w = c->w;
    if (c->hs_prev) {
        c->hs_prev->hs_next = c->hs_next;
    } else {
        w->hs_head = c->hs_next;
    }
    if (c->hs_next) {
        c->hs_next->hs_prev = c->hs_prev;
    } else {
        w->hs_tail = c->hs_prev;
    }
    c->hs_prev = c->hs_next = NULL;
    c->hs_linked = 0;
}

static void
hs_link(conn_t *c)
{
    worker_t *w = c->w;
    c->hs_prev = w->hs_tail;
    c->hs_next = NULL;
    if (w->hs_tail) {
        w->hs_tail->hs_next = c;
    } else {
        w->hs_head = c;
    }
    w->hs_tail = c;
    c->hs_linked = 1;
    if (w->next_timer == 0 || c->deadline < w->next_timer) {
        w->next_timer = c->deadline;
    }
}

static void listener_handshaken(conn_t *c);

/* The handshake keeps OpenSSL's default-sized buffers for its whole length (releasing them
 * after every flight cost a 64 KiB malloc/free each, and malloc_consolidate with them);
 * the relay reads ahead in large buffers and gives them back whenever they are empty. */
static void
relay_buffers(conn_t *c)
{
    const mp_engine_config *cfg = &c->w->eng->cfg;
    SSL_set_default_read_buffer_len(c->ssl, cfg->read_buffer_size);
    if (cfg->release_buffers) {
        SSL_set_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
        (void)SSL_free_buffers(c->ssl); /* fails, harmlessly, while bytes are buffered */
    }
}

static void
handshake_step(conn_t *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        if (flush_out(c, NULL) < 0) {
            fail_errno(c, NULL, c->io_errno);
            return;
        }
        relay_buffers(c);
        if (c->listener != NULL) {
            hs_unlink(c);
            listener_handshaken(c);
            return;
        }
        c->state = ST_WAIT; /* the caller checks the peer, then relays or closes */
        if (post_handshake(c) < 0) {
            conn_end(c, "out of memory");
            return;
        }
        tidy(c);
        update_interest(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        c->hs_want = e;
        if (flush_out(c, NULL) < 0) {
            fail_errno(c, NULL, c->io_errno);
            return;
        }
        tidy(c);
        update_interest(c);
        return;
    }
    char reason[MP_REASON_MAX];
    ssl_failure_text(c, e, reason, sizeof reason);
    (void)flush_out(c, NULL); /* best effort: the alert tells the peer why */
    conn_end(c, reason);
}

/* A new connection in its handshake; takes fd and final (posted on any failure). ctx is
 * the context to use (the caller keeps its reference); l the listener that accepted it. */
static void
begin_tls(worker_t *w, uint64_t id, int fd, mp_event *final, SSL_CTX *ctx, int server_side,
          const char *sni, listener_t *l)
{
    conn_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        final->conn_id = id;
        final->kind = MP_EV_HANDSHAKE_FAILED;
        snprintf(final->reason, sizeof final->reason, "out of memory");
        close(fd);
        post(w->eng, final);
        ADD(w->failures, 1);
        listener_release(l);
        return;
    }
    c->id = id;
    c->w = w;
    c->state = ST_HANDSHAKE;
    c->tcp_fd = fd;
    c->app_fd = -1;
    c->ep_tcp.conn = c->ep_app.conn = c;
    c->ep_app.app = 1;
    c->final = final;
    c->listener = l; /* its reference passes to the connection */
    conn_insert(w, c);
    ADD(w->active, 1);
    if (l != NULL) {
        c->deadline = now_s() + l->timeout;
        hs_link(c);
    }
    int one = 1;
    if (l == NULL || !l->nodelay) { /* as uvloop */
        (void)setsockopt(c->tcp_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int lowat = TCP_UNSENT_LOWAT;
    (void)setsockopt(c->tcp_fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
    if (l == NULL && set_nonblocking(c->tcp_fd) < 0) { /* accept4 made ours non-blocking */
        fail_errno(c, NULL, errno);
        return;
    }
    ERR_clear_error();
    c->ssl = SSL_new(ctx);
    BIO *bio = c->ssl ? BIO_new(tio_method) : NULL;
    if (bio == NULL) {
        conn_end(c, "out of memory");
        return;
    }
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio);
    SSL_set_read_ahead(c->ssl, 1); /* the relay's sizes come after the handshake */
    if (server_side) {
        SSL_set_accept_state(c->ssl);
    } else {
        SSL_set_connect_state(c->ssl);
        if (sni && sni[0] && SSL_set_tlsext_host_name(c->ssl, sni) != 1) {
            conn_end(c, "SNI rejected");
            return;
        }
    }
    handshake_step(c); /* a client's ClientHello leaves now: meshes sniff the first bytes */
}

static void
start_handshake(worker_t *w, cmd_t *cmd)
{
    mp_event *final = cmd->final;
    int fd = cmd->fd;
    cmd->final = NULL;
    cmd->fd = -1;
    begin_tls(w, cmd->conn_id, fd, final, cmd->ctx, cmd->server_side, cmd->text, NULL);
}

/* -- relay ---------------------------------------------------------------------------------- */
static int
tls_to_buffer(conn_t *c, int *progress)
{
    buf_t *b = &c->to_app;
    while (!c->tls_eof) {
        if (b->data == NULL && buf_get(c->w, b) < 0) {
            conn_end(c, "out of memory");
            return -1;
        }
        size_t room = buf_room(c->w, b);
        if (room == 0) {
            break; /* back-pressure: the app is slower than the peer */
        }
        if (c->tcp_drained && !SSL_has_pending(c->ssl)) {
            c->rd_want = SSL_ERROR_WANT_READ; /* until epoll says readable */
            break;
        }
        ERR_clear_error();
        int n = SSL_read(c->ssl, b->data + b->end, (int)room);
        if (n > 0) {
            b->end += (size_t)n;
            c->rd_want = 0;
            *progress = 1;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            c->rd_want = e;
            break;
        }
        if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify: a half-close, not the end */
            c->tls_eof = 1;
            *progress = 1;
            break;
        }
        return fail_ssl(c, e);
    }
    return 0;
}

static int
buffer_to_app(conn_t *c, int *progress)
{
    buf_t *b = &c->to_app;
    while (buf_len(b) > 0) {
        ssize_t n = send(c->app_fd, b->data + b->start, b->end - b->start, MSG_NOSIGNAL);
        if (n > 0) {
            b->start += (size_t)n;
            c->tls_to_app += (uint64_t)n;
            ADD(c->w->t2a, (uint64_t)n);
            *progress = 1;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        return fail_errno(c, "app", n < 0 ? errno : EIO);
    }
    if (c->tls_eof && buf_len(b) == 0 && !c->app_shut) {
        if (shutdown(c->app_fd, SHUT_WR) < 0 && errno != ENOTCONN) {
            return fail_errno(c, "app", errno);
        }
        c->app_shut = 1;
        *progress = 1;
    }
    return 0;
}

/* The TLS side's end once the app has closed and `drained` says nothing of it is left to
 * encrypt: close_notify, then the queued records out, then the TCP write side shut. Both
 * relay modes (plain and HTTP/2) end this way. */
static int
finish_tls_side(conn_t *c, int drained, int *progress)
{
    if (c->app_eof && drained && !c->notify_sent) {
        ERR_clear_error();
        int r = SSL_shutdown(c->ssl); /* sends close_notify; the peer's comes through SSL_read */
        if (r >= 0) {
            c->notify_sent = 1;
            c->sd_want = 0;
            *progress = 1;
        } else {
            int e = SSL_get_error(c->ssl, r);
            if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) {
                return fail_ssl(c, e);
            }
            c->sd_want = e;
        }
    }
    int flushed = flush_out(c, progress);
    if (flushed < 0) {
        return fail_errno(c, NULL, c->io_errno);
    }
    if (c->notify_sent && flushed == 1 && !c->tcp_shut) {
        if (shutdown(c->tcp_fd, SHUT_WR) < 0 && errno != ENOTCONN) {
            return fail_errno(c, NULL, errno);
        }
        c->tcp_shut = 1;
        *progress = 1;
    }
    return 0;
}

static int
app_to_buffer(conn_t *c, int *progress)
{
    buf_t *b = &c->to_tls;
    while (!c->app_eof) {
        if (b->data == NULL && buf_get(c->w, b) < 0) {
            conn_end(c, "out of memory");
            return -1;
        }
        size_t room = buf_room(c->w, b);
        if (room == 0) {
            break; /* back-pressure: the peer is slower than the app */
        }
        if (c->app_drained) {
            break; /* until epoll says readable */
        }
        ssize_t n = recv(c->app_fd, b->data + b->end, room, 0);
        if (n > 0) {
            b->end += (size_t)n;
            c->app_drained = (size_t)n < room;
            *progress = 1;
            continue;
        }
        if (n == 0) {
            c->app_eof = 1;
            *progress = 1;
            break;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            break;
        }
        return fail_errno(c, "app", errno);
    }
    return 0;
}

static int
buffer_to_tls(conn_t *c, int *progress)
{
    buf_t *b = &c->to_tls;
    if (flush_out(c, progress) < 0) {
        return fail_errno(c, NULL, c->io_errno);
    }
    while (buf_len(b) > 0) {
        ERR_clear_error();
        int n = SSL_write(c->ssl, b->data + b->start, (int)(b->end - b->start));
        if (n > 0) {
            b->start += (size_t)n;
            c->app_to_tls += (uint64_t)n;
            ADD(c->w->a2t, (uint64_t)n);
            c->wr_want = 0;
            *progress = 1;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            c->wr_want = e;
            break;
        }
        return fail_ssl(c, e);
    }
    return finish_tls_side(c, buf_len(b) == 0, progress);
}

/* -- HTTP/2 relay mode (h2relay.c decides; this moves its bytes) ------------------------------ */
#define H2_HIGH (128 * 1024) /* bytes queued toward a side before we stop reading the other */

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Room to read the side that feeds `toward_app` (the client) or the client's way (the
 * app). The client's bytes also make replies of ours: a client that sends and never reads
 * is bounded too. */
static int
h2_room(const h2r *r, int toward_app)
{
    if (toward_app) {
        return h2r_pending_app(r) < H2_HIGH && h2r_pending_client(r) < 4 * H2_HIGH;
    }
    return h2r_pending_client(r) < H2_HIGH;
}

static int
h2_tls_in(conn_t *c, int *progress)
{
    unsigned char tmp[16384]; /* one TLS record */
    while (!c->tls_eof && h2_room(c->h2, 1) && !h2r_failed(c->h2)) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, tmp, (int)sizeof tmp);
        if (n > 0) {
            c->rd_want = 0;
            *progress = 1;
            c->tls_to_app += (uint64_t)n;
            ADD(c->w->t2a, (uint64_t)n);
            (void)h2r_feed_client(c->h2, tmp, (size_t)n, now_ns()); /* failure: see h2_pump */
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            c->rd_want = e;
            break;
        }
        if (e == SSL_ERROR_ZERO_RETURN) {
            c->tls_eof = 1;
            *progress = 1;
            break;
        }
        return fail_ssl(c, e);
    }
    return 0;
}

static int
h2_to_app(conn_t *c, int *progress)
{
    size_t len;
    const uint8_t *p;
    while ((p = h2r_out_app(c->h2, &len)) != NULL && len > 0) {
        ssize_t n = send(c->app_fd, p, len, MSG_NOSIGNAL);
        if (n > 0) {
            h2r_consumed_app(c->h2, (size_t)n);
            *progress = 1;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        return fail_errno(c, "app", n < 0 ? errno : EIO);
    }
    if (c->tls_eof && h2r_pending_app(c->h2) == 0 && !c->app_shut) {
        if (shutdown(c->app_fd, SHUT_WR) < 0 && errno != ENOTCONN) {
            return fail_errno(c, "app", errno);
        }
        c->app_shut = 1;
        *progress = 1;
    }
    return 0;
}

static int
h2_app_in(conn_t *c, int *progress)
{
    unsigned char tmp[65536];
    while (!c->app_eof && h2_room(c->h2, 0) && !h2r_failed(c->h2)) {
        ssize_t n = recv(c->app_fd, tmp, sizeof tmp, 0);
        if (n > 0) {
            *progress = 1;
            (void)h2r_feed_app(c->h2, tmp, (size_t)n, now_ns());
            continue;
        }
        if (n == 0) {
            c->app_eof = 1;
            *progress = 1;
            break;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            break;
        }
        return fail_errno(c, "app", errno);
    }
    return 0;
}

static int
h2_to_tls(conn_t *c, int *progress)
{
    if (flush_out(c, progress) < 0) {
        return fail_errno(c, NULL, c->io_errno);
    }
    size_t len;
    const uint8_t *p;
    while ((p = h2r_out_client(c->h2, &len)) != NULL && len > 0) {
        ERR_clear_error();
        int n = SSL_write(c->ssl, p, len > (1u << 30) ? (int)(1u << 30) : (int)len);
        if (n > 0) {
            h2r_consumed_client(c->h2, (size_t)n);
            c->app_to_tls += (uint64_t)n;
            ADD(c->w->a2t, (uint64_t)n);
            c->wr_want = 0;
            *progress = 1;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            c->wr_want = e;
            break;
        }
        return fail_ssl(c, e);
    }
    return finish_tls_side(c, h2r_pending_client(c->h2) == 0, progress);
}

/* Requests the route rules refused: one event each, for Python's log line. */
static void
h2_post_refusals(conn_t *c)
{
    h2r_refusal list[32];
    size_t n = h2r_take_refusals(c->h2, list, 32);
    for (size_t i = 0; i < n; i++) {
        mp_event *ev = calloc(1, sizeof *ev);
        h2r_refusal *f = malloc(sizeof *f);
        if (ev == NULL || f == NULL) {
            free(ev);
            free(f);
            return; /* a log line lost; the counters still have it */
        }
        *f = list[i];
        ev->conn_id = c->id;
        ev->kind = MP_EV_HTTP_REFUSED;
        ev->refusal = f;
        post(c->w->eng, ev);
    }
}

/* Counters reach /metrics while the connection lives, at most once per H2_STATS_NS per
 * connection (Python's work per event is far more than per request): at once if the
 * last post is that old, else in the connection's next slot (the worker's epoll timeout). */
#define H2_STATS_NS 1000000000u

static void
h2_unwait(conn_t *c)
{
    if (!c->h2_waiting) {
        return;
    }
    if (c->h2_prev) {
        c->h2_prev->h2_next = c->h2_next;
    } else {
        c->w->h2_waiting = c->h2_next;
    }
    if (c->h2_next) {
        c->h2_next->h2_prev = c->h2_prev;
    }
    c->h2_prev = c->h2_next = NULL;
    c->h2_waiting = 0;
}

static void
h2_post_now(conn_t *c, uint64_t now)
{
    mp_event *ev = calloc(1, sizeof *ev);
    if (ev == NULL) {
        return; /* later, or with the final event */
    }
    ev->http = h2r_take(c->h2);
    if (ev->http == NULL) {
        free(ev);
        return;
    }
    ev->conn_id = c->id;
    ev->kind = MP_EV_HTTP_STATS;
    c->h2_posted = now;
    post(c->w->eng, ev);
}

static void
h2_post_stats(conn_t *c)
{
    if (!h2r_dirty(c->h2) || c->h2_waiting) {
        return;
    }
    uint64_t now = now_ns();
    if (now - c->h2_posted >= H2_STATS_NS) {
        h2_post_now(c, now);
        return;
    }
    worker_t *w = c->w;
    c->h2_waiting = 1;
    c->h2_prev = NULL;
    c->h2_next = w->h2_waiting;
    if (w->h2_waiting) {
        w->h2_waiting->h2_prev = c;
    }
    w->h2_waiting = c;
    uint64_t due = c->h2_posted + H2_STATS_NS;
    if (w->h2_due == 0 || due < w->h2_due) {
        w->h2_due = due;
    }
}

/* The slots that came: post those counters. */
static void
h2_post_due(worker_t *w)
{
    if (w->h2_due == 0) {
        return;
    }
    uint64_t now = now_ns();
    if (now < w->h2_due) {
        return;
    }
    w->h2_due = 0;
    for (conn_t *c = w->h2_waiting, *next; c; c = next) {
        next = c->h2_next;
        uint64_t due = c->h2_posted + H2_STATS_NS;
        if (due <= now) {
            h2_unwait(c);
            if (h2r_dirty(c->h2)) {
                h2_post_now(c, now);
            }
        } else if (w->h2_due == 0 || due < w->h2_due) {
            w->h2_due = due;
        }
    }
}

/* epoll_wait's timeout: until the next slot, or -1 */
static int
h2_timeout_ms(const worker_t *w)
{
    if (w->h2_due == 0) {
        return -1;
    }
    uint64_t now = now_ns();
    return w->h2_due <= now ? 0 : (int)((w->h2_due - now) / 1000000u) + 1;
}

static int
h2_pump(conn_t *c, int *progress)
{
    if (h2_tls_in(c, progress) < 0 || h2_to_app(c, progress) < 0 ||
        h2_app_in(c, progress) < 0 || h2_to_tls(c, progress) < 0) {
        return -1;
    }
    h2_post_refusals(c);
    h2_post_stats(c);
    if (h2r_drained(c->h2) && buf_len(&c->out) == 0) { /* shutdown: GOAWAY, streams done */
        conn_end(c, "drained");
        return -1;
    }
    if (h2r_failed(c->h2)) { /* its GOAWAY went out with h2_to_tls, as far as it could */
        char reason[MP_REASON_MAX];
        snprintf(reason, sizeof reason, "%s", h2r_error(c->h2));
        conn_end(c, reason);
        return -1;
    }
    return 0;
}

static void
make_ready(conn_t *c)
{
    if (!c->on_ready) {
        c->on_ready = 1;
        c->rnext = c->w->ready;
        c->w->ready = c;
    }
}

static void
pump(conn_t *c)
{
    int round;
    for (round = 0; round < PUMP_ROUNDS; round++) {
        int progress = 0;
        if (c->h2 != NULL) {
            if (h2_pump(c, &progress) < 0) {
                return; /* ended */
            }
        } else if (tls_to_buffer(c, &progress) < 0 || buffer_to_app(c, &progress) < 0 ||
                   app_to_buffer(c, &progress) < 0 || buffer_to_tls(c, &progress) < 0) {
            return; /* ended */
        }
        if (!progress) {
            break;
        }
    }
    if (c->app_shut && c->tcp_shut) {
        conn_end(c, "");
        return;
    }
    if (round == PUMP_ROUNDS) {
        make_ready(c); /* more to do: after the other connections of this batch */
    }
    tidy(c);
    update_interest(c);
}

static void
start_relay(worker_t *w, cmd_t *cmd)
{
    conn_t *c = conn_find(w, cmd->conn_id);
    if (c == NULL) {
        close_fd(&cmd->fd); /* ended meanwhile; its final event is already posted */
        return;
    }
    if (c->state != ST_WAIT) {
        close_fd(&cmd->fd);
        conn_end(c, "relay requested before the handshake completed");
        return;
    }
    c->app_fd = cmd->fd;
    cmd->fd = -1;
    int domain = 0;
    socklen_t dlen = sizeof domain;
    if (getsockopt(c->app_fd, SOL_SOCKET, SO_DOMAIN, &domain, &dlen) == 0 && domain == AF_UNIX) {
        widen_app_queue(c->app_fd); /* not TCP: a fixed SO_SNDBUF ends its autotuning */
    }
    if (cmd->op == CMD_RELAY_H2) {
        c->h2 = h2r_new(cmd->policy); /* takes the policy, also when it fails */
        cmd->policy = NULL;
        if (c->h2 == NULL) {
            conn_end(c, "out of memory");
            return;
        }
    }
    if (set_nonblocking(c->app_fd) < 0) {
        fail_errno(c, "app", errno);
        return;
    }
    c->state = ST_RELAY;
    pump(c); /* bytes may already wait in OpenSSL's read-ahead buffer */
}

static void
on_io(conn_t *c)
{
    switch (c->state) {
    case ST_HANDSHAKE:
        handshake_step(c);
        break;
    case ST_WAIT:
        if (flush_out(c, NULL) < 0) {
            fail_errno(c, NULL, c->io_errno);
            return;
        }
        tidy(c);
        update_interest(c);
        break;
    case ST_RELAY:
        pump(c);
        break;
    default:
        break;
    }
}


/* -- listeners: accept, identity, app connect ------------------------------------------------ */
/* "host:port" as meshproxy.tls._native.format_address words it. */
static void
format_remote(const struct sockaddr_storage *ss, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        snprintf(out, n, "%s:%u", host, (unsigned)ntohs(a->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        snprintf(out, n, "[%s]:%u", host, (unsigned)ntohs(a->sin6_port));
    } else {
        snprintf(out, n, "?");
    }
}

/* A connection id that routes to this worker (conn_id % threads == its index). */
static uint64_t
next_id_for(worker_t *w)
{
    mp_engine *e = w->eng;
    uint64_t idx = (uint64_t)(w - e->workers);
    for (;;) {
        uint64_t id = atomic_fetch_add(&e->next_id, 1);
        if (id % (uint64_t)e->nworkers == idx) {
            return id;
        }
    }
}

static int
printable(const unsigned char *p, int n)
{
    for (int i = 0; i < n; i++) {
        if (p[i] < 0x21 || p[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* The positive case of pki.check_peer in C: exactly one SPIFFE URI, of the form
 * spiffe://<trust domain>/marble/<type> with <type> one of the allowed ones; the instance
 * UUID from the first urn:uuid: URI. 1: allowed (id and uuid written); 0: anything else,
 * which the caller's pki.check_peer decides (and words) instead. */
static int
identity_allowed(SSL *ssl, const listener_t *l, char *id, size_t idlen, char *uuid,
                 size_t uuidlen)
{
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (peer == NULL || l->trust_domain == NULL) {
        return 0;
    }
    int crit = 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(peer, NID_subject_alt_name, &crit, NULL);
    if (names == NULL) {
        return 0; /* none, or more than one SAN extension */
    }
    const unsigned char *spiffe = NULL, *urn = NULL;
    int spiffe_len = 0, urn_len = 0, nspiffe = 0, ok = 1;
    for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
        if (gn->type != GEN_URI) {
            continue;
        }
        const unsigned char *p = ASN1_STRING_get0_data(gn->d.uniformResourceIdentifier);
        int n = ASN1_STRING_length(gn->d.uniformResourceIdentifier);
        if (!printable(p, n)) {
            ok = 0; /* let the Python side parse what is unusual */
            break;
        }
        if (n >= 9 && memcmp(p, "spiffe://", 9) == 0) {
            nspiffe++;
            spiffe = p;
            spiffe_len = n;
        } else if (urn == NULL && n >= 9 && memcmp(p, "urn:uuid:", 9) == 0) {
            urn = p + 9;
            urn_len = n - 9;
        }
    }
    if (ok && nspiffe == 1 && (size_t)spiffe_len < idlen && (size_t)urn_len < uuidlen) {
        const unsigned char *rest = spiffe + 9, *end = spiffe + spiffe_len;
        size_t dlen = strlen(l->trust_domain);
        const char marble[] = "/marble/";
        const unsigned char *type = rest + dlen + sizeof marble - 1;
        ok = (size_t)(end - rest) > dlen + sizeof marble - 1 &&
             memcmp(rest, l->trust_domain, dlen) == 0 &&
             memcmp(rest + dlen, marble, sizeof marble - 1) == 0 &&
             memchr(type, '/', (size_t)(end - type)) == NULL;
        int allowed = 0;
        for (size_t i = 0; ok && i < l->nallowed; i++) {
            size_t tlen = strlen(l->allowed[i]);
            allowed |= tlen == (size_t)(end - type) && memcmp(type, l->allowed[i], tlen) == 0;
        }
        ok = ok && allowed;
        if (ok) {
            memcpy(id, spiffe, (size_t)spiffe_len);
            id[spiffe_len] = '\0';
            if (urn != NULL) {
                memcpy(uuid, urn, (size_t)urn_len);
            }
            uuid[urn != NULL ? urn_len : 0] = '\0';
        }
    } else {
        ok = 0;
    }
    GENERAL_NAMES_free(names);
    return ok;
}

/* The app's Unix socket, connected now, or -1: a full backlog, the app not listening,
 * or anything else is the caller's (it retries, words the refusal and logs it). */
static void
widen_app_queue(int fd)
{
    int size = APP_SNDBUF;
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size); /* best effort */
}

static int
connect_app(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path); /* length checked at listen */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    widen_app_queue(fd);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        return fd;
    }
    close(fd);
    return -1;
}

/* A listener's connection finished its handshake: relay at once if C may decide. */
static void
listener_handshaken(conn_t *c)
{
    listener_t *l = c->listener;
    mp_event *ev = handshake_event(c, 0);
    if (ev == NULL) {
        conn_end(c, "out of memory");
        return;
    }
    int fast = l->anonymous || identity_allowed(c->ssl, l, ev->peer_id, sizeof ev->peer_id,
                                                  ev->peer_uuid, sizeof ev->peer_uuid);
    int app = fast && l->app_path != NULL ? connect_app(l->app_path) : -1;
    if (app < 0) { /* the caller decides, as for a connection it handed over */
        mp_event_free(ev);
        c->state = ST_WAIT;
        if (post_handshake(c) < 0) {
            conn_end(c, "out of memory");
            return;
        }
        tidy(c);
        update_interest(c);
        return;
    }
    ev->relaying = 1;
    post_handshake_event(c, ev);
    ADD(c->w->fast_path, 1);
    c->app_fd = app;
    c->state = ST_RELAY;
    pump(c); /* the client's first bytes may already wait in OpenSSL's buffer */
}

static void
accept_one(worker_t *w, listener_t *l, int fd, const struct sockaddr_storage *ss)
{
    mp_event *final = calloc(1, sizeof *final);
    if (final == NULL) {
        close(fd); /* no memory for even its event: refuse it outright */
        return;
    }
    mp_event *accepted = calloc(1, sizeof *accepted);
    if (accepted == NULL) {
        free(final);
        close(fd);
        return;
    }
    uint64_t id = next_id_for(w);
    final->listener = l->id;
    format_remote(ss, final->remote, sizeof final->remote);
    accepted->conn_id = id;
    accepted->kind = MP_EV_ACCEPTED;
    accepted->listener = l->id;
    memcpy(accepted->remote, final->remote, sizeof accepted->remote);
    post(w->eng, accepted); /* before any other event of the connection */
    atomic_fetch_add(&l->refs, 1); /* for the connection */
    ADD(w->accepted, 1);
    pthread_mutex_lock(&l->mu);
    SSL_CTX *ctx = l->ctx;
    SSL_CTX_up_ref(ctx); /* a rotation may swap l->ctx meanwhile */
    pthread_mutex_unlock(&l->mu);
    begin_tls(w, id, fd, final, ctx, 1, NULL, l);
    SSL_CTX_free(ctx); /* the session holds its own reference */
}

static void
slot_poll(worker_t *w, lslot_t *s, int on)
{
    if (on == s->polled) {
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &s->ep};
    if (epoll_ctl(w->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, s->l->fd, &ev) == 0) {
        s->polled = on;
    }
}

static void
accept_ready(worker_t *w, lslot_t *s)
{
    listener_t *l = s->l;
    if (s->removed) {
        return;
    }
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            accept_one(w, l, fd, &ss);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) {
            continue;
        }
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            slot_poll(w, s, 0); /* as asyncio does: pause, try again later */
            s->paused_until = now_s() + ACCEPT_PAUSE_S;
            if (w->next_timer == 0 || s->paused_until < w->next_timer) {
                w->next_timer = s->paused_until;
            }
        }
        return; /* EAGAIN, or an error of this listening socket */
    }
}

/* Handshake deadlines and accept pauses; returns the epoll timeout in ms (-1: none). */
static int
run_timers(worker_t *w)
{
    if (w->next_timer == 0) {
        return -1;
    }
    double now = now_s();
    if (now < w->next_timer) {
        return (int)((w->next_timer - now) * 1000) + 1;
    }
    double next = 0;
    for (conn_t *c = w->hs_head, *n; c; c = n) {
        n = c->hs_next;
        if (c->deadline <= now) {
            conn_end(c, "TLS handshake timed out");
        } else if (next == 0 || c->deadline < next) {
            next = c->deadline;
        }
    }
    for (lslot_t *s = w->slots; s; s = s->next) {
        if (!s->polled && s->paused_until > 0) {
            if (s->paused_until <= now) {
                s->paused_until = 0;
                slot_poll(w, s, 1);
            } else if (next == 0 || s->paused_until < next) {
                next = s->paused_until;
            }
        }
    }
    w->next_timer = next;
    return next == 0 ? -1 : (int)((next - now) * 1000) + 1;
}

static void
add_slot(worker_t *w, listener_t *l)
{
    lslot_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        listener_drop_slot(l);
        listener_release(l);
        return;
    }
    s->ep.conn = NULL;
    s->l = l; /* the command's reference passes to the slot */
    s->next = w->slots;
    w->slots = s;
    slot_poll(w, s, 1);
}

static void
remove_slot(worker_t *w, listener_t *l)
{
    for (lslot_t **p = &w->slots; *p; p = &(*p)->next) {
        lslot_t *s = *p;
        if (s->l == l) {
            *p = s->next;
            slot_poll(w, s, 0);
            listener_drop_slot(l);
            s->removed = 1; /* a later event of this batch may still name it */
            s->next = w->dead_slots;
            w->dead_slots = s;
            return;
        }
    }
}

/* -- the worker thread ---------------------------------------------------------------------- */
static void
dispose(worker_t *w, cmd_t *cmd)
{
    close_fd(&cmd->fd);
    if (cmd->op == CMD_LISTEN && cmd->l != NULL) { /* never reached the worker */
        listener_drop_slot(cmd->l);
    }
    listener_release(cmd->l);
    if (cmd->final != NULL) {
        cmd->final->conn_id = cmd->conn_id;
        cmd->final->kind = MP_EV_HANDSHAKE_FAILED;
        snprintf(cmd->final->reason, sizeof cmd->final->reason, "engine stopped");
        post(w->eng, cmd->final);
        ADD(w->failures, 1);
        cmd->final = NULL;
    }
    SSL_CTX_free(cmd->ctx);
    h2r_policy_free(cmd->policy);
    free(cmd);
}

static cmd_t *
take_commands(worker_t *w, int *stopping)
{
    drain_eventfd(w->cmd_fd); /* before taking: a later command writes it again */
    pthread_mutex_lock(&w->mu);
    cmd_t *list = w->cmd_head;
    w->cmd_head = w->cmd_tail = NULL;
    *stopping = w->stopping;
    pthread_mutex_unlock(&w->mu);
    return list;
}

static void
run_commands(worker_t *w, cmd_t *list)
{
    while (list) {
        cmd_t *cmd = list;
        list = cmd->next;
        conn_t *c;
        switch (cmd->op) {
        case CMD_HANDSHAKE:
            start_handshake(w, cmd);
            break;
        case CMD_RELAY:
        case CMD_RELAY_H2:
            start_relay(w, cmd);
            break;
        case CMD_CLOSE:
            if ((c = conn_find(w, cmd->conn_id)) != NULL) {
                conn_end(c, cmd->text);
            }
            break;
        case CMD_LISTEN:
            add_slot(w, cmd->l);
            cmd->l = NULL;
            break;
        case CMD_UNLISTEN:
            remove_slot(w, cmd->l);
            if (tl_wake != NULL) {
                tl_wake->now = 1; /* what it accepted so far reaches the drain at once */
            }
            break;
        case CMD_DRAIN_H2:
            if ((c = conn_find(w, cmd->conn_id)) != NULL && c->h2 != NULL &&
                c->state == ST_RELAY) {
                h2r_drain(c->h2);
                pump(c);
            }
            break;
        default:
            break;
        }
        dispose(w, cmd); /* whatever the command did not take over */
    }
}

static void
run_ready(worker_t *w)
{
    conn_t *list = w->ready;
    w->ready = NULL;
    while (list) {
        conn_t *c = list;
        list = c->rnext;
        c->on_ready = 0;
        if (c->state == ST_RELAY) {
            pump(c);
        }
    }
}

static void
worker_stop(worker_t *w)
{
    int stopping;
    for (cmd_t *list = take_commands(w, &stopping); list;) {
        cmd_t *cmd = list;
        list = cmd->next;
        dispose(w, cmd);
    }
    w->ready = NULL;
    while (w->slots) {
        remove_slot(w, w->slots->l);
    }
    for (size_t i = 0; i < w->table_cap; i++) {
        while (w->table[i]) {
            conn_end(w->table[i], "engine stopped"); /* removes it from the chain */
        }
    }
    reap(w);
}

static void *
worker_main(void *arg)
{
    worker_t *w = arg;
    struct epoll_event evs[EPOLL_BATCH];
    int stopping = 0;
    char name[16];
    snprintf(name, sizeof name, "meshproxy-tls%u", (unsigned)(w - w->eng->workers) % 100u);
    pthread_setname_np(pthread_self(), name); /* visible in top -H and /proc */
    wake_state ws = {0, 0};
    tl_wake = &ws;
    while (!stopping) {
        int timeout = run_timers(w);
        int h2 = h2_timeout_ms(w);
        if (h2 >= 0 && (timeout < 0 || h2 < timeout)) {
            timeout = h2;
        }
        if (ws.lazy > 0 && !ws.now) {
            double left = ws.lazy - now_s();
            if (left <= 0) {
                ws.now = 1;
            } else if (timeout < 0 || left * 1000 < timeout) {
                timeout = (int)(left * 1000) + 1;
            }
        }
        if (ws.now) { /* before sleeping: the caller hears of this batch now */
            ws.now = 0;
            ws.lazy = 0;
            wake(w->eng->ev_fd);
        }
        int n = epoll_wait(w->epfd, evs, EPOLL_BATCH, w->ready ? 0 : timeout);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break; /* EBADF/EINVAL: a bug; stop rather than spin */
        }
        for (int i = 0; i < n; i++) {
            endpoint_t *ep = evs[i].data.ptr;
            if (ep == NULL) {
                run_commands(w, take_commands(w, &stopping));
            } else if (ep->conn == NULL) {
                accept_ready(w, (lslot_t *)ep);
            } else if (ep->conn->state != ST_DEAD) {
                if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
                    if (ep->app) {
                        ep->conn->app_drained = 0;
                    } else {
                        ep->conn->tcp_drained = 0;
                    }
                }
                on_io(ep->conn);
            }
        }
        run_ready(w);
        h2_post_due(w);
        reap(w);
    }
    worker_stop(w);
    tl_wake = NULL;
    wake(w->eng->ev_fd); /* whatever worker_stop posted */
    return NULL;
}

/* -- the engine (called from the Python thread) --------------------------------------------- */
static int
submit_to(worker_t *w, cmd_t *cmd)
{
    pthread_mutex_lock(&w->mu);
    if (w->stopping) {
        pthread_mutex_unlock(&w->mu);
        return -1;
    }
    int was_empty = w->cmd_head == NULL;
    cmd->next = NULL;
    if (w->cmd_tail) {
        w->cmd_tail->next = cmd;
    } else {
        w->cmd_head = cmd;
    }
    w->cmd_tail = cmd;
    pthread_mutex_unlock(&w->mu);
    if (was_empty) {
        wake(w->cmd_fd);
    }
    return 0;
}

static int
submit(mp_engine *e, cmd_t *cmd)
{
    return submit_to(&e->workers[cmd->conn_id % (uint64_t)e->nworkers], cmd);
}

static int
worker_init(mp_engine *e, worker_t *w)
{
    w->eng = e;
    w->bufsize = e->cfg.buffer_size;
    w->coalesce = e->cfg.coalesce_writes;
    w->table_cap = 64;
    w->table = calloc(w->table_cap, sizeof *w->table);
    if (w->table == NULL || pthread_mutex_init(&w->mu, NULL) != 0) {
        return -1;
    }
    w->mu_ready = 1;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->epfd < 0 || w->cmd_fd < 0) {
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    return epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->cmd_fd, &ev);
}

mp_engine *
mp_engine_new(const mp_engine_config *cfg, char *err, size_t errlen)
{
    if (tio_method == NULL) {
        snprintf(err, errlen, "module not initialised");
        return NULL;
    }
    if (cfg->threads < 1 || cfg->threads > MAX_THREADS || cfg->buffer_size < 16384 ||
        cfg->buffer_size > (64u << 20) || cfg->read_buffer_size > (64u << 20)) {
        snprintf(err, errlen, "threads must be 1..%d, buffer_size 16 KiB..64 MiB", MAX_THREADS);
        return NULL;
    }
    mp_engine *e = calloc(1, sizeof *e);
    if (e == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->cfg = *cfg;
    e->nworkers = cfg->threads;
    atomic_init(&e->next_id, 1);
    e->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->workers = calloc((size_t)e->nworkers, sizeof *e->workers);
    for (int i = 0; e->workers != NULL && i < e->nworkers; i++) {
        e->workers[i].epfd = e->workers[i].cmd_fd = -1; /* not 0: that is stdin */
    }
    if (e->ev_fd < 0 || e->workers == NULL || pthread_mutex_init(&e->ev_mu, NULL) != 0) {
        errno_text(errno ? errno : ENOMEM, "engine", err, errlen);
        mp_engine_free(e);
        return NULL;
    }
    e->ev_mu_ready = 1;
    if (pthread_mutex_init(&e->ls_mu, NULL) != 0) {
        errno_text(errno ? errno : ENOMEM, "engine", err, errlen);
        mp_engine_free(e);
        return NULL;
    }
    e->ls_mu_ready = 1;
    for (int i = 0; i < e->nworkers; i++) {
        if (worker_init(e, &e->workers[i]) < 0) {
            errno_text(errno ? errno : ENOMEM, "engine", err, errlen);
            mp_engine_free(e);
            return NULL;
        }
    }
    /* Workers take no signals: they belong to Python's main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < e->nworkers; i++) {
        int rc = pthread_create(&e->workers[i].thread, NULL, worker_main, &e->workers[i]);
        if (rc != 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            errno_text(rc, "cannot start a worker thread", err, errlen);
            mp_engine_free(e);
            return NULL;
        }
        e->workers[i].started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return e;
}

int
mp_engine_fileno(const mp_engine *e)
{
    return e->ev_fd;
}

int
mp_engine_threads(const mp_engine *e)
{
    return e->nworkers;
}

int
mp_engine_handshake(mp_engine *e, int fd, SSL_CTX *ctx, int server_side, const char *sni,
                    uint64_t *conn_id, char *err, size_t errlen)
{
    if (sni != NULL && strlen(sni) >= CMD_TEXT) {
        snprintf(err, errlen, "server name too long");
        return -1;
    }
    cmd_t *cmd = calloc(1, sizeof *cmd);
    mp_event *final = calloc(1, sizeof *final);
    if (cmd == NULL || final == NULL) {
        free(cmd);
        free(final);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    uint64_t id = atomic_fetch_add(&e->next_id, 1);
    cmd->op = CMD_HANDSHAKE;
    cmd->conn_id = id;
    cmd->fd = fd;
    cmd->ctx = ctx;
    cmd->server_side = server_side;
    cmd->final = final;
    if (sni != NULL) {
        snprintf(cmd->text, sizeof cmd->text, "%s", sni);
    }
    SSL_CTX_up_ref(ctx); /* the session keeps its context across a rotation */
    if (submit(e, cmd) < 0) {
        SSL_CTX_free(ctx);
        free(final);
        free(cmd);
        snprintf(err, errlen, "engine is shut down");
        return -1;
    }
    *conn_id = id; /* cmd belongs to the worker now: do not touch it */
    return 0;
}

static int
submit_simple(mp_engine *e, int op, uint64_t conn_id, int fd, const char *text, char *err,
              size_t errlen)
{
    cmd_t *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    cmd->op = op;
    cmd->conn_id = conn_id;
    cmd->fd = fd;
    if (text != NULL) {
        snprintf(cmd->text, MP_REASON_MAX, "%s", text);
    }
    if (submit(e, cmd) < 0) {
        free(cmd);
        snprintf(err, errlen, "engine is shut down");
        return -1;
    }
    return 0;
}

int
mp_engine_relay(mp_engine *e, uint64_t conn_id, int app_fd, char *err, size_t errlen)
{
    return submit_simple(e, CMD_RELAY, conn_id, app_fd, NULL, err, errlen);
}

int
mp_engine_relay_h2(mp_engine *e, uint64_t conn_id, int app_fd, h2r_policy *policy, char *err,
                   size_t errlen)
{
    cmd_t *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        h2r_policy_free(policy);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    cmd->op = CMD_RELAY_H2;
    cmd->conn_id = conn_id;
    cmd->fd = app_fd;
    cmd->policy = policy;
    if (submit(e, cmd) < 0) {
        h2r_policy_free(policy);
        free(cmd);
        snprintf(err, errlen, "engine is shut down");
        return -1;
    }
    return 0;
}

int
mp_engine_drain_h2(mp_engine *e, uint64_t conn_id, char *err, size_t errlen)
{
    return submit_simple(e, CMD_DRAIN_H2, conn_id, -1, NULL, err, errlen);
}

int
mp_engine_close(mp_engine *e, uint64_t conn_id, const char *reason, char *err, size_t errlen)
{
    /* "" would read as a clean end (EOF both ways) in the final event */
    return submit_simple(e, CMD_CLOSE, conn_id, -1, reason && reason[0] ? reason : "closed", err,
                         errlen);
}

/* Fail closed: a listener for marbles only ever runs with a context that demands and
 * verifies client certificates, since C then trusts the chain for its identity check. */
static int
context_fits(const SSL_CTX *ctx, int anonymous, char *err, size_t errlen)
{
    int mode = SSL_CTX_get_verify_mode(ctx);
    if (!anonymous && !((mode & SSL_VERIFY_PEER) && (mode & SSL_VERIFY_FAIL_IF_NO_PEER_CERT))) {
        snprintf(err, errlen, "a listener for marbles needs a context that verifies client "
                              "certificates");
        return -1;
    }
    return 0;
}

static listener_t *
listener_new(const mp_listener_config *cfg, char *err, size_t errlen)
{
    listener_t *l = calloc(1, sizeof *l);
    if (l == NULL || pthread_mutex_init(&l->mu, NULL) != 0) {
        free(l);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&l->refs, 1);
    atomic_init(&l->slots, 0);
    l->fd = -1;
    l->anonymous = cfg->anonymous;
    l->timeout = cfg->handshake_timeout;
    int ok = 1;
    if (cfg->app_path != NULL) {
        ok = (l->app_path = strdup(cfg->app_path)) != NULL;
    }
    if (ok && cfg->trust_domain != NULL) {
        ok = (l->trust_domain = strdup(cfg->trust_domain)) != NULL;
    }
    if (ok && cfg->nallowed > 0) {
        ok = (l->allowed = calloc(cfg->nallowed, sizeof *l->allowed)) != NULL;
        for (size_t i = 0; ok && i < cfg->nallowed; i++) {
            ok = (l->allowed[i] = strdup(cfg->allowed[i])) != NULL;
            l->nallowed = i + 1;
        }
    }
    if (!ok) {
        listener_release(l);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    return l;
}

int
mp_engine_listen(mp_engine *e, const mp_listener_config *cfg, uint32_t *listener_id, char *err,
                 size_t errlen)
{
    struct sockaddr_un probe;
    if (cfg->app_path != NULL && strlen(cfg->app_path) >= sizeof probe.sun_path) {
        snprintf(err, errlen, "app socket path too long");
        return -1;
    }
    if (!cfg->anonymous && cfg->trust_domain == NULL) {
        snprintf(err, errlen, "a listener for marbles needs a trust domain");
        return -1;
    }
    if (context_fits(cfg->ctx, cfg->anonymous, err, errlen) < 0) {
        return -1;
    }
    if (!(cfg->handshake_timeout > 0 && cfg->handshake_timeout < 86400)) {
        snprintf(err, errlen, "handshake_timeout must be above 0 and below a day");
        return -1;
    }
    if (set_nonblocking(cfg->fd) < 0) {
        errno_text(errno, "listening socket", err, errlen);
        return -1;
    }
    listener_t *l = listener_new(cfg, err, errlen);
    if (l == NULL) {
        return -1;
    }
    SSL_CTX_up_ref(cfg->ctx);
    l->ctx = cfg->ctx;
    int one = 1;
    l->nodelay = setsockopt(cfg->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0;
    cmd_t *cmds[MAX_THREADS] = {0};
    for (int i = 0; i < e->nworkers; i++) {
        if ((cmds[i] = calloc(1, sizeof *cmds[i])) == NULL) {
            for (int j = 0; j < i; j++) {
                free(cmds[j]);
            }
            listener_release(l);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    pthread_mutex_lock(&e->ls_mu);
    if (e->stopped) {
        pthread_mutex_unlock(&e->ls_mu);
        for (int i = 0; i < e->nworkers; i++) {
            free(cmds[i]);
        }
        listener_release(l);
        snprintf(err, errlen, "engine is shut down");
        return -1;
    }
    l->id = ++e->next_listener;
    l->next = e->listeners;
    e->listeners = l;
    pthread_mutex_unlock(&e->ls_mu);
    l->fd = cfg->fd; /* ours from here on: the caller must not close it any more */
    atomic_store(&l->slots, e->nworkers + 1); /* + 1: ours until every command is out */
    for (int i = 0; i < e->nworkers; i++) {
        cmds[i]->op = CMD_LISTEN;
        atomic_fetch_add(&l->refs, 1);
        cmds[i]->l = l;
        cmds[i]->fd = -1;
        if (submit_to(&e->workers[i], cmds[i]) < 0) {
            dispose(&e->workers[i], cmds[i]); /* drops its slot and reference */
        }
    }
    listener_drop_slot(l);
    *listener_id = l->id;
    return 0;
}

/* The listener with this id (a new reference), or NULL. */
static listener_t *
listener_find(mp_engine *e, uint32_t id, int unlink)
{
    pthread_mutex_lock(&e->ls_mu);
    listener_t *found = NULL;
    for (listener_t **p = &e->listeners; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            found = *p;
            if (unlink) {
                *p = found->next; /* the list's reference passes to the caller */
            } else {
                atomic_fetch_add(&found->refs, 1);
            }
            break;
        }
    }
    pthread_mutex_unlock(&e->ls_mu);
    return found;
}

int
mp_engine_listener_context(mp_engine *e, uint32_t listener_id, SSL_CTX *ctx, char *err,
                           size_t errlen)
{
    listener_t *l = listener_find(e, listener_id, 0);
    if (l == NULL) {
        snprintf(err, errlen, "no such listener");
        return -1;
    }
    if (context_fits(ctx, l->anonymous, err, errlen) < 0) {
        listener_release(l);
        return -1;
    }
    SSL_CTX_up_ref(ctx);
    pthread_mutex_lock(&l->mu);
    SSL_CTX *old = l->ctx;
    l->ctx = ctx;
    pthread_mutex_unlock(&l->mu);
    SSL_CTX_free(old);
    listener_release(l);
    return 0;
}

int
mp_engine_unlisten(mp_engine *e, uint32_t listener_id, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    listener_t *l = listener_find(e, listener_id, 1);
    if (l == NULL) {
        return 0; /* already stopped */
    }
    for (int i = 0; i < e->nworkers; i++) {
        cmd_t *cmd = calloc(1, sizeof *cmd);
        if (cmd == NULL) {
            continue; /* the worker keeps polling until the engine stops: no leak, no race */
        }
        cmd->op = CMD_UNLISTEN;
        cmd->fd = -1;
        atomic_fetch_add(&l->refs, 1);
        cmd->l = l;
        if (submit_to(&e->workers[i], cmd) < 0) {
            dispose(&e->workers[i], cmd);
        }
    }
    listener_release(l); /* the list's */
    return 0;
}

mp_event *
mp_engine_take_events(mp_engine *e)
{
    drain_eventfd(e->ev_fd); /* before taking: a later post writes it again */
    pthread_mutex_lock(&e->ev_mu);
    mp_event *list = e->ev_head;
    e->ev_head = e->ev_tail = NULL;
    pthread_mutex_unlock(&e->ev_mu);
    return list;
}

void
mp_engine_stats(const mp_engine *e, mp_stats *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        out->active += GET(w->active);
        out->handshakes += GET(w->handshakes);
        out->handshake_failures += GET(w->failures);
        out->closed += GET(w->closed);
        out->bytes_tls_to_app += GET(w->t2a);
        out->bytes_app_to_tls += GET(w->a2t);
        out->buffer_bytes += GET(w->buffer_bytes);
        out->accepted += GET(w->accepted);
        out->fast_path += GET(w->fast_path);
    }
}

void
mp_engine_stop(mp_engine *e)
{
    if (e->stopped || e->workers == NULL) {
        return;
    }
    if (e->ls_mu_ready) {
        pthread_mutex_lock(&e->ls_mu); /* no listener may start once this is set */
        e->stopped = 1;
        pthread_mutex_unlock(&e->ls_mu);
    }
    e->stopped = 1;
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        if (!w->mu_ready) {
            continue;
        }
        pthread_mutex_lock(&w->mu);
        w->stopping = 1;
        pthread_mutex_unlock(&w->mu);
        if (w->cmd_fd >= 0) {
            wake(w->cmd_fd);
        }
    }
    for (int i = 0; i < e->nworkers; i++) {
        if (e->workers[i].started) {
            pthread_join(e->workers[i].thread, NULL);
            e->workers[i].started = 0;
        }
    }
}

void
mp_engine_free(mp_engine *e)
{
    if (e == NULL) {
        return;
    }
    mp_engine_stop(e);
    for (int i = 0; e->workers != NULL && i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        if (w->mu_ready) { /* a worker that never ran: nothing is queued or open */
            pthread_mutex_destroy(&w->mu);
        }
        while (w->pooled > 0) {
            free(w->pool[--w->pooled]);
        }
        free(w->table);
        close_fd(&w->epfd);
        close_fd(&w->cmd_fd);
    }
    free(e->workers);
    while (e->listeners) { /* every slot is gone with the workers: this frees them */
        listener_t *l = e->listeners;
        e->listeners = l->next;
        listener_release(l);
    }
    if (e->ls_mu_ready) {
        pthread_mutex_destroy(&e->ls_mu);
    }
    if (e->ev_mu_ready) {
        pthread_mutex_destroy(&e->ev_mu);
    }
    for (mp_event *ev = e->ev_head, *next; ev; ev = next) {
        next = ev->next;
        mp_event_free(ev);
    }
    close_fd(&e->ev_fd);
    free(e);
}
