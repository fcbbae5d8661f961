/*
 * sink: the bulk backend (plaintext on a Unix socket behind the proxies), or with a
 * certificate the TLS-receive ceiling (TLS straight into this process, no proxy).
 *
 *   sink LISTEN LIFETIME_S [CERT KEY CA]      LISTEN = unix:PATH | 127.0.0.1:PORT
 *
 * One thread per connection. A connection is a sequence of requests, each a 16-byte
 * header (see common.h) followed by:
 *   'U' len: read len bytes (256 KiB reads), answer one byte 'K';
 *   'D' len: write len bytes (256 KiB writes);
 * until EOF. The process ends after LIFETIME_S at the latest (or when signalled).
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static SSL_CTX *g_ctx;
static unsigned char g_source[BUF_SIZE];

static void serve(int fd)
{
    SSL *ssl = NULL;
    unsigned char *buf = malloc(BUF_SIZE);
    if (buf == NULL) {
        return;
    }
    if (g_ctx != NULL) {
        ssl = SSL_new(g_ctx);
        ssl_set_buffered_fd(ssl, fd);
        if (SSL_accept(ssl) != 1) {
            SSL_free(ssl);
            free(buf);
            return;
        }
    }
    for (int requests = 0; requests < 1000000; requests++) {
        unsigned char hdr[HDR_SIZE];
        char op;
        uint64_t len;
        if (read_full(ssl, fd, hdr, HDR_SIZE) != 0) {
            break;
        }
        get_header(hdr, &op, &len);
        if (op == 'U') {
            int ok = 1;
            for (uint64_t left = len; ok && left > 0;) {
                size_t n = left > BUF_SIZE ? BUF_SIZE : (size_t)left;
                int r = ssl != NULL ? SSL_read(ssl, buf, (int)n) : (int)read(fd, buf, n);
                ok = r > 0 || (r < 0 && ssl == NULL && errno == EINTR);
                left -= r > 0 ? (uint64_t)r : 0;
            }
            if (!ok || write_full(ssl, fd, "K", 1) != 0 || flush_out(ssl) != 0) {
                break;
            }
        } else if (op == 'D') {
            int ok = 1;
            for (uint64_t left = len; ok && left > 0;) {
                size_t n = left > BUF_SIZE ? BUF_SIZE : (size_t)left;
                ok = write_full(ssl, fd, g_source, n) == 0;
                left -= n;
            }
            if (!ok || flush_out(ssl) != 0) {
                break;
            }
        } else {
            break;
        }
    }
    if (ssl != NULL) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    free(buf);
}

static void *conn_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    serve(fd);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 6) {
        die("usage: sink LISTEN LIFETIME_S [CERT KEY CA]");
    }
    addr_t addr;
    if (parse_addr(argv[1], &addr) != 0) {
        die("bad address %s", argv[1]);
    }
    bound_lifetime((unsigned)atoi(argv[2]));
    g_ctx = argc == 6 ? server_ctx(argv[3], argv[4], argv[5]) : NULL;
    memset(g_source, 'y', sizeof g_source);
    int lfd = listen_on(&addr, 1024);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    fprintf(stderr, "sink listening on %s\n", argv[1]);
    for (;;) { /* ends with the process: signal or LIFETIME_S */
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                usleep(10000); /* out of descriptors: let connections end */
                continue;
            }
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            die("accept: %s", strerror(errno));
        }
        pthread_t t;
        if (pthread_create(&t, &attr, conn_thread, (void *)(intptr_t)fd) != 0) {
            close(fd);
        }
    }
}
