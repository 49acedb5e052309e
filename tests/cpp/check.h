// A minimal check library for the torch-free C++ tests (no framework to download): CHECK-style
// macros that print file:line, the expression and the values on failure, count checks and
// failures, and a summary line; main returns fastdiff_test::finish(name), nonzero on any failure.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace fastdiff_test {

struct Counters {
  long checks = 0;
  long failures = 0;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

// What the checks in scope are about (a data record, a size, a type), printed with each failure.
inline std::vector<std::string>& context_stack() {
  static std::vector<std::string> s;
  return s;
}

class Context {
 public:
  explicit Context(std::string what) { context_stack().push_back(std::move(what)); }
  ~Context() { context_stack().pop_back(); }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
};

inline std::string show(float v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.9g (%a)", static_cast<double>(v), static_cast<double>(v));
  return b;
}
inline std::string show(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g (%a)", v, v);
  return b;
}
inline std::string show(long double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.21Lg", v);
  return b;
}
inline std::string show(bool v) { return v ? "true" : "false"; }
inline std::string show(const std::string& v) { return "\"" + v + "\""; }
inline std::string show(const char* v) { return show(std::string(v)); }
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
std::string show(T v) {
  char b[64];
  if (std::is_signed<T>::value) {
    std::snprintf(b, sizeof b, "%lld", static_cast<long long>(v));
  } else {
    std::snprintf(b, sizeof b, "%llu (0x%llx)", static_cast<unsigned long long>(v), static_cast<unsigned long long>(v));
  }
  return b;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++counters().failures;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  for (const std::string& c : context_stack()) {
    std::fprintf(stderr, "    in: %s\n", c.c_str());
  }
}

inline bool check_true(bool ok, const char* expr, const char* file, int line) {
  ++counters().checks;
  if (!ok) {
    fail(file, line, std::string("CHECK(") + expr + ")");
  }
  return ok;
}

template <typename A, typename B>
bool check_eq(const A& a, const B& b, const char* ea, const char* eb, const char* file, int line) {
  ++counters().checks;
  const bool ok = a == b;
  if (!ok) {
    fail(file, line, std::string("CHECK_EQ(") + ea + ", " + eb + "): " + show(a) + " != " + show(b));
  }
  return ok;
}

// Same bits (so -0.0 differs from 0.0 and a NaN matches only the same NaN): "returns ... exactly".
template <typename T>
bool check_identical(const T& a, const T& b, const char* ea, const char* eb, const char* file, int line) {
  static_assert(std::is_floating_point<T>::value, "CHECK_IDENTICAL compares floating-point values");
  ++counters().checks;
  const bool ok = std::memcmp(&a, &b, sizeof(T)) == 0;
  if (!ok) {
    fail(file, line, std::string("CHECK_IDENTICAL(") + ea + ", " + eb + "): " + show(a) + " vs " + show(b));
  }
  return ok;
}

// |got - want| <= tol, in long double; equal values pass (infinities included), a NaN never does.
template <typename A, typename B, typename C>
bool check_near(const A& got, const B& want, const C& tol, const char* eg, const char* ew, const char* et,
                const char* file, int line) {
  ++counters().checks;
  const long double g = static_cast<long double>(got), w = static_cast<long double>(want);
  const long double diff = std::fabs(g - w);
  const bool ok = g == w || diff <= static_cast<long double>(tol);
  if (!ok) {
    fail(file, line,
         std::string("CHECK_NEAR(") + eg + ", " + ew + ", " + et + "): got " + show(got) + ", want " + show(want) +
             ", |diff| " + show(diff) + " > tol " + show(static_cast<long double>(tol)));
  }
  return ok;
}

template <typename T>
bool check_nan(const T& v, const char* ev, const char* file, int line) {
  ++counters().checks;
  const bool ok = std::isnan(v);
  if (!ok) {
    fail(file, line, std::string("CHECK_NAN(") + ev + "): " + show(v));
  }
  return ok;
}

// The one-line summary; the exit status for main.
inline int finish(const char* name) {
  const Counters& c = counters();
  std::printf("%s: %ld checks, %ld failed\n", name, c.checks, c.failures);
  return c.failures == 0 && c.checks > 0 ? 0 : 1;
}

}  // namespace fastdiff_test

#define CHECK(cond) ::fastdiff_test::check_true(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
#define CHECK_EQ(a, b) ::fastdiff_test::check_eq((a), (b), #a, #b, __FILE__, __LINE__)
#define CHECK_IDENTICAL(a, b) ::fastdiff_test::check_identical((a), (b), #a, #b, __FILE__, __LINE__)
#define CHECK_NEAR(got, want, tol) \
  ::fastdiff_test::check_near((got), (want), (tol), #got, #want, #tol, __FILE__, __LINE__)
#define CHECK_NAN(v) ::fastdiff_test::check_nan((v), #v, __FILE__, __LINE__)
