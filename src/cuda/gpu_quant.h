/*
 * gpu_quant.h - the quantised GPU weight formats of gpu.h (INT8, INT4, FP8
 * with group scales) on the host: sizes, quantisation at upload, and the
 * reference dequantisation that the CUDA kernels and the emulator
 * (bench/e2e_gpu_emu.c) are checked against. Plain C, built with or without
 * CUDA.
 *
 * Quantisation (round to nearest; a group of zeros gets scale 0):
 *   INT8: scale = max|w| / 127, q = round(w / scale)           error <= scale / 2
 *   INT4: scale = r max|w| / 7, q = round(w / scale) in [-8, 7] error <= scale / 2
 *         unless clipped; r in 1, 0.97, ..., 0.70, the least squared error
 *   FP8:  scale = max|w| / 448, q = E4M3(w / scale)             relative error <= 2^-4
 * over groups of `group` columns of a row (the last group of a row may be
 * shorter). Bytes per weight with GPU_QGROUP = 128 and fp32 scales: INT8
 * 1.031, INT4 0.531, FP8 1.031 (BF16 2).
 */
#ifndef TD_CUDA_GPU_QUANT_H
#define TD_CUDA_GPU_QUANT_H

#include <stdint.h>

#include "cuda/gpu.h"

/* Bytes of a rows x cols matrix held as dt with `group` columns per scale:
 * *data (the weights) and *scales (fp32 scales; 0 for BF16/F32). */
void gpu_wq_size(gpu_dtype dt, int64_t rows, int64_t cols, int group, int64_t *data, int64_t *scales);

/* Quantise n rows of cols fp32 weights (src, packed rows) into dt (INT8,
 * INT4 or FP8): data gets n rows of the format's row bytes, scale n rows of
 * ceil(cols / group) floats. INT4 needs an even cols. */
void gpu_wq_quant(gpu_dtype dt, int group, const float *src, int64_t n, int64_t cols, void *data, float *scale);

/* Row r of a matrix whose data and scales are in host memory, as fp32 (any
 * gpu_dtype): the reference dequantisation. */
void gpu_wq_row_f32(const gpu_mat *m, int64_t r, float *out);

/* fp32 -> FP8 E4M3 (e4m3fn), round to nearest even, saturating at +-448. */
uint8_t gpu_f32_to_e4m3(float f);

/* "auto", "bf16", "int8", "int4", "fp8" of a TANDEM_GPUW_* (--gpu-weights),
 * and the gpu_dtype that holds it (AUTO and BF16 -> GPU_BF16). */
const char *gpu_wfmt_name(int fmt);
gpu_dtype gpu_wfmt_dtype(int fmt);

#endif
