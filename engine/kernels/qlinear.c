/* y = x @ W.T for a 4-bit weight W (out, in) grouped along its output dimension, without ever
 * writing W out as floats (engine/compression.py `linear` is the same in torch, a chunk at a time).
 *
 * Layout (compression.py): the grouped weight is W.T (in, out), cut into lines (input rows) of
 * `groups_per_line` groups; a group's group/2 bytes hold its first half of values in the low
 * nibbles and the second half in the high ones; value = minimum + step * q, one step and minimum
 * per group. So y[n, c] = sum_i x[n, i] * step[i, g] * q[i, c]  +  sum_i x[n, i] * minimum[i, g]
 * (g the group of column c): the second sum is one number per row and group, added at the end.
 *
 * Work: output columns in tiles of groups, split among threads, each accumulating into a y tile
 * of its own. Within a tile, LINES input rows at a time: each group's LINES x group 4-bit values
 * are unpacked into a float buffer in L1 once, then multiplied into every row of x as a small
 * matrix product, ROWS rows by COLS columns of y held in registers over all LINES lines (like a
 * GEMM micro-kernel: per line, 2 vector loads of q and ROWS broadcasts feed 2 x ROWS multiply-adds,
 * so the FMA units, not the loads, set the pace). Reading each packed value once, the kernel beats
 * dequantizing the weight and multiplying by the float copy up to a few hundred rows
 * (docs/benchmarks.md, "How many rows the 4-bit kernel takes"; compression.KERNEL_MAX_ROWS).
 * Groups are padded to a multiple of COLS columns with zeros. Built by engine/kernels/__init__.py
 * with gcc -O3 -march=native -fopenmp; vectors are GCC's generic vector extension, which that
 * lowers to AVX2/FMA or, with 16-float registers (COLS 32), to AVX-512; the unpacking uses AVX2
 * intrinsics where the CPU has them. The constants below differ by ISA because AVX-512 has twice
 * the registers, each twice as wide: more rows of x fit in one register block. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define LINES 64            /* input rows per pass: the depth of each register-held sum (the fastest of
                               16..128 on AVX-512; on AVX2 as fast as 16) */
#ifdef __AVX512F__                                  /* rows of x per register block: 2 x ROWS sums in registers */
#define ROWS 8              /* 16 of 32 registers (the fastest of 4..12) */
#else
#define ROWS 4              /* 8 of 16 registers (6 measured slower) */
#endif
#define MAX_GROUP 256
#define TILE_FLOATS 32768   /* a thread's y tile: 128 KB in L2, loaded and stored once per LINES lines */

typedef float v8 __attribute__((vector_size(32)));
/* y columns in the micro-kernel: one register of 16 floats where the CPU has AVX-512, else of 8 */
#ifdef __AVX512F__
typedef float vq __attribute__((vector_size(64)));
#define VQ 16
#else
typedef v8 vq;
#define VQ 8
#endif
#define COLS (2 * VQ)       /* y columns per micro-kernel step: two registers a row */
#define ALIGN 64

typedef struct {
    const uint8_t *packed; const float *step, *minimum, *x; float *y;
    int rows, in, out, group, gpad, groups_per_line, tile;
} job_t;

/* Rows 0 .. lines of q (LINES x gpad) from lines i0 .. i0 + lines of group g. The rest of q is
 * never written: zero from the start (padding columns), or finite values of an earlier group that
 * meet a zero in `a` (tail lines). */
static void unpack(const job_t *j, int i0, int lines, int g, float *restrict q) {
    const int half = j->group / 2;
    for (int l = 0; l < lines; l++) {
        const uint8_t *restrict p = j->packed + ((size_t)(i0 + l) * j->groups_per_line + g) * half;
        float *restrict ql = q + l * j->gpad;
        int k = 0;
#ifdef __AVX2__
        const __m128i low4 = _mm_set1_epi8(15);
        for (; k + 16 <= half; k += 16) {              /* 16 bytes: 16 low values, then 16 high ones */
            const __m128i b = _mm_loadu_si128((const __m128i *)(p + k));
            const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            _mm256_store_ps(ql + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)));
            _mm256_store_ps(ql + k + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))));
            _mm256_storeu_ps(ql + half + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)));
            _mm256_storeu_ps(ql + half + k + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
        }
#endif
        for (; k < half; k++) {
            ql[k] = (float)(p[k] & 15);
            ql[half + k] = (float)(p[k] >> 4);
        }
    }
}

/* yt[r, 0:gpad] += sum_l a[r * as + l] * q[l, 0:gpad] for R rows (yt: row stride ys). R is a
 * constant at each call, so the compiler keeps the 2R sums in registers. */
static inline __attribute__((always_inline))
void micro(const int R, const float *restrict a, int as, const float *restrict q, int gpad, float *restrict yt, int ys) {
    for (int k = 0; k < gpad; k += COLS) {
        vq acc[ROWS][2];
        for (int r = 0; r < R; r++) {
            acc[r][0] = *(const vq *)(yt + (size_t)r * ys + k);
            acc[r][1] = *(const vq *)(yt + (size_t)r * ys + k + VQ);
        }
        for (int l = 0; l < LINES; l++) {
            vq q0 = *(const vq *)(q + l * gpad + k), q1 = *(const vq *)(q + l * gpad + k + VQ);
#ifdef __AVX__                                      /* (a 32-byte vector fits no SSE-only register) */
            __asm__("" : "+v"(q0), "+v"(q1));          /* load once into registers, not once per row */
#endif
            for (int r = 0; r < R; r++) {
                const float s = a[r * as + l];
                acc[r][0] += s * q0;
                acc[r][1] += s * q1;
            }
        }
        for (int r = 0; r < R; r++) {
            *(vq *)(yt + (size_t)r * ys + k) = acc[r][0];
            *(vq *)(yt + (size_t)r * ys + k + VQ) = acc[r][1];
        }
    }
}

/* Output columns of groups t * tile .. (t + 1) * tile. Scratch (s->...): yt (rows x tile * gpad), b
 * (rows x tile x 8), a (rows x tile x LINES), sm (2 x tile x LINES), q (LINES x gpad, zero at the
 * start); yt and q ALIGN-byte aligned. */
typedef struct { float *yt, *b, *a, *sm, *q; } scratch_t;

static void run_tile(const job_t *j, int t, const scratch_t *s) {
    const int gl = j->groups_per_line, gpad = j->gpad, tile = j->tile, rows = j->rows;
    const int g0 = t * tile, ng = (g0 + tile < gl ? g0 + tile : gl) - g0;
    const int ys = ng * gpad;
    float *restrict yt = s->yt, *restrict a = s->a, *restrict st = s->sm, *restrict mt = s->sm + tile * LINES;
    v8 *restrict b = (v8 *)s->b;                     /* x * minimum, 8 partial sums per row and group */
    memset(yt, 0, sizeof(float) * (size_t)rows * ys);
    memset(b, 0, sizeof(v8) * (size_t)rows * tile);
    const size_t half = j->group / 2, span = (size_t)ng * half;      /* packed bytes of the tile, a line */
    for (int i0 = 0; i0 < j->in; i0 += LINES) {
        const int lines = i0 + LINES <= j->in ? LINES : j->in - i0;
        /* the next pass's lines lie a page apart, which the hardware prefetcher does not follow: ask
         * for them now, so they arrive from DRAM while this pass computes */
        for (int l = i0 + LINES; l < i0 + 2 * LINES && l < j->in; l++) {
            const size_t at = (size_t)l * gl + g0;
            for (size_t off = 0; off < span; off += 64) __builtin_prefetch(j->packed + at * half + off);
            __builtin_prefetch(j->step + at);
            __builtin_prefetch(j->minimum + at);
        }
        for (int gi = 0; gi < ng; gi++)                 /* this pass's steps and minimums, lines fastest */
            for (int l = 0; l < LINES; l++) {
                const size_t at = (size_t)(i0 + l) * gl + g0 + gi;
                st[gi * LINES + l] = l < lines ? j->step[at] : 0.f;
                mt[gi * LINES + l] = l < lines ? j->minimum[at] : 0.f;
            }
        for (int n = 0; n < rows; n++) {                /* a = x * step; b += x * minimum */
            float xs[LINES] __attribute__((aligned(32))) = {0};
            memcpy(xs, j->x + (size_t)n * j->in + i0, sizeof(float) * lines);
            const v8 *xv = (const v8 *)xs;
            for (int gi = 0; gi < ng; gi++) {
                const v8 *sv = (const v8 *)(st + gi * LINES), *mv = (const v8 *)(mt + gi * LINES);
                v8 *av = (v8 *)(a + ((size_t)n * tile + gi) * LINES), bn = b[(size_t)n * tile + gi];
                for (int c = 0; c < LINES / 8; c++) {
                    av[c] = xv[c] * sv[c];
                    bn += xv[c] * mv[c];
                }
                b[(size_t)n * tile + gi] = bn;
            }
        }
        for (int gi = 0; gi < ng; gi++) {
            unpack(j, i0, lines, g0 + gi, s->q);
            float *yg = yt + gi * gpad;
            const float *ag = a + gi * LINES;
            const int as = tile * LINES;
            int n = 0;
#define MICRO(R) micro(R, ag + (size_t)n * as, as, s->q, gpad, yg + (size_t)n * ys, ys)
            for (; n + ROWS <= rows; n += ROWS) MICRO(ROWS);
            for (; n + 4 <= rows; n += 4) MICRO(4);     /* (blocks of 8: the rest in fours) */
            switch (rows - n) {
                case 3: MICRO(3); break;
                case 2: MICRO(2); break;
                case 1: MICRO(1); break;
            }
#undef MICRO
        }
    }
    for (int n = 0; n < rows; n++)                      /* y = tile + minimum's share, real columns only */
        for (int gi = 0; gi < ng; gi++) {
            const int c0 = (g0 + gi) * j->group, width = c0 + j->group <= j->out ? j->group : j->out - c0;
            const v8 bv = b[(size_t)n * tile + gi];
            const float bs = ((bv[0] + bv[1]) + (bv[2] + bv[3])) + ((bv[4] + bv[5]) + (bv[6] + bv[7]));
            const float *src = yt + (size_t)n * ys + gi * gpad;
            float *restrict dst = j->y + (size_t)n * j->out + c0;
            for (int k = 0; k < width; k++) dst[k] = src[k] + bs;
        }
}

/* x (rows, in) and y (rows, out): float32, row-major; step and minimum: float32 (in * groups_per_line);
 * packed: uint8 (in * groups_per_line, group / 2). Returns 0, 1 for arguments it does not take, or
 * 2 when scratch memory is short. The threads are OpenMP's: loaded after torch, this library shares
 * torch's libgomp.so.1 and its pool, whose threads spin for a while after each torch op; threads of
 * our own would fight them for the cores (several times slower at a few rows). */
int qlinear_out_groups(const uint8_t *packed, const float *step, const float *minimum, const float *x,
                       float *y, int rows, int in, int out, int group, int groups_per_line, int threads) {
    if (group > MAX_GROUP || group < 2 || group % 2 || rows < 1 || threads < 1) return 1;
    const int gpad = (group + COLS - 1) / COLS * COLS;
    int tile = TILE_FLOATS / (gpad * rows);         /* groups per tile, at most what fits in L2 ... */
    if (tile < 1) tile = 1;
    int tiles = (groups_per_line + tile - 1) / tile;  /* ... and a multiple of `threads` tiles of near equal */
    tiles = (tiles + threads - 1) / threads * threads; /* width, so no thread idles at the end (56 rows by */
    tile = (groups_per_line + tiles - 1) / tiles;      /* 128 groups: 8 tiles each, not 8 and 7) */
    tiles = (groups_per_line + tile - 1) / tile;
    const job_t j = {packed, step, minimum, x, y, rows, in, out, group, gpad, groups_per_line, tile};
    int failed = 0;
    #pragma omp parallel num_threads(threads < tiles ? threads : tiles) reduction(|:failed)
    {
        const size_t yt_bytes = sizeof(float) * (size_t)rows * tile * gpad, q_bytes = sizeof(float) * LINES * gpad;
        const size_t a_bytes = sizeof(float) * (size_t)rows * tile * LINES, b_bytes = sizeof(v8) * (size_t)rows * tile;
        const scratch_t s = {aligned_alloc(ALIGN, yt_bytes), aligned_alloc(ALIGN, b_bytes), aligned_alloc(ALIGN, a_bytes),
                             aligned_alloc(ALIGN, sizeof(float) * 2 * tile * LINES), aligned_alloc(ALIGN, q_bytes)};
        const int ok = s.yt && s.b && s.a && s.sm && s.q;
        failed = !ok;
        if (s.q) memset(s.q, 0, q_bytes);
        #pragma omp for schedule(static)                /* every thread must reach it, even one without scratch */
        for (int t = 0; t < tiles; t++)
            if (ok) run_tile(&j, t, &s);
        free(s.yt); free(s.b); free(s.a); free(s.sm); free(s.q);
    }
    return failed ? 2 : 0;
}
