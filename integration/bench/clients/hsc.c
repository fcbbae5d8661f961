/*
 * hsc: new mTLS connections per second, or many idle mTLS connections held open.
 *
 *   hsc rate ADDR SECONDS MAXCOUNT THREADS CERT KEY CA
 *     CA is a PEM file of trust anchors. The client verifies a server leaf's chain to CA
 *     once, in full, and then accepts the byte-identical leaf without building the chain
 *     again (a one-entry cache: a proxy presents the same leaf on every connection). TLS
 *     still checks every CertificateVerify against that leaf's key, so this is as sound
 *     for a load client, and it spares two ECDSA verifies and the X509 chain building per
 *     connection: the client is then not the bottleneck. The same for every candidate.
 *     THREADS loops, each: TCP connect, full TLS 1.3 handshake with a client certificate
 *     (no session reuse: every SSL is new and no session is kept), "GET / HTTP/1.1" with
 *     Connection: close, read to EOF, check "HTTP/1.1 200", close. Stops after SECONDS or
 *     MAXCOUNT connections. Prints one JSON line: conns, failures, seconds, conn/s and
 *     the session tickets the server sent per connection (counted, never used).
 *
 *   hsc hold ADDR COUNT SECONDS CERT KEY CA
 *     Opens COUNT connections (4 threads, handshake complete, no request), prints one JSON
 *     line {"held": N, "failed": F}, then keeps them open until stdin reaches EOF or
 *     SECONDS pass, and closes them.
 */
#define _GNU_SOURCE
#include "common.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/x509.h>

static addr_t g_addr;
static SSL_CTX *g_ctx;
static double g_deadline;
static long g_max;
static atomic_long g_started, g_ok, g_failed, g_tickets;

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

static int count_ticket(SSL *ssl, SSL_SESSION *sess)
{
    (void)ssl;
    (void)sess;
    atomic_fetch_add(&g_tickets, 1);
    return 0; /* not kept: nothing is ever resumed */
}

static pthread_mutex_t g_verified_mu = PTHREAD_MUTEX_INITIALIZER;
static X509 *g_verified; /* the last leaf whose chain verified in full */
static atomic_long g_full_verifies;

/* Replaces X509_verify_cert: a full verification for a leaf not seen yet, else a match. */
static int verify_cached(X509_STORE_CTX *sctx, void *arg)
{
    (void)arg;
    X509 *leaf = X509_STORE_CTX_get0_cert(sctx);
    pthread_mutex_lock(&g_verified_mu);
    int known = leaf != NULL && g_verified != NULL && X509_cmp(leaf, g_verified) == 0;
    pthread_mutex_unlock(&g_verified_mu);
    if (known) {
        X509_STORE_CTX_set_error(sctx, X509_V_OK);
        return 1;
    }
    atomic_fetch_add(&g_full_verifies, 1);
    int ok = X509_verify_cert(sctx);
    if (ok == 1 && leaf != NULL) {
        X509_up_ref(leaf);
        pthread_mutex_lock(&g_verified_mu);
        X509 *old = g_verified;
        g_verified = leaf;
        pthread_mutex_unlock(&g_verified_mu);
        X509_free(old);
    }
    return ok;
}

static SSL_CTX *make_ctx(const char *cert, const char *key, const char *ca)
{
    SSL_CTX *ctx = client_ctx(cert, key, ca);
    SSL_CTX_set_cert_verify_callback(ctx, verify_cached, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, count_ticket);
    return ctx;
}

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

static int one_connection(void)
{
    int fd;
    SSL *ssl = handshake(&fd);
    if (ssl == NULL) {
        return 0;
    }
    char buf[4096];
    size_t got = 0;
    int ok = SSL_write(ssl, REQUEST, (int)sizeof REQUEST - 1) == (int)sizeof REQUEST - 1;
    for (int reads = 0; ok && reads < 64; reads++) { /* 100-byte body: a few reads */
        int r = SSL_read(ssl, buf + got, (int)(sizeof buf - 1 - got));
        if (r <= 0) {
            break; /* close_notify or EOF: the response is complete */
        }
        got += (size_t)r;
        if (got == sizeof buf - 1) {
            break;
        }
    }
    ok = ok && got >= 12 && memcmp(buf, "HTTP/1.1 200", 12) == 0;
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    return ok;
}

static void *rate_thread(void *arg)
{
    (void)arg;
    while (now_s() < g_deadline && atomic_fetch_add(&g_started, 1) < g_max) {
        atomic_fetch_add(one_connection() ? &g_ok : &g_failed, 1);
    }
    return NULL;
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

static int run_rate(int argc, char **argv)
{
    if (argc != 9) {
        die("usage: hsc rate ADDR SECONDS MAXCOUNT THREADS CERT KEY CA");
    }
    double seconds = atof(argv[3]);
    g_max = atol(argv[4]);
    int threads = atoi(argv[5]);
    if (seconds <= 0 || g_max < 1 || threads < 1 || threads > 64) {
        die("bad SECONDS, MAXCOUNT or THREADS");
    }
    bound_lifetime((unsigned)seconds + 30);
    g_ctx = make_ctx(argv[6], argv[7], argv[8]);
    pthread_t t[64];
    double start = now_s();
    g_deadline = start + seconds;
    for (int i = 0; i < threads; i++) {
        pthread_create(&t[i], NULL, rate_thread, NULL);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
    }
    double secs = now_s() - start;
    long ok = atomic_load(&g_ok);
    printf("{\"conns\": %ld, \"failures\": %ld, \"seconds\": %.3f, \"conn_per_s\": %.1f, "
           "\"tickets_per_conn\": %.2f, \"full_verifies\": %ld}\n",
           ok, atomic_load(&g_failed), secs, (double)ok / secs,
           ok ? (double)atomic_load(&g_tickets) / (double)ok : 0.0, atomic_load(&g_full_verifies));
    return 0;
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
    g_ctx = make_ctx(argv[5], argv[6], argv[7]);
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
