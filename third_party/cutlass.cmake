# Where the CUTLASS/CuTe headers come from.
#   CUTLASS_DIR (CMake variable or environment): a user's own CUTLASS checkout.
#   otherwise: the pinned `nvidia-cutlass` wheel (pip install --no-deps nvidia-cutlass==4.2.0.0),
#   which ships the headers under cutlass_library/source/include.
# Sets CUTLASS_INCLUDE_DIR and CUTLASS_VERSION.
set(BEACON_CUTLASS_PIN "4.2.0.0")
if(NOT DEFINED CUTLASS_DIR AND DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_DIR "$ENV{CUTLASS_DIR}")
endif()
if(DEFINED CUTLASS_DIR AND NOT CUTLASS_DIR STREQUAL "")
  set(CUTLASS_INCLUDE_DIR "${CUTLASS_DIR}/include")
  set(_how "CUTLASS_DIR=${CUTLASS_DIR}")
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE CUTLASS_INCLUDE_DIR RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    set(CUTLASS_INCLUDE_DIR "")
  endif()
  set(_how "the nvidia-cutlass wheel")
endif()
if(NOT EXISTS "${CUTLASS_INCLUDE_DIR}/cute/tensor.hpp" OR NOT EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h")
  message(FATAL_ERROR
    "beacon_ops: CUDA kernels need the CUTLASS/CuTe headers, not found via ${_how} "
    "(looked in '${CUTLASS_INCLUDE_DIR}'). Run `pip install --no-deps nvidia-cutlass==${BEACON_CUTLASS_PIN}`, "
    "point CUTLASS_DIR at a CUTLASS checkout, or build CPU-only with BEACON_OPS_CUDA=0.")
endif()
file(STRINGS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h" _ver REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*CUTLASS_PATCH ([0-9]+).*" "\\1.\\2.\\3"
       CUTLASS_VERSION "${_ver}")
message(STATUS "beacon_ops: CUTLASS ${CUTLASS_VERSION} headers from ${CUTLASS_INCLUDE_DIR}")
