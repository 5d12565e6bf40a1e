/*
 * sentinel-scan - scan files through sentineld with the C client.
 *
 *   sentinel-scan [-s SOCKET] [-j DEPTH] [-q] [--stats] [--latencies OUT]
 *                 [--files-from LIST] FILE...
 *
 * Each file is opened read-only and passed to the daemon as a descriptor
 * (scan_fd); its path never crosses the socket, only its base name. Up to
 * DEPTH requests are in flight on one connection (pipelining, replies matched
 * by id), enough to keep the daemon's worker pool busy; it doubles as the
 * load generator of tools/bench_scan.py, so the per-file work is one open,
 * one sendmsg, a share of one read, one close.
 *
 * Output, one line per file as its reply arrives:
 *   <action> <sha256> <size> <filename>[ <rule>,<rule>...]
 *   error <code> <message> <filename>
 * --stats adds one line at the end:
 *   sentinel-scan: files=N bytes=N seconds=F errors=N matched=N degraded=N
 * (seconds: from the first request sent to the last reply, connect excluded).
 * --latencies OUT writes each verdict's latency in milliseconds, one per line
 * (from the file's first send to its scan_result, retries included), for
 * tools/bench_scan.py's p50/p99.
 *
 * Exit status: 0 every file allowed, 1 some verdict was not allow, 2 some
 * error (connect, protocol, a file that could not be opened or an error
 * reply), 64 usage.
 */
#define _POSIX_C_SOURCE 200809L

#include "sentinel_client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXIT_ALLOWED 0
#define EXIT_NOT_ALLOWED 1
#define EXIT_ERROR 2
#define EXIT_USAGE 64

#define DEFAULT_DEPTH 4
#define MAX_DEPTH 1024
/* A busy / rate_limited file is sent again at most this many times in all,
 * waiting what the daemon asks (or 50 ms doubling) but never over 2 s. */
#define MAX_ATTEMPTS 5
#define MAX_RETRY_WAIT_MS 2000
#define FIRST_BACKOFF_MS 50

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

struct slot {
    int busy;      /* holds a file: in flight, or waiting to be sent again */
    size_t file;   /* index in paths[]; the request id is file + 1 */
    int fd;
    int attempts;  /* times sent */
    double due;    /* > 0: waiting for a retry at this monotonic time */
    double sent;   /* monotonic time of the first send */
};

struct stats {
    size_t files, errors, matched, degraded, not_allowed;
    unsigned long long bytes;
    double first_send, last_reply; /* < 0 until set */
};

static const char *prog = "sentinel-scan";

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: %s [-s SOCKET] [-j DEPTH] [-q] [--stats] [--latencies OUT]\n"
            "       [--files-from LIST] FILE...\n"
            "  -s SOCKET          sentineld's socket (default: $SENTINEL_SOCKET, else\n"
            "                     $XDG_RUNTIME_DIR/sentinel/sentinel.sock, else\n"
            "                     <tmp>/sentinel-<uid>/sentinel.sock)\n"
            "  -j DEPTH           requests in flight on the connection (default %d)\n"
            "  -q                 no line per file\n"
            "  --stats            a summary line at the end\n"
            "  --latencies OUT    each verdict's latency in ms, one per line, into OUT\n"
            "  --files-from LIST  also scan the paths in LIST, one per line ('-': stdin)\n"
            "exit: 0 all allowed, 1 some not allowed, 2 an error, 64 usage\n",
            prog, DEFAULT_DEPTH);
}

/* Print s with control characters as '?', so one file is always one line. */
static void put_clean(const char *s)
{
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        putchar(ch < 0x20 || ch == 0x7f ? '?' : ch);
    }
}

/* Length of the valid UTF-8 sequence at s (0 if invalid); see the library's check. */
static size_t utf8_seq(const unsigned char *s, size_t left)
{
    unsigned c = s[0];
    size_t need, k;
    unsigned long cp, min;
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0)
        need = 1, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        need = 2, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        need = 3, cp = c & 0x07, min = 0x10000;
    else
        return 0;
    if (left - 1 < need)
        return 0;
    for (k = 1; k <= need; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return need + 1;
}

/* The base name to send as `filename`, as UTF-8 (a byte that is not becomes
 * '?': Linux names are bytes, the protocol's strings are not). NULL when the
 * path has no base name ("dir/"). */
static const char *wire_name(const char *path, char *buf, size_t cap)
{
    const char *base = strrchr(path, '/');
    const unsigned char *s;
    size_t left, out = 0;
    base = base != NULL ? base + 1 : path;
    if (*base == '\0')
        return NULL;
    s = (const unsigned char *)base;
    left = strlen(base);
    while (left > 0) {
        size_t n = utf8_seq(s, left);
        if (n == 0) {
            if (out + 1 >= cap)
                break;
            buf[out++] = '?';
            s++, left--;
        } else {
            if (out + n >= cap)
                break;
            memcpy(buf + out, s, n);
            out += n, s += n, left -= n;
        }
    }
    buf[out] = '\0';
    return buf;
}

/* The paths to scan: argv's, then LIST's lines (kept in one buffer). */
struct paths {
    const char **v;
    size_t n, cap;
    char **lists; /* each LIST file's contents, split in place */
    size_t n_lists;
};

static int add_path(struct paths *p, const char *path)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        const char **v = realloc((void *)p->v, cap * sizeof *v);
        if (v == NULL)
            return -1;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = path;
    return 0;
}

static int read_list(struct paths *p, const char *name)
{
    FILE *f = strcmp(name, "-") == 0 ? stdin : fopen(name, "r");
    size_t len = 0, cap = 1 << 16, got;
    char *buf, *line, *end;
    if (f == NULL) {
        fprintf(stderr, "%s: --files-from %s: %s\n", prog, name, strerror(errno));
        return -1;
    }
    buf = malloc(cap);
    for (;;) {
        if (buf == NULL) {
            fprintf(stderr, "%s: out of memory reading %s\n", prog, name);
            goto fail;
        }
        got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0)
            break;
        if (len == cap - 1) {
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL)
                free(buf);
            buf = bigger;
            cap *= 2;
        }
    }
    if (ferror(f)) {
        fprintf(stderr, "%s: --files-from %s: read error\n", prog, name);
        goto fail;
    }
    buf[len] = '\0';
    p->lists[p->n_lists++] = buf;
    for (line = buf; line < buf + len; line = end + 1) {
        end = memchr(line, '\n', (size_t)(buf + len - line));
        if (end == NULL)
            end = buf + len;
        *end = '\0';
        if (*line != '\0' && add_path(p, line) != 0) {
            fprintf(stderr, "%s: out of memory\n", prog);
            goto fail_kept;
        }
    }
    if (f != stdin)
        fclose(f);
    return 0;
fail:
    free(buf);
fail_kept:
    if (f != stdin)
        fclose(f);
    return -1;
}

static void print_error(const char *code, const char *message, const char *path)
{
    fputs("error ", stdout);
    put_clean(code);
    putchar(' ');
    put_clean(message);
    putchar(' ');
    put_clean(path);
    putchar('\n');
}

static void print_verdict(const sentinel_reply *r, const char *path)
{
    size_t i;
    printf("%s ", sentinel_action_name(r->scan.action));
    put_clean(r->scan.sha256);
    printf(" %llu ", (unsigned long long)r->scan.size);
    put_clean(path);
    for (i = 0; i < r->scan.rule_count; i++) {
        putchar(i == 0 ? ' ' : ',');
        put_clean(r->scan.rules[i]);
    }
    putchar('\n');
}

static int parse_depth(const char *s, int *depth)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || *s == '\0' || *end != '\0' || v < 1 || v > MAX_DEPTH)
        return -1;
    *depth = (int)v;
    return 0;
}

/* Open and send file i into slot s; 0 when sent, 1 when the file failed
 * locally (reported), negative when the connection failed. */
static int start_file(sentinel_conn *conn, struct slot *s, size_t i, const char *path, int quiet,
                      struct stats *st)
{
    char name[1024];
    int rc;
    /* O_NONBLOCK: opening a FIFO must not wait for a writer (the daemon
     * refuses it as bad_fd); it changes nothing for a regular file. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (!quiet)
            print_error("open_failed", strerror(errno), path);
        st->errors++;
        return 1;
    }
    rc = sentinel_send_scan_fd(conn, (uint64_t)i + 1, fd, wire_name(path, name, sizeof name),
                               NULL, NULL);
    if (rc == SENTINEL_E_INVALID) { /* this request could not be encoded; nothing was sent */
        close(fd);
        if (!quiet)
            print_error("invalid", sentinel_conn_error(conn), path);
        st->errors++;
        return 1;
    }
    if (rc != SENTINEL_OK) {
        close(fd);
        return rc;
    }
    s->sent = now();
    if (st->first_send < 0)
        st->first_send = s->sent;
    s->busy = 1;
    s->file = i;
    s->fd = fd;
    s->attempts = 1;
    s->due = 0;
    return 0;
}

static void release(struct slot *s)
{
    close(s->fd);
    s->busy = 0;
    s->fd = -1;
}

static int is_retryable_load_error(const sentinel_reply *r)
{
    return r->error.retryable &&
           (strcmp(r->error.code, "busy") == 0 || strcmp(r->error.code, "rate_limited") == 0);
}

int main(int argc, char **argv)
{
    const char *socket_path = NULL;
    int depth = DEFAULT_DEPTH, quiet = 0, want_stats = 0, argi, status;
    struct paths paths = {NULL, 0, 0, NULL, 0};
    struct stats st;
    struct slot *slots = NULL;
    sentinel_conn *conn = NULL;
    sentinel_reply reply;
    char errbuf[SENTINEL_ERRMSG_MAX], name[1024];
    size_t next = 0, active = 0, waiting = 0, k;
    int fatal = 0, rc;
    const char **list_names;
    size_t n_lists = 0;
    const char *latency_path = NULL;
    double *latencies = NULL;
    size_t n_latencies = 0;

    memset(&st, 0, sizeof st);
    st.first_send = st.last_reply = -1;
    list_names = calloc((size_t)argc, sizeof *list_names);
    paths.lists = calloc((size_t)argc, sizeof *paths.lists);
    if (list_names == NULL || paths.lists == NULL)
        return EXIT_ERROR;

    for (argi = 1; argi < argc; argi++) {
        const char *a = argv[argi];
        if (strcmp(a, "--") == 0) {
            argi++;
            break;
        } else if (strcmp(a, "-q") == 0) {
            quiet = 1;
        } else if (strcmp(a, "--stats") == 0) {
            want_stats = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return EXIT_ALLOWED;
        } else if (strcmp(a, "--latencies") == 0) {
            if (argi + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n", prog, a);
                usage();
                return EXIT_USAGE;
            }
            latency_path = argv[++argi];
        } else if (strcmp(a, "-s") == 0 || strcmp(a, "-j") == 0 ||
                   strcmp(a, "--files-from") == 0) {
            if (argi + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n", prog, a);
                usage();
                return EXIT_USAGE;
            }
            if (a[1] == 's')
                socket_path = argv[++argi];
            else if (a[1] == 'j' && parse_depth(argv[++argi], &depth) != 0) {
                fprintf(stderr, "%s: -j needs an integer in 1..%d\n", prog, MAX_DEPTH);
                return EXIT_USAGE;
            } else if (a[1] == '-')
                list_names[n_lists++] = argv[++argi];
        } else if (strncmp(a, "--files-from=", 13) == 0) {
            list_names[n_lists++] = a + 13;
        } else if (strncmp(a, "-s", 2) == 0 && a[2] != '\0') {
            socket_path = a + 2;
        } else if (strncmp(a, "-j", 2) == 0 && a[2] != '\0') {
            if (parse_depth(a + 2, &depth) != 0) {
                fprintf(stderr, "%s: -j needs an integer in 1..%d\n", prog, MAX_DEPTH);
                return EXIT_USAGE;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "%s: unknown option %s\n", prog, a);
            usage();
            return EXIT_USAGE;
        } else {
            break;
        }
    }
    for (; argi < argc; argi++)
        if (add_path(&paths, argv[argi]) != 0)
            return EXIT_ERROR;
    for (k = 0; k < n_lists; k++)
        if (read_list(&paths, list_names[k]) != 0)
            return EXIT_USAGE;
    free(list_names);
    if (paths.n == 0 && n_lists == 0) {
        fprintf(stderr, "%s: no files to scan\n", prog);
        usage();
        return EXIT_USAGE;
    }
    st.files = paths.n;
    if (latency_path != NULL) {
        latencies = calloc(paths.n ? paths.n : 1, sizeof *latencies);
        if (latencies == NULL) {
            fprintf(stderr, "%s: out of memory\n", prog);
            return EXIT_ERROR;
        }
    }

    rc = sentinel_connect(&conn, socket_path, "sentinel-scan/0.1", errbuf, sizeof errbuf);
    if (rc != SENTINEL_OK) {
        fprintf(stderr, "%s: %s: %s\n", prog, sentinel_strerror(rc), errbuf);
        st.errors = paths.n;
        fatal = 1;
        goto report;
    }
    /* No deeper than the daemon serves per connection: more would be refused busy. */
    if ((uint64_t)depth > sentinel_welcome(conn)->welcome.max_in_flight_per_connection)
        depth = (int)sentinel_welcome(conn)->welcome.max_in_flight_per_connection;
    if (depth < 1)
        depth = 1;
    slots = calloc((size_t)depth, sizeof *slots);
    if (slots == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        st.errors = paths.n;
        fatal = 1;
        goto report;
    }

    for (;;) {
        double t;
        int s;
        /* Resend what is due, then fill free slots with new files. */
        if (waiting > 0) {
            t = now();
            for (s = 0; s < depth; s++) {
                struct slot *sl = &slots[s];
                if (!sl->busy || sl->due <= 0 || sl->due > t)
                    continue;
                rc = sentinel_send_scan_fd(conn, (uint64_t)sl->file + 1, sl->fd,
                                           wire_name(paths.v[sl->file], name, sizeof name),
                                           NULL, NULL);
                if (rc != SENTINEL_OK)
                    goto lost;
                sl->attempts++;
                sl->due = 0;
                waiting--;
            }
        }
        for (s = 0; s < depth && next < paths.n; s++) {
            if (slots[s].busy)
                continue;
            while (next < paths.n) {
                size_t i = next++;
                rc = start_file(conn, &slots[s], i, paths.v[i], quiet, &st);
                if (rc < 0)
                    goto lost;
                if (rc == 0) {
                    active++;
                    break;
                }
            }
        }
        if (active == 0)
            break;
        if (active == waiting) { /* nothing in flight: only retries pending */
            double soonest = 0;
            for (s = 0; s < depth; s++)
                if (slots[s].busy && slots[s].due > 0 && (soonest == 0 || slots[s].due < soonest))
                    soonest = slots[s].due;
            t = soonest - now();
            if (t > 0) {
                struct timespec ts;
                ts.tv_sec = (time_t)t;
                ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
                while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
                    ;
            }
            continue;
        }
        if (waiting > 0 && !sentinel_reply_buffered(conn)) {
            /* Wait for a reply, but no longer than the next retry is due. */
            double soonest = 0;
            struct pollfd pfd;
            int ms;
            for (s = 0; s < depth; s++)
                if (slots[s].busy && slots[s].due > 0 && (soonest == 0 || slots[s].due < soonest))
                    soonest = slots[s].due;
            ms = (int)((soonest - now()) * 1000.0) + 1;
            pfd.fd = sentinel_fileno(conn);
            pfd.events = POLLIN;
            pfd.revents = 0;
            if (ms <= 0 || poll(&pfd, 1, ms) == 0)
                continue; /* a retry is due first */
        }
        rc = sentinel_read_reply(conn, &reply);
        if (rc != SENTINEL_OK)
            goto lost;
        st.last_reply = now();
        for (s = 0; s < depth; s++)
            if (slots[s].busy && slots[s].due <= 0 && (uint64_t)slots[s].file + 1 == reply.id)
                break;
        if (s == depth) {
            if (reply.kind == SENTINEL_REPLY_ERROR && reply.id == 0)
                fprintf(stderr, "%s: sentineld: %s: %s\n", prog, reply.error.code,
                        reply.error.message);
            else
                fprintf(stderr, "%s: protocol error: a %s reply with id %llu answers no request\n",
                        prog, reply.type, (unsigned long long)reply.id);
            goto abandon;
        }
        {
            struct slot *sl = &slots[s];
            const char *path = paths.v[sl->file];
            if (reply.kind == SENTINEL_REPLY_SCAN_RESULT) {
                st.bytes += reply.scan.size;
                st.matched += reply.scan.match_count > 0;
                st.degraded += reply.scan.degraded != 0;
                st.not_allowed += reply.scan.action != SENTINEL_ALLOW;
                if (latencies != NULL)
                    latencies[n_latencies++] = (st.last_reply - sl->sent) * 1000.0;
                if (!quiet)
                    print_verdict(&reply, path);
            } else if (reply.kind == SENTINEL_REPLY_ERROR && is_retryable_load_error(&reply) &&
                       sl->attempts < MAX_ATTEMPTS) {
                long ms = reply.error.retry_after_ms >= 0
                              ? (long)(reply.error.retry_after_ms < MAX_RETRY_WAIT_MS
                                           ? reply.error.retry_after_ms
                                           : MAX_RETRY_WAIT_MS)
                              : FIRST_BACKOFF_MS << (sl->attempts - 1);
                if (ms > MAX_RETRY_WAIT_MS)
                    ms = MAX_RETRY_WAIT_MS;
                sl->due = st.last_reply + (double)ms / 1000.0;
                waiting++;
                continue;
            } else if (reply.kind == SENTINEL_REPLY_ERROR) {
                st.errors++;
                if (!quiet)
                    print_error(reply.error.code, reply.error.message, path);
            } else {
                st.errors++;
                if (!quiet)
                    print_error("protocol", "unexpected reply type", path);
            }
            release(sl);
            active--;
        }
    }
    goto report;

lost:
    fprintf(stderr, "%s: %s: %s\n", prog, sentinel_strerror(rc), sentinel_conn_error(conn));
abandon:
    /* The connection is gone: what was in flight has no verdict. */
    fatal = 1;
    for (k = 0; k < (size_t)depth; k++) {
        if (!slots[k].busy)
            continue;
        if (!quiet)
            print_error("connection_lost", "no reply before the connection failed",
                        paths.v[slots[k].file]);
        release(&slots[k]);
        st.errors++;
    }
    if (next < paths.n) {
        fprintf(stderr, "%s: %zu files not scanned\n", prog, paths.n - next);
        st.errors += paths.n - next;
    }

report:
    if (want_stats) {
        double seconds = st.first_send >= 0 && st.last_reply >= st.first_send
                             ? st.last_reply - st.first_send
                             : 0.0;
        printf("sentinel-scan: files=%zu bytes=%llu seconds=%.6f errors=%zu matched=%zu "
               "degraded=%zu\n",
               st.files, st.bytes, seconds, st.errors, st.matched, st.degraded);
    }
    if (latency_path != NULL) {
        FILE *out = fopen(latency_path, "w");
        int failed = out == NULL;
        for (k = 0; !failed && k < n_latencies; k++)
            failed = fprintf(out, "%.3f\n", latencies[k]) < 0;
        if (out != NULL && fclose(out) != 0)
            failed = 1;
        if (failed) {
            fprintf(stderr, "%s: writing %s failed: %s\n", prog, latency_path, strerror(errno));
            st.errors++;
        }
    }
    free(latencies);
    if (fflush(stdout) != 0 && !fatal) {
        fprintf(stderr, "%s: writing the results failed: %s\n", prog, strerror(errno));
        st.errors++;
    }
    sentinel_close(conn);
    free(slots);
    free((void *)paths.v);
    for (k = 0; k < paths.n_lists; k++)
        free(paths.lists[k]);
    free(paths.lists);
    status = st.errors > 0 || fatal ? EXIT_ERROR
             : st.not_allowed > 0  ? EXIT_NOT_ALLOWED
                                   : EXIT_ALLOWED;
    return status;
}
