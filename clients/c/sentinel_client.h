/*
 * sentinel_client.h - a small C99 client for sentineld (protocol version 1).
 *
 * Why this exists: a browser (or any C/C++ program that handles downloads)
 * should be able to ask sentineld for a verdict without embedding Python.
 * The library depends on libc and POSIX only.
 *
 * Theory of operation
 * -------------------
 * One `sentinel_conn` is one Unix-socket connection to the daemon. It holds
 * one read buffer that is reused for every reply and one write buffer for
 * requests; nothing is allocated per request once they have grown to size.
 *
 *   sentinel_connect()        socket + connect, `hello` -> `welcome`
 *   sentinel_send_scan_fd()   one `scan_fd` frame, the descriptor in the same
 *                             sendmsg() as SCM_RIGHTS (so the daemon never
 *                             opens a path on our behalf)
 *   sentinel_read_reply()     the next reply frame, decoded; replies may come
 *                             out of order: match them to requests by `id`
 *   sentinel_scan_fd()        the blocking convenience: send, then read until
 *                             the reply with that id
 *
 * Every peer input is bounded: a frame's 4-byte length header is judged
 * before anything is allocated (1 MiB before `welcome`, then the daemon's
 * `max_frame_bytes`), every MessagePack length is checked against the bytes
 * left in the frame, and nesting deeper than SENTINEL_MAX_DEPTH is refused.
 * A malformed or hostile reply yields an error code, never a crash.
 *
 * The lower layer (sentinel_encode_*, sentinel_decode_reply) does no I/O,
 * for callers that drive the socket from their own event loop.
 *
 * Threads: a connection is NOT thread-safe; use it from one thread at a time
 * (or one connection per thread). There is no global state.
 *
 * Errors: every function that can fail returns 0 or a negative
 * SENTINEL_E_* code; sentinel_strerror() names the category and
 * sentinel_conn_error() the detail of the last failure on a connection.
 */
#ifndef SENTINEL_CLIENT_H
#define SENTINEL_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The protocol version this client speaks (sent in `hello`, required in `welcome`). */
#define SENTINEL_PROTOCOL_VERSION 1

/* Largest reply frame accepted before `welcome` announced the daemon's limit. */
#define SENTINEL_DEFAULT_MAX_FRAME (1024u * 1024u)

/* Deepest nesting of MessagePack arrays/maps accepted in a reply. Replies
 * nest at most 4 deep today (scan_result.matches[].meta.<value>); the margin
 * leaves room for `any` values in RuleMatch.meta. */
#define SENTINEL_MAX_DEPTH 32

/* How many rule names a scan_result copies (all matches are counted). */
#define SENTINEL_MAX_RULES 8

/* Sizes of the fixed buffers in sentinel_reply (each includes the NUL).
 * Longer strings from the daemon are truncated, never overrun. */
#define SENTINEL_TYPE_MAX 32
#define SENTINEL_SHA256_MAX 65
#define SENTINEL_RULE_MAX 128
#define SENTINEL_VERSION_MAX 64
#define SENTINEL_CODE_MAX 32
#define SENTINEL_MESSAGE_MAX 256
#define SENTINEL_ERRMSG_MAX 256

/* Timeouts (milliseconds). connect + hello/welcome are bounded by the first;
 * afterwards every wait for the socket is bounded by the second, which is
 * long because a scan may queue behind others (sentinel_set_timeout()). */
#define SENTINEL_CONNECT_TIMEOUT_MS 10000
#define SENTINEL_DEFAULT_TIMEOUT_MS 120000

enum sentinel_status {
    SENTINEL_OK = 0,
    SENTINEL_E_CONNECT = -1,         /* socket/connect failed (no daemon, no permission) */
    SENTINEL_E_PROTOCOL = -2,        /* the peer sent something that is not a valid reply */
    SENTINEL_E_FRAME_TOO_LARGE = -3, /* a length header over the limit (refused unread) */
    SENTINEL_E_TRUNCATED = -4,       /* the peer closed in the middle of a frame */
    SENTINEL_E_VERSION = -5,         /* `welcome` names a protocol version we do not speak */
    SENTINEL_E_NOMEM = -6,           /* out of memory */
    SENTINEL_E_IO = -7,              /* read/write failed (the errno is in the detail) */
    SENTINEL_E_CLOSED = -8,          /* the peer closed the connection between frames */
    SENTINEL_E_TIMEOUT = -9,         /* no progress on the socket within the timeout */
    SENTINEL_E_REFUSED = -10,        /* the daemon answered `hello` with an `error` */
    SENTINEL_E_INVALID = -11         /* a bad argument (id 0, not UTF-8, path too long) */
};

typedef enum sentinel_action {
    SENTINEL_ALLOW = 0,
    SENTINEL_WARN = 1,
    SENTINEL_QUARANTINE = 2,
    SENTINEL_BLOCK = 3
} sentinel_action;

typedef enum sentinel_reply_kind {
    SENTINEL_REPLY_SCAN_RESULT = 1, /* fields in .scan */
    SENTINEL_REPLY_ERROR = 2,       /* fields in .error */
    SENTINEL_REPLY_WELCOME = 3,     /* fields in .welcome */
    SENTINEL_REPLY_OTHER = 4        /* any other type: only .type and .id are set */
} sentinel_reply_kind;

/* One decoded reply. Plain data, no pointers into library buffers: it stays
 * valid after the next call. Fields not listed for a kind are zero. */
typedef struct sentinel_reply {
    sentinel_reply_kind kind;
    uint64_t id;                  /* the request's id (0: a connection-level error) */
    char type[SENTINEL_TYPE_MAX]; /* the wire `type` tag, e.g. "scan_result" */
    struct {
        sentinel_action action;
        char sha256[SENTINEL_SHA256_MAX]; /* lower-case hex */
        uint64_t size;                    /* bytes scanned */
        int degraded;                     /* 1: decided in degraded mode */
        double scan_ms;
        char rules_version[SENTINEL_VERSION_MAX];
        size_t match_count;               /* all matches */
        size_t rule_count;                /* names copied: min(match_count, SENTINEL_MAX_RULES) */
        char rules[SENTINEL_MAX_RULES][SENTINEL_RULE_MAX];
        int has_policy_id;
        int64_t policy_id;                /* the policy that decided, if has_policy_id */
    } scan;
    struct {
        char code[SENTINEL_CODE_MAX];       /* e.g. "busy", "bad_fd"; unknown codes are possible */
        char message[SENTINEL_MESSAGE_MAX];
        int retryable;
        int64_t retry_after_ms;             /* -1 when the daemon sent nil */
    } error;
    struct {
        char server[SENTINEL_VERSION_MAX];
        uint64_t protocol_version;
        uint64_t max_frame_bytes;
        uint64_t max_in_flight_per_connection; /* from `limits` (64 if absent) */
        uint64_t max_stream_bytes;             /* from `limits` */
    } welcome;
} sentinel_reply;

typedef struct sentinel_conn sentinel_conn;

/*
 * Connect to sentineld and say hello.
 *
 * socket_path: NULL for the default, the same as the Python library's:
 *   $SENTINEL_SOCKET, else $XDG_RUNTIME_DIR/sentinel/sentinel.sock when
 *   $XDG_RUNTIME_DIR is a directory, else <tmp>/sentinel-<uid>/sentinel.sock
 *   (<tmp>: $TMPDIR, $TEMP or $TMP if a writable directory, else /tmp).
 * client_name: sent in `hello` (e.g. "chromium/126"); NULL: "sentinel-c".
 * errbuf: optional; on failure it receives a line for a person (what failed
 *   and why), since there is no connection object to ask.
 *
 * Returns 0 and sets *out, or a negative code (*out is NULL). A daemon that
 * answers `hello` with `error` gives SENTINEL_E_REFUSED (its code and message
 * are in errbuf); a `welcome` with another protocol version, SENTINEL_E_VERSION.
 */
int sentinel_connect(sentinel_conn **out, const char *socket_path, const char *client_name,
                     char *errbuf, size_t errbuf_len);

/* The limits the daemon announced in `welcome` (kind SENTINEL_REPLY_WELCOME). */
const sentinel_reply *sentinel_welcome(const sentinel_conn *conn);

/* Bound every later wait on the socket to timeout_ms (0: wait forever). */
int sentinel_set_timeout(sentinel_conn *conn, int timeout_ms);

/*
 * Send one `scan_fd` request: the frame and `fd` (as SCM_RIGHTS) leave in one
 * sendmsg(), as the protocol requires. The daemon reads the file through its
 * own copy of the descriptor from offset 0 (the caller's offset is untouched)
 * and closes its copy before it replies; the caller keeps `fd` and may close
 * it at once. `fd` must be a readable regular file or memfd, else the reply
 * is an error `bad_fd`.
 *
 * id: chosen by the caller, nonzero, unique among its requests in flight.
 * filename, url, mime_type: optional (NULL), UTF-8; only a base name should
 *   go in `filename` (rules may look at it; the daemon never opens it).
 * Does not wait for the reply.
 */
int sentinel_send_scan_fd(sentinel_conn *conn, uint64_t id, int fd, const char *filename,
                          const char *url, const char *mime_type);

/*
 * Read and decode the next reply frame (blocking, bounded by the timeout).
 * Replies may arrive in any order; match out->id. Unknown fields are skipped.
 * A negative code means the connection can no longer be trusted: close it.
 */
int sentinel_read_reply(sentinel_conn *conn, sentinel_reply *out);

/* 1 when a complete reply frame is already buffered (sentinel_read_reply()
 * will not block), 0 otherwise: poll sentinel_fileno() only when this is 0. */
int sentinel_reply_buffered(const sentinel_conn *conn);

/* The socket, for poll()/epoll in a caller's event loop (do not read it). */
int sentinel_fileno(const sentinel_conn *conn);

/*
 * Blocking convenience: send `scan_fd` with a fresh id and read replies until
 * its own (other replies read meanwhile are dropped: do not mix with
 * pipelined sentinel_send_scan_fd() calls on the same connection).
 * Returns 0 with a SENTINEL_REPLY_SCAN_RESULT or SENTINEL_REPLY_ERROR in *out
 * (an error reply is not a failure of the call: check out->kind).
 */
int sentinel_scan_fd(sentinel_conn *conn, int fd, const char *filename, sentinel_reply *out);

/* Close the socket and free everything. NULL is accepted. */
void sentinel_close(sentinel_conn *conn);

/* A static description of a SENTINEL_E_* code. */
const char *sentinel_strerror(int code);

/* The detail of the last failure on conn ("" when none). */
const char *sentinel_conn_error(const sentinel_conn *conn);

/* Name of an action ("allow", "warn", "quarantine", "block"). */
const char *sentinel_action_name(sentinel_action action);

/* ---- The sans-I/O layer ------------------------------------------------ */

/*
 * Encode a complete frame (4-byte header included) into buf[0..cap).
 * Returns 0 and sets *len; when cap is too small, SENTINEL_E_NOMEM with *len
 * set to the size needed. Strings must be valid UTF-8 (SENTINEL_E_INVALID
 * otherwise: the daemon would answer `bad_frame` and close the connection).
 * The encoding is Sentinel's canonical one (`type` first, every field
 * present, nil for absent ones, `id` last), byte for byte the golden vectors.
 */
int sentinel_encode_hello(uint8_t *buf, size_t cap, size_t *len, uint64_t id,
                          const char *client, const char *const *capabilities,
                          size_t n_capabilities);
int sentinel_encode_scan_fd(uint8_t *buf, size_t cap, size_t *len, uint64_t id,
                            const char *filename, const char *url, const char *mime_type);

/*
 * Decode one frame's payload (the bytes after the length header).
 * Returns 0 or SENTINEL_E_PROTOCOL; errbuf (optional) says what was wrong.
 */
int sentinel_decode_reply(const uint8_t *payload, size_t len, sentinel_reply *out,
                          char *errbuf, size_t errbuf_len);

#ifdef __cplusplus
}
#endif

#endif /* SENTINEL_CLIENT_H */
