// csrc/common/philox.h: Philox4x32-10 against Random123's known answers and the independent Python
// version (fastdiff/reference/philox.py, through tests/cpp/data/common_cases.txt), the uniform's
// formula, philox_block's counter and key layout, and Box-Muller's normals.
//
//   test_philox DATA_FILE

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "check.h"
#include "data_file.h"

#include "common/philox.h"

namespace {

using fastdiff::Philox4;
using fastdiff_test::Context;

constexpr double kU = 0x1p-24;  // float32's unit roundoff

void check_words(const Philox4& got, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  CHECK_EQ(got.v[0], w0);
  CHECK_EQ(got.v[1], w1);
  CHECK_EQ(got.v[2], w2);
  CHECK_EQ(got.v[3], w3);
}

// Random123's kat_vectors for philox4x32 with 10 rounds (counter words, then key words).
void test_known_answers() {
  {
    Context ctx("Random123 kat: counter 0 0 0 0, key 0 0");
    check_words(fastdiff::philox4x32_10(Philox4{{0u, 0u, 0u, 0u}}, 0u, 0u), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu,
                0x9b00dbd8u);
  }
  {
    Context ctx("Random123 kat: counter ffffffff x4, key ffffffff ffffffff");
    const uint32_t f = 0xffffffffu;
    check_words(fastdiff::philox4x32_10(Philox4{{f, f, f, f}}, f, f), 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u,
                0x6d5451fdu);
  }
  {
    Context ctx("Random123 kat: counter 243f6a88 85a308d3 13198a2e 03707344, key a4093822 299f31d0");
    check_words(fastdiff::philox4x32_10(Philox4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u,
                                        0x299f31d0u),
                0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u);
  }
}

// philox_uniform(bits) is documented as ((bits >> 8) + 0.5) 2^-24 rounded to float: in (0, 1], exact
// below bits = 2^31, ties to even above, exactly 1 from 0xffffff00 up, never 0.
void test_uniform() {
  // The formula, evaluated exactly in double (25 significant bits at most) and rounded once to float,
  // which is what the float arithmetic does: bits < 2^31 ((bits >> 8) + 0.5 < 2^23) give the exact
  // value; above, (bits >> 8) + 0.5f needs 25 bits and rounds to even.
  std::vector<uint32_t> all_bits = {0u,          0xffu,       0x100u,      0x7fffffffu, 0x80000000u,
                                    0x80000100u, 0xfffffeffu, 0xffffff00u, 0xffffffffu};
  for (uint64_t b = 0; b <= 0xffffffffu; b += 0x10000FFu) {
    all_bits.push_back(static_cast<uint32_t>(b));
  }
  for (uint32_t bits : all_bits) {
    const double exact = (static_cast<double>(bits >> 8) + 0.5) * 0x1p-24;
    Context ctx("bits " + fastdiff_test::show(bits));
    CHECK_EQ(fastdiff::philox_uniform(bits), static_cast<float>(exact));
    if (bits < 0x80000000u) {
      CHECK_EQ(static_cast<double>(fastdiff::philox_uniform(bits)), exact);
    }
  }
  // The low end: exactly 2^-25, so log(u) is finite (what Box-Muller needs).
  CHECK_EQ(static_cast<double>(fastdiff::philox_uniform(0u)), 0x1p-25);
  CHECK(fastdiff::philox_uniform(0u) > 0.0f);
  CHECK(std::isfinite(std::log(fastdiff::philox_uniform(0u))));
  CHECK_EQ(static_cast<double>(fastdiff::philox_uniform(0x7fffffffu)), 0.5 - 0x1p-25);
  // The high end, as philox.h documents it: (2^24 - 1) + 0.5 is not a float and rounds to 2^24, so the
  // uniform is exactly 1 from bits = 0xffffff00 up; k + 0.5 ties to the even k there, so the value below
  // it is 1 - 2^-23 (k = 2^24 - 2 and 2^24 - 3 both round to it), and 1 - 2^-24 never occurs.
  CHECK_EQ(fastdiff::philox_uniform(0xffffffffu), 1.0f);
  CHECK_EQ(fastdiff::philox_uniform(0xffffff00u), 1.0f);
  CHECK_EQ(static_cast<double>(fastdiff::philox_uniform(0xfffffeffu)), 1.0 - 0x1p-23);
  CHECK_EQ(static_cast<double>(fastdiff::philox_uniform(0xfffffdffu)), 1.0 - 0x1p-23);
  float out[4];
  fastdiff::philox_normal4(Philox4{{0xffffffffu, 0x40000000u, 0u, 0xffffffffu}}, out);
  CHECK_EQ(out[0], 0.0f);  // r = sqrt(-2 log 1) = 0
  CHECK_EQ(out[1], 0.0f);
  CHECK(std::isfinite(out[2]) && std::isfinite(out[3]));
  // u1 = 2^-25, the largest radius; its error as in test_against_python, cos^2 + sin^2 adding 2u r.
  const double r_max = std::sqrt(50.0 * std::log(2.0));
  CHECK_NEAR(std::hypot(out[2], out[3]), r_max, kU * (2.0 / r_max + 8.0 * r_max));
}

// philox_block's counter (index >> 2, image, step, 0) and key (low word of the seed, high word),
// against philox_normal4(philox4x32_10(...)) built by hand: identical bits.
void test_block_layout() {
  const uint64_t seeds[] = {0u, 1u, 0x100000000u, 0x0123456789abcdefu, 0xffffffffffffffffu};
  const int64_t steps[] = {0, 1, 999, 0xffffffff};
  const int64_t images[] = {0, 3, 0x80000001};
  const int64_t indices[] = {0, 1, 2, 3, 4, 7, 1001, 4 * 0x12345 + 3};
  for (uint64_t seed : seeds) {
    for (int64_t step : steps) {
      for (int64_t image : images) {
        for (int64_t index : indices) {
          Context ctx("seed " + fastdiff_test::show(seed) + " step " + fastdiff_test::show(step) + " image " +
                      fastdiff_test::show(image) + " index " + fastdiff_test::show(index));
          float got[4], want[4];
          fastdiff::philox_block(seed, step, image, index, got);
          const Philox4 ctr{
              {static_cast<uint32_t>(index / 4), static_cast<uint32_t>(image), static_cast<uint32_t>(step), 0u}};
          const uint32_t key_lo = static_cast<uint32_t>(seed & 0xffffffffu), key_hi = static_cast<uint32_t>(seed >> 32);
          fastdiff::philox_normal4(fastdiff::philox4x32_10(ctr, key_lo, key_hi), want);
          for (int i = 0; i < 4; ++i) {
            CHECK_IDENTICAL(got[i], want[i]);
          }
        }
      }
    }
  }
  // The image and step words are the low 32 bits (the Python oracle counts images mod 2^32).
  float a[4], b[4];
  fastdiff::philox_block(77u, 5, (int64_t{1} << 32) + 9, 40, a);
  fastdiff::philox_block(77u, 5, 9, 40, b);
  for (int i = 0; i < 4; ++i) {
    CHECK_IDENTICAL(a[i], b[i]);
  }
  // The key's words are not interchangeable (a swapped key would go unseen with seed words equal).
  fastdiff::philox_block(0x0000000100000002u, 0, 0, 0, a);
  fastdiff::philox_block(0x0000000200000001u, 0, 0, 0, b);
  CHECK(a[0] != b[0]);
}

// The Python oracle's words (exact) and normals (float64 Box-Muller, rounded to float32 in the file).
//
// Tolerance, from the float32 roundings of philox_normal4 (u = 2^-24 float32's unit roundoff; glibc's
// logf/cosf/sinf budgeted at 1 ulp <= 2u relative):
//   the uniform u1 = (k + 0.5) 2^-24 rounds (bits >= 2^31) by a factor (1 + d), |d| <= u, so
//   -2 logf(u1) is off by <= 2.02u + 2u r^2 (r^2 = -2 ln u1), and r = sqrtf(.) by <= 1.01u / r + 2u r;
//   theta = fl(fl(2 pi) u2) has relative error <= 3u, i.e. <= 19u absolute, and cos/sin add 2u;
//   z = fl(r cos theta) then errs by <= 1.01u / r + 23u r + u |z|, and the oracle's rounding to
//   float32 adds <= u |z| (its float64 error is negligible).
// So |z - z_python| <= u (2 / r + 24 r + 2 |z|) with r the pair's radius. The u / r term is real: for
// u1 near 1 (r small) the uniform's rounding moves r by a large fraction of itself. It is not
// "a few ulp of z" where z crosses zero (cos theta ~ 0): the error is a few ulp of r.
void test_against_python(const fastdiff_test::DataFile& data) {
  const auto& recs = data.records("philox");
  CHECK(recs.size() >= 8);
  double worst = 0;  // the largest |z - z_python| / tol seen
  for (const auto& rec : recs) {
    Context ctx("philox record seed " + rec.at(0) + " step " + rec.at(1) + " image " + rec.at(2) + " index " +
                rec.at(3));
    if (!CHECK_EQ(rec.size(), size_t{12})) {
      continue;
    }
    const uint64_t seed = fastdiff_test::parse_u64(rec[0]);
    const int64_t step = static_cast<int64_t>(fastdiff_test::parse_u64(rec[1]));
    const int64_t image = static_cast<int64_t>(fastdiff_test::parse_u64(rec[2]));
    const int64_t index = static_cast<int64_t>(fastdiff_test::parse_u64(rec[3]));
    const Philox4 ctr{
        {static_cast<uint32_t>(index / 4), static_cast<uint32_t>(image), static_cast<uint32_t>(step), 0u}};
    const Philox4 words =
        fastdiff::philox4x32_10(ctr, static_cast<uint32_t>(seed & 0xffffffffu), static_cast<uint32_t>(seed >> 32));
    for (int i = 0; i < 4; ++i) {
      CHECK_EQ(words.v[i], static_cast<uint32_t>(fastdiff_test::parse_u64(rec[4 + i], 16)));
    }
    float z[4];
    fastdiff::philox_block(seed, step, image, index, z);
    for (int pair = 0; pair < 2; ++pair) {
      const double p0 = fastdiff_test::parse_double(rec[8 + 2 * pair]);
      const double p1 = fastdiff_test::parse_double(rec[9 + 2 * pair]);
      const double r = std::hypot(p0, p1);
      const double want[2] = {p0, p1};
      for (int j = 0; j < 2; ++j) {
        const double tol = kU * (2.0 / r + 24.0 * r + 2.0 * std::fabs(want[j]));
        CHECK_NEAR(z[2 * pair + j], want[j], tol);
        worst = std::fmax(worst, std::fabs(z[2 * pair + j] - want[j]) / tol);
      }
    }
  }
  std::printf("philox normals vs Python: worst |error| / tolerance %.3g\n", worst);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DATA_FILE (tests/cpp/data/common_cases.txt)\n", argv[0]);
    return 2;
  }
  test_known_answers();
  test_uniform();
  test_block_layout();
  try {
    const fastdiff_test::DataFile data(argv[1]);
    test_against_python(data);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: %s\n", e.what());
    ++fastdiff_test::counters().failures;
  }
  return fastdiff_test::finish("test_philox");
}
