/*
 * loadgen.c - minimal HTTPS keep-alive load generator for the secretless-proxy bench.
 *
 * One thread per connection. Each connection:
 *   TCP connect (to --proxy if given, else --connect)
 *   [if proxy] "CONNECT <target> HTTP/1.1" and expect a 2xx reply
 *   TLS handshake with SNI = --sni (a bare hostname, never "host:port"),
 *     peer verification against --cafile + hostname check, ALPN http/1.1,
 *     optional client certificate (--cert/--key) for mTLS on that hop
 *   keep-alive "GET <path>" requests back to back until the deadline.
 * On any error the connection is torn down, the error counted, and a new
 * connection is made (after a short pause) until the deadline.
 *
 * Requests completed during the warm-up are not counted. Latency is measured
 * per request, from just before the request is written to when the full
 * response body has been read.
 *
 * Output: one JSON object on stdout. t_measure_mono / t_end_mono are the measured window's
 * bounds on CLOCK_MONOTONIC (Python's time.monotonic() on Linux), so other processes' event
 * times can be placed inside or outside the window.
 *
 * Build: gcc -O2 -pthread -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---------------- options ---------------- */
static const char *opt_proxy = NULL;   /* host:port of HTTP proxy (CONNECT) */
static const char *opt_connect = NULL; /* ip:port to dial when no proxy */
static const char *opt_target = NULL;  /* host:port for CONNECT line / Host header */
static const char *opt_sni = NULL;     /* TLS SNI + verified hostname */
static const char *opt_path = "/";
static const char *opt_cafile = NULL;
static const char *opt_cert = NULL;
static const char *opt_key = NULL;
static const char *opt_expect_body = NULL; /* substring that must be in each body */
static int opt_conns = 20;
static double opt_duration = 10.0;
static double opt_warmup = 2.0;
static int opt_timeout_ms = 5000;

/* ---------------- timing ---------------- */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double t_start, t_measure, t_end;
static SSL_CTX *g_ctx;

/* ---------------- per-thread state ---------------- */
#define MAX_STATUS 600
#define MAX_ERRKINDS 8
static const char *errkind_names[MAX_ERRKINDS] = {
    "tcp_connect", "proxy_connect", "tls_handshake", "write",
    "read", "parse", "bad_status", "body_mismatch"};
enum { E_TCP, E_PROXY, E_TLS, E_WRITE, E_READ, E_PARSE, E_STATUS, E_BODY };

typedef struct {
    int id;
    uint32_t *lat_us;
    size_t n, cap;
    uint64_t errors[MAX_ERRKINDS];
    uint64_t status[MAX_STATUS];
    uint64_t connects;        /* successful connection setups (incl. warm-up) */
    uint64_t warm_requests;   /* requests completed in warm-up */
    char last_err[256];
} thr_t;

static void rec_lat(thr_t *t, double sec) {
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 65536;
        t->lat_us = realloc(t->lat_us, t->cap * sizeof(uint32_t));
        if (!t->lat_us) { perror("realloc"); exit(2); }
    }
    double us = sec * 1e6;
    if (us > 4e9) us = 4e9;
    t->lat_us[t->n++] = (uint32_t)us;
}

static void set_err(thr_t *t, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(thr_t *t, int kind, const char *fmt, ...) {
    /* Errors after the deadline are a consequence of stopping, not counted. */
    if (now_s() >= t_end) return;
    if (now_s() >= t_measure) t->errors[kind]++;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->last_err, sizeof t->last_err, fmt, ap);
    va_end(ap);
}

/* ---------------- connection ---------------- */
typedef struct {
    int fd;
    SSL *ssl;
    char buf[65536];
    size_t off, len; /* unread bytes are buf[off..off+len) */
} conn_t;

static int split_hostport(const char *s, char *host, size_t hl, char *port, size_t pl) {
    const char *c = strrchr(s, ':');
    if (!c) return -1;
    size_t n = (size_t)(c - s);
    if (n >= hl || strlen(c + 1) >= pl) return -1;
    memcpy(host, s, n);
    host[n] = 0;
    strcpy(port, c + 1);
    return 0;
}

static int tcp_dial(const char *hostport) {
    char host[256], port[32];
    if (split_hostport(hostport, host, sizeof host, port, sizeof port)) return -1;
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) || !res) return -1;
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (fd < 0) { freeaddrinfo(res); return -1; }
    struct timeval tv = {opt_timeout_ms / 1000, (opt_timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
        close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

static void conn_close(conn_t *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->off = c->len = 0;
}

static int conn_open(thr_t *t, conn_t *c) {
    c->fd = -1;
    c->ssl = NULL;
    c->off = c->len = 0;
    c->fd = tcp_dial(opt_proxy ? opt_proxy : opt_connect);
    if (c->fd < 0) {
        set_err(t, E_TCP, "tcp connect to %s: %s", opt_proxy ? opt_proxy : opt_connect, strerror(errno));
        return -1;
    }
    if (opt_proxy) {
        char req[512];
        int n = snprintf(req, sizeof req, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", opt_target, opt_target);
        if (write(c->fd, req, n) != n) {
            set_err(t, E_PROXY, "CONNECT write: %s", strerror(errno));
            conn_close(c);
            return -1;
        }
        /* Read the proxy reply byte-wise up to the blank line so no TLS bytes are consumed. */
        char rep[4096];
        size_t rl = 0;
        while (rl < sizeof rep - 1) {
            ssize_t r = read(c->fd, rep + rl, 1);
            if (r <= 0) {
                set_err(t, E_PROXY, "CONNECT reply read: %s", r == 0 ? "EOF" : strerror(errno));
                conn_close(c);
                return -1;
            }
            rl++;
            if (rl >= 4 && memcmp(rep + rl - 4, "\r\n\r\n", 4) == 0) break;
        }
        rep[rl] = 0;
        int code = 0;
        if (sscanf(rep, "HTTP/%*s %d", &code) != 1 || code < 200 || code > 299) {
            char *nl = strchr(rep, '\r');
            if (nl) *nl = 0;
            set_err(t, E_PROXY, "CONNECT refused: %s", rep);
            conn_close(c);
            return -1;
        }
    }
    c->ssl = SSL_new(g_ctx);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, opt_sni);
    SSL_set1_host(c->ssl, opt_sni);
    if (SSL_connect(c->ssl) != 1) {
        unsigned long e = ERR_get_error();
        char eb[200];
        ERR_error_string_n(e, eb, sizeof eb);
        long vr = SSL_get_verify_result(c->ssl);
        set_err(t, E_TLS, "TLS handshake: %s (verify: %s)", eb, X509_verify_cert_error_string(vr));
        ERR_clear_error();
        conn_close(c);
        return -1;
    }
    t->connects++;
    return 0;
}

/* Buffered reads over TLS. */
static int fill(conn_t *c) {
    if (c->off > 0 && c->len > 0) memmove(c->buf, c->buf + c->off, c->len);
    c->off = 0;
    if (c->len >= sizeof c->buf) return -1;
    int r = SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len));
    if (r <= 0) return -1;
    c->len += (size_t)r;
    return r;
}

/* Returns length of line (excluding CRLF) starting at buf+off, or -1. */
static ssize_t read_line(conn_t *c, char **line) {
    for (;;) {
        char *p = memmem(c->buf + c->off, c->len, "\r\n", 2);
        if (p) {
            *line = c->buf + c->off;
            ssize_t n = p - (c->buf + c->off);
            *p = 0;
            c->off += (size_t)n + 2;
            c->len -= (size_t)n + 2;
            return n;
        }
        if (fill(c) < 0) return -1;
    }
}

/* Consume exactly n body bytes; keep first bytes (up to bodycap) in body. */
static int read_body(conn_t *c, size_t n, char *body, size_t *bodylen, size_t bodycap) {
    while (n > 0) {
        if (c->len == 0 && fill(c) < 0) return -1;
        size_t k = c->len < n ? c->len : n;
        if (*bodylen < bodycap) {
            size_t cp = bodycap - *bodylen < k ? bodycap - *bodylen : k;
            memcpy(body + *bodylen, c->buf + c->off, cp);
            *bodylen += cp;
        }
        c->off += k;
        c->len -= k;
        n -= k;
    }
    return 0;
}

/* Returns status code >0 on success, -1 on read error, -2 on parse error. *close_after set if server says close. */
static int read_response(conn_t *c, char *body, size_t *bodylen, size_t bodycap, int *close_after) {
    char *line;
    ssize_t n = read_line(c, &line);
    if (n < 0) return -1;
    int code = 0;
    if (sscanf(line, "HTTP/1.%*d %d", &code) != 1) return -2;
    long long clen = -1;
    int chunked = 0;
    *close_after = 0;
    for (;;) {
        n = read_line(c, &line);
        if (n < 0) return -1;
        if (n == 0) break;
        if (strncasecmp(line, "content-length:", 15) == 0) clen = atoll(line + 15);
        else if (strncasecmp(line, "transfer-encoding:", 18) == 0 && strcasestr(line, "chunked")) chunked = 1;
        else if (strncasecmp(line, "connection:", 11) == 0 && strcasestr(line, "close")) *close_after = 1;
    }
    *bodylen = 0;
    if (chunked) {
        for (;;) {
            n = read_line(c, &line);
            if (n < 0) return -1;
            long long sz = strtoll(line, NULL, 16);
            if (sz < 0) return -2;
            if (sz == 0) {
                /* trailers */
                for (;;) {
                    n = read_line(c, &line);
                    if (n < 0) return -1;
                    if (n == 0) break;
                }
                break;
            }
            if (read_body(c, (size_t)sz, body, bodylen, bodycap) < 0) return -1;
            n = read_line(c, &line);
            if (n != 0) return n < 0 ? -1 : -2;
        }
    } else if (clen >= 0) {
        if (read_body(c, (size_t)clen, body, bodylen, bodycap) < 0) return -1;
    } else if (code != 204 && code != 304) {
        return -2; /* no framing we support for keep-alive */
    }
    return code;
}

static void *worker(void *arg) {
    thr_t *t = arg;
    conn_t *c = calloc(1, sizeof *c);
    c->fd = -1;
    char req[1024];
    int rl = snprintf(req, sizeof req,
                      "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: secretless-bench-loadgen\r\nAccept: */*\r\n\r\n",
                      opt_path, opt_target);
    char body[4096];
    int have = 0;
    while (now_s() < t_end) {
        if (!have) {
            if (conn_open(t, c) < 0) {
                usleep(20000);
                continue;
            }
            have = 1;
        }
        double t0 = now_s();
        int w = SSL_write(c->ssl, req, rl);
        if (w != rl) {
            set_err(t, E_WRITE, "write failed");
            conn_close(c);
            have = 0;
            continue;
        }
        size_t bl = 0;
        int close_after = 0;
        int code = read_response(c, body, &bl, sizeof body - 1, &close_after);
        double t1 = now_s();
        if (code < 0) {
            set_err(t, code == -1 ? E_READ : E_PARSE, "%s", code == -1 ? "read failed / connection closed" : "unparseable response");
            ERR_clear_error();
            conn_close(c);
            have = 0;
            continue;
        }
        body[bl] = 0;
        int ok = 1;
        if (code < 200 || code > 299) {
            set_err(t, E_STATUS, "HTTP status %d, body: %.120s", code, body);
            ok = 0;
        } else if (opt_expect_body && !strstr(body, opt_expect_body)) {
            set_err(t, E_BODY, "body lacks expected text; body: %.120s", body);
            ok = 0;
        }
        if (t0 >= t_measure && t1 <= t_end) {
            if (code > 0 && code < MAX_STATUS) t->status[code]++;
            if (ok) rec_lat(t, t1 - t0);
        } else if (t1 < t_measure && ok) {
            t->warm_requests++;
        }
        if (close_after) {
            conn_close(c);
            have = 0;
        }
    }
    if (have) conn_close(c);
    free(c);
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint32_t *v, size_t n, double p) {
    if (n == 0) return 0;
    size_t i = (size_t)(p / 100.0 * (double)n);
    if (i >= n) i = n - 1;
    return v[i] / 1000.0; /* ms */
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --target HOST:PORT --sni HOST --cafile CA.pem\n"
            "               [--proxy IP:PORT | --connect IP:PORT] [--cert C.pem --key K.pem]\n"
            "               [--conns 20] [--duration 10] [--warmup 2] [--path /]\n"
            "               [--expect-body TEXT] [--timeout-ms 5000]\n");
    exit(2);
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define ARG(name) (strcmp(a, name) == 0 && i + 1 < argc)
        if (ARG("--proxy")) opt_proxy = argv[++i];
        else if (ARG("--connect")) opt_connect = argv[++i];
        else if (ARG("--target")) opt_target = argv[++i];
        else if (ARG("--sni")) opt_sni = argv[++i];
        else if (ARG("--path")) opt_path = argv[++i];
        else if (ARG("--cafile")) opt_cafile = argv[++i];
        else if (ARG("--cert")) opt_cert = argv[++i];
        else if (ARG("--key")) opt_key = argv[++i];
        else if (ARG("--expect-body")) opt_expect_body = argv[++i];
        else if (ARG("--conns")) opt_conns = atoi(argv[++i]);
        else if (ARG("--duration")) opt_duration = atof(argv[++i]);
        else if (ARG("--warmup")) opt_warmup = atof(argv[++i]);
        else if (ARG("--timeout-ms")) opt_timeout_ms = atoi(argv[++i]);
        else usage();
#undef ARG
    }
    if (!opt_target || !opt_sni || !opt_cafile || (!opt_proxy && !opt_connect) || opt_conns < 1 ||
        opt_duration <= 0 || (!!opt_cert != !!opt_key))
        usage();
    signal(SIGPIPE, SIG_IGN);

    g_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(g_ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(g_ctx, opt_cafile, NULL) != 1) {
        fprintf(stderr, "loadgen: cannot load CA file %s\n", opt_cafile);
        ERR_print_errors_fp(stderr);
        return 2;
    }
    SSL_CTX_set_verify(g_ctx, SSL_VERIFY_PEER, NULL);
    static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    SSL_CTX_set_alpn_protos(g_ctx, alpn, sizeof alpn);
    if (opt_cert) {
        if (SSL_CTX_use_certificate_chain_file(g_ctx, opt_cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(g_ctx, opt_key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(g_ctx) != 1) {
            fprintf(stderr, "loadgen: cannot load client cert/key %s %s\n", opt_cert, opt_key);
            ERR_print_errors_fp(stderr);
            return 2;
        }
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    t_start = now_s();
    t_measure = t_start + opt_warmup;
    t_end = t_measure + opt_duration;

    thr_t *th = calloc((size_t)opt_conns, sizeof *th);
    pthread_t *pt = calloc((size_t)opt_conns, sizeof *pt);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (int i = 0; i < opt_conns; i++) {
        th[i].id = i;
        if (pthread_create(&pt[i], &attr, worker, &th[i])) {
            perror("pthread_create");
            return 2;
        }
    }
    for (int i = 0; i < opt_conns; i++) pthread_join(pt[i], NULL);
    double t_done = now_s();
    getrusage(RUSAGE_SELF, &ru1);

    size_t total = 0;
    uint64_t errs[MAX_ERRKINDS] = {0}, status[MAX_STATUS] = {0}, connects = 0, warm = 0;
    for (int i = 0; i < opt_conns; i++) {
        total += th[i].n;
        for (int k = 0; k < MAX_ERRKINDS; k++) errs[k] += th[i].errors[k];
        for (int s = 0; s < MAX_STATUS; s++) status[s] += th[i].status[s];
        connects += th[i].connects;
        warm += th[i].warm_requests;
    }
    uint32_t *all = malloc((total ? total : 1) * sizeof(uint32_t));
    size_t k = 0;
    for (int i = 0; i < opt_conns; i++) {
        memcpy(all + k, th[i].lat_us, th[i].n * sizeof(uint32_t));
        k += th[i].n;
    }
    qsort(all, total, sizeof(uint32_t), cmp_u32);
    uint64_t err_total = 0;
    for (int e = 0; e < MAX_ERRKINDS; e++) err_total += errs[e];
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    double mean = 0;
    for (size_t i = 0; i < total; i++) mean += all[i];
    mean = total ? mean / total / 1000.0 : 0;

    printf("{\"count\": %zu, \"duration_s\": %.3f, \"rps\": %.1f, \"p50_ms\": %.3f, \"p90_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"mean_ms\": %.3f, \"errors\": %llu, \"conns\": %d, "
           "\"connects\": %llu, \"warmup_requests\": %llu, \"loadgen_cpu_s\": %.3f, \"wall_s\": %.3f, "
           "\"t_measure_mono\": %.6f, \"t_end_mono\": %.6f",
           total, opt_duration, total / opt_duration, pct(all, total, 50), pct(all, total, 90),
           pct(all, total, 99), total ? all[total - 1] / 1000.0 : 0, mean, (unsigned long long)err_total, opt_conns,
           (unsigned long long)connects, (unsigned long long)warm, cpu, t_done - t_start, t_measure, t_end);
    printf(", \"error_kinds\": {");
    int first = 1;
    for (int e = 0; e < MAX_ERRKINDS; e++)
        if (errs[e]) {
            printf("%s\"%s\": %llu", first ? "" : ", ", errkind_names[e], (unsigned long long)errs[e]);
            first = 0;
        }
    printf("}, \"status\": {");
    first = 1;
    for (int s = 0; s < MAX_STATUS; s++)
        if (status[s]) {
            printf("%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)status[s]);
            first = 0;
        }
    printf("}, \"last_error\": ");
    const char *le = "";
    for (int i = 0; i < opt_conns; i++)
        if (th[i].last_err[0]) le = th[i].last_err;
    json_str(le);
    printf("}\n");
    return 0;
}
