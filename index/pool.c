/* pool.c — a fixed pthread pool with a shared job queue.
 *
 * msa_idx_pool_run puts a job (living on the caller's stack) at the tail of the
 * queue, wakes the workers, then claims tasks of its OWN job until none are
 * left and waits for the ones other threads claimed. Workers take tasks from
 * the job at the head of the queue; a job leaves the queue when its last task
 * has been claimed. So concurrent callers never wait for each other's work,
 * and a task may itself call msa_idx_pool_run (the nested caller works on its
 * own job). Tasks are claimed one at a time with an atomic counter.
 */
#include "kernels.h"
#include "msa_alloc.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct job {
    void (*fn)(void *arg, size_t task, unsigned worker);
    void *arg;
    size_t ntasks;
    atomic_size_t next; /* next task to claim */
    atomic_size_t done; /* tasks finished */
    struct job *qnext;  /* queue link (under the pool lock) */
    bool queued;
} job_t;

struct msa_idx_pool {
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* workers: a job was queued, or stop */
    pthread_cond_t done_cv; /* callers: some job finished */
    job_t *head, *tail;
    bool stop;
    unsigned n;
    pthread_t *threads;
};

typedef struct {
    msa_idx_pool_t *p;
    unsigned idx;
} worker_arg_t;

/* Unlinks j from the queue (lock held). */
static void dequeue(msa_idx_pool_t *p, job_t *j)
{
    if (!j->queued) return;
    job_t **pp = &p->head, *prev = NULL;
    while (*pp && *pp != j) {
        prev = *pp;
        pp = &(*pp)->qnext;
    }
    if (*pp) {
        *pp = j->qnext;
        if (p->tail == j) p->tail = prev;
    }
    j->queued = false;
}

/* Runs tasks of j until none is left to claim; returns how many this thread ran. */
static size_t drain(job_t *j, unsigned worker)
{
    size_t ran = 0;
    for (;;) {
        size_t t = atomic_fetch_add(&j->next, 1);
        if (t >= j->ntasks) break;
        j->fn(j->arg, t, worker);
        ran++;
    }
    return ran;
}

/* Counts ran finished tasks of j. After the add j may be gone (its caller
 * returns once all are done), so ntasks is read before it. */
static void finish_tasks(msa_idx_pool_t *p, job_t *j, size_t ran)
{
    const size_t ntasks = j->ntasks;
    if (atomic_fetch_add(&j->done, ran) + ran == ntasks) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->done_cv);
        pthread_mutex_unlock(&p->mu);
    }
}

static void *worker_main(void *a)
{
    worker_arg_t *wa = a;
    msa_idx_pool_t *p = wa->p;
    const unsigned idx = wa->idx;
    free(wa);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && !p->head) pthread_cond_wait(&p->work_cv, &p->mu);
        if (p->stop) break;
        job_t *j = p->head;
        /* Claim one task under the lock so the job cannot finish (and leave
         * its caller's stack) before we hold a claim on it. */
        size_t t = atomic_fetch_add(&j->next, 1);
        if (t + 1 >= j->ntasks) dequeue(p, j);
        if (t >= j->ntasks) continue;
        pthread_mutex_unlock(&p->mu);
        j->fn(j->arg, t, idx);
        size_t ran = 1 + drain(j, idx);
        finish_tasks(p, j, ran);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int msa_idx_pool_create(unsigned nthreads, msa_idx_pool_t **out)
{
    *out = NULL;
    if (nthreads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nthreads = n > 0 ? (unsigned)n : 1;
    }
    msa_idx_pool_t *p = msa_calloc(1, sizeof *p);
    if (!p) return MSA_ENOMEM;
    p->threads = msa_calloc(nthreads, sizeof *p->threads);
    if (!p->threads) {
        free(p);
        return MSA_ENOMEM;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    for (unsigned i = 0; i < nthreads; i++) {
        worker_arg_t *wa = msa_malloc(sizeof *wa);
        if (wa) {
            wa->p = p;
            wa->idx = i;
        }
        if (!wa || pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            msa_idx_pool_destroy(p);
            return MSA_ENOMEM;
        }
        p->n++;
    }
    *out = p;
    return MSA_OK;
}

void msa_idx_pool_destroy(msa_idx_pool_t *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

unsigned msa_idx_pool_size(const msa_idx_pool_t *p)
{
    return p ? p->n : 0;
}

void msa_idx_pool_run(msa_idx_pool_t *p, size_t ntasks,
                      void (*fn)(void *arg, size_t task, unsigned worker), void *arg)
{
    if (ntasks == 0) return;
    if (!p || p->n == 0 || ntasks == 1) {
        const unsigned w = msa_idx_pool_size(p);
        for (size_t t = 0; t < ntasks; t++) fn(arg, t, w);
        return;
    }
    job_t j = {.fn = fn, .arg = arg, .ntasks = ntasks, .qnext = NULL, .queued = true};
    atomic_init(&j.next, 0);
    atomic_init(&j.done, 0);
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->qnext = &j;
    else
        p->head = &j;
    p->tail = &j;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);

    size_t ran = drain(&j, p->n);

    pthread_mutex_lock(&p->mu);
    dequeue(p, &j); /* all claimed: no worker may pick it up any more */
    size_t done = atomic_fetch_add(&j.done, ran) + ran;
    while (done < ntasks) {
        pthread_cond_wait(&p->done_cv, &p->mu);
        done = atomic_load(&j.done);
    }
    pthread_mutex_unlock(&p->mu);
}
