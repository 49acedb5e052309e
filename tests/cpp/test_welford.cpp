// csrc/common/welford.h: welford_update, welford_combine and population_rstd for float and double,
// against a two-pass computation in long double, over deterministic data sets merged in different
// trees; and the edge cases the header documents (empty sides, equal means, constant sets, an
// overflowing M2, a rounding-level negative variance).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"

#include "common/welford.h"

namespace {

using fastdiff::WelfordStats;
using fastdiff_test::Context;

// xorshift64* (Vigna 2016): the same numbers on every platform and standard library.
struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }  // [0, 1)
};

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() {
  return "float";
}
template <>
const char* type_name<double>() {
  return "double";
}

// n values of mean ~mu and standard deviation sigma (uniform on mu +- sqrt(3) sigma), rounded to T.
template <typename T>
std::vector<T> make_data(size_t n, double mu, double sigma, uint64_t seed) {
  Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
  std::vector<T> v(n);
  for (auto& x : v) {
    x = static_cast<T>(mu + sigma * std::sqrt(3.0) * (2.0 * rng.uniform() - 1.0));
  }
  return v;
}

// The exact moments, near enough: two passes in long double over the values as stored in T.
struct Reference {
  long double mean, m2, sum_sq, max_abs;
};

template <typename T>
Reference two_pass(const std::vector<T>& v, size_t lo, size_t hi) {
  long double sum = 0, max_abs = 0, sum_sq = 0;
  for (size_t i = lo; i < hi; ++i) {
    sum += v[i];
    sum_sq += static_cast<long double>(v[i]) * v[i];
    max_abs = std::fmax(max_abs, std::fabs(static_cast<long double>(v[i])));
  }
  const long double mean = hi > lo ? sum / static_cast<long double>(hi - lo) : 0;
  long double m2 = 0;
  for (size_t i = lo; i < hi; ++i) {
    m2 += (v[i] - mean) * (v[i] - mean);
  }
  return {mean, m2, sum_sq, max_abs};
}

template <typename T>
WelfordStats<T> empty_stats() {
  return {T(0), T(0), T(0)};
}

template <typename T>
WelfordStats<T> sequential(const std::vector<T>& v, size_t lo, size_t hi) {
  WelfordStats<T> s = empty_stats<T>();
  for (size_t i = lo; i < hi; ++i) {
    s = fastdiff::welford_update(s, v[i]);
  }
  return s;
}

template <typename T>
WelfordStats<T> left_fold(const std::vector<WelfordStats<T>>& parts) {
  WelfordStats<T> acc = parts.front();
  for (size_t i = 1; i < parts.size(); ++i) {
    acc = fastdiff::welford_combine(acc, parts[i]);
  }
  return acc;
}

template <typename T>
WelfordStats<T> right_fold(const std::vector<WelfordStats<T>>& parts) {
  WelfordStats<T> acc = parts.back();
  for (size_t i = parts.size() - 1; i-- > 0;) {
    acc = fastdiff::welford_combine(parts[i], acc);
  }
  return acc;
}

template <typename T>
WelfordStats<T> balanced(const std::vector<WelfordStats<T>>& parts, size_t lo, size_t hi) {
  if (hi - lo == 1) {
    return parts[lo];
  }
  const size_t mid = lo + (hi - lo) / 2;
  return fastdiff::welford_combine(balanced(parts, lo, mid), balanced(parts, mid, hi));
}

int ceil_log2(size_t n) {
  int d = 0;
  while ((size_t{1} << d) < n) {
    ++d;
  }
  return d;
}

// The tolerances. u is T's unit roundoff, L the number of rounding stages on the longest path from
// a value to the result: n for welford_update over the set and for a left or right fold of merges
// (each merge is a stage, and so is each update inside a chunk), the largest chunk plus
// ceil(log2(chunks)) for a balanced tree.
//   mean: each stage moves the mean by a rounded (x - mean) * weight plus one rounded addition,
//         <= 3u max|x|, and earlier errors are carried with weights <= 1: |error| <= 3 L u max|x|.
//   M2:   Chan, Golub & LeVeque (1983, "Algorithms for computing the sample variance: analysis and
//         recommendations", Table 1) bound the relative error of the updating (Welford) algorithm by
//         O(n kappa u) and of pairwise merging by O(log2(n) kappa u), kappa = ||x||_2 / sqrt(M2) their
//         condition number (about |mean| / std): so L kappa u for a path of L stages. They give no
//         constant; a first-order count for a Welford step (the running mean's error, <= 3u max|x| a
//         stage, enters both factors of delta * (x - mean), each <= the range ~ 3.5 std here, plus 3
//         roundings) gives about 5; we take 10. The textbook sum(x^2) - n mean^2 errs by ~ n kappa^2 u,
//         which the offset sets make far larger (checked below, so these tolerances would catch it).
//   rstd: 1/sqrt(M2/n + eps) moves by at most half M2's relative error, plus 4 roundings.
struct Bounds {
  double mean, m2, rstd_rel;
};

template <typename T>
Bounds bounds(const Reference& ref, int stages) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double kappa = std::sqrt(static_cast<double>(ref.sum_sq / ref.m2));
  const double m2_rel = 10.0 * stages * kappa * u;
  return {3.0 * stages * u * static_cast<double>(ref.max_abs), m2_rel * static_cast<double>(ref.m2),
          0.5 * m2_rel + 4 * u};
}

struct Worst {
  double ratio = 0;  // the largest |error| / tolerance of M2 seen
};

template <typename T>
void check_moments(const WelfordStats<T>& s, const Reference& ref, size_t n, int stages, const char* how,
                   Worst& worst) {
  Context ctx(std::string("merged by ") + how + " (" + std::to_string(stages) + " stages)");
  CHECK_EQ(s.count, static_cast<T>(n));
  if (n == 1) {  // one value: its mean exactly, M2 = v * 0
    CHECK_EQ(static_cast<long double>(s.mean), ref.mean);
    CHECK_IDENTICAL(s.m2, T(0));
    return;
  }
  const Bounds b = bounds<T>(ref, stages);
  CHECK_NEAR(s.mean, ref.mean, b.mean);
  CHECK_NEAR(s.m2, ref.m2, b.m2);
  worst.ratio = std::fmax(worst.ratio, static_cast<double>(std::fabs(s.m2 - ref.m2) / b.m2));
  const T eps = T(1e-5);
  const long double rstd_ref = 1.0L / std::sqrt(ref.m2 / static_cast<long double>(n) + static_cast<long double>(eps));
  CHECK_NEAR(fastdiff::population_rstd(s, eps), rstd_ref, b.rstd_rel * static_cast<double>(rstd_ref));
}

// Chunk sizes from a repeating pattern with empty chunks at both ends and in between.
std::vector<size_t> chunk_sizes(size_t n, uint64_t seed) {
  const size_t pattern[] = {0, 1, 3, 0, 0, 7, 2, 16, 0, 5, 31, 1, 0, 8};
  std::vector<size_t> sizes = {0};
  size_t total = 0;
  for (size_t i = seed % 14; total < n; ++i) {
    const size_t take = std::min(pattern[i % 14], n - total);
    sizes.push_back(take);
    total += take;
  }
  sizes.push_back(0);
  return sizes;
}

template <typename T>
void test_random_sets(double offset) {
  const size_t sizes[] = {1, 2, 3, 4, 5, 7, 8, 16, 31, 33, 64, 100, 127, 255, 256, 500, 999, 1000};
  struct Family {
    double mu, sigma;
  };
  const Family families[] = {{0.0, 1.0}, {offset, 1.0}, {-7.5, 1e-3}};
  Worst worst;
  for (const Family& fam : families) {
    for (size_t n : sizes) {
      Context ctx(std::string(type_name<T>()) + " n " + std::to_string(n) + " mean " + std::to_string(fam.mu) +
                  " std " + std::to_string(fam.sigma));
      const std::vector<T> v = make_data<T>(n, fam.mu, fam.sigma, n * 7 + static_cast<uint64_t>(fam.sigma * 10));
      const Reference ref = two_pass(v, 0, n);
      check_moments(sequential(v, 0, n), ref, n, static_cast<int>(n), "welford_update", worst);

      const std::vector<size_t> sizes_of = chunk_sizes(n, n);
      std::vector<WelfordStats<T>> chunks;
      size_t at = 0, largest = 0;
      for (size_t c : sizes_of) {
        chunks.push_back(sequential(v, at, at + c));
        at += c;
        largest = std::max(largest, c);
      }
      const int tree = static_cast<int>(largest) + ceil_log2(chunks.size());
      check_moments(left_fold(chunks), ref, n, static_cast<int>(n), "left fold of chunks", worst);
      check_moments(right_fold(chunks), ref, n, static_cast<int>(n), "right fold of chunks", worst);
      check_moments(balanced(chunks, 0, chunks.size()), ref, n, tree, "balanced tree of chunks", worst);

      std::vector<WelfordStats<T>> singles;
      for (size_t i = 0; i < n; ++i) {
        singles.push_back(fastdiff::welford_update(empty_stats<T>(), v[i]));
      }
      check_moments(balanced(singles, 0, n), ref, n, 1 + ceil_log2(n), "balanced tree of single values", worst);
    }
  }
  std::printf("%s: worst |M2 error| / tolerance %.3g\n", type_name<T>(), worst.ratio);

  // The offset sets are hard: the textbook one-pass formula misses by more than the tolerance above.
  const size_t n = 1000;
  const std::vector<T> v = make_data<T>(n, offset, 1.0, 12345);
  const Reference ref = two_pass(v, 0, n);
  T sum = 0, sum_sq = 0;
  for (T x : v) {
    sum += x;
    sum_sq += x * x;
  }
  const T naive = sum_sq - sum * sum / T(n);
  const Bounds b = bounds<T>(ref, static_cast<int>(n));
  CHECK(std::fabs(naive - ref.m2) > b.m2);
  const WelfordStats<T> s = sequential(v, 0, n);
  CHECK_NEAR(s.m2, ref.m2, b.m2);
}

template <typename T>
void check_same_stats(const WelfordStats<T>& got, const WelfordStats<T>& want) {
  CHECK_IDENTICAL(got.count, want.count);
  CHECK_IDENTICAL(got.mean, want.mean);
  CHECK_IDENTICAL(got.m2, want.m2);
}

template <typename T>
void test_edge_cases() {
  Context ctx(type_name<T>());
  const T big = std::is_same<T, float>::value ? T(1e30) : T(1e200);  // its square overflows T
  const T inf = std::numeric_limits<T>::infinity();
  const WelfordStats<T> none = empty_stats<T>();

  // Merging with an empty side returns the other side exactly, even where d^2 overflows.
  const WelfordStats<T> sets[] = {{T(3), T(1.25), T(0.5)}, {T(7), big, T(2)}, {T(2), -big, big}, {T(1), T(-0.1), T(0)}};
  for (const WelfordStats<T>& a : sets) {
    Context c2("mean " + fastdiff_test::show(a.mean));
    check_same_stats(fastdiff::welford_combine(none, a), a);
    check_same_stats(fastdiff::welford_combine(a, none), a);
  }
  check_same_stats(fastdiff::welford_combine(none, none), none);

  // Equal means merge exactly: mean unchanged, M2 the sum of the two (one rounding).
  const WelfordStats<T> a{T(3), T(2.5), T(1.25)}, b{T(5), T(2.5), T(0.7)};
  const WelfordStats<T> ab = fastdiff::welford_combine(a, b);
  CHECK_EQ(ab.count, T(8));
  CHECK_IDENTICAL(ab.mean, T(2.5));
  CHECK_IDENTICAL(ab.m2, T(T(1.25) + T(0.7)));

  // A constant set: its mean exactly, M2 == 0 exactly, through updates and any tree of merges; its
  // rstd is 1 / sqrt(eps), Inf for eps = 0.
  const T constants[] = {T(0.1), T(-3.7), T(1e4) + T(0.25), big};
  for (T c : constants) {
    Context c2("constant " + fastdiff_test::show(c));
    const std::vector<T> v(37, c);
    const WelfordStats<T> seq = sequential(v, 0, v.size());
    std::vector<WelfordStats<T>> chunks;
    size_t at = 0;
    for (size_t size : chunk_sizes(v.size(), 3)) {
      chunks.push_back(sequential(v, at, at + size));
      at += size;
    }
    const WelfordStats<T> merged[] = {seq, left_fold(chunks), right_fold(chunks), balanced(chunks, 0, chunks.size())};
    for (const WelfordStats<T>& s : merged) {
      CHECK_EQ(s.count, T(37));
      CHECK_IDENTICAL(s.mean, c);
      CHECK_IDENTICAL(s.m2, T(0));
      const T eps = T(1e-5);
      CHECK_IDENTICAL(fastdiff::population_rstd(s, eps), T(T(1) / std::sqrt(eps)));
      CHECK_IDENTICAL(fastdiff::population_rstd(s, T(0)), inf);
    }
  }

  // An M2 that overflows T (values too far apart) has no variance: rstd is NaN, not 0.
  const T far = std::is_same<T, float>::value ? T(1e20) : T(1e160);
  const std::vector<T> spread = {-far, far};
  const WelfordStats<T> over = sequential(spread, 0, 2);
  CHECK_IDENTICAL(over.m2, inf);
  CHECK_NAN(fastdiff::population_rstd(over, T(1e-5)));
  const WelfordStats<T> over_merged = fastdiff::welford_combine(WelfordStats<T>{T(1), -far, T(0)}, {T(1), far, T(0)});
  CHECK_IDENTICAL(over_merged.m2, inf);
  CHECK_NAN(fastdiff::population_rstd(over_merged, T(1e-5)));
  CHECK_NAN(fastdiff::population_rstd(WelfordStats<T>{T(4), T(0), std::numeric_limits<T>::quiet_NaN()}, T(1e-5)));
  // The largest finite M2 still normalises.
  const T huge = std::numeric_limits<T>::max();
  CHECK_IDENTICAL(fastdiff::population_rstd(WelfordStats<T>{T(1), T(0), huge}, T(0)), T(T(1) / std::sqrt(huge)));

  // A rounding-level negative M2 is clamped to a zero variance.
  const WelfordStats<T> negative{T(4), T(0.5), -std::numeric_limits<T>::epsilon()};
  CHECK_IDENTICAL(fastdiff::population_rstd(negative, T(1e-5)), T(T(1) / std::sqrt(T(1e-5))));
  CHECK_IDENTICAL(fastdiff::population_rstd(negative, T(0)), inf);
}

}  // namespace

int main() {
  test_random_sets<float>(1e4);
  test_random_sets<double>(1e6);
  test_edge_cases<float>();
  test_edge_cases<double>();
  return fastdiff_test::finish("test_welford");
}
