/* The two ends of an int8 product (engine/int8.py), each fused into one pass:
 *
 * - quantize_rows: activations (rows, cols) float32 -> int8 values and one scale per row,
 *   scale = max(absmax, 1e-30) / 127, q = round-half-even(x / scale);
 * - scale_sums: torch._int_mm's int32 sums -> float32, y = (float(sum) * w_scale[col]) * a_scale[row]
 *   (+ bias[col]), written over the sums themselves (an int32 and a float32 are both 4 bytes);
 * - rows_from_4bit: a 4-bit weight grouped along its output dimension (engine/compression.py) -> int8
 *   rows with one scale per output row, as int8.quantize_over(compression.dequantize(w)) makes them,
 *   without the float32 copy in between: the packed values are read twice (once for each row's
 *   absmax, once to quantize) and the int8 values written once.
 *
 * In torch these are 5 and 3-4 passes over the tensor (abs, amax, divide, round, convert; convert,
 * multiply, multiply, add), each reading and writing it whole. Here each element is read once per
 * use and written once. The arithmetic is torch's, operation for operation and in the same order:
 * true division (not a multiply by the reciprocal), rounding half to even, and no fused multiply-add
 * (the pragma below: -march=native would otherwise contract the bias add), so the results are bit for
 * bit those of the torch path that runs when there is no compiler. Built by engine/kernels/__init__.py
 * with gcc -O3 -march=native -fopenmp; the loops are written for GCC to vectorize. */
#include <math.h>
#include <stdint.h>

#pragma GCC optimize("fp-contract=off")

/* The float32 results overwrite the int32 sums they come from: an alias type tells the compiler the two
 * pointers may meet (each element is read before it is written, so any order of the loop is right). */
typedef float float_alias __attribute__((may_alias));
typedef int32_t int32_alias __attribute__((may_alias));

/* Below this many elements a thread team costs more than it saves (a decode step's few rows). */
#define PARALLEL_MIN 32768

/* finite-math-only lets GCC turn the comparison into vector max instructions (it then need not keep a
 * NaN's place in the order of comparisons); a NaN input gives a meaningless row either way. */
__attribute__((optimize("finite-math-only", "no-signed-zeros")))
static float absmax(const float *x, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;    /* max is exact in any order: vectorized, the result is the same */
    }
    return m;
}

/* A row's int8 scale from its absmax, and a value in steps of it: torch's clamp_min(1e-30) / 127 and
 * round-half-even of a true division (|x / scale| <= 127 by construction: no clamp needed). */
static inline float row_scale(float absmax) { return (absmax > 1e-30f ? absmax : 1e-30f) / 127.0f; }
static inline int8_t to_int8(float x, float scale) { return (int8_t)(int32_t)nearbyintf(x / scale); }

int quantize_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, int8_t *q, float *scale) {
#pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        int8_t *qr = q + r * cols;
        float s = row_scale(absmax(xr, cols));
        scale[r] = s;
        for (int64_t c = 0; c < cols; c++)
            qr[c] = to_int8(xr[c], s);
    }
    return 0;
}

int scale_sums(int32_alias *acc, int64_t rows, int64_t cols, const float *w_scale, const float *a_scale,
               const float *bias) {
#pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int32_alias *in = acc + r * cols;
        float_alias *out = (float_alias *)in;
        float as = a_scale[r];
        if (bias) {
            for (int64_t c = 0; c < cols; c++) {
                float v = (float)in[c] * w_scale[c];
                v = v * as;
                out[c] = v + bias[c];
            }
        } else {
            for (int64_t c = 0; c < cols; c++) {
                float v = (float)in[c] * w_scale[c];
                out[c] = v * as;
            }
        }
    }
    return 0;
}

/* The 4-bit layout (compression.py): the weight's transpose (lines = input rows, width = output columns
 * padded to whole groups), cut into groups of `group` columns; a group's bytes hold its first half of
 * values in the low nibbles and its second half in the high ones; value = q * step + minimum, one step
 * and minimum per group (given here as float32). Threads split the groups of a line, i.e. the columns,
 * so each column's absmax is one thread's. Output q is (lines, cols) int8 (the transposed layout
 * quantize_over keeps), scale (cols,). */
static inline float value4(uint8_t byte, int high, float step, float minimum) {
    float v = (float)(high ? byte >> 4 : byte & 0x0F) * step;
    return v + minimum;
}

int rows_from_4bit(const uint8_t *packed, const float *step, const float *minimum, int64_t lines, int64_t width,
                   int64_t cols, int64_t group, int8_t *q, float *scale) {
    int64_t groups = width / group, half = group / 2;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t c0 = g * group;
        float m[512];                                       /* group <= 512: checked by the caller */
        for (int64_t j = 0; j < group; j++) m[j] = 0.0f;
        for (int64_t i = 0; i < lines; i++) {
            const uint8_t *b = packed + (i * groups + g) * half;
            float st = step[i * groups + g], mn = minimum[i * groups + g];
            for (int64_t j = 0; j < half; j++) {
                float lo = fabsf(value4(b[j], 0, st, mn)), hi = fabsf(value4(b[j], 1, st, mn));
                m[j] = lo > m[j] ? lo : m[j];
                m[j + half] = hi > m[j + half] ? hi : m[j + half];
            }
        }
        float s[512];
        for (int64_t j = 0; j < group; j++) {
            s[j] = row_scale(m[j]);
            if (c0 + j < cols) scale[c0 + j] = s[j];
        }
        int64_t n = cols - c0 < group ? cols - c0 : group;  /* the last group may be padding in part */
        for (int64_t i = 0; i < lines; i++) {
            const uint8_t *b = packed + (i * groups + g) * half;
            float st = step[i * groups + g], mn = minimum[i * groups + g];
            int8_t *out = q + i * cols + c0;
            for (int64_t j = 0; j < half && j < n; j++)
                out[j] = to_int8(value4(b[j], 0, st, mn), s[j]);
            for (int64_t j = half; j < n; j++)
                out[j] = to_int8(value4(b[j - half], 1, st, mn), s[j]);
        }
    }
    return 0;
}
