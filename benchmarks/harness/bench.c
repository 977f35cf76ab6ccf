/* fastbn micro-benchmark harness: the kernel-level figures behind fastbn's tuning decisions
 * (docs/tuning.md), each as a ratio of variants timed side by side in one process.
 *
 *     make -C benchmarks/harness                 # builds ./fbn_bench (every variant)
 *     benchmarks/harness/fbn_bench -l            # the cases
 *     benchmarks/harness/fbn_bench short_run     # one case (several: several names)
 *     benchmarks/harness/fbn_bench -r 21 -t 2 unroll_jam
 *
 * Options: -c checks that every variant gives base's bits (the variants differ in speed
 * only), -l lists the cases, -r rounds (default 15), -s seconds a sample aims at (default 0.004), -t threads for
 * the cases that split chunks over threads (default 1). Every entry of a case is timed once a
 * round, in rotating order; the table gives each entry's minimum over the rounds (microseconds
 * a call), that minimum over the first entry's (x first), and the median of the per-round
 * ratios. On a shared machine, trust a ratio when the two agree.
 *
 * Only fbn_calls.h calls fastbn's kernels; this file sees the table of calls of each variant. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#  include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#include "fbn_calls.h"

/* the variant objects (Makefile: VARIANTS) */
extern const fbn_calls calls_base;            /* fastbn as built (setup.py's flags) */
extern const fbn_calls calls_short_run_0;     /* FBN_SHORT_RUN 0: one run at a time */
extern const fbn_calls calls_short_run_all;   /* FBN_SHORT_RUN 1<<30: four runs at a time */
extern const fbn_calls calls_lane_expr;       /* fbn_lane_total as one expression */
extern const fbn_calls calls_no_block_skip;   /* fbn_block_total without the short-run skip */
extern const fbn_calls calls_prefetch_4k;     /* FBN_PREFETCH_BYTES 4096 */
extern const fbn_calls calls_prefetch_16k;    /* FBN_PREFETCH_BYTES 16384 */
extern const fbn_calls calls_math_errno;      /* compiled with -fmath-errno */
extern const fbn_calls calls_unroll_jam;      /* compiled without -fno-loop-unroll-and-jam */

static int g_rounds = 15;
static double g_sample = 0.004;
static int g_threads = 1;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ------------------------------------------------------------------------------------------
 * Data
 * ------------------------------------------------------------------------------------------ */

static void *alloc_bytes(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static float *floats(size_t n) { return alloc_bytes(n * sizeof(float)); }

/* values spread in [offset - 1, offset + 1) (xorshift), every page touched */
static float *random_floats(size_t n, uint64_t seed, float offset)
{
    float *a = floats(n);
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; ++i) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        a[i] = offset + (float)((double)(s >> 11) * 0x1p-52 - 1.0);
    }
    return a;
}

/* coefficients that keep the values in range: hi 0, scales 1, offsets 0 (normalize) or
 * h 0, g 0, k_dy 1, k_xc 0.5, k_0 0 (grad input) */
static float *norm_coefs(long C)
{
    float *k = floats(FBN_CALLS_NORM_COEFS * C);
    for (long c = 0; c < C; ++c) k[c] = 0.0f, k[C + c] = 1.0f, k[2 * C + c] = 0.0f;
    return k;
}

static float *grad_coefs(long C)
{
    float *k = floats(FBN_CALLS_GRAD_COEFS * C);
    for (long c = 0; c < C; ++c)
        k[c] = 0.0f, k[C + c] = 0.0f, k[2 * C + c] = 1.0f, k[3 * C + c] = 0.5f, k[4 * C + c] = 0.0f;
    return k;
}

static float *constant_floats(long n, float v)
{
    float *a = floats(n);
    for (long i = 0; i < n; ++i) a[i] = v;
    return a;
}

/* ------------------------------------------------------------------------------------------
 * Jobs: one call of a kernel on one variant, with everything it needs
 * ------------------------------------------------------------------------------------------ */

typedef struct job job;
typedef void (*job_fn)(job *);

struct job {
    const char *label;
    job_fn fn;
    const fbn_calls *v;
    const float *x, *dy, *mean, *invstd, *q, *coef;
    float *y;
    long outer, C, len;          /* channels-first (outer, C, len); channels-last rows outer */
    long group;                  /* channels a group call */
    long block_rows, nchunks;    /* channels-last plan */
    int step, stream;
    double span;                 /* prefetch span (< 0: the default) */
    double *parts, *scratch;     /* channels-last partial results, per-thread scratch */
    long part_stride, scratch_stride;
    int threads;
    double sink;
};

static void run_cf_moments(job *j)
{
    j->v->set_prefetch_span(j->span);
    j->sink += j->v->cf_moments(j->x, j->outer, j->C, j->len);
}

static void run_cf_grad_sums(job *j)
{
    j->v->set_prefetch_span(j->span);
    j->sink += j->v->cf_grad_sums(j->dy, j->x, j->outer, j->C, j->len, j->mean, j->q);
}

static void run_cf_normalize(job *j)
{
    j->v->cf_normalize(j->x, j->y, j->outer, j->C, j->len, j->coef, j->stream);
}

static void run_cf_train_groups(job *j)
{
    j->sink += j->v->cf_train_groups(j->x, j->y, j->outer, j->C, j->len, j->group);
}

static void run_cf_backward_groups(job *j)
{
    j->sink += j->v->cf_backward_groups(j->dy, j->x, j->y, j->outer, j->C, j->len, j->group,
                                        j->mean, j->invstd, j->q);
}

/* inference: the coefficients, then y (the whole channels-first op, one thread) */
static void run_cf_infer(job *j)
{
    j->v->infer_coefficients(j->C, j->mean, j->invstd, 1e-5, (float *)j->coef);
    j->v->cf_normalize(j->x, j->y, j->outer, j->C, j->len, j->coef, 0);
}

static void run_infer_coefficients(job *j)
{
    j->sink += j->v->infer_coefficients(j->C, j->mean, j->invstd, 1e-5, (float *)j->coef);
}

/* the check infer_coefficients replaced: a loop of its own, scalar for its early exit */
static void run_check_then_coefficients(job *j)
{
    long c = 0;
    while (c < j->C && !(j->invstd[c] < 0)) ++c;
    if (c < j->C) abort();
    j->sink += j->v->infer_coefficients(j->C, j->mean, j->invstd, 1e-5, (float *)j->coef);
}

/* channels-last chunks over the threads, as fastbn's plan cuts them (whole blocks a chunk) */
static void chunk_rows(const job *j, long k, long *r0, long *r1)
{
    const long nblocks = (j->outer + j->block_rows - 1) / j->block_rows;
    *r0 = k * nblocks / j->nchunks * j->block_rows;
    *r1 = (k + 1) * nblocks / j->nchunks * j->block_rows;
    if (*r1 > j->outer) *r1 = j->outer;
}

static void run_cl_moments(job *j)
{
    double check = 0.0;
#pragma omp parallel for num_threads(j->threads) schedule(static) reduction(+:check) if (j->threads > 1)
    for (long k = 0; k < j->nchunks; ++k) {
        long r0, r1;
        chunk_rows(j, k, &r0, &r1);
        check += j->v->cl_moments_chunk(j->x + r0 * j->C, r1 - r0, j->C, j->block_rows, j->step,
                                        j->parts + k * j->part_stride,
                                        j->scratch + omp_get_thread_num() * j->scratch_stride);
    }
    j->sink += check;
}

static void run_cl_grad_sums(job *j)
{
    double check = 0.0;
#pragma omp parallel for num_threads(j->threads) schedule(static) reduction(+:check) if (j->threads > 1)
    for (long k = 0; k < j->nchunks; ++k) {
        long r0, r1;
        chunk_rows(j, k, &r0, &r1);
        check += j->v->cl_grad_sums_chunk(j->dy + r0 * j->C, j->x + r0 * j->C, r1 - r0, j->C,
                                          j->block_rows, j->step, j->mean, j->q,
                                          j->parts + k * j->part_stride,
                                          j->scratch + omp_get_thread_num() * j->scratch_stride);
    }
    j->sink += check;
}

static void run_cl_normalize(job *j)
{
#pragma omp parallel for num_threads(j->threads) schedule(static) if (j->threads > 1)
    for (long t = 0; t < j->threads; ++t) {
        const long r0 = t * j->outer / j->threads, r1 = (t + 1) * j->outer / j->threads;
        j->v->cl_normalize(j->x + r0 * j->C, j->y + r0 * j->C, r1 - r0, j->C, j->step, j->coef,
                           j->stream);
    }
}

static void run_cl_grad_input(job *j)
{
#pragma omp parallel for num_threads(j->threads) schedule(static) if (j->threads > 1)
    for (long t = 0; t < j->threads; ++t) {
        const long r0 = t * j->outer / j->threads, r1 = (t + 1) * j->outer / j->threads;
        j->v->cl_grad_input(j->dy + r0 * j->C, j->x + r0 * j->C, j->y + r0 * j->C, r1 - r0,
                            j->C, j->step, j->coef, j->stream);
    }
}

/* a plain read of x and dy (outer * C values each), the yardstick of a two-array pass: 64
 * independent float sums, compiled for the same instruction sets as fastbn's kernels */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static double read2_part(const float *x, const float *dy, long n)
{
    float s[64] = {0.0f};
    long i = 0;
    for (; i + 64 <= n; i += 64)
        for (int k = 0; k < 64; ++k) s[k] += x[i + k] + dy[i + k];
    double t = 0.0;
    for (int k = 0; k < 64; ++k) t += s[k];
    for (; i < n; ++i) t += x[i] + dy[i];
    return t;
}

static void run_read2(job *j)
{
    const long n = j->outer * j->C;
    double check = 0.0;
#pragma omp parallel for num_threads(j->threads) schedule(static) reduction(+:check) if (j->threads > 1)
    for (long t = 0; t < j->threads; ++t) {
        const long i0 = t * n / j->threads, i1 = (t + 1) * n / j->threads;
        check += read2_part(j->x + i0, j->dy + i0, i1 - i0);
    }
    j->sink += check;
}

/* OpenMP's own cost: nothing, a region of one thread, a region of two (fork/join) */
static __attribute__((noinline)) void tiny(job *j) { j->sink += 1.0; }

static void run_direct(job *j) { tiny(j); }

static void run_region1(job *j)
{
#pragma omp parallel num_threads(1)
    tiny(j);
}

static void run_region2(job *j)
{
#pragma omp parallel num_threads(2)
    {
        if (omp_get_thread_num() == 0) tiny(j);
    }
}

/* ------------------------------------------------------------------------------------------
 * Timing: the entries of a comparison side by side, min of the rounds
 * ------------------------------------------------------------------------------------------ */

static int compare_doubles(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void compare(const char *figure, const char *what, int n, job *jobs)
{
    double best[16], ratios[16][256];
    const int rounds = g_rounds < 256 ? g_rounds : 256;
    for (int i = 0; i < n; ++i) {
        jobs[i].fn(&jobs[i]);                          /* warm up: pages, caches, dispatch */
        jobs[i].fn(&jobs[i]);
    }
    double t0 = now();
    jobs[0].fn(&jobs[0]);
    const double once = now() - t0;
    long reps = once > 0 ? (long)(g_sample / once) : 1;
    reps = reps < 1 ? 1 : reps > 1000000 ? 1000000 : reps;
    for (int i = 0; i < n; ++i) best[i] = INFINITY;
    for (int r = 0; r < rounds; ++r) {
        double t[16];
        for (int o = 0; o < n; ++o) {
            const int i = (o + r) % n;                 /* each entry first in turn */
            t0 = now();
            for (long k = 0; k < reps; ++k) jobs[i].fn(&jobs[i]);
            t[i] = (now() - t0) / (double)reps;
            if (t[i] < best[i]) best[i] = t[i];
        }
        for (int i = 0; i < n; ++i) ratios[i][r] = t[i] / t[0];
    }
    for (int i = 0; i < n; ++i) {
        qsort(ratios[i], (size_t)rounds, sizeof(double), compare_doubles);
        printf("%-22s %-30s %-34s %11.2f %7.3f %7.3f\n", i == 0 ? figure : "", i == 0 ? what : "",
               jobs[i].label, best[i] * 1e6, best[i] / best[0], ratios[i][rounds / 2]);
    }
    fflush(stdout);
}

static void header(void)
{
    printf("%-22s %-30s %-34s %11s %7s %7s\n", "figure", "kernel (shape)", "variant",
           "min us", "x first", "median");
}

/* ------------------------------------------------------------------------------------------
 * Cases
 * ------------------------------------------------------------------------------------------ */

#define JOB(label_, fn_, v_) ((job){.label = (label_), .fn = (fn_), .v = (v_), .span = -1.0, \
                                    .threads = 1})

static char *shape3(char *buf, const char *kernel, long a, long b, long c)
{
    snprintf(buf, 64, "%s (%ld,%ld,%ld)", kernel, a, b, c);
    return buf;
}

static char *shape2(char *buf, const char *kernel, long a, long b)
{
    snprintf(buf, 64, "%s (%ld,%ld)", kernel, a, b);
    return buf;
}

/* channels-first data: x, dy and y of (outer, C, len), per-channel vectors */
typedef struct {
    long outer, C, len;
    float *x, *dy, *y, *mean, *invstd, *q, *ncoef, *gcoef;
} cf_data;

static cf_data cf_make(long outer, long C, long len)
{
    const long n = outer * C * len;
    cf_data d = {outer, C, len, random_floats(n, 1, 0.0f), random_floats(n, 2, 0.0f), floats(n),
                 constant_floats(C, 0.0f), constant_floats(C, 1.0f), constant_floats(C, 0.0f),
                 norm_coefs(C), grad_coefs(C)};
    memset(d.y, 0, n * sizeof(float));
    return d;
}

static void cf_free(cf_data *d)
{
    free(d->x), free(d->dy), free(d->y), free(d->mean), free(d->invstd), free(d->q);
    free(d->ncoef), free(d->gcoef);
}

static void cf_fill(job *j, const cf_data *d)
{
    j->x = d->x, j->dy = d->dy, j->y = d->y, j->mean = d->mean, j->invstd = d->invstd;
    j->q = d->q, j->outer = d->outer, j->C = d->C, j->len = d->len;
}

/* FBN_SHORT_RUN: normalize_span over short runs, four runs a loop or one, ~64K values (L2) */
static void case_short_run(void)
{
    static const long lens[] = {4, 9, 16, 25, 36, 44, 49, 64, 100, 196, 256};
    char what[64];
    for (size_t i = 0; i < sizeof lens / sizeof *lens; ++i) {
        const long len = lens[i], outer = 4, C = (65536 / 4 + len - 1) / len;
        cf_data d = cf_make(outer, C, len);
        job jobs[3] = {JOB("base (FBN_SHORT_RUN 44)", run_cf_normalize, &calls_base),
                       JOB("one run at a time", run_cf_normalize, &calls_short_run_0),
                       JOB("four runs at a time", run_cf_normalize, &calls_short_run_all)};
        for (int k = 0; k < 3; ++k) cf_fill(&jobs[k], &d), jobs[k].coef = d.ncoef;
        compare("FBN_SHORT_RUN", shape3(what, "normalize", outer, C, len), 3, jobs);
        cf_free(&d);
    }
}

/* a reading-walk comparison (moments and gradient sums) of two or more variants */
static void sums_compare(const char *figure, long outer, long C, long len, int n,
                         const char **labels, const fbn_calls **variants, const double *spans)
{
    char what[64];
    cf_data d = cf_make(outer, C, len);
    job g[8], m[8];
    for (int k = 0; k < n; ++k) {
        g[k] = JOB(labels[k], run_cf_grad_sums, variants[k]);
        m[k] = JOB(labels[k], run_cf_moments, variants[k]);
        cf_fill(&g[k], &d), cf_fill(&m[k], &d);
        g[k].span = m[k].span = spans != NULL ? spans[k] : -1.0;
    }
    compare(figure, shape3(what, "grad_sums", outer, C, len), n, g);
    compare(figure, shape3(what, "moments", outer, C, len), n, m);
    cf_free(&d);
}

/* FBN_PREFETCH_BYTES / FBN_PREFETCH_SPAN (kernel level): serial sums over arrays in memory,
 * runs of 3-13 KB, prefetching or not, against the same bytes as one run a channel */
static void case_prefetch(void)
{
    static const long shapes[][3] = {{32, 64, 3136}, {32, 256, 784}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long outer = shapes[i][0], C = shapes[i][1], len = shapes[i][2];
        char what[64];
        cf_data d = cf_make(outer, C, len);
        job g[3] = {JOB("contiguous (one run a channel)", run_cf_grad_sums, &calls_base),
                    JOB("runs, prefetching (base)", run_cf_grad_sums, &calls_base),
                    JOB("runs, no prefetch", run_cf_grad_sums, &calls_base)};
        job m[3] = {JOB("contiguous (one run a channel)", run_cf_moments, &calls_base),
                    JOB("runs, prefetching (base)", run_cf_moments, &calls_base),
                    JOB("runs, no prefetch", run_cf_moments, &calls_base)};
        for (int k = 0; k < 3; ++k) cf_fill(&g[k], &d), cf_fill(&m[k], &d);
        g[0].outer = m[0].outer = 1;                     /* the same bytes, one run a channel */
        g[0].len = m[0].len = outer * len;
        g[2].span = m[2].span = 1e300;                   /* nothing spans that much */
        compare("FBN_PREFETCH_BYTES", shape3(what, "grad_sums", outer, C, len), 3, g);
        compare("FBN_PREFETCH_BYTES", shape3(what, "moments", outer, C, len), 3, m);
        cf_free(&d);
    }
}

/* FBN_PREFETCH_BYTES: the distance, 4, 8 (fastbn) or 16 KB ahead */
static void case_prefetch_distance(void)
{
    static const long shapes[][3] = {{32, 64, 3136}, {32, 256, 784}};
    const char *labels[] = {"base (8 KB ahead)", "4 KB ahead", "16 KB ahead"};
    const fbn_calls *v[] = {&calls_base, &calls_prefetch_4k, &calls_prefetch_16k};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i)
        sums_compare("FBN_PREFETCH_BYTES", shapes[i][0], shapes[i][1], shapes[i][2], 3, labels,
                     v, NULL);
}

/* base against one variant on the reading walks, over four shapes */
static void sums_against(const char *figure, const long shapes[4][3], const char *base_label,
                         const char *label, const fbn_calls *variant)
{
    const char *labels[] = {base_label, label};
    const fbn_calls *v[] = {&calls_base, variant};
    for (size_t i = 0; i < 4; ++i)
        sums_compare(figure, shapes[i][0], shapes[i][1], shapes[i][2], 2, labels, v, NULL);
}

/* fbn_lane_total: the lanes' tree as loops or as one expression */
static void case_lane_total(void)
{
    static const long shapes[4][3] = {{8, 128, 49}, {32, 512, 16}, {8, 256, 25}, {32, 256, 64}};
    sums_against("fbn_lane_total", shapes, "base (loops)", "one expression", &calls_lane_expr);
}

/* fbn_block_total: runs shorter than the lanes skip the lanes' tree, or add it anyway */
static void case_block_skip(void)
{
    static const long shapes[4][3] = {{2, 1024, 9}, {8, 256, 4}, {8, 512, 4}, {2, 1024, 15}};
    sums_against("fbn_block_total", shapes, "base (skip)", "no skip", &calls_no_block_skip);
}

/* -fno-math-errno: the inference coefficients (vectorized sqrt or scalar calls), alone and in
 * a whole small inference */
static void case_math_errno(void)
{
    static const long shapes[][3] = {{1, 512, 49}, {1, 64, 3136}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long outer = shapes[i][0], C = shapes[i][1], len = shapes[i][2];
        char what[64];
        cf_data d = cf_make(outer, C, len);
        job k[2] = {JOB("base (-fno-math-errno)", run_infer_coefficients, &calls_base),
                    JOB("-fmath-errno", run_infer_coefficients, &calls_math_errno)};
        job f[2] = {JOB("base (-fno-math-errno)", run_cf_infer, &calls_base),
                    JOB("-fmath-errno", run_cf_infer, &calls_math_errno)};
        for (int j = 0; j < 2; ++j) {
            cf_fill(&k[j], &d), k[j].coef = d.ncoef;
            cf_fill(&f[j], &d), f[j].coef = d.ncoef;
        }
        snprintf(what, sizeof what, "infer_coefficients (C=%ld)", C);
        compare("-fno-math-errno", what, 2, k);
        compare("-fno-math-errno", shape3(what, "inference", outer, C, len), 2, f);
        cf_free(&d);
    }
}

/* channels-last data: x, dy, y of nrows x C, per-channel vectors, chunk results and
 * per-thread scratch (at a cache line, plus scratch_offset bytes) */
typedef struct {
    long nrows, C;
    float *x, *dy, *y, *m, *q, *ncoef, *gcoef;
    double *parts_block, *scratch_block;
} cl_data;

static cl_data cl_make(long nrows, long C, int with_dy)
{
    const long n = nrows * C;
    cl_data d = {nrows, C, random_floats(n, 3, 0.0f), with_dy ? random_floats(n, 4, 0.0f) : NULL,
                 floats(n), constant_floats(C, 0.0f), constant_floats(C, 0.0f), norm_coefs(C),
                 grad_coefs(C), NULL, NULL};
    memset(d.y, 0, n * sizeof(float));
    /* 64 chunks of results, and a scratch for 16 threads, a cache line apart each */
    d.parts_block = alloc_bytes((64 * (FBN_CALLS_CL_GRAD_PART(C) + 8) + 8) * sizeof(double));  /* the larger part */
    d.scratch_block = alloc_bytes((16 * (FBN_CALLS_CL_SCRATCH(C) + 8) + 8) * sizeof(double));
    return d;
}

static void cl_free(cl_data *d)
{
    free(d->x), free(d->dy), free(d->y), free(d->m), free(d->q), free(d->ncoef), free(d->gcoef);
    free(d->parts_block), free(d->scratch_block);
}

/* parts and scratch offset by these many bytes from a cache line (fastbn: scratch 0; parts
 * where malloc puts them, chunk k at k * part doubles) */
static void cl_fill(job *j, const cl_data *d, long block_rows, long nchunks, int step,
                    int scratch_offset, int parts_offset, int moments)
{
    const long C = d->C;
    j->x = d->x, j->dy = d->dy, j->y = d->y, j->mean = d->m, j->q = d->q;
    j->outer = d->nrows, j->C = C, j->block_rows = block_rows, j->nchunks = nchunks;
    j->step = step, j->threads = g_threads;
    j->part_stride = moments ? FBN_CALLS_CL_MOMENTS_PART(C) : FBN_CALLS_CL_GRAD_PART(C);
    j->parts = (double *)((char *)d->parts_block + parts_offset);
    j->scratch_stride = (FBN_CALLS_CL_SCRATCH(C) + 7) / 8 * 8;
    j->scratch = (double *)((char *)d->scratch_block + scratch_offset);
}

/* -fno-loop-unroll-and-jam: channels-last chunk sums of arrays in memory, as fastbn's plan cuts
 * them (block_rows 64, 64 chunks, one row a step from 16 MB on) */
static void case_unroll_jam(void)
{
    static const long shapes[][2] = {{100352, 256}, {100352, 64}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long nrows = shapes[i][0], C = shapes[i][1];
        char what[64];
        cl_data d = cl_make(nrows, C, 1);
        job m[2] = {JOB("base (-fno-loop-unroll-and-jam)", run_cl_moments, &calls_base),
                    JOB("GCC's -O3 unroll-and-jam", run_cl_moments, &calls_unroll_jam)};
        job g[2] = {JOB("base (-fno-loop-unroll-and-jam)", run_cl_grad_sums, &calls_base),
                    JOB("GCC's -O3 unroll-and-jam", run_cl_grad_sums, &calls_unroll_jam)};
        for (int k = 0; k < 2; ++k) {
            cl_fill(&m[k], &d, 64, 64, 1, 0, 0, 1);
            cl_fill(&g[k], &d, 64, 64, 1, 0, 0, 0);
        }
        compare("unroll-and-jam", shape2(what, "cl moments", nrows, C), 2, m);
        compare("unroll-and-jam", shape2(what, "cl grad_sums", nrows, C), 2, g);
        cl_free(&d);
    }
}

/* STREAMING_BYTES: channels-last rows four at a time or one, arrays in L3 or in memory */
static void case_row_step(void)
{
    static const long shapes[][2] = {{6144, 256}, {12288, 256}, {24576, 256},
                                     {100352, 256}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long nrows = shapes[i][0], C = shapes[i][1];
        char what[64];
        cl_data d = cl_make(nrows, C, 1);
        job m[2] = {JOB("4 rows a step", run_cl_moments, &calls_base),
                    JOB("1 row a step", run_cl_moments, &calls_base)};
        job g[2] = {JOB("4 rows a step", run_cl_grad_sums, &calls_base),
                    JOB("1 row a step", run_cl_grad_sums, &calls_base)};
        job n[2] = {JOB("4 rows a step", run_cl_normalize, &calls_base),
                    JOB("1 row a step", run_cl_normalize, &calls_base)};
        job x[2] = {JOB("4 rows a step", run_cl_grad_input, &calls_base),
                    JOB("1 row a step", run_cl_grad_input, &calls_base)};
        for (int k = 0; k < 2; ++k) {
            const int step = k == 0 ? 4 : 1;
            cl_fill(&m[k], &d, 64, 64, step, 0, 0, 1);
            cl_fill(&g[k], &d, 64, 64, step, 0, 0, 0);
            cl_fill(&n[k], &d, 64, 64, step, 0, 0, 0), n[k].coef = d.ncoef;
            cl_fill(&x[k], &d, 64, 64, step, 0, 0, 0), x[k].coef = d.gcoef;
        }
        compare("STREAMING_BYTES", shape2(what, "cl moments", nrows, C), 2, m);
        compare("STREAMING_BYTES", shape2(what, "cl grad_sums", nrows, C), 2, g);
        compare("STREAMING_BYTES", shape2(what, "cl normalize", nrows, C), 2, n);
        compare("STREAMING_BYTES", shape2(what, "cl grad_input", nrows, C), 2, x);
        cl_free(&d);
    }
}

/* the channels-last scratch at a cache line per thread, or where malloc's 16-byte alignment
 * may put it; and the gradient chunk results (a chunk's first block sums into its part) */
static void case_scratch_align(void)
{
    static const long shapes[][4] = {{12544, 64, 4, 49}, {100352, 64, 1, 64}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long nrows = shapes[i][0], C = shapes[i][1], K = shapes[i][3];
        const int step = (int)shapes[i][2];
        char what[64];
        cl_data d = cl_make(nrows, C, 1);
        job m[2] = {JOB("scratch at a line (base)", run_cl_moments, &calls_base),
                    JOB("scratch 16 B past a line", run_cl_moments, &calls_base)};
        job g[3] = {JOB("scratch, parts at a line", run_cl_grad_sums, &calls_base),
                    JOB("scratch 16 B past a line", run_cl_grad_sums, &calls_base),
                    JOB("parts 16 B past a line", run_cl_grad_sums, &calls_base)};
        cl_fill(&m[0], &d, 64, K, step, 0, 0, 1);
        cl_fill(&m[1], &d, 64, K, step, 16, 0, 1);
        cl_fill(&g[0], &d, 64, K, step, 0, 0, 0);
        cl_fill(&g[1], &d, 64, K, step, 16, 0, 0);
        cl_fill(&g[2], &d, 64, K, step, 0, 16, 0);
        compare("scratch line", shape2(what, "cl moments", nrows, C), 2, m);
        compare("scratch line", shape2(what, "cl grad_sums", nrows, C), 3, g);
        cl_free(&d);
    }
}

/* GROUP_BYTES / MAX_GROUP: small channels in groups (statistics, coefficients, output), or
 * one channel a call */
static void case_groups(void)
{
    static const long shapes[][4] = {{1, 512, 49, 32}, {2, 1024, 9, 32}, {8, 128, 49, 10},
                                     {32, 64, 64, 2}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; ++i) {
        const long outer = shapes[i][0], C = shapes[i][1], len = shapes[i][2];
        const long group = shapes[i][3];               /* make_plan's GROUP_BYTES // bytes */
        char what[64], label[64];
        cf_data d = cf_make(outer, C, len);
        snprintf(label, sizeof label, "groups of %ld (base plan)", group);
        job t[2] = {JOB(label, run_cf_train_groups, &calls_base),
                    JOB("one channel a call", run_cf_train_groups, &calls_base)};
        job b[2] = {JOB(label, run_cf_backward_groups, &calls_base),
                    JOB("one channel a call", run_cf_backward_groups, &calls_base)};
        for (int k = 0; k < 2; ++k) {
            cf_fill(&t[k], &d), cf_fill(&b[k], &d);
            t[k].group = b[k].group = k == 0 ? group : 1;
        }
        compare("GROUP_BYTES", shape3(what, "train group", outer, C, len), 2, t);
        compare("GROUP_BYTES", shape3(what, "backward group", outer, C, len), 2, b);
        cf_free(&d);
    }
}

/* infer_coefficients: the negative running_var check in the vectorized loop, or a scalar loop
 * of its own first */
static void case_infer_check(void)
{
    static const long Cs[] = {64, 512, 2048};
    for (size_t i = 0; i < sizeof Cs / sizeof *Cs; ++i) {
        char what[64];
        cf_data d = cf_make(1, Cs[i], 2);
        job k[2] = {JOB("check in the loop (base)", run_infer_coefficients, &calls_base),
                    JOB("scalar check loop first", run_check_then_coefficients, &calls_base)};
        for (int j = 0; j < 2; ++j) cf_fill(&k[j], &d), k[j].coef = d.ncoef;
        snprintf(what, sizeof what, "infer_coefficients (C=%ld)", Cs[i]);
        compare("infer check", what, 2, k);
        cf_free(&d);
    }
}

/* SERIAL_BELOW_*, normalize(): what an OpenMP region costs (back to back, warm team) */
static void case_omp_overhead(void)
{
    job j[3] = {JOB("direct call", run_direct, &calls_base),
                JOB("region of 1 thread", run_region1, &calls_base),
                JOB("region of 2 threads", run_region2, &calls_base)};
    compare("OpenMP region", "an empty call", 3, j);
}

/* README: the channels-last gradient sums pass against a plain read of x and dy */
static void case_sums_vs_read(void)
{
    const long nrows = 100352, C = 64;
    char what[64];
    cl_data d = cl_make(nrows, C, 1);
    job j[2] = {JOB("plain read of x and dy", run_read2, &calls_base),
                JOB("gradient sums (base plan)", run_cl_grad_sums, &calls_base)};
    cl_fill(&j[0], &d, 64, 64, 1, 0, 0, 0);
    cl_fill(&j[1], &d, 64, 64, 1, 0, 0, 0);
    compare("sums vs read", shape2(what, "cl grad_sums", nrows, C), 2, j);
    cl_free(&d);
}

/* -c: every variant computes the same bits as base (they may differ in speed only) */
static uint64_t hash_bytes(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t variant_hash(const fbn_calls *v)
{
    static const long cf[][3] = {{2, 1024, 9}, {4, 256, 25}, {8, 128, 49}, {4, 64, 100},
                                 {16, 8, 3136}};
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < sizeof cf / sizeof *cf; ++i) {
        cf_data d = cf_make(cf[i][0], cf[i][1], cf[i][2]);
        const size_t n = (size_t)(d.outer * d.C * d.len);
        for (int span = 0; span < 2; ++span) {       /* prefetching forced on, then default */
            v->set_prefetch_span(span == 0 ? 0.0 : -1.0);
            double r[2] = {v->cf_moments(d.x, d.outer, d.C, d.len),
                           v->cf_grad_sums(d.dy, d.x, d.outer, d.C, d.len, d.mean, d.q)};
            h = hash_bytes(r, sizeof r, h);
        }
        v->set_prefetch_span(-1.0);
        v->cf_normalize(d.x, d.y, d.outer, d.C, d.len, d.ncoef, 0);
        h = hash_bytes(d.y, n * sizeof(float), h);
        v->cf_grad_input(d.dy, d.x, d.y, d.outer, d.C, d.len, d.gcoef, 1);
        h = hash_bytes(d.y, n * sizeof(float), h);
        double r[2] = {v->cf_train_groups(d.x, d.y, d.outer, d.C, d.len, 4),
                       v->cf_backward_groups(d.dy, d.x, d.y, d.outer, d.C, d.len, 4, d.mean,
                                             d.invstd, d.q)};
        h = hash_bytes(r, sizeof r, h);
        int neg = v->infer_coefficients(d.C, d.mean, d.invstd, 1e-5, d.ncoef);
        h = hash_bytes(d.ncoef, 3 * (size_t)d.C * sizeof(float), hash_bytes(&neg, sizeof neg, h));
        cf_free(&d);
    }
    cl_data d = cl_make(1000, 96, 1);
    for (int step = 1; step <= 4; step += 3) {
        job j = JOB("", run_cl_moments, v);
        cl_fill(&j, &d, 16, 8, step, 0, 0, 1);
        run_cl_moments(&j);
        h = hash_bytes(j.parts, 8 * FBN_CALLS_CL_MOMENTS_PART(96) * sizeof(double), h);
        cl_fill(&j, &d, 16, 8, step, 0, 0, 0);
        run_cl_grad_sums(&j);
        h = hash_bytes(j.parts, 8 * FBN_CALLS_CL_GRAD_PART(96) * sizeof(double), h);
        v->cl_normalize(d.x, d.y, 1000, 96, step, d.ncoef, step == 1);
        h = hash_bytes(d.y, 96000 * sizeof(float), h);
        v->cl_grad_input(d.dy, d.x, d.y, 1000, 96, step, d.gcoef, step == 1);
        h = hash_bytes(d.y, 96000 * sizeof(float), h);
    }
    cl_free(&d);
    return h;
}

static int check_variants(void)
{
    const fbn_calls *all[] = {&calls_base, &calls_short_run_0, &calls_short_run_all,
                              &calls_lane_expr,
                              &calls_no_block_skip, &calls_prefetch_4k, &calls_prefetch_16k,
                              &calls_math_errno, &calls_unroll_jam};
    const uint64_t base = variant_hash(&calls_base);
    int bad = 0;
    for (size_t i = 0; i < sizeof all / sizeof *all; ++i) {
        const uint64_t h = variant_hash(all[i]);
        printf("%-22s %016llx %s\n", all[i]->name, (unsigned long long)h,
               h == base ? "same bits as base" : "DIFFERENT BITS");
        bad |= h != base;
    }
    return bad;
}

static const struct {
    const char *name;
    void (*run)(void);
    const char *what;
} cases[] = {
    {"short_run", case_short_run, "FBN_SHORT_RUN: four runs a loop vs one, normalize"},
    {"prefetch", case_prefetch, "FBN_PREFETCH_*: runs with/without prefetch vs contiguous"},
    {"prefetch_distance", case_prefetch_distance, "FBN_PREFETCH_BYTES: 4 / 8 / 16 KB ahead"},
    {"lane_total", case_lane_total, "fbn_lane_total: loops vs one expression"},
    {"block_skip", case_block_skip, "fbn_block_total: skip the tree for short runs or not"},
    {"math_errno", case_math_errno, "-fno-math-errno: inference coefficients"},
    {"unroll_jam", case_unroll_jam, "-fno-loop-unroll-and-jam: channels-last sums"},
    {"row_step", case_row_step, "STREAMING_BYTES: channels-last 4 rows a step vs 1"},
    {"scratch_align", case_scratch_align, "scratch at a cache line vs 16 B off"},
    {"groups", case_groups, "GROUP_BYTES/MAX_GROUP: channel groups vs one a call"},
    {"infer_check", case_infer_check, "infer_coefficients: check in the loop vs apart"},
    {"omp_overhead", case_omp_overhead, "cost of an OpenMP region (1 and 2 threads)"},
    {"sums_vs_read", case_sums_vs_read, "README: channels-last sums vs a plain 2-array read"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: fbn_bench [-r rounds] [-s seconds] [-t threads] [-l] [-c] [case ...]\n");
}

int main(int argc, char **argv)
{
    const size_t ncases = sizeof cases / sizeof *cases;
    int first = 1;
    for (; first < argc && argv[first][0] == '-'; ++first) {
        const char *o = argv[first];
        if (strcmp(o, "-c") == 0) return check_variants();
        if (strcmp(o, "-l") == 0) {
            for (size_t i = 0; i < ncases; ++i) printf("%-18s %s\n", cases[i].name, cases[i].what);
            return 0;
        }
        if (first + 1 >= argc || strlen(o) != 2 || strchr("rst", o[1]) == NULL) {
            usage(stderr);
            return 2;
        }
        const char *v = argv[++first];
        if (o[1] == 'r') g_rounds = atoi(v);
        if (o[1] == 's') g_sample = atof(v);
        if (o[1] == 't') g_threads = atoi(v);
        if (g_rounds < 1 || g_sample <= 0 || g_threads < 1 || g_threads > 16) {
            usage(stderr);
            return 2;
        }
    }
    for (int a = first; a < argc; ++a) {
        size_t i = 0;
        while (i < ncases && strcmp(argv[a], cases[i].name) != 0) ++i;
        if (i == ncases) {
            fprintf(stderr, "unknown case %s (fbn_bench -l lists them)\n", argv[a]);
            return 2;
        }
    }
    printf("# fastbn harness: %d rounds, %.1f ms samples, %d thread(s) for chunked cases\n",
           g_rounds, g_sample * 1e3, g_threads);
    header();
    for (size_t i = 0; i < ncases; ++i) {
        int run = first == argc;
        for (int a = first; a < argc; ++a) run |= strcmp(argv[a], cases[i].name) == 0;
        if (run) cases[i].run();
    }
    return 0;
}
