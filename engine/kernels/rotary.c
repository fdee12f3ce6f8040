/* Rotary position embedding, rotate-half convention (engine/ops.py apply_rotary), in one pass:
 *
 *     out[i] = x[i] * cos[i] + (-x[i + d/2]) * sin[i]     for i <  d/2
 *     out[i] = x[i] * cos[i] +   x[i - d/2]  * sin[i]     for i >= d/2
 *
 * In torch that is six passes (negate, concatenate, three products and sums) and two temporaries the
 * size of q or k. x is read where it lies (q and k are strided views of a projection's output);
 * out is contiguous (b, heads, s, d). Same arithmetic as torch, in the same order and without fused
 * multiply-adds (the pragma), so the same bits. Built by engine/kernels/__init__.py. */
#include <stdint.h>

#pragma GCC optimize("fp-contract=off")

#define PARALLEL_MIN 32768

int rotary(const float *x, int64_t b, int64_t h, int64_t s, int64_t d, int64_t sb, int64_t sh, int64_t ss,
           const float *cos, const float *sin, int64_t table_sb, float *out) {
    int64_t half = d / 2;
#pragma omp parallel for collapse(2) schedule(static) if (b * h * s * d >= PARALLEL_MIN)
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < h; j++)
            for (int64_t t = 0; t < s; t++) {
                const float *xr = x + i * sb + j * sh + t * ss;
                const float *c = cos + i * table_sb + t * d, *sn = sin + i * table_sb + t * d;
                float *o = out + ((i * h + j) * s + t) * d;
                for (int64_t e = 0; e < half; e++) {
                    float a = xr[e] * c[e];
                    float r = -xr[e + half] * sn[e];
                    o[e] = a + r;
                }
                for (int64_t e = half; e < d; e++) {
                    float a = xr[e] * c[e];
                    float r = xr[e - half] * sn[e];
                    o[e] = a + r;
                }
            }
    return 0;
}
