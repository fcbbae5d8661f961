/*
 * Shared helpers of the bench's C tools (bulkc, hsc, sink): addresses, sockets, TLS
 * contexts, time, and fatal errors. Every tool is bounded: alarm() ends it after a
 * deadline given on its command line, so a stuck peer can never hang the bench.
 *
 * TLS everywhere is TLS 1.3 only with OpenSSL's default groups (X25519 first) and
 * ciphersuites; certificates are the coordinator-issued ECDSA P-256 ones.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#define BUF_SIZE (256 * 1024)
#define HDR_SIZE 16 /* op byte, 7 zero bytes, big-endian 64-bit length */

typedef struct {
    int is_unix;
    char path[108];
    char host[64];
    int port;
} addr_t;

void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void ssl_die(const char *what) __attribute__((noreturn));
void bound_lifetime(unsigned seconds);
double now_s(void);

int parse_addr(const char *text, addr_t *out);
int dial(const addr_t *a);             /* -1 on failure, errno set */
/* The same with O_NONBLOCK; the connect may still be in progress (EPOLLOUT: done). */
int dial_nonblocking(const addr_t *a);
int listen_on(const addr_t *a, int backlog);

/* A client context: presents cert (leaf + chain) and key, verifies the server to ca. */
SSL_CTX *client_ctx(const char *cert, const char *key, const char *ca);
/* A server context; ca == NULL: no client certificate asked for. */
SSL_CTX *server_ctx(const char *cert, const char *key, const char *ca);

/* Write a 256 KiB-buffered BIO over fd as ssl's write side, so one write() carries many
 * records (as the C proxies do with their own buffers). */
void ssl_set_buffered_fd(SSL *ssl, int fd);

int read_full(SSL *ssl, int fd, void *buf, size_t n);      /* 0 ok, -1 error/EOF */
int write_full(SSL *ssl, int fd, const void *buf, size_t n); /* 0 ok, -1 error */
int flush_out(SSL *ssl);

void put_header(unsigned char hdr[HDR_SIZE], char op, uint64_t len);
void get_header(const unsigned char hdr[HDR_SIZE], char *op, uint64_t *len);

#endif
