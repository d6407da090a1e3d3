// Host-side controls of the SIMT emulator (emu.cpp), for test drivers.
#pragma once
#include <cstdint>
#include <string>

namespace cuda_emu {

// Seed of the block order and of the thread interleaving of the launches that follow.
void set_seed(uint64_t seed);
// The report of the last failed launch ("" if none since clear_report).
const char* last_report();
void clear_report();
void report_failure(const std::string& report);

struct Stats {
  uint64_t launches, blocks, threads;
};
Stats stats();  // launches since set_seed; blocks and threads since the start

}  // namespace cuda_emu
