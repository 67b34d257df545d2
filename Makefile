# tandem: one Makefile for the library, the command, the tests and the benchmarks.
#
#   make            library + build/tandem (+ CUDA backend when nvcc is on PATH)
#   make cpu        the same without CUDA (src/cuda/gpu_none.c stands in)
#   make test       build and run every test group; last line "N passed, N failed"
#   make test-asan  the tests under AddressSanitizer + UBSan (objects in build-asan/)
#   make test-tsan  the concurrency tests under ThreadSanitizer (objects in build-tsan/)
#   make bench      build the benchmark programs
#   make install    PREFIX=/usr/local (DESTDIR too): headers, libtandem.so/.a, tandem.pc, the command
#   make test-abi   the shared library's exports and ABI (tests/abi/check.sh)
#   make help       this list
#
# Kernels are compiled once per ISA: a file named *_avx2.c, *_avx512.c or *_amx.c
# gets that ISA's -m flags and nothing else does, so the shipped binary runs on any
# x86-64 and picks its kernels at start from CPUID (src/core/isa.c). Never -march=native.

CC      ?= cc
NVCC    ?= nvcc
BUILD   ?= build
OPT     ?= -O2
SAN     ?=
CFLAGS_BASE = -std=c11 -Wall -Wextra -Werror $(OPT) -g -fPIC -pthread \
              -D_GNU_SOURCE -Iinclude -Isrc -MMD -MP $(SAN) $(EXTRA_CFLAGS)
# EXTRA_CFLAGS / EXTRA_LDFLAGS point at libraries unpacked outside the system
# paths (the GPU machine has no package registry: dev/sysroot.sh).
LDLIBS  = $(EXTRA_LDFLAGS) -ljansson -lnuma -lpcre2-8 -lutf8proc -lm -lpthread

ISA_AVX2   = -mavx2 -mfma -mf16c
ISA_AVX512 = $(ISA_AVX2) -mavx512f -mavx512bw -mavx512vl -mavx512dq \
             -mavx512bf16 -mavx512vnni
ISA_AMX    = $(ISA_AVX512) -mamx-tile -mamx-bf16 -mamx-int8

# CUDA: on by default when nvcc exists; `make cpu` or CUDA=0 turns it off.
ifeq ($(origin CUDA),undefined)
  CUDA := $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
# Every architecture tandem runs on: sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx, the first with FP8
# tensor cores), sm_90 (H100/H200), sm_120 (RTX 50xx), plus compute_80 PTX that any later GPU JIT-compiles.
# Arch-specific paths are chosen at run time from the compute capability (hybrid.c). `make CUDA_ARCHS=90`
# builds one for a quicker local compile. NVCC_THREADS: targets of one file nvcc compiles at once (2: with
# make -j2 on a 2-core machine that is 4 compilers; 0 = one per core, which oversubscribes small machines).
CUDA_ARCHS ?= 80 86 89 90 120
NVCC_THREADS ?= 2
NVARCH  = $(foreach a,$(CUDA_ARCHS),-gencode=arch=compute_$(a),code=sm_$(a)) -gencode=arch=compute_80,code=compute_80
NVFLAGS = -O2 -std=c++17 -Xcompiler -fPIC -Iinclude -Isrc -MMD -MP -DTD_CUDA_LIB='"$(CUDA_HOME)/lib64"' \
          -Xcompiler -Wall,-Wextra -Werror all-warnings $(NVARCH) --threads $(NVCC_THREADS)

LIB_SRC  := $(shell find src -name '*.c' | sort)
CU_SRC   := $(shell find src -name '*.cu' | sort)
ifeq ($(CUDA),1)
  LIB_SRC := $(filter-out src/cuda/gpu_none.c,$(LIB_SRC))
  LIB_CU  := $(CU_SRC:%.cu=$(BUILD)/%.o)
  LDLIBS  += -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/targets/x86_64-linux/lib \
             -lcudart_static -ldl -lrt -lstdc++ -Wl,-rpath,$(CUDA_HOME)/lib64
else
  LIB_CU  :=
endif
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o) $(LIB_CU)
CLI_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(shell find cli server -name '*.c' 2>/dev/null | sort))
TEST_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(shell find tests -path tests/abi -prune -o -name '*.c' -print | sort))
BENCH_SRC := $(shell find dev -name '*.c' 2>/dev/null | sort)
BENCH_BIN := $(BENCH_SRC:dev/%.c=$(BUILD)/dev/%)

.PHONY: all cpu test test-asan test-tsan test-abi test-emu bench help clean install
all: $(BUILD)/tandem $(BUILD)/libtandem.so

cpu:
	@$(MAKE) --no-print-directory CUDA=0 all

help:
	@sed -n '3,12p' Makefile | sed 's/^# //'

# The stamp makes a switch between `make` and `make cpu` rebuild the archive.
$(BUILD)/.cuda-$(CUDA):
	@mkdir -p $(BUILD) && rm -f $(BUILD)/.cuda-* && touch $@

$(BUILD)/libtandem.a: $(LIB_OBJ) $(BUILD)/.cuda-$(CUDA)
	@rm -f $@
	ar rcs $@ $(LIB_OBJ)

# The shared library: the same objects, only tandem_* exported (src/libtandem.map),
# soname libtandem.so.MAJOR. The command and the tests keep the static archive:
# the tests reach internal modules the .so hides.
VERSION := $(shell sed -n 's/^\#define TANDEM_VERSION "\(.*\)"/\1/p' include/tandem.h)
SOMAJOR := $(firstword $(subst ., ,$(VERSION)))
$(BUILD)/libtandem.so.$(SOMAJOR): $(LIB_OBJ) $(BUILD)/.cuda-$(CUDA) src/libtandem.map
	$(CC) $(CFLAGS_BASE) -shared -Wl,-soname,libtandem.so.$(SOMAJOR) -Wl,--version-script=src/libtandem.map \
	  -Wl,--no-undefined -o $@ $(LIB_OBJ) $(LDLIBS)
$(BUILD)/libtandem.so: $(BUILD)/libtandem.so.$(SOMAJOR)
	ln -sf libtandem.so.$(SOMAJOR) $@

$(BUILD)/tandem: $(CLI_OBJ) $(BUILD)/libtandem.a
	$(CC) $(CFLAGS_BASE) -o $@ $(CLI_OBJ) $(BUILD)/libtandem.a $(LDLIBS) -ledit -lmicrohttpd

$(BUILD)/run_tests: $(TEST_OBJ) $(BUILD)/libtandem.a
	$(CC) $(CFLAGS_BASE) -o $@ $(TEST_OBJ) $(BUILD)/libtandem.a $(LDLIBS)

# dev programs link the benchmark code of the command (cli/bench/: not in the library)
BENCH_OBJ := $(filter $(BUILD)/cli/bench/%,$(CLI_OBJ))
$(BUILD)/dev/%: dev/%.c $(BENCH_OBJ) $(BUILD)/libtandem.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(ISA_AMX) -o $@ $< $(BENCH_OBJ) $(BUILD)/libtandem.a $(LDLIBS)

test: $(BUILD)/run_tests $(BUILD)/tandem
	$(BUILD)/run_tests $(TESTS)

test-asan:
	@$(MAKE) --no-print-directory CUDA=0 BUILD=build-asan OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test

# Sessions of one engine on threads of their own (tests/test_concurrency.c)
# under TSan. Only the library and the test runner are built and only that
# group runs: the other groups drive the pool from one thread, and under TSan
# they would add minutes to CI. setarch -R (no address randomisation): TSan's
# fixed shadow layout rejects the randomised mappings of some kernels.
TSAN_RUN = $(shell setarch -R true 2>/dev/null && echo setarch -R)
test-tsan:
	@$(MAKE) --no-print-directory CUDA=0 BUILD=build-tsan OPT=-O1 \
	  SAN="-fsanitize=thread -fno-omit-frame-pointer" build-tsan/run_tests
	TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" $(TSAN_RUN) build-tsan/run_tests --concurrency

bench: $(BENCH_BIN) $(BUILD)/tandem

# The GPU test groups on the CPU emulation of gpu.h (bench/e2e_gpu_emu.c), for
# machines without a GPU: --gpuw (every --gpu-weights format end to end on
# every fixture, the demo model's KL); build-emu/emu_tests --gpu_fast runs the
# hybrid schedule with deferral against the CPU engine. The schedule and the
# numerics of the formats, not the CUDA kernels. A CPU-only library in build-emu/.
EMU_TEST_OBJ = $(patsubst %.c,$(BUILD)/%.o,tests/run.c tests/test_gpu_fast.c tests/test_gpuw.c) $(BUILD)/bench/e2e_gpu_emu.o
test-emu:
	@$(MAKE) --no-print-directory CUDA=0 BUILD=build-emu build-emu/emu_tests
	build-emu/emu_tests --gpuw
$(BUILD)/emu_tests: $(EMU_TEST_OBJ) $(BUILD)/libtandem.a
	$(CC) $(CFLAGS_BASE) -o $@ $(EMU_TEST_OBJ) $(BUILD)/libtandem.a $(LDLIBS)

test-abi: $(BUILD)/libtandem.so
	CC="$(CC)" BUILD=$(BUILD) tests/abi/check.sh

# pkg-config: the shared library by default; `pkg-config --static` adds what
# libtandem.a needs. The rpath lets a program built against a PREFIX outside
# the loader's paths run without LD_LIBRARY_PATH.
PREFIX  ?= /usr/local
LIBDIR  ?= $(PREFIX)/lib
install: $(BUILD)/libtandem.so $(BUILD)/libtandem.a $(BUILD)/tandem
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin
	install -m 644 include/tandem*.h $(DESTDIR)$(PREFIX)/include/
	install -m 755 $(BUILD)/libtandem.so.$(SOMAJOR) $(DESTDIR)$(LIBDIR)/
	ln -sf libtandem.so.$(SOMAJOR) $(DESTDIR)$(LIBDIR)/libtandem.so
	install -m 644 $(BUILD)/libtandem.a $(DESTDIR)$(LIBDIR)/
	install -m 755 $(BUILD)/tandem $(DESTDIR)$(PREFIX)/bin/
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$(LIBDIR)' 'includedir=$${prefix}/include' '' \
	  'Name: tandem' 'Description: Mixture-of-Experts inference engine and CPU MoE operator' \
	  'Version: $(VERSION)' 'Cflags: -I$${includedir}' 'Libs: -L$${libdir} -Wl,-rpath,$${libdir} -ltandem' \
	  'Libs.private: $(strip $(LDLIBS))' > $(DESTDIR)$(LIBDIR)/pkgconfig/tandem.pc

clean:
	rm -rf build build-asan build-tsan

$(BUILD)/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(ISA_AVX2) -c $< -o $@
$(BUILD)/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(ISA_AVX512) -c $< -o $@
$(BUILD)/%_amx.o: %_amx.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(ISA_AMX) -c $< -o $@
$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -c $< -o $@
$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# ---- fuzzing (fuzz/*.c, bench/fuzz.sh) -----------------------------------
# `make fuzz` builds one libFuzzer program per fuzz/NAME.c as build-fuzz/fuzz/NAME:
# clang, the library compiled with -fsanitize=fuzzer-no-link,address,undefined
# (coverage for the fuzzer, no main), CUDA off. The server's request parser is
# linked from its objects without http.c/serve.c (no libmicrohttpd, no main).
# -Wno-string-concatenation: clang flags the split literal in text.c's table
# of end tokens (split so the \x escape ends), which gcc does not check.
FUZZ_SAN  = -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
            -Wno-string-concatenation
FUZZ_BIN  = $(patsubst fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard fuzz/*.c))
FUZZ_SRV  = $(patsubst %.c,$(BUILD)/%.o,server/request.c server/sched.c server/respond.c server/textout.c)
.PHONY: fuzz fuzz-bins
fuzz:
	@$(MAKE) --no-print-directory CC=clang CUDA=0 BUILD=build-fuzz OPT=-O1 SAN="$(FUZZ_SAN)" fuzz-bins
fuzz-bins: $(FUZZ_BIN)
$(BUILD)/fuzz/%: fuzz/%.c $(FUZZ_SRV) $(BUILD)/libtandem.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -Iserver -fsanitize=fuzzer -o $@ $< $(FUZZ_SRV) $(BUILD)/libtandem.a $(LDLIBS)
