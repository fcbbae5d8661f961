/*
 * bulkc: bulk throughput through a TLS-terminating proxy, one direction per run.
 *
 *   bulkc ADDR up|down TOTAL_BYTES NCONN DEADLINE_S [CERT KEY CA]
 *
 * Opens NCONN connections (TLS 1.3 with a client certificate when CERT is given, else
 * plaintext), completes every handshake, then starts the clock for all at once. Each
 * connection moves TOTAL_BYTES/NCONN through the backend (sink.c):
 *   up:   sends 'U'+len, then len bytes in 256 KiB writes; the clock stops for it when the
 *         backend's 1-byte ack arrives, i.e. after the last byte reached the backend;
 *   down: sends 'D'+len; the backend writes len bytes; the clock stops at the last byte.
 * Prints one JSON line: bytes, seconds (first start to last finish), MB/s (10^6 bytes),
 * the negotiated cipher. Exit 0 only if every connection moved all its bytes.
 */
#define _GNU_SOURCE
#include "common.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>

typedef struct {
    pthread_t thread;
    int index;
    double finished;
    int ok;
    char cipher[64];
} conn_t;

static addr_t g_addr;
static SSL_CTX *g_ctx;
static int g_up;
static uint64_t g_per_conn;
static pthread_barrier_t g_ready;

static void *run_conn(void *arg)
{
    conn_t *c = arg;
    unsigned char *buf = malloc(BUF_SIZE);
    int fd = dial(&g_addr);
    SSL *ssl = NULL;
    int ok = fd >= 0 && buf != NULL;
    if (ok && g_ctx != NULL) {
        ssl = SSL_new(g_ctx);
        ssl_set_buffered_fd(ssl, fd);
        SSL_set_tlsext_host_name(ssl, "localhost");
        ok = SSL_connect(ssl) == 1;
        if (ok) {
            snprintf(c->cipher, sizeof c->cipher, "%s", SSL_get_cipher_name(ssl));
        } else {
            ERR_print_errors_fp(stderr);
        }
    }
    pthread_barrier_wait(&g_ready); /* every handshake done: the clock starts */
    if (ok) {
        unsigned char hdr[HDR_SIZE];
        put_header(hdr, g_up ? 'U' : 'D', g_per_conn);
        memset(buf, 'x', BUF_SIZE);
        ok = write_full(ssl, fd, hdr, HDR_SIZE) == 0;
        if (ok && g_up) {
            for (uint64_t left = g_per_conn; ok && left > 0;) {
                size_t n = left > BUF_SIZE ? BUF_SIZE : (size_t)left;
                ok = write_full(ssl, fd, buf, n) == 0;
                left -= n;
            }
            ok = ok && flush_out(ssl) == 0 && read_full(ssl, fd, buf, 1) == 0 && buf[0] == 'K';
        } else if (ok) {
            ok = flush_out(ssl) == 0;
            for (uint64_t left = g_per_conn; ok && left > 0;) {
                size_t n = left > BUF_SIZE ? BUF_SIZE : (size_t)left;
                int r = ssl != NULL ? SSL_read(ssl, buf, (int)n) : (int)read(fd, buf, n);
                ok = r > 0;
                left -= ok ? (uint64_t)r : 0;
            }
        }
    }
    c->finished = now_s();
    c->ok = ok;
    if (ssl != NULL) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    if (fd >= 0) {
        close(fd);
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6 && argc != 9) {
        die("usage: bulkc ADDR up|down TOTAL_BYTES NCONN DEADLINE_S [CERT KEY CA]");
    }
    if (parse_addr(argv[1], &g_addr) != 0) {
        die("bad address %s", argv[1]);
    }
    g_up = strcmp(argv[2], "up") == 0;
    if (!g_up && strcmp(argv[2], "down") != 0) {
        die("direction must be up or down");
    }
    uint64_t total = strtoull(argv[3], NULL, 10);
    int nconn = atoi(argv[4]);
    if (nconn < 1 || nconn > 256 || total < (uint64_t)nconn) {
        die("bad TOTAL_BYTES or NCONN");
    }
    bound_lifetime((unsigned)atoi(argv[5]));
    g_per_conn = total / (uint64_t)nconn;
    g_ctx = argc == 9 ? client_ctx(argv[6], argv[7], argv[8]) : NULL;

    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    pthread_barrier_init(&g_ready, NULL, (unsigned)nconn + 1);
    for (int i = 0; i < nconn; i++) {
        conns[i].index = i;
        pthread_create(&conns[i].thread, NULL, run_conn, &conns[i]);
    }
    pthread_barrier_wait(&g_ready);
    double start = now_s();
    double last = start;
    int failed = 0;
    for (int i = 0; i < nconn; i++) {
        pthread_join(conns[i].thread, NULL);
        failed += !conns[i].ok;
        last = conns[i].finished > last ? conns[i].finished : last;
    }
    double secs = last - start;
    uint64_t moved = g_per_conn * (uint64_t)nconn;
    printf("{\"direction\": \"%s\", \"conns\": %d, \"bytes\": %llu, \"seconds\": %.6f, "
           "\"mbps\": %.1f, \"failed\": %d, \"cipher\": \"%s\"}\n",
           argv[2], nconn, (unsigned long long)moved, secs,
           failed ? 0.0 : (double)moved / secs / 1e6, failed,
           g_ctx != NULL ? conns[0].cipher : "none");
    return failed ? 1 : 0;
}
