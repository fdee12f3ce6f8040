/* Decode attention, one new query token per sequence, over keys and values held in segments
 * ([shared prefix | own past | new token], engine/ops.py `attend_segments` is the same in torch)
 * read where they lie: fp16, bf16 or fp32, any strides, widened to float32 in registers.
 *
 * The torch path (the fallback) copies a CPU-tier fp16 cache into a float32 buffer and then attends
 * over strided views of it; here each key and value row is read once, as stored, several times
 * faster (docs/benchmarks.md, "Decode attention over the CPU-tier cache").
 *
 * For every sequence, in parallel: scores of every query head against every key (grouped-query
 * attention: query head r uses kv head r / (n_head / n_kv)), plus the additive mask bias; one
 * softmax over all segments in float32 (max, exp, sum); then the values weighted by it, summed in
 * a float buffer in L1. Rows are widened as they are used, in registers, and asked for a few
 * positions ahead (prefetch_ahead). Built by engine/kernels/__init__.py with gcc -O3 -march=native
 * -fopenmp; the widening uses F16C/AVX2 where the CPU has them. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };

typedef struct {
    const void *k, *v;
    int64_t stride_b, stride_h, stride_t;   /* in elements; stride_b 0: shared by every sequence */
    int32_t len, dtype;
} segment_t;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {                                   /* zero or subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

typedef float v8 __attribute__((vector_size(32)));

static inline float load1(const void *p, int dtype, int i) {    /* element i of a row, as float */
    if (dtype == F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == F16) return half_to_float(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* elements i .. i + 8 of a row, widened to float in registers */
static inline v8 load8(const void *p, int dtype, int i) {
    v8 x;
#if defined(__AVX2__) && defined(__F16C__)
    if (dtype == F32) return (v8)_mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == F16) return (v8)_mm256_cvtph_ps(h);
    return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#endif
    for (int l = 0; l < 8; l++) x[l] = load1(p, dtype, i + l);
    return x;
}

/* lane j = the sum of part[j]'s lanes, in the same order in every run */
static inline v8 hsum8(const v8 *part) {
#ifdef __AVX__
    const __m256 a = _mm256_hadd_ps((__m256)part[0], (__m256)part[1]), b = _mm256_hadd_ps((__m256)part[2], (__m256)part[3]);
    const __m256 c = _mm256_hadd_ps((__m256)part[4], (__m256)part[5]), e = _mm256_hadd_ps((__m256)part[6], (__m256)part[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), ce = _mm256_hadd_ps(c, e);   /* lanes: heads 0-3 of ab, low then high half */
    return (v8)_mm256_add_ps(_mm256_permute2f128_ps(ab, ce, 0x20), _mm256_permute2f128_ps(ab, ce, 0x31));
#else
    v8 out;
    for (int j = 0; j < 8; j++)
        out[j] = ((part[j][0] + part[j][1]) + (part[j][2] + part[j][3])) + ((part[j][4] + part[j][5]) + (part[j][6] + part[j][7]));
    return out;
#endif
}

static const char *row(const void *base, int dtype, int64_t offset) {
    return (const char *)base + offset * (dtype == F32 ? 4 : 2);
}

/* Rows this far ahead of the one in use are asked for with prefetch instructions: one sequence's
 * rows lie a whole position's rows apart (batch x heads), so the hardware prefetcher, which
 * streams within a page, stalls at each. OPT-1.3b at batch 56 and 288 past positions: 0.25 s a
 * step without, 0.15 with (1 to 8 rows ahead measured alike). */
#define AHEAD 2

/* that many positions after t: its row's bytes into cache, if the segment goes on that far */
static void prefetch_ahead(const void *base, const segment_t *sg, int n, int t, int row_bytes) {
    if (t + AHEAD >= sg->len) return;
    const char *p = row(base, sg->dtype, n * sg->stride_b + (t + AHEAD) * sg->stride_t);
    for (int i = 0; i < row_bytes; i += 64) __builtin_prefetch(p + i);
}

/* bytes from a row's first kv head to the end of its last (0, no prefetch, when they lie far apart) */
static int span_bytes(const segment_t *sg, int n_kv, int d) {
    const int64_t span = ((n_kv - 1) * sg->stride_h + d) * (sg->dtype == F32 ? 4 : 2);
    return span <= 65536 ? (int)span : 0;
}

/* sn[r] = scale * q_r . k + bias for every query head r, k its kv head's row at kp + head_at[r]:
 * eight heads at a time, their eight-lane partial sums reduced together */
static void score_row(const float *restrict q, const char *kp, int dtype, const int64_t *head_at, int n_head,
                      int d, float scale, float bias, float *restrict sn) {
    const int d8 = d & ~7;
    for (int r0 = 0; r0 < n_head; r0 += 8) {
        v8 part[8] = {{0}};
        float tail[8] = {0};
        const int rb = n_head - r0 < 8 ? n_head - r0 : 8;
        for (int j = 0; j < rb; j++) {
            const float *qr = q + (size_t)(r0 + j) * d;
            const char *k = row(kp, dtype, head_at[r0 + j]);
            v8 acc = {0};
            for (int i = 0; i < d8; i += 8) {
                v8 x;
                memcpy(&x, qr + i, 32);
                acc += x * load8(k, dtype, i);
            }
            for (int i = d8; i < d; i++) tail[j] += qr[i] * load1(k, dtype, i);
            part[j] = acc;
        }
        const v8 sums = hsum8(part);
        for (int j = 0; j < rb; j++) sn[r0 + j] = (sums[j] + tail[j]) * scale + bias;
    }
}

/* acc_r += p[r] * v for every query head r, v its kv head's row at vp + head_at[r] */
static void add_row(const float *restrict p, const char *vp, int dtype, const int64_t *head_at, int n_head, int d,
                    float *restrict acc) {
    const int d8 = d & ~7;
    for (int r = 0; r < n_head; r++) {
        const char *v = row(vp, dtype, head_at[r]);
        float *restrict ar = acc + (size_t)r * d;
        const float pr = p[r];
        for (int i = 0; i < d8; i += 8) {
            v8 y;
            memcpy(&y, ar + i, 32);
            y += pr * load8(v, dtype, i);
            memcpy(ar + i, &y, 32);
        }
        for (int i = d8; i < d; i++) ar[i] += pr * load1(v, dtype, i);
    }
}

/* Sequence n: out (n_head x d) from q (n_head x d). A key or value row at one position holds every
 * head side by side, so all heads are done together, a position at a time: each row is then read
 * as one contiguous run (4 KB for OPT-1.3b) instead of a 128-byte piece per head and page.
 * scores (total x n_head: a position's heads side by side), acc (n_head x d) and head_at (n_head)
 * are the calling thread's scratch. */
static void one_sequence(const float *q, const segment_t *segs, int nsegs, const float *bias, float *out,
                         int n, int n_head, int n_kv, int d, int total, float scale,
                         float *restrict scores, float *restrict acc, int64_t *restrict head_at) {
    const int g = n_head / n_kv;
    int t0 = 0;
    for (int s = 0; s < nsegs; s++) {                             /* scores: scale * q.k + bias */
        const segment_t *sg = segs + s;
        const int row_bytes = span_bytes(sg, n_kv, d);
        for (int r = 0; r < n_head; r++) head_at[r] = r / g * sg->stride_h;
        for (int t = 0; t < sg->len; t++, t0++) {
            prefetch_ahead(sg->k, sg, n, t, row_bytes);
            score_row(q, row(sg->k, sg->dtype, n * sg->stride_b + t * sg->stride_t), sg->dtype, head_at, n_head,
                      d, scale, bias[t0], scores + (size_t)t0 * n_head);
        }
    }
    for (int r = 0; r < n_head; r++) {                             /* softmax over all segments */
        float *sr = scores + r, m = -INFINITY, sum = 0.f;
        for (int t = 0; t < total; t++) m = sr[t * n_head] > m ? sr[t * n_head] : m;
        for (int t = 0; t < total; t++) {
            sr[t * n_head] = expf(sr[t * n_head] - m);
            sum += sr[t * n_head];
        }
        const float inv = 1.f / sum;
        for (int t = 0; t < total; t++) sr[t * n_head] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)n_head * d);
    t0 = 0;
    for (int s = 0; s < nsegs; s++) {                             /* probabilities times values */
        const segment_t *sg = segs + s;
        const int row_bytes = span_bytes(sg, n_kv, d);
        for (int r = 0; r < n_head; r++) head_at[r] = r / g * sg->stride_h;
        for (int t = 0; t < sg->len; t++, t0++) {
            prefetch_ahead(sg->v, sg, n, t, row_bytes);
            add_row(scores + (size_t)t0 * n_head, row(sg->v, sg->dtype, n * sg->stride_b + t * sg->stride_t),
                    sg->dtype, head_at, n_head, d, acc);
        }
    }
    memcpy(out, acc, sizeof(float) * (size_t)n_head * d);
}

/* q (b, n_head, d) and out (b, n_head, d) contiguous float32; bias (b, total) float32 rows
 * `bias_stride` apart, total = the segments' lengths summed. Sequences run in parallel.
 * Returns 0, or -1 when out of memory. */
int decode_attention(const float *q, const segment_t *segs, int nsegs, const float *bias,
                     int64_t bias_stride, float *out, int b, int n_head, int n_kv, int d, float scale) {
    int total = 0, failed = 0;
    for (int s = 0; s < nsegs; s++) total += segs[s].len;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)n_head * (total > 0 ? total : 1));
        float *acc = malloc(sizeof(float) * (size_t)n_head * d);
        int64_t *head_at = malloc(sizeof(int64_t) * (size_t)n_head);
#pragma omp for schedule(static)
        for (int n = 0; n < b; n++) {
            const size_t at = (size_t)n * n_head * d;
            if (scores && acc && head_at)
                one_sequence(q + at, segs, nsegs, bias + n * bias_stride, out + at, n, n_head, n_kv, d, total,
                             scale, scores, acc, head_at);
            else                                      /* every thread still meets the loop */
#pragma omp atomic write
                failed = 1;
        }
        free(scores);
        free(acc);
        free(head_at);
    }
    return failed ? -1 : 0;
}
