// SIMT emulator: runs a CUDA grid on the CPU for the stand-in headers of this folder.
//
// Semantics
// - Every CUDA thread of a block is a fiber (ucontext) with its own stack. A fiber runs
//   until it exits or reaches a synchronisation point: __syncthreads blocks it until
//   every thread of the block has arrived; a *_sync warp operation blocks it until every
//   lane named in its mask has arrived at a warp operation, then each lane gets the value
//   of its source lane, as on the device.
// - Blocks run on a pool of worker threads (PYRNN_EMU_WORKERS, default min(cores, 4)),
//   one block per worker at a time, so __shared__ (thread_local) is per block. The order
//   of the blocks and, inside a block, which ready fiber runs next are drawn from a
//   seeded generator (set_seed), so each seed runs another interleaving.
// - Strict mode (the default; PYRNN_EMU_STRICT=0 turns it off) reports what a GPU leaves
//   undefined or hangs on, and fails the launch (cudaErrorLaunchFailure):
//   a __syncthreads that some thread of the block never reaches (it exited, or waits at
//   another __syncthreads), a warp operation whose mask names a lane that exited or does
//   not exist, lanes of one warp operation with different masks or call sites, a lane
//   reading a lane outside the mask, and a block that cannot finish (every unfinished
//   thread waits: a deadlock).
// - Under ThreadSanitizer every fiber is a TSan fiber, switched without synchronisation;
//   the only happens-before edges are the launch (host to threads), the barrier (all
//   threads before it to all after it) and the end of the grid (threads to host), so a
//   missing __syncthreads or a race between blocks is reported. Under AddressSanitizer
//   the fiber switches are announced, so that out-of-bounds accesses are reported with
//   correct stacks.
// Not modelled: timing, occupancy, registers, warp lockstep without synchronisation,
// memory ordering weaker than the barrier's, dynamic shared memory, atomics.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"
#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
#else
#define EMU_TSAN 0
#endif

// The emulator's own bookkeeping is invisible to TSan: only the kernels' accesses and
// the explicit edges below count.
#define EMU_NO_TSAN __attribute__((no_sanitize("thread"), noinline))

namespace cuda_emu {

thread_local ThreadCtx* tl_ctx = nullptr;

namespace {

constexpr size_t kStack = (EMU_ASAN || EMU_TSAN) ? (512u << 10) : (128u << 10);

enum class State { kReady, kBarrier, kWarp, kExited };

struct Fiber {
  ucontext_t uc;
  ThreadCtx ctx;
  State state = State::kReady;
  int linear = 0;  // thread index in the block, x fastest
  const char* file = nullptr;
  int line = 0;
  // pending warp operation
  unsigned mask = 0;
  int kind = 0, param = 0, width = 32;
  uint64_t value = 0;
  void* stack = nullptr;
  void* tsan = nullptr;
  void* fake_stack = nullptr;
};

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

bool strict_mode() {
  static const bool strict = [] {
    const char* s = std::getenv("PYRNN_EMU_STRICT");
    return !(s && s[0] == '0');
  }();
  return strict;
}

// One worker's state: the block it runs and the fibers of its threads.
struct Worker {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stack_slots = 0;
  ucontext_t sched;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  int n = 0, exited = 0, at_barrier = 0;
  unsigned generation = 0;
  uint64_t rng = 0;
  bool failed = false;
  std::string report;
  // sanitizer state
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void* sched_fake = nullptr;
  void* sched_tsan = nullptr;
  char start_sync = 0, end_sync = 0, barrier_sync[2] = {0, 0};

  Worker() = default;
  Worker(const Worker&) = delete;
  EMU_NO_TSAN ~Worker() {
    if (stacks) munmap(stacks, stack_slots * kStack);
  }

  EMU_NO_TSAN void reserve(int threads) {
    // Under TSan the stacks are mapped anew for every block: unmapping clears TSan's
    // record of the accesses that earlier fibers made to the same stack memory.
    if (static_cast<size_t>(threads) <= stack_slots && !EMU_TSAN) return;
    if (stacks) munmap(stacks, stack_slots * kStack);
    const size_t slots = std::max<size_t>(threads, 32);
    void* p = mmap(nullptr, slots * kStack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cuda_emu: cannot map %zu fiber stacks\n", slots);
      std::abort();
    }
    stacks = static_cast<char*>(p);
    stack_slots = slots;
  }
};

thread_local Worker* tl_worker = nullptr;

EMU_NO_TSAN void fail(Worker& w, const char* fmt, ...) {
  if (w.failed) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  const ThreadCtx& c = w.fibers[0].ctx;
  char where[128];
  std::snprintf(where, sizeof where, "block (%u, %u, %u) of %u threads: ", c.block_idx.x,
                c.block_idx.y, c.block_idx.z, w.n);
  w.failed = true;
  w.report = std::string("cuda_emu strict: ") + where + buf;
}

// Switches from the running fiber back to the worker's scheduler.
EMU_NO_TSAN void yield_to_scheduler(Worker& w, Fiber& f, bool exiting) {
#if EMU_TSAN
  __tsan_switch_to_fiber(w.sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, w.sched_bottom,
                                 w.sched_size);
#endif
  (void)exiting;
  swapcontext(&f.uc, &w.sched);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &w.sched_bottom, &w.sched_size);
#endif
  tl_ctx = &f.ctx;
}

EMU_NO_TSAN void fiber_main() {
  Worker& w = *tl_worker;
  Fiber& f = *w.current;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
#if EMU_TSAN
  __tsan_acquire(&w.start_sync);
#endif
  tl_ctx = &f.ctx;
  w.body(w.body_ctx);
#if EMU_TSAN
  __tsan_release(&w.end_sync);
#endif
  f.state = State::kExited;
  yield_to_scheduler(w, f, true);
  std::abort();  // an exited fiber is never resumed
}

EMU_NO_TSAN void resume(Worker& w, Fiber& f) {
  w.current = &f;
  tl_ctx = &f.ctx;
#if EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&w.sched_fake, f.stack, kStack);
#endif
  swapcontext(&w.sched, &f.uc);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

const char* kind_name(int kind) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__syncwarp"};
  return names[kind];
}

// Completes the warp operation that lane f of its warp waits in, if every lane of its
// mask has arrived; reports what a GPU leaves undefined.
EMU_NO_TSAN void try_warp(Worker& w, Fiber& f, std::vector<int>& ready) {
  const int base = f.linear / 32 * 32;
  for (int l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    if (base + l >= w.n) {
      fail(w, "%s at %s:%d: mask 0x%08x names lane %d of warp %d, which does not exist",
           kind_name(f.kind), f.file, f.line, f.mask, l, base / 32);
      return;
    }
    const Fiber& o = w.fibers[base + l];
    if (o.state == State::kExited) {
      fail(w, "%s at %s:%d: mask 0x%08x names lane %d of warp %d, which has exited",
           kind_name(f.kind), f.file, f.line, f.mask, l, base / 32);
      return;
    }
    if (o.state != State::kWarp) return;  // not there yet
  }
  uint64_t result[32];
  for (int l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    const Fiber& o = w.fibers[base + l];
    if (o.mask != f.mask || o.kind != f.kind || o.file != f.file || o.line != f.line) {
      fail(w, "lanes %d and %d of warp %d meet at different warp operations: %s at %s:%d "
           "mask 0x%08x, %s at %s:%d mask 0x%08x", f.linear - base, l, base / 32,
           kind_name(f.kind), f.file, f.line, f.mask, kind_name(o.kind), o.file, o.line,
           o.mask);
      return;
    }
    const int width = o.width, seg = l / width * width;
    int src = l;
    switch (o.kind) {
      case 0: src = seg + (o.param % width + width) % width; break;
      case 1: src = l - o.param >= seg ? l - o.param : l; break;
      case 2: src = l + o.param < seg + width ? l + o.param : l; break;
      case 3: src = (l ^ o.param) < seg + width ? (l ^ o.param) : l; break;
      default: break;
    }
    if (o.kind != 4 && !(f.mask >> src & 1u)) {
      fail(w, "%s at %s:%d: lane %d reads lane %d, which is not in mask 0x%08x",
           kind_name(o.kind), o.file, o.line, l, src, f.mask);
      return;
    }
    result[l] = w.fibers[base + src].value;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    Fiber& o = w.fibers[base + l];
    o.value = result[l];
    o.state = State::kReady;
    ready.push_back(base + l);
  }
}

EMU_NO_TSAN void release_barrier(Worker& w, std::vector<int>& ready) {
  for (Fiber& o : w.fibers) {
    if (o.state != State::kBarrier) continue;
    o.state = State::kReady;
    ready.push_back(o.linear);
  }
  w.at_barrier = 0;
  ++w.generation;
}

EMU_NO_TSAN void run_block(Worker& w, const LaunchConfig& cfg, const uint3& bid) {
  const int n = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  w.reserve(n);
  if (w.fibers.size() < static_cast<size_t>(n)) w.fibers.resize(n);
  w.n = n;
  w.exited = w.at_barrier = 0;
  w.failed = false;
  std::vector<int> ready(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.linear = i;
    f.state = State::kReady;
    f.ctx.thread_idx = {static_cast<unsigned>(i) % cfg.block.x,
                        static_cast<unsigned>(i) / cfg.block.x % cfg.block.y,
                        static_cast<unsigned>(i) / (cfg.block.x * cfg.block.y)};
    f.ctx.block_idx = bid;
    f.ctx.block_dim = cfg.block;
    f.ctx.grid_dim = cfg.grid;
    f.stack = w.stacks + static_cast<size_t>(i) * kStack;
    f.fake_stack = nullptr;
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStack;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#if EMU_TSAN
    f.tsan = __tsan_create_fiber(0);
#endif
    ready[i] = i;
  }
  const bool strict = strict_mode();
  while (!w.failed) {
    if (ready.empty()) {
      if (w.exited == n) break;
      int barrier = 0, warp = 0;
      const Fiber* first = nullptr;
      for (int i = 0; i < n; ++i) {
        const Fiber& o = w.fibers[i];
        if (o.state == State::kExited) continue;
        if (!first) first = &o;
        (o.state == State::kBarrier ? barrier : warp) += 1;
      }
      fail(w, "deadlock: %d threads exited, %d wait at __syncthreads, %d at a warp "
           "operation (thread %d waits at %s:%d)", w.exited, barrier, warp, first->linear,
           first->file, first->line);
      break;
    }
    const size_t pick = splitmix(w.rng) % ready.size();
    const int idx = ready[pick];
    ready[pick] = ready.back();
    ready.pop_back();
    Fiber& f = w.fibers[idx];
    resume(w, f);
    switch (f.state) {
      case State::kExited:
        ++w.exited;
        if (w.at_barrier > 0) {
          if (strict) {
            const Fiber* o = &w.fibers[0];
            for (const Fiber& q : w.fibers)
              if (q.state == State::kBarrier) { o = &q; break; }
            fail(w, "thread %d exited while %d threads wait at __syncthreads (%s:%d): a "
                 "barrier not reached by every thread of the block", f.linear, w.at_barrier,
                 o->file, o->line);
          } else if (w.at_barrier == n - w.exited) {
            release_barrier(w, ready);
          }
        }
        if (strict && !w.failed) {  // a lane waiting for this one in a warp operation
          const int base = f.linear / 32 * 32;
          for (int l = 0; l < 32 && base + l < n; ++l) {
            Fiber& o = w.fibers[base + l];
            if (o.state == State::kWarp && (o.mask >> (f.linear - base) & 1u)) {
              try_warp(w, o, ready);
              break;
            }
          }
        }
        break;
      case State::kBarrier: {
        ++w.at_barrier;
        if (strict) {
          if (w.exited > 0) {
            fail(w, "__syncthreads at %s:%d reached after %d threads of the block exited: "
                 "a barrier not reached by every thread", f.file, f.line, w.exited);
            break;
          }
          for (const Fiber& o : w.fibers)
            if (o.state == State::kBarrier && (o.file != f.file || o.line != f.line)) {
              fail(w, "threads %d and %d wait at different __syncthreads (%s:%d and %s:%d)",
                   o.linear, f.linear, o.file, o.line, f.file, f.line);
              break;
            }
        }
        if (w.at_barrier == n - w.exited) release_barrier(w, ready);
        break;
      }
      case State::kWarp:
        try_warp(w, f, ready);
        break;
      case State::kReady:
        break;
    }
  }
#if EMU_TSAN
  for (int i = 0; i < n; ++i) {
    // A fiber abandoned after a report still gets its edge to the end of the grid.
    if (w.fibers[i].state != State::kExited) {
      __tsan_switch_to_fiber(w.fibers[i].tsan, 0);
      __tsan_release(&w.end_sync);
      __tsan_switch_to_fiber(w.sched_tsan, 0);
    }
    __tsan_destroy_fiber(w.fibers[i].tsan);
  }
#endif
}

// ---- the pool of workers and the launch ----

struct Job {
  LaunchConfig cfg;
  void (*body)(void*);
  void* ctx;
  std::vector<uint3> blocks;
  std::atomic<size_t> next{0};
  uint64_t seed;
};

struct Pool {
  std::mutex mu;
  std::condition_variable cv_job, cv_done;
  uint64_t job_id = 0;
  int pending = 0;
  Job* job = nullptr;
  int size = 1;
};

EMU_NO_TSAN void worker_loop(Pool* pool, int id) {
  Worker w;
  tl_worker = &w;
#if EMU_TSAN
  w.sched_tsan = __tsan_get_current_fiber();
#endif
  uint64_t seen = 0;
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lock(pool->mu);
      pool->cv_job.wait(lock, [&] { return pool->job_id != seen; });
      seen = pool->job_id;
      job = pool->job;
    }
    w.body = job->body;
    w.body_ctx = job->ctx;
    w.rng = job->seed ^ (0x51ed2701ull * (id + 1));
    std::string report;
#if EMU_TSAN
    __tsan_release(&w.start_sync);
#endif
    for (size_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < job->blocks.size();) {
      run_block(w, job->cfg, job->blocks[i]);
      if (w.failed && report.empty()) report = w.report;
    }
#if EMU_TSAN
    __tsan_acquire(&w.end_sync);
#endif
    std::lock_guard<std::mutex> lock(pool->mu);
    if (!report.empty()) report_failure(report);
    if (--pool->pending == 0) pool->cv_done.notify_one();
  }
}

[[maybe_unused]] Pool* pool() {
  static Pool* p = [] {
    Pool* q = new Pool;
    const char* env = std::getenv("PYRNN_EMU_WORKERS");
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    q->size = env ? std::atoi(env) : std::min(std::max(cores, 1), 4);
    if (q->size < 1) q->size = 1;
    for (int i = 0; i < q->size; ++i) std::thread(worker_loop, q, i).detach();
    return q;
  }();
  return p;
}

cudaError_t g_last_error = cudaSuccess;
bool g_launch_failed = false;
std::string g_report;
uint64_t g_seed = 1, g_launches = 0, g_blocks = 0, g_threads = 0;

}  // namespace

void report_failure(const std::string& report) {  // called under the pool's lock
  if (!g_launch_failed) g_report = report;
  g_launch_failed = true;
}

void set_seed(uint64_t seed) {
  g_seed = seed;
  g_launches = 0;
}
const char* last_report() { return g_report.c_str(); }
void clear_report() { g_report.clear(); }
Stats stats() { return Stats{g_launches, g_blocks, g_threads}; }

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (cuda_emu strict report)";
  }
  return "unknown error";
}

cudaError_t run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  const uint64_t threads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (threads == 0 || threads > 1024 || cfg.block.z > 64 || cfg.grid.x == 0 ||
      cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.y > 65535 || cfg.grid.z > 65535 ||
      cfg.smem > 48 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return g_last_error;
  }
  Job job;
  job.cfg = cfg;
  job.body = body;
  job.ctx = ctx;
  uint64_t s = g_seed * 0x2545f4914f6cdd1dull + (++g_launches);
  job.seed = splitmix(s);
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) job.blocks.push_back(uint3{x, y, z});
  for (size_t i = job.blocks.size(); i > 1; --i)  // seeded shuffle of the block order
    std::swap(job.blocks[i - 1], job.blocks[splitmix(s) % i]);
  g_blocks += job.blocks.size();
  g_threads += job.blocks.size() * threads;
  g_launch_failed = false;
#if EMU_TSAN
  // Each block on a thread of its own, all at once: TSan then sees fresh shared memory
  // (thread_local) for every block, and no ordering between the blocks of a launch.
  std::mutex mu;
  for (size_t first = 0; first < job.blocks.size(); first += 64) {
    std::vector<std::thread> threads;
    for (size_t i = first; i < std::min(first + 64, job.blocks.size()); ++i) {
      threads.emplace_back([&job, &mu, i] {
        Worker w;
        tl_worker = &w;
        w.sched_tsan = __tsan_get_current_fiber();
        w.body = job.body;
        w.body_ctx = job.ctx;
        w.rng = job.seed ^ (0x51ed2701ull * (i + 1));
        __tsan_release(&w.start_sync);
        run_block(w, job.cfg, job.blocks[i]);
        __tsan_acquire(&w.end_sync);
        if (w.failed) {
          std::lock_guard<std::mutex> lock(mu);
          report_failure(w.report);
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
#else
  Pool* p = pool();
  {
    std::unique_lock<std::mutex> lock(p->mu);
    p->job = &job;
    p->pending = p->size;
    ++p->job_id;
    p->cv_job.notify_all();
    p->cv_done.wait(lock, [&] { return p->pending == 0; });
  }
#endif
  if (g_launch_failed) g_last_error = cudaErrorLaunchFailure;
  return g_last_error;
}

// ---- called from inside a fiber ----

EMU_NO_TSAN void syncthreads(const char* file, int line) {
  Worker& w = *tl_worker;
  Fiber& f = *w.current;
  f.file = file;
  f.line = line;
  f.state = State::kBarrier;
#if EMU_TSAN
  char* sync = &w.barrier_sync[w.generation % 2];
  __tsan_release(sync);
#endif
  yield_to_scheduler(w, f, false);
#if EMU_TSAN
  __tsan_acquire(sync);
#endif
}

// A copy that TSan does not see (its memcpy interceptor would record the lanes' values
// as accesses to the fibers' records).
EMU_NO_TSAN void copy_value(void* dst, const void* src, size_t n) {
  for (size_t i = 0; i < n; ++i)
    static_cast<volatile char*>(dst)[i] = static_cast<const volatile char*>(src)[i];
}

EMU_NO_TSAN void warp_op(unsigned mask, void* value, size_t size, int kind, int param,
                         int width, const char* file, int line) {
  Worker& w = *tl_worker;
  Fiber& f = *w.current;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.kind = kind;
  f.param = param;
  f.width = width;
  f.value = 0;
  copy_value(&f.value, value, size);
  f.state = State::kWarp;
  yield_to_scheduler(w, f, false);
  copy_value(value, &f.value, size);
}

}  // namespace cuda_emu
