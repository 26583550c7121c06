// BSBERT_CHECK(cond, parts...): TORCH_CHECK whose message is built without std::ostream number
// formatting. Every bsbert error message goes through it.
//
// Why: TORCH_CHECK formats its arguments with std::ostringstream. On the lent H200 (torch 2.11, the
// image's /opt/gcc toolchain) inserting an integer into that stream from bsbert's extension crashed the
// process inside libstdc++'s locale code (cuda-gdb: std::ostream::_M_insert<long> called from
// c10::detail::_str_wrapper in bsbert/_C.so), while string parts were fine. A bad-shape error must be
// an error, not a crash, so numbers are turned into text with std::to_string (no locale, no iostreams)
// and TORCH_CHECK only ever receives one std::string. tests/test_error_messages.py keeps every message
// on this path.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace bsbert {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else {
    s += std::to_string(v);
  }
}

}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace bsbert

#define BSBERT_CHECK(cond, ...) TORCH_CHECK(cond, ::bsbert::msg(__VA_ARGS__))
