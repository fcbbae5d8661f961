/* Shared helpers of the bench's C tools; see common.h. */
#define _GNU_SOURCE
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>

void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

void ssl_die(const char *what)
{
    fprintf(stderr, "%s: ", what);
    ERR_print_errors_fp(stderr);
    fputc('\n', stderr);
    exit(2);
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "deadline reached: giving up\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(3);
}

void bound_lifetime(unsigned seconds)
{
    signal(SIGALRM, on_alarm);
    signal(SIGPIPE, SIG_IGN);
    alarm(seconds);
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int parse_addr(const char *text, addr_t *out)
{
    memset(out, 0, sizeof *out);
    if (strncmp(text, "unix:", 5) == 0) {
        if (strlen(text + 5) >= sizeof out->path) {
            return -1;
        }
        out->is_unix = 1;
        strcpy(out->path, text + 5);
        return 0;
    }
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof out->host) {
        return -1;
    }
    memcpy(out->host, text, (size_t)(colon - text));
    out->port = atoi(colon + 1);
    return out->port > 0 && out->port < 65536 ? 0 : -1;
}

static socklen_t sockaddr_of(const addr_t *a, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (a->is_unix) {
        struct sockaddr_un *un = (struct sockaddr_un *)ss;
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, a->path);
        return sizeof *un;
    }
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)a->port);
    if (inet_pton(AF_INET, a->host, &in->sin_addr) != 1) {
        die("not an IPv4 address: %s", a->host);
    }
    return sizeof *in;
}

static int dial_flags(const addr_t *a, int flags)
{
    struct sockaddr_storage ss;
    socklen_t len = sockaddr_of(a, &ss);
    int fd = socket(a->is_unix ? AF_UNIX : AF_INET, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
    if (fd < 0) {
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&ss, len) != 0 && !(flags && errno == EINPROGRESS)) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    if (!a->is_unix) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

int dial(const addr_t *a)
{
    return dial_flags(a, 0);
}

int dial_nonblocking(const addr_t *a)
{
    return dial_flags(a, SOCK_NONBLOCK);
}

int listen_on(const addr_t *a, int backlog)
{
    struct sockaddr_storage ss;
    socklen_t len = sockaddr_of(a, &ss);
    int fd = socket(a->is_unix ? AF_UNIX : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        die("socket: %s", strerror(errno));
    }
    if (a->is_unix) {
        unlink(a->path); /* a stale socket of an earlier run */
    } else {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    }
    if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, backlog) != 0) {
        die("cannot listen on %s: %s", a->is_unix ? a->path : a->host, strerror(errno));
    }
    return fd;
}

static void tls13_only(SSL_CTX *ctx)
{
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1) {
        ssl_die("min proto");
    }
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, BUF_SIZE);
}

SSL_CTX *client_ctx(const char *cert, const char *key, const char *ca)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        ssl_die("SSL_CTX_new");
    }
    tls13_only(ctx);
    if (cert != NULL && (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
                         SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)) {
        ssl_die("client certificate");
    }
    if (ca != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            ssl_die("client CA");
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
    return ctx;
}

SSL_CTX *server_ctx(const char *cert, const char *key, const char *ca)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        ssl_die("SSL_CTX_new");
    }
    tls13_only(ctx);
    SSL_CTX_set_num_tickets(ctx, 0);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        ssl_die("server certificate");
    }
    if (ca != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            ssl_die("server CA");
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    return ctx;
}

void ssl_set_buffered_fd(SSL *ssl, int fd)
{
    BIO *rbio = BIO_new_socket(fd, BIO_NOCLOSE);
    BIO *sock = BIO_new_socket(fd, BIO_NOCLOSE);
    BIO *buf = BIO_new(BIO_f_buffer());
    if (rbio == NULL || sock == NULL || buf == NULL || BIO_set_write_buffer_size(buf, BUF_SIZE) != 1) {
        ssl_die("BIO");
    }
    SSL_set_bio(ssl, rbio, BIO_push(buf, sock));
}

int read_full(SSL *ssl, int fd, void *buf, size_t n)
{
    unsigned char *p = buf;
    while (n > 0) {
        int chunk = n > BUF_SIZE ? BUF_SIZE : (int)n;
        int r = ssl != NULL ? SSL_read(ssl, p, chunk) : (int)read(fd, p, (size_t)chunk);
        if (r <= 0) {
            if (ssl == NULL && r < 0 && errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

int write_full(SSL *ssl, int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n > 0) {
        int chunk = n > BUF_SIZE ? BUF_SIZE : (int)n;
        int r = ssl != NULL ? SSL_write(ssl, p, chunk) : (int)write(fd, p, (size_t)chunk);
        if (r <= 0) {
            if (ssl == NULL && r < 0 && errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

int flush_out(SSL *ssl)
{
    return ssl == NULL || BIO_flush(SSL_get_wbio(ssl)) == 1 ? 0 : -1;
}

void put_header(unsigned char hdr[HDR_SIZE], char op, uint64_t len)
{
    memset(hdr, 0, HDR_SIZE);
    hdr[0] = (unsigned char)op;
    for (int i = 0; i < 8; i++) {
        hdr[8 + i] = (unsigned char)(len >> (56 - 8 * i));
    }
}

void get_header(const unsigned char hdr[HDR_SIZE], char *op, uint64_t *len)
{
    *op = (char)hdr[0];
    *len = 0;
    for (int i = 0; i < 8; i++) {
        *len = (*len << 8) | hdr[8 + i];
    }
}
