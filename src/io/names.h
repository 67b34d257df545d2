/*
 * names.h - an open-addressing hash index from names to the positions of
 * entries in an array the caller owns: the tensors of a safetensors set or a
 * GGUF file, GGUF's metadata keys. The index holds positions only, so the
 * array may grow (realloc) under it; the caller says how to read an entry's
 * name. Slots are a power of two, kept at most half full by the caller.
 */
#ifndef TANDEM_IO_NAMES_H
#define TANDEM_IO_NAMES_H

#include <stddef.h>

typedef const char *(*io_name_of)(const void *arr, int k);

typedef struct {
    int *slots;     /* [n_slots] positions in the caller's array, -1 = empty */
    size_t n_slots; /* power of two (0: empty index) */
} io_names;

/* Position of `name`, or -1. *slot (may be NULL) gets its slot, or the empty
 * slot where it would go (only meaningful when the index has slots). */
int io_names_find(const io_names *ix, const char *name, io_name_of name_of, const void *arr, size_t *slot);
/* Re-index entries [0, n) into at least 2 x want slots; 0, or -1 when out of
 * memory (the index is unchanged then). */
int io_names_rebuild(io_names *ix, size_t want, int n, io_name_of name_of, const void *arr);
void io_names_free(io_names *ix);

#endif
