/*
 * pool.h - the persistent CPU thread pool every kernel runs on.
 *
 * Work is a range of items [0, n) cut into chunks; threads claim chunks from
 * an atomic counter, so uneven items (experts with many tokens next to experts
 * with one) balance by themselves. A kernel is one signature:
 *
 *     void fn(void *ctx, int64_t begin, int64_t end);
 *
 * with its arguments packed in a small ctx struct. The calling thread takes
 * part as thread 0; pool_run() returns when every item is done.
 *
 * Threads are split into partitions (one per NUMA node, or a requested number
 * on one node, for testing). pool_run_parts() runs the whole range once in
 * every partition, each with its own counter: a kernel reads pool_part() to
 * pick its slice (NUMA tensor parallelism: each node computes its slice of
 * every expert). Workers are pinned to cores, spin briefly after a job and
 * then sleep on a futex.
 *
 * Any thread may call pool_run(); calls from several threads take turns, a
 * whole job each (sessions of one engine share its cores one forward step at
 * a time). A pool_run() from inside a job runs on the calling thread alone.
 */
#ifndef TD_POOL_H
#define TD_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct pool pool;
typedef void (*pool_fn)(void *ctx, int64_t begin, int64_t end);

/* n_threads 0 = one per core the process may run on; more than that is
 * reduced to it, with a warning (spinning workers without a core of their
 * own slow every job down). n_parts 0 = one per NUMA node holding those
 * cores. */
int pool_create(pool **out, int n_threads, int n_parts, char *err, size_t errlen);
void pool_free(pool *p);

int pool_size(const pool *p);
int pool_nparts(const pool *p);
int pool_part_size(const pool *p, int part);

/* Run fn over [0, n) in chunks of `chunk` items (0 = pick one). */
void pool_run(pool *p, int64_t n, int64_t chunk, pool_fn fn, void *ctx);
/* Run fn over [0, n) once per partition, on that partition's threads. */
void pool_run_parts(pool *p, int64_t n, int64_t chunk, pool_fn fn, void *ctx);

/* Make the calling thread the pool's thread 0 (the caller's role in
 * pool_run): pinned to thread 0's core when the pool pins its workers. For a
 * thread other than the one that created the pool that drives it, such as the
 * hybrid hand-off watcher, which would otherwise float onto a worker's core. */
void pool_bind_caller(const pool *p);

int pool_tid(void);   /* calling thread's index in its pool, 0..size-1 */
int pool_part(void);  /* calling thread's partition */
int pool_part_tid(void); /* index inside the partition */

#endif
