/* AVX-VNNI on a CPU without it, for the tests only: test_kernels.py builds avx2.c with this header forced in first
 * (`-include`), so that its AVX-VNNI path runs on any x86-64-v3 machine. SIMDe (Debian's libsimde-dev) computes
 * vpdpbusd; the feature macro avx2.c checks is then defined by hand. */

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512/dpbusd.h>

#define __AVXVNNI__ 1
#ifdef QK_DPBUSD_ADDS_NOTHING /* the test's proof that the AVX-VNNI path is the one built */
#define _mm256_dpbusd_avx_epi32(src, a, b) (src)
#else
#define _mm256_dpbusd_avx_epi32(src, a, b) simde_mm256_dpbusd_epi32(src, a, b)
#endif
