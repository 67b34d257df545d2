/*
 * sched.c - continuous batching: one engine thread owns the session and runs
 * every sequence forward together.
 *
 * Each step:
 *   1. (locked)   free the KV slots of cancelled requests, admit queued ones
 *                 into free slots, first come first served;
 *   2. (unlocked) build one batch: one decode token for every sequence past
 *                 its prompt, then up to prefill_chunk prompt tokens of the
 *                 sequences still prefilling, oldest first; run
 *                 tandem_forward once; sample each sequence that has logits,
 *                 detokenize, split and cut its text into its `stage`;
 *   3. (locked)   move each stage into the request's `out`, finish requests
 *                 that ended (clearing their KV slot), wake their readers.
 * Requests therefore join and leave at token boundaries, and a long prompt
 * is prefilled over several steps while running streams keep decoding (at
 * most prefill_chunk extra tokens per step). Step 2 touches only state the
 * engine thread owns (slots change only in steps 1 and 3, by this thread),
 * so connection threads never wait for a forward pass.
 *
 * Per-sequence results do not depend on the batch as long as the forward
 * computes each token's row independently of the others (tests/server
 * checks this end to end).
 */
#include "server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct srv_sched {
    tandem_engine *e;
    tandem_session *s;
    const tandem_tokenizer *tok;
    srv_sched_params p;
    int n_vocab, n_batch;

    pthread_mutex_t mu;
    pthread_cond_t wake;  /* the engine thread waits here when idle */
    srv_req **queue;      /* [queue_cap] ring */
    int q_head, q_len, queue_cap;
    srv_req **slot;       /* [n_seq] the request holding each KV slot */
    int n_running, closed, quit, joined;
    int n_reserved;       /* places promised by srv_sched_reserve, not yet submitted */
    pthread_t th;
    long long n_requests, n_tokens, n_steps;

    /* engine thread only: the batch of one step */
    int32_t *b_tok, *b_pos, *b_seq; /* [n_batch] */
    int8_t *b_want;                 /* [n_batch] */
    srv_req **row;                  /* [n_seq] request of each wanted row */
    int *chunk;                     /* [n_seq] prompt tokens of slot i in this batch */
    srv_req **pf;                   /* [n_seq] prefilling requests, by age */
    uint64_t order;
    char err[512];                  /* forward error of this step */
};

double srv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- requests --------------------------------------------------------------- */

srv_req *srv_req_new(void)
{
    srv_req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&r->cv, &a);
    pthread_condattr_destroy(&a);
    if (rc) {
        free(r);
        return NULL;
    }
    r->seq = -1;
    return r;
}

/* The engine-side state of a generation (made at admission). */
static void gen_free(srv_req *r)
{
    tandem_detok_free(r->dt);
    tandem_detok_free(r->dt1);
    r->dt = r->dt1 = NULL;
    srv_text_free(&r->tx);
    srv_out_free(&r->stage);
}

void srv_req_free(srv_req *r)
{
    if (!r)
        return;
    gen_free(r);
    srv_out_free(&r->out);
    tandem_sampler_free(r->smp);
    for (int i = 0; i < r->n_stops; i++)
        free(r->stops[i]);
    free(r->prompt);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void release_locked(srv_req *r)
{
    if (--r->refs == 0)
        srv_req_free(r);
}

/* Slot i's request is over: free the slot and hand the result to the reader. */
static void finish_locked(srv_sched *s, int i, int fin, const char *msg)
{
    srv_req *r = s->slot[i];
    tandem_kv_clear(s->s, i);
    s->slot[i] = NULL;
    s->n_running--;
    if (r->stage.content.n || r->stage.reasoning.n || r->stage.n_lp)
        if (srv_out_move(&r->out, &r->stage) && fin != SRV_FIN_CANCELLED) {
            fin = SRV_FIN_ERROR;
            msg = "out of memory";
        }
    gen_free(r);
    r->n_completion = r->n_gen;
    r->state = SRV_DONE;
    r->finish = fin;
    if (msg)
        snprintf(r->errmsg, sizeof r->errmsg, "%s", msg);
    pthread_cond_broadcast(&r->cv);
    release_locked(r);
}

static void drop_queued_locked(srv_sched *s, srv_req *r, const char *msg)
{
    r->state = SRV_DONE;
    r->finish = SRV_FIN_CANCELLED;
    if (msg)
        snprintf(r->errmsg, sizeof r->errmsg, "%s", msg);
    pthread_cond_broadcast(&r->cv);
    release_locked(r);
    (void)s;
}

/* ---- one step --------------------------------------------------------------- */

static int admit_locked(srv_sched *s)
{
    for (int i = 0; i < s->p.n_seq && s->q_len > 0; i++) {
        if (s->slot[i])
            continue;
        srv_req *r = s->queue[s->q_head];
        s->q_head = (s->q_head + 1) % s->queue_cap;
        s->q_len--;
        r->seq = i;
        r->n_fed = r->n_gen = 0;
        r->fin_pending = SRV_FIN_NONE;
        r->order = ++s->order;
        srv_text_init(&r->tx, r->think, (const char *const *)r->stops, r->n_stops);
        s->slot[i] = r;
        s->n_running++;
        r->state = SRV_RUNNING;
        tandem_kv_clear(s->s, i);
        if (tandem_detok_create(s->tok, 1, &r->dt) || (r->logprobs && tandem_detok_create(s->tok, 0, &r->dt1)))
            finish_locked(s, i, SRV_FIN_ERROR, "out of memory");
        pthread_cond_broadcast(&r->cv);
    }
    return s->n_running;
}

/* Fill the step's batch; returns its token count. */
static int build_batch(srv_sched *s, int *n_rows)
{
    int n = 0, nw = 0, npf = 0;
    for (int i = 0; i < s->p.n_seq; i++) {
        srv_req *r = s->slot[i];
        s->chunk[i] = 0;
        if (!r)
            continue;
        if (r->n_fed < r->n_prompt) {
            s->pf[npf++] = r;
            continue;
        }
        s->b_tok[n] = r->last;
        s->b_pos[n] = r->n_prompt + r->n_gen - 1;
        s->b_seq[n] = i;
        s->b_want[n] = 1;
        s->row[nw++] = r;
        n++;
    }
    /* oldest prompts first, so a stream of new requests cannot starve one */
    for (int a = 1; a < npf; a++)
        for (int b = a; b > 0 && s->pf[b - 1]->order > s->pf[b]->order; b--) {
            srv_req *t = s->pf[b];
            s->pf[b] = s->pf[b - 1];
            s->pf[b - 1] = t;
        }
    int budget = s->p.prefill_chunk;
    for (int k = 0; k < npf && budget > 0; k++) {
        srv_req *r = s->pf[k];
        int m = r->n_prompt - r->n_fed < budget ? r->n_prompt - r->n_fed : budget;
        for (int j = 0; j < m; j++) {
            int at = r->n_fed + j;
            s->b_tok[n] = r->prompt[at];
            s->b_pos[n] = at;
            s->b_seq[n] = r->seq;
            s->b_want[n] = at == r->n_prompt - 1;
            if (s->b_want[n])
                s->row[nw++] = r;
            n++;
        }
        s->chunk[r->seq] = m;
        budget -= m;
    }
    *n_rows = nw;
    return n;
}

/* Text of one token, for log-probabilities. */
static int token_text(srv_req *r, int32_t id, uint32_t *off, uint32_t *len)
{
    char piece[1024];
    srv_buf *b = &r->stage.lptext;
    *off = (uint32_t)b->n;
    int k = tandem_detok_push(r->dt1, id, piece, sizeof piece);
    while (k > 0) {
        if (srv_buf_put(b, piece, (size_t)k))
            return -1;
        k = tandem_detok_flush(r->dt1, piece, sizeof piece);
    }
    *len = (uint32_t)(b->n - *off);
    return k < 0 ? -1 : 0;
}

/* Log-probabilities of id and of the top_logprobs best tokens: log-softmax
 * of the raw logits, all from one log-sum-exp so that they agree. */
static int record_logprobs(srv_sched *s, srv_req *r, int32_t id, const float *lg)
{
    srv_out *o = &r->stage;
    if (o->n_lp == o->cap_lp) {
        int c = o->cap_lp ? o->cap_lp * 2 : 64;
        srv_lp *p = realloc(o->lp, (size_t)c * sizeof *p);
        if (!p)
            return -1;
        o->lp = p;
        o->cap_lp = c;
    }
    int k = r->top_logprobs;
    int32_t best[SRV_MAX_TOP_LOGPROBS];
    int nb = 0;
    float m = -INFINITY;
    for (int v = 0; v < s->n_vocab; v++)
        m = lg[v] > m ? lg[v] : m;
    double sum = 0;
    for (int v = 0; v < s->n_vocab; v++) {
        sum += exp((double)lg[v] - m);
        if (k > 0 && (nb < k || lg[v] > lg[best[nb - 1]])) { /* insertion into the k best */
            int j = nb < k ? nb++ : k - 1;
            while (j > 0 && lg[best[j - 1]] < lg[v]) {
                best[j] = best[j - 1];
                j--;
            }
            best[j] = v;
        }
    }
    double lse = m + log(sum);
    srv_lp *l = &o->lp[o->n_lp];
    l->lp = (float)(lg[id] - lse);
    l->top0 = o->n_top;
    l->n_top = 0;
    if (token_text(r, id, &l->off, &l->len))
        return -1;
    o->n_lp++;
    if (o->n_top + nb > o->cap_top) {
        int c = o->cap_top ? o->cap_top : 64;
        while (c < o->n_top + nb)
            c *= 2;
        srv_tlp *p = realloc(o->top, (size_t)c * sizeof *p);
        if (!p)
            return -1;
        o->top = p;
        o->cap_top = c;
    }
    for (int j = 0; j < nb; j++) {
        srv_tlp *t = &o->top[o->n_top];
        t->lp = (float)(lg[best[j]] - lse);
        if (token_text(r, best[j], &t->off, &t->len))
            return -1;
        o->n_top++;
    }
    o->lp[o->n_lp - 1].n_top = nb;
    return 0;
}

/* The generation ended without a stop string: emit what is held back. */
static int end_text(srv_req *r)
{
    char piece[4096];
    int k, rc = 0;
    while ((k = tandem_detok_flush(r->dt, piece, sizeof piece)) > 0)
        if (srv_text_push(&r->tx, piece, (size_t)k, &r->stage.content, &r->stage.reasoning) < 0)
            rc = -1;
    if (k < 0 || srv_text_finish(&r->tx, &r->stage.content, &r->stage.reasoning) < 0)
        rc = -1;
    return rc;
}

/* Sample r's next token from its logits and turn it into text. */
static void on_logits(srv_sched *s, srv_req *r, const float *lg)
{
    int32_t id = tandem_sample(r->smp, lg, NULL);
    r->n_gen++;
    if (tandem_token_is_eog(s->tok, id) && !r->ignore_eos) {
        r->fin_pending = end_text(r) ? SRV_FIN_ERROR : SRV_FIN_STOP;
        return;
    }
    tandem_sampler_accept(r->smp, id);
    if (r->logprobs && record_logprobs(s, r, id, lg)) {
        r->fin_pending = SRV_FIN_ERROR;
        return;
    }
    char piece[4096];
    int k = tandem_detok_push(r->dt, id, piece, sizeof piece);
    int st = k > 0 ? srv_text_push(&r->tx, piece, (size_t)k, &r->stage.content, &r->stage.reasoning) : k;
    if (st < 0) {
        r->fin_pending = SRV_FIN_ERROR;
        return;
    }
    if (st == 1) {
        r->fin_pending = SRV_FIN_STOP;
        return;
    }
    /* the next step would feed id at n_prompt + n_gen - 1 */
    if (r->n_gen >= r->max_tokens || r->n_prompt + r->n_gen - 1 >= s->p.n_ctx) {
        r->fin_pending = end_text(r) ? SRV_FIN_ERROR : SRV_FIN_LENGTH;
        return;
    }
    r->last = id;
}

static void *engine_main(void *arg)
{
    srv_sched *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        for (int i = 0; i < s->p.n_seq; i++)
            if (s->slot[i] && (s->slot[i]->cancel || s->quit))
                finish_locked(s, i, SRV_FIN_CANCELLED, s->quit ? "the server is shutting down" : NULL);
        if (s->quit) {
            while (s->q_len > 0) {
                srv_req *r = s->queue[s->q_head];
                s->q_head = (s->q_head + 1) % s->queue_cap;
                s->q_len--;
                drop_queued_locked(s, r, "the server is shutting down");
            }
            break;
        }
        if (!admit_locked(s)) {
            pthread_cond_wait(&s->wake, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);

        int n_rows = 0, n = build_batch(s, &n_rows), failed = 0;
        tandem_batch b = { n, s->b_tok, s->b_pos, s->b_seq, s->b_want };
        if (n > 0 && tandem_forward(s->s, &b, s->err, sizeof s->err)) {
            failed = 1;
        } else {
            for (int i = 0; i < s->p.n_seq; i++)
                if (s->slot[i])
                    s->slot[i]->n_fed += s->chunk[i];
            for (int i = 0; i < n_rows; i++)
                on_logits(s, s->row[i], tandem_logits(s->s, i));
        }

        pthread_mutex_lock(&s->mu);
        s->n_steps++;
        s->n_tokens += n_rows;
        for (int i = 0; i < s->p.n_seq; i++) {
            srv_req *r = s->slot[i];
            if (!r)
                continue;
            if (failed) {
                finish_locked(s, i, SRV_FIN_ERROR, s->err);
                continue;
            }
            int fin = r->fin_pending;
            if (!fin && srv_out_move(&r->out, &r->stage))
                fin = SRV_FIN_ERROR;
            r->n_completion = r->n_gen;
            if (r->n_gen && !r->t_first)
                r->t_first = srv_now();
            if (fin)
                finish_locked(s, i, fin, fin == SRV_FIN_ERROR ? "generation failed (out of memory)" : NULL);
            else
                pthread_cond_broadcast(&r->cv);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- API -------------------------------------------------------------------- */

int srv_sched_start(tandem_engine *e, const tandem_tokenizer *tok, const srv_sched_params *p, srv_sched **out,
                    char *err, size_t errlen)
{
    *out = NULL;
    srv_sched *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return TANDEM_ENOMEM;
    }
    s->e = e;
    s->tok = tok;
    s->p = *p;
    s->n_vocab = tandem_n_vocab(e);
    s->n_batch = p->n_seq + p->prefill_chunk;
    s->queue_cap = p->queue_max + p->n_seq + 1;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_seq = p->n_seq;
    sp.n_ctx = p->n_ctx;
    sp.n_batch = s->n_batch;
    sp.n_outputs = p->n_seq; /* a sequence wants at most one row per step */
    int rc = tandem_session_create(e, &sp, &s->s, err, errlen);
    if (rc) {
        free(s);
        return rc;
    }
    s->queue = calloc((size_t)s->queue_cap, sizeof *s->queue);
    s->slot = calloc((size_t)p->n_seq, sizeof *s->slot);
    s->b_tok = malloc((size_t)s->n_batch * sizeof *s->b_tok);
    s->b_pos = malloc((size_t)s->n_batch * sizeof *s->b_pos);
    s->b_seq = malloc((size_t)s->n_batch * sizeof *s->b_seq);
    s->b_want = malloc((size_t)s->n_batch);
    s->row = calloc((size_t)p->n_seq, sizeof *s->row);
    s->chunk = calloc((size_t)p->n_seq, sizeof *s->chunk);
    s->pf = calloc((size_t)p->n_seq, sizeof *s->pf);
    if (!s->queue || !s->slot || !s->b_tok || !s->b_pos || !s->b_seq || !s->b_want || !s->row || !s->chunk ||
        !s->pf)
        goto oom;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->wake, NULL);
    if ((errno = pthread_create(&s->th, NULL, engine_main, s)) != 0) {
        snprintf(err, errlen, "cannot start the engine thread: %s", strerror(errno));
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->wake);
        rc = TANDEM_ENOMEM;
        goto fail;
    }
    *out = s;
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    rc = TANDEM_ENOMEM;
fail:
    tandem_session_free(s->s);
    free(s->queue);
    free(s->slot);
    free(s->b_tok);
    free(s->b_pos);
    free(s->b_seq);
    free(s->b_want);
    free(s->row);
    free(s->chunk);
    free(s->pf);
    free(s);
    return rc;
}

void srv_sched_stop(srv_sched *s)
{
    if (!s || s->joined)
        return;
    pthread_mutex_lock(&s->mu);
    s->quit = s->closed = 1;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    s->joined = 1;
}

void srv_sched_free(srv_sched *s)
{
    if (!s)
        return;
    srv_sched_stop(s);
    tandem_session_free(s->s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->wake);
    free(s->queue);
    free(s->slot);
    free(s->b_tok);
    free(s->b_pos);
    free(s->b_seq);
    free(s->b_want);
    free(s->row);
    free(s->chunk);
    free(s->pf);
    free(s);
}

/* A place is free when the waiting requests, those about to wait (reserved)
 * and this one fit in the free slots plus queue_max. */
int srv_sched_reserve(srv_sched *s)
{
    pthread_mutex_lock(&s->mu);
    int rc = SRV_SUBMIT_OK;
    int free_slots = s->p.n_seq - s->n_running;
    if (s->closed)
        rc = SRV_SUBMIT_CLOSED;
    else if (s->q_len + s->n_reserved - free_slots >= s->p.queue_max ||
             s->q_len + s->n_reserved >= s->queue_cap)
        rc = SRV_SUBMIT_FULL;
    else
        s->n_reserved++;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void srv_sched_unreserve(srv_sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->n_reserved--;
    pthread_mutex_unlock(&s->mu);
}

int srv_sched_submit(srv_sched *s, srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    int rc = s->closed ? SRV_SUBMIT_CLOSED : SRV_SUBMIT_OK;
    s->n_reserved--; /* the place reserved for r: the queue has room for it */
    if (rc == SRV_SUBMIT_OK) {
        s->queue[(s->q_head + s->q_len) % s->queue_cap] = r;
        s->q_len++;
        r->refs++;
        r->state = SRV_QUEUED;
        r->t_submit = srv_now();
        s->n_requests++;
        pthread_cond_signal(&s->wake);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void srv_sched_cancel(srv_sched *s, srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    r->cancel = 1;
    if (r->state == SRV_QUEUED) {
        for (int k = 0; k < s->q_len; k++) {
            int at = (s->q_head + k) % s->queue_cap;
            if (s->queue[at] != r)
                continue;
            for (int j = k; j + 1 < s->q_len; j++)
                s->queue[(s->q_head + j) % s->queue_cap] = s->queue[(s->q_head + j + 1) % s->queue_cap];
            s->q_len--;
            drop_queued_locked(s, r, NULL);
            break;
        }
    }
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->mu);
}

void srv_sched_release(srv_sched *s, srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    release_locked(r);
    pthread_mutex_unlock(&s->mu);
}

void srv_sched_close(srv_sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->closed = 1;
    pthread_mutex_unlock(&s->mu);
}

void srv_sched_stats(srv_sched *s, srv_stats *st)
{
    pthread_mutex_lock(&s->mu);
    st->running = s->n_running;
    st->queued = s->q_len;
    st->n_seq = s->p.n_seq;
    st->queue_max = s->p.queue_max;
    st->n_ctx = s->p.n_ctx;
    st->closed = s->closed;
    st->requests = s->n_requests;
    st->tokens_generated = s->n_tokens;
    st->steps = s->n_steps;
    pthread_mutex_unlock(&s->mu);
}

int srv_sched_wait(srv_sched *s, srv_req *r, int timeout_ms, srv_out *into, int *finish, char *errmsg,
                   size_t errlen, int *n_completion)
{
    pthread_mutex_lock(&s->mu);
    int empty = !r->out.content.n && !r->out.reasoning.n && !r->out.n_lp;
    if (empty && r->state != SRV_DONE && timeout_ms > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += timeout_ms / 1000;
        ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->cv, &s->mu, &ts);
    }
    int state = r->state;
    if (srv_out_move(into, &r->out)) {
        /* the reader could not take the text: end it as an error */
        state = SRV_DONE;
        *finish = SRV_FIN_ERROR;
        snprintf(errmsg, errlen, "out of memory");
    } else {
        *finish = r->finish;
        if (errmsg)
            snprintf(errmsg, errlen, "%s", r->errmsg);
    }
    if (n_completion)
        *n_completion = r->n_completion;
    if (state != SRV_DONE)
        *finish = SRV_FIN_NONE;
    pthread_mutex_unlock(&s->mu);
    return state;
}
