/*
 * sentinel-decode - a test helper for the C client's sans-I/O layer.
 *
 *   sentinel-decode < FRAME
 *       decode one complete frame (length header included) read from stdin
 *       and print the reply's fields, one `key=value` per line; exit 2 with a
 *       message on stderr when the frame is refused.
 *   sentinel-decode --scan FILE
 *       connect to the default socket (sentinel_connect with a NULL path:
 *       $SENTINEL_SOCKET, $XDG_RUNTIME_DIR, the temp dir), scan FILE with the
 *       blocking sentinel_scan_fd() and print the reply's fields.
 *   sentinel-decode --encode-hello ID CLIENT [CAPABILITY...]
 *   sentinel-decode --encode-scan-fd ID URL FILENAME MIME_TYPE
 *       print the frame the library encodes, as hex; `:nil` stands for NULL.
 *
 * tests/test_c_client.py runs it against protocol/vectors.json.
 */
#define _POSIX_C_SOURCE 200809L

#include "sentinel_client.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *arg_or_null(const char *s) { return strcmp(s, ":nil") == 0 ? NULL : s; }

static int parse_id(const char *s, uint64_t *id)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0')
        return -1;
    *id = (uint64_t)v;
    return 0;
}

static int print_hex(const uint8_t *buf, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++)
        printf("%02x", buf[i]);
    putchar('\n');
    return 0;
}

static int encode(int argc, char **argv)
{
    uint8_t buf[4096];
    size_t len = 0;
    uint64_t id;
    int rc;
    if (argc < 4 || parse_id(argv[2], &id) != 0) {
        fprintf(stderr, "usage: see the header of sentinel-decode.c\n");
        return 64;
    }
    if (strcmp(argv[1], "--encode-hello") == 0) {
        rc = sentinel_encode_hello(buf, sizeof buf, &len, id, argv[3],
                                   (const char *const *)(argv + 4), (size_t)(argc - 4));
    } else if (strcmp(argv[1], "--encode-scan-fd") == 0 && argc == 6) {
        rc = sentinel_encode_scan_fd(buf, sizeof buf, &len, id, arg_or_null(argv[4]),
                                     arg_or_null(argv[3]), arg_or_null(argv[5]));
    } else {
        fprintf(stderr, "usage: see the header of sentinel-decode.c\n");
        return 64;
    }
    if (rc != SENTINEL_OK) {
        fprintf(stderr, "sentinel-decode: %s (needs %zu bytes)\n", sentinel_strerror(rc), len);
        return 2;
    }
    return print_hex(buf, len);
}

static void print_reply(const sentinel_reply *r)
{
    size_t i;
    printf("type=%s\nid=%llu\n", r->type, (unsigned long long)r->id);
    switch (r->kind) {
    case SENTINEL_REPLY_SCAN_RESULT:
        printf("kind=scan_result\naction=%s\nsha256=%s\nsize=%llu\ndegraded=%d\nscan_ms=%.17g\n"
               "rules_version=%s\nmatch_count=%zu\n",
               sentinel_action_name(r->scan.action), r->scan.sha256,
               (unsigned long long)r->scan.size, r->scan.degraded, r->scan.scan_ms,
               r->scan.rules_version, r->scan.match_count);
        for (i = 0; i < r->scan.rule_count; i++)
            printf("rule=%s\n", r->scan.rules[i]);
        if (r->scan.has_policy_id)
            printf("policy_id=%lld\n", (long long)r->scan.policy_id);
        else
            printf("policy_id=nil\n");
        break;
    case SENTINEL_REPLY_ERROR:
        printf("kind=error\ncode=%s\nmessage=%s\nretryable=%d\n", r->error.code, r->error.message,
               r->error.retryable);
        if (r->error.retry_after_ms >= 0)
            printf("retry_after_ms=%lld\n", (long long)r->error.retry_after_ms);
        else
            printf("retry_after_ms=nil\n");
        break;
    case SENTINEL_REPLY_WELCOME:
        printf("kind=welcome\nserver=%s\nprotocol_version=%llu\nmax_frame_bytes=%llu\n"
               "max_in_flight_per_connection=%llu\nmax_stream_bytes=%llu\n",
               r->welcome.server, (unsigned long long)r->welcome.protocol_version,
               (unsigned long long)r->welcome.max_frame_bytes,
               (unsigned long long)r->welcome.max_in_flight_per_connection,
               (unsigned long long)r->welcome.max_stream_bytes);
        break;
    default:
        printf("kind=other\n");
        break;
    }
}

static int scan(const char *path)
{
    sentinel_conn *conn;
    sentinel_reply reply;
    char err[SENTINEL_ERRMSG_MAX];
    const char *base = strrchr(path, '/');
    int fd, rc = sentinel_connect(&conn, NULL, "sentinel-decode", err, sizeof err);
    if (rc != SENTINEL_OK) {
        fprintf(stderr, "sentinel-decode: %s: %s\n", sentinel_strerror(rc), err);
        return 2;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror(path);
        sentinel_close(conn);
        return 2;
    }
    rc = sentinel_scan_fd(conn, fd, base != NULL ? base + 1 : path, &reply);
    close(fd);
    if (rc != SENTINEL_OK) {
        fprintf(stderr, "sentinel-decode: %s: %s\n", sentinel_strerror(rc),
                sentinel_conn_error(conn));
        sentinel_close(conn);
        return 2;
    }
    print_reply(&reply);
    sentinel_close(conn);
    return 0;
}

int main(int argc, char **argv)
{
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    uint32_t body;
    sentinel_reply reply;
    char err[SENTINEL_ERRMSG_MAX];
    int rc;

    if (argc == 3 && strcmp(argv[1], "--scan") == 0)
        return scan(argv[2]);
    if (argc > 1)
        return encode(argc, argv);
    for (;;) {
        size_t got;
        if (len == cap) {
            uint8_t *bigger = realloc(buf, cap ? 2 * cap : 4096);
            if (bigger == NULL) {
                free(buf);
                fprintf(stderr, "sentinel-decode: out of memory\n");
                return 2;
            }
            buf = bigger;
            cap = cap ? 2 * cap : 4096;
        }
        got = fread(buf + len, 1, cap - len, stdin);
        if (got == 0)
            break;
        len += got;
    }
    if (len < 4) {
        fprintf(stderr, "sentinel-decode: truncated header (%zu bytes)\n", len);
        free(buf);
        return 2;
    }
    body = ((uint32_t)buf[0] << 24) | ((uint32_t)buf[1] << 16) | ((uint32_t)buf[2] << 8) | buf[3];
    if (body != len - 4) {
        fprintf(stderr, "sentinel-decode: the header says %lu bytes, %zu follow\n",
                (unsigned long)body, len - 4);
        free(buf);
        return 2;
    }
    rc = sentinel_decode_reply(buf + 4, body, &reply, err, sizeof err);
    free(buf);
    if (rc != SENTINEL_OK) {
        fprintf(stderr, "sentinel-decode: %s: %s\n", sentinel_strerror(rc), err);
        return 2;
    }
    print_reply(&reply);
    return 0;
}
