# Which CUDA kernels a build contains, read from the CUDA sources it compiles, for build_info()
# and _build.json (so a kernel file added to the source lists is reported without more edits).
#   csrc/cuda/instantiations/<kind>_hdim<d>_<dtype>.cu  -> kind <kind>, instance hdim<d>_<dtype>
#   csrc/cuda/<name>.cu                                 -> kind <name> (no instances: the kernel
#                                                          takes every head dim / dtype it accepts)
#   csrc/cuda/<name>_api.cu                             -> none (checks and dispatch only)
#
# beacon_kernel_list(<out_prefix> <sources...>) sets
#   <out_prefix>_CXX   the kinds as the C string build_info.h carries:
#                      "kind=inst inst,kind=,..." (kinds sorted, instances sorted)
#   <out_prefix>_JSON  the same as the body of a JSON object: "kind": ["inst", ...], ...
function(beacon_kernel_list out_prefix)
  set(kinds "")
  foreach(src IN LISTS ARGN)
    get_filename_component(stem "${src}" NAME_WE)
    if(stem MATCHES "^(.+)_(hdim[0-9]+_[a-z0-9]+)$")
      set(kind "${CMAKE_MATCH_1}")
      list(APPEND _inst_${kind} "${CMAKE_MATCH_2}")
    elseif(stem MATCHES "_api$")
      continue()
    else()
      set(kind "${stem}")
    endif()
    list(APPEND kinds "${kind}")
  endforeach()
  list(REMOVE_DUPLICATES kinds)
  list(SORT kinds)
  set(cxx "")
  set(json "")
  foreach(kind IN LISTS kinds)
    set(insts "${_inst_${kind}}")
    list(SORT insts COMPARE NATURAL)
    string(REPLACE ";" " " inst_cxx "${insts}")
    string(REPLACE ";" "\", \"" inst_json "${insts}")
    if(NOT inst_json STREQUAL "")
      set(inst_json "\"${inst_json}\"")
    endif()
    list(APPEND cxx "${kind}=${inst_cxx}")
    list(APPEND json "\"${kind}\": [${inst_json}]")
  endforeach()
  string(REPLACE ";" "," cxx "${cxx}")
  string(REPLACE ";" ", " json "${json}")
  set(${out_prefix}_CXX "${cxx}" PARENT_SCOPE)
  set(${out_prefix}_JSON "${json}" PARENT_SCOPE)
endfunction()

# The tensor-core instantiations a build compiles: csrc/cuda/instantiations/<kind>_hdim<d>_<dtype>.cu
# for the selected kinds (BEACON_OPS_KERNELS), head dims and dtypes.
#
# beacon_instantiations(<out_prefix> <dir> KINDS <kind>... HEADDIMS <d>... DTYPES <dtype>...) sets
#   <out_prefix>_SOURCES  the selected files of <dir>
#   <out_prefix>_DEFS     BEACON_BUILT_<KIND>_HDIM<d>_<dtype>=1 for each of them (KIND upper case),
#                         what csrc/cuda/static_switch.h dispatches on
#   <out_prefix>_ALL_KINDS  every kind that has an instantiation in <dir>
# A selected kind without any instantiation in <dir> is an error (a misspelt kind).
function(beacon_instantiations out_prefix dir)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "KINDS;HEADDIMS;DTYPES")
  set(depends CONFIGURE_DEPENDS)  # re-glob when files come or go; not in cmake -P (tests)
  if(CMAKE_SCRIPT_MODE_FILE)
    set(depends "")
  endif()
  file(GLOB all ${depends} "${dir}/*_hdim*_*.cu")
  set(all_kinds "")
  foreach(src IN LISTS all)
    get_filename_component(stem "${src}" NAME_WE)
    if(stem MATCHES "^(.+)_hdim[0-9]+_[a-z0-9]+$")
      list(APPEND all_kinds "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES all_kinds)
  list(SORT all_kinds)
  set(sources "")
  set(defs "")
  foreach(kind IN LISTS arg_KINDS)
    if(NOT kind IN_LIST all_kinds)
      string(REPLACE ";" ", " known "${all_kinds}")
      message(FATAL_ERROR "beacon_ops: BEACON_OPS_KERNELS names '${kind}', which is not a kernel kind "
                          "(kinds: ${known})")
    endif()
    string(TOUPPER "${kind}" kind_upper)
    foreach(hd IN LISTS arg_HEADDIMS)
      foreach(dt IN LISTS arg_DTYPES)
        set(src "${dir}/${kind}_hdim${hd}_${dt}.cu")
        if(EXISTS "${src}")
          list(APPEND sources "${src}")
          list(APPEND defs "BEACON_BUILT_${kind_upper}_HDIM${hd}_${dt}=1")
        endif()
      endforeach()
    endforeach()
  endforeach()
  set(${out_prefix}_SOURCES "${sources}" PARENT_SCOPE)
  set(${out_prefix}_DEFS "${defs}" PARENT_SCOPE)
  set(${out_prefix}_ALL_KINDS "${all_kinds}" PARENT_SCOPE)
endfunction()
