// The per-element arithmetic of the fused sampler step, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "macros.h"

namespace fastdiff {

// Columns of a sampler's coefficient table (one row per step), built on the host by
// fastdiff/sampling/samplers.py (Sampler.coefficient_table; the Python order must match):
//   x0   = a_x * x + a_m * m                (the prediction m turned into x0: eps, v or x0)
//   eps  = e_x * x + e_m * m                (... and into eps)
//   x0   = clamp(x0, -clip, clip) * x0_scale   (clipping, or dynamic thresholding: clip = s, scale = 1/s)
//   prev = c_x0 * x0 + c_eps * eps + c_x * x + c_hist * h + sigma * z
//          (h: the previous step's x0 of a multistep solver, only when given and c_hist != 0; the
//          noise term only when the step adds noise)
// ab and ab_prev are alphas_cumprod at the step's timestep and the one it moves to.
// DDIM (Song et al. 2021, eq. 12): c_x0 = sqrt(ab_prev), c_eps = sqrt(1 - ab_prev - sigma^2), c_x = 0;
//                                  noise = 1 where eta > 0.
// DDPM (Ho et al. 2020, eq. 7):    with alpha = ab / ab_prev, beta = 1 - alpha (respaced steps):
//                                  c_x0 = sqrt(ab_prev) beta / (1 - ab), c_x = sqrt(alpha)(1 - ab_prev)/(1 - ab),
//                                  c_eps = 0; noise = 1 at timesteps > 0, 0 at timestep 0; sigma the fixed
//                                  one times noise, or learned: exp((f log_large + (1-f) log_small) / 2) * noise
//                                  with f = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15), log_small the log of
//                                  beta (1 - ab_prev) / (1 - ab) floored at 1e-20, log_large log(beta).
// DPM-Solver++ 2M (Lu et al. 2022): c_x = sigma_t / sigma_s (times e^-h in the SDE variant), c_x0 and c_hist
//                                  the midpoint weights of D0 and D1 (fastdiff/sampling/samplers.py), sigma
//                                  the SDE variant's.
enum StepCoef : int {
  kAx = 0,
  kAm,
  kEx,
  kEm,
  kCx0,
  kCeps,
  kCx,
  kSigma,
  kLogSmall,
  kLogLarge,
  kNoise,
  kHist,
  kNumStepCoefs
};

template <typename T>
struct StepCoefs {
  T a_x, a_m, e_x, e_m, c_x0, c_eps, c_x, sigma, log_small, log_large, noise, c_hist;
};

template <typename T, typename S>
FASTDIFF_INLINE StepCoefs<T> load_step_coefs(const S* row) {
  return StepCoefs<T>{T(row[kAx]), T(row[kAm]),    T(row[kEx]),       T(row[kEm]),       T(row[kCx0]),   T(row[kCeps]),
                      T(row[kCx]), T(row[kSigma]), T(row[kLogSmall]), T(row[kLogLarge]), T(row[kNoise]), T(row[kHist])};
}

// NaN-propagating clamp (a NaN prediction must stay visible, not become the clip value). The CPU
// vector build declares overloads for at::vec::Vectorized before including this header.
template <typename T>
FASTDIFF_INLINE T step_clamp(const T& v, const T& lo, const T& hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
FASTDIFF_INLINE T step_exp(const T& v) {
  using std::exp;
  return exp(v);
}

// Whether this step adds its noise term sigma * z: only when z is drawn (a noise tensor or Philox)
// and, with a learned variance, the table's noise factor is not 0 (DDPM's last step). A term the
// math does not use is never evaluated, so NaN/Inf in the variance channels (which DDIM drops) or
// an exp() that overflows at a noise factor of 0 cannot turn the sample into NaN (Inf * 0). Uniform
// over a launch: callers decide it once, on the scalar coefficients, and branch on it.
template <typename T>
FASTDIFF_INLINE bool step_adds_noise(bool has_noise, bool learned, const StepCoefs<T>& k) {
  return has_noise && (!learned || k.noise != T(0));
}

// Whether this step adds c_hist * h: only when a history is given and the row weighs it (a
// multistep solver's first-order rows have c_hist = 0). As with the noise, a term the row does not
// use is never evaluated, so the loop's history buffer may hold anything before its first write.
// Uniform over a launch.
template <typename T>
FASTDIFF_INLINE bool step_adds_hist(bool has_hist, const StepCoefs<T>& k) {
  return has_hist && k.c_hist != T(0);
}

// One element of the step. x: x_t; m: the (guided) model prediction; var: the learned-variance
// channel (read only when `learned` and `adds_noise`); h: the previous step's x0 (read only when
// `adds_hist`, see step_adds_hist); z: the standard-normal noise (read only when `adds_noise`, see
// step_adds_noise).
template <typename T>
FASTDIFF_INLINE T sampler_step_value(const T& x, const T& m, const T& var, const T& h, const T& z,
                                     const StepCoefs<T>& k, const T& clip_lo, const T& clip_hi, const T& x0_scale,
                                     bool learned, bool adds_hist, bool adds_noise, T& x0) {
  x0 = step_clamp(k.a_x * x + k.a_m * m, clip_lo, clip_hi) * x0_scale;
  const T eps = k.e_x * x + k.e_m * m;
  T prev = k.c_x0 * x0 + k.c_eps * eps + k.c_x * x;
  if (adds_hist) {
    prev = prev + k.c_hist * h;
  }
  if (!adds_noise) {
    return prev;
  }
  T sigma = k.sigma;
  if (learned) {
    const T f = (var + T(1)) * T(0.5);
    sigma = step_exp(T(0.5) * (f * k.log_large + (T(1) - f) * k.log_small)) * k.noise;
  }
  return prev + sigma * z;
}

}  // namespace fastdiff
