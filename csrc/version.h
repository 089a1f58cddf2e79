#pragma once
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FASTDUME_VERSION "0.1.0"

namespace fastdume {
inline int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace fastdume
