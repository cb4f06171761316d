# The CUTLASS/CuTe headers: optional. No kernel of beacon_ops includes them today (the attention
# kernels use hand-written mma.sync / ldmatrix / cp.async, see csrc/cuda/ptx.h, so that the host
# emulation in csrc/cuda/emu can compile them with the C++ compiler); a CUDA build puts them on
# the include path when they are present, for a kernel that wants CuTe, and reports their version
# (build_info()["cutlass"], '' when absent).
#   CUTLASS_DIR (CMake variable or environment): a CUTLASS checkout (include/cutlass,
#   include/cute); must hold the headers when given.
#   otherwise third_party/cutlass, when a checkout has been placed there (it is not committed);
#   otherwise: the `nvidia-cutlass` wheel of the Python that runs the build, if installed
#   (pip install --no-deps nvidia-cutlass==4.2.0.0: headers under cutlass_library/source/include).
# Sets CUTLASS_INCLUDE_DIR ('' when absent) and CUTLASS_VERSION ('' when absent).
if(NOT DEFINED CUTLASS_DIR AND DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_DIR "$ENV{CUTLASS_DIR}")
endif()
if((NOT DEFINED CUTLASS_DIR OR CUTLASS_DIR STREQUAL "") AND EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/third_party/cutlass/include")
  set(CUTLASS_DIR "${CMAKE_CURRENT_SOURCE_DIR}/third_party/cutlass")   # a checkout placed there
endif()
set(_beacon_cutlass_required OFF)
if(DEFINED CUTLASS_DIR AND NOT CUTLASS_DIR STREQUAL "")
  set(CUTLASS_INCLUDE_DIR "${CUTLASS_DIR}/include")
  set(_beacon_cutlass_required ON)
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE CUTLASS_INCLUDE_DIR RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    set(CUTLASS_INCLUDE_DIR "")
  endif()
endif()
set(CUTLASS_VERSION "")
if(EXISTS "${CUTLASS_INCLUDE_DIR}/cute/tensor.hpp" AND EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h")
  file(STRINGS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h" _ver REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*CUTLASS_PATCH ([0-9]+).*" "\\1.\\2.\\3"
         CUTLASS_VERSION "${_ver}")
  message(STATUS "beacon_ops: CUTLASS ${CUTLASS_VERSION} headers from ${CUTLASS_INCLUDE_DIR} (optional)")
elseif(_beacon_cutlass_required)
  message(FATAL_ERROR "beacon_ops: CUTLASS_DIR=${CUTLASS_DIR} holds no CUTLASS/CuTe headers "
                      "(include/cute/tensor.hpp, include/cutlass/version.h)")
else()
  set(CUTLASS_INCLUDE_DIR "")
  message(STATUS "beacon_ops: no CUTLASS headers (optional: no kernel needs them)")
endif()
