/*
 * SSL_CTX from memory: chain, key and trust anchors parsed from PEM buffers.
 *
 * Policy mirrors the Python backend (meshproxy/tls/_python.py): TLS 1.3 unless 1.2 is
 * configured, no compression, no renegotiation, no session tickets and no session cache
 * unless configured (a ticket would outlive a certificate rotation), the intermediate is a
 * trust anchor (partial chain), and the client does not check host names: the caller
 * checks the marble identity in the peer certificate after the handshake.
 */
#include "context.h"

#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

static int alpn_index = -1;

typedef struct {
    size_t len;
    unsigned char wire[];
} alpn_list;

static void
alpn_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    OPENSSL_free(ptr);
}

int
mp_context_global_init(void)
{
    if (alpn_index < 0) {
        alpn_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_free);
    }
    return alpn_index < 0 ? -1 : 0;
}

void
mp_openssl_error(const char *what, char *err, size_t errlen)
{
    unsigned long code = ERR_peek_last_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    if (reason != NULL) {
        snprintf(err, errlen, "%s: %s", what, reason);
    } else {
        snprintf(err, errlen, "%s", what);
    }
    ERR_clear_error();
}

/* No passphrase prompt, ever: an encrypted key is an error, not a terminal read. */
static int
no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1;
}

static int
select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
            unsigned int inlen, void *arg)
{
    (void)arg;
    const alpn_list *ours = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), alpn_index);
    unsigned char *selected = NULL;
    if (ours == NULL ||
        SSL_select_next_proto(&selected, outlen, ours->wire, (unsigned int)ours->len, in, inlen) !=
            OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_NOACK; /* no common protocol: continue without ALPN */
    }
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
}

static int
load_chain(SSL_CTX *ctx, const mp_context_config *cfg, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(cfg->chain_pem, (int)cfg->chain_len);
    if (bio == NULL) {
        mp_openssl_error("out of memory", err, errlen);
        return -1;
    }
    int ok = -1;
    X509 *leaf = PEM_read_bio_X509_AUX(bio, NULL, no_passphrase, NULL);
    if (leaf == NULL || SSL_CTX_use_certificate(ctx, leaf) != 1) {
        mp_openssl_error("certificate chain does not load", err, errlen);
        goto done;
    }
    for (;;) {
        X509 *ca = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
        if (ca == NULL) {
            break;
        }
        if (SSL_CTX_add0_chain_cert(ctx, ca) != 1) { /* takes ownership on success only */
            X509_free(ca);
            mp_openssl_error("certificate chain does not load", err, errlen);
            goto done;
        }
    }
    unsigned long last = ERR_peek_last_error();
    if (last != 0 && !(ERR_GET_LIB(last) == ERR_LIB_PEM &&
                       ERR_GET_REASON(last) == PEM_R_NO_START_LINE)) {
        mp_openssl_error("certificate chain does not load", err, errlen);
        goto done;
    }
    ERR_clear_error(); /* the expected end-of-input marker */
    ok = 0;
done:
    X509_free(leaf);
    BIO_free(bio);
    return ok;
}

static int
load_key(SSL_CTX *ctx, const mp_context_config *cfg, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(cfg->key_pem, (int)cfg->key_len); /* read-only view, no copy */
    if (bio == NULL) {
        mp_openssl_error("out of memory", err, errlen);
        return -1;
    }
    EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    if (key == NULL) {
        /* The reason only: never a byte of the key in a message. */
        mp_openssl_error("private key does not load", err, errlen);
        return -1;
    }
    int rc = SSL_CTX_use_PrivateKey(ctx, key);
    EVP_PKEY_free(key);
    if (rc != 1) {
        mp_openssl_error("private key does not load", err, errlen);
        return -1;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        mp_openssl_error("certificate chain and private key do not match", err, errlen);
        return -1;
    }
    return 0;
}

static int
load_trust(SSL_CTX *ctx, const mp_context_config *cfg, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(cfg->trust_pem, (int)cfg->trust_len);
    if (bio == NULL) {
        mp_openssl_error("out of memory", err, errlen);
        return -1;
    }
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    int count = 0;
    for (;;) {
        X509 *anchor = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
        if (anchor == NULL) {
            break;
        }
        int rc = X509_STORE_add_cert(store, anchor); /* takes its own reference */
        X509_free(anchor);
        if (rc != 1) {
            BIO_free(bio);
            mp_openssl_error("trust anchor does not load", err, errlen);
            return -1;
        }
        count++;
    }
    BIO_free(bio);
    unsigned long last = ERR_peek_last_error();
    if (count == 0 || (last != 0 && !(ERR_GET_LIB(last) == ERR_LIB_PEM &&
                                      ERR_GET_REASON(last) == PEM_R_NO_START_LINE))) {
        mp_openssl_error("trust anchor is not a valid PEM certificate", err, errlen);
        return -1;
    }
    ERR_clear_error();
    if (cfg->partial_chain) {
        /* The intermediate is the anchor: leaves of a replaced intermediate must fail
         * even though they still chain to the same root. */
        X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(ctx), X509_V_FLAG_PARTIAL_CHAIN);
    }
    return 0;
}

static int
set_alpn(SSL_CTX *ctx, const mp_context_config *cfg, char *err, size_t errlen)
{
    if (cfg->alpn_wire == NULL || cfg->alpn_len == 0) {
        return 0;
    }
    if (!cfg->server) {
        if (SSL_CTX_set_alpn_protos(ctx, cfg->alpn_wire, (unsigned int)cfg->alpn_len) != 0) {
            mp_openssl_error("ALPN list rejected", err, errlen);
            return -1;
        }
        return 0;
    }
    alpn_list *ours = OPENSSL_malloc(sizeof(*ours) + cfg->alpn_len);
    if (ours == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    ours->len = cfg->alpn_len;
    memcpy(ours->wire, cfg->alpn_wire, cfg->alpn_len);
    if (SSL_CTX_set_ex_data(ctx, alpn_index, ours) != 1) {
        OPENSSL_free(ours);
        mp_openssl_error("out of memory", err, errlen);
        return -1;
    }
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
    return 0;
}

SSL_CTX *
mp_context_new(const mp_context_config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = NULL;
    ERR_clear_error();
    if (alpn_index < 0) {
        snprintf(err, errlen, "module not initialised");
        goto fail;
    }
    if (cfg->verify_peer && cfg->trust_pem == NULL) {
        snprintf(err, errlen, "verify_peer needs trust anchors");
        goto fail;
    }
    ctx = SSL_CTX_new(cfg->server ? TLS_server_method() : TLS_client_method());
    if (ctx == NULL) {
        mp_openssl_error("SSL_CTX_new failed", err, errlen);
        goto fail;
    }
    if (SSL_CTX_set_min_proto_version(ctx, cfg->min_version) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1) {
        mp_openssl_error("TLS version range rejected", err, errlen);
        goto fail;
    }
    if (cfg->min_version < TLS1_3_VERSION &&
        SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20") != 1) {
        mp_openssl_error("TLS 1.2 cipher list rejected", err, errlen);
        goto fail;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    if (!cfg->tickets) {
        /* In TLS 1.3, NO_TICKET alone would mean stateful tickets; num_tickets 0 means none. */
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(ctx, 0);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (cfg->verify_peer) {
        int mode = SSL_VERIFY_PEER | (cfg->server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0);
        SSL_CTX_set_verify(ctx, mode, NULL);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    if (load_chain(ctx, cfg, err, errlen) < 0 || load_key(ctx, cfg, err, errlen) < 0) {
        goto fail;
    }
    if (cfg->trust_pem != NULL && load_trust(ctx, cfg, err, errlen) < 0) {
        goto fail;
    }
    if (set_alpn(ctx, cfg, err, errlen) < 0) {
        goto fail;
    }
    if (cfg->key_writable) {
        OPENSSL_cleanse(cfg->key_pem, cfg->key_len);
    }
    return ctx;
fail:
    if (cfg->key_writable) {
        OPENSSL_cleanse(cfg->key_pem, cfg->key_len);
    }
    SSL_CTX_free(ctx);
    return NULL;
}
