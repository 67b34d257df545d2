/*
 * gguf_quant.c - reference dequantisation of GGUF tensor types to float.
 *
 * One plain loop per type, written from the block layouts llama.cpp's ggml
 * defines (ggml-common.h): these are the truth the loader's repacking
 * (Q4_K -> the MoE operator's INT4 etc.) and the tests compare against.
 * The float operations follow ggml's reference order (e.g. Q4_K computes
 * d*scale once per sub-block, then d1*q - m1), so results are bit-identical
 * to ggml's dequantize_row_* where the compiler does not contract to FMA
 * (the library builds without -ffast-math; x86-64 gcc does not contract
 * across statements by default in ISO C mode).
 *
 * Block layouts (little-endian; f16 = IEEE half):
 *   Q4_0   32 w, 18 B: f16 d, u8 qs[16]              w = (q - 8) * d
 *   Q4_1   32 w, 20 B: f16 d, f16 m, u8 qs[16]       w = q * d + m
 *   Q5_0   32 w, 22 B: f16 d, u8 qh[4], u8 qs[16]    w = (q5 - 16) * d
 *   Q5_1   32 w, 24 B: f16 d, f16 m, u8 qh[4], qs[16] w = q5 * d + m
 *   Q8_0   32 w, 34 B: f16 d, i8 qs[32]              w = q * d
 *   Q4_K  256 w, 144 B: f16 d, f16 dmin, u8 scales[12] (8 x 6-bit scale +
 *          6-bit min), u8 qs[128]                    w = d*sc*q - dmin*m
 *   Q5_K  256 w, 176 B: as Q4_K plus u8 qh[32] (5th bit) before qs
 *   Q6_K  256 w, 210 B: u8 ql[128], u8 qh[64], i8 scales[16], f16 d
 *                                                    w = d*sc*(q6 - 32)
 *   IQ4_NL 32 w, 18 B: f16 d, u8 qs[16]              w = d * kv[q]
 *   IQ4_XS 256 w, 136 B: f16 d, u16 scales_h, u8 scales_l[4], u8 qs[128]
 *                                                    w = d*(ls-32)*kv[q]
 * In the 4-bit types a byte's low nibble is element j of a 32-run and its
 * high nibble element j + 16 (Q4_0/Q4_1/Q5_x/IQ4) or of the next 32-run
 * (the K types).
 */
#include "core/bf16.h"
#include "core/err.h"
#include "io/gguf.h"

#include <string.h>

static inline float h2f(const unsigned char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static const signed char iq4nl_values[16] = { -127, -104, -83, -65, -49, -35, -22, -10,
                                              1,    13,   25,  38,  53,  69,  89,  113 };

static void deq_q4_0(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = h2f(b);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[2 + j] & 0x0f) - 8) * d;
            y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
    }
}

static void deq_q4_1(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = h2f(b), m = h2f(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(b[4 + j] & 0x0f) * d + m;
            y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
    }
}

static void deq_q5_0(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = h2f(b);
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) << 4) & 0x10, h1 = (int)(qh >> (j + 12)) & 0x10;
            y[j] = (float)(((b[6 + j] & 0x0f) | h0) - 16) * d;
            y[j + 16] = (float)(((b[6 + j] >> 4) | h1) - 16) * d;
        }
    }
}

static void deq_q5_1(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 24, y += 32) {
        const float d = h2f(b), m = h2f(b + 2);
        uint32_t qh;
        memcpy(&qh, b + 4, 4);
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) << 4) & 0x10, h1 = (int)(qh >> (j + 12)) & 0x10;
            y[j] = (float)((b[8 + j] & 0x0f) | h0) * d + m;
            y[j + 16] = (float)((b[8 + j] >> 4) | h1) * d + m;
        }
    }
}

static void deq_q8_0(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = h2f(b);
        for (int j = 0; j < 32; j++)
            y[j] = (float)(signed char)b[2 + j] * d;
    }
}

/* Q4_K/Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes. */
static inline void scale_min_k4(int j, const unsigned char *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void deq_q4_k(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 144) {
        const float d = h2f(b), dmin = h2f(b + 2);
        const unsigned char *sc = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
            int s, m;
            scale_min_k4(is, sc, &s, &m);
            const float d1 = d * (float)s, m1 = dmin * (float)m;
            scale_min_k4(is + 1, sc, &s, &m);
            const float d2 = d * (float)s, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0x0f) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void deq_q5_k(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 176) {
        const float d = h2f(b), dmin = h2f(b + 2);
        const unsigned char *sc = b + 4, *qh = b + 16, *ql = b + 48;
        unsigned u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            int s, m;
            scale_min_k4(is, sc, &s, &m);
            const float d1 = d * (float)s, m1 = dmin * (float)m;
            scale_min_k4(is + 1, sc, &s, &m);
            const float d2 = d * (float)s, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

static void deq_q6_k(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 210) {
        const float d = h2f(b + 208);
        const unsigned char *ql = b, *qh = b + 128;
        const signed char *sc = (const signed char *)(b + 192);
        for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

static void deq_iq4_nl(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = h2f(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)iq4nl_values[b[2 + j] & 0x0f];
            y[j + 16] = d * (float)iq4nl_values[b[2 + j] >> 4];
        }
    }
}

static void deq_iq4_xs(const unsigned char *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, b += 136) {
        const float d = h2f(b);
        uint16_t sh;
        memcpy(&sh, b + 2, 2);
        const unsigned char *sl = b + 4, *qs = b + 8;
        for (int ib = 0; ib < 8; ib++, qs += 16, y += 32) {
            const int ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0x0f) | (((sh >> (2 * ib)) & 3) << 4);
            const float dl = d * (float)(ls - 32);
            for (int j = 0; j < 16; j++) {
                y[j] = dl * (float)iq4nl_values[qs[j] & 0x0f];
                y[j + 16] = dl * (float)iq4nl_values[qs[j] >> 4];
            }
        }
    }
}

int gguf_q4_group(int type, const void *row, int64_t col0, uint8_t q[32], float *s, float *m)
{
    const unsigned char *r = row;
    if (col0 < 0 || col0 % 32)
        return 0;
    switch (type) {
    case GGUF_T_Q4_0:
    case GGUF_T_Q4_1: {
        const unsigned char *b = r + (size_t)(col0 / 32) * (type == GGUF_T_Q4_0 ? 18 : 20);
        const unsigned char *qs = b + (type == GGUF_T_Q4_0 ? 2 : 4);
        const float d = h2f(b);
        for (int j = 0; j < 16; j++) {
            q[j] = qs[j] & 0x0f;
            q[j + 16] = qs[j] >> 4;
        }
        *s = d;
        *m = type == GGUF_T_Q4_0 ? -8.0f * d : h2f(b + 2);
        return 1;
    }
    case GGUF_T_Q4_K: {
        const unsigned char *b = r + (size_t)(col0 / 256) * 144;
        const int j = (int)(col0 % 256) / 32;
        const unsigned char *qs = b + 16 + 32 * (j / 2);
        int sc, mn;
        scale_min_k4(j, b + 4, &sc, &mn);
        for (int l = 0; l < 32; l++)
            q[l] = (qs[l] >> (4 * (j % 2))) & 0x0f;
        *s = h2f(b) * (float)sc;
        *m = -(h2f(b + 2) * (float)mn);
        return 1;
    }
    default:
        return 0;
    }
}

int gguf_type_readable(int type)
{
    switch (type) {
    case GGUF_T_F32: case GGUF_T_F16: case GGUF_T_BF16: case GGUF_T_Q4_0: case GGUF_T_Q4_1:
    case GGUF_T_Q5_0: case GGUF_T_Q5_1: case GGUF_T_Q8_0: case GGUF_T_Q4_K: case GGUF_T_Q5_K:
    case GGUF_T_Q6_K: case GGUF_T_IQ4_NL: case GGUF_T_IQ4_XS:
        return 1;
    default:
        return 0;
    }
}

int gguf_dequant(int type, const void *src, float *dst, int64_t n)
{
    if (!gguf_type_readable(type))
        return TANDEM_EUNSUPPORTED;
    const int bs = gguf_type_block(type);
    if (n < 0 || n % bs)
        return TANDEM_EINVAL;
    const unsigned char *b = src;
    const int64_t nb = n / bs;
    switch (type) {
    case GGUF_T_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case GGUF_T_F16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = h2f(b + 2 * i);
        break;
    case GGUF_T_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, b + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        break;
    case GGUF_T_Q4_0: deq_q4_0(b, dst, nb); break;
    case GGUF_T_Q4_1: deq_q4_1(b, dst, nb); break;
    case GGUF_T_Q5_0: deq_q5_0(b, dst, nb); break;
    case GGUF_T_Q5_1: deq_q5_1(b, dst, nb); break;
    case GGUF_T_Q8_0: deq_q8_0(b, dst, nb); break;
    case GGUF_T_Q4_K: deq_q4_k(b, dst, nb); break;
    case GGUF_T_Q5_K: deq_q5_k(b, dst, nb); break;
    case GGUF_T_Q6_K: deq_q6_k(b, dst, nb); break;
    case GGUF_T_IQ4_NL: deq_iq4_nl(b, dst, nb); break;
    case GGUF_T_IQ4_XS: deq_iq4_xs(b, dst, nb); break;
    }
    return 0;
}
