/*
 * hsc: new mTLS connections per second, or many idle mTLS connections held open.
 *
 *   hsc rate ADDR SECONDS MAXCOUNT INFLIGHT CERT KEY CA
 *     One thread keeps INFLIGHT connections going at once over non-blocking sockets and
 *     epoll. Each connection: TCP connect, full TLS 1.3 handshake with a client
 *     certificate (X25519, ECDSA P-256 certificates; a new session every time and no
 *     session data ever set, so nothing can be resumed; a resumed session would count as a
 *     failure), "GET / HTTP/1.1" with Connection: close, read to EOF, check
 *     "HTTP/1.1 200", close_notify, close. Stops after SECONDS or MAXCOUNT connections.
 *     Prints one JSON line: conns, failures, seconds, conn/s, the session tickets the
 *     server sent per connection (counted, never used), the full chain verifications and
 *     the negotiated parameters.
 *
 *     The TLS client here is GnuTLS, not OpenSSL: this tool runs on the load CPU next to
 *     the backend, and the handshake rate must be bounded by the proxy, not by the load
 *     side. With OpenSSL 3.0 the client spent ~40 % of its CPU in ASN1_item_d2i_ex
 *     decoding the server's two certificates, 27 % alone in OSSL_DECODER_CTX_new_for_pkey
 *     (3.0 builds a decoder chain for every public key), and 8 blocking threads on one
 *     core added the scheduler's switches; GnuTLS over one epoll loop needs ~1/3 less
 *     CPU per connection (README "Where the time goes"). What the server does is the same
 *     as before and the same for every candidate: a full TLS 1.3 handshake that asks for,
 *     receives and verifies a client certificate and its CertificateVerify.
 *
 *     CA is a PEM file of trust anchors. The client verifies a server leaf's chain to CA
 *     once, in full, and then accepts the byte-identical leaf without verifying the chain
 *     again (a one-entry cache: a proxy presents the same leaf on every connection). TLS
 *     still checks every CertificateVerify against that leaf's key, so this is as sound
 *     for a load client, and it spares two ECDSA verifies per connection. The same for
 *     every candidate.
 *
 *   hsc hold ADDR COUNT SECONDS CERT KEY CA
 *     Opens COUNT connections (4 threads, OpenSSL, handshake complete, no request), prints
 *     one JSON line {"held": N, "failed": F}, then keeps them open until stdin reaches EOF
 *     or SECONDS pass, and closes them.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <openssl/x509.h>

static addr_t g_addr;
static double g_deadline;
static atomic_long g_ok, g_failed;

/* -- rate: GnuTLS, one thread, INFLIGHT connections over epoll --------------------------- */
/* TLS 1.3 only, X25519 only (one key share, as OpenSSL's default client sends), the
 * ciphersuites in OpenSSL's default order; the server picks the signature algorithm. */
static const char PRIORITY[] = "NONE:+VERS-TLS1.3:+AES-256-GCM:+CHACHA20-POLY1305:+AES-128-GCM:"
                               "+AEAD:+GROUP-X25519:+SIGN-ALL:+CTYPE-X509:+COMP-NULL";
static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
enum { MAX_INFLIGHT = 256, RESPONSE_MAX = 4096 };

typedef enum { FREE, HANDSHAKE, SEND, RECV } phase_t;

typedef struct {
    phase_t phase;
    int fd;
    uint32_t events; /* what epoll waits for on fd */
    gnutls_session_t tls;
    size_t got;
    char buf[RESPONSE_MAX];
} conn_t;

typedef struct {
    int ep;
    gnutls_certificate_credentials_t cred;
    gnutls_priority_t prio;
    long started, max, tickets, full_verifies;
    char params[128]; /* the negotiated version, group, ciphersuite of the first connection */
    unsigned char *leaf; /* DER of the last server leaf whose chain verified in full */
    unsigned leaf_len;
    conn_t conns[MAX_INFLIGHT];
} rate_t;

static rate_t g_rate;

/* A full verification for a leaf not seen yet, else a byte comparison (see the header). */
static int verify_cached(gnutls_session_t tls)
{
    rate_t *r = &g_rate;
    unsigned n = 0;
    const gnutls_datum_t *chain = gnutls_certificate_get_peers(tls, &n);
    if (chain == NULL || n == 0) {
        return -1;
    }
    if (r->leaf != NULL && r->leaf_len == chain[0].size &&
        memcmp(r->leaf, chain[0].data, r->leaf_len) == 0) {
        return 0;
    }
    r->full_verifies++;
    unsigned status = 0;
    if (gnutls_certificate_verify_peers2(tls, &status) != 0 || status != 0) {
        return -1;
    }
    unsigned char *copy = malloc(chain[0].size);
    if (copy == NULL) {
        return -1;
    }
    memcpy(copy, chain[0].data, chain[0].size);
    free(r->leaf);
    r->leaf = copy;
    r->leaf_len = chain[0].size;
    return 0;
}

static int count_ticket(gnutls_session_t tls, unsigned htype, unsigned when, unsigned incoming,
                        const gnutls_datum_t *msg)
{
    (void)tls, (void)htype, (void)when, (void)msg;
    if (incoming) {
        g_rate.tickets++; /* counted, never kept: nothing is ever resumed */
    }
    return 0;
}

static void want(rate_t *r, conn_t *c, uint32_t events)
{
    if (c->events != events) {
        struct epoll_event ev = {.events = events, .data.ptr = c};
        if (epoll_ctl(r->ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
            die("epoll_ctl: %s", strerror(errno));
        }
        c->events = events;
    }
}

static void finish(conn_t *c, int ok)
{
    if (c->phase == RECV) {
        gnutls_bye(c->tls, GNUTLS_SHUT_WR); /* one try: the close_notify fits the socket */
    }
    gnutls_deinit(c->tls);
    close(c->fd); /* also leaves the epoll set */
    c->phase = FREE;
    atomic_fetch_add(ok ? &g_ok : &g_failed, 1);
}

/* Starts a connection in a free slot; 0 when the run is over (deadline or MAXCOUNT). */
static int start(rate_t *r, conn_t *c)
{
    do {
        if (r->started >= r->max || now_s() >= g_deadline) {
            return 0;
        }
        r->started++;
        c->fd = dial_nonblocking(&g_addr);
    } while (c->fd < 0 && atomic_fetch_add(&g_failed, 1) >= 0);
    if (gnutls_init(&c->tls, GNUTLS_CLIENT | GNUTLS_NONBLOCK) != GNUTLS_E_SUCCESS ||
        gnutls_priority_set(c->tls, r->prio) != GNUTLS_E_SUCCESS ||
        gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, r->cred) != GNUTLS_E_SUCCESS ||
        gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, "localhost", 9) != GNUTLS_E_SUCCESS) {
        die("gnutls session setup failed");
    }
    gnutls_handshake_set_hook_function(c->tls, GNUTLS_HANDSHAKE_NEW_SESSION_TICKET,
                                       GNUTLS_HOOK_POST, count_ticket);
    gnutls_transport_set_int(c->tls, c->fd);
    c->phase = HANDSHAKE;
    c->got = 0;
    c->events = EPOLLOUT; /* the connect completes: then the ClientHello goes out */
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    if (epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        die("epoll_ctl: %s", strerror(errno));
    }
    return 1;
}

/* Advances one connection as far as its socket allows. */
static void step(rate_t *r, conn_t *c)
{
    for (;;) {
        int rc;
        switch (c->phase) {
        case HANDSHAKE:
            rc = gnutls_handshake(c->tls);
            if (rc == GNUTLS_E_SUCCESS) {
                if (gnutls_session_is_resumed(c->tls)) {
                    finish(c, 0); /* cannot happen (no session data); never counted */
                    return;
                }
                if (r->params[0] == '\0') {
                    char *desc = gnutls_session_get_desc(c->tls);
                    snprintf(r->params, sizeof r->params, "%s", desc != NULL ? desc : "?");
                    gnutls_free(desc);
                }
                c->phase = SEND;
                continue;
            }
            break;
        case SEND:
            rc = (int)gnutls_record_send(c->tls, REQUEST, sizeof REQUEST - 1);
            if (rc == (int)sizeof REQUEST - 1) {
                c->phase = RECV;
                continue;
            }
            if (rc >= 0) {
                finish(c, 0); /* a 54-byte request is never split */
                return;
            }
            break;
        case RECV:
            rc = (int)gnutls_record_recv(c->tls, c->buf + c->got, sizeof c->buf - c->got);
            if (rc > 0 && (c->got += (size_t)rc) < sizeof c->buf) {
                continue;
            }
            if (rc >= 0 || (rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED)) {
                /* close_notify, EOF (also without close_notify) or a full buffer: done */
                finish(c, c->got >= 12 && memcmp(c->buf, "HTTP/1.1 200", 12) == 0);
                return;
            }
            break;
        case FREE:
            return;
        }
        if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
            want(r, c, gnutls_record_get_direction(c->tls) ? EPOLLOUT : EPOLLIN);
            return;
        }
        finish(c, 0); /* a fatal TLS or socket error */
        return;
    }
}

static int run_rate(int argc, char **argv)
{
    if (argc != 9) {
        die("usage: hsc rate ADDR SECONDS MAXCOUNT INFLIGHT CERT KEY CA");
    }
    rate_t *r = &g_rate;
    double seconds = atof(argv[3]);
    r->max = atol(argv[4]);
    int inflight = atoi(argv[5]);
    if (seconds <= 0 || r->max < 1 || inflight < 1 || inflight > MAX_INFLIGHT) {
        die("bad SECONDS, MAXCOUNT or INFLIGHT (1..%d)", MAX_INFLIGHT);
    }
    bound_lifetime((unsigned)seconds + 30);
    const char *where = NULL;
    if (gnutls_global_init() != GNUTLS_E_SUCCESS ||
        gnutls_certificate_allocate_credentials(&r->cred) != GNUTLS_E_SUCCESS ||
        gnutls_priority_init(&r->prio, PRIORITY, &where) != GNUTLS_E_SUCCESS) {
        die("gnutls setup failed (priority at %s)", where != NULL ? where : "-");
    }
    if (gnutls_certificate_set_x509_key_file(r->cred, argv[6], argv[7], GNUTLS_X509_FMT_PEM) < 0) {
        die("cannot load the client certificate %s and key %s", argv[6], argv[7]);
    }
    if (gnutls_certificate_set_x509_trust_file(r->cred, argv[8], GNUTLS_X509_FMT_PEM) <= 0) {
        die("no trust anchor in %s", argv[8]);
    }
    gnutls_certificate_set_verify_function(r->cred, verify_cached);
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    if (r->ep < 0) {
        die("epoll_create1: %s", strerror(errno));
    }
    double t0 = now_s();
    g_deadline = t0 + seconds;
    int active = 0;
    for (int i = 0; i < inflight; i++) {
        active += start(r, &r->conns[i]);
    }
    struct epoll_event evs[MAX_INFLIGHT];
    while (active > 0) {
        int n = epoll_wait(r->ep, evs, MAX_INFLIGHT, 1000);
        if (n < 0 && errno != EINTR) {
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            step(r, c);
            if (c->phase == FREE && !start(r, c)) {
                active--;
            }
        }
    }
    double secs = now_s() - t0;
    long ok = atomic_load(&g_ok);
    printf("{\"conns\": %ld, \"failures\": %ld, \"seconds\": %.3f, \"conn_per_s\": %.1f, "
           "\"tickets_per_conn\": %.2f, \"full_verifies\": %ld, \"tls\": \"%s\"}\n",
           ok, atomic_load(&g_failed), secs, (double)ok / secs,
           ok ? (double)r->tickets / (double)ok : 0.0, r->full_verifies, r->params);
    return 0;
}

/* -- hold: OpenSSL, 4 blocking threads --------------------------------------------------- */
static SSL_CTX *g_ctx;

static SSL *handshake(int *fd_out)
{
    int fd = dial(&g_addr);
    if (fd < 0) {
        return NULL;
    }
    SSL *ssl = SSL_new(g_ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    if (SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    *fd_out = fd;
    return ssl;
}

typedef struct {
    SSL **ssl;
    int *fd;
    long first, count;
} hold_t;

static void *hold_thread(void *arg)
{
    hold_t *h = arg;
    for (long i = h->first; i < h->first + h->count && now_s() < g_deadline; i++) {
        h->ssl[i] = handshake(&h->fd[i]);
        atomic_fetch_add(h->ssl[i] != NULL ? &g_ok : &g_failed, 1);
    }
    return NULL;
}

static int run_hold(int argc, char **argv)
{
    if (argc != 8) {
        die("usage: hsc hold ADDR COUNT SECONDS CERT KEY CA");
    }
    long count = atol(argv[3]);
    double seconds = atof(argv[4]);
    if (count < 1 || count > 100000 || seconds <= 0) {
        die("bad COUNT or SECONDS");
    }
    bound_lifetime((unsigned)seconds + 30);
    g_ctx = client_ctx(argv[5], argv[6], argv[7]);
    g_deadline = now_s() + seconds;
    SSL **ssl = calloc((size_t)count, sizeof *ssl);
    int *fd = calloc((size_t)count, sizeof *fd);
    enum { THREADS = 4 };
    hold_t h[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        long per = count / THREADS;
        h[i] = (hold_t){ssl, fd, i * per, i == THREADS - 1 ? count - i * per : per};
        pthread_create(&t[i], NULL, hold_thread, &h[i]);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
    }
    printf("{\"held\": %ld, \"failed\": %ld}\n", atomic_load(&g_ok), atomic_load(&g_failed));
    fflush(stdout);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    while (now_s() < g_deadline) { /* until stdin EOF (or any input) or the deadline */
        int left_ms = (int)((g_deadline - now_s()) * 1000) + 1;
        if (poll(&p, 1, left_ms) != 0) {
            break;
        }
    }
    for (long i = 0; i < count; i++) {
        if (ssl[i] != NULL) {
            SSL_free(ssl[i]);
            close(fd[i]);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3 || parse_addr(argv[2], &g_addr) != 0) {
        die("usage: hsc rate|hold ADDR ...");
    }
    if (strcmp(argv[1], "rate") == 0) {
        return run_rate(argc, argv);
    }
    if (strcmp(argv[1], "hold") == 0) {
        return run_hold(argc, argv);
    }
    die("usage: hsc rate|hold ADDR ...");
}
