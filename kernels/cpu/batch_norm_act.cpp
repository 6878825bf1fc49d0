// Training-mode BatchNorm2d fused with the residual add and the ReLU that follow it in a ResNet block,
// forward and backward, for channels_last CPU tensors (float or bfloat16 activations, float parameters).
//
// Why: on a CPU, BatchNorm, ReLU, the residual add and their backward are memory-bound passes over every
// activation, and ATen runs them as separate operators. Here the forward reads its input twice (statistics,
// then normalisation with the add and the ReLU) and writes once; the backward reads twice and writes once
// (twice with a residual), and where no residual was added it recomputes the ReLU's mask from the input it
// reads anyway instead of reading the output. Statistics and the backward's sums are accumulated in float
// over blocks of rows and in double over the blocks, in an order that does not depend on the thread count.
//
// Groups: a batch of several views (BYOL's two, one trunk pass) is normalised view by view, each by its own
// statistics, as one BatchNorm call per view would; the running statistics take one update per view, in order.
//
// Layout: a channels_last [N, C, H, W] tensor is a row-major [N*H*W, C] matrix; every loop runs over rows
// (split between threads) and, inside a row, over channels (contiguous, vectorised). Built with
// -fno-trapping-math (a float select in a loop vectorises) and -ffp-contract=off (the backward's recomputed
// pre-activation rounds exactly as the forward's did, so its ReLU mask is the forward's).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainRows = 64;  // rows per task: a few KB of each tensor, enough to amortise scheduling

inline float load(float v) { return v; }
inline float load(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T> inline T store(float v) { return static_cast<T>(v); }

// Where the backward takes the ReLU's mask from.
enum class Mask { kNone, kFromOutput, kFromInput };

// Two per-channel sums over rows. The rows are cut into chunks of kChunkRows at fixed places, and the chunks
// shared between threads; a chunk adds kBlockRows rows at a time in float (vectorised 8-wide with AVX2) and
// each block's sums into its double partials; the chunks' partials are summed in order. The result is the
// same whatever the number of threads: two ranks of one thread each compute what one process of two threads
// computes, and a run resumed with another thread count continues exactly.
constexpr int64_t kBlockRows = 16;
constexpr int64_t kChunkRows = 256;

template <typename RowFn>
std::pair<std::vector<double>, std::vector<double>> channel_sums(int64_t rows, int64_t channels, RowFn row) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<double> partials(chunks * 2 * channels, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> block(2 * channels);
    float* fa = block.data();
    float* fb = fa + channels;
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double* a = partials.data() + chunk * 2 * channels;
      double* b = a + channels;
      const int64_t end = std::min(rows, (chunk + 1) * kChunkRows);
      for (int64_t r0 = chunk * kChunkRows; r0 < end; r0 += kBlockRows) {
        std::fill(block.begin(), block.end(), 0.f);
        for (int64_t r = r0; r < std::min(end, r0 + kBlockRows); ++r) row(r, fa, fb);
        for (int64_t c = 0; c < channels; ++c) {
          a[c] += fa[c];
          b[c] += fb[c];
        }
      }
    }
  });
  std::vector<double> a(channels, 0.0), b(channels, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* pa = partials.data() + chunk * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      a[c] += pa[c];
      b[c] += pa[channels + c];
    }
  }
  return {a, b};
}

// y = x * alpha + beta: the forward and the backward's mask both compute it from these, rounded alike.
struct Affine {
  std::vector<float> alpha, beta;
  Affine(const float* mean, const float* invstd, const float* weight, const float* bias, int64_t channels)
      : alpha(channels), beta(channels) {
    for (int64_t c = 0; c < channels; ++c) {
      alpha[c] = invstd[c] * weight[c];
      beta[c] = bias[c] - mean[c] * alpha[c];
    }
  }
};

// Row loops: every pointer __restrict__ and the switches template arguments, so that each loop vectorises
// without run-time alias checks or a branch per element.
// Sums of x - shift and its square: with the shift near the mean (the batch's first row), the variance
// E[(x-shift)^2] - E[x-shift]^2 loses no precision to cancellation.
template <typename T>
void row_moments(const T* __restrict__ x, const float* __restrict__ shift, int64_t channels, float* __restrict__ sum,
                 float* __restrict__ sumsq) {
  for (int64_t c = 0; c < channels; ++c) {
    const float v = load(x[c]) - shift[c];
    sum[c] += v;
    sumsq[c] += v * v;
  }
}

// torch.relu keeps a NaN; so does this.
inline float relu(float v) { return (v > 0.f || v != v) ? v : 0.f; }

template <typename T, bool kRelu, bool kResidual>
void row_normalise(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                   const float* __restrict__ alpha, const float* __restrict__ beta, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    float v = load(x[c]) * alpha[c] + beta[c];
    if constexpr (kResidual) v += load(residual[c]);
    if constexpr (kRelu) v = relu(v);
    y[c] = store<T>(v);
  }
}

// The gradient below the ReLU (threshold_backward's: zero where the output is not > 0). Every load is
// unconditional: a load under the condition would not vectorise.
template <typename T, Mask kMask>
inline float masked(T dy, T x, T y, float alpha, float beta) {
  const float g = load(dy);
  if constexpr (kMask == Mask::kFromOutput) return load(y) > 0.f ? g : 0.f;
  if constexpr (kMask == Mask::kFromInput) return load(x) * alpha + beta > 0.f ? g : 0.f;
  return g;
}

// Pass 1 of the backward: the sums over rows; with kStore it also writes the masked gradient (the residual's
// gradient, which pass 2 then reads instead of the incoming gradient and the output).
template <typename T, Mask kMask, bool kStore>
void row_grad_sums(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
                   const float* __restrict__ mean, const float* __restrict__ alpha, const float* __restrict__ beta,
                   int64_t channels, float* __restrict__ sum_dy, float* __restrict__ dot, T* __restrict__ masked_out) {
  for (int64_t c = 0; c < channels; ++c) {
    const float g = masked<T, kMask>(dy[c], x[c], kMask == Mask::kFromOutput ? y[c] : T(0), alpha[c], beta[c]);
    if constexpr (kStore) masked_out[c] = store<T>(g);
    sum_dy[c] += g;
    dot[c] += g * (load(x[c]) - mean[c]);
  }
}

template <typename T, Mask kMask>
void row_grad_input(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                    const float* __restrict__ alpha, const float* __restrict__ beta,
                    const float* __restrict__ mean_dy, const float* __restrict__ proj,
                    const float* __restrict__ scale, int64_t channels, T* __restrict__ dx) {
  for (int64_t c = 0; c < channels; ++c) {
    const float g = masked<T, kMask>(dy[c], x[c], T(0), alpha[c], beta[c]);
    dx[c] = store<T>((g - mean_dy[c] - (load(x[c]) - mean[c]) * proj[c]) * scale[c]);
  }
}

void check_activation(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be a 4-d channels_last CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), name, " must match x: ",
              t.sizes(), " ", t.scalar_type(), " against ", like.sizes(), " ", like.scalar_type());
}

void check_channels(const at::Tensor& v, int64_t channels, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.numel() == channels &&
                  v.is_contiguous(),
              name, " must be a contiguous float32 CPU vector of ", channels, " elements");
}

template <typename T>
void forward_impl(const at::Tensor& x, const T* residual, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& running_mean, at::Tensor& running_var, double momentum, double eps, bool relu,
                  int64_t groups, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  const int64_t channels = x.size(1);
  const int64_t rows = x.numel() / channels / groups;  // per group: a group is a contiguous run of samples
  float* rmp = running_mean.mutable_data_ptr<float>();
  float* rvp = running_var.mutable_data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const T* xp = x.const_data_ptr<T>() + g * rows * channels;
    std::vector<float> shift(channels);
    for (int64_t c = 0; c < channels; ++c) shift[c] = load(xp[c]);
    const auto [sum, sumsq] = channel_sums(rows, channels, [&](int64_t r, float* a, float* b) {
      row_moments(xp + r * channels, shift.data(), channels, a, b);
    });
    float* mp = mean.mutable_data_ptr<float>() + g * channels;
    float* ip = invstd.mutable_data_ptr<float>() + g * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double shifted_mean = sum[c] / rows;
      const double var = std::max(sumsq[c] / rows - shifted_mean * shifted_mean, 0.0);
      const double m = shift[c] + shifted_mean;
      mp[c] = static_cast<float>(m);
      ip[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
      // nn.BatchNorm2d's running statistics: momentum-weighted, the variance unbiased; one update per group, in
      // order, as one BatchNorm call per group would make them.
      rmp[c] = static_cast<float>(momentum * m + (1.0 - momentum) * rmp[c]);
      rvp[c] = static_cast<float>(momentum * var * rows / (rows - 1) + (1.0 - momentum) * rvp[c]);
    }
    const Affine affine(mp, ip, weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), channels);
    const T* rp = residual == nullptr ? nullptr : residual + g * rows * channels;
    T* yp = y.mutable_data_ptr<T>() + g * rows * channels;
    auto normalise = [&](auto row) {
      at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          row(xp + r * channels, rp == nullptr ? nullptr : rp + r * channels, yp + r * channels,
              affine.alpha.data(), affine.beta.data(), channels);
      });
    };
    if (relu && rp != nullptr) normalise(row_normalise<T, true, true>);
    else if (relu) normalise(row_normalise<T, true, false>);
    else if (rp != nullptr) normalise(row_normalise<T, false, true>);
    else normalise(row_normalise<T, false, false>);
  }
}

// Returns (y, mean, invstd), the statistics [groups * C]; updates running_mean and running_var in place. With
// ``groups`` > 1 the batch is that many equal runs of samples (views), each normalised by its own statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, const at::Tensor& bias,
    at::Tensor& running_mean, at::Tensor& running_var, double momentum, double eps, bool relu, int64_t groups) {
  check_activation(x, x, "x");
  const int64_t channels = x.size(1);
  TORCH_CHECK(groups >= 1 && x.size(0) % groups == 0, "the batch of ", x.size(0), " samples must split into ",
              groups, " equal groups");
  TORCH_CHECK(x.numel() / channels / groups > 1,
              "batch norm in training needs more than one value per channel in each group, got ", x.sizes(), " in ",
              groups, " groups");
  if (residual.has_value()) check_activation(*residual, x, "residual");
  check_channels(weight, channels, "weight");
  check_channels(bias, channels, "bias");
  check_channels(running_mean, channels, "running_mean");
  check_channels(running_var, channels, "running_var");
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({groups * channels}, weight.options());
  at::Tensor invstd = at::empty({groups * channels}, weight.options());
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(x, residual.has_value() ? residual->const_data_ptr<float>() : nullptr, weight, bias,
                        running_mean, running_var, momentum, eps, relu, groups, y, mean, invstd);
  else
    forward_impl<c10::BFloat16>(x, residual.has_value() ? residual->const_data_ptr<c10::BFloat16>() : nullptr,
                                weight, bias, running_mean, running_var, momentum, eps, relu, groups, y, mean,
                                invstd);
  return {y, mean, invstd};
}

template <typename T>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                   bool residual, int64_t groups, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias,
                   at::Tensor& dres) {
  const int64_t channels = x.size(1);
  const int64_t rows = x.numel() / channels / groups;
  const float* wp = weight.const_data_ptr<float>();
  float* dwp = dweight.mutable_data_ptr<float>();
  float* dbp = dbias.mutable_data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t offset = g * rows * channels;
    const T* dyp = dy.const_data_ptr<T>() + offset;
    const T* xp = x.const_data_ptr<T>() + offset;
    const T* yp = y.const_data_ptr<T>() + offset;
    const float* mp = mean.const_data_ptr<float>() + g * channels;
    const float* ip = invstd.const_data_ptr<float>() + g * channels;
    const Affine affine(mp, ip, wp, bias.const_data_ptr<float>(), channels);
    const float* ap = affine.alpha.data();
    const float* bp = affine.beta.data();

    // With a residual, pass 1 writes the masked gradient (the residual's) and pass 2 reads it: 5 reads and 2
    // writes where reading the output's mask twice would take 6 and 2. Without one, the mask comes from x.
    T* drp = residual ? dres.mutable_data_ptr<T>() + offset : nullptr;
    auto grad_sums = [&](auto row) {
      return channel_sums(rows, channels, [&](int64_t r, float* a, float* b) {
        row(dyp + r * channels, xp + r * channels, yp + r * channels, mp, ap, bp, channels, a, b,
            drp == nullptr ? nullptr : drp + r * channels);
      });
    };
    const auto [sum_dy, dot] = residual ? (relu ? grad_sums(row_grad_sums<T, Mask::kFromOutput, true>)
                                                : grad_sums(row_grad_sums<T, Mask::kNone, true>))
                               : relu   ? grad_sums(row_grad_sums<T, Mask::kFromInput, false>)
                                        : grad_sums(row_grad_sums<T, Mask::kNone, false>);

    std::vector<float> mean_dy(channels), proj(channels), scale(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double inv = ip[c];
      mean_dy[c] = static_cast<float>(sum_dy[c] / rows);
      proj[c] = static_cast<float>(dot[c] * inv * inv / rows);
      scale[c] = static_cast<float>(inv * wp[c]);
      // Each group's parameter gradient rounded to float, then summed in group order: what autograd does with
      // the gradients of one BatchNorm call per group.
      const float dw = static_cast<float>(dot[c] * inv);
      const float db = static_cast<float>(sum_dy[c]);
      dwp[c] = g == 0 ? dw : dwp[c] + dw;
      dbp[c] = g == 0 ? db : dbp[c] + db;
    }
    T* dxp = dx.mutable_data_ptr<T>() + offset;
    const T* gp = residual ? drp : dyp;
    auto grad_input = [&](auto row) {
      at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          row(gp + r * channels, xp + r * channels, mp, ap, bp, mean_dy.data(), proj.data(), scale.data(),
              channels, dxp + r * channels);
      });
    };
    if (relu && !residual) grad_input(row_grad_input<T, Mask::kFromInput>);
    else grad_input(row_grad_input<T, Mask::kNone>);
  }
}

// Returns (dx, dweight, dbias, dresidual); dresidual is undefined unless ``residual``. ``y`` is the forward's
// output, read only for the mask of a ReLU after a residual add.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu, bool residual, int64_t groups) {
  check_activation(x, x, "x");
  check_activation(y, x, "y");
  const at::Tensor dy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  check_activation(dy, x, "grad");
  const int64_t channels = x.size(1);
  check_channels(weight, channels, "weight");
  check_channels(bias, channels, "bias");
  check_channels(mean, groups * channels, "mean");
  check_channels(invstd, groups * channels, "invstd");
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dres = residual ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor dweight = at::empty({channels}, weight.options());
  at::Tensor dbias = at::empty({channels}, weight.options());
  if (x.scalar_type() == at::kFloat)
    backward_impl<float>(dy, x, y, weight, bias, mean, invstd, relu, residual, groups, dx, dweight, dbias, dres);
  else
    backward_impl<c10::BFloat16>(dy, x, y, weight, bias, mean, invstd, relu, residual, groups, dx, dweight, dbias,
                                 dres);
  return {dx, dweight, dbias, dres};
}

// The op Python calls: forward with its backward recorded, and the BatchNorm's batches counted
// (num_batches_tracked += groups, as one nn.BatchNorm2d forward per group does), all without a Python frame per call.
class BatchNormAct : public torch::autograd::Function<BatchNormAct> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& residual, const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor running_mean, at::Tensor running_var, double momentum, double eps, bool relu,
                            int64_t groups) {
    auto [y, mean, invstd] = batch_norm_act_forward(x, residual, weight, bias, running_mean, running_var, momentum,
                                                    eps, relu, groups);
    ctx->save_for_backward({x, y, weight, bias, mean, invstd});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual.has_value();
    ctx->saved_data["groups"] = groups;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dweight, dbias, dres] = batch_norm_act_backward(grads[0], saved[0], saved[1], saved[2], saved[3],
                                                              saved[4], saved[5], ctx->saved_data["relu"].toBool(),
                                                              ctx->saved_data["residual"].toBool(),
                                                              ctx->saved_data["groups"].toInt());
    return {dx, dres, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor batch_norm_act(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                          const at::Tensor& bias, at::Tensor& running_mean, at::Tensor& running_var,
                          at::Tensor& num_batches_tracked, double momentum, double eps, bool relu, int64_t groups) {
  TORCH_CHECK(num_batches_tracked.device().is_cpu() && num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.numel() == 1,
              "num_batches_tracked must be a one-element int64 CPU tensor");
  *num_batches_tracked.mutable_data_ptr<int64_t>() += groups;
  return BatchNormAct::apply(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, groups);
}

}  // namespace

TORCH_LIBRARY(lcr_fast_cpu, m) {
  m.def("batch_norm_act(Tensor x, Tensor? residual, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, Tensor(c!) num_batches_tracked, float momentum, float eps, bool relu, int groups) "
        "-> Tensor");
}

// One kernel for every dispatch key of the combined op: it records its own backward (autograd's Function
// does nothing under no_grad), and its tensors are CPU tensors, which it checks.
TORCH_LIBRARY_IMPL(lcr_fast_cpu, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_act", &batch_norm_act);
}
