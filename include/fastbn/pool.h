/* fastbn — the thread pool: a call's stages, run by its caller and whichever workers come.
 *
 * A job is a list of stages, each a number of work items; an item of stage s starts once every
 * item of the stages before s is done (the barrier between stages). Items are claimed a few at
 * a time from one counter, in order, by the caller and by the workers it woke. Nobody waits for a
 * worker that has claimed nothing: a worker the OS has not scheduled yet finds nothing left
 * when it runs, the caller having done its share. The only waits are for items already
 * claimed, by threads that were running a moment ago.
 *
 * Why not an OpenMP region (what fastbn used before): an OpenMP team's barriers and the end of
 * its region wait for every thread of the team, scheduled or not, and its idle workers spin
 * for milliseconds after a region, taking a core from the caller's own work in between. On a
 * machine with another busy process, calls took 10-250x their one-thread time
 * (docs/tuning.md, "Threads under contention"). And GNU libgomp's team does not survive fork:
 * this pool starts again in a forked child (fbn_pool_after_fork).
 *
 * Results do not depend on who runs an item: the items are fixed by the problem's shape
 * (fastbn/_plan.pyx), and each writes its own part of the output.
 *
 * A build without OpenMP (whose thread-count settings are fastbn's defaults) and one without
 * POSIX threads (Windows) run every job on its caller. */
#ifndef FASTBN_POOL_H
#define FASTBN_POOL_H

#include <stddef.h>
#include <stdint.h>

/* Item `item` of its stage, run by participant `who`: 0 the caller, 1.. the workers
 * (an index into per-thread scratch space). */
typedef void (*fbn_item_fn)(void *ctx, ptrdiff_t item, int who);

typedef struct {
    fbn_item_fn run;
    ptrdiff_t nitems;
} fbn_stage;

enum { FBN_MAX_STAGES = 4, FBN_MAX_WORKERS = 255 };

/* Run the stages in order on the caller alone. */
static void fbn_run_serial(const fbn_stage *stages, int nstages, void *ctx)
{
    for (int s = 0; s < nstages; s++)
        for (ptrdiff_t i = 0; i < stages[s].nitems; i++)
            stages[s].run(ctx, i, 0);
}

/* How long an idle worker polls for the next job before it sleeps: long enough that calls in
 * a loop find their workers awake, short enough that a worker gives its core back to the
 * caller's work between calls (docs/tuning.md). -1: never sleep (OMP_WAIT_POLICY=active). */
#define FBN_SPIN_NS_DEFAULT 50000

/* After a job that the machine's other work slowed down (the caller waited for workers, or
 * the OS ran something else in its place, for half the job's time and 50 us or more; or
 * workers never came to a long job), no sleeping worker is woken for a while: the machine is
 * busy, and one thread is what this process gets (calls back to back still find their workers
 * polling, and use them). The while doubles with each late job of an episode, which ends
 * after FBN_EPISODE_ON_TIME jobs in a row on time: one on-time job among late ones is no sign
 * the machine is free (with one busy process on 2 cores about two jobs in three were late,
 * on-time ones between them, and a wait begun again at 2 ms after each let every other call
 * wake workers that came late; docs/tuning.md). (A worker waking from sleep is no sign: it
 * comes within tens of microseconds, and the caller does not wait for it meanwhile.) */
#define FBN_BACKOFF_MIN_NS 2000000LL        /* 2 ms */
#define FBN_BACKOFF_MAX_NS 100000000LL      /* 0.1 s */
#define FBN_EPISODE_ON_TIME 4

typedef struct {
    long long next_ns;          /* the wait after the next late job */
    int on_time_run;            /* jobs on time since the last late one */
} fbn_backoff;

#define FBN_BACKOFF_START {.next_ns = FBN_BACKOFF_MIN_NS, .on_time_run = FBN_EPISODE_ON_TIME}

static fbn_backoff fbn_backoff_start(void) { return (fbn_backoff)FBN_BACKOFF_START; }

/* The back-off after a job, late or on time: the nanoseconds for which no sleeping worker is
 * woken from now (0 after an on-time job). */
static long long fbn_backoff_after(fbn_backoff *b, int late)
{
    if (!late) {
        if (b->on_time_run < FBN_EPISODE_ON_TIME && ++b->on_time_run == FBN_EPISODE_ON_TIME)
            b->next_ns = FBN_BACKOFF_MIN_NS;
        return 0;
    }
    const long long wait = b->next_ns;
    b->next_ns = 2 * wait < FBN_BACKOFF_MAX_NS ? 2 * wait : FBN_BACKOFF_MAX_NS;
    b->on_time_run = 0;
    return wait;
}

/* Whom a job asks (fbn_pool_run's `wake`). A worker asleep takes tens of microseconds to wake,
 * and waking it costs the caller a system call; after a pause in the caller's calls it also
 * finds caches the caller's other work has not warmed. */
enum {
    FBN_WAKE_NONE,      /* a short call: only workers awake now */
    FBN_WAKE_IN_LOOPS,  /* workers asleep too, when the call comes back to back with the last */
    FBN_WAKE_ALWAYS     /* workers asleep too */
};

#if defined(_OPENMP) && !defined(_WIN32)
#define FBN_POOL 1
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__linux__)
#  include <dirent.h>
#  include <stdio.h>
#  include <stdlib.h>
#  include <string.h>
#  include <sys/syscall.h>
#  include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#  include <immintrin.h>
#  define fbn_cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#  define fbn_cpu_relax() __asm__ __volatile__("yield")
#else
#  define fbn_cpu_relax() ((void)0)
#endif


#define FBN_LONG_JOB_NS 200000LL            /* a worker that slept wakes well within this */
#define FBN_CLAIMS_PER_THREAD 4             /* claims a stage's items are taken in */
#define FBN_OMP_WINDOW_NS 20000000LL        /* 20 ms: see fbn_omp_run */
#define FBN_OMP_RETRY_NS 100000000LL        /* 0.1 s */
#define FBN_LATE_NS 50000LL                 /* a wait this long is the OS's doing, not the
                                               last item's: items are shorter */

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    _Atomic uint32_t job;       /* the job it is asked to help with (a generation) */
    _Atomic int sleeping;
    _Atomic int poked;          /* woken to poll again, with no job (see fbn_pool_run) */
    _Atomic long tid;           /* its Linux thread id (0 elsewhere) */
    int index;                  /* its `who`: 1.. */
} fbn_worker;

/* The job, published in this order: the stages, then `total`, then `ticket`. Generations tag
 * the two counters so that a worker still looking at an old job can't claim from a new one. */
static struct {
    pthread_mutex_t busy;              /* one job at a time; a second caller runs alone */
    fbn_worker workers[FBN_MAX_WORKERS];
    int nworkers;                      /* started */
    _Atomic long long spin_ns;
    uint32_t generation;
    fbn_stage stages[FBN_MAX_STAGES];
    ptrdiff_t stage_end[FBN_MAX_STAGES];   /* items before the end of each stage */
    ptrdiff_t claim[FBN_MAX_STAGES];       /* items a claim takes in each stage */
    void *ctx;
    _Atomic uint64_t total;            /* generation << 32 | items of all stages */
    _Atomic uint64_t ticket;           /* generation << 32 | next unclaimed item */
    _Atomic ptrdiff_t done;            /* items finished */
    _Atomic int helpers;               /* workers that ran an item of the last job */
    long long caller_waited_ns;        /* the caller's waits for others' items, this job */
    _Atomic long long quiet_again_ns;  /* no sleeping worker is woken before then */
    _Atomic long long omp_until_ns;    /* jobs run in an OpenMP region until then */
    long long omp_useless_until_ns;    /* a region was slowed too: none before then */
    int omp_broken;                    /* a forked child: GNU libgomp does not survive fork */
    _Atomic long long last_end_ns;     /* when the last call ended */
    fbn_backoff backoff;
    _Atomic int workers_away;          /* tests: workers take no items, as if the OS never
                                          scheduled them */
    int no_backoff;                    /* tests: never stop waking workers */
} fbn_pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .spin_ns = FBN_SPIN_NS_DEFAULT,
             .backoff = FBN_BACKOFF_START};

static long long fbn_clock_ns(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static long long fbn_now_ns(void) { return fbn_clock_ns(CLOCK_MONOTONIC); }

/* This thread's CPU time: a system call, unlike fbn_now_ns, so only long jobs read it. */
static long long fbn_cpu_ns(void) { return fbn_clock_ns(CLOCK_THREAD_CPUTIME_ID); }

/* Wait until at least `count` items are done. The items waited for are claimed, so their
 * threads are running, or were: poll. (Not sched_yield: the core would go to whatever else is
 * runnable, such as another library's spinning OpenMP workers, for a whole time slice.)
 * Returns the nanoseconds waited (0 when nothing was left to wait for). */
static long long fbn_wait_done(ptrdiff_t count)
{
    if (atomic_load_explicit(&fbn_pool.done, memory_order_acquire) >= count)
        return 0;
    long long start = fbn_now_ns();
    while (atomic_load_explicit(&fbn_pool.done, memory_order_acquire) < count)
        fbn_cpu_relax();
    return fbn_now_ns() - start;
}

/* Claim and run items of job `generation` until none is left: a few at a time where a stage
 * has many (each claim is a cache line passed between cores). Returns whether it ran any. */
static int fbn_take_items(uint32_t generation, int who)
{
    int ran = 0;
    for (;;) {
        uint64_t ticket = atomic_load_explicit(&fbn_pool.ticket, memory_order_acquire);
        uint64_t total = atomic_load_explicit(&fbn_pool.total, memory_order_acquire);
        if ((uint32_t)(ticket >> 32) != generation || (uint32_t)(total >> 32) != generation)
            return ran;                               /* that job is over */
        ptrdiff_t item = (ptrdiff_t)(uint32_t)ticket;
        if (item >= (ptrdiff_t)(uint32_t)total)
            return ran;                               /* all claimed */
        int s = 0;                     /* this job's stage while the claim below succeeds */
        while (item >= fbn_pool.stage_end[s])
            s++;
        const ptrdiff_t end = fbn_pool.stage_end[s];
        const ptrdiff_t n = end - item < fbn_pool.claim[s] ? end - item : fbn_pool.claim[s];
        if (!atomic_compare_exchange_weak_explicit(&fbn_pool.ticket, &ticket,
                                                   ticket + (uint64_t)n,
                                                   memory_order_acq_rel, memory_order_relaxed))
            continue;
        /* The items are ours, so the job is not over and its stages are still this job's */
        if (!ran && who > 0)
            atomic_fetch_add_explicit(&fbn_pool.helpers, 1, memory_order_relaxed);
        const ptrdiff_t first = s == 0 ? 0 : fbn_pool.stage_end[s - 1];
        long long waited = fbn_wait_done(first);      /* the barrier before stage s */
        if (who == 0)
            fbn_pool.caller_waited_ns += waited;
        for (ptrdiff_t i = item; i < item + n; i++)
            fbn_pool.stages[s].run(fbn_pool.ctx, i - first, who);
        atomic_fetch_add_explicit(&fbn_pool.done, n, memory_order_release);
        ran = 1;
    }
}

static long fbn_thread_id(void)
{
#if defined(__linux__)
    return (long)syscall(SYS_gettid);
#else
    return 0;
#endif
}

static void *fbn_worker_main(void *arg)
{
    fbn_worker *self = (fbn_worker *)arg;
    atomic_store(&self->tid, fbn_thread_id());
    uint32_t seen = atomic_load(&self->job);
    for (;;) {
        long long idle_since = fbn_now_ns();
        for (unsigned polls = 1; atomic_load_explicit(&self->job, memory_order_acquire) == seen;
             polls++) {
            fbn_cpu_relax();
            if (polls % 256 != 0)
                continue;
            long long spin_ns = atomic_load_explicit(&fbn_pool.spin_ns, memory_order_relaxed);
            if (spin_ns >= 0 && fbn_now_ns() - idle_since > spin_ns) {
                pthread_mutex_lock(&self->lock);
                atomic_store(&self->sleeping, 1);     /* seq_cst: see fbn_pool_run */
                while (atomic_load(&self->job) == seen && !atomic_load(&self->poked))
                    pthread_cond_wait(&self->wake, &self->lock);
                atomic_store(&self->poked, 0);
                atomic_store(&self->sleeping, 0);
                pthread_mutex_unlock(&self->lock);
                idle_since = fbn_now_ns();            /* poked: poll for the next job */
            }
        }
        seen = atomic_load_explicit(&self->job, memory_order_acquire);
        if (!atomic_load_explicit(&fbn_pool.workers_away, memory_order_relaxed))
            fbn_take_items(seen, self->index);
    }
    return NULL;
}

/* Whether a thread of this process other than the caller and the pool's workers is runnable
 * now: another library's OpenMP workers spinning after its call (PyTorch's, ONNX Runtime's),
 * which stop by themselves within milliseconds. A late job with none of them was slowed by
 * other processes. Linux (/proc); elsewhere, no. */
static int fbn_others_running(void)
{
#if defined(__linux__)
    DIR *tasks = opendir("/proc/self/task");
    if (tasks == NULL)
        return 0;
    const long caller = fbn_thread_id();
    int found = 0;
    for (struct dirent *e; !found && (e = readdir(tasks)) != NULL;) {
        const long tid = strtol(e->d_name, NULL, 10);
        int ours = tid <= 0 || tid == caller;
        for (int k = 0; !ours && k < fbn_pool.nworkers; k++)
            ours = atomic_load(&fbn_pool.workers[k].tid) == tid;
        if (ours)
            continue;
        char path[64], stat[512];
        snprintf(path, sizeof path, "/proc/self/task/%ld/stat", tid);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue;
        const size_t n = fread(stat, 1, sizeof stat - 1, f);
        fclose(f);
        stat[n] = '\0';
        const char *state = strrchr(stat, ')');        /* "tid (name) S ...": after the name */
        found = state != NULL && state[1] == ' ' && state[2] == 'R';
    }
    closedir(tasks);
    return found;
#else
    return 0;
#endif
}

static void fbn_pool_after_fork(void);

/* Restart the pool in a forked child (fbn_pool_after_fork), from the first use on. */
static void fbn_watch_fork(void)
{
    static int fork_handler;
    if (!fork_handler)
        fork_handler = pthread_atfork(NULL, NULL, fbn_pool_after_fork) == 0;
}

/* Start workers until there are n (fewer if the OS refuses). */
static void fbn_start_workers(int n)
{
    fbn_watch_fork();
    while (fbn_pool.nworkers < n && fbn_pool.nworkers < FBN_MAX_WORKERS) {
        fbn_worker *w = &fbn_pool.workers[fbn_pool.nworkers];
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->wake, NULL);
        atomic_store(&w->job, fbn_pool.generation);
        atomic_store(&w->sleeping, 0);
        atomic_store(&w->poked, 0);
        atomic_store(&w->tid, 0);
        w->index = fbn_pool.nworkers + 1;
        if (pthread_create(&w->thread, NULL, fbn_worker_main, w) != 0)
            return;
        fbn_pool.nworkers++;
    }
}

/* Make the stages the current job, claimable from its first item: its generation. */
static uint32_t fbn_publish(const fbn_stage *stages, int nstages, void *ctx, ptrdiff_t total,
                            int nthreads)
{
    uint32_t generation = ++fbn_pool.generation;
    for (int s = 0; s < nstages; s++) {
        fbn_pool.stages[s] = stages[s];
        fbn_pool.stage_end[s] = (s == 0 ? 0 : fbn_pool.stage_end[s - 1]) + stages[s].nitems;
        const ptrdiff_t claim = stages[s].nitems / (FBN_CLAIMS_PER_THREAD * nthreads);
        fbn_pool.claim[s] = claim > 1 ? claim : 1;
    }
    fbn_pool.ctx = ctx;
    atomic_store_explicit(&fbn_pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&fbn_pool.helpers, 0, memory_order_relaxed);
    fbn_pool.caller_waited_ns = 0;
    atomic_store_explicit(&fbn_pool.total, (uint64_t)generation << 32 | (uint64_t)total,
                          memory_order_release);
    atomic_store_explicit(&fbn_pool.ticket, (uint64_t)generation << 32, memory_order_release);
    return generation;
}

/* While another library's OpenMP workers spin in this process (PyTorch's, after each of its
 * calls, for milliseconds), this pool's workers would share cores with them: a job runs in an
 * OpenMP region instead, on those same threads when the library is GNU libgomp as fastbn's is
 * (one copy per process), as fastbn's jobs did before the pool. Items are claimed as in the
 * pool. Returns the number of other threads that ran an item; the caller's waits for others
 * (the barriers, the region's end) are in caller_waited_ns. */
static int fbn_omp_run(const fbn_stage *stages, int nstages, void *ctx, int nthreads,
                       ptrdiff_t total)
{
    fbn_watch_fork();
    uint32_t generation = fbn_publish(stages, nstages, ctx, total, nthreads);
    long long caller_done = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        fbn_take_items(generation, omp_get_thread_num());
        if (omp_get_thread_num() == 0)
            caller_done = fbn_now_ns();
    }
    fbn_pool.caller_waited_ns += fbn_now_ns() - caller_done;
    return atomic_load_explicit(&fbn_pool.helpers, memory_order_relaxed);
}

/* Whether a job that took `elapsed` lost so much of it (`lost`: waits for others, time off
 * the CPU) that the machine's other work must have slowed it: half its time and more than an
 * item lasts; or nobody helped with a long job. */
static int fbn_was_late(long long elapsed, long long lost, int helped)
{
    return (2 * lost >= elapsed && lost >= FBN_LATE_NS)
           || (helped == 0 && elapsed > FBN_LONG_JOB_NS);
}

static void fbn_pool_ended(void)
{
    atomic_store_explicit(&fbn_pool.last_end_ns, fbn_now_ns(), memory_order_relaxed);
}

/* How many of the first n workers are not asleep now (polling, or running an item). */
static int fbn_awake_among(int n)
{
    int awake = 0;
    for (int k = 0; k < n; k++)
        awake += !atomic_load(&fbn_pool.workers[k].sleeping);
    return awake;
}

/* Wake the first n workers with no job: they poll for the next one (spin_ns), then sleep. */
static void fbn_poke_workers(int n)
{
    for (int k = 0; k < n; k++) {
        fbn_worker *w = &fbn_pool.workers[k];
        pthread_mutex_lock(&w->lock);
        atomic_store(&w->poked, 1);
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
    }
}

/* Run the stages on the caller and up to nthreads - 1 workers, asking those `wake` says.
 * Returns the number of workers that ran an item. */
static int fbn_pool_run(const fbn_stage *stages, int nstages, void *ctx, int nthreads, int wake)
{
    ptrdiff_t total = 0;
    for (int s = 0; s < nstages; s++)
        total += stages[s].nitems;
    long long start = fbn_now_ns();
    if (nthreads < 2 || total < 2 || nstages > FBN_MAX_STAGES || total >= UINT32_MAX
        || pthread_mutex_trylock(&fbn_pool.busy) != 0) {
        fbn_run_serial(stages, nstages, ctx);
        fbn_pool_ended();
        return 0;
    }
    if (start < atomic_load_explicit(&fbn_pool.omp_until_ns, memory_order_relaxed)) {
        const int helped = fbn_omp_run(stages, nstages, ctx, nthreads, total);
        const long long now = fbn_now_ns();
        if (!fbn_pool.no_backoff && fbn_was_late(now - start, fbn_pool.caller_waited_ns, helped)) {
            /* the spinning threads are not the region's (another runtime's): one thread
             * until they stop, and no region for a while */
            atomic_store_explicit(&fbn_pool.omp_until_ns, 0, memory_order_relaxed);
            fbn_pool.omp_useless_until_ns = now + FBN_OMP_RETRY_NS;
            atomic_store_explicit(&fbn_pool.quiet_again_ns, now + FBN_BACKOFF_MIN_NS,
                                  memory_order_relaxed);
        }
        pthread_mutex_unlock(&fbn_pool.busy);
        fbn_pool_ended();
        return helped;
    }
    /* backing off: no sleeping worker is woken (awake ones, polling, still take items) */
    const int backing_off =
        start < atomic_load_explicit(&fbn_pool.quiet_again_ns, memory_order_relaxed);
    /* calls back to back (a loop of small calls) keep the workers awake for the next ones */
    const long long spin_ns = atomic_load_explicit(&fbn_pool.spin_ns, memory_order_relaxed);
    const int back_to_back = !backing_off && (spin_ns < 0 || start
        - atomic_load_explicit(&fbn_pool.last_end_ns, memory_order_relaxed) < spin_ns);
    wake = !backing_off
           && (wake == FBN_WAKE_ALWAYS || (wake == FBN_WAKE_IN_LOOPS && back_to_back));
    long long start_cpu = wake ? fbn_cpu_ns() : 0;
    const int started = fbn_pool.nworkers;
    if (wake || back_to_back)
        fbn_start_workers(nthreads - 1);
    const int judge = fbn_pool.nworkers == started;   /* new threads start slowly: no sign */
    const int nasked = nthreads - 1 < fbn_pool.nworkers ? nthreads - 1 : fbn_pool.nworkers;
    if (!wake) {
        if (fbn_awake_among(nasked) == 0) {   /* wake them for the next call, not this one */
            if (back_to_back)
                fbn_poke_workers(nasked);
            pthread_mutex_unlock(&fbn_pool.busy);
            fbn_run_serial(stages, nstages, ctx);
            fbn_pool_ended();
            return 0;
        }
    }

    uint32_t generation = fbn_publish(stages, nstages, ctx, total, nthreads);
    int asked = 0;
    for (int k = 0; k < nasked; k++) {
        fbn_worker *w = &fbn_pool.workers[k];
        if (!wake && atomic_load(&w->sleeping))
            continue;
        asked++;
        atomic_store(&w->job, generation);            /* seq_cst, then read `sleeping`: */
        if (wake && atomic_load(&w->sleeping)) {      /* either this sees it asleep, or */
            pthread_mutex_lock(&w->lock);             /* it sees the new job (Dekker) */
            pthread_cond_signal(&w->wake);
            pthread_mutex_unlock(&w->lock);
        }
    }
    fbn_take_items(generation, 0);
    long long waited = fbn_pool.caller_waited_ns + fbn_wait_done(total);
    int helped = atomic_load_explicit(&fbn_pool.helpers, memory_order_relaxed);

    /* (a job whose only awake worker fell asleep before it was asked ran alone: no sign) */
    if (judge && asked > 0 && !fbn_pool.no_backoff) {
        const long long now = fbn_now_ns(), elapsed = now - start;
        const long long off_cpu = wake ? elapsed - (fbn_cpu_ns() - start_cpu) : 0;
        const long long lost = waited > off_cpu ? waited : off_cpu;
        const int late = fbn_was_late(elapsed, lost, helped);
        const int others = late && fbn_others_running();
        if (others && !fbn_pool.omp_broken && now >= fbn_pool.omp_useless_until_ns) {
            atomic_store_explicit(&fbn_pool.omp_until_ns, now + FBN_OMP_WINDOW_NS,
                                  memory_order_relaxed);
        } else if (others) {          /* they stop by themselves within milliseconds */
            atomic_store_explicit(&fbn_pool.quiet_again_ns, now + FBN_BACKOFF_MIN_NS,
                                  memory_order_relaxed);
        } else if (late) {
            atomic_store_explicit(&fbn_pool.quiet_again_ns,
                                  now + fbn_backoff_after(&fbn_pool.backoff, 1),
                                  memory_order_relaxed);
        } else {
            fbn_backoff_after(&fbn_pool.backoff, 0);
        }
    }
    pthread_mutex_unlock(&fbn_pool.busy);
    fbn_pool_ended();
    return helped;
}

/* How long idle workers poll before they sleep (ns; -1: forever, 0: sleep at once). */
static void fbn_pool_set_spin(long long ns) { atomic_store(&fbn_pool.spin_ns, ns); }

static int fbn_pool_workers(void) { return fbn_pool.nworkers; }

/* Workers not asleep now. */
static int fbn_pool_awake(void) { return fbn_awake_among(fbn_pool.nworkers); }

/* Nanoseconds from now during which no sleeping worker is woken (0: none). */
static long long fbn_pool_backing_off(void)
{
    long long left = atomic_load(&fbn_pool.quiet_again_ns) - fbn_now_ns();
    return left > 0 ? left : 0;
}

static void fbn_pool_set_workers_away(int away) { atomic_store(&fbn_pool.workers_away, away); }

/* Nanoseconds from now during which jobs run in an OpenMP region (0: none); tests set it. */
static long long fbn_pool_openmp_for(void)
{
    long long left = atomic_load(&fbn_pool.omp_until_ns) - fbn_now_ns();
    return left > 0 ? left : 0;
}

static void fbn_pool_set_openmp_for(long long ns)
{
    atomic_store(&fbn_pool.omp_until_ns, fbn_pool.omp_broken ? 0 : fbn_now_ns() + ns);
}

static void fbn_pool_set_backoff(int on)
{
    fbn_pool.no_backoff = !on;
    if (!on)
        atomic_store(&fbn_pool.quiet_again_ns, 0);
}

/* In a forked child (a pthread_atfork handler): the parent's workers do not exist here, and
 * a lock the parent's other threads held may be taken. Start again from nothing. */
static void fbn_pool_after_fork(void)
{
    pthread_mutex_t unlocked = PTHREAD_MUTEX_INITIALIZER;
    fbn_pool.busy = unlocked;
    fbn_pool.nworkers = 0;
    atomic_store(&fbn_pool.quiet_again_ns, 0);
    fbn_pool.backoff = fbn_backoff_start();
    atomic_store(&fbn_pool.omp_until_ns, 0);
    fbn_pool.omp_broken = 1;
}

#else   /* the caller runs everything */

static int fbn_pool_run(const fbn_stage *stages, int nstages, void *ctx, int nthreads, int wake)
{
    (void)nthreads;
    (void)wake;
    fbn_run_serial(stages, nstages, ctx);
    return 0;
}
static void fbn_pool_set_spin(long long ns) { (void)ns; }
static int fbn_pool_workers(void) { return 0; }
static int fbn_pool_awake(void) { return 0; }
static long long fbn_pool_backing_off(void) { return 0; }
static void fbn_pool_set_workers_away(int away) { (void)away; }
static long long fbn_pool_openmp_for(void) { return 0; }
static void fbn_pool_set_openmp_for(long long ns) { (void)ns; }
static int fbn_others_running(void) { return 0; }
static void fbn_pool_set_backoff(int on) { (void)on; }

#endif

#endif /* FASTBN_POOL_H */
