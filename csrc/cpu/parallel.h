// Dynamic task scheduling on PyTorch's intra-op threads.
//
// at::parallel_for splits a range statically, so one slow thread (a thread the OS
// preempts, or one whose tasks happen to be heavier, like samples with more keys) holds
// up the whole call. Here each thread takes the next task as soon as it is free.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
// MKL's C API for the calling thread's thread count (mkl_service.h), when PyTorch's BLAS is MKL
// (a weak reference: null
// under other BLAS libraries).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define D3F_HAVE_MKL_LOCAL_THREADS 1
#endif

namespace d3f {

// Within a task, BLAS runs on the calling thread only. PyTorch turns MKL_DYNAMIC off,
// so a gemm called from a worker thread would otherwise take MKL's threaded path, whose
// shared copy buffers serialise the workers (2 threads ran slower than 1).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
#ifdef D3F_HAVE_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SingleThreadedBlas() {
#ifdef D3F_HAVE_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
#endif
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;  // 0: back to the global setting
};

// Runs body(state, task) for every task in [0, n_tasks); make_state() builds one
// thread's scratch (called once per thread that takes part).
template <typename MakeState, typename Body>
void parallel_tasks(int64_t n_tasks, const MakeState& make_state, const Body& body) {
  if (n_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n_tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernel-internal ATen calls are never differentiated
    SingleThreadedBlas single_threaded_blas;
    auto state = make_state();
    for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) body(state, task);
  });
}

}  // namespace d3f
