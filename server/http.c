/*
 * http.c - the HTTP side of `tandem serve` on libmicrohttpd: routes, request
 * bodies, OpenAI error responses, and the waiting for results.
 *
 * Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
 * GET /v1/models/ID, GET /health ({"status", "running", "queued", ...};
 * 503 with "draining" once shutdown began). Anything else is 404, a known
 * route with the wrong method 405 (with Allow).
 *
 * libmicrohttpd runs one thread per connection, so a handler may block: a
 * non-streaming completion waits in its handler for the request to finish;
 * a streaming one returns a response whose reader callback blocks until the
 * engine publishes more text, then formats it as server-sent events.
 * While either waits it looks at its socket every 200 ms: a client that hung
 * up (POLLRDHUP / POLLHUP) is cancelled at once, which frees its KV slot at
 * the next step (or drops it from the queue), even if no byte was to be sent.
 *
 * Admission comes first. Once a completion request's headers are in, and
 * before its body is kept or parsed: the API key (every route but /health,
 * which load balancers probe without credentials), then a place in the
 * scheduler's queue (srv_sched_reserve). A request refused there gets its
 * answer (401, 503 with Retry-After) after its body has been read and
 * discarded, so that a client still sending sees the answer instead of a
 * reset connection. Only then is the body kept, and the parse (JSON, chat
 * template, tokenisation) runs for at most PARSE_MAX requests at a time,
 * each bounded by the template engine's step and memory limits and PCRE2's
 * match limits (400 when exceeded). The places in the queue bound how many
 * bodies are held at once to max_seqs + queue.
 *
 * Limits: bodies over max_body (by Content-Length or as they arrive, chunked
 * too) get 413 after being read and discarded; a Content-Length past
 * 16 x max_body is answered at once. Connections beyond max_conns are
 * refused by libmicrohttpd. A connection idle for timeout_s is closed; one
 * whose headers (or next keep-alive request) have not all arrived within
 * timeout_s in all is closed too, however slowly it trickles bytes, and with
 * more than 3/4 of max_conns open a waiting connection gets about a second
 * (conns.c); a body must arrive within 3 x timeout_s. So idle or slow
 * clients free their connection soon; a request being generated has no
 * timeout (its client is watched for hang-ups instead).
 */
#include "server.h"

#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

struct srv_http {
    struct MHD_Daemon *d;
    srv_sched *sc;
    srv_parse_ctx pc;
    srv_http_params p;
    long long started; /* unix time, for /v1/models */
    atomic_int draining;
    atomic_int active; /* completion requests accepted and not yet fully answered */
    pthread_mutex_t parse_mu;
    pthread_cond_t parse_cv;
    int n_parsing; /* requests in srv_parse_request now, at most PARSE_MAX */
    srv_conns *conns;
};

/* Parses at once: each may take a Jinja arena and a tokenisation of up to
 * max_body bytes, so this bounds their memory and lets the engine thread
 * keep a core. */
#define PARSE_MAX 4

/* Why a request is refused once its body has been discarded. */
enum { REJ_NONE, REJ_AUTH, REJ_LARGE, REJ_FULL, REJ_CLOSED };

enum { R_NONE, R_HEALTH, R_MODELS, R_MODEL, R_CHAT, R_COMPLETION };

typedef struct {
    int route;
    srv_buf body;
    size_t seen;   /* body bytes received */
    double t0;     /* when the headers were in (the body deadline counts from here) */
    int reject;    /* REJ_*: the body is discarded, then this is the answer */
    int reserved;  /* holds a place in the scheduler's queue */
    int active;    /* counted in srv_http.active until libmicrohttpd is done with it */
} srv_conn;

typedef struct {
    srv_http *h;
    srv_req *r; /* one reference, dropped in stream_free */
    int fd;
    srv_buf sse; /* formatted events not yet handed to libmicrohttpd */
    size_t off;
    srv_out local;
    srv_stream_pos pos;
    int ended;
} srv_stream;

/* ---- responses ------------------------------------------------------------- */

static const char OOM_JSON[] =
    "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";

/* Send json (malloc'd, taken; NULL = out of memory) with status. */
static enum MHD_Result send_json(struct MHD_Connection *c, int status, char *json, const char *hname,
                                 const char *hval)
{
    struct MHD_Response *resp;
    if (json) {
        resp = MHD_create_response_from_buffer(strlen(json), json, MHD_RESPMEM_MUST_FREE);
        if (!resp)
            free(json);
    } else {
        status = 500;
        resp = MHD_create_response_from_buffer(sizeof OOM_JSON - 1, (void *)OOM_JSON, MHD_RESPMEM_PERSISTENT);
    }
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/json");
    if (hname)
        MHD_add_response_header(resp, hname, hval);
    enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* An OpenAI error; hname: one extra header (Allow, Retry-After, ...) or NULL. */
static enum MHD_Result send_error(struct MHD_Connection *c, int status, const char *param, const char *code,
                                  const char *hname, const char *hval, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static enum MHD_Result send_error(struct MHD_Connection *c, int status, const char *param, const char *code,
                                  const char *hname, const char *hval, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    srv_buf clean = { 0 };
    srv_utf8_clean(msg, strlen(msg), &clean); /* the URL in a message may be any bytes */
    char *j = srv_error_json(status, clean.p ? clean.p : "error", param, code);
    srv_buf_free(&clean);
    return send_json(c, status, j, hname, hval);
}

/* ---- routes ---------------------------------------------------------------- */

static int match_route(const char *url, const char **model)
{
    size_t n = strlen(url);
    while (n > 1 && url[n - 1] == '/')
        n--;
#define IS(s) (n == sizeof(s) - 1 && !memcmp(url, s, n))
    if (IS("/health"))
        return R_HEALTH;
    if (IS("/v1/models"))
        return R_MODELS;
    if (IS("/v1/chat/completions"))
        return R_CHAT;
    if (IS("/v1/completions"))
        return R_COMPLETION;
#undef IS
    if (n > 11 && !memcmp(url, "/v1/models/", 11)) {
        *model = url + 11;
        return R_MODEL;
    }
    return R_NONE;
}


static json_t *model_obj(const srv_http *h)
{
    return json_pack("{s:s,s:s,s:I,s:s,s:i}", "id", h->pc.model_id, "object", "model", "created",
                     (json_int_t)h->started, "owned_by", "tandem", "max_model_len", h->pc.n_ctx);
}

static enum MHD_Result get_route(srv_http *h, struct MHD_Connection *c, int route, const char *model)
{
    json_t *v = NULL;
    int status = 200;
    if (route == R_HEALTH) {
        srv_stats st;
        srv_sched_stats(h->sc, &st);
        int open;
        long cut_header, cut_pressure;
        srv_conns_counts(h->conns, &open, &cut_header, &cut_pressure);
        int draining = atomic_load(&h->draining) || st.closed;
        status = draining ? 503 : 200;
        v = json_pack("{s:s,s:i,s:i,s:i,s:i,s:i,s:I,s:I,s:I,s:i,s:I,s:I}", "status", draining ? "draining" : "ok",
                      "running", st.running, "queued", st.queued, "max_seqs", st.n_seq, "queue_max", st.queue_max,
                      "ctx", st.n_ctx, "requests", (json_int_t)st.requests, "tokens_generated",
                      (json_int_t)st.tokens_generated, "steps", (json_int_t)st.steps, "connections", open,
                      "closed_slow_headers", (json_int_t)cut_header, "closed_idle_under_load",
                      (json_int_t)cut_pressure);
    } else if (route == R_MODELS) {
        v = json_pack("{s:s,s:[o]}", "object", "list", "data", model_obj(h));
    } else {
        if (strcmp(model, h->pc.model_id) && strcmp(model, h->pc.model_dir))
            return send_error(c, 404, "model", "model_not_found", NULL, NULL, "the model '%.200s' does not exist", model);
        v = model_obj(h);
    }
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    return send_json(c, status, s, NULL, NULL);
}

/* ---- waiting for the engine -------------------------------------------------- */

/* Has the peer closed its end? (A request is complete before we wait, so
 * a readable end-of-file or a hang-up means the client is gone.) */
static int client_gone(int fd)
{
    if (fd < 0)
        return 0;
    struct pollfd p = { .fd = fd, .events = POLLRDHUP };
    if (poll(&p, 1, 0) <= 0)
        return 0;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

static int conn_fd(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

#define WAIT_MS 200

static ssize_t stream_read(void *cls, uint64_t at, char *buf, size_t max)
{
    srv_stream *st = cls;
    (void)at;
    for (;;) {
        if (st->off < st->sse.n) {
            size_t k = st->sse.n - st->off < max ? st->sse.n - st->off : max;
            memcpy(buf, st->sse.p + st->off, k);
            st->off += k;
            return (ssize_t)k;
        }
        if (st->ended)
            return MHD_CONTENT_READER_END_OF_STREAM;
        st->sse.n = st->off = 0;
        int fin = 0, n_comp = 0;
        char msg[256] = "";
        int state = srv_sched_wait(st->h->sc, st->r, WAIT_MS, &st->local, &fin, msg, sizeof msg, &n_comp);
        int rc = srv_stream_chunks(st->r, st->h->pc.model_id, &st->pos, &st->local, &st->sse);
        srv_out_clear(&st->local);
        if (!rc && state == SRV_DONE) {
            rc = srv_stream_end(st->r, st->h->pc.model_id, &st->pos, fin, msg, n_comp, &st->sse);
            st->ended = 1;
            if (st->h->p.verbose)
                fprintf(stderr, "tandem serve: %s stream prompt=%d generated=%d finish=%s %.0f ms\n", st->r->id,
                        st->r->n_prompt, n_comp, srv_finish_str(fin) ? srv_finish_str(fin) : "error",
                        (srv_now() - st->r->t_submit) * 1e3);
        }
        if (rc || (st->sse.n == 0 && client_gone(st->fd))) {
            srv_sched_cancel(st->h->sc, st->r);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls)
{
    srv_stream *st = cls;
    srv_sched_cancel(st->h->sc, st->r); /* no-op when it finished */
    srv_sched_release(st->h->sc, st->r);
    srv_buf_free(&st->sse);
    srv_out_free(&st->local);
    free(st);
}

static enum MHD_Result start_stream(srv_http *h, struct MHD_Connection *c, srv_req *r)
{
    srv_stream *st = calloc(1, sizeof *st);
    if (!st) {
        srv_sched_cancel(h->sc, r);
        srv_sched_release(h->sc, r);
        return send_json(c, 500, NULL, NULL, NULL);
    }
    st->h = h;
    st->r = r;
    st->fd = conn_fd(c);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read, st,
                                                                  stream_free);
    if (!resp) {
        stream_free(st);
        return send_json(c, 500, NULL, NULL, NULL);
    }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    enum MHD_Result rc = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* Non-streaming: block this connection's thread until r is done. */
static enum MHD_Result finish_blocking(srv_http *h, struct MHD_Connection *c, srv_req *r)
{
    int fd = conn_fd(c), fin = 0, n_comp = 0;
    char msg[256] = "";
    srv_out o = { 0 };
    while (srv_sched_wait(h->sc, r, WAIT_MS, &o, &fin, msg, sizeof msg, &n_comp) != SRV_DONE) {
        if (client_gone(fd)) {
            srv_sched_cancel(h->sc, r);
            srv_sched_release(h->sc, r);
            srv_out_free(&o);
            return MHD_NO; /* nobody to answer: close */
        }
    }
    enum MHD_Result rc;
    if (srv_finish_str(fin))
        rc = send_json(c, 200, srv_response_json(r, h->pc.model_id, &o, fin, n_comp), NULL, NULL);
    else if (fin == SRV_FIN_CANCELLED)
        rc = send_error(c, 503, NULL, "shutting_down", NULL, NULL, "%s", *msg ? msg : "the request was cancelled");
    else
        rc = send_error(c, 500, NULL, NULL, NULL, NULL, "%s", *msg ? msg : "the generation failed");
    if (h->p.verbose)
        fprintf(stderr, "tandem serve: %s prompt=%d generated=%d finish=%s %.0f ms\n", r->id, r->n_prompt, n_comp,
                srv_finish_str(fin) ? srv_finish_str(fin) : "error", (srv_now() - r->t_submit) * 1e3);
    srv_sched_release(h->sc, r);
    srv_out_free(&o);
    return rc;
}

static void parse_enter(srv_http *h)
{
    pthread_mutex_lock(&h->parse_mu);
    while (h->n_parsing >= PARSE_MAX)
        pthread_cond_wait(&h->parse_cv, &h->parse_mu);
    h->n_parsing++;
    pthread_mutex_unlock(&h->parse_mu);
}

static void parse_leave(srv_http *h)
{
    pthread_mutex_lock(&h->parse_mu);
    h->n_parsing--;
    pthread_cond_signal(&h->parse_cv);
    pthread_mutex_unlock(&h->parse_mu);
}

/* The body is in and the request holds a place in the queue: parse, submit. */
static enum MHD_Result handle_completion(srv_http *h, struct MHD_Connection *c, srv_conn *cc)
{
    srv_error e;
    parse_enter(h);
    srv_req *r = srv_parse_request(&h->pc, cc->route == R_CHAT ? SRV_CHAT : SRV_COMPLETION,
                                   cc->body.p ? cc->body.p : "", cc->body.n, &e);
    parse_leave(h);
    srv_buf_free(&cc->body);
    cc->reserved = 0; /* given back below, by srv_sched_submit or srv_sched_unreserve */
    if (!r) {
        srv_sched_unreserve(h->sc);
        return send_error(c, e.status, e.param, e.code, NULL, NULL, "%s", e.message);
    }
    r->refs = 1; /* this connection's */
    if (srv_sched_submit(h->sc, r) != SRV_SUBMIT_OK) {
        srv_req_free(r);
        return send_error(c, 503, NULL, "shutting_down", NULL, NULL, "the server is shutting down");
    }
    cc->active = 1;
    atomic_fetch_add(&h->active, 1);
    /* generation may take longer than the idle timeout between two tokens;
     * a client that hangs up is noticed by client_gone instead */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
    return r->stream ? start_stream(h, c, r) : finish_blocking(h, c, r);
}

/* The answer to a request refused at admission, its body discarded. */
static enum MHD_Result send_reject(srv_http *h, struct MHD_Connection *c, int why)
{
    switch (why) {
    case REJ_AUTH:
        return send_error(c, 401, NULL, "invalid_api_key", "WWW-Authenticate", "Bearer",
                          "a valid API key is required: send the header 'Authorization: Bearer KEY'");
    case REJ_LARGE:
        return send_error(c, 413, NULL, "request_too_large", NULL, NULL, "the body has more than %zu bytes",
                          h->p.max_body);
    case REJ_FULL:
        return send_error(c, 503, NULL, "queue_full", "Retry-After", "1",
                          "the server is busy: every sequence slot is taken and the queue is full; retry later");
    default:
        return send_error(c, 503, NULL, "shutting_down", NULL, NULL, "the server is shutting down");
    }
}

/* Constant-time in the key: every byte of the expected key is compared,
 * whatever the header holds, so the time says nothing about how much of a
 * guess was right. */
static int key_ok(const char *want, const char *hdr)
{
    if (!hdr || strncasecmp(hdr, "Bearer ", 7) != 0)
        return 0;
    const char *got = hdr + 7;
    while (*got == ' ')
        got++;
    size_t nw = strlen(want), ng = strlen(got);
    volatile unsigned d = nw != ng;
    for (size_t i = 0; i < nw; i++)
        d |= (unsigned char)want[i] ^ (unsigned char)(i < ng ? got[i] : 0);
    return d == 0;
}

/* ---- libmicrohttpd callbacks --------------------------------------------------- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    srv_http *h = cls;
    srv_conn *cc = *con_cls;
    (void)version;
    if (!cc) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        if (ci)
            srv_conns_request(h->conns, ci->socket_context, 1);
        const char *model = NULL;
        int route = match_route(url, &model);
        if (route == R_NONE)
            return send_error(c, 404, NULL, "not_found", NULL, NULL, "Invalid URL (%.20s %.200s)", method, url);
        int post = route == R_CHAT || route == R_COMPLETION;
        int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        if (post ? strcmp(method, "POST") != 0 : !get)
            return send_error(c, 405, NULL, "method_not_allowed", "Allow", post ? "POST" : "GET, HEAD",
                              "%.20s is not allowed on %.200s (use %s)", method, url, post ? "POST" : "GET");
        int authed = !h->p.api_key || route == R_HEALTH ||
                     key_ok(h->p.api_key, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization"));
        if (!post)
            return authed ? get_route(h, c, route, model) : send_reject(h, c, REJ_AUTH);
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        /* far too large: answer now (the client may see the connection close
         * while it still sends); else read and discard, then answer 413 */
        if (cl && strtoull(cl, NULL, 10) / 16 > h->p.max_body)
            return send_error(c, 413, NULL, "request_too_large", NULL, NULL,
                              "the body has %.30s bytes, the limit is %zu", cl, h->p.max_body);
        if (!(cc = calloc(1, sizeof *cc)))
            return MHD_NO;
        cc->route = route;
        cc->t0 = srv_now();
        *con_cls = cc;
        if (!authed)
            cc->reject = REJ_AUTH;
        else if (atomic_load(&h->draining))
            cc->reject = REJ_CLOSED;
        else if (cl && strtoull(cl, NULL, 10) > h->p.max_body)
            cc->reject = REJ_LARGE;
        else {
            int rc = srv_sched_reserve(h->sc);
            if (rc == SRV_SUBMIT_OK)
                cc->reserved = 1;
            else
                cc->reject = rc == SRV_SUBMIT_FULL ? REJ_FULL : REJ_CLOSED;
        }
        return MHD_YES;
    }
    if (*upload_size) {
        /* a body that takes too long holds a connection thread: close it */
        if (srv_now() - cc->t0 > 3.0 * h->p.timeout_s)
            return MHD_NO;
        cc->seen += *upload_size;
        if (!cc->reject && cc->body.n + *upload_size > h->p.max_body) {
            cc->reject = REJ_LARGE;
            srv_buf_free(&cc->body);
        }
        if (!cc->reject && srv_buf_put(&cc->body, upload, *upload_size))
            return MHD_NO;
        *upload_size = 0;
        return MHD_YES;
    }
    if (cc->reject)
        return send_reject(h, c, cc->reject);
    return handle_completion(h, c, cc);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    srv_http *h = cls;
    (void)toe;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    if (ci)
        srv_conns_request(h->conns, ci->socket_context, 0);
    srv_conn *cc = *con_cls;
    if (!cc)
        return;
    if (cc->active)
        atomic_fetch_sub(&h->active, 1);
    if (cc->reserved)
        srv_sched_unreserve(h->sc);
    /* the connection may stay open for the next request: idle again */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, (unsigned)h->p.timeout_s);
    srv_buf_free(&cc->body);
    free(cc);
    *con_cls = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    srv_http *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci)
            srv_conns_opened(h->conns, ci->connect_fd, socket_context);
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        srv_conns_closed(h->conns, socket_context);
    }
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    const srv_http *h = cls;
    if (!h->p.verbose)
        return;
    fputs("tandem serve: libmicrohttpd: ", stderr);
    vfprintf(stderr, fmt, ap);
}

int srv_http_start(const srv_http_params *p, srv_sched *sc, const srv_parse_ctx *pc, srv_http **out, int *port,
                   char *err, size_t errlen)
{
    *out = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", p->port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *ai;
    int gai = getaddrinfo(p->host, ps, &hints, &ai);
    if (gai) {
        snprintf(err, errlen, "--host %s: %s", p->host, gai_strerror(gai));
        return TANDEM_EINVAL;
    }
    srv_http *h = calloc(1, sizeof *h);
    if (!h) {
        freeaddrinfo(ai);
        snprintf(err, errlen, "out of memory");
        return TANDEM_ENOMEM;
    }
    h->sc = sc;
    h->pc = *pc;
    h->p = *p;
    h->started = (long long)time(NULL);
    pthread_mutex_init(&h->parse_mu, NULL);
    pthread_cond_init(&h->parse_cv, NULL);
    if (srv_conns_start(p->max_conns, p->timeout_s, &h->conns)) {
        freeaddrinfo(ai);
        pthread_mutex_destroy(&h->parse_mu);
        pthread_cond_destroy(&h->parse_cv);
        free(h);
        snprintf(err, errlen, "cannot start the connection watchdog thread");
        return TANDEM_ENOMEM;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
                     MHD_USE_ERROR_LOG | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    h->d = MHD_start_daemon(flags, (uint16_t)p->port, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER,
                            on_mhd_log, h, MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED,
                            on_completed, h, MHD_OPTION_NOTIFY_CONNECTION, on_connection, h,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)p->max_conns,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)p->timeout_s, MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u,
                            MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!h->d) {
        snprintf(err, errlen, "cannot listen on %s port %d (in use, or not an address of this machine?)", p->host,
                 p->port);
        srv_conns_stop(h->conns);
        pthread_mutex_destroy(&h->parse_mu);
        pthread_cond_destroy(&h->parse_cv);
        free(h);
        return TANDEM_EIO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    *port = di ? di->port : p->port;
    *out = h;
    return 0;
}

void srv_http_set_draining(srv_http *h) { atomic_store(&h->draining, 1); }

int srv_http_active(srv_http *h) { return atomic_load(&h->active); }

void srv_http_stop(srv_http *h)
{
    if (!h)
        return;
    MHD_stop_daemon(h->d);
    srv_conns_stop(h->conns);
    pthread_mutex_destroy(&h->parse_mu);
    pthread_cond_destroy(&h->parse_cv);
    free(h);
}
