// slimgraph-runner: run a slimgraph TVM artifact (a Relax VM library) with TVM's runtime only.
//
//   runner MODEL.so [--input FILE:SHAPE:DTYPE]... [--out-dir DIR] [--repeat N] [--warmup W]
//
//   SHAPE is "1x1x16x16" ("" or "scalar" for rank 0); DTYPE a TVM dtype ("float32", "int8").
//   Each FILE holds the raw little-endian bytes of one input, row-major.
//
// Loads MODEL.so (ffi::Module::LoadFromFile), creates the VM (vm_load_executable,
// vm_initialization), calls "main" with the inputs, writes output K as DIR/output_K.bin and prints
// one JSON line on stdout: {"outputs": [{"file", "shape", "dtype"}], "latency_ms": {"median",
// "min", "max", "repeat", "warmup"}}. Errors go to stderr with exit code 1 (bad usage: 2).
//
// Built for aarch64 (cross, run under qemu-aarch64) and x86 by tools/build_runner.sh against the
// libtvm_runtime.so / libtvm_ffi.so and tvm-ffi headers of the apache-tvm(-ffi) wheels.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct InputSpec {
  std::string file;
  std::vector<int64_t> shape;
  std::string dtype;
};

struct Options {
  std::string model;
  std::vector<InputSpec> inputs;
  std::string out_dir = ".";
  int repeat = 10;
  int warmup = 1;
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "runner: " << why << "\nusage: runner MODEL.so [--input FILE:SHAPE:DTYPE]... "
            << "[--out-dir DIR] [--repeat N] [--warmup W]\n";
  std::exit(2);
}

InputSpec ParseInput(const std::string& arg) {
  size_t b = arg.rfind(':');
  size_t a = b == std::string::npos || b == 0 ? std::string::npos : arg.rfind(':', b - 1);
  if (a == std::string::npos) Usage("--input wants FILE:SHAPE:DTYPE, got '" + arg + "'");
  InputSpec spec{arg.substr(0, a), {}, arg.substr(b + 1)};
  std::string shape = arg.substr(a + 1, b - a - 1);
  if (shape != "scalar") {
    std::stringstream ss(shape);
    for (std::string dim; std::getline(ss, dim, 'x');) {
      if (dim.empty()) continue;
      spec.shape.push_back(std::stoll(dim));
    }
  }
  return spec;
}

Options ParseArgs(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--input") opt.inputs.push_back(ParseInput(value()));
    else if (arg == "--out-dir") opt.out_dir = value();
    else if (arg == "--repeat") opt.repeat = std::stoi(value());
    else if (arg == "--warmup") opt.warmup = std::stoi(value());
    else if (!arg.empty() && arg[0] == '-') Usage("unknown option " + arg);
    else if (opt.model.empty()) opt.model = arg;
    else Usage("more than one model given");
  }
  if (opt.model.empty()) Usage("no model given");
  if (opt.repeat < 1 || opt.warmup < 0) Usage("--repeat must be >= 1 and --warmup >= 0");
  return opt;
}

ffi::Tensor ReadInput(const InputSpec& spec) {
  DLDataType dtype = ffi::StringToDLDataType(spec.dtype);
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(spec.shape.data(), spec.shape.size()), dtype,
                                           DLDevice{kDLCPU, 0});
  size_t want = ffi::GetDataSize(t);
  std::ifstream in(spec.file, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open input file " + spec.file);
  size_t have = static_cast<size_t>(in.tellg());
  if (have != want) {
    throw std::runtime_error("input " + spec.file + " holds " + std::to_string(have) +
                             " bytes; shape and dtype need " + std::to_string(want));
  }
  in.seekg(0);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(want));
  return t;
}

void CollectTensors(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) CollectTensors(item, out);
  } else {
    throw std::runtime_error("main returned a value that is neither a tensor nor a tuple");
  }
}

std::string ShapeJson(const ffi::Tensor& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape().size(); ++i) {
    s += (i ? ", " : "") + std::to_string(t.shape()[i]);
  }
  return s + "]";
}

std::string WriteOutputs(const std::vector<ffi::Tensor>& outs, const std::string& dir) {
  std::string json = "[";
  for (size_t k = 0; k < outs.size(); ++k) {
    const ffi::Tensor& t = outs[k];
    if (t.device().device_type != kDLCPU) throw std::runtime_error("output not on the CPU");
    if (!t.IsContiguous()) throw std::runtime_error("output is not contiguous");
    std::string file = dir + "/output_" + std::to_string(k) + ".bin";
    std::ofstream f(file, std::ios::binary);
    const char* data = static_cast<const char*>(t.data_ptr()) + t.byte_offset();
    f.write(data, static_cast<std::streamsize>(ffi::GetDataSize(t)));
    if (!f) throw std::runtime_error("cannot write " + file);
    json += (k ? ", " : "") + std::string("{\"file\": \"") + file + "\", \"shape\": " +
            ShapeJson(t) + ", \"dtype\": \"" +
            std::string(ffi::DLDataTypeToString(t.dtype())) + "\"}";
  }
  return json + "]";
}

ffi::Function GetFunction(const ffi::Module& mod, const char* name, const std::string& what) {
  ffi::Optional<ffi::Function> fn = mod->GetFunction(name);
  if (!fn.has_value()) {
    throw std::runtime_error(what + " has no function '" + name +
                             "': not a TVM Relax VM library (slimgraph artifact model.so)?");
  }
  return *fn;
}

int Run(const Options& opt) {
  ffi::Module lib = ffi::Module::LoadFromFile(opt.model);
  ffi::Module vm = GetFunction(lib, "vm_load_executable", opt.model)().cast<ffi::Module>();
  // vm_initialization takes (device_type, device_id, allocator) per device; 2 = pooled.
  ffi::Function init = GetFunction(vm, "vm_initialization", "the VM");
  init(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = GetFunction(vm, "main", "the VM");

  std::vector<ffi::Any> args;
  for (const InputSpec& spec : opt.inputs) args.emplace_back(ReadInput(spec));
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  auto call = [&]() {
    ffi::Any result;
    main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    return result;
  };

  for (int i = 0; i < opt.warmup; ++i) call();
  std::vector<double> ms;
  ffi::Any result;
  for (int i = 0; i < opt.repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    result = call();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::vector<ffi::Tensor> outs;
  CollectTensors(result, &outs);
  std::string outputs = WriteOutputs(outs, opt.out_dir);
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  std::printf("{\"outputs\": %s, \"latency_ms\": {\"median\": %.6f, \"min\": %.6f, "
              "\"max\": %.6f, \"repeat\": %d, \"warmup\": %d}}\n",
              outputs.c_str(), median, sorted.front(), sorted.back(), opt.repeat, opt.warmup);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt = ParseArgs(argc, argv);
  try {
    return Run(opt);
  } catch (const ffi::Error& err) {
    std::cerr << "runner: TVM error: " << err.what() << "\n";
  } catch (const std::exception& err) {
    std::cerr << "runner: " << err.what() << "\n";
  }
  return 1;
}
