/*
 * sentinel_client.c - the C client for sentineld; see sentinel_client.h.
 *
 * Layout: a bounded MessagePack writer and reader (no I/O), the frame
 * encoders and the reply decoder built on them, then the socket layer.
 *
 * The reader never trusts a length: every str/bin/ext length and every
 * array/map count is checked against the bytes left in the frame before it
 * is used (an element takes at least one byte, a map entry two), so the work
 * done on a frame is bounded by its size, and nesting is bounded by
 * SENTINEL_MAX_DEPTH, so the recursion is too.
 */
#define _POSIX_C_SOURCE 200809L

#include "sentinel_client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <fcntl.h>
#include <unistd.h>

#define HEADER_SIZE 4u
/* The read buffer's first size: a few hundred replies; it grows only for a
 * frame larger than itself (never past the frame limit). */
#define RBUF_INITIAL (64u * 1024u)
#define WBUF_INITIAL 1024u

struct sentinel_conn {
    int fd;
    int broken;              /* sticky failure code once the stream is unusable */
    uint64_t next_id;        /* for sentinel_scan_fd() and hello */
    uint32_t max_frame;      /* largest reply body accepted */
    uint8_t *rbuf;           /* received bytes: [rstart, rend) not yet decoded */
    size_t rcap, rstart, rend;
    uint8_t *wbuf;           /* the frame being sent */
    size_t wcap;
    sentinel_reply welcome;
    char err[SENTINEL_ERRMSG_MAX];
};

/* ---- small helpers ----------------------------------------------------- */

static int conn_fail(sentinel_conn *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

/* A stream failure: every later call reports it too (the stream is lost). */
static int conn_break(sentinel_conn *c, int code)
{
    c->broken = code;
    return code;
}

static void set_errbuf(char *errbuf, size_t len, const char *fmt, ...)
{
    va_list ap;
    if (errbuf == NULL || len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, len, fmt, ap);
    va_end(ap);
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF):
 * what the daemon's decoder accepts; anything else costs the connection. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t need, k;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            need = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            need = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            need = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        if (n - i - 1 < need)
            return 0;
        for (k = 1; k <= need; k++) {
            unsigned b = s[i + k];
            if ((b & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (b & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += need + 1;
    }
    return 1;
}

/* Copy at most cap-1 bytes and terminate; a cut never splits a UTF-8 sequence. */
static void copy_str(char *dst, size_t cap, const uint8_t *src, size_t n)
{
    size_t m = n;
    if (m > cap - 1) {
        m = cap - 1;
        while (m > 0 && (src[m] & 0xC0) == 0x80)
            m--;
    }
    memcpy(dst, src, m);
    dst[m] = '\0';
}

static uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- MessagePack writer ------------------------------------------------ */

/* Writes while there is room and counts every byte either way, so one pass
 * tells the caller the size it needs. */
typedef struct {
    uint8_t *p;
    size_t cap, len;
    int bad; /* a string was not UTF-8 or too long */
} mp_w;

static void w_put(mp_w *w, const void *src, size_t n)
{
    if (w->len <= w->cap && n <= w->cap - w->len)
        memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void w_byte(mp_w *w, uint8_t b) { w_put(w, &b, 1); }

static void w_be(mp_w *w, uint8_t tag, uint64_t v, unsigned bytes)
{
    uint8_t b[9];
    unsigned i;
    b[0] = tag;
    for (i = 0; i < bytes; i++)
        b[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    w_put(w, b, 1 + bytes);
}

static void w_uint(mp_w *w, uint64_t v)
{
    if (v < 0x80)
        w_byte(w, (uint8_t)v);
    else if (v <= 0xFF)
        w_be(w, 0xcc, v, 1);
    else if (v <= 0xFFFF)
        w_be(w, 0xcd, v, 2);
    else if (v <= 0xFFFFFFFFu)
        w_be(w, 0xce, v, 4);
    else
        w_be(w, 0xcf, v, 8);
}

static void w_nil(mp_w *w) { w_byte(w, 0xc0); }

static void w_map(mp_w *w, uint32_t n)
{
    if (n < 16)
        w_byte(w, (uint8_t)(0x80 | n));
    else if (n <= 0xFFFF)
        w_be(w, 0xde, n, 2);
    else
        w_be(w, 0xdf, n, 4);
}

static void w_array(mp_w *w, uint32_t n)
{
    if (n < 16)
        w_byte(w, (uint8_t)(0x90 | n));
    else if (n <= 0xFFFF)
        w_be(w, 0xdc, n, 2);
    else
        w_be(w, 0xdd, n, 4);
}

static void w_str(mp_w *w, const char *s)
{
    size_t n = strlen(s);
    if (n > 0xFFFFFFFFu || !utf8_valid((const unsigned char *)s, n)) {
        w->bad = 1;
        return;
    }
    if (n < 32)
        w_byte(w, (uint8_t)(0xa0 | n));
    else if (n <= 0xFF)
        w_be(w, 0xd9, n, 1);
    else if (n <= 0xFFFF)
        w_be(w, 0xda, n, 2);
    else
        w_be(w, 0xdb, n, 4);
    w_put(w, s, n);
}

static void w_str_or_nil(mp_w *w, const char *s)
{
    if (s == NULL)
        w_nil(w);
    else
        w_str(w, s);
}

/* Start a frame: room for the length header, patched by w_finish(). */
static void w_start(mp_w *w, uint8_t *buf, size_t cap)
{
    w->p = buf;
    w->cap = cap;
    w->len = HEADER_SIZE;
    w->bad = 0;
}

static int w_finish(mp_w *w, size_t *len)
{
    size_t body = w->len - HEADER_SIZE;
    *len = w->len;
    if (w->bad || body > 0xFFFFFFFFu)
        return SENTINEL_E_INVALID;
    if (w->len > w->cap)
        return SENTINEL_E_NOMEM;
    w->p[0] = (uint8_t)(body >> 24);
    w->p[1] = (uint8_t)(body >> 16);
    w->p[2] = (uint8_t)(body >> 8);
    w->p[3] = (uint8_t)body;
    return SENTINEL_OK;
}

int sentinel_encode_hello(uint8_t *buf, size_t cap, size_t *len, uint64_t id, const char *client,
                          const char *const *capabilities, size_t n_capabilities)
{
    mp_w w;
    size_t i;
    if (len == NULL || client == NULL || (buf == NULL && cap != 0) ||
        (capabilities == NULL && n_capabilities != 0) || n_capabilities > 0xFFFFFFFFu)
        return SENTINEL_E_INVALID;
    w_start(&w, buf, cap);
    w_map(&w, 5);
    w_str(&w, "type");
    w_str(&w, "hello");
    w_str(&w, "client");
    w_str(&w, client);
    w_str(&w, "protocol_version");
    w_uint(&w, SENTINEL_PROTOCOL_VERSION);
    w_str(&w, "capabilities");
    w_array(&w, (uint32_t)n_capabilities);
    for (i = 0; i < n_capabilities; i++) {
        if (capabilities[i] == NULL)
            return SENTINEL_E_INVALID;
        w_str(&w, capabilities[i]);
    }
    w_str(&w, "id");
    w_uint(&w, id);
    return w_finish(&w, len);
}

int sentinel_encode_scan_fd(uint8_t *buf, size_t cap, size_t *len, uint64_t id,
                            const char *filename, const char *url, const char *mime_type)
{
    mp_w w;
    if (len == NULL || (buf == NULL && cap != 0))
        return SENTINEL_E_INVALID;
    w_start(&w, buf, cap);
    w_map(&w, 6);
    w_str(&w, "type");
    w_str(&w, "scan_fd");
    w_str(&w, "url");
    w_str_or_nil(&w, url);
    w_str(&w, "filename");
    w_str_or_nil(&w, filename);
    w_str(&w, "mime_type");
    w_str_or_nil(&w, mime_type);
    w_str(&w, "size"); /* nil: scan the whole file */
    w_nil(&w);
    w_str(&w, "id");
    w_uint(&w, id);
    return w_finish(&w, len);
}

/* ---- MessagePack reader ------------------------------------------------ */

typedef enum { MP_NIL, MP_BOOL, MP_UINT, MP_NEG, MP_FLOAT, MP_STR, MP_BIN, MP_EXT, MP_ARRAY, MP_MAP } mp_kind;

typedef struct {
    mp_kind kind;
    uint64_t u;          /* MP_UINT, MP_BOOL */
    int64_t i;           /* MP_NEG */
    double f;            /* MP_FLOAT */
    const uint8_t *data; /* MP_STR, MP_BIN, MP_EXT */
    uint32_t len;        /* their length, or the count of an array/map */
} mp_val;

typedef struct {
    const uint8_t *p, *end;
    const char *why; /* the first failure: a static string */
    const char *at;  /* the field being decoded when it failed, or NULL */
} mp_r;

static int r_fail(mp_r *r, const char *why)
{
    if (r->why == NULL)
        r->why = why;
    return -1;
}

static size_t r_left(const mp_r *r) { return (size_t)(r->end - r->p); }

static int r_be(mp_r *r, unsigned bytes, uint64_t *v)
{
    unsigned i;
    if (r_left(r) < bytes)
        return r_fail(r, "truncated value");
    *v = 0;
    for (i = 0; i < bytes; i++)
        *v = (*v << 8) | r->p[i];
    r->p += bytes;
    return 0;
}

static int r_payload(mp_r *r, mp_val *v, mp_kind kind, uint64_t n)
{
    if (n > r_left(r))
        return r_fail(r, "a length runs past the end of the frame");
    v->kind = kind;
    v->data = r->p;
    v->len = (uint32_t)n;
    r->p += n;
    return 0;
}

/* An array/map header: each element needs at least one byte, so a count
 * larger than what is left is refused before any loop runs. */
static int r_count(mp_r *r, mp_val *v, mp_kind kind, uint64_t n)
{
    uint64_t min_bytes = kind == MP_MAP ? 2 * n : n;
    if (min_bytes > r_left(r))
        return r_fail(r, "a count runs past the end of the frame");
    v->kind = kind;
    v->len = (uint32_t)n;
    return 0;
}

/* One value's header; str/bin/ext payloads are consumed too, an array's or
 * map's elements are not. */
static int r_head(mp_r *r, mp_val *v)
{
    uint8_t b;
    uint64_t n;
    memset(v, 0, sizeof *v);
    if (r->p >= r->end)
        return r_fail(r, "truncated value");
    b = *r->p++;
    if (b <= 0x7f) {
        v->kind = MP_UINT;
        v->u = b;
        return 0;
    }
    if (b >= 0xe0) {
        v->kind = MP_NEG;
        v->i = (int8_t)b;
        return 0;
    }
    if ((b & 0xf0) == 0x80)
        return r_count(r, v, MP_MAP, b & 0x0f);
    if ((b & 0xf0) == 0x90)
        return r_count(r, v, MP_ARRAY, b & 0x0f);
    if ((b & 0xe0) == 0xa0)
        return r_payload(r, v, MP_STR, b & 0x1f);
    switch (b) {
    case 0xc0:
        v->kind = MP_NIL;
        return 0;
    case 0xc2:
    case 0xc3:
        v->kind = MP_BOOL;
        v->u = b == 0xc3;
        return 0;
    case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        if (r_be(r, 1u << (b - 0xc4), &n))
            return -1;
        return r_payload(r, v, MP_BIN, n);
    case 0xc7: case 0xc8: case 0xc9: /* ext 8/16/32: length, type byte, data */
        if (r_be(r, 1u << (b - 0xc7), &n))
            return -1;
        if (r_left(r) < 1)
            return r_fail(r, "truncated value");
        r->p++;
        return r_payload(r, v, MP_EXT, n);
    case 0xca: { /* float 32 */
        float f;
        uint32_t bits;
        if (r_be(r, 4, &n))
            return -1;
        bits = (uint32_t)n;
        memcpy(&f, &bits, sizeof f);
        v->kind = MP_FLOAT;
        v->f = f;
        return 0;
    }
    case 0xcb: /* float 64 */
        if (r_be(r, 8, &n))
            return -1;
        memcpy(&v->f, &n, sizeof v->f);
        v->kind = MP_FLOAT;
        return 0;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: /* uint 8..64 */
        if (r_be(r, 1u << (b - 0xcc), &v->u))
            return -1;
        v->kind = MP_UINT;
        return 0;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: { /* int 8..64 */
        unsigned bytes = 1u << (b - 0xd0);
        int64_t s;
        if (r_be(r, bytes, &n))
            return -1;
        if (bytes < 8 && (n >> (8 * bytes - 1)) != 0)
            n |= ~(uint64_t)0 << (8 * bytes); /* sign-extend */
        s = n > (uint64_t)INT64_MAX ? -(int64_t)(~n) - 1 : (int64_t)n;
        if (s >= 0) {
            v->kind = MP_UINT;
            v->u = (uint64_t)s;
        } else {
            v->kind = MP_NEG;
            v->i = s;
        }
        return 0;
    }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16 */
        if (r_left(r) < 1)
            return r_fail(r, "truncated value");
        r->p++;
        return r_payload(r, v, MP_EXT, 1u << (b - 0xd4));
    case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
        if (r_be(r, 1u << (b - 0xd9), &n))
            return -1;
        return r_payload(r, v, MP_STR, n);
    case 0xdc: case 0xdd: /* array 16/32 */
        if (r_be(r, b == 0xdc ? 2 : 4, &n))
            return -1;
        return r_count(r, v, MP_ARRAY, n);
    case 0xde: case 0xdf: /* map 16/32 */
        if (r_be(r, b == 0xde ? 2 : 4, &n))
            return -1;
        return r_count(r, v, MP_MAP, n);
    default: /* 0xc1 is never used */
        return r_fail(r, "an invalid MessagePack type byte");
    }
}

/* Skip one value of any type, children included. depth: that of the
 * container holding it (the reply map is 1). */
static int r_skip(mp_r *r, int depth)
{
    mp_val v;
    uint64_t n, i;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_ARRAY && v.kind != MP_MAP)
        return 0;
    if (depth >= SENTINEL_MAX_DEPTH)
        return r_fail(r, "values nested too deeply");
    n = v.kind == MP_MAP ? 2 * (uint64_t)v.len : v.len;
    for (i = 0; i < n; i++)
        if (r_skip(r, depth + 1))
            return -1;
    return 0;
}

static int r_str(mp_r *r, const uint8_t **s, size_t *n)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_STR)
        return r_fail(r, "expected a string");
    *s = v.data;
    *n = v.len;
    return 0;
}

static int r_str_copy(mp_r *r, char *dst, size_t cap)
{
    const uint8_t *s;
    size_t n;
    if (r_str(r, &s, &n))
        return -1;
    copy_str(dst, cap, s, n);
    return 0;
}

static int r_uint(mp_r *r, uint64_t *u)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_UINT)
        return r_fail(r, "expected a non-negative integer");
    *u = v.u;
    return 0;
}

static int r_bool(mp_r *r, int *b)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_BOOL)
        return r_fail(r, "expected a boolean");
    *b = (int)v.u;
    return 0;
}

static int r_float(mp_r *r, double *f)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind == MP_FLOAT)
        *f = v.f;
    else if (v.kind == MP_UINT)
        *f = (double)v.u;
    else if (v.kind == MP_NEG)
        *f = (double)v.i;
    else
        return r_fail(r, "expected a number");
    return 0;
}

/* int | nil: *has = 0 for nil. */
static int r_opt_int(mp_r *r, int *has, int64_t *i)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind == MP_NIL) {
        *has = 0;
        return 0;
    }
    if (v.kind == MP_NEG) {
        *i = v.i;
    } else if (v.kind == MP_UINT && v.u <= (uint64_t)INT64_MAX) {
        *i = (int64_t)v.u;
    } else {
        return r_fail(r, "expected an integer or nil");
    }
    *has = 1;
    return 0;
}

static int r_map(mp_r *r, uint32_t *n)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_MAP)
        return r_fail(r, "expected a map");
    *n = v.len;
    return 0;
}

static int r_key(mp_r *r, const uint8_t **k, size_t *n)
{
    mp_val v;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_STR)
        return r_fail(r, "a map key is not a string");
    *k = v.data;
    *n = v.len;
    return 0;
}

#define KEY_IS(k, n, lit) ((n) == sizeof(lit) - 1 && memcmp((k), (lit), sizeof(lit) - 1) == 0)

/* ---- reply decoding ---------------------------------------------------- */

/* scan_result.matches: count them all, copy the first few rule names. */
static int decode_matches(mp_r *r, sentinel_reply *out)
{
    mp_val v;
    uint32_t i, j, nkeys;
    if (r_head(r, &v))
        return -1;
    if (v.kind != MP_ARRAY)
        return r_fail(r, "expected an array");
    out->scan.match_count = v.len;
    for (i = 0; i < v.len; i++) {
        int have_rule = 0;
        if (r_map(r, &nkeys))
            return -1;
        for (j = 0; j < nkeys; j++) {
            const uint8_t *k;
            size_t kn;
            if (r_key(r, &k, &kn))
                return -1;
            if (KEY_IS(k, kn, "rule")) {
                const uint8_t *s;
                size_t sn;
                if (r_str(r, &s, &sn))
                    return -1;
                if (i < SENTINEL_MAX_RULES)
                    copy_str(out->scan.rules[i], SENTINEL_RULE_MAX, s, sn);
                have_rule = 1;
            } else if (r_skip(r, 3)) { /* reply map, matches array, match map */
                return -1;
            }
        }
        if (!have_rule)
            return r_fail(r, "a match has no `rule`");
    }
    out->scan.rule_count = v.len < SENTINEL_MAX_RULES ? v.len : SENTINEL_MAX_RULES;
    return 0;
}

static int decode_action(mp_r *r, sentinel_action *a)
{
    static const char *const names[] = {"allow", "warn", "quarantine", "block"};
    const uint8_t *s;
    size_t n, i;
    if (r_str(r, &s, &n))
        return -1;
    for (i = 0; i < 4; i++) {
        if (n == strlen(names[i]) && memcmp(s, names[i], n) == 0) {
            *a = (sentinel_action)i;
            return 0;
        }
    }
    return r_fail(r, "an unknown action");
}

/* Bits of the required fields seen, per reply type. */
enum { F_ACTION = 1, F_SHA = 2, F_SIZE = 4, F_CODE = 1, F_MESSAGE = 2, F_SERVER = 1,
       F_VERSION = 2, F_MAXFRAME = 4 };

/* Returns 1 when the field was taken, 0 when it is not ours (skip it), -1 on error. */
static int scan_field(mp_r *r, const uint8_t *k, size_t n, sentinel_reply *out, unsigned *seen)
{
    if (KEY_IS(k, n, "action")) {
        r->at = "action";
        *seen |= F_ACTION;
        return decode_action(r, &out->scan.action) ? -1 : 1;
    }
    if (KEY_IS(k, n, "sha256")) {
        r->at = "sha256";
        *seen |= F_SHA;
        return r_str_copy(r, out->scan.sha256, sizeof out->scan.sha256) ? -1 : 1;
    }
    if (KEY_IS(k, n, "size")) {
        r->at = "size";
        *seen |= F_SIZE;
        return r_uint(r, &out->scan.size) ? -1 : 1;
    }
    if (KEY_IS(k, n, "matches")) {
        r->at = "matches";
        return decode_matches(r, out) ? -1 : 1;
    }
    if (KEY_IS(k, n, "rules_version")) {
        r->at = "rules_version";
        return r_str_copy(r, out->scan.rules_version, sizeof out->scan.rules_version) ? -1 : 1;
    }
    if (KEY_IS(k, n, "degraded")) {
        r->at = "degraded";
        return r_bool(r, &out->scan.degraded) ? -1 : 1;
    }
    if (KEY_IS(k, n, "scan_ms")) {
        r->at = "scan_ms";
        return r_float(r, &out->scan.scan_ms) ? -1 : 1;
    }
    if (KEY_IS(k, n, "policy_id")) {
        r->at = "policy_id";
        return r_opt_int(r, &out->scan.has_policy_id, &out->scan.policy_id) ? -1 : 1;
    }
    return 0;
}

static int error_field(mp_r *r, const uint8_t *k, size_t n, sentinel_reply *out, unsigned *seen)
{
    if (KEY_IS(k, n, "code")) {
        r->at = "code";
        *seen |= F_CODE;
        return r_str_copy(r, out->error.code, sizeof out->error.code) ? -1 : 1;
    }
    if (KEY_IS(k, n, "message")) {
        r->at = "message";
        *seen |= F_MESSAGE;
        return r_str_copy(r, out->error.message, sizeof out->error.message) ? -1 : 1;
    }
    if (KEY_IS(k, n, "retryable")) {
        r->at = "retryable";
        return r_bool(r, &out->error.retryable) ? -1 : 1;
    }
    if (KEY_IS(k, n, "retry_after_ms")) {
        int has = 0;
        int64_t ms = 0;
        r->at = "retry_after_ms";
        if (r_opt_int(r, &has, &ms))
            return -1;
        if (has && ms < 0)
            return r_fail(r, "expected a non-negative integer or nil");
        out->error.retry_after_ms = has ? ms : -1;
        return 1;
    }
    return 0;
}

static int welcome_field(mp_r *r, const uint8_t *k, size_t n, sentinel_reply *out, unsigned *seen)
{
    if (KEY_IS(k, n, "server")) {
        r->at = "server";
        *seen |= F_SERVER;
        return r_str_copy(r, out->welcome.server, sizeof out->welcome.server) ? -1 : 1;
    }
    if (KEY_IS(k, n, "protocol_version")) {
        r->at = "protocol_version";
        *seen |= F_VERSION;
        return r_uint(r, &out->welcome.protocol_version) ? -1 : 1;
    }
    if (KEY_IS(k, n, "max_frame_bytes")) {
        r->at = "max_frame_bytes";
        *seen |= F_MAXFRAME;
        return r_uint(r, &out->welcome.max_frame_bytes) ? -1 : 1;
    }
    if (KEY_IS(k, n, "limits")) {
        uint32_t i, nkeys;
        r->at = "limits";
        if (r_map(r, &nkeys))
            return -1;
        for (i = 0; i < nkeys; i++) {
            const uint8_t *lk;
            size_t ln;
            uint64_t ignored;
            if (r_key(r, &lk, &ln))
                return -1;
            if (KEY_IS(lk, ln, "max_in_flight_per_connection")) {
                if (r_uint(r, &out->welcome.max_in_flight_per_connection))
                    return -1;
            } else if (KEY_IS(lk, ln, "max_stream_bytes")) {
                if (r_uint(r, &out->welcome.max_stream_bytes))
                    return -1;
            } else if (KEY_IS(lk, ln, "max_frame_bytes")) {
                if (r_uint(r, &ignored)) /* the same figure as welcome.max_frame_bytes */
                    return -1;
            } else if (r_skip(r, 2)) {
                return -1;
            }
        }
        return 1;
    }
    return 0;
}

int sentinel_decode_reply(const uint8_t *payload, size_t len, sentinel_reply *out, char *errbuf,
                          size_t errbuf_len)
{
    mp_r r;
    uint32_t nkeys, i;
    const uint8_t *fields, *tag = NULL;
    size_t tag_len = 0;
    int have_id = 0;
    unsigned seen = 0, required = 0;

    if (out == NULL || (payload == NULL && len != 0))
        return SENTINEL_E_INVALID;
    memset(out, 0, sizeof *out);
    r.p = payload;
    r.end = payload + len;
    r.why = NULL;
    r.at = NULL;

    /* Pass 1: the whole value is well formed, and its `type` and `id`
     * (keys may come in any order). */
    if (len == 0) {
        r_fail(&r, "empty frame");
        goto bad;
    }
    {
        mp_val top;
        if (r_head(&r, &top))
            goto bad;
        if (top.kind != MP_MAP) {
            r_fail(&r, "the reply is not a map");
            goto bad;
        }
        nkeys = top.len;
    }
    fields = r.p;
    for (i = 0; i < nkeys; i++) {
        const uint8_t *k;
        size_t kn;
        if (r_key(&r, &k, &kn))
            goto bad;
        if (KEY_IS(k, kn, "type")) {
            r.at = "type";
            if (r_str(&r, &tag, &tag_len))
                goto bad;
        } else if (KEY_IS(k, kn, "id")) {
            r.at = "id";
            if (r_uint(&r, &out->id))
                goto bad;
            have_id = 1;
        } else if (r_skip(&r, 1)) {
            goto bad;
        }
        r.at = NULL;
    }
    if (r.p != r.end) {
        r_fail(&r, "trailing bytes after the reply");
        goto bad;
    }
    if (tag == NULL) {
        r_fail(&r, "no `type` field");
        goto bad;
    }
    if (!have_id) {
        r_fail(&r, "no `id` field");
        goto bad;
    }
    copy_str(out->type, sizeof out->type, tag, tag_len);
    if (KEY_IS(tag, tag_len, "scan_result")) {
        out->kind = SENTINEL_REPLY_SCAN_RESULT;
        required = F_ACTION | F_SHA | F_SIZE;
    } else if (KEY_IS(tag, tag_len, "error")) {
        out->kind = SENTINEL_REPLY_ERROR;
        out->error.retry_after_ms = -1;
        required = F_CODE | F_MESSAGE;
    } else if (KEY_IS(tag, tag_len, "welcome")) {
        out->kind = SENTINEL_REPLY_WELCOME;
        out->welcome.max_in_flight_per_connection = 64;
        out->welcome.max_stream_bytes = 512u * 1024u * 1024u;
        required = F_SERVER | F_VERSION | F_MAXFRAME;
    } else {
        out->kind = SENTINEL_REPLY_OTHER;
        return SENTINEL_OK;
    }

    /* Pass 2: the fields of the types we interpret; the rest is skipped. */
    r.p = fields;
    for (i = 0; i < nkeys; i++) {
        const uint8_t *k;
        size_t kn;
        int taken;
        if (r_key(&r, &k, &kn))
            goto bad;
        if (out->kind == SENTINEL_REPLY_SCAN_RESULT)
            taken = scan_field(&r, k, kn, out, &seen);
        else if (out->kind == SENTINEL_REPLY_ERROR)
            taken = error_field(&r, k, kn, out, &seen);
        else
            taken = welcome_field(&r, k, kn, out, &seen);
        if (taken < 0)
            goto bad;
        r.at = NULL;
        if (taken == 0 && r_skip(&r, 1))
            goto bad;
    }
    if ((seen & required) != required) {
        set_errbuf(errbuf, errbuf_len, "invalid '%s' reply: a required field is missing",
                   out->type);
        return SENTINEL_E_PROTOCOL;
    }
    return SENTINEL_OK;

bad:
    if (r.at != NULL)
        set_errbuf(errbuf, errbuf_len, "undecodable reply: %s - at `$.%s`", r.why, r.at);
    else
        set_errbuf(errbuf, errbuf_len, "undecodable reply: %s", r.why);
    return SENTINEL_E_PROTOCOL;
}

/* ---- the socket layer -------------------------------------------------- */

const char *sentinel_strerror(int code)
{
    switch (code) {
    case SENTINEL_OK: return "success";
    case SENTINEL_E_CONNECT: return "cannot connect to sentineld";
    case SENTINEL_E_PROTOCOL: return "protocol error";
    case SENTINEL_E_FRAME_TOO_LARGE: return "frame too large";
    case SENTINEL_E_TRUNCATED: return "connection closed inside a frame";
    case SENTINEL_E_VERSION: return "protocol version mismatch";
    case SENTINEL_E_NOMEM: return "out of memory";
    case SENTINEL_E_IO: return "I/O error";
    case SENTINEL_E_CLOSED: return "connection closed by sentineld";
    case SENTINEL_E_TIMEOUT: return "timed out";
    case SENTINEL_E_REFUSED: return "sentineld refused the connection";
    case SENTINEL_E_INVALID: return "invalid argument";
    default: return "unknown error";
    }
}

const char *sentinel_action_name(sentinel_action action)
{
    switch (action) {
    case SENTINEL_ALLOW: return "allow";
    case SENTINEL_WARN: return "warn";
    case SENTINEL_QUARANTINE: return "quarantine";
    case SENTINEL_BLOCK: return "block";
    default: return "unknown";
    }
}

const char *sentinel_conn_error(const sentinel_conn *conn) { return conn ? conn->err : ""; }

const sentinel_reply *sentinel_welcome(const sentinel_conn *conn) { return &conn->welcome; }

int sentinel_fileno(const sentinel_conn *conn) { return conn->fd; }

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Python's tempfile.gettempdir(), near enough: the first of $TMPDIR, $TEMP,
 * $TMP, /tmp, /var/tmp, /usr/tmp that is a writable directory. */
static const char *temp_dir(void)
{
    static const char *const envs[] = {"TMPDIR", "TEMP", "TMP"};
    static const char *const dirs[] = {"/tmp", "/var/tmp", "/usr/tmp"};
    size_t i;
    for (i = 0; i < 3; i++) {
        const char *d = getenv(envs[i]);
        if (d != NULL && *d != '\0' && is_dir(d) && access(d, W_OK | X_OK) == 0)
            return d;
    }
    for (i = 0; i < 3; i++)
        if (is_dir(dirs[i]) && access(dirs[i], W_OK | X_OK) == 0)
            return dirs[i];
    return "/tmp";
}

/* The same default as sentinel_ipc.config.default_socket_path(). */
static int default_socket_path(char *buf, size_t cap)
{
    const char *env = getenv("SENTINEL_SOCKET");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    int n;
    if (env != NULL && *env != '\0')
        n = snprintf(buf, cap, "%s", env);
    else if (runtime != NULL && *runtime != '\0' && is_dir(runtime))
        n = snprintf(buf, cap, "%s/sentinel/sentinel.sock", runtime);
    else
        n = snprintf(buf, cap, "%s/sentinel-%lu/sentinel.sock", temp_dir(),
                     (unsigned long)getuid());
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

int sentinel_set_timeout(sentinel_conn *conn, int timeout_ms)
{
    struct timeval tv;
    if (timeout_ms < 0)
        return SENTINEL_E_INVALID;
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
    /* Kernel timeouts, not poll(): no extra system call per read or write. */
    if (setsockopt(conn->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        setsockopt(conn->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
        return conn_fail(conn, SENTINEL_E_IO, "setsockopt: %s", strerror(errno));
    return SENTINEL_OK;
}

static int io_error(sentinel_conn *c, const char *what, int err)
{
    if (err == EAGAIN || err == EWOULDBLOCK)
        return conn_break(c, conn_fail(c, SENTINEL_E_TIMEOUT, "%s: no progress within the timeout",
                                       what));
    if (err == EPIPE || err == ECONNRESET)
        return conn_break(c, conn_fail(c, SENTINEL_E_CLOSED, "%s: the daemon closed the connection (%s)",
                                       what, strerror(err)));
    return conn_break(c, conn_fail(c, SENTINEL_E_IO, "%s: %s", what, strerror(err)));
}

/* Write one frame; with fd >= 0 the descriptor rides with its first byte.
 * A short write is finished with plain send()s (the descriptor went with
 * the first). MSG_NOSIGNAL: a closed peer is an error code, not SIGPIPE
 * killing the host program. */
static int send_frame(sentinel_conn *c, const uint8_t *buf, size_t len, int fd)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n;
        if (off == 0 && fd >= 0) {
            struct msghdr msg;
            struct iovec iov;
            union {
                char space[CMSG_SPACE(sizeof(int))];
                struct cmsghdr align;
            } control;
            struct cmsghdr *cmsg;
            memset(&msg, 0, sizeof msg);
            memset(&control, 0, sizeof control);
            iov.iov_base = (void *)buf;
            iov.iov_len = len;
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.space;
            msg.msg_controllen = sizeof control.space;
            cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
            n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        } else {
            n = send(c->fd, buf + off, len - off, MSG_NOSIGNAL);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return io_error(c, "write", errno);
        }
        if (n == 0)
            return io_error(c, "write", EPIPE);
        off += (size_t)n;
    }
    return SENTINEL_OK;
}

/* Read what is available (at least one byte) after the buffered bytes. */
static int fill(sentinel_conn *c, size_t need)
{
    ssize_t n;
    if (c->rstart > 0) { /* less than one frame is buffered: cheap to move */
        memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
        c->rend -= c->rstart;
        c->rstart = 0;
    }
    if (need > c->rcap) { /* a frame larger than the buffer, already judged <= limit */
        uint8_t *bigger = realloc(c->rbuf, need);
        if (bigger == NULL)
            return conn_break(c, conn_fail(c, SENTINEL_E_NOMEM,
                                           "no memory for a %zu-byte reply", need));
        c->rbuf = bigger;
        c->rcap = need;
    }
    for (;;) {
        n = read(c->fd, c->rbuf + c->rend, c->rcap - c->rend);
        if (n > 0) {
            c->rend += (size_t)n;
            return SENTINEL_OK;
        }
        if (n == 0) {
            if (c->rend > 0)
                return conn_break(c, conn_fail(c, SENTINEL_E_TRUNCATED,
                                               "connection closed inside a frame "
                                               "(%zu of %zu bytes received)",
                                               c->rend, need));
            return conn_break(c, conn_fail(c, SENTINEL_E_CLOSED,
                                           "the daemon closed the connection"));
        }
        if (errno != EINTR)
            return io_error(c, "read", errno);
    }
}

int sentinel_reply_buffered(const sentinel_conn *c)
{
    size_t avail = c->rend - c->rstart;
    if (c->broken)
        return 1; /* sentinel_read_reply() returns the failure at once */
    if (avail < HEADER_SIZE)
        return 0;
    {
        uint32_t len = get_be32(c->rbuf + c->rstart);
        return len > c->max_frame || avail - HEADER_SIZE >= len;
    }
}

int sentinel_read_reply(sentinel_conn *c, sentinel_reply *out)
{
    if (c == NULL || out == NULL)
        return SENTINEL_E_INVALID;
    if (c->broken)
        return c->broken;
    for (;;) {
        size_t avail = c->rend - c->rstart, need = HEADER_SIZE;
        int rc;
        if (avail >= HEADER_SIZE) {
            uint32_t len = get_be32(c->rbuf + c->rstart);
            /* Judged from the header alone, before any allocation. */
            if (len > c->max_frame)
                return conn_break(c, conn_fail(c, SENTINEL_E_FRAME_TOO_LARGE,
                                               "reply frame of %lu bytes exceeds the limit of "
                                               "%lu bytes", (unsigned long)len,
                                               (unsigned long)c->max_frame));
            need = HEADER_SIZE + (size_t)len;
            if (avail >= need) {
                rc = sentinel_decode_reply(c->rbuf + c->rstart + HEADER_SIZE, len, out, c->err,
                                           sizeof c->err);
                c->rstart += need;
                if (c->rstart == c->rend)
                    c->rstart = c->rend = 0;
                return rc == SENTINEL_OK ? rc : conn_break(c, rc);
            }
        }
        rc = fill(c, need);
        if (rc != SENTINEL_OK)
            return rc;
    }
}

/* Encode into the connection's write buffer, growing it once if needed. */
static int encode_scan_fd(sentinel_conn *c, size_t *len, uint64_t id, const char *filename,
                          const char *url, const char *mime_type)
{
    int rc = sentinel_encode_scan_fd(c->wbuf, c->wcap, len, id, filename, url, mime_type);
    if (rc == SENTINEL_E_NOMEM) {
        uint8_t *bigger = realloc(c->wbuf, *len);
        if (bigger == NULL)
            return conn_fail(c, SENTINEL_E_NOMEM, "no memory for a %zu-byte request", *len);
        c->wbuf = bigger;
        c->wcap = *len;
        rc = sentinel_encode_scan_fd(c->wbuf, c->wcap, len, id, filename, url, mime_type);
    }
    if (rc == SENTINEL_E_INVALID)
        return conn_fail(c, rc, "scan_fd: filename, url and mime_type must be valid UTF-8");
    return rc;
}

int sentinel_send_scan_fd(sentinel_conn *c, uint64_t id, int fd, const char *filename,
                          const char *url, const char *mime_type)
{
    size_t len;
    int rc;
    if (c == NULL)
        return SENTINEL_E_INVALID;
    if (c->broken)
        return c->broken;
    if (id == 0)
        return conn_fail(c, SENTINEL_E_INVALID, "request id 0 is reserved");
    if (fd < 0)
        return conn_fail(c, SENTINEL_E_INVALID, "scan_fd needs a file descriptor");
    rc = encode_scan_fd(c, &len, id, filename, url, mime_type);
    if (rc != SENTINEL_OK)
        return rc;
    if (len - HEADER_SIZE > c->max_frame)
        return conn_fail(c, SENTINEL_E_INVALID, "a %zu-byte request exceeds the daemon's frame "
                         "limit", len - HEADER_SIZE);
    return send_frame(c, c->wbuf, len, fd);
}

int sentinel_scan_fd(sentinel_conn *c, int fd, const char *filename, sentinel_reply *out)
{
    uint64_t id;
    int rc;
    if (c == NULL || out == NULL)
        return SENTINEL_E_INVALID;
    id = c->next_id++;
    if (id == 0)
        id = c->next_id++;
    rc = sentinel_send_scan_fd(c, id, fd, filename, NULL, NULL);
    if (rc != SENTINEL_OK)
        return rc;
    for (;;) {
        rc = sentinel_read_reply(c, out);
        if (rc != SENTINEL_OK)
            return rc;
        if (out->id == id)
            return SENTINEL_OK;
        if (out->id == 0 && out->kind == SENTINEL_REPLY_ERROR) {
            /* A connection-level error (e.g. shutting down): ours will not come. */
            return conn_break(c, conn_fail(c, SENTINEL_E_CLOSED, "sentineld: %s: %s",
                                           out->error.code, out->error.message));
        }
    }
}

void sentinel_close(sentinel_conn *conn)
{
    if (conn == NULL)
        return;
    if (conn->fd >= 0)
        close(conn->fd);
    free(conn->rbuf);
    free(conn->wbuf);
    free(conn);
}

/* hello -> welcome, on a fresh connection. */
static int handshake(sentinel_conn *c, const char *client)
{
    sentinel_reply reply;
    size_t len;
    uint64_t id = c->next_id++;
    int rc = sentinel_encode_hello(c->wbuf, c->wcap, &len, id, client, NULL, 0);
    if (rc == SENTINEL_E_NOMEM) {
        uint8_t *bigger = realloc(c->wbuf, len);
        if (bigger == NULL)
            return conn_fail(c, SENTINEL_E_NOMEM, "out of memory");
        c->wbuf = bigger;
        c->wcap = len;
        rc = sentinel_encode_hello(c->wbuf, c->wcap, &len, id, client, NULL, 0);
    }
    if (rc == SENTINEL_E_INVALID)
        return conn_fail(c, rc, "the client name must be valid UTF-8");
    if (rc == SENTINEL_OK)
        rc = send_frame(c, c->wbuf, len, -1);
    if (rc == SENTINEL_OK)
        rc = sentinel_read_reply(c, &reply);
    if (rc != SENTINEL_OK)
        return rc;
    if (reply.kind == SENTINEL_REPLY_ERROR)
        return conn_fail(c, SENTINEL_E_REFUSED, "sentineld answered hello with error %s: %s%s",
                         reply.error.code, reply.error.message,
                         reply.error.retryable ? " (retryable)" : "");
    if (reply.kind != SENTINEL_REPLY_WELCOME || reply.id != id)
        return conn_fail(c, SENTINEL_E_PROTOCOL, "expected welcome with id %lu, got %s with id %lu",
                         (unsigned long)id, reply.type, (unsigned long)reply.id);
    if (reply.welcome.protocol_version != SENTINEL_PROTOCOL_VERSION)
        return conn_fail(c, SENTINEL_E_VERSION,
                         "sentineld speaks protocol version %lu; this client speaks %d",
                         (unsigned long)reply.welcome.protocol_version, SENTINEL_PROTOCOL_VERSION);
    if (reply.welcome.max_frame_bytes < 64)
        return conn_fail(c, SENTINEL_E_PROTOCOL, "welcome announces an unusable max_frame_bytes "
                         "of %lu", (unsigned long)reply.welcome.max_frame_bytes);
    c->welcome = reply;
    c->max_frame = reply.welcome.max_frame_bytes > 0xFFFFFFFFu
                       ? 0xFFFFFFFFu
                       : (uint32_t)reply.welcome.max_frame_bytes;
    return SENTINEL_OK;
}

int sentinel_connect(sentinel_conn **out, const char *socket_path, const char *client_name,
                     char *errbuf, size_t errbuf_len)
{
    struct sockaddr_un addr;
    char path[sizeof addr.sun_path];
    sentinel_conn *c;
    int rc;

    if (out == NULL) {
        set_errbuf(errbuf, errbuf_len, "sentinel_connect: out is NULL");
        return SENTINEL_E_INVALID;
    }
    *out = NULL;
    if (socket_path == NULL) {
        if (default_socket_path(path, sizeof path) != 0) {
            set_errbuf(errbuf, errbuf_len, "the default socket path is too long");
            return SENTINEL_E_INVALID;
        }
    } else if (strlen(socket_path) >= sizeof path) {
        set_errbuf(errbuf, errbuf_len, "socket path too long (at most %zu bytes): %s",
                   sizeof path - 1, socket_path);
        return SENTINEL_E_INVALID;
    } else {
        strcpy(path, socket_path);
    }

    c = calloc(1, sizeof *c);
    if (c == NULL || (c->rbuf = malloc(RBUF_INITIAL)) == NULL ||
        (c->wbuf = malloc(WBUF_INITIAL)) == NULL) {
        set_errbuf(errbuf, errbuf_len, "out of memory");
        if (c != NULL)
            free(c->rbuf);
        free(c);
        return SENTINEL_E_NOMEM;
    }
    c->rcap = RBUF_INITIAL;
    c->wcap = WBUF_INITIAL;
    c->next_id = 1;
    c->max_frame = SENTINEL_DEFAULT_MAX_FRAME;
    c->welcome.welcome.max_frame_bytes = SENTINEL_DEFAULT_MAX_FRAME;

#ifdef SOCK_CLOEXEC
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
#else
    c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c->fd >= 0)
        (void)fcntl(c->fd, F_SETFD, FD_CLOEXEC);
#endif
    if (c->fd < 0) {
        rc = conn_fail(c, SENTINEL_E_CONNECT, "socket: %s", strerror(errno));
        goto fail;
    }
    rc = sentinel_set_timeout(c, SENTINEL_CONNECT_TIMEOUT_MS);
    if (rc != SENTINEL_OK)
        goto fail;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, strlen(path) + 1);
    while (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (errno == EINTR)
            continue;
        if (errno == EISCONN) /* an interrupted connect completed meanwhile */
            break;
        rc = conn_fail(c, SENTINEL_E_CONNECT, "cannot connect to %s: %s", path,
                       errno == EAGAIN ? "timed out (the daemon's backlog is full)"
                                       : strerror(errno));
        goto fail;
    }
    rc = handshake(c, client_name != NULL ? client_name : "sentinel-c");
    if (rc == SENTINEL_OK)
        rc = sentinel_set_timeout(c, SENTINEL_DEFAULT_TIMEOUT_MS);
    if (rc != SENTINEL_OK)
        goto fail;
    c->err[0] = '\0';
    *out = c;
    return SENTINEL_OK;

fail:
    set_errbuf(errbuf, errbuf_len, "%s", c->err);
    sentinel_close(c);
    return rc;
}
