/* Fused bfloat16 CPU kernels for the batched step (see cpu_kernels.py).
 *
 * A decode step of a small model on a few cores is dominated by the number of operations, not
 * their size: each torch op costs microseconds of dispatch for a few thousand elements. These
 * kernels do in one call what takes the eager model 5-15 ops (RMSNorm, residual add + RMSNorm,
 * rotary, SwiGLU, and the cache write + attention of decode tokens and of prompt tokens in fresh
 * entries); where the CPU has AVX512F or AVX2 the linear layers run here too (pf_linear).
 * Elementwise results are rounded to bfloat16 exactly where the torch ops round them, so they match
 * the eager path up to the order of float32 sums; attention keeps its scores and probabilities in
 * float32, as the flash kernels do. Work is split over OpenMP threads (decode attention by token and
 * KV head, the row-wise kernels by rows): built with -fopenmp, the library uses the OpenMP runtime
 * torch already loaded, and so torch's waiting workers. Plain C that compilers vectorise, plus dot
 * products of bfloat16 pairs: VDPBF16PS where the CPU has AVX512-BF16; elsewhere both halves
 * widened to float32 and two FMAs (bfloat16 weights then still halve the bytes a step reads, which
 * is what bounds a decode step, while torch's bfloat16 matmuls there run slower than float32).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16;

static inline float to_f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as c10::BFloat16 does (NaN -> canonical quiet NaN). */
static inline bf16 to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return to_f32(to_bf16(f)); }

/* exp in float32 to ~1 ulp without branches, so loops over it vectorise (libm's expf does not). */
static inline float fast_exp(float x) {
    x = x < -87.33f ? -87.33f : (x > 88.72f ? 88.72f : x);
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return n < -126.0f ? p * scale * 0.0f : p * scale;  /* below the normal range: 0 */
}

enum { LANES = 16 };

/* Sums in LANES partial sums, so they vectorise without reassociation flags. */
static inline float dot(const float *a, const bf16 *b, int64_t n) {
    float partial[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int j = 0; j < LANES; j++) partial[j] += a[d + j] * to_f32(b[d + j]);
    float total = 0.0f;
    for (; d < n; d++) total += a[d] * to_f32(b[d]);
    for (int j = 0; j < LANES; j++) total += partial[j];
    return total;
}

static float sum_of_squares(const bf16 *x, int64_t dim) {
    float partial[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int j = 0; j < LANES; j++) {
            float v = to_f32(x[d + j]);
            partial[j] += v * v;
        }
    float total = 0.0f;
    for (; d < dim; d++) total += to_f32(x[d]) * to_f32(x[d]);
    for (int j = 0; j < LANES; j++) total += partial[j];
    return total;
}

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), per row (HF's order). */
static void rms_norm_row(const bf16 *x, const bf16 *weight, bf16 *out, int64_t dim, float eps) {
    float inv = 1.0f / sqrtf(sum_of_squares(x, dim) / (float)dim + eps);
    for (int64_t d = 0; d < dim; d++)
        out[d] = to_bf16(to_f32(weight[d]) * round_bf16(to_f32(x[d]) * inv));
}

void pf_rms_norm(const bf16 *x, int64_t x_stride, const bf16 *weight, bf16 *out, int64_t rows, int64_t dim,
                 float eps) {
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * x_stride, weight, out + r * dim, dim, eps);
}

/* Rows below which a kernel stays on the calling thread: waking a team costs more than it saves. */
#define PARALLEL_ROWS 4

/* hidden += delta (rounded to bf16, as the residual add), then out = rms_norm(hidden). */
void pf_add_rms_norm(bf16 *hidden, const bf16 *delta, const bf16 *weight, bf16 *out, int64_t rows, int64_t dim,
                     float eps, int64_t n_threads) {
#pragma omp parallel for num_threads(n_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        bf16 *h = hidden + r * dim;
        const bf16 *e = delta + r * dim;
        for (int64_t d = 0; d < dim; d++) h[d] = to_bf16(to_f32(h[d]) + to_f32(e[d]));
        rms_norm_row(h, weight, out + r * dim, dim, eps);
    }
}

/* Rotate-half rotary embedding in place on the first `heads` heads of each row:
 * x * cos + cat(-x2, x1) * sin, each product and the sum rounded to bf16 as the eager ops do. */
void pf_rotary(bf16 *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim, const bf16 *cos,
               const bf16 *sin) {
    int64_t half = head_dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            bf16 *v = x + r * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float x1 = to_f32(v[i]), x2 = to_f32(v[i + half]);
                float lo = round_bf16(x1 * to_f32(c[i])) + round_bf16(-x2 * to_f32(s[i]));
                float hi = round_bf16(x2 * to_f32(c[i + half])) + round_bf16(x1 * to_f32(s[i + half]));
                v[i] = to_bf16(lo);
                v[i + half] = to_bf16(hi);
            }
        }
    }
}

/* out = bf16(silu(gate)) * up for gate_up rows [gate | up] of width 2 * hidden. */
void pf_silu_mul(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t hidden, int64_t n_threads) {
#pragma omp parallel for num_threads(n_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *g = gate_up + r * 2 * hidden, *u = g + hidden;
        bf16 *o = out + r * hidden;
        for (int64_t d = 0; d < hidden; d++) {
            float x = to_f32(g[d]);
            o[d] = to_bf16(round_bf16(x / (1.0f + fast_exp(-x))) * to_f32(u[d]));
        }
    }
}

/* Softmax over scores[0, n) in place; returns 1 / their sum (0 when there are none). */
static float softmax_in_place(float *scores, int64_t n) {
    float max_score = -INFINITY;
    for (int64_t i = 0; i < n; i++) max_score = scores[i] > max_score ? scores[i] : max_score;
    for (int64_t i = 0; i < n; i++) scores[i] = fast_exp(scores[i] - max_score);
    float total = 0.0f;
    for (int64_t i = 0; i < n; i++) total += scores[i];
    return n ? 1.0f / total : 0.0f;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* The low and the high bfloat16 of each 32-bit lane's pair as float32: a bfloat16 is the top half of
 * a float32, so shifting the low value up and masking the high one widens both exactly. */
static inline __m512 pair_low(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 pair_high(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* acc + the products of 16 pairs of bfloat16 (a and b: 32 values, a pair in each 32-bit lane), float32
 * sums: VDPBF16PS, or both halves widened and two FMAs. */
static inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    return _mm512_fmadd_ps(pair_high(a), pair_high(b), _mm512_fmadd_ps(pair_low(a), pair_low(b), acc));
#endif
}

/* 16 float32 rounded to bfloat16, nearest even, as to_bf16. */
static inline __m256i to_bf16_x16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
#endif
}

#define MAX_CHUNKS 8 /* head_dim up to 256, in chunks of 32 */

/* One KV head's group of query heads (queries and out: `group` heads of head_dim, consecutive) over
 * the visible keys: dot products of bf16 pairs (exact products, float32 sums), each key row loaded
 * once for the whole group. */
static void attend_group(const bf16 *queries, int64_t group, const bf16 *keys, const bf16 *values,
                         const int32_t *visible, int64_t n_visible, int64_t head_dim, float scale, float *scores,
                         int64_t capacity, bf16 *out) {
    int64_t chunks = head_dim / 32;
    for (int64_t i = 0; i < n_visible; i++) {
        const bf16 *key = keys + (int64_t)visible[i] * head_dim;
        __m512i k[MAX_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) k[c] = _mm512_loadu_si512(key + 32 * c);
        for (int64_t g = 0; g < group; g++) {
            const bf16 *query = queries + g * head_dim;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++)
                acc = dot_pairs(acc, _mm512_loadu_si512(query + 32 * c), k[c]);
            scores[g * capacity + i] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    float inv_total[group];
    for (int64_t g = 0; g < group; g++) inv_total[g] = softmax_in_place(scores + g * capacity, n_visible);
    int64_t lanes = head_dim / 16;
    __m512 acc[group * lanes];
    for (int64_t j = 0; j < group * lanes; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_visible; i++) {
        const bf16 *value = values + (int64_t)visible[i] * head_dim;
        for (int64_t c = 0; c < lanes; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(value + 16 * c));
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (int64_t g = 0; g < group; g++)
                acc[g * lanes + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * capacity + i]), v, acc[g * lanes + c]);
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float row[head_dim];
        for (int64_t c = 0; c < lanes; c++)
            _mm512_storeu_ps(row + 16 * c, _mm512_mul_ps(acc[g * lanes + c], _mm512_set1_ps(inv_total[g])));
        for (int64_t d = 0; d < head_dim; d++) out[g * head_dim + d] = to_bf16(row[d]);
    }
}
/* Head sizes the AVX512 path takes; the portable one takes any. */
#define FAST_HEAD_DIM(d) ((d) % 32 == 0 && (d) <= 32 * MAX_CHUNKS)
#endif

/* The same in portable C, one query head at a time. */
static void attend_group_portable(const bf16 *queries, int64_t group, const bf16 *keys, const bf16 *values,
                                  const int32_t *visible, int64_t n_visible, int64_t head_dim, float scale,
                                  float *scores, bf16 *out) {
    float qf[head_dim], acc[head_dim];
    for (int64_t g = 0; g < group; g++) {
        for (int64_t d = 0; d < head_dim; d++) qf[d] = to_f32(queries[g * head_dim + d]);
        for (int64_t i = 0; i < n_visible; i++)
            scores[i] = dot(qf, keys + (int64_t)visible[i] * head_dim, head_dim) * scale;
        float inv_total = softmax_in_place(scores, n_visible);
        for (int64_t d = 0; d < head_dim; d++) acc[d] = 0.0f;
        for (int64_t i = 0; i < n_visible; i++) {
            const bf16 *value = values + (int64_t)visible[i] * head_dim;
            for (int64_t d = 0; d < head_dim; d++) acc[d] += scores[i] * to_f32(value[d]);
        }
        for (int64_t d = 0; d < head_dim; d++) out[g * head_dim + d] = to_bf16(acc[d] * inv_total);
    }
}

/* Tokens of a step, each attending with one query row: decode tokens, and prompt tokens whose entries
 * are fresh (no token of the step overwrites an entry another one sees). Token t sits in row rows[t] of
 * qkv (row_stride apart; its query heads at the row's start, its new key and value heads at k_new /
 * v_new + row offset). Every token's key and value first go to its slot's cache entry
 * query_pos % capacity; then each attends over its slot's visible entries, and its output goes to the
 * same row of out [rows, n_heads * head_dim]. Caches are one layer's
 * [n_slots, n_kv_heads, capacity, head_dim]; positions [n_slots, capacity] holds each entry's absolute
 * position (-1 empty), already updated for this step. An entry is visible when 0 <= position <= query
 * position and, with a window, position > query position - window; entries not visible are never read.
 * The work runs on n_threads threads; scratch holds n_threads * (n_heads / n_kv_heads + 1) * capacity
 * floats. */
void pf_decode_attention(const bf16 *qkv, int64_t row_stride, const bf16 *k_new, const bf16 *v_new,
                         const int64_t *rows, bf16 *k_cache, bf16 *v_cache, const int64_t *positions,
                         const int64_t *slots, const int64_t *query_pos, int64_t n_tokens, int64_t n_heads,
                         int64_t n_kv_heads, int64_t head_dim, int64_t capacity, int64_t window, float scale,
                         bf16 *out, int64_t n_threads, float *scratch) {
    int64_t group = n_heads / n_kv_heads;
    /* All writes before any read: a prompt's tokens see each other's keys. */
    for (int64_t item = 0; item < n_tokens * n_kv_heads; item++) {
        int64_t t = item / n_kv_heads, kv = item % n_kv_heads;
        int64_t cache_row = (slots[t] * n_kv_heads + kv) * capacity + query_pos[t] % capacity;
        int64_t new_row = rows[t] * row_stride + kv * head_dim;
        memcpy(k_cache + cache_row * head_dim, k_new + new_row, head_dim * sizeof(bf16));
        memcpy(v_cache + cache_row * head_dim, v_new + new_row, head_dim * sizeof(bf16));
    }
    /* Interleaved, so that long and short sequences spread over the threads. */
#pragma omp parallel for num_threads(n_threads) schedule(static, 1)
    for (int64_t item = 0; item < n_tokens * n_kv_heads; item++) {
#ifdef _OPENMP
        int64_t thread = omp_get_thread_num();
#else
        int64_t thread = 0;
#endif
        float *scores = scratch + thread * (group + 1) * capacity;
        int32_t *visible = (int32_t *)(scores + group * capacity);
        int64_t t = item / n_kv_heads, kv = item % n_kv_heads;
        int64_t slot = slots[t], pos = query_pos[t], row = rows[t];
        const int64_t *slot_pos = positions + slot * capacity;
        int64_t n_visible = 0;
        /* Until a slot's buffer wraps, entry l holds position l: later entries are empty. */
        int64_t entries = pos + 1 < capacity ? pos + 1 : capacity;
        for (int64_t l = 0; l < entries; l++) {
            int64_t p = slot_pos[l];
            if (p >= 0 && p <= pos && (window <= 0 || p > pos - window)) visible[n_visible++] = (int32_t)l;
        }
        const bf16 *keys = k_cache + (slot * n_kv_heads + kv) * capacity * head_dim;
        const bf16 *values = v_cache + (slot * n_kv_heads + kv) * capacity * head_dim;
        const bf16 *queries = qkv + row * row_stride + kv * group * head_dim;
        bf16 *o = out + row * n_heads * head_dim + kv * group * head_dim;
#ifdef FAST_HEAD_DIM
        if (FAST_HEAD_DIM(head_dim)) {
            attend_group(queries, group, keys, values, visible, n_visible, head_dim, scale, scores, capacity, o);
            continue;
        }
#endif
        attend_group_portable(queries, group, keys, values, visible, n_visible, head_dim, scale, scores, o);
    }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define LINEAR_KERNEL
#endif

#ifdef LINEAR_KERNEL
/* ---- Linear layers: y [rows, n] = x [rows, k] @ W.T, W [n, k] in bfloat16 ----------------------
 *
 * W is stored blocked as [n / 16][k / 2][16][2] (see BlockedWeight in cpu_kernels.py): one 64-byte
 * load holds an input pair for 16 outputs. With AVX512-BF16, VDPBF16PS multiplies it by a broadcast
 * pair of x; without it (AVX512F, or AVX2 with FMA), x is widened to float32 once per call (the
 * `wide` scratch) and the block's even and odd inputs in registers, two FMAs a pair. An AVX512 tile
 * is LINEAR_BLOCKS blocks of 16 outputs by up to 8 rows: 16 float32 accumulators, each broadcast
 * feeding two blocks; an AVX2 one (16 registers of 8 floats) takes its blocks one after the other,
 * 4 rows at a time. On 30 layers of SmolLM2-sized random weights (cold, 16 rows, a 2-core EPYC),
 * 2x8 AVX512-BF16 tiles took 11.6 ms, 1x16 15.7 ms, 4x4 12.1 ms and oneDNN's prepacked matmul
 * 14.8 ms; bench/cpu_linear.py compares the chosen tiles with oneDNN on the demo model. Products
 * are exact and sums float32 in input order, rounded once to bfloat16. */
enum { LINEAR_BLOCKS = 2 };
#ifdef __AVX512F__
#define LINEAR_ROWS 8
#else
#define LINEAR_ROWS 4
#endif

#ifdef __AVX512BF16__
typedef bf16 linear_x; /* x as the tiles read it */
#define LINEAR_WIDENS 0
#else
typedef float linear_x;
#define LINEAR_WIDENS 1
#endif

/* Whether pf_linear and pf_decoder_stack use their `wide` scratch (1: built without AVX512-BF16). */
int pf_linear_widens(void) { return LINEAR_WIDENS; }

#ifdef __AVX512F__
static inline __attribute__((always_inline)) void linear_tile(const linear_x *x, int64_t x_stride, const bf16 *w,
                                                             int64_t k, bf16 *y, int64_t y_stride, const int rows) {
    int64_t pairs = k / 2, block_stride = pairs * 32;
    __m512 acc[LINEAR_BLOCKS][LINEAR_ROWS];
    for (int b = 0; b < LINEAR_BLOCKS; b++)
        for (int r = 0; r < rows; r++) acc[b][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; j++) {
        __m512i wv[LINEAR_BLOCKS];
        for (int b = 0; b < LINEAR_BLOCKS; b++) wv[b] = _mm512_loadu_si512(w + b * block_stride + j * 32);
#if LINEAR_WIDENS
        __m512 even[LINEAR_BLOCKS], odd[LINEAR_BLOCKS];
        for (int b = 0; b < LINEAR_BLOCKS; b++) {
            even[b] = pair_low(wv[b]);
            odd[b] = pair_high(wv[b]);
        }
        for (int r = 0; r < rows; r++) {
            __m512 x_even = _mm512_set1_ps(x[r * x_stride + 2 * j]), x_odd = _mm512_set1_ps(x[r * x_stride + 2 * j + 1]);
            for (int b = 0; b < LINEAR_BLOCKS; b++)
                acc[b][r] = _mm512_fmadd_ps(x_odd, odd[b], _mm512_fmadd_ps(x_even, even[b], acc[b][r]));
        }
#else
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + r * x_stride + 2 * j, sizeof pair);
            __m512i xb = _mm512_set1_epi32(pair);
            for (int b = 0; b < LINEAR_BLOCKS; b++) acc[b][r] = dot_pairs(acc[b][r], xb, wv[b]);
        }
#endif
    }
    for (int b = 0; b < LINEAR_BLOCKS; b++)
        for (int r = 0; r < rows; r++) _mm256_storeu_si256((__m256i *)(y + r * y_stride + b * 16), to_bf16_x16(acc[b][r]));
}
#else
#include <immintrin.h>

/* 8 float32 rounded to bfloat16, nearest even, as to_bf16. */
static inline __m128i to_bf16_x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    /* Packs within 128-bit lanes (r0-3 r0-3 | r4-7 r4-7): quadwords 0 and 2 hold r0-7. */
    __m256i packed = _mm256_packus_epi32(rounded, rounded);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

/* A block's 64-byte row is two vectors of 8 output pairs. */
static inline __attribute__((always_inline)) void linear_tile(const linear_x *x, int64_t x_stride, const bf16 *w,
                                                             int64_t k, bf16 *y, int64_t y_stride, const int rows) {
    int64_t pairs = k / 2, block_stride = pairs * 32;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int b = 0; b < LINEAR_BLOCKS; b++) {
        const bf16 *block = w + b * block_stride;
        __m256 acc[2][LINEAR_ROWS];
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < rows; r++) acc[h][r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < pairs; j++) {
            __m256 even[2], odd[2];
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(block + j * 32 + h * 16));
                even[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            }
            for (int r = 0; r < rows; r++) {
                __m256 x_even = _mm256_set1_ps(x[r * x_stride + 2 * j]), x_odd = _mm256_set1_ps(x[r * x_stride + 2 * j + 1]);
                for (int h = 0; h < 2; h++)
                    acc[h][r] = _mm256_fmadd_ps(x_odd, odd[h], _mm256_fmadd_ps(x_even, even[h], acc[h][r]));
            }
        }
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < rows; r++)
                _mm_storeu_si128((__m128i *)(y + r * y_stride + b * 16 + h * 8), to_bf16_x8(acc[h][r]));
    }
}
#endif

/* The tile with its row count a constant, so that its accumulators stay in registers. */
static void linear_tile_rows(const linear_x *x, int64_t x_stride, const bf16 *w, int64_t k, bf16 *y,
                             int64_t y_stride, int rows) {
    switch (rows) {
#define LINEAR_TILE_CASE(R) \
    case R: linear_tile(x, x_stride, w, k, y, y_stride, R); break;
        LINEAR_TILE_CASE(1) LINEAR_TILE_CASE(2) LINEAR_TILE_CASE(3) LINEAR_TILE_CASE(4)
#if LINEAR_ROWS > 4
        LINEAR_TILE_CASE(5) LINEAR_TILE_CASE(6) LINEAR_TILE_CASE(7) LINEAR_TILE_CASE(8)
#endif
#undef LINEAR_TILE_CASE
    }
}

/* n a multiple of 16 * LINEAR_BLOCKS, k even; wide: rows * k floats where pf_linear_widens() (else
 * unused, may be NULL). Each thread takes a run of output blocks and all rows, so its slice of W is
 * read from memory once. */
void pf_linear(const bf16 *x, int64_t x_stride, int64_t rows, int64_t k, const bf16 *w, int64_t n, bf16 *y,
               float *wide, int64_t n_threads) {
    int64_t groups = n / (16 * LINEAR_BLOCKS);
#if LINEAR_WIDENS
#pragma omp parallel for num_threads(n_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < k; d++) wide[r * k + d] = to_f32(x[r * x_stride + d]);
    const linear_x *xs = wide;
    x_stride = k;
#else
    (void)wide;
    const linear_x *xs = x;
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const bf16 *w_group = w + g * LINEAR_BLOCKS * (k / 2) * 32;
        for (int64_t r0 = 0; r0 < rows; r0 += LINEAR_ROWS) {
            int tile_rows = rows - r0 < LINEAR_ROWS ? (int)(rows - r0) : LINEAR_ROWS;
            linear_tile_rows(xs + r0 * x_stride, x_stride, w_group, k, y + r0 * n + g * 16 * LINEAR_BLOCKS, n,
                             tile_rows);
        }
    }
}
#endif

#ifdef LINEAR_KERNEL
/* ---- A whole stack of dense decoder layers in one call ------------------------------------------
 *
 * The per-op path calls the kernels above 9 times a layer from Python: at 30 layers that is about
 * 4 ms of interpreter and ctypes time a step, against 18 ms in the kernels at 16 sequences. Here the
 * same kernels run in the same order on the same buffers, so results are identical. */
typedef struct {
    const bf16 *wqkv, *wo, *w13, *w2; /* blocked (BlockedWeight) */
    const bf16 *ffn_norm, *next_norm; /* next_norm: the next layer's attention norm, or the final one */
    float ffn_eps, next_eps;
} pf_layer;

/* h [n, dim]: the residual stream, updated in place; normed [n, dim]: the first layer's attention norm
 * of h on entry, next_norm(h) of the last layer on return. Every token is a kernel token
 * (pf_decode_attention's rows / slots / query_pos). kv: the cache [layers][2][slots][KV][capacity][D].
 * work: n * (qkv + heads + dim + 3 * hidden) bf16 values; scratch as for pf_decode_attention; wide as
 * for pf_linear, n * max(dim, heads, hidden) floats. */
void pf_decoder_stack(const pf_layer *layers, int64_t n_layers, int64_t n, int64_t dim, int64_t n_heads,
                      int64_t n_kv_heads, int64_t head_dim, int64_t hidden, bf16 *h, bf16 *normed, const bf16 *cos,
                      const bf16 *sin, bf16 *kv, const int64_t *positions, const int64_t *rows,
                      const int64_t *slots, const int64_t *query_pos, int64_t n_slots, int64_t capacity,
                      int64_t window, float scale, bf16 *work, float *scratch, float *wide, int64_t n_threads) {
    int64_t qkv_width = (n_heads + 2 * n_kv_heads) * head_dim, heads_width = n_heads * head_dim;
    int64_t cache_kind = n_slots * n_kv_heads * capacity * head_dim;
    bf16 *qkv = work, *attended = qkv + n * qkv_width, *delta = attended + n * heads_width;
    bf16 *gate_up = delta + n * dim, *act = gate_up + n * 2 * hidden;
    for (int64_t i = 0; i < n_layers; i++) {
        const pf_layer *layer = layers + i;
        bf16 *keys = kv + 2 * i * cache_kind, *values = keys + cache_kind;
        pf_linear(normed, dim, n, dim, layer->wqkv, qkv_width, qkv, wide, n_threads);
        pf_rotary(qkv, qkv_width, n, n_heads + n_kv_heads, head_dim, cos, sin);
        pf_decode_attention(qkv, qkv_width, qkv + heads_width, qkv + heads_width + n_kv_heads * head_dim, rows, keys,
                            values, positions, slots, query_pos, n, n_heads, n_kv_heads, head_dim, capacity, window,
                            scale, attended, n_threads, scratch);
        pf_linear(attended, heads_width, n, heads_width, layer->wo, dim, delta, wide, n_threads);
        pf_add_rms_norm(h, delta, layer->ffn_norm, normed, n, dim, layer->ffn_eps, n_threads);
        pf_linear(normed, dim, n, dim, layer->w13, 2 * hidden, gate_up, wide, n_threads);
        pf_silu_mul(gate_up, act, n, hidden, n_threads);
        pf_linear(act, hidden, n, hidden, layer->w2, dim, delta, wide, n_threads);
        pf_add_rms_norm(h, delta, layer->next_norm, normed, n, dim, layer->next_eps, n_threads);
    }
}
#endif
