/*
 * server.h - the pieces of `tandem serve`, an OpenAI-compatible HTTP server
 * with continuous batching, shared between its files:
 *
 *   serve.c    options, start-up, signals, shutdown (cmd_serve)
 *   http.c     libmicrohttpd: routes, bodies, errors, waiting for results
 *   request.c  a request's JSON -> srv_req (validation, chat template, tokens)
 *   sched.c    the engine thread: queue, KV slots, one batch per step
 *   textout.c  generated text -> content / reasoning, stop strings
 *   respond.c  OpenAI-shaped JSON: responses, stream chunks, errors
 *
 * Threads and ownership. One engine thread (sched.c) owns the session and
 * every request's generation state (sampler, detokenizer, text splitter,
 * `stage`). Connection threads (one per connection, libmicrohttpd) own the
 * parse and the reading side. Everything they share lives in srv_req under
 * the scheduler's one mutex: the state, the cancel flag, the reference count
 * and `out` (text and log-probabilities produced but not yet taken by the
 * connection). The engine fills `stage` without the lock and moves it into
 * `out` under the lock once per step; readers move `out` into their own
 * srv_out under the lock and format outside it.
 *
 * Only include/tandem.h is used from the engine (front-end rule of DESIGN.md).
 */
#ifndef TANDEM_SERVER_H
#define TANDEM_SERVER_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem.h"

/* ---- growable byte buffer ------------------------------------------------ */
typedef struct {
    char *p;
    size_t n, cap;
} srv_buf;

int srv_buf_put(srv_buf *b, const void *s, size_t n); /* 0, or -1 out of memory; keeps p NUL-terminated */
int srv_buf_puts(srv_buf *b, const char *s);
void srv_buf_free(srv_buf *b);

/* ---- generated output: text and per-token log-probabilities ------------ */
typedef struct {
    float lp;
    uint32_t off, len; /* token text in srv_out.lptext */
} srv_tlp;

typedef struct {
    float lp;
    uint32_t off, len; /* token text in srv_out.lptext */
    int top0, n_top;   /* alternatives in srv_out.top[top0 .. top0+n_top) */
} srv_lp;

typedef struct {
    srv_buf content, reasoning;
    srv_lp *lp; /* [n_lp] one per generated token (when log-probabilities were asked for) */
    int n_lp, cap_lp;
    srv_tlp *top; /* [n_top] */
    int n_top, cap_top;
    srv_buf lptext; /* token strings of lp[] and top[] */
} srv_out;

/* Append src to dst (offsets rebased) and empty src. 0 or -1 out of memory. */
int srv_out_move(srv_out *dst, srv_out *src);
void srv_out_clear(srv_out *o); /* empty, keep memory */
void srv_out_free(srv_out *o);

/* ---- text pipeline of one generation (textout.c) ------------------------- *
 * Detokenized text goes in; it comes out as reasoning (between <think> and
 * </think>) or content, with stop strings cut. Text that may still become a
 * tag or a stop string is held back until it is known not to be one, so a
 * stop string or tag is never emitted, even split over tokens. */
enum { SRV_THINK_OFF = 0, SRV_THINK_DETECT = 1, SRV_THINK_INSIDE = 2 };

typedef struct {
    int think;      /* SRV_THINK_*: current mode */
    int strip_lead; /* drop whitespace before the first content after </think> */
    const char *const *stops;
    int n_stops;
    srv_buf pend; /* held back text */
} srv_text;

void srv_text_init(srv_text *t, int think, const char *const *stops, int n_stops);
/* Feed s[0..n). Returns 1 when a stop string was found (the text after it is
 * dropped and later pushes are ignored), 0, or -1 out of memory. */
int srv_text_push(srv_text *t, const char *s, size_t n, srv_buf *content, srv_buf *reasoning);
/* The generation ended: emit what is held back. */
int srv_text_finish(srv_text *t, srv_buf *content, srv_buf *reasoning);
void srv_text_free(srv_text *t);

/* Replace invalid UTF-8 in s[0..n) by U+FFFD, into out. */
int srv_utf8_clean(const char *s, size_t n, srv_buf *out);

/* ---- one request ---------------------------------------------------------- */
enum { SRV_CHAT = 0, SRV_COMPLETION = 1 };
enum { SRV_QUEUED = 0, SRV_RUNNING = 1, SRV_DONE = 2 };
enum { SRV_FIN_NONE = 0, SRV_FIN_STOP, SRV_FIN_LENGTH, SRV_FIN_CANCELLED, SRV_FIN_ERROR };

#define SRV_MAX_STOPS 16
#define SRV_MAX_STOP_LEN 256
#define SRV_MAX_TOP_LOGPROBS 20

typedef struct srv_req {
    /* set before submit, read-only afterwards */
    int kind;          /* SRV_CHAT / SRV_COMPLETION */
    int stream, include_usage;
    int logprobs;      /* nonzero: record each token's log-probability */
    int top_logprobs;  /* alternatives per token, 0..SRV_MAX_TOP_LOGPROBS */
    int ignore_eos;    /* benchmarks: end-of-generation tokens do not stop */
    int max_tokens;    /* most tokens to generate (end-of-generation included) */
    int think;         /* SRV_THINK_* at the start of the generation */
    tandem_sampling samp;
    char *stops[SRV_MAX_STOPS];
    int n_stops;
    int32_t *prompt; /* [n_prompt] */
    int n_prompt;
    char id[48];
    long long created;
    double t_submit; /* seconds, CLOCK_MONOTONIC */
    tandem_sampler *smp;

    /* engine thread only */
    int seq;        /* KV slot while running */
    int n_fed;      /* prompt tokens in the KV cache */
    int n_gen;      /* tokens sampled */
    int32_t last;   /* the last sampled token, fed at the next step */
    uint64_t order; /* admission order: prefill goes first come, first served */
    tandem_detok *dt, *dt1; /* the text stream; single tokens for log-probabilities */
    srv_text tx;
    srv_out stage;
    int fin_pending; /* SRV_FIN_* decided this step, published with stage */

    /* shared, under the scheduler's mutex */
    int state;  /* SRV_QUEUED / RUNNING / DONE */
    int cancel; /* the client went away: free the slot at the next step */
    int refs;   /* holders: the connection side and the scheduler */
    int finish; /* SRV_FIN_* once DONE */
    char errmsg[256];
    int n_completion; /* tokens generated so far */
    double t_first;   /* when the first token was published (0 = not yet) */
    srv_out out;
    pthread_cond_t cv; /* signalled when out, state or finish change */
} srv_req;

srv_req *srv_req_new(void);
/* Free a request nobody else holds (refs == 0) or one never submitted. */
void srv_req_free(srv_req *r);

/* ---- the scheduler (sched.c) --------------------------------------------- */
typedef struct srv_sched srv_sched;

typedef struct {
    int n_seq;         /* running sequences at most (KV slots) */
    int n_ctx;         /* tokens per sequence */
    int queue_max;     /* waiting requests at most */
    int prefill_chunk; /* prompt tokens per step at most */
} srv_sched_params;

int srv_sched_start(tandem_engine *e, const tandem_tokenizer *tok, const srv_sched_params *p, srv_sched **out,
                    char *err, size_t errlen);
/* Cancel whatever is left and join the engine thread. The object stays
 * usable by connection threads (submits are refused) until srv_sched_free. */
void srv_sched_stop(srv_sched *s);
void srv_sched_free(srv_sched *s);

enum { SRV_SUBMIT_OK = 0, SRV_SUBMIT_FULL = 1, SRV_SUBMIT_CLOSED = 2 };
/* Admission, before any parsing work: promise a place in the queue to a
 * request whose body is still to be read and parsed. SRV_SUBMIT_OK (a place
 * is held until srv_sched_submit or srv_sched_unreserve), FULL or CLOSED. */
int srv_sched_reserve(srv_sched *s);
void srv_sched_unreserve(srv_sched *s);
/* Queue r in the place reserved for it (the scheduler takes one reference;
 * the caller keeps its own). SRV_SUBMIT_OK or CLOSED; the place is given
 * back either way. */
int srv_sched_submit(srv_sched *s, srv_req *r);
/* The client is gone: drop r from the queue or free its slot at the next step. */
void srv_sched_cancel(srv_sched *s, srv_req *r);
/* Drop the caller's reference. */
void srv_sched_release(srv_sched *s, srv_req *r);
/* Refuse new requests from now on (drain). */
void srv_sched_close(srv_sched *s);

typedef struct {
    int running, queued, n_seq, queue_max, n_ctx, closed;
    long long requests, tokens_generated, steps;
} srv_stats;
void srv_sched_stats(srv_sched *s, srv_stats *st);

/* Block until r has output, is done, or timeout_ms passed. Moves r->out into
 * *into; returns r's state (SRV_DONE when finished, finish in *finish). */
int srv_sched_wait(srv_sched *s, srv_req *r, int timeout_ms, srv_out *into, int *finish, char *errmsg,
                   size_t errlen, int *n_completion);

/* ---- request parsing (request.c) ----------------------------------------- */
typedef struct {
    const tandem_tokenizer *tok;
    const char *model_id;  /* the served model's name */
    const char *model_dir; /* also accepted as the model name */
    int n_ctx, n_vocab;
    int think_token;       /* the tokenizer has a <think> token */
} srv_parse_ctx;

/* An error the client made, in OpenAI's terms. */
typedef struct {
    int status;        /* HTTP status */
    char message[512];
    const char *param; /* offending field or NULL */
    const char *code;  /* machine-readable code or NULL */
} srv_error;

/* Parse body[0..len) of a chat (kind SRV_CHAT) or completion request into a
 * new request (tokenized, sampler created). NULL with *e filled on error. */
srv_req *srv_parse_request(const srv_parse_ctx *c, int kind, const char *body, size_t len, srv_error *e);

/* ---- JSON out (respond.c) ----------------------------------------------- */
/* All return a malloc'd NUL-terminated string, or NULL out of memory. */
char *srv_error_json(int status, const char *message, const char *param, const char *code);
/* The whole response of a finished non-streaming request. */
char *srv_response_json(const srv_req *r, const char *model_id, const srv_out *o, int finish, int n_completion);

/* Streaming: SSE events appended to *sse. cursor carries the text offset of
 * completion log-probabilities between calls. */
typedef struct {
    int started;     /* the role chunk was sent */
    size_t text_off; /* characters of text sent (completions' text_offset) */
} srv_stream_pos;
int srv_stream_chunks(const srv_req *r, const char *model_id, srv_stream_pos *pos, const srv_out *o, srv_buf *sse);
int srv_stream_end(const srv_req *r, const char *model_id, srv_stream_pos *pos, int finish, const char *errmsg,
                   int n_completion, srv_buf *sse);

const char *srv_finish_str(int finish);

/* ---- HTTP (http.c) -------------------------------------------------------- */
typedef struct srv_http srv_http;

typedef struct {
    const char *host;
    int port;
    size_t max_body;
    int verbose;
    int max_conns;
    int timeout_s;          /* a connection idle this long, or a body taking longer to arrive, is closed */
    const char *api_key;    /* NULL: no authentication */
} srv_http_params;

int srv_http_start(const srv_http_params *p, srv_sched *sc, const srv_parse_ctx *pc, srv_http **out, int *port,
                   char *err, size_t errlen);
void srv_http_set_draining(srv_http *h);
/* Completion requests whose answer is not fully sent yet. */
int srv_http_active(srv_http *h);
void srv_http_stop(srv_http *h);

double srv_now(void);

/* ---- the connection watchdog (conns.c) -------------------------------------- */
/* Closes connections that wait too long for a request: header_s in all since
 * they opened or finished their last request, or about a second when more
 * than 3/4 of max_conns are open. `slot` is libmicrohttpd's socket context. */
typedef struct srv_conns srv_conns;

int srv_conns_start(int max_conns, double header_s, srv_conns **out);
/* After the daemon stopped (every connection closed). */
void srv_conns_stop(srv_conns *w);
void srv_conns_opened(srv_conns *w, int fd, void **slot);
void srv_conns_closed(srv_conns *w, void **slot);
/* A request's headers are in (1), or its answer is done (0: waiting again). */
void srv_conns_request(srv_conns *w, void *slot, int in_request);
void srv_conns_counts(srv_conns *w, int *open, long *cut_header, long *cut_pressure);

#endif
