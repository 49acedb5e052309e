// csrc/common/sampler_step.h: the coefficient table's column order, the rows that fastdiff's Python
// samplers build (recomputed here from the published formulas), and the per-element update
// (sampler_step_value, step_adds_noise, step_adds_hist) against expected values computed in Python
// float64 from the same formulas (tests/cpp/make_data.py; tests/cpp/data/common_cases.txt).
//
//   test_sampler_step DATA_FILE

#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "data_file.h"

#include "common/sampler_step.h"

namespace {

using fastdiff_test::Context;
using fastdiff_test::parse_double;
using fastdiff_test::parse_flag;
using fastdiff_test::parse_u64;

// The column names, in the order of the StepCoef enum (fastdiff/reference/sampler_step.py's STEP_COEFS).
static_assert(fastdiff::kNumStepCoefs == 12, "the coefficient table has 12 columns");
const char* const kColumnNames[fastdiff::kNumStepCoefs] = {"a_x", "a_m",   "e_x",       "e_m",       "c_x0",  "c_eps",
                                                           "c_x", "sigma", "log_small", "log_large", "noise", "c_hist"};

struct Row {
  int id;
  std::string label, sampler, prediction, variance;
  double eta;
  bool learned;
  int step;
  long timestep;
  double alpha_t, alpha_prev;
  double c[fastdiff::kNumStepCoefs];
};

std::vector<Row> parse_rows(const fastdiff_test::DataFile& data) {
  std::vector<Row> rows;
  for (const auto& rec : data.records("row")) {
    if (rec.size() != 11 + fastdiff::kNumStepCoefs) {
      throw std::runtime_error("a row record has " + std::to_string(rec.size()) + " fields");
    }
    Row r;
    r.id = static_cast<int>(parse_u64(rec[0]));
    r.label = rec[1];
    r.sampler = rec[2];
    r.prediction = rec[3];
    r.variance = rec[4];
    r.eta = parse_double(rec[5]);
    r.learned = parse_flag(rec[6]);
    r.step = static_cast<int>(parse_u64(rec[7]));
    r.timestep = static_cast<long>(parse_u64(rec[8]));
    r.alpha_t = parse_double(rec[9]);
    r.alpha_prev = parse_double(rec[10]);
    for (int i = 0; i < fastdiff::kNumStepCoefs; ++i) {
      r.c[i] = parse_double(rec[11 + i]);
    }
    if (r.id != static_cast<int>(rows.size())) {
      throw std::runtime_error("row ids are not 0, 1, 2, ...: " + rec[0]);
    }
    rows.push_back(r);
  }
  return rows;
}

std::string describe(const Row& r) {
  return "row " + std::to_string(r.id) + " (" + r.label + ", " + r.prediction + " prediction, step " +
         std::to_string(r.step) + ", t " + std::to_string(r.timestep) + ")";
}

// (a) The data file's column names (Python's STEP_COEFS) are the enum's order, and load_step_coefs
// puts column i into the field of that name.
void test_columns(const fastdiff_test::DataFile& data) {
  CHECK_EQ(static_cast<int>(fastdiff::kNumStepCoefs), 12);
  CHECK_EQ(static_cast<int>(fastdiff::kAx), 0);
  CHECK_EQ(static_cast<int>(fastdiff::kAm), 1);
  CHECK_EQ(static_cast<int>(fastdiff::kEx), 2);
  CHECK_EQ(static_cast<int>(fastdiff::kEm), 3);
  CHECK_EQ(static_cast<int>(fastdiff::kCx0), 4);
  CHECK_EQ(static_cast<int>(fastdiff::kCeps), 5);
  CHECK_EQ(static_cast<int>(fastdiff::kCx), 6);
  CHECK_EQ(static_cast<int>(fastdiff::kSigma), 7);
  CHECK_EQ(static_cast<int>(fastdiff::kLogSmall), 8);
  CHECK_EQ(static_cast<int>(fastdiff::kLogLarge), 9);
  CHECK_EQ(static_cast<int>(fastdiff::kNoise), 10);
  CHECK_EQ(static_cast<int>(fastdiff::kHist), 11);
  const auto& cols = data.records("columns");
  if (CHECK_EQ(cols.size(), size_t{1}) && CHECK_EQ(cols[0].size(), size_t{fastdiff::kNumStepCoefs})) {
    for (int i = 0; i < fastdiff::kNumStepCoefs; ++i) {
      Context ctx("column " + std::to_string(i));
      CHECK_EQ(cols[0][i], std::string(kColumnNames[i]));
    }
  }
  double row[fastdiff::kNumStepCoefs];
  for (int i = 0; i < fastdiff::kNumStepCoefs; ++i) {
    row[i] = 100 + i;
  }
  const auto k = fastdiff::load_step_coefs<float>(row);
  const float fields[] = {k.a_x, k.a_m,   k.e_x,       k.e_m,       k.c_x0,  k.c_eps,
                          k.c_x, k.sigma, k.log_small, k.log_large, k.noise, k.c_hist};
  for (int i = 0; i < fastdiff::kNumStepCoefs; ++i) {
    Context ctx(std::string("field ") + kColumnNames[i]);
    CHECK_EQ(fields[i], static_cast<float>(100 + i));
  }
}

// (b) The rows, recomputed in double from alpha_t = abar_t and alpha_prev = abar_prev (the same
// float64 values Python used) by the published formulas, in their own (not Python's) arrangement.
//
// Tolerance: 1e-12 relative. The inputs are exact and shared; every column is an expression of at
// most ~12 correctly rounded operations (+, -, *, /, sqrt) and one log or exp (<= 1 ulp in glibc and
// in torch's SLEEF), so without cancellation both sides are within ~15u = 1.7e-15 of the exact value
// and of each other by ~3.4e-15; the differences in these rows (1 - abar, 1 - abar_prev, 1 - abar /
// abar_prev, the lambda differences h ~ 1 with |lambda| < 5) are of well-separated numbers and amplify
// that by < 10. 1e-12 is 300 times that, and a wrong formula, sign or column moves a value by far
// more. The one cancelling form is DDIM's c_eps = sqrt(1 - abar_prev - sigma^2), where Python's
// radicand carries an absolute error ~ u (1 - abar_prev + sigma^2) that sqrt turns into
// u (1 - abar_prev + sigma^2) / (2 c_eps) (a relative 1e-12 of that scale there); zero entries must
// be exactly zero.
struct CoefCheck {
  double worst = 0;  // the largest |difference| / scale seen
  void operator()(const Row& r, int col, double want, double scale) {
    Context ctx(std::string("column ") + kColumnNames[col] + " of " + describe(r));
    const double got = r.c[col];
    CHECK_NEAR(got, want, 1e-12 * scale);
    if (scale > 0) {
      worst = std::fmax(worst, std::fabs(got - want) / scale);
    }
  }
  void operator()(const Row& r, int col, double want) { (*this)(r, col, want, std::fabs(want)); }
};

// x0 and eps from the prediction m at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: eps prediction (Ho et
// al. 2020, eq. 15); v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); x0 prediction.
void check_prediction_columns(const Row& r, CoefCheck& check) {
  const double a = r.alpha_t, sa = std::sqrt(a), sb = std::sqrt(1 - a);
  double ax, am, ex, em;
  if (r.prediction == "eps") {
    ax = 1 / sa, am = -sb / sa, ex = 0, em = 1;
  } else if (r.prediction == "v") {
    ax = sa, am = -sb, ex = sb, em = sa;
  } else if (r.prediction == "x0") {
    ax = 0, am = 1, ex = 1 / sb, em = -sa / sb;
  } else {
    CHECK_EQ(r.prediction, std::string("eps, v or x0"));
    return;
  }
  check(r, fastdiff::kAx, ax);
  check(r, fastdiff::kAm, am);
  check(r, fastdiff::kEx, ex);
  check(r, fastdiff::kEm, em);
}

// DDIM (Song et al. 2021, eq. 12, sigma of eq. 16):
//   x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
//   sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
// The noise factor (read only with a learned variance, which DDIM drops) is 1 where eta > 0.
void check_ddim(const Row& r, CoefCheck& check) {
  const double a = r.alpha_t, ap = r.alpha_prev;
  const double sigma = r.eta * std::sqrt((1 - ap) / (1 - a)) * std::sqrt(1 - a / ap);
  const double c_eps = std::sqrt(1 - ap - sigma * sigma);
  check(r, fastdiff::kCx0, std::sqrt(ap));
  check(r, fastdiff::kCeps, c_eps, c_eps == 0 ? 0 : c_eps + (1 - ap + sigma * sigma) / (2 * c_eps));
  check(r, fastdiff::kCx, 0);
  check(r, fastdiff::kSigma, sigma);
  check(r, fastdiff::kLogSmall, 0);
  check(r, fastdiff::kLogLarge, 0);
  check(r, fastdiff::kNoise, r.eta > 0 ? 1 : 0);
  check(r, fastdiff::kHist, 0);
}

// DDPM (Ho et al. 2020, eq. 7; respaced, Nichol & Dhariwal 2021 sec. 4: alpha = abar / abar_prev,
// beta = 1 - alpha): the posterior mean
//   sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar) x_t,
// variance beta_tilde = (1 - abar_prev) / (1 - abar) beta ("fixed_small") or beta ("fixed_large"),
// and the learned one's ends log beta_tilde, log beta. As the Python table has them (read from
// fastdiff/sampling/samplers.py, DDPMSampler._update_coefficients; the header's comment does not
// say): beta_tilde is floored at 1e-20 (it is 0 at the last step, abar_prev = 1, whose log would be
// -inf); the noise factor is 1 where the timestep is > 0 and 0 at timestep 0, and the sigma column is
// the fixed sigma times it (for "learned_range", beta's, unused: the kernels compute the learned one).
void check_ddpm(const Row& r, CoefCheck& check) {
  const double a = r.alpha_t, ap = r.alpha_prev;
  const double alpha = a / ap, beta = 1 - alpha;
  const double beta_tilde = std::fmax((1 - ap) / (1 - a) * beta, 1e-20);
  const double noise = r.timestep > 0 ? 1 : 0;
  check(r, fastdiff::kCx0, std::sqrt(ap) * beta / (1 - a));
  check(r, fastdiff::kCeps, 0);
  check(r, fastdiff::kCx, std::sqrt(alpha) * (1 - ap) / (1 - a));
  check(r, fastdiff::kSigma, std::sqrt(r.variance == "fixed_small" ? beta_tilde : beta) * noise);
  check(r, fastdiff::kLogSmall, std::log(beta_tilde));
  check(r, fastdiff::kLogLarge, std::log(beta));
  check(r, fastdiff::kNoise, noise);
  check(r, fastdiff::kHist, 0);
  CHECK_EQ(r.learned, r.variance == "learned_range");
}

// DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), alpha = sqrt(abar), sigma = sqrt(1 - abar),
// lambda = log(alpha / sigma), h = lambda_t - lambda_s, r = h_prev / h, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
// (x0_prev the previous step's x0, the history; first order, D = x0, at the first and the last step):
//   ODE: x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D
//   SDE: x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z.
void check_dpmpp(const Row& r, const Row* before, bool last, CoefCheck& check) {
  const auto lambda = [](double abar) { return 0.5 * (std::log(abar) - std::log1p(-abar)); };
  const double alpha_t = std::sqrt(r.alpha_prev), sigma_t = std::sqrt(1 - r.alpha_prev);
  const double sigma_s = std::sqrt(1 - r.alpha_t);
  const double lambda_s = lambda(r.alpha_t);
  const double h = lambda(r.alpha_prev) - lambda_s;  // +inf at the last step (sigma_t = 0)
  const bool second = before != nullptr && !last;
  const double w = second ? h / (2 * (lambda_s - lambda(before->alpha_t))) : 0;  // 1 / (2r), r = h_prev / h
  const bool sde = r.sampler == "dpmpp_2m_sde";
  if (sde) {
    const double grow = -std::expm1(-2 * h);  // 1 - e^-2h
    check(r, fastdiff::kCx, sigma_t / sigma_s * std::exp(-h));
    check(r, fastdiff::kCx0, alpha_t * grow * (1 + w));
    check(r, fastdiff::kHist, -alpha_t * grow * w);
    check(r, fastdiff::kSigma, sigma_t * std::sqrt(grow));
    check(r, fastdiff::kNoise, sigma_t * std::sqrt(grow) > 0 ? 1 : 0);
  } else {
    const double e = std::expm1(-h);  // e^-h - 1
    check(r, fastdiff::kCx, sigma_t / sigma_s);
    check(r, fastdiff::kCx0, -alpha_t * e * (1 + w));
    check(r, fastdiff::kHist, alpha_t * e * w);
    check(r, fastdiff::kSigma, 0);
    check(r, fastdiff::kNoise, 0);
  }
  check(r, fastdiff::kCeps, 0);
  check(r, fastdiff::kLogSmall, 0);
  check(r, fastdiff::kLogLarge, 0);
  CHECK(!r.learned);
}

void test_rows(const std::vector<Row>& rows) {
  CoefCheck check;
  std::map<std::string, int> per_kind;
  int second_order = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    ++per_kind[r.label + "/" + r.prediction];
    check_prediction_columns(r, check);
    const bool first = r.step == 0, last = i + 1 == rows.size() || rows[i + 1].step == 0;
    if (!first) {  // consecutive steps of one sampler move from one level to the next
      CHECK_EQ(rows[i - 1].alpha_prev, r.alpha_t);
    }
    if (r.sampler == "ddim") {
      check_ddim(r, check);
    } else if (r.sampler == "ddpm") {
      check_ddpm(r, check);
    } else if (r.sampler == "dpmpp_2m" || r.sampler == "dpmpp_2m_sde") {
      check_dpmpp(r, first ? nullptr : &rows[i - 1], last, check);
      second_order += r.c[fastdiff::kHist] != 0;
    } else {
      Context ctx(describe(r));
      CHECK_EQ(r.sampler, std::string("ddim, ddpm, dpmpp_2m or dpmpp_2m_sde"));
    }
  }
  // What the data must cover: 7 samplers x 3 predictions x 6 steps, multistep rows among them.
  CHECK_EQ(per_kind.size(), size_t{21});
  for (const auto& kind : per_kind) {
    Context ctx(kind.first);
    CHECK_EQ(kind.second, 6);
  }
  CHECK(second_order >= 2 * 3 * 4);
  std::printf("coefficient rows: %zu, worst |difference| / scale %.3g\n", rows.size(), check.worst);
}

// (c) One element of the step against the expected values.
//
// Tolerance: the expected value (Python float64) and sampler_step_value<T> evaluate the same sums of
// products, in possibly different orders (and with FMA contraction where the target has it). With
// d <= 12 roundings on any path (inputs and coefficients rounded to T, products, sums, x0_scale, the
// history and noise terms), each is within gamma_d S ~ 12u S of the exact value (Higham 2002,
// "Accuracy and Stability of Numerical Algorithms", sec. 3.1-3.3), S the same expression evaluated with
// every input, coefficient and term replaced by its absolute value; so they differ by <= 24u S (u
// T's unit roundoff; the float64 expectation's own 12 u64 S is negligible next to float's), and we
// allow 32u S: for double, 3.6e-15 S (S is 1 to ~100 here: a_x and a_m are ~33 at the first eps
// step, where x0 cancels). A learned sigma = exp(arg) * noise carries the exponent's absolute
// error, <= gamma A with A = (|var| + 3)(|log_large| + |log_small|) bounding arg's absolute-value
// form, as a relative error: its term counts |sigma z| (1 + A). A clamp decided within rounding of
// its bound could differ between float and double; make_data.py keeps the cases 1e-3 away from it.
struct StepCheck {
  double worst[2] = {0, 0};  // float, double: the largest |error| / tolerance seen
};

template <typename T>
void check_case(const Row& r, const fastdiff_test::Record& rec, StepCheck& stats) {
  const bool learned = parse_flag(rec[1]), has_hist = parse_flag(rec[2]), has_noise = parse_flag(rec[3]);
  const double x = parse_double(rec[4]), m = parse_double(rec[5]), var = parse_double(rec[6]);
  const double h = parse_double(rec[7]), z = parse_double(rec[8]);
  const double lo = parse_double(rec[9]), hi = parse_double(rec[10]), scale = parse_double(rec[11]);
  const bool want_hist = parse_flag(rec[12]), want_noise = parse_flag(rec[13]);
  const double want_x0 = parse_double(rec[14]), want_prev = parse_double(rec[15]);
  CHECK_EQ(learned, r.learned);

  const fastdiff::StepCoefs<T> k = fastdiff::load_step_coefs<T>(r.c);
  const bool adds_hist = fastdiff::step_adds_hist(has_hist, k);
  const bool adds_noise = fastdiff::step_adds_noise(has_noise, learned, k);
  CHECK_EQ(adds_hist, want_hist);
  CHECK_EQ(adds_noise, want_noise);
  T x0 = T(-12345);
  const T prev = fastdiff::sampler_step_value<T>(T(x), T(m), T(var), T(h), T(z), k, T(lo), T(hi), T(scale), learned,
                                                 adds_hist, adds_noise, x0);

  const double* c = r.c;
  const double s_x0 = (std::fabs(c[fastdiff::kAx] * x) + std::fabs(c[fastdiff::kAm] * m)) * std::fabs(scale);
  const double s_eps = std::fabs(c[fastdiff::kEx] * x) + std::fabs(c[fastdiff::kEm] * m);
  double s_prev =
      std::fabs(c[fastdiff::kCx0]) * s_x0 + std::fabs(c[fastdiff::kCeps]) * s_eps + std::fabs(c[fastdiff::kCx] * x);
  if (want_hist) {
    s_prev += std::fabs(c[fastdiff::kHist] * h);
  }
  if (want_noise) {
    double sigma = c[fastdiff::kSigma], a = 0;
    if (learned) {
      const double ll = c[fastdiff::kLogLarge], ls = c[fastdiff::kLogSmall], f = (var + 1) / 2;
      sigma = std::exp(0.5 * (f * ll + (1 - f) * ls)) * c[fastdiff::kNoise];
      a = (std::fabs(var) + 3) * (std::fabs(ll) + std::fabs(ls));
    }
    s_prev += std::fabs(sigma * z) * (1 + a);
  }
  const double u = std::numeric_limits<T>::epsilon() / 2;
  double& worst = stats.worst[sizeof(T) == sizeof(double)];
  const auto compare = [&](T got, double want, double s) {
    if (std::isnan(want)) {
      CHECK_NAN(got);
      return;
    }
    CHECK_NEAR(got, want, 32 * u * s);
    if (s > 0) {
      worst = std::fmax(worst, std::fabs(got - want) / (32 * u * s));
    }
  };
  compare(x0, want_x0, s_x0);
  compare(prev, want_prev, s_prev);
}

void test_cases(const std::vector<Row>& rows, const fastdiff_test::DataFile& data) {
  StepCheck stats;
  std::map<std::string, int> seen;
  for (const auto& rec : data.records("case")) {
    if (!CHECK_EQ(rec.size(), size_t{16})) {
      continue;
    }
    const size_t id = parse_u64(rec[0]);
    if (!CHECK(id < rows.size())) {
      continue;
    }
    const Row& r = rows[id];
    std::string line;
    for (const auto& w : rec) {
      line += " " + w;
    }
    Context ctx(describe(r) + ", case" + line);
    {
      Context c2("float");
      check_case<float>(r, rec, stats);
    }
    {
      Context c2("double");
      check_case<double>(r, rec, stats);
    }
    const bool learned = rec[1] == "1", has_hist = rec[2] == "1", has_noise = rec[3] == "1";
    const bool adds_hist = rec[12] == "1", adds_noise = rec[13] == "1";
    const double x0 = parse_double(rec[14]), prev = parse_double(rec[15]), hi = parse_double(rec[10]);
    seen["learned noise"] += learned && adds_noise;
    seen["learned, noise factor 0"] += learned && has_noise && !adds_noise;
    seen["history weighed"] += adds_hist;
    seen["history given, not weighed"] += has_hist && !adds_hist;
    seen["clamped"] += std::isfinite(hi) && std::fabs(x0) == hi * parse_double(rec[11]);
    seen["NaN result"] += std::isnan(prev);
    seen["NaN inputs unread"] +=
        std::isfinite(prev) && (std::isnan(parse_double(rec[6])) || std::isnan(parse_double(rec[8])));
  }
  for (const auto& s : seen) {
    Context ctx("cases of kind: " + s.first);
    CHECK(s.second > 0);
  }
  CHECK_EQ(seen.size(), size_t{7});
  std::printf("step cases: %zu, worst |error| / tolerance: float %.3g, double %.3g\n", data.records("case").size(),
              stats.worst[0], stats.worst[1]);
}

// step_adds_noise / step_adds_hist on hand-made rows: -0.0 and 0 weigh nothing, NaN does.
void test_decisions() {
  fastdiff::StepCoefs<double> k{};
  k.noise = 1;
  CHECK(fastdiff::step_adds_noise(true, false, k));
  CHECK(fastdiff::step_adds_noise(true, true, k));
  CHECK(!fastdiff::step_adds_noise(false, false, k));
  CHECK(!fastdiff::step_adds_noise(false, true, k));
  k.noise = 0;
  CHECK(fastdiff::step_adds_noise(true, false, k));  // a fixed sigma (0 or not) is added whenever z is drawn
  CHECK(!fastdiff::step_adds_noise(true, true, k));
  k.noise = -0.0;
  CHECK(!fastdiff::step_adds_noise(true, true, k));
  k.c_hist = 0.25;
  CHECK(fastdiff::step_adds_hist(true, k));
  CHECK(!fastdiff::step_adds_hist(false, k));
  k.c_hist = 0;
  CHECK(!fastdiff::step_adds_hist(true, k));
  k.c_hist = -0.0;
  CHECK(!fastdiff::step_adds_hist(true, k));
  k.c_hist = std::numeric_limits<double>::quiet_NaN();
  CHECK(fastdiff::step_adds_hist(true, k));
  // Terms not added are not read: Inf/NaN there leave the result alone.
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  fastdiff::StepCoefs<double> j{};
  j.a_m = 1;
  j.c_x0 = 2;
  j.log_large = 800;  // exp(400): Inf
  j.log_small = 800;
  double x0 = 0;
  CHECK_EQ(fastdiff::sampler_step_value(0.5, 0.25, inf, nan, nan, j, -inf, inf, 1.0, true, false, false, x0), 0.5);
  CHECK_EQ(x0, 0.25);
  // NaN through the clamp, at either bound.
  CHECK_NAN(fastdiff::step_clamp(nan, -1.0, 1.0));
  CHECK_EQ(fastdiff::step_clamp(-inf, -1.0, 1.0), -1.0);
  CHECK_EQ(fastdiff::step_clamp(inf, -1.0, 1.0), 1.0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DATA_FILE (tests/cpp/data/common_cases.txt)\n", argv[0]);
    return 2;
  }
  test_decisions();
  try {
    const fastdiff_test::DataFile data(argv[1]);
    test_columns(data);
    const std::vector<Row> rows = parse_rows(data);
    test_rows(rows);
    test_cases(rows, data);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: %s\n", e.what());
    ++fastdiff_test::counters().failures;
  }
  return fastdiff_test::finish("test_sampler_step");
}
