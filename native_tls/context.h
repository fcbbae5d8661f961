/*
 * SSL_CTX construction from in-memory PEM, without Python.
 *
 * The certificate chain, key and trust anchors arrive as buffers; nothing touches the
 * filesystem. The caller's key buffer is wiped with OPENSSL_cleanse by mp_context_new
 * when it is writable (the Python layer passes a private bytearray copy).
 */
#ifndef MESHPROXY_CONTEXT_H
#define MESHPROXY_CONTEXT_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

typedef struct {
    const char *chain_pem;
    size_t chain_len;
    char *key_pem; /* wiped before mp_context_new returns when key_writable */
    size_t key_len;
    int key_writable;
    const char *trust_pem; /* NULL: no trust anchors (only valid without verify_peer) */
    size_t trust_len;
    int server;
    int verify_peer;
    int partial_chain;
    int tickets;
    int min_version; /* TLS1_2_VERSION or TLS1_3_VERSION */
    const unsigned char *alpn_wire; /* ALPN protocol list in wire format, or NULL */
    size_t alpn_len;
} mp_context_config;

/* A new SSL_CTX (one reference, owned by the caller), or NULL with a message in err. */
SSL_CTX *mp_context_new(const mp_context_config *cfg, char *err, size_t errlen);

/* One-time process setup (ex_data index for the server's ALPN list); 0 on success. */
int mp_context_global_init(void);

/* OpenSSL's built-in EC key method (context.c, legacy_ec): 1 when OpenSSL's default for EC
 * keys is our ENGINE, with *uses how often OpenSSL took it for an EC key operation; else 0. */
int mp_context_ec_method(uint64_t *uses);

/* The last OpenSSL error of this thread as "what: reason", and the queue cleared. */
void mp_openssl_error(const char *what, char *err, size_t errlen);

#endif
