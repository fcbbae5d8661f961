/*
 * httpd: the HTTP/1.1 backend of the bench (requests, handshakes, memory): every request
 * gets the same 200 response with a 100-byte body. It exists because the load core
 * (CPU 0) bounds the request rate, and nginx, the backend before, spent ~1.5 us more CPU
 * per request (its user-space work; README "Backends"); every candidate talks to the
 * same one.
 *
 *   httpd LIFETIME_S LISTEN [LISTEN...]      LISTEN = unix:PATH | 127.0.0.1:PORT
 *
 * One thread, epoll (level-triggered), non-blocking sockets. Per readiness event one
 * read(); every complete request head in the buffer is answered (pipelined requests in
 * order, each with Content-Length: 100), all answers of one read go out in one write().
 * A read that filled less than the buffer is not repeated: epoll reports the socket again
 * if more came. Request bodies with Content-Length are read and discarded; a request
 * this server cannot frame (Transfer-Encoding, a bad Content-Length, a head over 16 KiB,
 * not HTTP/1.x) gets 400 and the connection is closed. "Connection: close" and HTTP/1.0
 * without "Connection: keep-alive" close after the answer; EOF closes. When the peer
 * does not take the answers (a full socket), reading stops until they are written.
 * The process ends after LIFETIME_S at the latest (or when signalled).
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_SIZE (16 * 1024) /* the longest request head accepted */
#define OUT_SIZE (64 * 1024) /* answers gathered before one write() */
#define MAX_LISTEN 8
#define MAX_EVENTS 256

#define BODY "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" \
             "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
#define HEAD_COMMON "HTTP/1.1 200 OK\r\nServer: bench-httpd\r\nContent-Type: text/plain\r\n" \
                    "Content-Length: 100\r\n"
static const char OK_KEEP[] = HEAD_COMMON "Connection: keep-alive\r\n\r\n" BODY;
static const char OK_CLOSE[] = HEAD_COMMON "Connection: close\r\n\r\n" BODY;
static const char BAD[] = "HTTP/1.1 400 Bad Request\r\nServer: bench-httpd\r\n"
                          "Content-Length: 0\r\nConnection: close\r\n\r\n";
_Static_assert(sizeof BODY - 1 == 100, "the body is 100 bytes");

typedef struct {
    int fd;
    int listener;       /* a listening socket: accept on readiness */
    int closing;        /* answered a closing request: close once the answers are out */
    size_t in_len;      /* bytes in in[] */
    uint64_t skip;      /* body bytes still to discard */
    char *pending;      /* answers the socket did not take yet */
    size_t pending_len, pending_off;
    char in[];
} conn_t;

static int g_ep;
static char g_out[OUT_SIZE];

static void set_events(conn_t *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(conn_t *c)
{
    close(c->fd); /* also leaves the epoll set */
    free(c->pending);
    free(c);
}

/* The value of header `name` in the head [p, end) (lines after the request line), or
 * NULL; *len its length without surrounding blanks. */
static const char *header(const char *p, const char *end, const char *name, size_t *len)
{
    size_t nlen = strlen(name);
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (eol == NULL) {
            eol = end;
        }
        if ((size_t)(eol - p) > nlen && p[nlen] == ':' && strncasecmp(p, name, nlen) == 0) {
            const char *v = p + nlen + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) {
                v++;
            }
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) {
                ve--;
            }
            *len = (size_t)(ve - v);
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

static int has_token(const char *v, size_t len, const char *token)
{
    size_t tlen = strlen(token);
    for (size_t i = 0; i + tlen <= len; i++) {
        if (strncasecmp(v + i, token, tlen) == 0) {
            return 1;
        }
    }
    return 0;
}

/* One request head [head, head + len) (without the final CRLF CRLF): 0 keep-alive,
 * 1 close after the answer, -1 not a request this server can frame. *body: its length. */
static int parse_head(const char *head, size_t len, uint64_t *body)
{
    const char *end = head + len;
    const char *eol = memmem(head, len, "\r\n", 2);
    const char *line_end = eol != NULL ? eol : end;
    if (line_end - head < 14 || memcmp(line_end - 8, "HTTP/1.", 7) != 0 ||
        memchr(head, ' ', (size_t)(line_end - head)) == NULL) {
        return -1;
    }
    int http10 = line_end[-1] == '0';
    if (!http10 && line_end[-1] != '1') {
        return -1;
    }
    const char *hdrs = eol != NULL ? eol + 2 : end;
    size_t vlen;
    if (header(hdrs, end, "Transfer-Encoding", &vlen) != NULL) {
        return -1;
    }
    *body = 0;
    const char *cl = header(hdrs, end, "Content-Length", &vlen);
    if (cl != NULL) {
        if (vlen == 0 || vlen > 18) {
            return -1;
        }
        for (size_t i = 0; i < vlen; i++) {
            if (cl[i] < '0' || cl[i] > '9') {
                return -1;
            }
            *body = *body * 10 + (uint64_t)(cl[i] - '0');
        }
    }
    const char *conn = header(hdrs, end, "Connection", &vlen);
    if (conn != NULL && has_token(conn, vlen, "close")) {
        return 1;
    }
    return http10 && !(conn != NULL && has_token(conn, vlen, "keep-alive"));
}

/* Write out[0..n); what the socket does not take waits in c->pending (reading stops).
 * Returns -1 if the connection is gone. */
static int send_out(conn_t *c, const char *out, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(c->fd, out + off, n - off);
        if (w > 0) {
            off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            c->pending = malloc(n - off);
            if (c->pending == NULL) {
                return -1;
            }
            memcpy(c->pending, out + off, n - off);
            c->pending_len = n - off;
            c->pending_off = 0;
            set_events(c, EPOLLOUT);
            return 0;
        } else {
            return -1;
        }
    }
    return 0;
}

/* Answer every complete request in c->in, in order; -1: close the connection now. */
static int answer(conn_t *c)
{
    size_t pos = 0, out = 0;
    while (!c->closing && c->pending == NULL) {
        if (c->skip > 0) { /* a request body: discarded */
            size_t n = c->in_len - pos < c->skip ? c->in_len - pos : (size_t)c->skip;
            pos += n;
            c->skip -= n;
            if (c->skip > 0) {
                break;
            }
        }
        char *head = c->in + pos;
        char *term = memmem(head, c->in_len - pos, "\r\n\r\n", 4);
        if (term == NULL) {
            if (c->in_len - pos >= IN_SIZE) { /* a head longer than the buffer */
                memcpy(g_out + out, BAD, sizeof BAD - 1);
                out += sizeof BAD - 1;
                c->closing = 1;
            }
            break;
        }
        const char *reply = OK_KEEP;
        size_t reply_len = sizeof OK_KEEP - 1;
        uint64_t body = 0;
        int how = parse_head(head, (size_t)(term - head), &body);
        if (how < 0) {
            reply = BAD;
            reply_len = sizeof BAD - 1;
            c->closing = 1;
        } else if (how == 1) {
            reply = OK_CLOSE;
            reply_len = sizeof OK_CLOSE - 1;
            c->closing = 1;
        }
        if (reply != BAD && strncmp(head, "HEAD ", 5) == 0) {
            reply_len -= 100; /* the same head, no body */
        }
        memcpy(g_out + out, reply, reply_len);
        out += reply_len;
        pos = (size_t)(term + 4 - c->in);
        c->skip = body;
        if (out + sizeof OK_CLOSE > OUT_SIZE) { /* the gathered answers out, then on */
            if (send_out(c, g_out, out) != 0) {
                return -1;
            }
            out = 0;
        }
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    if (out > 0 && send_out(c, g_out, out) != 0) {
        return -1;
    }
    return c->closing && c->pending == NULL ? -1 : 0;
}

static void on_readable(conn_t *c)
{
    ssize_t r = read(c->fd, c->in + c->in_len, IN_SIZE - c->in_len);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (r <= 0) { /* EOF or error */
        drop(c);
        return;
    }
    c->in_len += (size_t)r;
    if (answer(c) != 0) {
        drop(c);
    }
}

static void on_writable(conn_t *c)
{
    ssize_t w = write(c->fd, c->pending + c->pending_off, c->pending_len - c->pending_off);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (w <= 0) {
        drop(c);
        return;
    }
    c->pending_off += (size_t)w;
    if (c->pending_off < c->pending_len) {
        return;
    }
    free(c->pending);
    c->pending = NULL;
    if (c->closing) {
        drop(c);
        return;
    }
    set_events(c, EPOLLIN);
    if (answer(c) != 0) { /* requests that waited in the buffer */
        drop(c);
    }
}

static void on_accept(conn_t *l)
{
    for (int i = 0; i < 64; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                usleep(1000); /* out of descriptors: let connections end */
            }
            return; /* EAGAIN, or a connection aborted before it was taken */
        }
        conn_t *c = calloc(1, sizeof *c + IN_SIZE);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            drop(c);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc - 2 > MAX_LISTEN) {
        die("usage: httpd LIFETIME_S LISTEN [LISTEN...] (at most %d)", MAX_LISTEN);
    }
    bound_lifetime((unsigned)atoi(argv[1]));
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0) {
        die("epoll_create1: %s", strerror(errno));
    }
    for (int i = 2; i < argc; i++) {
        addr_t addr;
        if (parse_addr(argv[i], &addr) != 0) {
            die("bad address %s", argv[i]);
        }
        conn_t *l = calloc(1, sizeof *l);
        if (l == NULL) {
            die("out of memory");
        }
        l->fd = listen_on(&addr, 4096);
        l->listener = 1;
        fcntl(l->fd, F_SETFL, fcntl(l->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
        if (epoll_ctl(g_ep, EPOLL_CTL_ADD, l->fd, &ev) != 0) {
            die("epoll_ctl: %s", strerror(errno));
        }
        fprintf(stderr, "httpd listening on %s\n", argv[i]);
    }
    struct epoll_event events[MAX_EVENTS];
    for (;;) { /* ends with the process: signal or LIFETIME_S */
        int n = epoll_wait(g_ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) {
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->listener) {
                on_accept(c);
            } else if (c->pending != NULL) {
                on_writable(c);
            } else {
                on_readable(c);
            }
        }
    }
}
