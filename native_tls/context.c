/*
 * SSL_CTX from memory: chain, key and trust anchors parsed from PEM buffers.
 *
 * Policy mirrors the Python backend (meshproxy/tls/_python.py): TLS 1.3 unless 1.2 is
 * configured, no compression, no renegotiation, no session tickets and no session cache
 * unless configured (a ticket would outlive a certificate rotation), the intermediate is a
 * trust anchor (partial chain), and the client does not check host names: the caller
 * checks the marble identity in the peer certificate after the handshake.
 *
 * Verified-chain cache: a mesh peer presents the same chain on every connection, and
 * building and verifying it (an ECDSA verify per signature, the store lookups) is a
 * tenth of a server handshake. A context that verifies peers remembers the chains it
 * verified: the key is a SHA-256 over the DER of every certificate the peer presented,
 * in order; the cache lives in the SSL_CTX, so a new trust store (rotation) starts empty;
 * a hit still checks that now lies within every certificate's validity. Only successes
 * are remembered: a chain that failed is verified (and fails) again. The handshake's
 * CertificateVerify is checked by TLS against the leaf's key either way.
 */
/* ENGINE_* and EVP_PKEY_meth_find are deprecated in OpenSSL 3.0; see legacy_ec below. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "context.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#ifndef OPENSSL_NO_ENGINE
#include <openssl/engine.h>
#endif
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

static int alpn_index = -1;
static int vcache_index = -1;
static EVP_MD *sha256; /* fetched once: an implicit fetch per digest takes provider locks */

#define VCACHE_SLOTS 64

typedef struct {
    unsigned char key[32];
    time_t not_before, not_after; /* the latest notBefore, the earliest notAfter of the chain */
    int used;
} vcache_entry;

typedef struct {
    pthread_mutex_t mu;
    unsigned next; /* round-robin replacement */
    vcache_entry slot[VCACHE_SLOTS];
} vcache;

static void
vcache_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    vcache *vc = ptr;
    if (vc != NULL) {
        pthread_mutex_destroy(&vc->mu);
        OPENSSL_free(vc);
    }
}

/* SHA-256 over the presented chain (length-prefixed DER of each certificate). */
static int
chain_key(X509_STORE_CTX *sctx, unsigned char key[32])
{
    STACK_OF(X509) *chain = X509_STORE_CTX_get0_untrusted(sctx);
    X509 *leaf = X509_STORE_CTX_get0_cert(sctx);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = md != NULL && leaf != NULL && EVP_DigestInit_ex(md, sha256, NULL) == 1;
    int n = chain ? sk_X509_num(chain) : 0;
    for (int i = -1; ok && i < n; i++) { /* the leaf first, then what came with it */
        X509 *x = i < 0 ? leaf : sk_X509_value(chain, i);
        unsigned char *der = NULL;
        int len = i2d_X509(x, &der);
        unsigned char prefix[4] = {(unsigned char)(len >> 24), (unsigned char)(len >> 16),
                                   (unsigned char)(len >> 8), (unsigned char)len};
        ok = len > 0 && EVP_DigestUpdate(md, prefix, sizeof prefix) == 1 &&
             EVP_DigestUpdate(md, der, (size_t)len) == 1;
        OPENSSL_free(der);
    }
    unsigned int out = 0;
    ok = ok && EVP_DigestFinal_ex(md, key, &out) == 1 && out == 32;
    EVP_MD_CTX_free(md);
    return ok ? 0 : -1;
}

static int
asn1_time(const ASN1_TIME *t, time_t *out)
{
    struct tm tm;
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1) {
        return -1;
    }
    *out = timegm(&tm);
    return 0;
}

/* The validity window shared by every certificate of a verified chain. */
static int
chain_window(X509_STORE_CTX *sctx, time_t *not_before, time_t *not_after)
{
    STACK_OF(X509) *chain = X509_STORE_CTX_get0_chain(sctx);
    if (chain == NULL || sk_X509_num(chain) == 0) {
        return -1;
    }
    for (int i = 0; i < sk_X509_num(chain); i++) {
        X509 *x = sk_X509_value(chain, i);
        time_t nb, na;
        if (asn1_time(X509_get0_notBefore(x), &nb) < 0 ||
            asn1_time(X509_get0_notAfter(x), &na) < 0) {
            return -1;
        }
        if (i == 0 || nb > *not_before) {
            *not_before = nb;
        }
        if (i == 0 || na < *not_after) {
            *not_after = na;
        }
    }
    return 0;
}

/* SSL_CTX_set_cert_verify_callback: X509_verify_cert, unless this chain verified before. */
static int
cached_verify(X509_STORE_CTX *sctx, void *arg)
{
    vcache *vc = arg;
    unsigned char key[32];
    int keyed = chain_key(sctx, key) == 0;
    time_t now = time(NULL);
    if (keyed) {
        int hit = 0;
        pthread_mutex_lock(&vc->mu);
        for (int i = 0; i < VCACHE_SLOTS; i++) {
            const vcache_entry *e = &vc->slot[i];
            if (e->used && memcmp(e->key, key, sizeof key) == 0) {
                hit = now >= e->not_before && now <= e->not_after;
                break;
            }
        }
        pthread_mutex_unlock(&vc->mu);
        if (hit) {
            X509_STORE_CTX_set_error(sctx, X509_V_OK);
            return 1;
        }
    }
    int ok = X509_verify_cert(sctx);
    time_t nb = 0, na = 0;
    if (ok == 1 && keyed && chain_window(sctx, &nb, &na) == 0) {
        pthread_mutex_lock(&vc->mu);
        vcache_entry *e = NULL;
        for (int i = 0; i < VCACHE_SLOTS && e == NULL; i++) {
            if (vc->slot[i].used && memcmp(vc->slot[i].key, key, sizeof key) == 0) {
                e = &vc->slot[i]; /* expired, or verified by two workers at once */
            }
        }
        if (e == NULL) {
            e = &vc->slot[vc->next];
            vc->next = (vc->next + 1) % VCACHE_SLOTS;
        }
        memcpy(e->key, key, sizeof key);
        e->not_before = nb;
        e->not_after = na;
        e->used = 1;
        pthread_mutex_unlock(&vc->mu);
    }
    return ok;
}

static int
enable_vcache(SSL_CTX *ctx, char *err, size_t errlen)
{
    vcache *vc = OPENSSL_zalloc(sizeof *vc);
    if (vc == NULL || pthread_mutex_init(&vc->mu, NULL) != 0) {
        OPENSSL_free(vc);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (SSL_CTX_set_ex_data(ctx, vcache_index, vc) != 1) {
        vcache_free(NULL, vc, NULL, 0, 0, NULL);
        mp_openssl_error("out of memory", err, errlen);
        return -1;
    }
    SSL_CTX_set_cert_verify_callback(ctx, cached_verify, vc);
    return 0;
}

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

/*
 * EC keys through OpenSSL's built-in EC method instead of the provider decoders.
 *
 * OpenSSL 3.0 decodes the public key of every certificate it parses (the peer's chain in
 * every handshake: leaf and intermediate) with OSSL_DECODER_CTX_new_for_pkey, which
 * builds a decoder chain from scratch each time: it walks every key manager and decoder
 * of every provider, with locks and string compares. perf on the handshake scenario:
 * ASN1_item_d2i_ex was 41 % of the engine worker's CPU, the decoder-chain construction
 * alone 29 %. X509_PUBKEY's decoder tries the legacy method first when an ENGINE claims
 * the key type (crypto/x509/x_pubkey.c, x509_pubkey_decode), so a one-method ENGINE that
 * hands back OpenSSL's own built-in EC EVP_PKEY_METHOD makes the decode take the 1.1.1
 * path: the same DER parsing and the same EC_POINT_oct2point (the point must lie on the
 * curve), only without the decoder chain. Operations on EC keys (ECDSA sign/verify,
 * ECDH) then run through that same built-in method, i.e. OpenSSL's own EC_KEY code with
 * the same P-256 implementation the provider wraps; X25519, RSA, digests and ciphers
 * stay on the providers. No check is skipped: chains, CertificateVerify and the SPIFFE
 * identity are verified exactly as before (tests: a tampered leaf signature is refused).
 * Process-wide, installed once when the module loads; the measured saving is ~40 % of
 * the proxy's CPU per mTLS handshake (native_tls/README.md). Speed only: if it cannot be
 * installed (or OpenSSL has no ENGINE support) everything runs on the providers as before.
 */
/* What tests and the start-up log can see of it (mp_context_ec_method): how often OpenSSL
 * asked the method for EC. It asks when it makes an EVP_PKEY_CTX (a signature, a
 * verification, a key exchange) for an EC key decoded on the legacy path, i.e. for
 * certificate keys that skipped the decoder chain; keys the providers decoded never get
 * here. A relaxed counter: a few increments per handshake. */
#ifndef OPENSSL_NO_ENGINE
static atomic_uint_fast64_t legacy_ec_uses;

static const int legacy_ec_nids[] = {EVP_PKEY_EC};

static int
legacy_ec_pkey_meths(ENGINE *e, EVP_PKEY_METHOD **pmeth, const int **nids, int nid)
{
    (void)e;
    if (pmeth == NULL) {
        *nids = legacy_ec_nids;
        return 1;
    }
    *pmeth = nid == EVP_PKEY_EC ? (EVP_PKEY_METHOD *)EVP_PKEY_meth_find(EVP_PKEY_EC) : NULL;
    if (*pmeth != NULL) {
        atomic_fetch_add_explicit(&legacy_ec_uses, 1, memory_order_relaxed);
    }
    return *pmeth != NULL;
}

#define LEGACY_EC_ID "meshproxy-ec"
#define LEGACY_EC_CMD_USES ENGINE_CMD_BASE /* ENGINE_ctrl: *(uint64_t *)p = the count */

/* The count through the ENGINE itself: another copy of this module loaded into the process
 * (a test builds one) installs its own ENGINE, and then that one's counter is the live one. */
static int
legacy_ec_ctrl(ENGINE *e, int cmd, long i, void *p, void (*f)(void))
{
    (void)e, (void)i, (void)f;
    if (cmd != LEGACY_EC_CMD_USES || p == NULL) {
        return 0;
    }
    *(uint64_t *)p = atomic_load_explicit(&legacy_ec_uses, memory_order_relaxed);
    return 1;
}

static int
install_legacy_ec(void)
{
    ENGINE *e = ENGINE_new();
    int ok = e != NULL && ENGINE_set_id(e, LEGACY_EC_ID) == 1 &&
             ENGINE_set_name(e, "OpenSSL's built-in EC key method") == 1 &&
             ENGINE_set_pkey_meths(e, legacy_ec_pkey_meths) == 1 &&
             ENGINE_set_ctrl_function(e, legacy_ec_ctrl) == 1 &&
             ENGINE_set_default_pkey_meths(e) == 1;
    ENGINE_free(e); /* the method table keeps its own reference */
    ERR_clear_error();
    return ok ? 0 : -1;
}

int
mp_context_ec_method(uint64_t *uses)
{
    *uses = 0;
    ENGINE *e = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC); /* OpenSSL's current choice */
    const char *id = e != NULL ? ENGINE_get_id(e) : NULL;
    int ours = id != NULL && strcmp(id, LEGACY_EC_ID) == 0 &&
               ENGINE_ctrl(e, LEGACY_EC_CMD_USES, 0, uses, NULL) == 1;
    if (e != NULL) {
        ENGINE_finish(e);
    }
    ERR_clear_error();
    return ours;
}
#else
static int
install_legacy_ec(void)
{
    return -1;
}

int
mp_context_ec_method(uint64_t *uses)
{
    *uses = 0;
    return 0;
}
#endif

int
mp_context_global_init(void)
{
    static int legacy_ec_tried;
    if (!legacy_ec_tried) {
        legacy_ec_tried = 1;
        (void)install_legacy_ec(); /* speed only: without it the providers do the same work */
    }
    if (alpn_index < 0) {
        alpn_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_free);
    }
    if (vcache_index < 0) {
        vcache_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, vcache_free);
    }
    if (sha256 == NULL) {
        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    }
    return alpn_index < 0 || vcache_index < 0 || sha256 == NULL ? -1 : 0;
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
    if (cfg->verify_peer && enable_vcache(ctx, err, errlen) < 0) {
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
