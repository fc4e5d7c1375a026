// CPU kernels of dalle3_fast::group_norm_silu_fwd / _bwd.
//
//   v = x + add[b, c];  xhat = (v - mean[b, g]) * rstd[b, g]
//   z = (xhat * weight[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c];  y = silu(z)
//
// Every step is affine per (b, c), so z = x * a[b, c] + b'[b, c] and the kernels make
// one pass for the statistics and one for the output. Channels-first inputs run one
// task per (sample, group), whose slice stays in L2 between the two passes;
// channels-last inputs run over (sample, block of rows) with per-channel partial sums.
// float32 and float64 run natively; float16/bfloat16 run in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../op_checks.h"
#include "group_norm_silu_loops.h"
#include "memory.h"
#include "parallel.h"

namespace d3f::gn {
namespace {

// ------------------------------------------------------------- per-ISA entry points

#define D3F_GN_ENTRY_POINTS(T)                                                                                      \
  D3F_CLONES void k_shifted_sums_run(const T* x, int64_t n, T shift, double& s1, double& s2) {                     \
    shifted_sums_run<T>(x, n, shift, s1, s2);                                                                       \
  }                                                                                                                 \
  D3F_CLONES void k_shifted_sums_rows(const T* x, int64_t rows, int64_t C, const T* shift, T* s1, T* s2) {         \
    shifted_sums_rows<T>(x, rows, C, shift, s1, s2);                                                                \
  }                                                                                                                 \
  D3F_CLONES void k_apply_run(bool silu, const T* x, T* y, int64_t n, T a, T b) {                                   \
    silu ? apply_run<T, true>(x, y, n, a, b) : apply_run<T, false>(x, y, n, a, b);                                  \
  }                                                                                                                 \
  D3F_CLONES void k_apply_rows(bool silu, const T* x, T* y, int64_t rows, int64_t C, const T* a, const T* b) {      \
    silu ? apply_rows<T, true>(x, y, rows, C, a, b) : apply_rows<T, false>(x, y, rows, C, a, b);                    \
  }                                                                                                                 \
  D3F_CLONES void k_grad_sums_run(bool silu, const T* x, const T* dy, int64_t n, T a, T b, double& sdz,            \
                                  double& sdzx, double& sx) {                                                       \
    silu ? grad_sums_run<T, true>(x, dy, n, a, b, sdz, sdzx, sx)                                                    \
         : grad_sums_run<T, false>(x, dy, n, a, b, sdz, sdzx, sx);                                                  \
  }                                                                                                                 \
  D3F_CLONES void k_grad_sums_rows(bool silu, const T* x, const T* dy, int64_t rows, int64_t C, const T* a,         \
                                   const T* b, T* sdz, T* sdzx, T* sx) {                                            \
    silu ? grad_sums_rows<T, true>(x, dy, rows, C, a, b, sdz, sdzx, sx)                                             \
         : grad_sums_rows<T, false>(x, dy, rows, C, a, b, sdz, sdzx, sx);                                           \
  }                                                                                                                 \
  D3F_CLONES void k_grad_apply_run(bool silu, const T* x, const T* dy, T* dx, int64_t n, T a, T b, T p, T q, T r) { \
    silu ? grad_apply_run<T, true>(x, dy, dx, n, a, b, p, q, r)                                                     \
         : grad_apply_run<T, false>(x, dy, dx, n, a, b, p, q, r);                                                   \
  }                                                                                                                 \
  D3F_CLONES void k_grad_apply_rows(bool silu, const T* x, const T* dy, T* dx, int64_t rows, int64_t C,            \
                                    const T* a, const T* b, const T* p, const T* q, const T* r) {                   \
    silu ? grad_apply_rows<T, true>(x, dy, dx, rows, C, a, b, p, q, r)                                              \
         : grad_apply_rows<T, false>(x, dy, dx, rows, C, a, b, p, q, r);                                            \
  }

D3F_GN_ENTRY_POINTS(float)
D3F_GN_ENTRY_POINTS(double)
#undef D3F_GN_ENTRY_POINTS

// Rows per task for channels-last inputs.
constexpr int64_t kRowsPerTask = 64;

// ------------------------------------------------------------- shapes and parameters

struct Shape {
  int64_t B, C, S, G, Cg;
  bool channels_last;  // memory index [b, s, c] instead of [b, c, s]
};

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// The per-channel parameters and per-sample modulation, as float64 arrays.
struct Params {
  at::Tensor w, bias, add, scale, shift;  // (C), (C), (B, C) or undefined
  const double *pw, *pbias, *padd, *pscale, *pshift;

  Params(const at::Tensor& weight, const at::Tensor& bias_, const std::optional<at::Tensor>& add_,
         const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& shift_) {
    auto f64 = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
    w = f64(weight);
    bias = f64(bias_);
    add = add_ ? f64(*add_) : at::Tensor();
    scale = scale_ ? f64(*scale_) : at::Tensor();
    shift = shift_ ? f64(*shift_) : at::Tensor();
    pw = w.data_ptr<double>();
    pbias = bias.data_ptr<double>();
    padd = add.defined() ? add.data_ptr<double>() : nullptr;
    pscale = scale.defined() ? scale.data_ptr<double>() : nullptr;
    pshift = shift.defined() ? shift.data_ptr<double>() : nullptr;
  }
  double add_at(int64_t bc) const { return padd ? padd[bc] : 0.0; }
  double scale1_at(int64_t bc) const { return pscale ? 1.0 + pscale[bc] : 1.0; }
  double shift_at(int64_t bc) const { return pshift ? pshift[bc] : 0.0; }
};

// Coefficients of z = x * a + b for channel c of sample b, given the group statistics.
inline void forward_coefficients(const Params& p, int64_t b, int64_t c, int64_t C, double mean, double rstd,
                                 double& a, double& bb) {
  const int64_t bc = b * C + c;
  const double s1 = p.scale1_at(bc);
  a = rstd * p.pw[c] * s1;
  bb = (p.add_at(bc) - mean) * a + p.pbias[c] * s1 + p.shift_at(bc);
}

// Group mean and rstd of v = x + add from per-channel shifted sums (shift K_c = x at the
// channel's first spatial position): sum (v - m)^2 = s2 + 2 e s1 + S e^2 with e = K_c + add_c - m.
inline void group_statistics(const Params& p, const Shape& sh, int64_t b, int64_t g, const double* shift,
                             const double* s1, const double* s2, double eps, double& mean, double& rstd) {
  const double n = double(sh.Cg) * double(sh.S);
  double total = 0;
  for (int64_t c = g * sh.Cg; c < (g + 1) * sh.Cg; ++c)
    total += double(sh.S) * (shift[c] + p.add_at(b * sh.C + c)) + s1[c];
  mean = total / n;
  double ss = 0;
  for (int64_t c = g * sh.Cg; c < (g + 1) * sh.Cg; ++c) {
    const double e = shift[c] + p.add_at(b * sh.C + c) - mean;
    ss += s2[c] + 2.0 * e * s1[c] + double(sh.S) * e * e;
  }
  const double var = std::max(ss / n, 0.0);
  rstd = 1.0 / std::sqrt(var + eps);
}

// ------------------------------------------------------------- forward

template <typename T>
void forward_channels_first(const T* x, T* y, const Params& p, const Shape& sh, double eps, bool silu,
                            double* mean_out, double* rstd_out) {
  auto make_scratch = [&] { return std::vector<double>(size_t(3 * sh.C)); };  // shift, s1, s2
  parallel_tasks(sh.B * sh.G, make_scratch, [&](std::vector<double>& scratch, int64_t bg) {
    double *shift = scratch.data(), *s1 = shift + sh.C, *s2 = s1 + sh.C;
    const int64_t b = bg / sh.G, g = bg % sh.G;
    for (int64_t c = g * sh.Cg; c < (g + 1) * sh.Cg; ++c) {
      const T* xc = x + (b * sh.C + c) * sh.S;
      shift[c] = double(xc[0]);
      k_shifted_sums_run(xc, sh.S, xc[0], s1[c], s2[c]);
    }
    double mean, rstd;
    group_statistics(p, sh, b, g, shift, s1, s2, eps, mean, rstd);
    mean_out[bg] = mean;
    rstd_out[bg] = rstd;
    for (int64_t c = g * sh.Cg; c < (g + 1) * sh.Cg; ++c) {
      double a, bb;
      forward_coefficients(p, b, c, sh.C, mean, rstd, a, bb);
      const int64_t off = (b * sh.C + c) * sh.S;
      k_apply_run(silu, x + off, y + off, sh.S, T(a), T(bb));
    }
  });
}

// Per-(b, c) sums over rows for channels-last x, from per-task partials reduced in float64.
template <typename T, typename RowSums>
void channels_last_sums(const Shape& sh, int n_sums, std::vector<double>& sums, const RowSums& row_sums) {
  const int64_t chunks = (sh.S + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<double> partial(size_t(sh.B * chunks * n_sums * sh.C));
  auto make_scratch = [&] { return std::vector<T>(size_t(n_sums * sh.C)); };
  parallel_tasks(sh.B * chunks, make_scratch, [&](std::vector<T>& acc, int64_t task) {
    const int64_t b = task / chunks, r0 = (task % chunks) * kRowsPerTask;
    const int64_t rows = std::min(kRowsPerTask, sh.S - r0);
    row_sums(b, r0, rows, acc.data());
    double* out = partial.data() + task * n_sums * sh.C;
    for (int64_t i = 0; i < n_sums * sh.C; ++i) out[i] = double(acc[i]);
  });
  sums.assign(size_t(sh.B * n_sums * sh.C), 0.0);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const double* src = partial.data() + (b * chunks + chunk) * n_sums * sh.C;
      double* dst = sums.data() + b * n_sums * sh.C;
      for (int64_t i = 0; i < n_sums * sh.C; ++i) dst[i] += src[i];
    }
}

// fn(b, first_row, rows) over blocks of rows of every sample, in parallel.
template <typename Fn>
void for_each_row_block(const Shape& sh, const Fn& fn) {
  const int64_t chunks = (sh.S + kRowsPerTask - 1) / kRowsPerTask;
  parallel_tasks(sh.B * chunks, [] { return 0; }, [&](int, int64_t task) {
    const int64_t b = task / chunks, r0 = (task % chunks) * kRowsPerTask;
    fn(b, r0, std::min(kRowsPerTask, sh.S - r0));
  });
}

template <typename T>
void forward_channels_last(const T* x, T* y, const Params& p, const Shape& sh, double eps, bool silu,
                           double* mean_out, double* rstd_out) {
  const int64_t C = sh.C;
  std::vector<double> sums;  // per b: s1[C], s2[C]
  channels_last_sums<T>(sh, 2, sums, [&](int64_t b, int64_t r0, int64_t rows, T* acc) {
    const T* xb = x + b * sh.S * C;
    k_shifted_sums_rows(xb + r0 * C, rows, C, xb, acc, acc + C);
  });
  std::vector<T> a(size_t(sh.B * C)), bb(size_t(sh.B * C));
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t b = 0; b < sh.B; ++b) {
    for (int64_t c = 0; c < C; ++c) shift[c] = double(x[b * sh.S * C + c]);
    const double* s1 = sums.data() + b * 2 * C;
    for (int64_t g = 0; g < sh.G; ++g) {
      double mean, rstd;
      group_statistics(p, sh, b, g, shift.data(), s1, s1 + C, eps, mean, rstd);
      mean_out[b * sh.G + g] = mean;
      rstd_out[b * sh.G + g] = rstd;
      for (int64_t c = g * sh.Cg; c < (g + 1) * sh.Cg; ++c) {
        double ac, bc;
        forward_coefficients(p, b, c, C, mean, rstd, ac, bc);
        a[b * C + c] = T(ac);
        bb[b * C + c] = T(bc);
      }
    }
  }
  for_each_row_block(sh, [&](int64_t b, int64_t r0, int64_t rows) {
    const int64_t off = (b * sh.S + r0) * C;
    k_apply_rows(silu, x + off, y + off, rows, C, a.data() + b * C, bb.data() + b * C);
  });
}

// ------------------------------------------------------------- backward

// Per-(b, c) results of the backward's first pass, and what the second pass needs.
struct GradChannel {
  double a, bb;          // z = x * a + bb
  double sdz, sdzx, sx;  // sums over the channel of dz, dz * x, x
};

// From the per-channel sums of one group: the coefficients of dx = dz * p + x * q + r and
// the per-channel gradients of the parameters.
struct GroupGrad {
  const Params& prm;
  const Shape& sh;
  double *dweight_bc, *dbias_bc, *dadd, *dscale, *dshift;  // (B, C) each; the first two summed over b later

  void operator()(int64_t b, int64_t g, double mean, double rstd, const GradChannel* ch, double* p, double* q,
                  double* r) const {
    const double n = double(sh.Cg) * double(sh.S);
    double m1 = 0, m2 = 0;
    for (int64_t i = 0; i < sh.Cg; ++i) {
      const int64_t c = g * sh.Cg + i, bc = b * sh.C + c;
      const double t = (prm.add_at(bc) - mean) * rstd;  // xhat = x * rstd + t
      const double sdz_xhat = rstd * ch[i].sdzx + t * ch[i].sdz;
      const double gain = prm.scale1_at(bc) * prm.pw[c];  // d z / d xhat
      m1 += gain * ch[i].sdz;
      m2 += gain * sdz_xhat;
      dshift[bc] = ch[i].sdz;
      dscale[bc] = prm.pw[c] * sdz_xhat + prm.pbias[c] * ch[i].sdz;
      dweight_bc[bc] = prm.scale1_at(bc) * sdz_xhat;
      dbias_bc[bc] = prm.scale1_at(bc) * ch[i].sdz;
    }
    m1 /= n;
    m2 /= n;
    // dx = rstd * (gain * dz - m1 - xhat * m2)
    for (int64_t i = 0; i < sh.Cg; ++i) {
      const int64_t c = g * sh.Cg + i, bc = b * sh.C + c;
      const double t = (prm.add_at(bc) - mean) * rstd;
      p[i] = rstd * prm.scale1_at(bc) * prm.pw[c];
      q[i] = -rstd * rstd * m2;
      r[i] = -rstd * (m1 + t * m2);
      dadd[bc] = p[i] * ch[i].sdz + q[i] * ch[i].sx + double(sh.S) * r[i];
    }
  }
};

template <typename T>
void backward_channels_first(const T* dy, const T* x, T* dx, const Params& prm, const Shape& sh, bool silu,
                             const double* mean, const double* rstd, const GroupGrad& group_grad) {
  struct Scratch {
    std::vector<GradChannel> ch;
    std::vector<double> p, q, r;
  };
  auto make_scratch = [&] {
    const size_t n = size_t(sh.Cg);
    return Scratch{std::vector<GradChannel>(n), std::vector<double>(n), std::vector<double>(n),
                   std::vector<double>(n)};
  };
  parallel_tasks(sh.B * sh.G, make_scratch, [&](Scratch& scratch, int64_t bg) {
    auto& [ch, p, q, r] = scratch;
    const int64_t b = bg / sh.G, g = bg % sh.G;
    for (int64_t i = 0; i < sh.Cg; ++i) {
      const int64_t c = g * sh.Cg + i, off = (b * sh.C + c) * sh.S;
      forward_coefficients(prm, b, c, sh.C, mean[bg], rstd[bg], ch[i].a, ch[i].bb);
      k_grad_sums_run(silu, x + off, dy + off, sh.S, T(ch[i].a), T(ch[i].bb), ch[i].sdz, ch[i].sdzx, ch[i].sx);
    }
    group_grad(b, g, mean[bg], rstd[bg], ch.data(), p.data(), q.data(), r.data());
    for (int64_t i = 0; i < sh.Cg; ++i) {
      const int64_t off = (b * sh.C + g * sh.Cg + i) * sh.S;
      k_grad_apply_run(silu, x + off, dy + off, dx + off, sh.S, T(ch[i].a), T(ch[i].bb), T(p[i]), T(q[i]),
                       T(r[i]));
    }
  });
}

template <typename T>
void backward_channels_last(const T* dy, const T* x, T* dx, const Params& prm, const Shape& sh, bool silu,
                            const double* mean, const double* rstd, const GroupGrad& group_grad) {
  const int64_t C = sh.C;
  std::vector<T> a(size_t(sh.B * C)), bb(size_t(sh.B * C));
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bg = b * sh.G + c / sh.Cg;
      double ac, bc;
      forward_coefficients(prm, b, c, C, mean[bg], rstd[bg], ac, bc);
      a[b * C + c] = T(ac);
      bb[b * C + c] = T(bc);
    }
  std::vector<double> sums;  // per b: sdz[C], sdzx[C], sx[C]
  channels_last_sums<T>(sh, 3, sums, [&](int64_t b, int64_t r0, int64_t rows, T* acc) {
    const int64_t off = (b * sh.S + r0) * C;
    k_grad_sums_rows(silu, x + off, dy + off, rows, C, a.data() + b * C, bb.data() + b * C, acc, acc + C,
                     acc + 2 * C);
  });
  std::vector<T> p(size_t(sh.B * C)), q(size_t(sh.B * C)), r(size_t(sh.B * C));
  std::vector<GradChannel> ch(size_t(sh.Cg));
  std::vector<double> pg(size_t(sh.Cg)), qg(size_t(sh.Cg)), rg(size_t(sh.Cg));
  for (int64_t b = 0; b < sh.B; ++b) {
    const double* s = sums.data() + b * 3 * C;
    for (int64_t g = 0; g < sh.G; ++g) {
      const int64_t bg = b * sh.G + g;
      for (int64_t i = 0; i < sh.Cg; ++i) {
        const int64_t c = g * sh.Cg + i;
        ch[i] = GradChannel{double(a[b * C + c]), double(bb[b * C + c]), s[c], s[C + c], s[2 * C + c]};
      }
      group_grad(b, g, mean[bg], rstd[bg], ch.data(), pg.data(), qg.data(), rg.data());
      for (int64_t i = 0; i < sh.Cg; ++i) {
        const int64_t bc = b * C + g * sh.Cg + i;
        p[bc] = T(pg[i]);
        q[bc] = T(qg[i]);
        r[bc] = T(rg[i]);
      }
    }
  }
  for_each_row_block(sh, [&](int64_t b, int64_t r0, int64_t rows) {
    const int64_t off = (b * sh.S + r0) * C, bc = b * C;
    k_grad_apply_rows(silu, x + off, dy + off, dx + off, rows, C, a.data() + bc, bb.data() + bc, p.data() + bc,
                      q.data() + bc, r.data() + bc);
  });
}

// ------------------------------------------------------------- validation and entry points

Shape check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& shift, int64_t num_groups, std::optional<int64_t> splits) {
  const auto d = dalle3_fast::check_group_norm_silu(op, x, weight, bias, add, scale, shift, num_groups);
  dalle3_fast::check_splits(op, splits);  // one path on the CPU: accepted, not used
  return Shape{d.B, d.C, d.S, d.G, d.C / d.G, is_channels_last(x)};
}

// float16/bfloat16 compute in float32; float32/float64 natively.
at::ScalarType compute_type(at::ScalarType t) { return dalle3_fast::acc_type(t); }

at::Tensor dense(const at::Tensor& t) {
  return is_channels_last(t) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu, std::optional<int64_t> splits) {
  const Shape sh = check_inputs("group_norm_silu_fwd", x_in, weight, bias, add, scale, shift, num_groups, splits);
  dalle3_fast::check_eps("group_norm_silu_fwd", eps);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const at::Tensor x = dense(x_in.detach()).to(ct);
  at::Tensor y = at::empty_like(x);
  if (y.scalar_type() == x_in.scalar_type()) advise_huge_pages(y);  // y is the op's output
  const Params prm(weight, bias, add, scale, shift);
  at::Tensor mean = at::empty({sh.B, sh.G}, x.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_silu_fwd_cpu", [&] {
    const auto run = sh.channels_last ? forward_channels_last<scalar_t> : forward_channels_first<scalar_t>;
    run(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), prm, sh, eps, silu, mean.data_ptr<double>(),
        rstd.data_ptr<double>());
  });
  return {y.to(x_in.scalar_type()), mean.to(ct), rstd.to(ct)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, bool silu, std::optional<int64_t> splits) {
  const Shape sh = check_inputs("group_norm_silu_bwd", x_in, weight, bias, add, scale, shift, num_groups, splits);
  dalle3_fast::check_group_norm_silu_bwd("group_norm_silu_bwd", {sh.B, sh.C, sh.S, sh.G}, x_in, grad_y, mean_in,
                                         rstd_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const at::Tensor x = dense(x_in.detach()).to(ct);
  const at::Tensor dy = (sh.channels_last ? grad_y.contiguous(at::MemoryFormat::ChannelsLast) : grad_y.contiguous())
                            .to(ct);
  const at::Tensor mean = mean_in.to(at::kDouble).contiguous(), rstd = rstd_in.to(at::kDouble).contiguous();
  const Params prm(weight, bias, add, scale, shift);
  auto per_sample = [&] { return at::empty({sh.B, sh.C}, x.options().dtype(at::kDouble)); };
  at::Tensor dweight_bc = per_sample(), dbias_bc = per_sample(), dadd = per_sample(), dscale = per_sample(),
             dshift = per_sample();
  const GroupGrad group_grad{prm,
                             sh,
                             dweight_bc.data_ptr<double>(),
                             dbias_bc.data_ptr<double>(),
                             dadd.data_ptr<double>(),
                             dscale.data_ptr<double>(),
                             dshift.data_ptr<double>()};
  at::Tensor dx = at::empty_like(x);
  if (dx.scalar_type() == x_in.scalar_type()) advise_huge_pages(dx);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_silu_bwd_cpu", [&] {
    const auto run = sh.channels_last ? backward_channels_last<scalar_t> : backward_channels_first<scalar_t>;
    run(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), prm, sh, silu,
        mean.data_ptr<double>(), rstd.data_ptr<double>(), group_grad);
  });
  const auto xt = x_in.scalar_type();
  return {dx.to(xt),
          dweight_bc.sum(0).to(weight.scalar_type()),
          dbias_bc.sum(0).to(bias.scalar_type()),
          dadd.to(xt),
          dscale.to(xt),
          dshift.to(xt)};
}

}  // namespace
}  // namespace d3f::gn

TORCH_LIBRARY_IMPL(dalle3_fast, CPU, m) {
  m.impl("group_norm_silu_fwd", &d3f::gn::group_norm_silu_fwd_cpu);
  m.impl("group_norm_silu_bwd", &d3f::gn::group_norm_silu_bwd_cpu);
}
