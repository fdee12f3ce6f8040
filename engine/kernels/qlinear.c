/* y = x @ W.T for a 4-bit weight W (out, in) grouped along its output dimension, without ever
 * writing W out as floats (engine/compression.py `linear` is the same in torch, a chunk at a time).
 *
 * Layout (compression.py): the grouped weight is W.T (in, out), cut into lines (input rows) of
 * `groups_per_line` groups; a group's group/2 bytes hold its first half of values in the low
 * nibbles and the second half in the high ones; value = minimum + step * q, one step and minimum
 * per group. So y[n, c] = sum_i x[n, i] * step[i, g] * q[i, c]  +  sum_i x[n, i] * minimum[i, g]
 * (g the group of column c): the second sum is one number per row and group, added at the end.
 *
 * Work: output columns in tiles of groups, split among threads; within a tile, LINES input rows at
 * a time are unpacked into float buffers in L1 and multiplied into every row of x, so each y
 * element is loaded and stored once per LINES input rows. Built by engine/kernels/__init__.py with
 * gcc -O3 -march=native -fopenmp; the inner loops are left to the compiler's vectorizer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LINES 4
#define MAX_GROUP 256

typedef struct {
    const uint8_t *packed; const float *step, *minimum, *x; float *y;
    int rows, in, out, group, groups_per_line, tile;
} job_t;

static void unpack(const uint8_t *restrict p, float *restrict q, int half) {
    for (int k = 0; k < half; k++) q[k] = (float)(p[k] & 15);
    for (int k = 0; k < half; k++) q[half + k] = (float)(p[k] >> 4);
}

/* Output columns of groups t * tile .. (t + 1) * tile; bsum: rows * tile floats of scratch. */
static void run_tile(const job_t *j, int t, float *bsum) {
    const int half = j->group / 2, gl = j->groups_per_line, tile = j->tile;
    float q[LINES][MAX_GROUP] __attribute__((aligned(32)));
    const int g0 = t * tile, g1 = g0 + tile < gl ? g0 + tile : gl;
    const int c_lo = g0 * j->group, c_hi = g1 * j->group < j->out ? g1 * j->group : j->out;
    memset(bsum, 0, sizeof(float) * (size_t)j->rows * tile);
    for (int n = 0; n < j->rows; n++) memset(j->y + (size_t)n * j->out + c_lo, 0, sizeof(float) * (c_hi - c_lo));
    for (int i0 = 0; i0 < j->in; i0 += LINES) {
        const int lines = i0 + LINES <= j->in ? LINES : j->in - i0;
        for (int g = g0; g < g1; g++) {
            const int c0 = g * j->group, width = c0 + j->group <= j->out ? j->group : j->out - c0;
            float s[LINES] = {0}, m[LINES] = {0};
            for (int l = 0; l < LINES; l++) {
                if (l < lines) {
                    const size_t at = (size_t)(i0 + l) * gl + g;
                    unpack(j->packed + at * half, q[l], half);
                    s[l] = j->step[at]; m[l] = j->minimum[at];
                } else {
                    memset(q[l], 0, sizeof(float) * j->group);
                }
            }
            for (int n = 0; n < j->rows; n++) {
                const float *xr = j->x + (size_t)n * j->in + i0;
                float a[LINES] = {0}, b = 0.f;
                for (int l = 0; l < lines; l++) { a[l] = xr[l] * s[l]; b += xr[l] * m[l]; }
                bsum[n * tile + (g - g0)] += b;
                float *restrict yr = j->y + (size_t)n * j->out + c0;
                for (int k = 0; k < width; k++)
                    yr[k] += a[0] * q[0][k] + a[1] * q[1][k] + a[2] * q[2][k] + a[3] * q[3][k];
            }
        }
    }
    for (int n = 0; n < j->rows; n++)
        for (int g = g0; g < g1; g++) {
            const int c0 = g * j->group, width = c0 + j->group <= j->out ? j->group : j->out - c0;
            float *restrict yr = j->y + (size_t)n * j->out + c0;
            const float b = bsum[n * tile + (g - g0)];
            for (int k = 0; k < width; k++) yr[k] += b;
        }
}

/* x (rows, in) and y (rows, out): float32, row-major; step and minimum: float32 (in * groups_per_line);
 * packed: uint8 (in * groups_per_line, group / 2). Returns 0, or 1 for arguments it does not take.
 * The threads are OpenMP's: loaded after torch, this library shares torch's libgomp.so.1 and its
 * pool, whose threads spin for a while after each torch op; threads of our own would fight them
 * for the two cores (measured: 2.7x slower at 2 rows). */
int qlinear_out_groups(const uint8_t *packed, const float *step, const float *minimum, const float *x,
                       float *y, int rows, int in, int out, int group, int groups_per_line, int threads) {
    if (group > MAX_GROUP || group < 2 || group % 2 || rows < 1 || threads < 1) return 1;
    int tile = 8192 / (group * rows);                 /* a y tile of 32 KB (rows x tile groups) stays in L1/L2 */
    if (tile < 1) tile = 1;
    const int tiles = (groups_per_line + tile - 1) / tile;
    const job_t j = {packed, step, minimum, x, y, rows, in, out, group, groups_per_line, tile};
    int failed = 0;
    #pragma omp parallel num_threads(threads < tiles ? threads : tiles) reduction(|:failed)
    {
        float *bsum = malloc(sizeof(float) * (size_t)rows * tile);
        if (!bsum) {
            failed = 1;
        } else {
            #pragma omp for schedule(static)
            for (int t = 0; t < tiles; t++) run_tile(&j, t, bsum);
            free(bsum);
        }
    }
    return failed ? 2 : 0;
}
