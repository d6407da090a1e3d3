// The registry of cells: one line per cell. Everything else about a cell (its mode
// string, gates, saved values, constants; see the interface in common.h) is a member of
// its type, and the ops, the CPU and CUDA loops' instantiations, and, through
// pyrnn._C.cells(), the Python side all derive what they need from this list.
#pragma once
#include <type_traits>

#include "gru.h"
#include "ln_lstm.h"
#include "lstm.h"
#include "rnn.h"

namespace pyrnn {

template <class... Cells>
struct CellList {
  static constexpr int kCount = sizeof...(Cells);
};

using AllCells = CellList<
    RnnCell<Act::kTanh>,
    RnnCell<Act::kRelu>,
    RnnCell<Act::kLeakyRelu>,
    LstmCell,
    GruCell,
    LnLstmCell>;

// The largest number of constants a cell has (the size of the constants' array).
constexpr int kMaxCellParams = 4;

// The index of Cell in AllCells (-1 if it is not there).
template <class Cell, class... Cells>
constexpr int index_of(CellList<Cells...>) {
  int i = 0, found = -1;
  ((std::is_same_v<Cell, Cells> ? (found = i, ++i) : ++i), ...);
  return found;
}
template <class Cell>
constexpr int cell_index() {
  return index_of<Cell>(AllCells{});
}

// Calls f(Cell{}) for the cell at index id of AllCells (no call for an id out of range).
template <class F, class... Cells>
inline void with_cell_at(int id, F&& f, CellList<Cells...>) {
  int i = 0;
  ((i++ == id ? (f(Cells{}), 0) : 0), ...);
}
template <class F>
inline void with_cell_at(int id, F&& f) {
  with_cell_at(id, static_cast<F&&>(f), AllCells{});
}

// Calls f(Cell{}) for every cell, in the registry's order.
template <class F, class... Cells>
inline void for_each_cell(F&& f, CellList<Cells...>) {
  (f(Cells{}), ...);
}
template <class F>
inline void for_each_cell(F&& f) {
  for_each_cell(static_cast<F&&>(f), AllCells{});
}

}  // namespace pyrnn
