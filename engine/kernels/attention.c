/* Decode attention, one new query token per sequence, over keys and values held in segments
 * ([shared prefix | own past | new token], engine/ops.py `attend_segments` is the same in torch)
 * read where they lie: fp16, bf16 or fp32, any strides, widened to float32 in registers.
 *
 * The torch path (the fallback, and the engine's path before this kernel) copies a CPU-tier fp16
 * cache into a float32 buffer and then attends over strided views of it: for OPT-1.3b at batch 48
 * and 160 cached tokens that took a fifth of a 2.6 s decode step. Here each key and value row is
 * read once, as stored: 2.4-2.6x faster (benchmarks/decode_attention.py).
 *
 * For every sequence, in parallel: scores of every query head against every key (grouped-query
 * attention: query head r uses kv head r / (n_head / n_kv)), plus the additive mask bias; one
 * softmax over all segments in float32 (max, exp, sum); then the values weighted by it, summed in
 * a float buffer in L1. Built by engine/kernels/__init__.py with gcc -O3 -march=native -fopenmp; the
 * widening uses F16C/AVX2 where the CPU has them. */
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

/* row (d values of type dtype at p) widened into out */
static void widen(const void *p, int dtype, int d, float *restrict out) {
    int i = 0;
    if (dtype == F32) {
        memcpy(out, p, (size_t)d * 4);
        return;
    }
    const uint16_t *h = (const uint16_t *)p;
#ifdef __AVX2__
    if (dtype == F16) {
#ifdef __F16C__
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    } else {
        for (; i + 8 <= d; i += 8) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
            _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
    }
#endif
    for (; i < d; i++) {
        if (dtype == F16) {
            out[i] = half_to_float(h[i]);
        } else {
            uint32_t bits = (uint32_t)h[i] << 16;
            memcpy(out + i, &bits, 4);
        }
    }
}

typedef float v8 __attribute__((vector_size(32)));

/* sum of a[i] * b[i]: eight lanes, then the lanes in a fixed order (the same in every run) */
static float dot(const float *restrict a, const float *restrict b, int d) {
    v8 acc = {0};
    int i = 0;
    for (; i + 8 <= d; i += 8) {
        v8 x, y;
        memcpy(&x, a + i, 32);
        memcpy(&y, b + i, 32);
        acc += x * y;
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static const char *row(const void *base, int dtype, int64_t offset) {
    return (const char *)base + offset * (dtype == F32 ? 4 : 2);
}

/* Sequence n: out (n_head x d) from q (n_head x d). A key or value row at one position holds every
 * head side by side, so all heads are done together, a position at a time: each row is then read
 * as one contiguous run (4 KB for OPT-1.3b) instead of a 128-byte piece per head and page.
 * scores (n_head x total), acc (n_head x d) and kv (n_kv x d) are the calling thread's scratch. */
static void one_sequence(const float *q, const segment_t *segs, int nsegs, const float *bias, float *out,
                         int n, int n_head, int n_kv, int d, int total, float scale,
                         float *restrict scores, float *restrict acc, float *restrict kv) {
    const int g = n_head / n_kv;
    int t0 = 0;
    for (int s = 0; s < nsegs; s++) {                             /* scores: scale * q.k + bias */
        const segment_t *sg = segs + s;
        for (int t = 0; t < sg->len; t++) {
            for (int h = 0; h < n_kv; h++)
                widen(row(sg->k, sg->dtype, n * sg->stride_b + h * sg->stride_h + t * sg->stride_t),
                      sg->dtype, d, kv + h * d);
            for (int r = 0; r < n_head; r++)
                scores[r * total + t0 + t] = dot(q + r * d, kv + (r / g) * d, d) * scale + bias[t0 + t];
        }
        t0 += sg->len;
    }
    for (int r = 0; r < n_head; r++) {                             /* softmax over all segments */
        float *sr = scores + r * total, m = -INFINITY, sum = 0.f;
        for (int t = 0; t < total; t++) m = sr[t] > m ? sr[t] : m;
        for (int t = 0; t < total; t++) {
            sr[t] = expf(sr[t] - m);
            sum += sr[t];
        }
        const float inv = 1.f / sum;
        for (int t = 0; t < total; t++) sr[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)n_head * d);
    t0 = 0;
    for (int s = 0; s < nsegs; s++) {                             /* probabilities times values */
        const segment_t *sg = segs + s;
        for (int t = 0; t < sg->len; t++) {
            for (int h = 0; h < n_kv; h++)
                widen(row(sg->v, sg->dtype, n * sg->stride_b + h * sg->stride_h + t * sg->stride_t),
                      sg->dtype, d, kv + h * d);
            for (int r = 0; r < n_head; r++) {
                const float p = scores[r * total + t0 + t], *restrict vr = kv + (r / g) * d;
                float *restrict ar = acc + r * d;
                for (int i = 0; i < d; i++) ar[i] += p * vr[i];
            }
        }
        t0 += sg->len;
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
        float *acc = malloc(sizeof(float) * (size_t)n_head * d), *kv = malloc(sizeof(float) * (size_t)n_kv * d);
#pragma omp for schedule(static)
        for (int n = 0; n < b; n++) {
            const size_t at = (size_t)n * n_head * d;
            if (scores && acc && kv)
                one_sequence(q + at, segs, nsegs, bias + n * bias_stride, out + at, n, n_head, n_kv, d, total,
                             scale, scores, acc, kv);
            else                                      /* every thread still meets the loop */
#pragma omp atomic write
                failed = 1;
        }
        free(scores);
        free(acc);
        free(kv);
    }
    return failed ? -1 : 0;
}
