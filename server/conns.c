/*
 * conns.c - a watchdog over the server's open connections, for the deadlines
 * libmicrohttpd does not keep.
 *
 * libmicrohttpd closes a connection that stays silent for its idle timeout,
 * but any byte restarts that clock: a client sending its headers a byte every
 * few seconds would hold a connection thread forever, and enough of them
 * would fill --max-conns. The watchdog keeps a list of the open connections
 * and, for each one that is not inside a request (its headers are not all in
 * yet, or it sits idle between keep-alive requests), the time it started
 * waiting. Two rules, checked a few times a second:
 *   - a header deadline: waiting longer than header_s in all (not since the
 *     last byte) closes it;
 *   - under pressure (more than 3/4 of max_conns open), waiting longer than
 *     PRESSURE_S closes it, so a flood of idle connections gives way to
 *     clients with requests within about a second.
 * Inside a request the http side has its own rules (a body deadline; a
 * running generation watches its client for hang-ups instead).
 *
 * Closing is shutdown(2) on the socket: libmicrohttpd's connection thread then
 * reads end-of-file and closes the connection its own way. A connection's
 * entry leaves the list, under the list's lock, in libmicrohttpd's "closed"
 * notification, which it sends before it closes the socket, so the watchdog
 * never shuts down a descriptor that was closed and reused.
 */
#include "server.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#define PRESSURE_S 1.0
#define TICK_NS 200000000L /* 0.2 s between checks */

typedef struct srv_conn_slot {
    struct srv_conn_slot *prev, *next;
    int fd;
    int in_request;
    int cut; /* shut down already: not again */
    double since; /* when it started waiting for a request's headers */
} srv_conn_slot;

struct srv_conns {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    srv_conn_slot *head;
    int n, max_conns, stop;
    double header_s;
    long cut_header, cut_pressure;
};

static void *watch(void *arg)
{
    srv_conns *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        double now = srv_now();
        int pressure = w->n * 4 > w->max_conns * 3;
        for (srv_conn_slot *s = w->head; s; s = s->next) {
            if (s->in_request || s->cut)
                continue;
            double waited = now - s->since;
            if (waited > w->header_s || (pressure && waited > PRESSURE_S)) {
                shutdown(s->fd, SHUT_RDWR);
                s->cut = 1;
                if (waited > w->header_s)
                    w->cut_header++;
                else
                    w->cut_pressure++;
            }
        }
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += TICK_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&w->cv, &w->mu, &until);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int srv_conns_start(int max_conns, double header_s, srv_conns **out)
{
    *out = NULL;
    srv_conns *w = calloc(1, sizeof *w);
    if (!w)
        return TANDEM_ENOMEM;
    w->max_conns = max_conns;
    w->header_s = header_s;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (pthread_create(&w->thread, NULL, watch, w)) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        free(w);
        return TANDEM_ENOMEM;
    }
    *out = w;
    return 0;
}

void srv_conns_stop(srv_conns *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    /* the daemon has stopped: every connection sent its "closed" notification */
    while (w->head) {
        srv_conn_slot *s = w->head;
        w->head = s->next;
        free(s);
    }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}

void srv_conns_opened(srv_conns *w, int fd, void **slot)
{
    srv_conn_slot *s = calloc(1, sizeof *s);
    *slot = s;
    if (!s)
        return; /* not watched: libmicrohttpd's idle timeout still applies */
    s->fd = fd;
    s->since = srv_now();
    pthread_mutex_lock(&w->mu);
    s->next = w->head;
    if (w->head)
        w->head->prev = s;
    w->head = s;
    w->n++;
    pthread_mutex_unlock(&w->mu);
}

void srv_conns_closed(srv_conns *w, void **slot)
{
    srv_conn_slot *s = *slot;
    *slot = NULL;
    if (!s)
        return;
    pthread_mutex_lock(&w->mu);
    if (s->prev)
        s->prev->next = s->next;
    else
        w->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    w->n--;
    pthread_mutex_unlock(&w->mu);
    free(s);
}

void srv_conns_request(srv_conns *w, void *slot, int in_request)
{
    srv_conn_slot *s = slot;
    if (!s)
        return;
    pthread_mutex_lock(&w->mu);
    s->in_request = in_request;
    if (!in_request)
        s->since = srv_now();
    pthread_mutex_unlock(&w->mu);
}

void srv_conns_counts(srv_conns *w, int *open, long *cut_header, long *cut_pressure)
{
    pthread_mutex_lock(&w->mu);
    *open = w->n;
    *cut_header = w->cut_header;
    *cut_pressure = w->cut_pressure;
    pthread_mutex_unlock(&w->mu);
}
