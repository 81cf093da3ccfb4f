# rpc/server.cmake — the gRPC core server (library msa_rpc) and msad itself.
# Included from rpc/CMakeLists.txt after msa_proto is defined.
pkg_check_modules(MHD REQUIRED IMPORTED_TARGET libmicrohttpd)

add_library(msa_rpc STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/arena.c
  ${CMAKE_CURRENT_SOURCE_DIR}/auth.c
  ${CMAKE_CURRENT_SOURCE_DIR}/config.c
  ${CMAKE_CURRENT_SOURCE_DIR}/connlimit.c
  ${CMAKE_CURRENT_SOURCE_DIR}/methods.c
  ${CMAKE_CURRENT_SOURCE_DIR}/metrics.c
  ${CMAKE_CURRENT_SOURCE_DIR}/server.c)
target_include_directories(msa_rpc PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
target_compile_options(msa_rpc PRIVATE ${MSA_WARN})
target_link_libraries(msa_rpc PUBLIC msa_daemon msa_proto PkgConfig::GRPC PkgConfig::MHD
                      Threads::Threads ${CMAKE_DL_LIBS})

add_executable(msad ${CMAKE_CURRENT_SOURCE_DIR}/msad.c)
target_compile_options(msad PRIVATE ${MSA_WARN})
pkg_check_modules(OPENSSL REQUIRED IMPORTED_TARGET openssl)
target_link_libraries(msad PRIVATE msa_rpc PkgConfig::OPENSSL)
