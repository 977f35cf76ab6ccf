/* fastbn — walks over the channels-first view (outer, C, inner), len = inner:
 *
 *   a channel walk  covers positions [e0, e1) of one channel; position e = o*len + i is at
 *                   x[o*stride + i], stride = C*len (the channel's runs, one after another);
 *   a span walk     covers memory [p0, p1) of the whole array; element p is in run p / len,
 *                   of channel (p / len) % C.
 *
 * Both cut their range into segments that lie inside one run; the math lives in the segment
 * functions (kernels_impl.h), once. A walk is an iterator:
 *
 *     for (fbn_channel_walk w = fbn_channel_walk_begin(e0, e1, stride, len, limit, ahead);
 *          fbn_channel_walk_next(&w);)
 *         segment(x + w.offset, w.n, w.ahead);
 *
 * Everything is inlined, so a walk costs what the hand-written loop costs, and a literal
 * argument (runs_ahead 0) folds away the code that depends on it. */
#ifndef FASTBN_WALKS_H
#define FASTBN_WALKS_H

#include "fastbn/moments.h"

/* A segment's length: to the end of its run or of the walk, whichever comes first */
static inline fbn_index fbn_segment_length(fbn_index run_left, fbn_index walk_left)
{
    return run_left < walk_left ? run_left : walk_left;
}

typedef struct {
    fbn_index next, end;      /* positions still to walk: [next, end) */
    fbn_index run, start;     /* the next segment's run, and its first place in that run */
    fbn_index len, stride, limit, runs_ahead;
    fbn_index offset, n;      /* the segment: its first element (from the channel's first), length */
    fbn_index ahead;          /* elements to the same place runs_ahead runs on (0: none) */
} fbn_channel_walk;

/* A walk over positions [e0, e1) of a channel whose segments prefetch runs_ahead runs on,
 * while that run begins before position limit (runs_ahead 0: no prefetching) */
static inline fbn_channel_walk fbn_channel_walk_begin(fbn_index e0, fbn_index e1,
                                                      fbn_index stride, fbn_index len,
                                                      fbn_index limit, fbn_index runs_ahead)
{
    fbn_channel_walk w;
    w.run = e0 < len ? 0 : e0 / len;
    w.start = e0 - w.run * len;
    w.next = e0;
    w.end = e1;
    w.len = len;
    w.stride = stride;
    w.limit = limit;
    w.runs_ahead = runs_ahead;
    w.offset = w.n = w.ahead = 0;
    return w;
}

/* The next segment into w->offset, w->n and w->ahead; 0 when the walk is done */
static inline int fbn_channel_walk_next(fbn_channel_walk *w)
{
    if (w->next >= w->end)
        return 0;
    w->n = fbn_segment_length(w->len - w->start, w->end - w->next);
    w->offset = w->run * w->stride + w->start;
    w->ahead = (w->run + w->runs_ahead) * w->len < w->limit ? w->runs_ahead * w->stride : 0;
    w->next += w->n;
    w->start = 0;
    ++w->run;
    return 1;
}

typedef struct {
    fbn_index next, end;      /* memory still to walk: [next, end) */
    fbn_index start;          /* the next segment's first place in its run */
    fbn_index C, len;
    fbn_index first, n;       /* the segment: its first element, its length */
    fbn_index channel;        /* the segment's channel */
    fbn_index next_channel;
} fbn_span_walk;

/* A walk over memory [p0, p1) (its own iterator, not a channel walk's: it is the inner loop of
 * short runs, where the channel walk's index arithmetic cost 5-8% of a (1, 512, 7, 7) inference) */
static inline fbn_span_walk fbn_span_walk_begin(fbn_index p0, fbn_index p1, fbn_index C,
                                                fbn_index len)
{
    fbn_span_walk w;
    const fbn_index run = p0 < len ? 0 : p0 / len;
    w.start = p0 - run * len;
    w.next_channel = run < C ? run : run % C;
    w.next = p0;
    w.end = p1;
    w.C = C;
    w.len = len;
    w.first = w.n = w.channel = 0;
    return w;
}

/* The next segment into w->first, w->n and w->channel; 0 when the walk is done */
static inline int fbn_span_walk_next(fbn_span_walk *w)
{
    if (w->next < w->end) {
        w->n = fbn_segment_length(w->len - w->start, w->end - w->next);
        w->first = w->next;
        w->channel = w->next_channel;
        w->next += w->n;
        w->start = 0;
        if (++w->next_channel == w->C) w->next_channel = 0;
        return 1;
    }
    return 0;
}

/* Prefetching in the walks that read a channel from memory. A channels-first channel is
 * `outer` runs of len values, C*len apart: the hardware prefetchers follow a run but start
 * over at every jump. A walk prefetches each line the same offset some runs ahead, at least
 * FBN_PREFETCH_BYTES of the channel ahead; walks over less than FBN_PREFETCH_SPAN of memory
 * don't prefetch, as their arrays stay in cache from one call to the next (docs/tuning.md). */
#define FBN_PREFETCH_BYTES 8192
#define FBN_PREFETCH_SPAN (8 << 20)

/* FBN_PREFETCH_SPAN, a variable so that the tests can force either path */
static double fbn_prefetch_span = FBN_PREFETCH_SPAN;

/* How many runs ahead a read walk over positions below limit of a channel (runs of len values
 * stride apart) prefetches: 0 when no run lies that far ahead, or the walk spans too little
 * memory to come from it */
static inline fbn_index fbn_runs_ahead(fbn_index len, fbn_index stride, fbn_index limit,
                                       fbn_index itemsize)
{
    const fbn_index run_bytes = len * itemsize;
    if ((limit - len) * itemsize < FBN_PREFETCH_BYTES)
        return 0;                     /* without a division: once per channel of a group */
    if ((double)limit / (double)len * (double)stride * (double)itemsize < fbn_prefetch_span)
        return 0;
    const fbn_index runs = (FBN_PREFETCH_BYTES + run_bytes - 1) / run_bytes;
    return runs * len < limit ? runs : 0;
}

#endif /* FASTBN_WALKS_H */
