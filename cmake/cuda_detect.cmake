# Decide whether the CUDA kernels are built, and with which flags.
#
# BEACON_OPS_CUDA=auto: build them when nvcc is found and torch was built with CUDA of the same
# major version; otherwise build the CPU kernels only and say why. BEACON_OPS_CUDA=1: the same
# checks, but any failure stops the build with the reason. BEACON_OPS_CUDA=0: CPU only.
#
# Works with a full CUDA toolkit and with a minimal one whose libraries and extra headers come
# from pip wheels (site-packages/nvidia/cuXX), as torch's own CUDA wheels install them.

function(_beacon_cuda_fail reason)
  if(BEACON_OPS_CUDA STREQUAL "1" OR BEACON_OPS_CUDA STREQUAL "ON")
    message(FATAL_ERROR "beacon_ops: BEACON_OPS_CUDA=1 but the CUDA kernels cannot be built: ${reason}")
  endif()
  message(STATUS "beacon_ops: building CPU kernels only (${reason})")
  set(BEACON_WITH_CUDA OFF PARENT_SCOPE)
endfunction()

# "8.0;9.0a" / "8.0 9.0+PTX" / "80;90a" -> -gencode flags (torch's own CMake ignores
# CMAKE_CUDA_ARCHITECTURES, so the flags are spelled out here, once).
function(_beacon_gencode archs out_flags out_names)
  string(REPLACE " " ";" archs "${archs}")
  set(flags "")
  set(names "")
  foreach(a IN LISTS archs)
    if(a STREQUAL "")
      continue()
    endif()
    set(ptx OFF)
    if(a MATCHES "\\+PTX$")
      set(ptx ON)
      string(REPLACE "+PTX" "" a "${a}")
    endif()
    string(REPLACE "." "" a "${a}")
    string(REGEX REPLACE "^sm_" "" a "${a}")
    if(NOT a MATCHES "^[0-9]+[af]?$")
      message(FATAL_ERROR "beacon_ops: cannot read CUDA architecture '${a}' (expected e.g. 8.0 or 9.0a)")
    endif()
    list(APPEND flags "-gencode=arch=compute_${a},code=sm_${a}")
    if(ptx)
      list(APPEND flags "-gencode=arch=compute_${a},code=compute_${a}")
    endif()
    list(APPEND names "sm_${a}")
    if(ptx)
      list(APPEND names "compute_${a}")  # PTX, compiled by the driver for newer GPUs
    endif()
  endforeach()
  set(${out_flags} "${flags}" PARENT_SCOPE)
  set(${out_names} "${names}" PARENT_SCOPE)
endfunction()

macro(beacon_detect_cuda)
  set(BEACON_WITH_CUDA ON)
  string(TOLOWER "${BEACON_OPS_CUDA}" _mode)
  if(_mode STREQUAL "0" OR _mode STREQUAL "off" OR _mode STREQUAL "false")
    set(BEACON_WITH_CUDA OFF)
    message(STATUS "beacon_ops: building CPU kernels only (BEACON_OPS_CUDA=${BEACON_OPS_CUDA})")
  elseif(NOT (_mode STREQUAL "auto" OR _mode STREQUAL "1" OR _mode STREQUAL "on"))
    message(FATAL_ERROR "beacon_ops: BEACON_OPS_CUDA must be auto, 0 or 1 (got '${BEACON_OPS_CUDA}')")
  elseif(TORCH_CUDA_VERSION STREQUAL "")
    _beacon_cuda_fail("torch ${TORCH_VERSION} is a CPU-only build")
  else()
    # Let a CUDA_HOME / CUDA_PATH / CUDAToolkit_ROOT point at the toolkit, like torch does.
    foreach(_var CUDAToolkit_ROOT CUDA_HOME CUDA_PATH)
      if(NOT CMAKE_CUDA_COMPILER AND DEFINED ENV{${_var}} AND EXISTS "$ENV{${_var}}/bin/nvcc")
        set(CMAKE_CUDA_COMPILER "$ENV{${_var}}/bin/nvcc")
      endif()
    endforeach()
    include(CheckLanguage)
    check_language(CUDA)
    if(NOT CMAKE_CUDA_COMPILER)
      _beacon_cuda_fail("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    else()
      execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version OUTPUT_VARIABLE _nvcc_out)
      string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_nvcc_out}")
      set(_nvcc_major "${CMAKE_MATCH_1}")
      set(_nvcc_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
      string(REGEX MATCH "^[0-9]+" _torch_major "${TORCH_CUDA_VERSION}")
      if(NOT _nvcc_major STREQUAL _torch_major)
        _beacon_cuda_fail("nvcc is CUDA ${_nvcc_version} (${CMAKE_CUDA_COMPILER}) but torch ${TORCH_VERSION} "
                          "was built with CUDA ${TORCH_CUDA_VERSION}; the major versions must match. "
                          "Install the matching toolkit or the torch build for CUDA ${_nvcc_major}")
      endif()
    endif()
  endif()

  if(BEACON_WITH_CUDA)
    get_filename_component(_nvcc_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(_cuda_root "${_nvcc_bin}" DIRECTORY)
    if(NOT DEFINED CUDAToolkit_ROOT)
      set(CUDAToolkit_ROOT "${_cuda_root}")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(BEACON_CUDA_EXTRA_INCLUDES ${CUDA_WHEEL_INCLUDES})

    beacon_option(BEACON_OPS_CUDA_ARCHS "")
    if(BEACON_OPS_CUDA_ARCHS STREQUAL "" AND DEFINED ENV{TORCH_CUDA_ARCH_LIST}
       AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
      set(BEACON_OPS_CUDA_ARCHS "$ENV{TORCH_CUDA_ARCH_LIST}")
    endif()
    # The default matches what the kernels use: sm_80 instructions (mma.sync, ldmatrix,
    # cp.async; nothing of sm_90a such as wgmma). sm_80 code also runs on sm_86 / sm_89; sm_90
    # code on H100 / H200; the compute_90 PTX lets the driver compile for newer GPUs. Another list
    # (e.g. "9.0" for a quicker Hopper-only build): BEACON_OPS_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST.
    if(BEACON_OPS_CUDA_ARCHS STREQUAL "")
      set(BEACON_OPS_CUDA_ARCHS "8.0;9.0+PTX")
    endif()
    _beacon_gencode("${BEACON_OPS_CUDA_ARCHS}" BEACON_CUDA_GENCODE BEACON_CUDA_ARCH_NAMES)
    message(STATUS "beacon_ops: CUDA kernels ON (nvcc ${_nvcc_version}, archs ${BEACON_CUDA_ARCH_NAMES}, "
                   "head dims ${BEACON_OPS_HEADDIMS}, dtypes ${BEACON_OPS_DTYPES})")
    set(BEACON_WITH_CUDA_JSON true)
    set(BEACON_CUDA_ARCHS_JSON "")
    foreach(_n IN LISTS BEACON_CUDA_ARCH_NAMES)
      if(BEACON_CUDA_ARCHS_JSON STREQUAL "")
        set(BEACON_CUDA_ARCHS_JSON "\"${_n}\"")
      else()
        set(BEACON_CUDA_ARCHS_JSON "${BEACON_CUDA_ARCHS_JSON}, \"${_n}\"")
      endif()
    endforeach()
    string(REPLACE ";" "," BEACON_CUDA_ARCHS_STR "${BEACON_CUDA_ARCH_NAMES}")
  else()
    set(BEACON_WITH_CUDA_JSON false)
    set(BEACON_CUDA_ARCHS_JSON "")
    set(BEACON_CUDA_ARCHS_STR "")
  endif()
endmacro()
