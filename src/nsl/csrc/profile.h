// nsl CPU kernel: optional per-phase timing (off unless compiled with -DNSL_PROFILE).
//
// NSL_PHASE(kFoo) times the rest of the enclosing scope and adds it (nanoseconds of the calling
// thread's CPU time, CLOCK_THREAD_CPUTIME_ID where there is one, so that time spent descheduled
// on a loaded machine does not count; summed over threads) to phase kFoo; scopes must not nest.
// Without NSL_PROFILE it compiles to nothing. A profiling build also
// registers nsl_cpu::phase_times() -> float[] (milliseconds per phase, in Phase order, names in
// kPhaseNames) and nsl_cpu::reset_phase_times(); benchmarks/kernel_phases.py builds one and
// prints the breakdown.
#pragma once

#include <cstdint>

namespace nsl {

enum Phase : int {
  kFwdBuild,     // forward: building (and modulating) the column tile
  kFwdMix,       // forward, full layout: the per-location P x P mix
  kFwdGemm,      // forward: out = W B
  kBwdSetup,     // backward: zeroed outputs, W^T, per-thread accumulators
  kBwdGemmH,     // backward: H = W^T g (dsim's reduction when fused into it)
  kBwdRows,      // backward, diagonal: the per-row dsim / dx / modulated-column work
  kBwdBuild,     // backward, full layout: rebuilding the column tile
  kBwdDM,        // backward, full layout: dM = H C^T per location
  kBwdMixT,      // backward, full layout: M^T H for dx
  kBwdScatter,   // backward: scattering into dx
  kBwdMix,       // backward, full layout: M C for dW
  kBwdGT,        // backward: grad_out tile transposed for dW
  kBwdGemmW,     // backward: dW^T += B g^T
  kBwdReduce,    // backward: per-thread dx / dW accumulators summed
  kNumPhases
};

inline const char* const kPhaseNames[kNumPhases] = {
    "fwd.build", "fwd.mix", "fwd.gemm", "bwd.setup", "bwd.gemm_H", "bwd.rows", "bwd.build",
    "bwd.dM", "bwd.mixT", "bwd.scatter", "bwd.mix", "bwd.gT", "bwd.gemm_dW", "bwd.reduce"};

}  // namespace nsl

#ifdef NSL_PROFILE
#include <atomic>
#include <chrono>
#include <ctime>

namespace nsl {

inline std::atomic<int64_t> g_phase_ns[kNumPhases];

inline int64_t phase_clock_ns() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

struct PhaseScope {
  Phase phase;
  int64_t t0;
  explicit PhaseScope(Phase p) : phase(p), t0(phase_clock_ns()) {}
  ~PhaseScope() { g_phase_ns[phase].fetch_add(phase_clock_ns() - t0, std::memory_order_relaxed); }
};

}  // namespace nsl

#define NSL_PHASE_CAT2(a, b) a##b
#define NSL_PHASE_CAT(a, b) NSL_PHASE_CAT2(a, b)
#define NSL_PHASE(p) ::nsl::PhaseScope NSL_PHASE_CAT(nsl_phase_, __LINE__)(::nsl::p)
#else
#define NSL_PHASE(p) \
  do {               \
  } while (0)
#endif
