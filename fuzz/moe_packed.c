/*
 * fuzz/moe_packed.c - libFuzzer target: a packed-experts file (`tandem convert`).
 *
 * Calls moe_open_packed() on the input as a file (a memfd, see fuzz.h) with a
 * one-thread, one-partition pool and the reference kernels (ISA_REF, so the
 * layout a file must match is the same on every machine): magic, version,
 * checksum, partition count, the shape checks of moe_check_desc, the header
 * against the layout recomputed from the shape, file size, the slot table.
 * An op that opens is read at the first and last byte of every partition
 * buffer (ASan sees a buffer the checks let past the mapping) and freed.
 *
 * The header carries an FNV-1a checksum, so almost every mutation would stop
 * at "checksum mismatch". When the input starts with the magic and is long
 * enough, the target rewrites the checksum over the mutated header first
 * (the header layout of moe_file.c: checksum at byte 712 with 16 partitions),
 * so the fuzzer reaches the checks behind it; one input in four (by the last
 * byte) is left as it is so the mismatch path stays covered.
 *
 *   make fuzz && build-fuzz/fuzz/moe_packed fuzz/corpus/moe_packed
 * Seed: FUZZ_MOE_SEED=DIR build-fuzz/fuzz/moe_packed -runs=0 EMPTYDIR writes
 * DIR/int8-e3.bin and DIR/int4-e3.bin, tiny ops (3 experts, 2 held, 64 x 64)
 * packed and saved by the library (moe_create_isa + moe_save); committed
 * under fuzz/corpus/moe_packed/.
 */
#include "fuzz.h"
#include "core/isa.h"
#include "core/pool.h"
#include "cpu/moe/moe_impl.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HDR_CHECKSUM_AT (64 + MOE_MAX_PARTS * 16 + MOE_MAX_PARTS * 24 + 8)

static pool *fz_pool;

static uint64_t fnv1a(const uint8_t *b, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static void write_seed(const char *dir, moe_fmt fmt, const char *name)
{
    enum { E = 3, DM = 64, FF = 64 };
    static float w[3][E][FF * DM];
    const void *g[E], *u[E], *d[E];
    for (int e = 0; e < E; e++) {
        for (int i = 0; i < FF * DM; i++)
            for (int m = 0; m < 3; m++)
                w[m][e][i] = (float)((i * 7 + e * 13 + m * 5) % 17 - 8) / 16.0f;
        g[e] = e == 1 ? NULL : w[0][e];
        u[e] = e == 1 ? NULL : w[1][e];
        d[e] = e == 1 ? NULL : w[2][e];
    }
    moe_desc desc = { .n_expert = E, .d_model = DM, .d_ff = FF, .fmt = fmt, .src = MOE_SRC_F32,
                      .gate = g, .up = u, .down = d };
    moe_op *op = NULL;
    char err[512], path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (moe_create_isa(&op, &desc, fz_pool, ISA_REF, err, sizeof err) || moe_save(op, path, err, sizeof err)) {
        fprintf(stderr, "fuzz/moe_packed: seed %s: %s\n", path, err);
        __builtin_trap();
    }
    moe_free(op);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    if (!fz_pool) {
        if (pool_create(&fz_pool, 1, 1, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz/moe_packed: %s\n", err);
            __builtin_trap();
        }
        if (getenv("FUZZ_MOE_SEED")) {
            write_seed(getenv("FUZZ_MOE_SEED"), MOE_INT8, "int8-e3.bin");
            write_seed(getenv("FUZZ_MOE_SEED"), MOE_INT4, "int4-e3.bin");
        }
    }
    uint8_t *copy = NULL;
    if (size >= HDR_CHECKSUM_AT + 8 && !memcmp(data, "TDMOEPK1", 8) && (data[size - 1] & 3) != 0) {
        if (!(copy = malloc(size)))
            return 0;
        memcpy(copy, data, size);
        uint64_t h = fnv1a(copy, HDR_CHECKSUM_AT);
        memcpy(copy + HDR_CHECKSUM_AT, &h, 8);
        data = copy;
    }
    const char *path = fuzz_memfile(data, size);
    free(copy);
    if (!path)
        return 0;
    moe_op *op = NULL;
    if (moe_open_packed(&op, path, fz_pool, ISA_REF, err, sizeof err) != 0)
        return 0;
    volatile unsigned sum = 0;
    for (int q = 0; q < op->nparts; q++)
        if (op->buf_bytes[q])
            sum += op->buf[q][0] + op->buf[q][op->buf_bytes[q] - 1];
    for (int e = 0; e < op->n_expert; e++)
        if (op->slot[e] < -1 || op->slot[e] >= op->n_held)
            __builtin_trap();
    (void)sum;
    moe_free(op);
    return 0;
}
